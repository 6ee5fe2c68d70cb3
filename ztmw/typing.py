"""Every contract between ztmw and its plugins, as `typing.Protocol`s.

Implementations never inherit from these; they only have the right shape (as in structlog). Plugins are
resolved from entry points by name; the object an entry point names is a `PluginFactory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping, Protocol, runtime_checkable

from .models import AuditEvent, Credential, Principal, RequestView, TrustAssessment, VerifiedToken

if TYPE_CHECKING:  # pragma: no cover
    import aiohttp

    from .config import Config

Clock = Callable[[], float]
"""Seconds since the epoch. Injected everywhere time matters, so tests can move it."""


@runtime_checkable
class TokenVerifier(Protocol):
    """Checks what depends on the token alone (signature, iss, aud, exp, claims).

    The result is cached by the core keyed by a hash of the token, so `verify_token` must be pure in the token:
    no request data, no per-request state. Raise `InvalidToken` to refuse, `UpstreamUnavailable` when a key
    server cannot be reached.
    """

    name: str

    async def verify_token(self, token: str) -> VerifiedToken: ...


@runtime_checkable
class BindingVerifier(Protocol):
    """Checks, on every request and never cached, that the caller holds the key a token is bound to.

    `cnf_member` is the RFC 7800 confirmation member it understands (`jkt`, `x5t#S256`); `scheme` is the
    Authorization scheme that carries tokens of this binding, if it has its own (`dpop`).
    `confirm` returns the thumbprint it matched, or raises an `AuthError`.
    """

    name: str
    cnf_member: str
    scheme: str | None
    # a binding with its own scheme (DPoP) also has `algorithms`: the proof algorithms for challenges and
    # RFC 9728 metadata

    async def confirm(self, verified: VerifiedToken, credential: Credential, request: RequestView) -> str: ...


@runtime_checkable
class RevocableVerifier(Protocol):
    """Optional on a token verifier: says whether a cached result still stands (its key is still published).

    Called on every cache hit, so it must be a cheap, synchronous lookup; False makes the core verify again.
    """

    def still_trusted(self, verified: VerifiedToken) -> bool: ...


@runtime_checkable
class ImmediateVerifier(Protocol):
    """Optional on a token verifier: `verify_token` without awaiting, for the common case that needs no I/O.

    Returns what `verify_token` would (or raises what it would), or None when it would have to await (a key
    not fetched yet): the core then awaits `verify_token`. Lets a plain bearer request be decided without a
    coroutine per stage (`Pipeline.decide_plain`)."""

    def verify_now(self, token: str) -> VerifiedToken | None: ...


@runtime_checkable
class ResponseDecorator(Protocol):
    """Optional on a plugin: adds headers to allowed responses (for example a fresh DPoP nonce)."""

    def response_headers(self, request: RequestView, allowed: bool) -> Mapping[str, str]: ...


@runtime_checkable
class RouteProvider(Protocol):
    """Optional on a plugin: routes it serves (a metrics endpoint). They are still denied unless a rule allows.

    Returns (method, path, handler) triples, the handler an aiohttp handler.
    """

    def web_routes(self) -> Iterable[tuple[str, str, Callable[..., Awaitable[Any]]]]: ...


class ReplayStore(Protocol):
    """Remembers single-use values (DPoP `jti`) across replicas. Returns False when the key was seen already."""

    async def first_seen(self, key: str, ttl: float) -> bool: ...


class VerificationCache(Protocol):
    """Level 1 of the verification cache: keys are SHA-256 digests of tokens, never tokens."""

    def get(self, key: bytes) -> VerifiedToken | None: ...

    def set(self, key: bytes, value: VerifiedToken, until: float | None = None) -> None:
        """Keep `value` until its `expires_at`, the cache's `max_ttl`, and `until` (when given), whichever
        comes first."""

    def discard(self, key: bytes) -> None: ...


class IdentityResolver(Protocol):
    """Maps an (issuer, subject) pair to one canonical account id, or None when no link applies.

    Raise `ztmw.UnknownSubject` for a pair that does not exist here (RFC 8725 §3.8: 401 `invalid_token`);
    any other exception means "cannot tell" and answers 503, never allow.
    """

    async def resolve(self, issuer: str, subject: str) -> str | None: ...


class TrustEvaluator(Protocol):
    """One link of the trust chain (`[trust] evaluators`, run in order): refines the assessment so far.

    Return `current` unchanged when there is nothing to add; use `dataclasses.replace` to raise or lower an
    axis and append to `inputs` what justified it, so the decision stays explainable.
    """

    def evaluate(
        self, principal: Principal | None, request: RequestView, current: TrustAssessment
    ) -> TrustAssessment: ...


class Condition(Protocol):
    """A named policy predicate (`conditions = [...]` in a rule): False denies with 403."""

    def check(self, principal: Principal | None, trust: TrustAssessment, request: RequestView) -> bool: ...


class AuditSink(Protocol):
    """Receives one event per decision. Must not block and must not raise."""

    def emit(self, event: AuditEvent) -> None: ...


@runtime_checkable
class TrustVersioned(Protocol):
    """Optional beside `RevocableVerifier.still_trusted`: a number that moves whenever any answer of
    `still_trusted` may change (the keys it trusts were fetched anew and differ). A caller that asks again and
    again about one result (the decision memo, on every replay) compares the number and asks only when it moved.
    """

    trust_version: int


@runtime_checkable
class ReusingAuditSink(AuditSink, Protocol):
    """Optional: a sink that can record "the decision in `template` again, for another request" without a new
    AuditEvent (the decision memo's replays), e.g. by reusing what it rendered for the template."""

    def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None: ...


@runtime_checkable
class PreparingAuditSink(ReusingAuditSink, Protocol):
    """Optional: a sink that prepares, once per remembered decision, what records each of its replays.

    `prepare(template)` returns `record(status, started)`, called after each replayed request with its status
    and the `time.perf_counter()` value it started at; it must never raise (count a failure instead). The
    default sinks use it to note a pre-rendered line per request and nothing more."""

    def prepare(self, template: AuditEvent) -> Callable[[int, float], None]: ...


@runtime_checkable
class PerTokenAuditSink(PreparingAuditSink, Protocol):
    """Optional: a sink that prepares, once per shape of new decision (every field but the token id, status and
    duration), what records each of them, so a new token's decision costs no AuditEvent and no rendering of
    what it shares with the last decision of the same shape.

    `prepare_per_token(template)` (`template.token_id` is None) returns `record(token_id, status, started)`,
    with `prepare`'s contract otherwise: called after the request with its status and `time.perf_counter()`
    start, never raising."""

    def prepare_per_token(self, template: AuditEvent) -> Callable[[str | None, int, float], None]: ...


@dataclass(frozen=True, slots=True)
class PluginDeps:
    """What a plugin factory is handed, so plugins never reach into globals.

    `http` returns the shared aiohttp ClientSession (owned by the app's cleanup_ctx); `on_startup` and
    `on_cleanup` let a plugin register its own lifetime hooks; `peers` gives access to other enabled plugins
    by name (the DPoP plugin reuses the bearer verifier's token check through the core instead).
    """

    config: "Config"
    clock: Clock
    http: Callable[[], "aiohttp.ClientSession"]
    logger: Any
    on_startup: Callable[[Callable[[], Awaitable[None]]], None] = field(default=lambda fn: None)
    on_cleanup: Callable[[Callable[[], Awaitable[None]]], None] = field(default=lambda fn: None)


class PluginFactory(Protocol):
    """What an entry point resolves to: called once at start-up with the plugin's own config section."""

    def __call__(self, settings: Mapping[str, Any], deps: PluginDeps) -> object: ...
