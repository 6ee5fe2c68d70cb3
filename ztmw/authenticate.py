"""Credential -> Principal: the cached token check, then the per-request binding checks, then identity.

This is where "a token is not a session" is enforced: the token check may be cached, but whether *this* caller
holds the bound key (DPoP proof, client certificate) and whether the token is still unexpired is decided again
on every request. The downgrade rules of RFC 9449 §7.2 live here too, so no plugin can forget them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from ._frozen import positional_factory, quick_init
from .cache import NegativeCache, SharedVerificationCache, token_key
from .client_cert import describe_certificate
from .errors import AuthError, InvalidToken, TokenBindingMismatch, UpstreamUnavailable
from .models import Binding, Caller, Credential, Principal, RequestView, VerifiedToken
from .typing import (
    BindingVerifier,
    Clock,
    IdentityResolver,
    RevocableVerifier,
    TokenVerifier,
    TrustVersioned,
    VerificationCache,
)

CacheResult = Literal["hit", "shared", "miss"]
# built once per request decided in full: positionally, about a third of the keyword constructors' cost
_make_caller = positional_factory(Caller, ("client_id", "proof", "key_thumbprint", "certificate_thumbprint", "actor",
                                           "certificate"))
_make_principal = positional_factory(Principal, ("subject", "issuer", "token", "caller", "raw_subject", "scheme",
                                                 "linked"))

# Failures that depend on the token alone: no later event (key rotation, a recovered key server) can turn them
# into a success, so they may be remembered briefly. "unknown_key" is deliberately absent.
NEGATIVE_CACHEABLE = frozenset({
    "malformed_token", "bad_signature", "unsupported_algorithm", "wrong_token_type", "missing_claim",
    "invalid_claim", "audience_mismatch", "unknown_issuer", "unsupported_crit", "token_expired",
})


@quick_init
@dataclass(frozen=True, slots=True)
class Authentication:
    principal: Principal
    cache: CacheResult
    cache_key: bytes
    """The token's key in the verification cache (a SHA-256, never the token): the decision memo's entries
    live only as long as the cache entry they were built on."""


class Authenticator:
    def __init__(
        self,
        *,
        token_verifiers: Sequence[TokenVerifier],
        binding_verifiers: Sequence[BindingVerifier],
        cache: VerificationCache,
        negative_cache: NegativeCache | None = None,
        shared_cache: SharedVerificationCache | None = None,
        max_shared_ttl: float = 300.0,
        identity: IdentityResolver | None,
        clock: Clock,
        logger: object,
    ) -> None:
        if not token_verifiers:
            raise ValueError("at least one token verifier is needed")
        self._token_verifiers = tuple(token_verifiers)
        self._bindings = {b.cnf_member: b for b in binding_verifiers}
        self._cache = cache
        self._negative = negative_cache
        self._shared = shared_cache
        # bound once: on every cache hit the core asks the verifier whether its result still stands
        self._still_trusted_by_name = {
            v.name: v.still_trusted for v in self._token_verifiers if isinstance(v, RevocableVerifier)
        }
        self._versioned_by_name = {
            v.name: v for v in self._token_verifiers
            if isinstance(v, RevocableVerifier) and isinstance(v, TrustVersioned)
        }
        self._schemes = frozenset({"bearer"} | {b.scheme for b in self._bindings.values() if b.scheme})
        self._max_shared_ttl = max_shared_ttl
        self._identity = identity
        self._clock = clock
        self._log = logger

    @property
    def resolves_identity(self) -> bool:
        """Whether an identity chain runs after the token check (the pipeline leaves it out when nothing links)."""
        return self._identity is not None

    @property
    def schemes(self) -> frozenset[str]:
        """Authorization schemes we accept: Bearer, plus any binding that has a scheme of its own (DPoP)."""
        return self._schemes

    async def authenticate(self, credential: Credential, request: RequestView) -> Authentication:
        key = credential.digest or token_key(credential.token)
        cache: CacheResult | None = None
        try:
            verified, cache = await self._verify_token(credential.token, key)
            self._check_still_valid(verified)
            if verified.cnf or credential.scheme != "bearer":
                proof, key_thumbprint, cert_thumbprint = await self._confirm_binding(verified, credential, request)
            else:  # an unbound token as a bearer token: nothing to confirm (and no coroutine for it)
                proof = key_thumbprint = cert_thumbprint = None
            account = None
            if self._identity is not None:
                account = await self._identity.resolve(verified.issuer, verified.subject)
            subject = account or verified.subject
        except AuthError as error:
            if error.scheme is None:
                error.scheme = credential.scheme
            error.cache = cache
            raise
        except UpstreamUnavailable as error:
            error.cache = cache
            raise
        except Exception:  # a plugin bug must deny, never allow and never answer 500 (SEC-07)
            self._log.exception("ztmw.verifier_error")  # type: ignore[attr-defined]
            refusal = InvalidToken("verifier_error", scheme=credential.scheme)
            refusal.cache = cache
            raise refusal from None
        certificate = None
        if request.client_certificate is not None:
            try:
                certificate = describe_certificate(request.client_certificate.der)
                cert_thumbprint = cert_thumbprint or certificate.thumbprint
            except ValueError:  # the TLS layer handed over something that is not X.509: no caller certificate
                certificate = None
        # client_id, proof, key_thumbprint, certificate_thumbprint, actor, certificate
        caller = _make_caller(verified.client_id, proof, key_thumbprint, cert_thumbprint, verified.actor, certificate)
        # subject, issuer, token, caller, raw_subject, scheme, linked
        principal = _make_principal(subject, verified.issuer, verified, caller, verified.subject, credential.scheme,
                                    account is not None)
        return Authentication(principal, cache, key)

    async def verify(self, token: str) -> VerifiedToken:
        """A token checked exactly as one presented in Authorization is, without a binding or identity step:
        for a token that arrives another way (the account-linking ceremony's link token), whose binding the
        caller checks itself. Raises `InvalidToken` or `UpstreamUnavailable`."""
        try:
            verified, _ = await self._verify_token(token, token_key(token))
        except (InvalidToken, UpstreamUnavailable):
            raise
        except Exception:  # a plugin bug must refuse, never answer 500 (SEC-07), as in authenticate()
            self._log.exception("ztmw.verifier_error")  # type: ignore[attr-defined]
            raise InvalidToken("verifier_error") from None
        self._check_still_valid(verified)
        return verified

    async def account_of(self, issuer: str, subject: str) -> str | None:
        """The account the identity chain links a login to (None: none), as a request by it would resolve."""
        return None if self._identity is None else await self._identity.resolve(issuer, subject)

    async def _verify_token(self, token: str, key: bytes) -> tuple[VerifiedToken, CacheResult]:
        """The cacheable half: a hash and a lookup on a hit; every result is re-checked per request after."""
        cached = self._cache.get(key)
        if cached is not None and self.still_trusted(cached):
            return cached, "hit"
        if cached is not None:  # the key that verified it left the issuer's JWKS: verify again
            self._cache.discard(key)
        if self._negative is not None:
            remembered = self._negative.get(key)
            if remembered is not None:
                raise InvalidToken(remembered[0], security=remembered[1])
        if self._shared is not None:
            shared = await self._shared.get(key)
            if shared is not None:
                value, until = shared
                if self.still_trusted(value):
                    self._cache.set(key, value, until=until)
                    return value, "shared"
        errors: list[InvalidToken] = []
        for verifier in self._token_verifiers:
            try:
                verified = await verifier.verify_token(token)
            except InvalidToken as exc:
                errors.append(exc)
                continue
            self._cache.set(key, verified)
            if self._shared is not None:
                await self._shared.set(key, verified, min(self._max_shared_ttl, verified.expires_at - self._clock()))
            return verified, "miss"
        # "malformed_token" from one verifier means "not my format": report the verifier that took the token on,
        # and remember the failure only when every verifier's answer is token-intrinsic (an inactive opaque
        # token may become active; a JWT under a newly rotated key may verify after the next JWKS fetch)
        error = next((e for e in errors if e.reason != "malformed_token"), errors[0])
        if self._negative is not None and all(e.reason in NEGATIVE_CACHEABLE for e in errors):
            self._negative.set(key, error.reason, error.security)
        raise error

    def still_trusted(self, verified: VerifiedToken) -> bool:
        """Asks the verifier, when it can tell, whether what it concluded still stands (key still published)."""
        check = self.trust_check(verified)
        return True if check is None else bool(check(verified))

    def trust_check(self, verified: VerifiedToken) -> Callable[[VerifiedToken], bool] | None:
        """The verifier's own `still_trusted` for `verified` (None: it cannot tell), for a caller that asks
        again and again about one result (the decision memo) and would otherwise look it up every time."""
        return self._still_trusted_by_name.get(verified.verifier)

    def trust_source(self, verified: VerifiedToken) -> TrustVersioned | None:
        """The verifier of `verified` when it versions what it trusts (see `TrustVersioned`), else None."""
        return self._versioned_by_name.get(verified.verifier)

    def _check_still_valid(self, verified: VerifiedToken) -> None:
        now = self._clock()
        if now >= verified.expires_at + verified.leeway:
            raise InvalidToken("token_expired")
        if verified.auth_time is not None and verified.auth_time > now + verified.leeway:
            raise InvalidToken("invalid_claim")  # STEP-10: a login in the future is not a login

    async def _confirm_binding(
        self, verified: VerifiedToken, credential: Credential, request: RequestView
    ) -> tuple[Binding | None, str | None, str | None]:
        cnf = verified.cnf
        if credential.scheme == "bearer" and "jkt" in cnf:  # RFC 9449 §7.2: downgrade of a DPoP-bound token
            raise TokenBindingMismatch("dpop_bound_token_as_bearer", scheme="bearer", security=True)
        if credential.scheme == "dpop" and "jkt" not in cnf:  # DPOP-21: the scheme alone proves nothing
            raise InvalidToken("unbound_token_as_dpop", scheme="dpop")
        proof: Binding | None = None
        key_thumbprint = cert_thumbprint = None
        for member in cnf:  # MTLS-15: every confirmation member must be satisfied, unknown ones fail closed
            binding = self._bindings.get(member)
            if binding is None:
                raise InvalidToken("unsupported_binding")
            matched = await binding.confirm(verified, credential, request)
            if member == "jkt":
                proof, key_thumbprint = "dpop", matched
            elif member == "x5t#S256":
                proof, cert_thumbprint = proof or "mtls", matched
        return proof, key_thumbprint, cert_thumbprint
