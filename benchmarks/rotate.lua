-- wrk script used by every scenario: GET a path, optionally with per-request headers from a file.
--
--   wrk -t2 -c64 -d10s -s rotate.lua http://127.0.0.1:PORT -- PATH [LINES_FILE [once|cycle] [LIMIT [DONE_FILE [OFFSET [THREADS]]]]]
--
-- LINES_FILE: one request per line, its headers separated by TAB ("Authorization: Bearer x<TAB>DPoP: y").
--   cycle: rotate through the lines (distinct tokens: the cache never sees the same one twice in a row);
--   once:  send each line at most once (DPoP proofs: every request needs a fresh jti) and stop when the
--          last one is sent (answers still in flight then are not counted).
-- LIMIT: stop after this many responses (0: no limit, the -d duration bounds the run).
-- DONE_FILE: created when the thread stops early; wrk itself still sleeps for -d, so the caller (run.py)
--   watches for this file and sends wrk SIGINT, which ends the run and keeps its req/s honest.
-- OFFSET: line to start after (run.py continues where the previous run of the same file stopped, so a
--   small verification cache cannot still hold the first tokens from the run before).
-- THREADS: wrk's -t; thread k of them sends only the lines k, k+THREADS, k+2*THREADS... so that two threads
--   never send the same DPoP proof (a replay) and together cycle through distinct tokens.
-- done() prints one JSON line that run.py parses (wrk's own text summary is printed before it).

local reqs, n, i, mode, limit, seen, done_file = {}, 0, 0, "cycle", 0, 0, nil
local plain
local next_thread = 0

function setup(thread)
  thread:set("thread_index", next_thread)
  next_thread = next_thread + 1
end

function init(args)
  local path = args[1] or "/"
  local host = wrk.host .. ":" .. tostring(wrk.port)
  local head = "GET " .. path .. " HTTP/1.1\r\nHost: " .. host .. "\r\n"
  plain = head .. "\r\n"
  local threads = tonumber(args[7] or "1") or 1
  local index = thread_index or 0
  if args[2] and args[2] ~= "" and args[2] ~= "-" then
    local all, k = {}, 0
    for line in io.lines(args[2]) do
      if line ~= "" then
        k = k + 1
        all[k] = head .. string.gsub(line, "\t", "\r\n") .. "\r\n\r\n"
        if (k - 1) % threads == index then
          n = n + 1
          reqs[n] = all[k]
        end
      end
    end
    if n == 0 and k > 0 then  -- fewer lines than threads (one cached token): every thread sends them all
      reqs, n = all, k
    end
  end
  mode = args[3] or "cycle"
  limit = tonumber(args[4] or "0") or 0
  done_file = args[5]
  if n > 0 then i = math.floor((tonumber(args[6] or "0") or 0) / threads) % n end
end

local function finish()
  if done_file and done_file ~= "" then
    local fh = io.open(done_file, "w")
    if fh then fh:write("done\n"); fh:close() end
  end
  wrk.thread:stop()
end

function request()
  if n == 0 then return plain end
  i = i + 1
  if i > n then
    -- "once": the thread is stopping (below); requests written in its last loop turn repeat the last line
    -- and are never counted. "cycle": start over.
    if mode == "once" then i = n else i = 1 end
  end
  if mode == "once" and i == n then
    finish()  -- stop when the last line is SENT: restarting from line 1 would send used proofs (replays)
  end
  return reqs[i]
end

function response(status, headers, body)
  seen = seen + 1
  if limit > 0 and seen >= limit then
    finish()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
