"""Review of ca75952 (ztmw/pipe_writer.py and its use by the jsonl sink), with real pipes, FIFOs and children.

Its three findings (all about `dropped` counting too much at close: lines written after close, the sink's own
report lines, the newline that ends a cut line) are fixed and pinned here with the behaviour it found right.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_pipe_writer import EVENT, FifoReader, child_env
from ztmw.audit_jsonl import JsonLinesAuditSink
from ztmw.pipe_writer import _PIPE_BUF, PipeWriter, _piece_end
from ztmw.testing import FakeClock


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


# -- confirmed defects ------------------------------------------------------------------------------------------

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


# -- checked and right ------------------------------------------------------------------------------------------

def test_a_reader_that_closes_while_the_thread_polls_ends_the_write_promptly_without_spinning() -> None:
    r, w = _full_nonblocking_pipe()
    writer = PipeWriter(w, 1 << 20)
    os.close(w)
    try:
        writer.submit(b"a\n" * 100)
        time.sleep(0.3)
        assert not writer.idle()  # EAGAIN: waiting in poll()
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.25  # poll() sleeps, no busy loop
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
