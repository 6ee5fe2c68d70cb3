"""Decision -> AuditEvent -> structlog: one event per request, allow or deny, never a token.

The library never calls `structlog.configure()`: the application owns its logging. Events go to a bound
logger named by `[audit] logger`; security-relevant denials (replay, downgrade, algorithm confusion, forged
certificate headers) are logged at warning level so they stand out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Literal, Mapping, Sequence

import structlog

from .config import check_plugin_settings
from .models import AuditEvent
from .typing import AuditSink, PluginDeps


@functools.lru_cache(maxsize=16384)  # the same subjects recur request after request; bounded
def hash_subject(subject: str) -> str:
    """A stable pseudonym: the same subject always maps to the same value, the value does not reveal it."""
    return "sha256:" + hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:24]


_FIELDS = tuple(f.name for f in dataclasses.fields(AuditEvent) if f.name != "security")


class StructlogAuditSink:
    """The default sink. Renders nothing itself: the application's structlog processors decide the format."""

    name = "structlog"

    def __init__(self, logger_name: str = "ztmw.audit", logger: Any = None) -> None:
        self._logger = logger if logger is not None else structlog.get_logger(logger_name)

    def emit(self, event: AuditEvent) -> None:
        # getattr over the field names, not dataclasses.asdict: asdict deep-copies and was a tenth of a request
        fields = {name: value for name in _FIELDS if (value := getattr(event, name)) is not None}
        try:
            if event.security:
                self._logger.warning("ztmw.security", **fields)
            else:
                self._logger.info("ztmw.decision", **fields)
        except Exception:  # an audit sink must never turn a decision into a 500
            pass


def subject_for_audit(subject: str | None, mode: Literal["hash", "plain", "omit"]) -> str | None:
    if subject is None or mode == "omit":
        return None
    return subject if mode == "plain" else hash_subject(subject)


def create_structlog_sink(settings: Mapping[str, Any], deps: PluginDeps) -> StructlogAuditSink:
    """Entry point `structlog` in `ztmw.audit_sinks` (the default)."""
    check_plugin_settings(settings, "structlog", hint="use [audit] logger")
    return StructlogAuditSink(deps.config.audit.logger)


class AuditFanout:
    """Hands each event to every configured sink; one failing sink neither stops the others nor the request."""

    def __init__(self, sinks: Sequence[AuditSink]) -> None:
        self._sinks = tuple(sinks)

    def emit(self, event: AuditEvent) -> None:
        for sink in self._sinks:
            try:
                sink.emit(event)
            except Exception:
                pass
