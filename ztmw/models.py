"""Frozen value objects that flow one way through the pipeline.

Request -> RequestView -> Credential -> VerifiedToken -> Principal -> TrustAssessment -> Decision -> AuditEvent.
Nothing here knows aiohttp: the adapter builds a RequestView and everything after it is plain data, which is
what lets each stage be tested (and reasoned about) alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Mapping

from ._frozen import quick_init

if TYPE_CHECKING:  # pragma: no cover
    from .client_cert import CertificateInfo

Binding = Literal["dpop", "mtls"]
"""How a caller proved possession of the key a token is bound to."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def frozen_mapping(data: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view, so that claims inside a frozen value cannot be changed behind its back."""
    return MappingProxyType(dict(data)) if data else _EMPTY


@quick_init
@dataclass(frozen=True, slots=True)
class RouteRef:
    """The aiohttp route a request matched: a rule covers a pattern and methods, never a raw path."""

    method: str
    pattern: str


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The certificate the caller presented, from the TLS layer or a trusted proxy header."""

    der: bytes
    source: Literal["tls", "header"]


@quick_init
@dataclass(frozen=True, slots=True)
class RequestView:
    """What the pipeline may know about a request; built once by the adapter.

    `path` is the raw request path (no query): DPoP `htu` is rebuilt from the configured public origin and this,
    never from Host or X-Forwarded-* headers.
    """

    method: str
    path: str
    route: RouteRef | None
    match_info: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    authorization: tuple[str, ...] = ()
    dpop: tuple[str, ...] = ()
    peer: str | None = None
    client_certificate: ClientCertificate | None = None
    has_query_token: bool = False
    has_body_token: bool = False
    """An `access_token` field in a form body beside the Authorization header (read only then)."""


@quick_init
@dataclass(frozen=True, slots=True)
class Credential:
    """A token as the client presented it. `scheme` is lower-case ("bearer" or "dpop")."""

    scheme: str
    token: str
    digest: bytes = field(default=b"", compare=False)
    """SHA-256 of `token` when the extractor computed it (empty otherwise): the one hash of a token that its
    verification-cache key and a DPoP proof's `ath` share."""

    def __repr__(self) -> str:  # a token must never reach a log through a repr
        return f"Credential(scheme={self.scheme!r}, token=<redacted>)"


@quick_init
@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The result of a token check that depends on the token alone, and so may be cached.

    `token_id` is the `jti` or a short hash of the token: safe to log, never the token itself.
    `cnf` holds the confirmation members that per-request checks must satisfy (RFC 7800).
    """

    issuer: str
    subject: str
    audience: tuple[str, ...]
    expires_at: float
    token_id: str
    verifier: str
    client_id: str | None = None
    scopes: frozenset[str] = frozenset()
    issued_at: float | None = None
    not_before: float | None = None
    auth_time: float | None = None
    acr: str | None = None
    amr: tuple[str, ...] = ()
    cnf: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    actor: Mapping[str, Any] | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)
    key_id: str | None = None
    leeway: float = 0.0
    """Seconds of clock skew the issuer allows; the per-request expiry re-check uses it too."""
    key_thumbprint: str | None = None
    """RFC 7638 thumbprint of the key that verified the signature: a cached result stands only while the
    issuer still publishes that very key material (a new key under an old kid must not inherit trust)."""


@quick_init
@dataclass(frozen=True, slots=True)
class Caller:
    """Who presents the token, as opposed to whom it speaks for.

    `proof` says how the caller proved possession of a key (None for a bearer token: anyone holding it).
    """

    client_id: str | None
    proof: Binding | None = None
    key_thumbprint: str | None = None
    certificate_thumbprint: str | None = None
    actor: Mapping[str, Any] | None = None
    certificate: "CertificateInfo | None" = None
    """The certificate the caller presented (subject, SANs), even when the token is not bound to it."""


@quick_init
@dataclass(frozen=True, slots=True)
class Principal:
    """The verified identity behind a request: the subject (canonical) and the caller, kept apart."""

    subject: str
    issuer: str
    token: VerifiedToken = field(repr=False)
    caller: Caller
    raw_subject: str
    scheme: str = "bearer"
    """The Authorization scheme the token came with: policy refusals are rendered on that scheme (RFC 9470 §3)."""
    linked: bool = False
    """True when an identity resolver mapped (issuer, sub) to an account: `subject` is then an account id."""

    @property
    def scopes(self) -> frozenset[str]:
        return self.token.scopes

    @property
    def binding(self) -> Binding | None:
        return self.caller.proof


@quick_init
@dataclass(frozen=True, slots=True)
class TrustAssessment:
    """Trust on separate axes; `inputs` names what produced each level so a decision can be explained."""

    aal: int = 0
    ial: int = 0
    binding: Binding | None = None
    auth_age: float | None = None
    acr: str | None = None
    inputs: tuple[str, ...] = ()


ANONYMOUS_TRUST = TrustAssessment()


@quick_init
@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request. `reason` is a stable snake_case id used in audit and metrics."""

    allowed: bool
    reason: str
    rule_id: str | None = None
    status: int = 200
    failed_requirement: str | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event per decision. Holds no token, proof or secret by construction: only ids and hashes."""

    decision: str
    reason: str
    status: int
    method: str
    route: str | None
    rule_id: str | None = None
    subject: str | None = None
    client_id: str | None = None
    issuer: str | None = None
    token_id: str | None = None
    binding: str | None = None
    verifier: str | None = None
    cache: str | None = None
    aal: int | None = None
    ial: int | None = None
    failed_requirement: str | None = None
    trust_inputs: tuple[str, ...] | None = None
    duration_ms: float = 0.0
    security: bool = False
