"""Decision -> AuditEvent -> structlog: one event per request, allow or deny, never a token.

The library never calls `structlog.configure()`: the application owns its logging. Events go to a bound
logger named by `[audit] logger`; security-relevant denials (replay, downgrade, algorithm confusion, forged
certificate headers) are logged at warning level so they stand out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import TYPE_CHECKING, Any, Callable, Generic, Literal, Mapping, Sequence, TypeVar

import structlog

from .config import check_plugin_settings
from .models import AuditEvent
from .typing import AuditSink, PerTokenAuditSink, PluginDeps, PreparingAuditSink, ReusingAuditSink

if TYPE_CHECKING:  # pragma: no cover - the jsonl sink imports this module
    from .audit_jsonl import JsonLinesAuditSink


@functools.lru_cache(maxsize=16384)  # the same subjects recur request after request; bounded
def hash_subject(subject: str) -> str:
    """A stable pseudonym: the same subject always maps to the same value, the value does not reveal it."""
    return "sha256:" + hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started` (a `time.perf_counter()` value), to the microsecond (truncated: a third of
    what round() costs)."""
    return int((time.perf_counter() - started) * 1_000_000) / 1000


_FIELDS = tuple(f.name for f in dataclasses.fields(AuditEvent) if f.name != "security")
R = TypeVar("R")


def _fields(event: AuditEvent) -> dict[str, Any]:
    # getattr over the field names, not dataclasses.asdict: asdict deep-copies and was a tenth of a request
    return {name: value for name in _FIELDS if (value := getattr(event, name)) is not None}


class RenderedTemplates(Generic[R]):
    """What a sink made of recent memo templates (`emit_again`), by object identity and bounded, so a
    replayed decision is rendered once however often it recurs."""

    def __init__(self, render: Callable[[AuditEvent], R], keep: int = 4096) -> None:
        self._render = render
        self._keep = keep
        self._kept: dict[int, tuple[AuditEvent, R]] = {}

    def get(self, template: AuditEvent) -> R:
        kept = self._kept.get(id(template))
        if kept is None or kept[0] is not template:  # ids are reused after an object dies: check identity
            if len(self._kept) >= self._keep:
                self._kept.clear()
            kept = (template, self._render(template))
            self._kept[id(template)] = kept
        return kept[1]


class StructlogAuditSink:
    """The default sink. Renders nothing itself: the application's structlog processors decide the format.

    Under `ztmw serve`'s own structlog configuration (nobody else's processors to run) the events go straight
    to the stdout writer that configuration prints through, as the same JSON lines, rendered in batches:
    decided when the pipeline starts, so an app factory that configures structlog is still obeyed."""

    name = "structlog"

    def __init__(self, logger_name: str = "ztmw.audit", logger: Any = None) -> None:
        self._logger = logger if logger is not None else structlog.get_logger(logger_name)
        self._template_fields = RenderedTemplates(_fields)  # what emit_again reuses
        self._direct: JsonLinesAuditSink | None = None

    async def start(self) -> None:
        # imported here: it builds on the jsonl sink, which imports this module
        from .serve_logging import direct_audit_writer

        self._direct = direct_audit_writer()

    async def aclose(self) -> None:
        """Flush what the stdout writer holds (it is the process's, and stays open for later log lines)."""
        if self._direct is not None:
            self._direct.flush()

    def emit(self, event: AuditEvent) -> None:
        if self._direct is not None:
            self._direct.emit(event)
            return
        self._log(event, _fields(event))

    def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None:
        if self._direct is not None:
            self._direct.emit_again(template, status, duration_ms)
            return
        self._log(template, {**self._template_fields.get(template), "status": status, "duration_ms": duration_ms})

    def direct(self) -> JsonLinesAuditSink | None:
        """The writer events go to without structlog (None: through structlog), for the fanout to call."""
        return self._direct

    def _log(self, event: AuditEvent, fields: dict[str, Any]) -> None:
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
    sink = StructlogAuditSink(deps.config.audit.logger)
    deps.on_startup(sink.start)
    deps.on_cleanup(sink.aclose)
    return sink


class AuditFanout:
    """Hands each event to every configured sink; one failing sink neither stops the others nor the request."""

    def __init__(self, sinks: Sequence[AuditSink]) -> None:
        self._sinks = tuple(sinks)
        self._reusing = tuple(isinstance(sink, ReusingAuditSink) for sink in self._sinks)  # checked once
        self._only: ReusingAuditSink | None = None
        self._prepare: Callable[[AuditEvent], Callable[[int, float], None]] | None = None
        self._prepare_per_token: Callable[[AuditEvent], Callable[[str | None, int, float], None]] | None = None

    async def start(self) -> None:
        """After the sinks started: one sink that reuses templates (the default) is called without the loop,
        and the structlog sink under `ztmw serve` without its own hop (a replayed request's audit is a few
        calls shorter)."""
        self._only = None
        if len(self._sinks) == 1 and self._reusing[0]:
            only = self._sinks[0]
            direct = only.direct() if isinstance(only, StructlogAuditSink) else None
            self._only = direct if direct is not None else only  # type: ignore[assignment]
        # looked up once: a runtime Protocol check walks the class's members (microseconds, per memo entry)
        self._prepare = self._only.prepare if isinstance(self._only, PreparingAuditSink) else None
        self._prepare_per_token = (self._only.prepare_per_token if isinstance(self._only, PerTokenAuditSink)
                                   else None)

    @property
    def records_per_token(self) -> bool:
        """Whether `per_token_recorder` can answer (one sink, which prepares per shape of new decision)."""
        return self._prepare_per_token is not None

    def per_token_recorder(self, template: AuditEvent) -> Callable[[str | None, int, float], None] | None:
        """What records each new decision shaped like `template` (its token id None):
        `record(token_id, status, started)`; None when the sinks cannot (then `emit` each event)."""
        prepare = self._prepare_per_token
        if prepare is None:
            return None
        try:
            return prepare(template)
        except Exception:  # a sink that cannot prepare still gets every decision, through emit
            return None

    def emit(self, event: AuditEvent) -> None:
        only = self._only
        if only is not None:  # one sink (the default): no loop, and the stdout writer without the structlog hop
            try:
                only.emit(event)
            except Exception:
                pass
            return
        for sink in self._sinks:
            try:
                sink.emit(event)
            except Exception:
                pass

    def recorder(self, template: AuditEvent) -> Callable[[int, float], None]:
        """What records one replay of the decision in `template`: `record(status, started)` (`started`, the
        request's `time.perf_counter()`). The only sink's own prepared recorder when it has one (the default:
        a pre-rendered line noted per request), else `emit_again` with the time elapsed."""
        prepare = self._prepare
        if prepare is not None:
            try:
                return prepare(template)
            except Exception:  # a sink that cannot prepare still gets every replay, through emit_again
                pass

        def record(status: int, started: float) -> None:
            self.emit_again(template, status, elapsed_ms(started))

        return record

    def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None:
        """Sinks that can reuse the template do; the others get a full event, built once for all of them."""
        only = self._only
        if only is not None:
            try:
                only.emit_again(template, status, duration_ms)
            except Exception:
                pass
            return
        event: AuditEvent | None = None
        for sink, reusing in zip(self._sinks, self._reusing):
            try:
                if reusing:
                    sink.emit_again(template, status, duration_ms)  # type: ignore[attr-defined]
                else:
                    event = event or dataclasses.replace(template, status=status, duration_ms=duration_ms)
                    sink.emit(event)
            except Exception:
                pass
