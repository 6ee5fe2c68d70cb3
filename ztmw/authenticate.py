"""Credential -> Principal: the cached token check, then the per-request binding checks, then identity.

This is where "a token is not a session" is enforced: the token check may be cached, but whether *this* caller
holds the bound key (DPoP proof, client certificate) and whether the token is still unexpired is decided again
on every request. The downgrade rules of RFC 9449 §7.2 live here too, so no plugin can forget them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

from ._frozen import positional_factory, quick_init
from .cache import NegativeCache, SharedVerificationCache, token_key
from .client_cert import describe_certificate
from .errors import AuthError, InvalidToken, TokenBindingMismatch, UpstreamUnavailable
from .models import Binding, Caller, Credential, Principal, RequestView, VerifiedToken
from .typing import (
    BindingVerifier,
    Clock,
    IdentityResolver,
    ImmediateVerifier,
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


def _immediate(verifier: TokenVerifier) -> ImmediateVerifier | None:
    """`verifier` when its `verify_now` may stand in for its `verify_token`: both defined by the same class
    (a subclass or wrapper that adds a check to `verify_token` must not be skipped by a `verify_now` it
    inherits or passes through), neither replaced on the instance, and `verify_now` not a coroutine."""
    if not isinstance(verifier, ImmediateVerifier) or inspect.iscoroutinefunction(verifier.verify_now):
        return None
    own = getattr(verifier, "__dict__", {})
    if "verify_now" in own or "verify_token" in own:
        return None
    mro = type(verifier).__mro__
    defines_now = next((cls for cls in mro if "verify_now" in vars(cls)), None)
    defines_token = next((cls for cls in mro if "verify_token" in vars(cls)), None)
    return verifier if defines_now is not None and defines_now is defines_token else None


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
        self._immediate: ImmediateVerifier | None = (
            _immediate(self._token_verifiers[0]) if len(self._token_verifiers) == 1
            and shared_cache is None and identity is None else None)

    @property
    def resolves_identity(self) -> bool:
        """Whether an identity chain runs after the token check (the pipeline leaves it out when nothing links)."""
        return self._identity is not None

    @property
    def immediate(self) -> bool:
        """Whether `authenticate_now` can decide anything (else it always answers None)."""
        return self._immediate is not None

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
        except Exception as exc:
            raise self._refusal(exc, credential.scheme, cache) from None
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

    def authenticate_now(self, credential: Credential) -> Authentication | None:
        """`authenticate` for a Bearer credential (with its digest) of an unbound token, without awaiting:
        a cached result, or one verifier that can verify at once (`ImmediateVerifier`), no shared cache and no
        identity chain. None when any of that does not hold (a key still to fetch, a `cnf` to confirm): the
        caller awaits `authenticate`, which answers from the cache whatever was verified here. Raises what
        `authenticate` raises."""
        verifier = self._immediate
        if verifier is None:
            return None
        key = credential.digest
        cache: CacheResult | None = None
        try:
            verified = self._recall(key)
            if verified is not None:
                cache = "hit"
            else:
                try:
                    verified = verifier.verify_now(credential.token)
                except InvalidToken as exc:
                    raise self._refused(key, [exc]) from None
                if verified is None:
                    return None
            refusal = self._bearer_binding_refusal(verified.cnf) if verified.cnf else None
            if verified.cnf and refusal is None:
                # a binding verifier confirms it, awaiting; a new result is not cached here, so the full
                # pipeline verifies it again and records that it did
                return None
            if cache is None:
                self._cache.set(key, verified)
                cache = "miss"
            self._check_still_valid(verified)
            if refusal is not None:
                raise refusal
        except Exception as exc:
            raise self._refusal(exc, "bearer", cache) from None
        # client_id, proof, key_thumbprint, certificate_thumbprint, actor, certificate; then subject, issuer,
        # token, caller, raw_subject, scheme, linked: what authenticate builds for an unbound bearer token
        caller = _make_caller(verified.client_id, None, None, None, verified.actor, None)
        principal = _make_principal(verified.subject, verified.issuer, verified, caller, verified.subject, "bearer",
                                    False)
        return Authentication(principal, cache, key)

    def _refusal(self, exc: Exception, scheme: str, cache: CacheResult | None) -> Exception:
        """What to raise for `exc` met while authenticating: refusals carry the scheme they answer and how the
        token check was answered; anything else is a plugin bug, which denies, never allows and never answers
        500 (SEC-07)."""
        if isinstance(exc, (AuthError, UpstreamUnavailable)):
            if isinstance(exc, AuthError) and exc.scheme is None:
                exc.scheme = scheme
            exc.cache = cache
            return exc
        self._log.exception("ztmw.verifier_error")  # type: ignore[attr-defined]  # called inside the except
        refusal = InvalidToken("verifier_error", scheme=scheme)
        refusal.cache = cache
        return refusal

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
        cached = self._recall(key)
        if cached is not None:
            return cached, "hit"
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
        raise self._refused(key, errors)

    def _recall(self, key: bytes) -> VerifiedToken | None:
        """The cached result for the token under `key` while its verifier still trusts it; raises the failure
        remembered for it (the negative cache); None: it must be verified."""
        cached = self._cache.get(key)
        if cached is not None and self.still_trusted(cached):
            return cached
        if cached is not None:  # the key that verified it left the issuer's JWKS: verify again
            self._cache.discard(key)
        if self._negative is not None:
            remembered = self._negative.get(key)
            if remembered is not None:
                raise InvalidToken(remembered[0], security=remembered[1])
        return None

    def _refused(self, key: bytes, errors: list[InvalidToken]) -> InvalidToken:
        """The refusal to raise when every verifier refused the token under `key`, remembered when it may be.

        "malformed_token" from one verifier means "not my format": report the verifier that took the token on,
        and remember the failure only when every verifier's answer is token-intrinsic (an inactive opaque
        token may become active; a JWT under a newly rotated key may verify after the next JWKS fetch)."""
        error = next((e for e in errors if e.reason != "malformed_token"), errors[0])
        if self._negative is not None and all(e.reason in NEGATIVE_CACHEABLE for e in errors):
            self._negative.set(key, error.reason, error.security)
        return error

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

    def _bearer_binding_refusal(self, cnf: Mapping[str, Any]) -> AuthError | None:
        """What `_confirm_binding` refuses a Bearer credential of a token bound by `cnf` with before awaiting a
        binding verifier: the RFC 9449 §7.2 downgrade, or a first member nobody understands (MTLS-15). None:
        a binding verifier must decide."""
        if "jkt" in cnf:
            return TokenBindingMismatch("dpop_bound_token_as_bearer", scheme="bearer", security=True)
        if next(iter(cnf)) not in self._bindings:
            return InvalidToken("unsupported_binding")
        return None

    async def _confirm_binding(
        self, verified: VerifiedToken, credential: Credential, request: RequestView
    ) -> tuple[Binding | None, str | None, str | None]:
        cnf = verified.cnf
        if credential.scheme == "bearer":  # RFC 9449 §7.2: a DPoP-bound token as Bearer is a downgrade
            refusal = self._bearer_binding_refusal(cnf)
            if refusal is not None:
                raise refusal
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
