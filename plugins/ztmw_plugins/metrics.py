"""Prometheus metrics from the audit stream (entry point `metrics` in `ztmw.audit_sinks`).

Enable it next to the default sink and allow its route with a rule; like every route, the scrape endpoint is
denied unless a rule allows it:

    [audit]
    sinks = ["structlog", "metrics"]

    [plugins.metrics]
    path = "/metrics"                 # default

    [plugins.network]
    allow = ["10.0.0.0/8", "127.0.0.1/32"]

    [[rules]]
    id = "metrics"
    path = "/metrics"
    methods = ["GET"]
    public = true
    conditions = ["network"]          # or, instead of public + network: scopes = ["metrics:read"]

Every sink instance owns its own `CollectorRegistry` (never prometheus_client's global one), so two protected
apps in one process keep separate counts; it is exposed as `.registry` for apps that add their own metrics.

Labels have bounded cardinality by construction: only decision, reason, rule id, status and binding, whose
values come from the configuration and from code, never from the request (no subject, client id, token id,
issuer or path). As a second fence every label accepts at most `MAX_LABEL_VALUES` distinct values beyond the
configured rule ids and the core's reason ids, and only tame ones (`[A-Za-z0-9_.:-]`); anything else is
counted as "other".

`emit` never raises and never blocks: prometheus_client updates are in-memory.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Awaitable, Callable, Iterable, Mapping

from aiohttp import web

from ztmw.config import check_plugin_settings
from ztmw.errors import DESCRIPTIONS, ConfigurationError
from ztmw.models import AuditEvent
from ztmw.typing import PluginDeps

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
except ImportError:  # pragma: no cover - the `metrics` extra is not installed
    CollectorRegistry = None  # type: ignore[assignment,misc]

DEFAULT_PATH = "/metrics"
MAX_LABEL_VALUES = 200
OTHER = "other"
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BINDINGS = frozenset({"bearer", "dpop", "mtls"})
CACHE_RESULTS = ("hit", "shared", "miss")  # in-process hit, found in the shared (Redis) cache, verified anew
KNOWN_REASONS = frozenset(DESCRIPTIONS) | {"allowed", "public", "dpop_replay", "plugin_error",
                                          "upstream_unavailable"}
_TAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")

Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


class _LabelValues:
    """The values one label may take: the known ones, plus at most `limit` tame others, then "other"."""

    def __init__(self, known: Iterable[str] = (), limit: int = MAX_LABEL_VALUES) -> None:
        self._known = frozenset(known)
        self._seen: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            return OTHER
        if value in self._known or value in self._seen:
            return value
        if not _TAME.fullmatch(value):
            return OTHER
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
        return value


def _status_label(status: object) -> str:
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return str(status)
    return OTHER


class MetricsSink:
    """An AuditSink that counts decisions, and the route that serves them in the exposition format."""

    name = "metrics"

    def __init__(self, *, path: str = DEFAULT_PATH, rule_ids: Iterable[str] = ()) -> None:
        self.path = path
        self.registry = CollectorRegistry(auto_describe=True)
        self._rule_id = _LabelValues(rule_ids)
        self._reason = _LabelValues(KNOWN_REASONS)
        self._security_reason = _LabelValues(KNOWN_REASONS)
        self.decisions = Counter(
            "ztmw_decisions_total", "Access decisions, one per request, by outcome, reason, rule and status.",
            ("decision", "reason", "rule_id", "status"), registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "ztmw_decision_seconds",
            "Time the zero-trust middleware spent on a request (AuditEvent.duration_ms; for allowed requests "
            "this includes the handler).",
            ("decision", "rule_id"), buckets=DECISION_BUCKETS, registry=self.registry,
        )
        self.token_cache = Counter(
            "ztmw_token_cache_total",
            "Token verification cache lookups by result: hit (this process), shared (shared cache), miss.",
            ("result",), registry=self.registry,
        )
        self.dpop_replays = Counter(
            "ztmw_dpop_replays_total", "DPoP proofs refused because their jti was seen before.",
            registry=self.registry,
        )
        self.security_events = Counter(
            "ztmw_security_events_total",
            "Security-relevant refusals (replay, downgrade, algorithm confusion, ...) by reason.",
            ("reason",), registry=self.registry,
        )
        self.token_binding = Counter(
            "ztmw_token_binding_total", "Requests with a verified token, by how the caller proved possession",
            ("binding",), registry=self.registry,
        )
        for result in CACHE_RESULTS:  # series exist at zero from the start, so rate() sees the first hit
            self.token_cache.labels(result=result)
        for binding in sorted(BINDINGS):
            self.token_binding.labels(binding=binding)

    # -- AuditSink -------------------------------------------------------------------------------------------

    def emit(self, event: AuditEvent) -> None:
        try:
            self._record(event, event.status, event.duration_ms)
        except Exception:  # a metrics failure must never change a decision or turn it into a 500
            pass

    def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None:
        """A `ReusingAuditSink`: a memo replay is counted from its template, no new AuditEvent needed."""
        try:
            self._record(template, status, duration_ms)
        except Exception:  # a metrics failure must never change a decision or turn it into a 500
            pass

    def _record(self, event: AuditEvent, status: int, duration: float) -> None:
        decision = event.decision if event.decision in ("allow", "deny") else OTHER
        reason = self._reason(event.reason)
        rule_id = self._rule_id(event.rule_id)
        self.decisions.labels(decision=decision, reason=reason, rule_id=rule_id,
                              status=_status_label(status)).inc()
        if isinstance(duration, (int, float)) and math.isfinite(duration) and duration >= 0:
            self.decision_seconds.labels(decision=decision, rule_id=rule_id).observe(duration / 1000.0)
        if event.cache in CACHE_RESULTS:
            self.token_cache.labels(result=event.cache).inc()
        if event.reason == "dpop_replay":
            self.dpop_replays.inc()
        if event.security:
            self.security_events.labels(reason=self._security_reason(event.reason)).inc()
        if event.verifier is not None:  # a token was verified: count how it was bound
            binding = event.binding or "bearer"
            self.token_binding.labels(binding=binding if binding in BINDINGS else OTHER).inc()

    # -- the scrape route ------------------------------------------------------------------------------------

    def web_routes(self) -> list[Route]:
        return [("GET", self.path, self._scrape)]

    async def _scrape(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})


def _path(value: Any) -> str:
    if not isinstance(value, str) or not _PATH.fullmatch(value) or "//" in value:
        raise ConfigurationError(
            f"plugins.metrics.path: {value!r} is not a plain absolute path such as \"/metrics\" "
            "(no route variables, query or fragment)"
        )
    return value


def create(settings: Mapping[str, Any], deps: PluginDeps) -> MetricsSink:
    """Entry point `metrics` in `ztmw.audit_sinks`."""
    check_plugin_settings(settings, "metrics", {"path"})
    if CollectorRegistry is None:  # pragma: no cover
        raise ConfigurationError("plugins.metrics: needs prometheus-client (pip install 'ztmw[metrics]')")
    rules = getattr(deps.config, "rules", ())
    return MetricsSink(path=_path(settings.get("path", DEFAULT_PATH)), rule_ids=(r.id for r in rules))
