"""The fast audit sink: one JSON line per decision, rendered here and written in batches.

structlog's processor chain costs about 17 us per event in a loop and several times that in a busy server, as
much as serving the request itself; a sink that renders a known, flat event needs none of it. Written by hand
rather than as structlog processors because the saving comes from skipping the chain: an event replayed by
the decision memo reuses the JSON fragment rendered for its template, and lines leave in one `write` per
batch (at most `flush_interval` seconds or `buffer_bytes` late; security events are written at once). A
request only notes its fragment, status, duration and time: the lines are put together when the batch is
written, in one tight loop, which costs a busy server less than doing it between two requests.

A pipe or terminal (stdout into a log shipper, say) is written by a `PipeWriter` thread, so its reader may
apply backpressure without stalling the event loop; at most `max_backlog` bytes wait for it, beyond that
batches are dropped, counted and reported. With stdout as the target the outage reports travel in the same
stream, in order, instead of through the ztmw logger (which `ztmw serve` points at the same stalled stdout).
A regular file is written directly (page cache).

Configure with `[audit] sinks = ["jsonl"]` and `[plugins.jsonl] path = "audit.jsonl"` ("-" is stdout).
The line format is what `ztmw serve`'s structlog setup prints: `timestamp` (ISO 8601, UTC), `level`, `event`,
then the AuditEvent's non-empty fields.
"""

from __future__ import annotations

import asyncio
import json
import math
import operator
import os
import stat
import time
from dataclasses import replace
from json.encoder import encode_basestring_ascii
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Mapping

import structlog

from .audit import RenderedTemplates, elapsed_ms
from .config import check_plugin_settings
from .errors import ConfigurationError
from .models import AuditEvent
from .pipe_writer import PipeWriter
from .typing import Clock, PluginDeps

_BACKLOG_MAX = 16 * 1024 * 1024  # bytes that may wait for a slow pipe reader
_CLOSE_TIMEOUT = 5.0  # seconds shutdown gives a slow pipe reader

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # ensure_ascii: no raw control or non-ASCII bytes
_STATIC_FIELDS = tuple(name for name in AuditEvent.__dataclass_fields__
                       if name not in ("status", "duration_ms", "security"))


_KEYS = {name: encode_basestring_ascii(name) + ":" for name in _STATIC_FIELDS}
# a line's length but for its fragment: the timestamp, level and event up front, status and duration behind
_LINE_OVERHEAD = len('{"timestamp":"2026-01-01T00:00:00.000000Z","level":"warning","event":"ztmw.security",'
                     '"status":200,"duration_ms":1000.123}\n')
_UNRENDERED_SIZE = 320  # what an event not rendered yet is taken to weigh in the buffer (a typical fragment)
# numbers of a replayed line by table lookup: number formatting was most of the cost of rendering a line
_DIGITS = tuple(f"{i:03d}" for i in range(1000))
_STATUS = {status: str(status) for status in range(100, 1000)}  # others: int(status), or counted lost
_LINE = "line"  # the kind of a whole line queued by `write_line` (any status, even a negative one, is a status)
_HEADS = {False: '","level":"info","event":"ztmw.decision",', True: '","level":"warning","event":"ztmw.security",'}


def _fragment(event: AuditEvent) -> str:
    """`"decision":"allow",...,` — every non-empty field except the per-request ones, with a trailing comma.

    Strings and ints (nearly every field) are encoded directly, which is about twice as fast as handing a dict
    to the JSON encoder; anything else (the trust inputs) goes through the encoder."""
    parts = []
    for name in _STATIC_FIELDS:
        value = getattr(event, name)
        if value is None:
            continue
        if value.__class__ is str:
            parts.append(_KEYS[name] + encode_basestring_ascii(value))
        elif value.__class__ is int:
            parts.append(_KEYS[name] + str(value))
        else:
            parts.append(_KEYS[name] + _ENCODE(value))
    parts.append("")
    return ",".join(parts)


_PER_TOKEN = "token_id"  # the one field that differs from token to token; the rest recurs (same user, route...)
_RECURRING = operator.attrgetter(*(name for name in _STATIC_FIELDS if name != _PER_TOKEN))
_HALVES_MAX = 4096


class _Fragments:
    """`_fragment` for a stream of events from many tokens: what surrounds `token_id` is rendered once per
    distinct rest of the event (a dict keyed by those values, bounded, emptied when full), so a new token's
    line costs the encoding of its id. About a third of `_fragment`'s time per event."""

    def __init__(self) -> None:
        self._halves: dict[tuple[Any, ...], tuple[str, str]] = {}

    def __call__(self, event: AuditEvent) -> str:
        try:
            rest = _RECURRING(event)
            halves = self._halves.get(rest)
        except TypeError:  # an unhashable value (none of AuditEvent's types is): the general renderer
            return _fragment(event)
        if halves is None:
            if len(self._halves) >= _HALVES_MAX:
                self._halves.clear()
            halves = self._halves[rest] = _halves(event)
        token_id = event.token_id
        if token_id is None:
            return halves[0] + halves[1]
        return f"{halves[0]}{_KEYS[_PER_TOKEN]}{encode_basestring_ascii(token_id)},{halves[1]}"


def _halves(event: AuditEvent) -> tuple[str, str]:
    """`_fragment(event)` without its token_id, split where that field goes."""
    whole = _fragment(replace(event, token_id=None))
    # the fields before token_id, rendered alone, are where the rest begins (whatever token_id holds: the
    # halves are shared by events with and without one)
    later: dict[str, Any] = {name: None for name in _STATIC_FIELDS[_STATIC_FIELDS.index(_PER_TOKEN):]}
    before = _fragment(replace(event, **later))
    return before, whole[len(before):]


class JsonLinesAuditSink:
    """An AuditSink (and `ReusingAuditSink`) appending JSON lines to a file or stdout. Never raises: lost
    events are counted in `dropped`, and each outage is reported on the ztmw logger when it starts
    (`ztmw.audit_write_failed`) and when writing works again (`ztmw.audit_write_recovered`, with the count);
    a line cut short by a failed write is ended before the next batch, so every other line stays parseable."""

    name = "jsonl"

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        flush_interval: float = 0.2,
        buffer_bytes: int = 65536,
        clock: Clock = time.time,
        logger: Any = None,
        max_backlog: int = _BACKLOG_MAX,
    ) -> None:
        self._target = target
        self._fd: int | None = None
        self._flush_interval = flush_interval
        self._buffer_bytes = buffer_bytes
        self._clock = clock
        self._log = logger if logger is not None else structlog.get_logger("ztmw")
        # (fragment, or the event to render it from, status, ms, time, security), for a prepared replay
        # (the line's head up to the status, status, seconds elapsed, time, None), for a whole line from
        # `write_line` (the line, 0, 0.0, 0.0, _LINE)
        self._pending: list[tuple[str | AuditEvent, int, float, float, bool | str | None]] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._fragments = RenderedTemplates(_fragment)
        self._event_fragment = _Fragments()
        self._second: int | None = None  # the second `_second_text` spells (none yet)
        self._second_text = ""
        self._failing = False  # an outage is reported when it starts, and its end with the count lost
        self._lost_before = 0
        self._mid_line = False  # the last write stopped inside a line
        self._pipe: PipeWriter | None = None  # for a pipe or terminal
        self._max_backlog = max_backlog
        self.dropped = 0

    # -- lifetime ------------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._fd is None:
            if str(self._target) == "-":
                self._fd = 1
            else:
                self._fd = os.open(self._target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                self._pipe = PipeWriter(self._fd, self._max_backlog)

    async def start(self) -> None:
        self.open()

    async def aclose(self) -> None:
        """Flush, and give a slow pipe reader up to `_CLOSE_TIMEOUT` seconds to take what waits for it."""
        self.flush()
        await self.written(_CLOSE_TIMEOUT)
        self.close(timeout=0)

    async def written(self, timeout: float | None = None) -> None:
        """Until what waits for a pipe reader is written or has failed (or `timeout` seconds), with its
        outcome counted and reported."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._pipe is not None and not self._pipe.idle():
            if deadline is not None and loop.time() >= deadline:
                break
            await asyncio.sleep(0.005)
        self._collect()

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Flush and close; a pipe reader gets up to `timeout` seconds (blocking: prefer `aclose` on a loop)."""
        self.flush()
        if self._pipe is not None:
            self._pipe.wait_idle(timeout)
            self._collect()
            abandoned, outcomes = self._pipe.stop()
            self._pipe = None  # reports from here on go to the logger
            self._count(outcomes)
            if abandoned:
                self._failed(abandoned, "closed_before_written")
        if self._fd is not None and self._fd != 1:
            os.close(self._fd)  # the writer thread has its own duplicate
        self._fd = None

    # -- AuditSink -----------------------------------------------------------------------------------------

    def emit(self, event: AuditEvent) -> None:
        """Noted now, rendered with its batch (events are immutable)."""
        self._append(event, event, _UNRENDERED_SIZE, event.status, event.duration_ms)

    def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None:
        """The decision `template` records, for another request: its fragment is rendered once (a replay
        of a memo entry made before this sink was the only one; replays use `prepare`'s recorder)."""
        try:
            fragment = self._fragments.get(template)
        except Exception as exc:  # an audit sink must never turn a decision into a 500
            self._failed(1, type(exc).__name__)
            return
        self._append(template, fragment, len(fragment), status, duration_ms)

    def prepare(self, template: AuditEvent) -> Callable[[int, float], None]:
        """`PreparingAuditSink`: the line of a replay of `template` is rendered now up to its status, and each
        replay notes that head, its status, the time elapsed and the time: the least a request can pay for its
        line (the rest is put together with the batch)."""
        if template.security:  # written at once, like every security event: the general path
            return lambda status, started: self.emit_again(template, status, elapsed_ms(started))
        head = _HEADS[False] + _fragment(template) + '"status":'
        size = len(head) + _LINE_OVERHEAD
        clock = self._clock
        append = self._pending.append  # the list is never replaced (see flush)

        def record(status: int, started: float) -> None:
            try:
                append((head, status, perf_counter() - started, clock(), None))
                self._size += size
                if self._size >= self._buffer_bytes:
                    self.flush()
                elif self._timer is None:
                    self._arm_timer()
            except Exception as exc:  # an audit sink must never turn a decision into a 500
                self._failed(1, type(exc).__name__)

        return record

    def prepare_per_token(self, template: AuditEvent) -> Callable[[str | None, int, float], None]:
        """`PerTokenAuditSink`: the line of a new decision shaped like `template` is rendered now up to its
        status but for the token id, and each decision notes that head with its id put in, its status, the time
        elapsed and the time, as a replay does (the same line as `emit` would give, the duration to the µs)."""
        if template.security:  # written at once, like every security event: the general path
            return lambda token_id, status, started: self.emit(
                replace(template, token_id=token_id, status=status, duration_ms=elapsed_ms(started)))
        before, after = _halves(template)
        head = _HEADS[False] + before + _KEYS[_PER_TOKEN]
        tail = "," + after + '"status":'
        bare = _HEADS[False] + before + after + '"status":'
        clock = self._clock
        append = self._pending.append  # the list is never replaced (see flush)

        def record(token_id: str | None, status: int, started: float) -> None:
            try:
                line = bare if token_id is None else head + encode_basestring_ascii(token_id) + tail
                append((line, status, perf_counter() - started, clock(), None))
                self._size += len(line) + _LINE_OVERHEAD
                if self._size >= self._buffer_bytes:
                    self.flush()
                elif self._timer is None:
                    self._arm_timer()
            except Exception as exc:  # an audit sink must never turn a decision into a 500
                self._failed(1, type(exc).__name__)

        return record

    def write_line(self, line: str) -> None:
        """Another JSON line (a log line, already rendered) for the same stream: written at once, after the
        audit lines queued before it, so the stream stays in order (`ztmw.serve_logging`)."""
        try:
            self._pending.append((line, 0, 0.0, 0.0, _LINE))
            self.flush()
        except Exception as exc:  # logging must never raise into the caller
            self._failed(1, type(exc).__name__)

    def _append(self, event: AuditEvent, fragment: str | AuditEvent, size: int, status: int,
                duration_ms: float) -> None:
        try:
            security = bool(event.security)
            self._pending.append((fragment, status, duration_ms, self._clock(), security))
            self._size += size + _LINE_OVERHEAD
            if security or self._size >= self._buffer_bytes:
                self.flush()
            elif self._timer is None:
                self._arm_timer()
        except Exception as exc:  # an audit sink must never turn a decision into a 500
            self._failed(1, type(exc).__name__)

    def _lines(self, pending: list[tuple[str | AuditEvent, int, float, float, bool | str | None]]) -> list[str]:
        """The JSON lines of a batch; one that cannot be rendered is counted lost, the others are kept."""
        try:
            return self._replay_lines(pending)
        except Exception:  # not a batch of plain replays within one second: line by line
            return self._any_lines(pending)

    def _replay_lines(self, pending: list[tuple[str | AuditEvent, int, float, float, bool | str | None]]) -> list[str]:
        """The common batch, of prepared replays (most requests) within one second, in the tightest loop;
        raises for anything else (another kind of record, another second, an odd status)."""
        whole = math.floor(pending[0][3])
        start, digits, statuses = f'{{"timestamp":"{self._spelled(whole)}.', _DIGITS, _STATUS
        lines: list[str] = []
        append = lines.append
        for head, status, seconds, now, kind in pending:
            micros = int((now - whole) * 1_000_000)
            if kind is not None or micros < 0:
                raise ValueError("not a replay of this second")
            took = int(seconds * 1_000_000)  # a later second indexes past the table: raises too
            append(f'{start}{digits[micros // 1000]}{digits[micros % 1000]}Z{head}{statuses[status]},'
                   f'"duration_ms":{took // 1000}.{digits[took % 1000]}}}\n')
        return lines

    def _any_lines(self, pending: list[tuple[str | AuditEvent, int, float, float, bool | str | None]]) -> list[str]:
        """Line by line, each kind of record (the timestamp's date and time part formatted once a second)."""
        lines: list[str] = []
        append = lines.append
        second, second_text = self._second, self._second_text
        for fragment, status, duration_ms, now, security in pending:
            try:
                if security is _LINE:  # a whole line from `write_line`
                    append(f"{fragment}\n")
                    continue
                whole = math.floor(now)  # before 1970 too: the second the time falls in
                if whole != second:
                    second, second_text = whole, self._spelled(whole)
                if security is None:  # a prepared replay: the head, then status and the seconds it took
                    micros, took = int((now - whole) * 1_000_000), int(duration_ms * 1_000_000)
                    append(f'{{"timestamp":"{second_text}.{_DIGITS[micros // 1000]}{_DIGITS[micros % 1000]}Z'
                           f'{fragment}{_STATUS.get(status) or int(status)},"duration_ms":{took // 1000}.{_DIGITS[took % 1000]}}}\n')
                    continue
                if fragment.__class__ is not str:
                    fragment = self._event_fragment(fragment)  # type: ignore[arg-type]
                micros = int((now - whole) * 1_000_000)
                append(f'{{"timestamp":"{second_text}.{_DIGITS[micros // 1000]}{_DIGITS[micros % 1000]}Z'
                       f'{_HEADS[security is True]}{fragment}"status":{_STATUS.get(status) or int(status)},'
                       f'"duration_ms":{float(duration_ms)!r}}}\n')
            except Exception as exc:
                self._failed(1, type(exc).__name__)
        return lines

    def _timestamp(self, now: float) -> str:
        """ISO 8601 in UTC with microseconds; the date and time part is formatted once a second."""
        second = math.floor(now)
        return f"{self._spelled(second)}.{int((now - second) * 1_000_000):06d}Z"

    def _spelled(self, second: int) -> str:
        """The date and time part of an ISO 8601 UTC timestamp, formatted once a second (the last one kept)."""
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._second_text

    def _arm_timer(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # used outside an event loop (a script, a test): write at once
            self.flush()
            return
        self._timer = loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        """Write what is buffered in one go; called by the timer, when the buffer is full, and on close."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        # the list object stays (prepared recorders hold its append): the batch is a copy, and what a thread
        # appended meanwhile (a log line through `write_line`) stays for the next batch (one slice deletion)
        pending = self._pending[:]
        del self._pending[:len(pending)]
        self._size = 0
        lines = self._lines(pending)
        data = "".join(lines).encode("utf-8")
        try:
            self.open()
            if self._pipe is not None:
                self._to_pipe(self._pipe, data, len(lines))
                return
            self._write(data)
        except OSError as exc:
            self._failed(len(lines), exc.strerror or type(exc).__name__)
            return
        self._recovered()

    def _to_pipe(self, pipe: PipeWriter, data: bytes, count: int) -> None:
        self._collect()
        if not pipe.submit(data):
            self._failed(count, "backlog_full")

    def _collect(self) -> None:
        """Count and report what the pipe writer did since the last look, in order."""
        if self._pipe is not None:
            self._count(self._pipe.collect())

    def _count(self, outcomes: list[tuple[int, str] | None]) -> None:
        for outcome in outcomes:
            if outcome is None:
                self._recovered()
            else:
                self._failed(*outcome)

    def _write(self, data: bytes) -> None:
        """All of `data`, after ending a line an earlier failed write cut short; raises OSError."""
        assert self._fd is not None
        view = memoryview(b"\n" + data if self._mid_line else data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self._mid_line = bool(view)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            self._report("warning", "ztmw.audit_write_recovered", lost=self.dropped - self._lost_before)

    def _failed(self, count: int, error: str) -> None:
        """Count lost events; say so once per outage (when the sink starts failing), never raise."""
        self.dropped += count
        if not self._failing:
            self._failing = True
            self._lost_before = self.dropped - count
            self._report("error", "ztmw.audit_write_failed", error=error)

    def _report(self, level: str, event: str, **fields: Any) -> None:
        """Tell the ztmw logger, which may write to the very stream that just failed (stdout): never raise.

        With stdout written by the pipe writer, the report goes into that stream instead, after the lines it
        is about: the logger would block the event loop on the stalled pipe and could split a line."""
        try:
            if self._pipe is not None and str(self._target) == "-":
                line = {"timestamp": self._timestamp(self._clock()), "level": level, "event": event,
                        "sink": self.name, **fields}
                if self._pipe.submit(_ENCODE(line).encode() + b"\n", bound=False):
                    return
            getattr(self._log, level)(event, sink=self.name, **fields)
        except Exception:
            pass


def create(settings: Mapping[str, Any], deps: PluginDeps) -> JsonLinesAuditSink:
    """Entry point `jsonl` in `ztmw.audit_sinks`: `path` (required; "-" for stdout), `flush_interval` (s,
    default 0.2), `buffer_bytes` (default 65536). A relative path is taken from the working directory."""
    check_plugin_settings(settings, "jsonl", ("path", "flush_interval", "buffer_bytes"))
    path = settings.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigurationError("plugins.jsonl.path: required, the file to append audit lines to (\"-\": stdout)")
    interval = settings.get("flush_interval", 0.2)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval <= 60:
        raise ConfigurationError("plugins.jsonl.flush_interval: seconds, more than 0 and at most 60")
    size = settings.get("buffer_bytes", 65536)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 16 * 1024 * 1024:
        raise ConfigurationError("plugins.jsonl.buffer_bytes: an integer from 0 to 16 MiB")
    sink = JsonLinesAuditSink(path if path == "-" else Path(path).absolute(), flush_interval=float(interval),
                              buffer_bytes=size, clock=deps.clock, logger=deps.logger)
    deps.on_startup(sink.start)
    deps.on_cleanup(sink.aclose)
    return sink
