"""The identity assertion: a short-lived JWT the gateway signs so its upstream need not trust a plain header.

An upstream behind a gateway still verifies who is calling (zero trust inside the network too): it checks the
assertion's signature against the gateway's published key (`/.well-known/ztmw/jwks.json`), its audience (the
upstream itself) and its expiry. `typ` is `ztmw-id+jwt` (RFC 8725 §3.11), so an assertion cannot pass for an
access token anywhere, nor an access token for an assertion.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from ..errors import ConfigurationError
from ..jws import b64url_encode
from ..models import Principal, TrustAssessment

ASSERTION_TYPE = "ztmw-id+jwt"
JWKS_PATH = "/.well-known/ztmw/jwks.json"
_KEY_TYPES: dict[str, type[ECKey] | type[RSAKey] | type[OKPKey]] = {"EC": ECKey, "RSA": RSAKey, "OKP": OKPKey}
_DEFAULT_ALG = {"EC": {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}, "RSA": {"": "PS256"},
                "OKP": {"Ed25519": "EdDSA"}}
_ALLOWED = frozenset({"ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS256", "EdDSA"})


@dataclass(frozen=True, slots=True)
class SigningKey:
    key: ECKey | RSAKey | OKPKey
    algorithm: str
    kid: str

    def public_jwk(self) -> dict[str, Any]:
        return {**self.key.as_dict(private=False), "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def load_signing_key(path: str) -> SigningKey:
    """A private JWK file as `ztmw token keygen` writes it; anything else stops start-up."""
    where = f"gateway.signing_key ({path})"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read: {exc.strerror}") from None
    except ValueError:
        raise ConfigurationError(f"{where}: not JSON") from None
    if not isinstance(data, dict) or data.get("kty") not in _KEY_TYPES:
        raise ConfigurationError(f"{where}: a private EC, RSA or OKP JWK is needed")
    try:
        key = _KEY_TYPES[data["kty"]].import_key(data)
    except Exception:
        raise ConfigurationError(f"{where}: not a usable JWK") from None
    if not key.is_private:
        raise ConfigurationError(f"{where}: the key has no private part")
    algorithm = data.get("alg") or _DEFAULT_ALG[data["kty"]].get(data.get("crv", ""))
    if algorithm not in _ALLOWED:
        raise ConfigurationError(f"{where}: unsupported algorithm {algorithm!r}")
    kid = data.get("kid") or key.thumbprint()[:16]
    return SigningKey(key=key, algorithm=str(algorithm), kid=str(kid))


@dataclass(frozen=True, slots=True)
class AssertionIssuer:
    """Signs one assertion per allowed request with a principal; `issuer` is the gateway's resource id."""

    key: SigningKey
    issuer: str
    audience: str
    ttl: float
    clock: Callable[[], float]

    def issue(self, principal: Principal, trust: TrustAssessment) -> str:
        now = int(self.clock())
        token = principal.token
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": principal.subject,
            "client_id": token.client_id,
            "acr": trust.acr,
            "aal": trust.aal,
            "ial": trust.ial,
            "binding": principal.binding or "bearer",
            "iat": now,
            "exp": now + int(self.ttl),
            "jti": secrets.token_urlsafe(16),
        }
        if token.auth_time is not None:
            claims["auth_time"] = int(token.auth_time)
        claims = {name: value for name, value in claims.items() if value is not None}
        header = {"alg": self.key.algorithm, "typ": ASSERTION_TYPE, "kid": self.key.kid}
        signing_input = f"{b64url_encode(_json(header))}.{b64url_encode(_json(claims))}"
        # the algorithm model signs directly: JWSRegistry's front door warns on EdDSA (RFC 9864 deprecation)
        signature = JWSRegistry.algorithms[self.key.algorithm].sign(signing_input.encode("ascii"), self.key.key)
        return f"{signing_input}.{b64url_encode(signature)}"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.public_jwk()]}


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
