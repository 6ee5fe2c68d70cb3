"""Strict compact-JWS parsing and signature checks shared by the token and proof verifiers.

joserfc does the cryptography (its algorithm models and key classes); this module adds the input checks that
general-purpose decoders leave lenient and that RFC 8725 and the spec checklist (§2) require: exact base64url
alphabet and canonical form, strict UTF-8 JSON without duplicates or NaN, algorithm bound to key type, minimum
key sizes and canonical JWK encodings (so a key has one thumbprint).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# Which JWK key type (and curve) each JWS algorithm may use: one key, one algorithm family (RFC 8725 §3.1).
ALGORITHM_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "EdDSA": ("OKP", "Ed25519"), "Ed25519": ("OKP", "Ed25519"),
}
_EC_SIZES = {"P-256": 32, "P-384": 48, "P-521": 66}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192


class MalformedJWS(ValueError):
    """The input is not a well-formed compact JWS; `reason` is a stable id for audit."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CompactJWS:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded base64url, refusing padding, other alphabets and non-canonical trailing bits.

    Python's decoder drops unknown characters and accepts `+ / =`, so the alphabet is checked first; the
    re-encode comparison makes sure one byte string has exactly one accepted spelling (RFC 4648 §3.5).
    """
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise MalformedJWS("bad_base64url")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise MalformedJWS("bad_base64url") from None
    if b64url_encode(data) != segment:
        raise MalformedJWS("non_canonical_base64url")
    return data


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedJWS("duplicate_member")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise MalformedJWS("non_finite_number")


def strict_json_object(data: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON into a dict: no BOM, no UTF-16/32 guessing, no duplicates, no NaN/Infinity."""
    try:
        text = data.decode("utf-8")  # strict: lone surrogates and invalid bytes raise
        if text.startswith("\ufeff"):
            raise MalformedJWS("bad_json")
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
        # a "\ud800" escape decodes to a lone surrogate: refuse it now, not later when something re-encodes
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except MalformedJWS:
        raise
    except (UnicodeError, ValueError, RecursionError):
        raise MalformedJWS("bad_json") from None
    if not isinstance(value, dict):
        raise MalformedJWS("not_an_object")
    return value


def parse_compact(token: str, *, max_bytes: int = 16384) -> CompactJWS:
    """Split and decode a compact JWS without verifying it. Five segments (JWE) and nested JWTs are refused."""
    if len(token) > max_bytes:
        raise MalformedJWS("too_large")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedJWS("not_a_jws")
    header_b64, payload_b64, signature_b64 = parts
    if not header_b64 or not payload_b64 or not signature_b64:
        raise MalformedJWS("not_a_jws")
    header = strict_json_object(b64url_decode(header_b64))
    claims = strict_json_object(b64url_decode(payload_b64))
    signature = b64url_decode(signature_b64)
    if not isinstance(header.get("alg"), str):
        raise MalformedJWS("missing_alg")
    if "crit" in header:  # no extensions are supported, so any crit is not understood (RFC 7515 §4.1.11)
        raise MalformedJWS("unsupported_crit")
    if isinstance(header.get("cty"), str) and header["cty"].upper() in ("JWT", "APPLICATION/JWT"):
        raise MalformedJWS("nested_jwt")
    if "b64" in header or "zip" in header or "enc" in header:  # even as null: we implement none of them
        raise MalformedJWS("unsupported_header")
    return CompactJWS(header, claims, f"{header_b64}.{payload_b64}".encode("ascii"), signature)


def media_type_is(value: Any, expected: str) -> bool:
    """RFC 7515 §4.1.9: `typ` compares case-insensitively, and a value without '/' means application/<value>."""
    if not isinstance(value, str):
        return False
    value = value.lower()
    if "/" not in value:
        value = "application/" + value
    return value == "application/" + expected.lower()


def import_public_jwk(jwk: Mapping[str, Any], *, allow_private: bool = False) -> ECKey | RSAKey | OKPKey:
    """Import an asymmetric public JWK after checking it is canonical (RFC 7518 §6.2.1, §6.3.1).

    Symmetric (`oct`) keys are never imported: public material must never become an HMAC secret.
    """
    if not isinstance(jwk, Mapping):
        raise MalformedJWS("bad_jwk")
    kty = jwk.get("kty")
    if not allow_private and _PRIVATE_MEMBERS & set(jwk):
        raise MalformedJWS("private_jwk")
    try:
        if kty == "EC":
            size = _EC_SIZES.get(jwk.get("crv"))  # type: ignore[arg-type]
            if size is None or not isinstance(jwk.get("x"), str) or not isinstance(jwk.get("y"), str):
                raise MalformedJWS("bad_jwk")
            if len(b64url_decode(jwk["x"])) != size or len(b64url_decode(jwk["y"])) != size:
                raise MalformedJWS("bad_jwk")
            key: Any = ECKey.import_key(_public_members(jwk, ("kty", "crv", "x", "y")))
        elif kty == "RSA":
            if not isinstance(jwk.get("n"), str) or not isinstance(jwk.get("e"), str):
                raise MalformedJWS("bad_jwk")
            n, e = b64url_decode(jwk["n"]), b64url_decode(jwk["e"])
            if not n or not e or n[0] == 0 or e[0] == 0:
                raise MalformedJWS("bad_jwk")
            bits = int.from_bytes(n, "big").bit_length()
            if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
                raise MalformedJWS("weak_key")
            key = RSAKey.import_key(_public_members(jwk, ("kty", "n", "e")))
        elif kty == "OKP":
            if jwk.get("crv") != "Ed25519" or not isinstance(jwk.get("x"), str):
                raise MalformedJWS("bad_jwk")
            if len(b64url_decode(jwk["x"])) != 32:
                raise MalformedJWS("bad_jwk")
            key = OKPKey.import_key(_public_members(jwk, ("kty", "crv", "x")))
        else:
            raise MalformedJWS("unsupported_key_type")
    except MalformedJWS:
        raise
    except (JoseError, ValueError, TypeError):  # e.g. an EC point that is not on the curve (RFC 8725 §3.4)
        raise MalformedJWS("bad_jwk") from None
    return key


def _public_members(jwk: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    return {name: jwk[name] for name in names}


def key_fits_algorithm(key: ECKey | RSAKey | OKPKey, alg: str) -> bool:
    expected = ALGORITHM_KEY_TYPES.get(alg)
    if expected is None:
        return False
    kty, crv = expected
    if key.key_type != kty:
        return False
    return crv is None or key.as_dict().get("crv") == crv


def verify_signature(jws: CompactJWS, key: ECKey | RSAKey | OKPKey, alg: str) -> bool:
    """Check the signature with exactly this algorithm and key; False for any mismatch, never an exception."""
    if not key_fits_algorithm(key, alg):
        return False
    model = JWSRegistry.algorithms.get(alg)
    if model is None:
        return False
    try:
        return bool(model.verify(jws.signing_input, jws.signature, key))
    except (JoseError, ValueError, TypeError):
        return False


def thumbprint(key: ECKey | RSAKey | OKPKey) -> str:
    """RFC 7638 SHA-256 thumbprint, unpadded base64url (43 characters); keys are canonical by import."""
    return key.thumbprint()


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def numeric_date(value: Any) -> float | None:
    """A NumericDate (RFC 7519 §2): a finite JSON number that is not a boolean; None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value) if isinstance(value, int) and abs(value) < 2**53 else value
    if not isinstance(value, float) or not math.isfinite(value) or abs(value) > 2**53:
        return None
    return value
