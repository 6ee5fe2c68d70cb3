"""A writer for a pipe or terminal that never blocks the event loop: the audit sink's way to stdout.

A reader of stdout (a container's log driver, a log shipper) may apply backpressure for as long as it likes;
a blocking `write` on the event loop would then stall every request. Here one daemon thread writes, and what
waits for it is one bounded buffer of bytes:

- its own duplicate of the descriptor, closed by the thread when it stops: closing the sink never pulls a
  descriptor from under a blocked write, and a reused descriptor number never receives audit lines;
- a daemon thread: a reader that never reads cannot keep the process from exiting;
- whole lines in writes of at most PIPE_BUF bytes where it can: a pipe writes those in one piece, so another
  writer of the same pipe (the app's own logging on stdout) never splits an audit line;
- EAGAIN (someone made the pipe non-blocking) waits for the reader with poll() instead of losing the batch;
- outcomes (lines lost with the error, or written again) are counted under the lock and collected by the
  sink on its own thread: nothing is ever called back on an event loop that may be gone.

Written by hand: the standard library's executors join their threads at exit and give no byte bound.
"""

from __future__ import annotations

import os
import select
import threading

_PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # POSIX guarantees at least 512


class PipeWriter:
    """Accepts batches of whole lines (`submit`) and writes them in order on a thread of its own."""

    def __init__(self, fd: int, max_backlog: int) -> None:
        self._fd = os.dup(fd)
        self._max_backlog = max_backlog
        self._cond = threading.Condition()
        self._buffer = bytearray()
        self._writing = 0  # bytes of the chunk the thread is writing now
        # audit lines (not the sink's own reports) queued, in the chunk being written, in its current piece
        self._buffer_events = 0
        self._events_in_flight = 0
        self._piece_events = 0
        self._stopping = False
        self._mid_line = False  # the last write stopped inside a line: the next one starts with a newline
        self._outcomes: list[tuple[int, str] | None] = []  # (lines lost, error) or None: written again
        self._in_outage = False  # the last write failed, or a batch was refused: the next write that works ends it
        self._thread = threading.Thread(target=self._run, name="ztmw-audit-writer", daemon=True)
        self._thread.start()

    # -- the sink's side ---------------------------------------------------------------------------------

    def submit(self, data: bytes, *, bound: bool = True) -> bool:
        """Queue `data`; False when it would take what waits beyond `max_backlog` (a batch is always taken
        when nothing waits; `bound=False` for the sink's own short outage reports) or the writer is stopped."""
        with self._cond:
            waiting = len(self._buffer) + self._writing
            if self._stopping or (bound and waiting and waiting + len(data) > self._max_backlog):
                self._in_outage = True  # the sink counts the refusal; the next write that works ends it
                return False
            self._buffer += data
            if bound:
                self._buffer_events += data.count(b"\n")
            self._cond.notify_all()
            return True

    @property
    def backlog(self) -> int:
        """Bytes queued or being written."""
        with self._cond:
            return len(self._buffer) + self._writing

    def idle(self) -> bool:
        with self._cond:
            return not self._buffer and not self._writing

    def wait_idle(self, timeout: float | None) -> bool:
        """Until everything queued is written (or has failed); False when `timeout` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._buffer and not self._writing, timeout)

    def collect(self) -> list[tuple[int, str] | None]:
        """What happened since the last call, in order: (lines lost, error) for a failed write, None for a
        write that worked after a failure."""
        with self._cond:
            outcomes, self._outcomes = self._outcomes, []
            return outcomes

    def stop(self) -> tuple[int, list[tuple[int, str] | None]]:
        """Stop taking batches; the thread ends once the piece it is writing is done. Returns, at once, the
        audit lines given up on (queued, or not reached in the current chunk; the piece being written, at most
        PIPE_BUF bytes, is not counted: it is written when its reader reads) and the outcomes not collected."""
        with self._cond:
            self._stopping = True
            abandoned = self._buffer_events + max(0, self._events_in_flight - self._piece_events)
            self._buffer.clear()
            self._buffer_events = 0
            outcomes, self._outcomes = self._outcomes, []
            self._cond.notify_all()
            return abandoned, outcomes

    # -- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._buffer) or self._stopping)
                    if not self._buffer:
                        return
                    chunk = bytes(self._buffer)
                    self._buffer.clear()
                    self._writing = len(chunk)
                    self._events_in_flight, self._buffer_events = self._buffer_events, 0
                lost = self._write(chunk)
                with self._cond:
                    self._writing = 0
                    self._events_in_flight = self._piece_events = 0
                    if not self._stopping:  # after stop() the caller has counted what was left
                        self._record(lost)
                    self._cond.notify_all()
        finally:
            os.close(self._fd)

    def _record(self, lost: tuple[int, str] | None) -> None:
        """Keep outcomes short: consecutive losses add up, and a success counts only when it ends an outage
        (a failed write, or a batch refused for the bound), collected or not."""
        if lost is None:
            if self._in_outage:
                self._outcomes.append(None)
                self._in_outage = False
            return
        last = self._outcomes[-1] if self._outcomes else None
        if last is not None:
            self._outcomes[-1] = (last[0] + lost[0], last[1])
        else:
            self._outcomes.append(lost)
        self._in_outage = True

    def _write(self, data: bytes) -> tuple[int, str] | None:
        """Write `data` in whole-line pieces; on an error, the lines not written whole are lost."""
        prefix = 1 if self._mid_line else 0  # the newline that ends a line cut short is no line of its own
        buf = b"\n" + data if prefix else data
        view = memoryview(buf)
        start = 0
        try:
            while start < len(buf):
                end = _piece_end(buf, start)
                with self._cond:
                    if self._stopping:
                        return None
                    self._piece_events = min(buf.count(b"\n", max(start, prefix), end), self._events_in_flight)
                piece = view[start:end]
                while piece:
                    try:
                        written = os.write(self._fd, piece)
                    except BlockingIOError:  # a non-blocking pipe that is full: wait for the reader
                        _wait_writable(self._fd)
                        continue
                    piece = piece[written:]
                    self._mid_line = bool(piece)
                with self._cond:
                    self._events_in_flight -= self._piece_events
                    self._piece_events = 0
                start = end
        except OSError as exc:
            return buf.count(b"\n", max(start, prefix)), exc.strerror or type(exc).__name__
        return None


def _piece_end(buf: bytes, start: int) -> int:
    """The end of the next write: whole lines of at most PIPE_BUF bytes, or one longer line alone."""
    limit = start + _PIPE_BUF
    if limit >= len(buf):
        return len(buf)
    cut = buf.rfind(b"\n", start, limit)
    if cut == -1:
        cut = buf.find(b"\n", limit)
    return len(buf) if cut == -1 else cut + 1


def _wait_writable(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll(1000)
