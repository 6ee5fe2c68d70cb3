"""Make DPoP proofs in tests (RFC 9449 §4.2), for ztmw's own suite and for applications built on it.

Deliberately independent of ztmw's verifier code: keys, JWKs, thumbprints and signatures are built here with
`cryptography` and the standard library only, so a test of the verifier is never a test against itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any, Literal, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KeyKind = Literal["ES256", "EdDSA", "PS256"]


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()
"""Use as a value in `extra_claims` or `header_overrides` to drop that member from the proof."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64(value: int, length: int | None = None) -> str:
    length = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(length, "big"))


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint: required members only, sorted, no whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x"),
                "oct": ("k", "kty")}[jwk["kty"]]
    return b64url(hashlib.sha256(_compact_json({name: jwk[name] for name in required})).digest())


def access_token_hash(access_token: str) -> str:
    """The `ath` claim: base64url(SHA-256(ASCII(access_token)))."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


class DPoPKey:
    """A client's DPoP key pair. `DPoPKey()` is an EC P-256 key (ES256); also "EdDSA" and "PS256"."""

    def __init__(self, kind: KeyKind = "ES256", *, rsa_bits: int = 2048) -> None:
        self.alg: str = kind
        self._private: Any
        if kind == "ES256":
            self._private = ec.generate_private_key(ec.SECP256R1())
        elif kind == "EdDSA":
            self._private = ed25519.Ed25519PrivateKey.generate()
        elif kind == "PS256":
            self._private = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        else:
            raise ValueError(f"unsupported key kind {kind!r}")

    def __repr__(self) -> str:
        return f"DPoPKey({self.alg!r}, thumbprint={self.thumbprint!r})"

    @property
    def jwk(self) -> dict[str, str]:
        """The public JWK, canonical (fixed-length EC coordinates, minimal RSA integers)."""
        if isinstance(self._private, ec.EllipticCurvePrivateKey):
            numbers = self._private.public_key().public_numbers()
            return {"kty": "EC", "crv": "P-256", "x": _int_b64(numbers.x, 32), "y": _int_b64(numbers.y, 32)}
        if isinstance(self._private, ed25519.Ed25519PrivateKey):
            raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        numbers = self._private.public_key().public_numbers()
        return {"kty": "RSA", "n": _int_b64(numbers.n), "e": _int_b64(numbers.e)}

    @property
    def private_jwk(self) -> dict[str, str]:
        """The JWK with its private members, for testing that a verifier refuses one in a proof header."""
        jwk = self.jwk
        if isinstance(self._private, ec.EllipticCurvePrivateKey):
            jwk["d"] = _int_b64(self._private.private_numbers().private_value, 32)
        elif isinstance(self._private, ed25519.Ed25519PrivateKey):
            jwk["d"] = b64url(self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        else:
            n = self._private.private_numbers()
            jwk.update(d=_int_b64(n.d), p=_int_b64(n.p), q=_int_b64(n.q), dp=_int_b64(n.dmp1),
                       dq=_int_b64(n.dmq1), qi=_int_b64(n.iqmp))
        return jwk

    @property
    def thumbprint(self) -> str:
        """The RFC 7638 thumbprint: what an authorization server puts in `cnf.jkt`."""
        return jwk_thumbprint(self.jwk)

    def sign(self, signing_input: bytes) -> bytes:
        """A JWS signature with this key's algorithm (raw R||S for ECDSA, RFC 7518 §3.4)."""
        if isinstance(self._private, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self._private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if isinstance(self._private, ed25519.Ed25519PrivateKey):
            return self._private.sign(signing_input)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size)
        return bytes(self._private.sign(signing_input, pss, hashes.SHA256()))

    def sign_compact(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        """Any header and claims, signed as given: for proofs no well-behaved client would send."""
        signing_input = f"{b64url(_compact_json(header))}.{b64url(_compact_json(claims))}"
        return f"{signing_input}.{b64url(self.sign(signing_input.encode('ascii')))}"

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: float | None = None,
        jti: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        header_overrides: Mapping[str, Any] | None = None,
    ) -> str:
        """A DPoP proof for `method url`; `ath` is added when `access_token` is given (a resource needs it).

        `url` goes into `htu` as given, so pass it without query and fragment. Values in `extra_claims` and
        `header_overrides` replace or add members; the value `OMIT` removes one.
        """
        header: dict[str, Any] = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.jwk}
        claims: dict[str, Any] = {
            "jti": jti if jti is not None else secrets.token_urlsafe(16),
            "htm": method,
            "htu": url,
            "iat": int(time.time()) if iat is None else iat,
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        for target, changes in ((header, header_overrides), (claims, extra_claims)):
            for name, value in (changes or {}).items():
                if value is OMIT:
                    target.pop(name, None)
                else:
                    target[name] = value
        return self.sign_compact(header, claims)
