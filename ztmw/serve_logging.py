"""How `ztmw serve` logs: structlog JSON lines on stdout, and the audit events through the same writer.

`ztmw serve` is an application, so it configures structlog (the library never does). Its configuration is
the one structlog's performance advice describes (cached loggers, a level filter decided when the logger is
built, a plain write per line), with one more step: every line goes through a single `JsonLinesAuditSink`
on stdout, and while that configuration is in place the default `structlog` audit sink hands its events to
that writer directly instead of through the processor chain. An audit line is then rendered later, with its
batch (about 1 us of work on the request instead of about 15), and is the same JSON line structlog would
have printed (`timestamp`, `level`, `event` and the event's fields); the ztmw log lines (start-up, warnings)
are written at once, after the audit lines queued before them, so stdout stays in order and no line is split.

An application that configures structlog itself (its own processors, redaction, another renderer) keeps
full control: the audit sink sees that the configuration is no longer this one and logs every event through
structlog, at the cost of running the processor chain per request (see the README's performance section).
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
from typing import Any

import structlog

from .audit_jsonl import JsonLinesAuditSink

_PROCESSORS: list[Any] = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.JSONRenderer(),
]
_stdout: JsonLinesAuditSink | None = None


class _StderrReporter:
    """Where the stdout writer reports its own outages: not stdout, which is what failed."""

    def _say(self, level: str, event: str, **fields: Any) -> None:
        try:
            sys.stderr.write(json.dumps({"level": level, "event": event, **fields}, default=str) + "\n")
            sys.stderr.flush()
        except Exception:
            pass

    def error(self, event: str, **fields: Any) -> None:
        self._say("error", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._say("warning", event, **fields)


def stdout_writer() -> JsonLinesAuditSink:
    """The one writer of stdout in this process (made on first use, flushed and closed at exit)."""
    global _stdout
    if _stdout is None:
        _stdout = JsonLinesAuditSink("-", logger=_StderrReporter())
        atexit.register(_stdout.close)
    return _stdout


class _StdoutLogger:
    """A structlog logger whose every line goes to the stdout writer, after the audit lines queued before it."""

    def msg(self, message: str) -> None:
        stdout_writer().write_line(message)

    log = debug = info = warn = warning = error = err = critical = fatal = exception = failure = msg


_LOGGER = _StdoutLogger()


def _logger_factory(*args: Any) -> _StdoutLogger:
    return _LOGGER


def configure() -> None:
    """`ztmw serve`'s structlog configuration (also what `direct_audit_writer` recognises)."""
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=True,
    )


def direct_audit_writer() -> JsonLinesAuditSink | None:
    """The stdout writer when structlog still has `configure`'s configuration, else None (the application
    configured structlog its own way: its processors must see every event)."""
    if not structlog.is_configured():
        return None
    config = structlog.get_config()
    if config["processors"] is not _PROCESSORS or config["logger_factory"] is not _logger_factory:
        return None
    return stdout_writer()
