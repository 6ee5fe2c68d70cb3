"""The jsonl sink's pipe writer (ztmw/pipe_writer.py): a pipe or terminal is written from a daemon thread.

Written first as the review of an earlier thread-pool design (commit a10e7ce), whose seven defects it found;
the same tests, adapted to the PipeWriter's internals, are now the acceptance tests of its replacement.
Every test uses real conditions: FIFOs whose reader stalls, a reader that closes (EPIPE), /dev/full (ENOSPC),
a FIFO made non-blocking (EAGAIN mid-batch), child processes whose stdout is a pipe nobody reads.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import ztmw.audit_jsonl as audit_jsonl
from ztmw.audit_jsonl import JsonLinesAuditSink
from ztmw.models import AuditEvent
from ztmw.pipe_writer import _PIPE_BUF, PipeWriter, _piece_end
from ztmw.testing import FakeClock

EVENT = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/items",
                   client_id="c" * 200, duration_ms=0.25)
SECURITY = AuditEvent(decision="deny", reason="token_invalid", status=401, method="GET", route="/items",
                      security=True)
ROOT = str(Path(__file__).resolve().parents[1])  # the checkout, so a child imports this ztmw


class FifoReader:
    """The read end of a FIFO, reading nothing until `start()`; then everything until the writer is gone.
    A watchdog starts it after 20 s whatever happens, so no writer thread is left blocked forever."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opened first, so a writer's open returns
        self.data = bytearray()
        self._go = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(20, self._go.set)
        self._watchdog.daemon = True
        self._watchdog.start()

    def start(self) -> None:
        self._go.set()

    def _read(self) -> None:
        self._go.wait()
        while not self._stop.is_set():
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                self._stop.wait(0.002)
                continue
            if not chunk:
                if self.data:  # no writer left: everything is read
                    return
                self._stop.wait(0.002)  # or no writer yet (a FIFO reads as EOF before its writer opens it)
                continue
            self.data.extend(chunk)

    def wait_eof(self) -> bytes:
        self._thread.join(timeout=30)
        return bytes(self.data)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.wait_eof().decode().splitlines()]

    def close(self) -> None:
        self._watchdog.cancel()
        self._go.set()
        self._stop.set()
        self._thread.join(timeout=30)
        os.close(self.fd)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def stalled_fill(tmp_path: Path) -> tuple[FifoReader, JsonLinesAuditSink, Any]:
    """A FIFO whose reader has not started, a sink on it, and a coroutine that emits 500 events into it."""
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=0, clock=FakeClock())

    async def fill() -> None:
        for _ in range(500):
            sink.emit(EVENT)
        await asyncio.sleep(0.1)

    return reader, sink, fill


def reasons(lines: list[dict[str, Any]]) -> list[str]:
    return [line["reason"] for line in lines]


# -- pinned -----------------------------------------------------------------------------------------------------

async def test_written_returns_only_after_the_loop_side_completion_ran(tmp_path: Path) -> None:
    """`written()` returns once the writer is idle, with its outcome already counted."""
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=0, clock=FakeClock())
    try:
        sink.open()
        reader.start()
        for _ in range(300):
            sink.emit(EVENT)
        await sink.written()
        assert sink._pipe is not None and sink._pipe.idle() and sink._pipe.backlog == 0 and sink.dropped == 0
        await sink.aclose()
        assert len(reader.lines()) == 300
    finally:
        reader.close()


async def test_security_events_keep_their_place_among_buffered_decisions_through_a_stalled_reader(
    tmp_path: Path
) -> None:
    """Decisions wait for the timer, security events flush at once; the one writer thread takes batches in
    order, so what the reader finally gets is exactly the emit order."""
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", flush_interval=0.005, clock=FakeClock())
    emitted = []
    try:
        for i in range(600):
            event = replace(SECURITY if i % 7 == 0 else EVENT, reason=f"r{i}")
            emitted.append(event.reason)
            sink.emit(event)
            await asyncio.sleep(0.01 if i % 50 == 0 else 0)
        reader.start()
        await sink.aclose()
        assert reasons(reader.lines()) == emitted and sink.dropped == 0
    finally:
        reader.close()


async def test_a_reader_that_went_away_is_counted_and_reported_once_never_raised(tmp_path: Path) -> None:
    """EPIPE on the writer thread (SIGPIPE is ignored by Python): counted, one report, the loop unharmed."""
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=0, clock=FakeClock())
    sink.open()
    reader.close()  # the only reader is gone: every write is EPIPE
    with capture_logs() as logs:
        for _ in range(3):
            sink.emit(SECURITY)
            await sink.written()
        await sink.aclose()
    assert sink.dropped == 3
    assert [(e["event"], e.get("error")) for e in logs] == [("ztmw.audit_write_failed", "Broken pipe")]


async def test_closing_while_the_thread_is_blocked_never_writes_into_a_file_that_reuses_the_fd_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() gives up on a stalled reader and closes the sink's fd while the writer thread is blocked in
    write(): the thread writes its own duplicate, so a file that now gets the same fd number receives nothing."""
    monkeypatch.setattr(audit_jsonl, "_CLOSE_TIMEOUT", 0.2)
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=0, clock=FakeClock())
    other = tmp_path / "other.txt"
    try:
        for _ in range(1000):
            sink.emit(EVENT)
        await asyncio.sleep(0.1)
        old_fd = sink._fd
        pipe = sink._pipe
        assert pipe is not None and not pipe.idle()  # the thread is blocked on the full pipe
        await sink.aclose()
        fds: list[int] = []
        try:
            while old_fd not in fds and len(fds) < 256:  # the lowest free number first: the old one soon
                fds.append(os.open(other, os.O_WRONLY | os.O_CREAT, 0o600))
            assert old_fd in fds  # another file now has the number the writer thread was given
            reader.start()
            await asyncio.get_running_loop().run_in_executor(None, lambda: pipe._thread.join(15))
            assert not pipe._thread.is_alive()
        finally:
            for fd in fds:
                os.close(fd)
        assert other.read_bytes() == b""
        assert sink.dropped > 0
    finally:
        reader.close()


def test_a_batch_finished_after_its_loop_closed_raises_and_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader, sink, fill = stalled_fill(tmp_path)

    try:
        asyncio.run(fill())  # the loop closes with batches still waiting for the reader
        assert sink._pipe is not None and not sink._pipe.idle()
        reader.start()
        assert sink._pipe.wait_idle(15)
        assert not [r for r in caplog.records if "exception calling callback" in r.getMessage()]
        sink.close()
        assert len(reader.lines()) == 500
    finally:
        reader.close()


# -- the defects of the thread-pool design, now pinned ----------------------------------------------------

_EXIT_CHILD = textwrap.dedent("""
    import asyncio, sys
    import ztmw.audit_jsonl as audit_jsonl
    from ztmw.audit_jsonl import JsonLinesAuditSink
    from ztmw.models import AuditEvent
    audit_jsonl._CLOSE_TIMEOUT = 0.3  # the 5 s of a real shutdown, shortened
    event = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/items",
                       client_id="c" * 200)

    async def main():
        sink = JsonLinesAuditSink("-", buffer_bytes=0)
        for _ in range(1000):  # about 400 KB into a 64 KiB pipe nobody reads
            sink.emit(event)
        await asyncio.sleep(0.2)
        await sink.aclose()  # gives up after _CLOSE_TIMEOUT, as documented

    asyncio.run(main())
    sys.stderr.write("main returned\\n")
""")


def test_the_process_exits_after_shutdown_gave_up_on_a_reader_that_never_reads() -> None:
    read_end, write_end = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", _EXIT_CHILD], stdout=write_end, stderr=subprocess.PIPE,
                             env=child_env())
    os.close(write_end)
    try:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            stderr = child.stderr.read().decode() if child.stderr else ""
            pytest.fail(f"still running 10 s after its main returned ({stderr.strip()!r}): "
                        "the writer thread kept the process alive")
        assert child.returncode == 0
    finally:
        os.close(read_end)
        if child.stderr:
            child.stderr.close()


_REPORT_CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    from ztmw.cli import configure_json_logging
    configure_json_logging()  # what `ztmw serve` does: the ztmw logger writes JSON lines to stdout
    from ztmw.audit_jsonl import JsonLinesAuditSink
    from ztmw.models import AuditEvent
    event = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/items",
                       client_id="c" * 200)

    async def main():
        sink = JsonLinesAuditSink("-", max_backlog=300_000)  # jsonl path "-": the same stdout
        for _ in range(500):  # about 200 KB in 64 KiB batches
            sink.emit(event)
        await asyncio.sleep(0.5)  # the writer thread fills the pipe and blocks mid-batch
        sys.stderr.write("filling\\n")
        sys.stderr.flush()
        worst = 0.0
        for _ in range(5000):
            started = time.monotonic()
            sink.emit(event)
            worst = max(worst, time.monotonic() - started)
            if sink.dropped:  # the backlog is full: the outage was reported
                break
        sys.stderr.write(json.dumps({"worst_emit_s": worst, "dropped": sink.dropped}) + "\\n")
        await sink.aclose()

    asyncio.run(main())
""")


def test_the_outage_report_neither_stalls_the_loop_nor_splits_an_audit_line() -> None:
    read_end, write_end = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", _REPORT_CHILD], stdout=write_end, stderr=subprocess.PIPE,
                             env=child_env())
    os.close(write_end)
    data = bytearray()
    try:
        assert child.stderr is not None
        ready = child.stderr.readline()  # the child is about to overflow its backlog
        assert ready == b"filling\n", ready + child.stderr.read()
        time.sleep(1.5)  # the log shipper is busy for a while longer
        while True:  # then reads in small steps, as a line-oriented reader may
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            data.extend(chunk)
            time.sleep(0.0005)
        child.wait(timeout=60)
    finally:
        os.close(read_end)
    stats = json.loads(child.stderr.read().decode().splitlines()[-1])
    child.stderr.close()
    broken = []
    for line in bytes(data).split(b"\n")[:-1]:
        try:
            json.loads(line)
        except ValueError:
            broken.append(line[:60] + b"..." + line[-60:])
    assert stats["dropped"] > 0, stats
    problems = []
    if stats["worst_emit_s"] > 0.5:
        problems.append(f"an emit() blocked the event loop for {stats['worst_emit_s']:.2f} s")
    if broken:
        problems.append(f"{len(broken)} unparseable lines, e.g. {broken[0]!r}")
    assert not problems, "; ".join(problems)


def test_a_flush_without_a_loop_after_the_thread_was_used_keeps_the_order(tmp_path: Path) -> None:
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=0, clock=FakeClock())

    async def serve() -> None:
        for i in range(1000):
            sink.emit(replace(EVENT, reason=f"r{i}"))
        await asyncio.sleep(0.1)

    try:
        asyncio.run(serve())  # a script, or a test, whose loop ended with batches waiting for the reader
        assert sink._pipe is not None and not sink._pipe.idle()
        threading.Timer(0.3, reader.start).start()
        sink.emit(replace(SECURITY, reason="last"))  # no loop: written at once, on this thread
        sink.close()
        got = reasons(reader.lines())
        assert len(got) == 1001
        assert got.index("last") == 1000, f"the last event arrived as line {got.index('last')} of 1001"
    finally:
        reader.close()


def test_the_backlog_is_released_when_the_loop_that_handed_it_over_is_gone(tmp_path: Path) -> None:
    reader, sink, fill = stalled_fill(tmp_path)

    async def later() -> None:
        sink.emit(SECURITY)
        await sink.written()

    try:
        asyncio.run(fill())
        reader.start()
        assert sink._pipe is not None and sink._pipe.wait_idle(15)
        asyncio.run(later())  # the same sink, a second loop (the next test, the next asyncio.run)
        backlog = sink._pipe.backlog
        sink.close()
        assert len(reader.lines()) == 501
        assert backlog == 0
    finally:
        reader.close()


async def test_a_non_blocking_pipe_loses_nothing_while_the_backlog_is_below_its_bound(tmp_path: Path) -> None:
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=0, clock=FakeClock())
    try:
        sink.open()
        assert sink._fd is not None  # O_NONBLOCK on the file description, as a parent may set it on stdout
        fcntl.fcntl(sink._fd, fcntl.F_SETFL, fcntl.fcntl(sink._fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        for _ in range(1000):  # about 400 KB: far below the 16 MiB bound
            sink.emit(EVENT)
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)  # the writer meets EAGAIN on the full pipe and waits for the reader
        assert not sink._pipe.idle() and sink.dropped == 0  # type: ignore[union-attr]
        reader.start()
        await sink.aclose()
        assert sink.dropped == 0 and len(reader.lines()) == 1000
    finally:
        reader.close()


async def test_memory_waiting_for_a_stalled_reader_stays_near_max_backlog(tmp_path: Path) -> None:
    bound = 1_000_000
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", clock=FakeClock(), max_backlog=bound)
    try:
        for _ in range(1000):
            sink.emit(SECURITY)
        await asyncio.sleep(0.2)  # the pipe is full, the thread blocked
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(100_000):
                sink.emit(SECURITY)  # an attacker's bad tokens: each a security event, flushed alone
                if sink.dropped:
                    break
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert sink.dropped
        assert grown <= 2 * bound, f"{grown / bound:.1f} x max_backlog held"
    finally:
        reader.start()
        await sink.aclose()
        reader.close()


async def test_a_failed_batch_awaited_by_written_logs_no_unretrieved_exception() -> None:
    loop = asyncio.get_running_loop()
    contexts: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: contexts.append(context))
    try:
        sink = JsonLinesAuditSink("/dev/full", clock=FakeClock())
        with capture_logs() as logs:
            for _ in range(3):
                sink.emit(SECURITY)
                await sink.written()
            await sink.aclose()
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert sink.dropped == 3 and [e["event"] for e in logs] == ["ztmw.audit_write_failed"]
    assert [c["message"] for c in contexts] == []


async def test_another_writer_of_the_same_pipe_never_splits_an_audit_line(tmp_path: Path) -> None:
    """stdout shared with the app's own logging: the writer's pieces are whole lines of at most PIPE_BUF
    bytes, which a pipe writes in one go, so lines of the two writers never interleave."""
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=16384, clock=FakeClock())
    sink.open()
    other_fd = os.open(tmp_path / "fifo", os.O_WRONLY)
    stop = threading.Event()

    def app_logging() -> None:
        i = 0
        while not stop.is_set():
            os.write(other_fd, json.dumps({"app": i, "pad": "z" * (i % 3000)}).encode() + b"\n")
            i += 1

    logger = threading.Thread(target=app_logging)
    try:
        reader.start()
        logger.start()
        for i in range(3000):
            sink.emit(replace(EVENT, reason=f"r{i}"))
            if i % 100 == 0:
                await asyncio.sleep(0.001)
        await sink.written()
        stop.set()
        logger.join()
        os.close(other_fd)
        await sink.aclose()
        lines = reader.lines()  # every line parses
        assert [line["reason"] for line in lines if "reason" in line] == [f"r{i}" for i in range(3000)]
        assert sink.dropped == 0
    finally:
        stop.set()
        reader.close()


async def test_an_outage_of_a_pipe_is_reported_with_its_recovery(tmp_path: Path) -> None:
    """A refused batch (backlog full) then a write that works is an outage and its end, even though the
    sink collected the writer's outcomes in between (it does at every flush)."""
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=0, clock=FakeClock(), max_backlog=100_000)
    try:
        with capture_logs() as logs:
            for _ in range(1000):  # the pipe (64 KiB) and the bound fill: batches are refused
                sink.emit(EVENT)
            assert sink.dropped
            reader.start()
            await sink.written()
            sink.emit(EVENT)  # written: the outage is over
            await sink.written()
        await sink.aclose()
        assert [e["event"] for e in logs] == ["ztmw.audit_write_failed", "ztmw.audit_write_recovered"]
    finally:
        reader.close()


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _full_nonblocking_pipe() -> tuple[int, int]:
    """A pipe whose every page is full, its write end non-blocking."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    page = b"x" * 4096
    try:
        while True:
            os.write(w, page)
    except BlockingIOError:
        pass
    return r, w


# -- `dropped` counts each lost line once: after close, the sink's own reports, the newline of a cut line ----

async def test_lines_written_after_close_are_not_also_counted_dropped(tmp_path: Path) -> None:
    reader = FifoReader(tmp_path / "fifo")
    sink = JsonLinesAuditSink(tmp_path / "fifo", buffer_bytes=1 << 24, clock=FakeClock())
    try:
        for _ in range(500):  # about 200 KB in one batch: the pipe (64 KiB) takes part, the thread blocks
            sink.emit(EVENT)
        sink.flush()
        pipe = sink._pipe
        assert pipe is not None
        assert _wait(lambda: pipe._writing > 0)  # the thread holds the batch, blocked on the reader
        await asyncio.sleep(0.1)
        sink.close(timeout=0.1)  # gives up on the reader: the in-flight batch is counted lost
        dropped = sink.dropped
        reader.start()  # ... and then the reader reads after all
        received = len(reader.lines())
        assert received + dropped == 500, f"received {received}, counted dropped {dropped}, of 500"
    finally:
        reader.close()


def test_dropped_never_exceeds_the_events_emitted_on_stdout() -> None:
    child_code = textwrap.dedent("""
        import asyncio, json, sys
        import ztmw.audit_jsonl as audit_jsonl
        from ztmw.audit_jsonl import JsonLinesAuditSink
        from ztmw.models import AuditEvent
        audit_jsonl._CLOSE_TIMEOUT = 0.3
        event = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/items",
                           client_id="c" * 200)

        async def main():
            sink = JsonLinesAuditSink("-", buffer_bytes=1 << 24, max_backlog=100_000)
            for _ in range(500):
                sink.emit(event)
            sink.flush()  # about 200 KB: the thread blocks on the unread pipe
            await asyncio.sleep(0.3)
            sink.emit(event)
            sink.flush()  # refused (backlog_full): the failure report is queued behind the batch
            await sink.aclose()
            sys.stderr.write(json.dumps({"dropped": sink.dropped, "emitted": 501}) + "\\n")

        asyncio.run(main())
    """)
    read_end, write_end = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", child_code], stdout=write_end, stderr=subprocess.PIPE,
                             env=child_env())
    os.close(write_end)
    try:
        _, stderr = child.communicate(timeout=30)
    finally:
        os.close(read_end)
    stats = json.loads(stderr.decode().splitlines()[-1])
    assert stats["dropped"] <= stats["emitted"], stats


def test_the_newline_ending_a_cut_line_is_not_counted_as_a_lost_line() -> None:
    r, w = _full_nonblocking_pipe()
    os.read(r, 8192)  # two pages free: a long line is written in part
    writer = PipeWriter(w, 1 << 20)
    os.close(w)
    try:
        writer.submit(b"L" * 20000 + b"\n")  # 8 KiB written, then EAGAIN: the thread waits in poll()
        assert _wait(lambda: writer._mid_line)
        os.close(r)  # the reader goes away: EPIPE with the line cut short
        assert writer.wait_idle(5)
        assert writer.collect() == [(1, "Broken pipe")]
        writer.submit(b"one\n")  # written as b"\none\n": still one event
        assert writer.wait_idle(5)
        assert writer.collect() == [(1, "Broken pipe")]
    finally:
        writer.stop()


# -- the writer thread: poll() without spinning, its duplicate fd, pieces of whole lines, idle collection ----

def test_a_reader_that_closes_while_the_thread_polls_ends_the_write_promptly_without_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r, w = _full_nonblocking_pipe()
    attempts = []
    real_write = os.write

    def counted_write(fd: int, data: Any) -> int:  # the real write, counted: a busy loop retries thousands of times
        attempts.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr("ztmw.pipe_writer.os.write", counted_write)
    writer = PipeWriter(w, 1 << 20)
    os.close(w)
    try:
        writer.submit(b"a\n" * 100)
        time.sleep(0.3)
        assert not writer.idle()  # EAGAIN: waiting in poll()
        before = attempts.count(writer._fd)
        time.sleep(0.5)
        assert attempts.count(writer._fd) - before <= 2  # poll() waits for the reader (1 s a round), no retry loop
        os.close(r)  # POLLERR: the next write raises EPIPE, not EAGAIN
        assert writer.wait_idle(3)
        assert writer.collect() == [(100, "Broken pipe")]
    finally:
        writer.stop()


def test_the_thread_closes_its_duplicate_after_stop() -> None:
    r, w = os.pipe()
    writer = PipeWriter(w, 1 << 20)
    os.close(w)
    writer.submit(b"x\n")
    assert writer.wait_idle(5)
    assert writer.stop() == (0, [])
    writer._thread.join(5)
    assert not writer._thread.is_alive()
    assert os.read(r, 100) == b"x\n"
    assert os.read(r, 100) == b""  # EOF: no write end left open
    os.close(r)
    assert not writer.submit(b"late\n")  # refused after stop


@pytest.mark.parametrize("buf", [
    b"",
    b"short without newline",
    b"a\n" * 1000,
    b"\n" + b"b" * 5000 + b"\n",  # the leading newline of a cut line, then a line longer than PIPE_BUF
    b"c" * 5000,  # no newline at all
    b"d" * (_PIPE_BUF - 1) + b"\n" + b"e\n",  # a line of exactly PIPE_BUF bytes
    b"f\n" + b"g" * 5000 + b"\n" + b"h\n" + b"tail",
])
def test_pieces_are_whole_lines_of_at_most_pipe_buf_or_one_long_line_alone(buf: bytes) -> None:
    start, pieces = 0, []
    while start < len(buf):
        end = _piece_end(buf, start)
        assert end > start
        pieces.append(buf[start:end])
        start = end
    assert b"".join(pieces) == buf
    for piece in pieces[:-1]:
        assert piece.endswith(b"\n")
    for piece in pieces:  # longer than PIPE_BUF only as one line alone
        assert len(piece) <= _PIPE_BUF or piece.count(b"\n") <= 1


def test_an_idle_writer_is_collected_before_close_reports() -> None:
    r, w = os.pipe()
    try:
        writer = PipeWriter(w, 1 << 20)
        writer.submit(b"y\n")
        assert _wait(writer.idle)
        assert writer.collect() == []
        assert writer.stop() == (0, [])
    finally:
        os.close(w)
        os.close(r)
