"""The `bearer` verifier: JWT access tokens (RFC 9068, RFC 8725) checked against each issuer's own JWKS.

`verify_token` depends on the token alone, so the core may cache its result; the per-request expiry re-check
and any `cnf` binding are the core's business. The order of checks is chosen so that an audit reason about
claims (expired, wrong audience) is only ever given for a token whose signature verified: cheap structure
first, then issuer, algorithm and type, then the key and signature, then the claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ztmw import claims as claims_
from ztmw.config import IssuerConfig, check_plugin_settings
from ztmw.errors import ConfigurationError, InvalidToken, UpstreamUnavailable
from ztmw.jws import (
    ALGORITHM_KEY_TYPES,
    CompactJWS,
    MalformedJWS,
    b64url_decode,
    media_type_is,
    parse_compact,
    strict_json_object,
    verify_signature,
)
from ztmw.models import VerifiedToken
from ztmw.typing import PluginDeps

from .jwks import KeySet, PublicKey

_MAX_DATE = 2**53  # a NumericDate beyond this is refused (JOSE-06), as by ztmw.jws.numeric_date
_RFC9068_REQUIRED = frozenset({"sub", "client_id", "iat", "jti"})
_IDENTITY_TYPE = "ztmw-id+jwt"
_IDENTITY_REQUIRED = frozenset({"sub", "iat", "jti"})
"""Profile "ztmw-identity": the identity assertion a ztmw gateway signs for its upstream (not an access token,
so an access token can never pass for one and one can never pass for an access token)."""


def create(settings: Mapping[str, Any], deps: PluginDeps) -> BearerVerifier:
    """Entry point `ztmw.verifiers: bearer`. No settings of its own: issuers come from the shared config."""
    check_plugin_settings(settings, "bearer")
    if not deps.config.issuers:
        raise ConfigurationError("issuers: the bearer verifier needs at least one [[issuers]] table")
    return BearerVerifier(deps)


@dataclass(frozen=True, slots=True)
class _Issuer:
    """Per-issuer settings precomputed once, so a request does set lookups only."""

    config: IssuerConfig
    keys: KeySet
    algorithms: frozenset[str]
    audiences: frozenset[str]
    strict: bool  # profile "rfc9068"
    profile: str


class BearerVerifier:
    """Verifies JWT access tokens; raises only `InvalidToken` (stable reason) or `UpstreamUnavailable`."""

    name = "bearer"

    def __init__(self, deps: PluginDeps) -> None:
        self._clock = deps.clock
        self._log = deps.logger
        self._issuers = {
            cfg.issuer: _Issuer(cfg, KeySet(cfg, deps), frozenset(cfg.algorithms), frozenset(cfg.audiences),
                                cfg.profile == "rfc9068", cfg.profile)
            for cfg in deps.config.issuers
        }
        self.trust_version = 0
        """`TrustVersioned`: moves whenever any issuer's keys change, so `still_trusted` may answer otherwise."""
        for issuer in self._issuers.values():
            issuer.keys.on_version(self._keys_changed)

    async def verify_token(self, token: str) -> VerifiedToken:
        try:
            jws, issuer, iss, alg, kid = self._preflight(token)
            # keys come only from the JWKS of the issuer the token names; jwk/jku/x5u/x5c in the header are
            # never read (AT-05, BCP-07, BCP-10); a key already loaded is taken without awaiting anything
            found = issuer.keys.ready_key(kid, alg)
            if found is None:
                found = await self._fetch_key(issuer, kid, alg)
            return self._signed(token, jws, issuer, iss, alg, found)
        except (InvalidToken, UpstreamUnavailable):
            raise
        except Exception as exc:  # no client input may become a 500; a bug here still fails closed
            raise self._unexpected(exc) from None

    def verify_now(self, token: str) -> VerifiedToken | None:
        """`ImmediateVerifier`: `verify_token` when the issuer's key is loaded already; None when it is not."""
        try:
            jws, issuer, iss, alg, kid = self._preflight(token)
            found = issuer.keys.ready_key(kid, alg)
            return None if found is None else self._signed(token, jws, issuer, iss, alg, found)
        except (InvalidToken, UpstreamUnavailable):
            raise
        except Exception as exc:  # as in verify_token
            raise self._unexpected(exc) from None

    def _signed(self, token: str, jws: CompactJWS, issuer: _Issuer, iss: str, alg: str,
                found: PublicKey) -> VerifiedToken:
        """The key's fit, the signature, then the claims."""
        if alg not in found.algorithms:  # kid names a key of another type or JWK alg (BCP-01, JWKS-04)
            raise InvalidToken("unsupported_algorithm", security=True)
        if not verify_signature(jws, found.key, alg):
            raise InvalidToken("bad_signature")
        # found.kid equals the token's kid when it names one: the JWKS's own string, shared by every cached token
        return self._claims(token, jws.claims, issuer, iss, found.kid, found.thumbprint, jws.payload)

    def _unexpected(self, exc: Exception) -> InvalidToken:
        self._log.error("bearer_unexpected_error", error=type(exc).__name__)
        return InvalidToken("malformed_token")

    def _preflight(self, token: str) -> tuple[CompactJWS, _Issuer, str, str, str | None]:
        """Structure, algorithm, issuer and type: everything before the key (cheap checks first)."""
        try:
            jws = parse_compact(token)  # JOSE-01..06, 09, 19; JWE, crit and nested JWTs refused
        except MalformedJWS as exc:
            if exc.reason == "unsupported_crit":
                raise InvalidToken("unsupported_crit") from None
            if _unsecured(token):
                raise InvalidToken("unsupported_algorithm", security=True) from None
            raise InvalidToken("malformed_token") from None
        header, claims = jws.header, jws.claims
        alg: str = header["alg"]
        if alg not in ALGORITHM_KEY_TYPES and _never_allowed(alg):  # JOSE-08, JOSE-13, AT-09: never
            raise InvalidToken("unsupported_algorithm", security=True)

        iss = claims.get("iss")
        if type(iss) is not str or not iss:
            iss = claims_.required(claims, "iss", str)
        issuer = self._issuers.get(iss)  # exact string match (JOSE-18, AT-03)
        if issuer is None:
            raise InvalidToken("unknown_issuer")
        if alg not in issuer.algorithms:  # case-sensitive allowlist (JOSE-07, JOSE-20, BCP-01)
            raise InvalidToken("unsupported_algorithm")
        typ = header.get("typ")
        if typ != "at+jwt" or issuer.profile == "ztmw-identity":
            _check_type(typ, issuer.profile)

        kid = header.get("kid")
        if kid is None:
            if "kid" in header:  # a JSON null is no absent kid (RFC 7515 §4.1.4)
                raise InvalidToken("malformed_token")
        elif not isinstance(kid, str) or not kid:
            raise InvalidToken("malformed_token")
        return jws, issuer, iss, alg, kid

    async def _fetch_key(self, issuer: _Issuer, kid: str | None, alg: str) -> PublicKey:
        try:
            return await issuer.keys.key_for(kid, alg)
        except InvalidToken:
            if kid is not None and self._known_elsewhere(kid, issuer):
                raise InvalidToken("unknown_key", security=True) from None
            raise

    def _keys_changed(self) -> None:
        self.trust_version += 1

    def still_trusted(self, verified: VerifiedToken) -> bool:
        """A cached result stands only while the key that verified it is still published (JWKS rotation)."""
        issuer = self._issuers.get(verified.issuer)
        if issuer is None:
            return False
        if verified.key_thumbprint is not None:
            return issuer.keys.publishes(verified.key_thumbprint)
        return verified.key_id is None or issuer.keys.knows(verified.key_id)

    def _known_elsewhere(self, kid: str, issuer: _Issuer) -> bool:
        """A kid of another configured issuer under this `iss`: a cross-issuer substitution (BCP-07)."""
        return any(other.keys.knows(kid) for other in self._issuers.values() if other is not issuer)

    def _claims(self, token: str, claims: Mapping[str, Any], issuer: _Issuer, iss: str,
                kid: str | None, key_thumbprint: str, payload: bytes) -> VerifiedToken:
        """The claim checks after the signature, in this order: required claims (AT-08), times (JOSE-14..16,
        AT-06), audience (JOSE-17, AT-04, BCP-09), client id, then the rest in `claims.verified_token`.

        Integer NumericDates and a string `aud` (the shape nearly every token has) are checked inline; any
        other shape goes to the generic readers of `ztmw.claims`, which answer the same reasons."""
        cfg = issuer.config
        if issuer.strict:
            if not claims.keys() >= _RFC9068_REQUIRED:  # AT-08
                raise InvalidToken("missing_claim")
        elif issuer.profile == "ztmw-identity" and not claims.keys() >= _IDENTITY_REQUIRED:
            raise InvalidToken("missing_claim")
        get = claims.get
        now, leeway = self._clock(), cfg.leeway
        exp, nbf, iat = get("exp"), get("nbf"), get("iat")
        if (type(exp) is int and -_MAX_DATE < exp < _MAX_DATE
                and (nbf is None and "nbf" not in claims or type(nbf) is int and -_MAX_DATE < nbf < _MAX_DATE)
                and (iat is None and "iat" not in claims or type(iat) is int and -_MAX_DATE < iat < _MAX_DATE)):
            # plain integers (JOSE-14), the checks of claims.check_times in its order (JOSE-15/16, AT-06)
            exp = float(exp)
            if exp <= now - leeway:
                raise InvalidToken("token_expired")
            if nbf is not None:
                nbf = float(nbf)
                if nbf > now + leeway:
                    raise InvalidToken("token_not_yet_valid")
            if iat is not None:
                iat = float(iat)
                if iat > now + leeway:
                    raise InvalidToken("token_issued_in_future")
        else:
            exp, nbf, iat = claims_.check_times(claims, now=now, leeway=leeway)
            if exp is None:
                raise InvalidToken("missing_claim")
        aud = get("aud")
        if type(aud) is str and aud:
            if aud not in issuer.audiences:  # JOSE-17, AT-04, BCP-09: exact strings only
                raise InvalidToken("audience_mismatch")
            audience: tuple[str, ...] = (aud,)
        else:
            found = claims_.audience(claims)
            if found is None:
                raise InvalidToken("missing_claim")
            if issuer.audiences.isdisjoint(found):
                raise InvalidToken("audience_mismatch")
            audience = found
        client_id = get("client_id")
        if type(client_id) is not str or not client_id:
            client_id = claims_.optional(claims, "client_id", str)
            if client_id is None and not issuer.strict:
                client_id = claims_.optional(claims, "azp", str)
        return claims_.verified_token(
            claims, token=token, verifier="bearer", issuer=cfg.issuer, audience=audience, expires_at=exp,
            not_before=nbf, issued_at=iat, client_id=client_id, leeway=leeway, key_id=kid,
            key_thumbprint=key_thumbprint, payload=payload,
        )


def _never_allowed(alg: Any) -> bool:
    """`none` and HMAC in any spelling: an access token is never unsigned or MAC'd (AT-09, JOSE-13)."""
    if not isinstance(alg, str) or alg in ALGORITHM_KEY_TYPES:  # the asymmetric names: no case conversions
        return False
    return alg.lower() == "none" or alg.upper().startswith("HS")


def _unsecured(token: str) -> bool:
    """Whether a token that failed to parse is an unsecured JWS (empty signature, alg none).

    `parse_compact` refuses the empty signature segment before anyone looks at `alg`; this second look runs
    only on that failure path, so audit can tell an attack from garbage.
    """
    if token.count(".") != 2 or not token.endswith("."):
        return False
    head = token.partition(".")[0]
    try:
        return _never_allowed(strict_json_object(b64url_decode(head)).get("alg"))
    except MalformedJWS:
        return False


def _check_type(typ: Any, profile: str) -> None:
    """AT-01/AT-13/BCP-11: rfc9068 wants at+jwt; the legacy profile also takes JWT or no typ, nothing else; a
    gateway's identity assertion is `ztmw-id+jwt` and nothing else (RFC 8725 §3.11 explicit typing)."""
    if profile == "ztmw-identity":
        if media_type_is(typ, _IDENTITY_TYPE):
            return
        raise InvalidToken("wrong_token_type")
    if typ == "at+jwt" or media_type_is(typ, "at+jwt"):
        return
    if profile == "jwt" and (typ is None or media_type_is(typ, "jwt")):
        return
    raise InvalidToken("wrong_token_type")
