-- wrk script for flood.py: every request carries a DISTINCT garbage bearer token, LIMIT requests in all.
--
--   wrk -t1 -c50 -d600s -s garbage.lua http://127.0.0.1:PORT -- PATH LIMIT HEADER_B64 SEED DONE_FILE
--
-- Even counters: a random-looking token68 string (refused at parse time).
-- Odd counters:  a well-formed JWS with the issuer's real header (alg, kid), a plausible payload with a unique
--                jti and a garbage signature (refused only after the signature check: the expensive path).
-- Nothing here is ever valid, so a verification cache must not grow from it.

local path, limit, header, seed, done_file = "/", 0, "", "x", nil
local counter, seen = 0, 0
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local chars = {}
for k = 1, 64 do chars[k - 1] = alphabet:sub(k, k) end

local function b64url(s)
  local out, len = {}, #s
  for k = 1, len, 3 do
    local a, b, c = s:byte(k, k + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    out[#out + 1] = chars[math.floor(n / 262144) % 64] .. chars[math.floor(n / 4096) % 64]
    if b then out[#out + 1] = chars[math.floor(n / 64) % 64] end
    if c then out[#out + 1] = chars[n % 64] end
  end
  return table.concat(out)
end

local function noise(n, salt)
  local out = {}
  local x = salt
  for k = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    out[k] = chars[math.floor(x / 65536) % 64]
  end
  return table.concat(out)
end

function init(args)
  path = args[1] or "/"
  limit = tonumber(args[2] or "1000") or 1000
  header = args[3] or ""
  seed = args[4] or "x"
  done_file = args[5]
end

function request()
  counter = counter + 1
  local token
  if counter % 2 == 0 then
    token = seed .. string.format("%x", counter) .. noise(40, counter)
  else
    local payload = string.format(
      '{"iss":"https://issuer.test","sub":"mallory","aud":"https://api.example.com","exp":%d,"iat":%d,' ..
      '"jti":"%s-%d","client_id":"x","scope":"hello:read"}', os.time() + 3600, os.time(), seed, counter)
    token = header .. "." .. b64url(payload) .. "." .. noise(86, counter)
  end
  return wrk.format("GET", path, {["Authorization"] = "Bearer " .. token})
end

function response(status, headers, body)
  seen = seen + 1
  if seen >= limit then
    if done_file then
      local fh = io.open(done_file, "w")
      if fh then fh:write("done\n"); fh:close() end
    end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"err_status":%d,"err_connect":%d,' ..
    '"err_read":%d,"err_timeout":%d}\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.status, e.connect, e.read, e.timeout))
end
