"""The one place that knows the order: route rule -> credential -> principal -> trust -> decision -> audit.

`Pipeline.evaluate` never raises for anything a client sends: every refusal comes back as an `Outcome` with the
error to render, so the adapter cannot accidentally turn a bad token into a 500 or an allow.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Hashable, cast

import aiohttp
import structlog

from ._frozen import positional_factory, quick_init
from .audit import AuditFanout, elapsed_ms, subject_for_audit
from .authenticate import Authentication, Authenticator, CacheResult
from .cache import MemoryVerificationCache, NegativeCache, SharedVerificationCache
from .challenge import ChallengeRenderer, ErrorResponse
from .config import RESERVED_RULE_PREFIX, Config, Rule
from .errors import AccessDenied, AuthError, ConfigurationError, UpstreamUnavailable
from .extract import extract_credential
from .identity import IdentityChain
from .memo import DecisionMemo, MemoEntry, MemoKey, plugins_are_memo_safe
from .metadata import resource_metadata
from .models import ANONYMOUS_TRUST, AuditEvent, Credential, Decision, Principal, RequestView, TrustAssessment
from .policy import RulePolicy
from .registry import LoadedPlugin, load_plugin
from .trust import TrustChain
from .typing import (
    AuditSink,
    BindingVerifier,
    Clock,
    PluginDeps,
    ResponseDecorator,
    TokenVerifier,
)

if TYPE_CHECKING:  # pragma: no cover - only the adapter makes them
    from .models import RouteRef

METADATA_RULE_ID = RESERVED_RULE_PREFIX + "metadata"
# 0.3 µs instead of 1 µs, once per decided request
_make_audit_event = positional_factory(AuditEvent, (
    "decision", "reason", "status", "method", "route", "rule_id", "subject", "client_id", "issuer", "token_id",
    "binding", "verifier", "cache", "aal", "ial", "failed_requirement", "trust_inputs", "duration_ms", "security"))
LINKING_RULE_ID = RESERVED_RULE_PREFIX + "linking"
_SHAPES_MAX = 4096  # shapes of new decisions whose recorders are kept (users x routes x clients in use)


@quick_init
@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    principal: Principal | None = None
    trust: TrustAssessment = ANONYMOUS_TRUST
    error: AuthError | UpstreamUnavailable | None = None
    cache: CacheResult | None = None
    cache_key: bytes | None = None


class Pipeline:
    """Everything one protected app needs, built from a `Config`. Lifetime: `start()` then `close()`."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = time.time,
        audit_sink: AuditSink | None = None,
        logger: Any = None,
    ) -> None:
        self.config = config
        self._audit_subject = config.audit.subject  # read once: every audit event asks
        self._shapes: dict[tuple[Hashable, ...], Callable[[str | None, int, float], None]] = {}
        self.clock = clock
        self.log = logger if logger is not None else structlog.get_logger("ztmw")
        self._startup: list[Callable[[], Awaitable[None]]] = []
        self._cleanup: list[Callable[[], Awaitable[None]]] = []
        self._session: aiohttp.ClientSession | None = None
        deps = PluginDeps(
            config=config,
            clock=clock,
            http=self._http,
            logger=self.log,
            on_startup=self._startup.append,
            on_cleanup=self._cleanup.append,
        )

        def load(group: str, names: tuple[str, ...]) -> list[LoadedPlugin]:
            return [load_plugin(group, name, config.plugins.get(name, {}), deps) for name in names]

        verifiers = load("ztmw.verifiers", config.verifiers)
        evaluators = load("ztmw.trust_evaluators", config.trust.evaluators)
        resolvers = load("ztmw.identity_resolvers", config.identity_resolvers)
        conditions = load("ztmw.conditions", tuple(dict.fromkeys(c for r in config.rules for c in r.conditions)))
        sinks = load("ztmw.audit_sinks", config.audit.sinks) if config.audit.enabled and audit_sink is None else []
        self.plugins: tuple[LoadedPlugin, ...] = (*verifiers, *evaluators, *resolvers, *conditions, *sinks)
        token_verifiers = [p.instance for p in verifiers if isinstance(p.instance, TokenVerifier)]
        bindings = [p.instance for p in verifiers if isinstance(p.instance, BindingVerifier)]
        if not token_verifiers:
            raise ConfigurationError("verifiers.enabled: no enabled plugin verifies tokens (add 'bearer')")
        self.cache = MemoryVerificationCache(
            max_entries=config.cache.max_entries, max_ttl=config.cache.max_ttl, clock=clock
        )
        self.shared_cache = self._shared_cache(config, clock)
        self.negative_cache = (
            NegativeCache(ttl=config.cache.negative_ttl, clock=clock) if config.cache.negative_ttl > 0 else None
        )
        if self.shared_cache is not None:
            self._cleanup.append(self.shared_cache.close)
        self.authenticator = Authenticator(
            token_verifiers=token_verifiers,
            binding_verifiers=bindings,
            cache=self.cache,
            negative_cache=self.negative_cache,
            shared_cache=self.shared_cache,
            max_shared_ttl=config.cache.max_ttl,
            identity=self._identity_chain(resolvers),
            clock=clock,
            logger=self.log,
        )
        rules = list(config.rules)
        if config.metadata_enabled:
            rules.insert(0, Rule(id=METADATA_RULE_ID, path=config.metadata_path, methods=frozenset({"GET"}),
                                 public=True))
        if config.linking.enabled:  # the ceremony's route: any verified login; the handler asks for more
            rules.insert(0, Rule(id=LINKING_RULE_ID, path=config.linking.path,
                                 methods=frozenset({"GET", "POST", "DELETE"})))
        self.policy = RulePolicy(rules, acr_levels=config.trust.acr,
                                 conditions={p.name: p.instance for p in conditions},
                                 owner_requires_link=config.owner_requires_link, logger=self.log)
        self.trust = TrustChain([(p.name, p.instance) for p in evaluators], self.log)
        # always a fanout, also around a sink handed in: it shields requests from a raising sink, and gives
        # every sink emit_again (a full event for those that cannot reuse a template)
        self.audit_sink: AuditFanout | None = None
        if config.audit.enabled:
            self.audit_sink = AuditFanout([audit_sink] if audit_sink is not None else [p.instance for p in sinks])
        dpop = next((b for b in bindings if b.scheme == "dpop"), None)
        self.dpop_algs: tuple[str, ...] | None = None
        if dpop is not None:
            self.dpop_algs = tuple(getattr(dpop, "algorithms", ())) or None
        self.mtls_enabled = any(b.cnf_member == "x5t#S256" for b in bindings)
        self.renderer = ChallengeRenderer(
            realm=config.resource.realm,
            dpop_algs=self.dpop_algs,
            resource_metadata=config.metadata_url if config.metadata_enabled else None,
        )
        self._decorators = [p.instance for p in verifiers if isinstance(p.instance, ResponseDecorator)]
        self.route_refs: dict[Hashable, RouteRef] = {}
        """The adapter's `RouteRef` per (route, method), made once per pair: kept here, so they go with the app."""
        self.varies_on_certificate_header = self.mtls_enabled and config.mtls.source == "header"
        """RFC 9440 §2.4: responses may depend on a forwarded certificate header, so they name it in `Vary`."""
        self.decorates_responses = bool(self._decorators) or self.varies_on_certificate_header
        """Whether an allowed response gets headers of ztmw's own (a plugin's, a `Vary`): else it is left as is."""
        self.memo: DecisionMemo | None = None
        if config.cache.memo_entries > 0 and not self.mtls_enabled and plugins_are_memo_safe(
            [p.instance for p in evaluators] + self._decorators
            + ([p.instance for p in resolvers] if self.authenticator.resolves_identity else [])
        ):
            self.memo = DecisionMemo(rules=rules, max_entries=config.cache.memo_entries, cache=self.cache,
                                     trust_check=self.authenticator.trust_check,
                                     trust_source=self.authenticator.trust_source, clock=clock)

    def _identity_chain(self, resolvers: list[LoadedPlugin]) -> IdentityChain | None:
        """None when nothing could ever link (only the config resolver, and no links): saves an await a request.
        (Configuration refuses `require_known_subject` there: it would refuse every token.)"""
        if all(p.name == "config" for p in resolvers) and not self.config.identity_links:
            return None
        return IdentityChain([(p.name, p.instance) for p in resolvers], self.log,
                             require_known_subject=self.config.require_known_subject)

    def _shared_cache(self, config: Config, clock: Clock) -> SharedVerificationCache | None:
        if config.cache.backend == "memory":
            return None
        secret = os.environ.get(config.cache.secret_env, "")
        if len(secret) < 16:
            raise ConfigurationError(
                f"cache.backend: a shared cache needs a secret of at least 16 characters in the environment "
                f"variable {config.cache.secret_env} (entries are MACed so Redis cannot vouch for tokens)")
        return SharedVerificationCache(config.cache.backend, secret.encode("utf-8"), clock=clock, logger=self.log)

    # -- lifetime ------------------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the pipeline has not been started")
        return self._session

    async def start(self) -> None:
        """Open the HTTP session and run the plugins' start-up hooks; on any failure, undo what was started."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for plugin in self.plugins:
            self.log.info("ztmw.plugin_loaded", plugin=plugin.name, group=plugin.group,
                          distribution=plugin.distribution, version=plugin.version)
        try:
            for hook in self._startup:
                await hook()
            if self.audit_sink is not None:  # after the sinks' own start-up hooks
                await self.audit_sink.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Run every cleanup hook even when one fails (their errors are raised together), then close HTTP."""
        errors: list[Exception] = []
        for hook in reversed(self._cleanup):
            try:
                await hook()
            except Exception as exc:
                errors.append(exc)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if errors:
            raise ExceptionGroup("ztmw cleanup hooks failed", errors)

    # -- per request ---------------------------------------------------------------------------------------

    def metadata_document(self) -> dict[str, Any]:
        return resource_metadata(self.config, dpop_algs=self.dpop_algs, mtls=self.mtls_enabled)

    async def evaluate(self, request: RequestView) -> Outcome:
        """All stages in order; a route no rule covers is denied before credentials are looked at."""
        rule = self.rule_for(request)
        if rule is None:
            return _no_rule()
        try:
            # self.authenticate without its coroutine: one less for every request decided in full
            credential = self._credential(request)
            authentication = None
            if credential is not None:
                authentication = await self.authenticator.authenticate(credential, request)
        except (AuthError, UpstreamUnavailable) as error:
            return _refused(rule, error)
        return self._judged(rule, request, authentication)

    def decide_plain(self, request: RequestView, credential: Credential) -> Outcome | None:
        """`evaluate` for a request whose only credential is `credential`, a Bearer token (`extract.plain_bearer`),
        without awaiting anything; None when it cannot be decided so (`Authenticator.authenticate_now`): then
        `evaluate` decides it. The same stages and the same answers, without a coroutine for each."""
        rule = self.rule_for(request)
        if rule is None:
            return _no_rule()
        try:
            authentication = self.authenticator.authenticate_now(credential)
        except (AuthError, UpstreamUnavailable) as error:
            return _refused(rule, error)
        return None if authentication is None else self._judged(rule, request, authentication)

    def _judged(self, rule: Rule, request: RequestView, authentication: Authentication | None) -> Outcome:
        """Trust, then the rule, for whoever authenticated (None: nobody)."""
        principal = cache = cache_key = None
        if authentication is not None:
            principal, cache, cache_key = authentication.principal, authentication.cache, authentication.cache_key
        trust = ANONYMOUS_TRUST
        try:
            trust = self.trust.evaluate(principal, request)
            decision = self.policy.decide(rule, principal, trust, request)
            return Outcome(decision, principal, trust, None, cache, cache_key)
        except (AuthError, UpstreamUnavailable) as error:
            return _refused(rule, error, principal, trust, cache)

    def rule_for(self, request: RequestView) -> Rule | None:
        return self.policy.rule_for(request.route) if request.route is not None else None

    async def authenticate(self, request: RequestView) -> Authentication | None:
        """The authentication stage alone: None without credentials; raises for bad ones."""
        credential = self._credential(request)
        if credential is None:
            return None
        return await self.authenticator.authenticate(credential, request)

    def _credential(self, request: RequestView) -> Credential | None:
        return extract_credential(request, schemes=self.authenticator.schemes,
                                  max_bytes=self.config.limits.max_credential_bytes)

    def authorize(self, request: RequestView, principal: Principal | None, trust: TrustAssessment) -> Decision:
        """The authorization stage alone: raises AccessDenied for a route no rule covers."""
        rule = self.rule_for(request)
        if rule is None:
            raise AccessDenied("no_rule")
        return self.policy.decide(rule, principal, trust, request)

    def render(self, error: AuthError | UpstreamUnavailable) -> ErrorResponse:
        if isinstance(error, UpstreamUnavailable):
            return ErrorResponse(503, ())
        return self.renderer.render(error)

    def response_headers(self, request: RequestView, allowed: bool) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not self._decorators:
            return headers
        for decorator in self._decorators:
            headers.update(decorator.response_headers(request, allowed))
        return headers

    def audit(self, request: RequestView, outcome: Outcome, status: int, started: float) -> None:
        sink = self.audit_sink
        if sink is None:
            return
        principal = outcome.principal
        # a decision that let a principal in is recorded through what the sink prepared for its shape (every
        # field but the token id), when it can: no AuditEvent, and its line is the shape's with the id put in.
        # Not for a token with auth_time: its trust inputs name its age, a new shape every second.
        if principal is not None and outcome.error is None and sink.records_per_token:
            token = principal.token
            if token.auth_time is None:
                decision, trust, route = outcome.decision, outcome.trust, request.route
                shape = (decision.allowed, decision.reason, decision.rule_id, decision.failed_requirement,
                         request.method, route.pattern if route else None, principal.subject, token.client_id,
                         token.issuer, token.verifier, principal.binding, outcome.cache, trust.aal, trust.ial,
                         trust.inputs)
                try:
                    record = self._shapes.get(shape) or self._new_shape(shape, request, outcome)
                except TypeError:  # an unhashable value from a third party's verifier or evaluator
                    record = None
                if record is not None:
                    try:
                        record(token.token_id, status, started)
                    except Exception:  # a third party's recorder that raises: never a 500 (SEC-07)
                        pass
                    return
        sink.emit(self.audit_event(request, outcome, status, elapsed_ms(started)))

    def _new_shape(self, shape: tuple[Hashable, ...], request: RequestView,
                   outcome: Outcome) -> Callable[[str | None, int, float], None] | None:
        """What records the decisions of `shape` (bounded: emptied when full, as the sink's own tables)."""
        assert self.audit_sink is not None
        template = dataclasses.replace(self.audit_event(request, outcome, 0, 0.0), token_id=None)
        record = self.audit_sink.per_token_recorder(template)
        if record is not None:
            if len(self._shapes) >= _SHAPES_MAX:
                self._shapes.clear()
            self._shapes[shape] = record
        return record

    def audit_event(self, request: RequestView, outcome: Outcome, status: int, duration_ms: float) -> AuditEvent:
        decision, principal, route = outcome.decision, outcome.principal, request.route
        error = outcome.error
        security = error is not None and bool(getattr(error, "security", False))
        if principal is None:  # every field, in AuditEvent's order (one per decided request)
            return _make_audit_event(
                "allow" if decision.allowed else "deny", decision.reason, status, request.method,
                route.pattern if route else None, decision.rule_id,
                None, None, None, None, None, None,  # subject, client_id, issuer, token_id, binding, verifier
                outcome.cache, None, None, decision.failed_requirement, None, duration_ms, security,
            )
        token, trust = principal.token, outcome.trust
        return _make_audit_event(
            "allow" if decision.allowed else "deny",  # decision
            decision.reason,  # reason
            status,  # status
            request.method,  # method
            route.pattern if route else None,  # route
            decision.rule_id,  # rule_id
            subject_for_audit(principal.subject, self._audit_subject),  # subject
            token.client_id,  # client_id
            token.issuer,  # issuer
            token.token_id,  # token_id
            principal.binding,  # binding
            token.verifier,  # verifier
            outcome.cache,  # cache
            trust.aal,  # aal
            trust.ial,  # ial
            decision.failed_requirement,  # failed_requirement
            trust.inputs or None,  # trust_inputs
            duration_ms,  # duration_ms
            security,  # security
        )

    def replayed(self, entry: MemoEntry) -> Outcome | None:
        """The outcome a memo entry replays now; None when the full pipeline must decide. For a token with
        `auth_time` trust and the rule are evaluated again (its age moved): any change or refusal (a step-up
        once `max_auth_age` has passed) goes to the full pipeline, which answers it properly."""
        outcome = entry.outcome
        if not entry.ages:
            return outcome
        rule = self.rule_for(entry.view)
        if rule is None:
            return None
        try:
            trust = self.trust.evaluate(outcome.principal, entry.view)
            decision = self.policy.decide(rule, outcome.principal, trust, entry.view)
        except (AuthError, UpstreamUnavailable):
            return None
        if decision != outcome.decision:
            return None
        return Outcome(decision, outcome.principal, trust, None, outcome.cache, outcome.cache_key)

    def remember(self, key: MemoKey, request: RequestView, outcome: Outcome) -> None:
        """Offer an outcome to the decision memo, with the audit template its replays will be recorded from."""
        if self.memo is not None and self.memo.accepts(outcome):  # the template only for what is kept
            record = None
            if self.audit_sink is not None:
                record = self.audit_sink.recorder(self.audit_event(request, outcome, 0, 0.0))
            self.memo.remember(key, request, outcome, record)


def _no_rule() -> Outcome:
    """A route no rule covers: 403 whatever the request carries (a new error each time: errors are mutable)."""
    error = AccessDenied("no_rule")
    return Outcome(Decision(False, error.reason, None, 403), error=error)


def _refused(rule: Rule, error: AuthError | UpstreamUnavailable, principal: Principal | None = None,
             trust: TrustAssessment = ANONYMOUS_TRUST, cache: CacheResult | None = None) -> Outcome:
    """The outcome of a refusal under `rule`, with what was known when it came."""
    decision = Decision(False, error.reason, rule.id, error.status, _requirement(error))
    return Outcome(decision, principal, trust, error, cache or cast("CacheResult | None", error.cache))


def _requirement(error: AuthError | UpstreamUnavailable) -> str | None:
    """Which rule requirement a denial is about, for the audit trail."""
    if isinstance(error, AuthError) and error.params:
        return " ".join(f"{k}={v}" for k, v in sorted(error.params.items()))
    return None
