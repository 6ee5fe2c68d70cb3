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
import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from ._frozen import positional_factory, quick_init
from .errors import ZtmwError
from .lru import LRU

_PADDING = (b"", b"", b"==", b"=")  # by length % 4 (1 is never valid)
# base64url to the standard alphabet; "+", "/" and "=" to "!", which strict decoding refuses
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_ALPHABET = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
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


class MalformedJWS(ZtmwError, ValueError):
    """The input is not a well-formed compact JWS (or JWK); `reason` is a stable id for audit.

    Part of the one error tree, but never rendered to a client as such: verifiers turn it into InvalidToken or
    InvalidDPoPProof with their own reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@quick_init
@dataclass(frozen=True, slots=True)
class CompactJWS:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes
    payload: bytes = b""
    """The payload's JSON as decoded from base64url (what `claims` was parsed from)."""


# one per JWS parsed: 0.1 µs instead of 0.3
_make_compact = positional_factory(CompactJWS, ("header", "claims", "signing_input", "signature", "payload"))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded base64url, refusing padding, other alphabets and non-canonical trailing bits.

    One pass to ASCII bytes (non-ASCII refused there) and one table translation: `-_` become the standard
    `+/`, and `+ / =` become `!`, which no base64 alphabet has, so the decoder's strict mode refuses them
    with every other character outside the alphabet instead of dropping it. The check of the unused low bits
    makes sure one byte string has exactly one accepted spelling (RFC 4648 §3.5).
    """
    remainder = len(segment) % 4
    if remainder == 1:
        raise MalformedJWS("bad_base64url")
    try:
        data = binascii.a2b_base64(segment.encode("ascii").translate(_TO_STANDARD) + _PADDING[remainder],
                                   strict_mode=True)
    except ValueError:  # binascii.Error, or UnicodeEncodeError for a str that is not ASCII
        raise MalformedJWS("bad_base64url") from None
    # canonical form: the unused low bits of the last character are zero (2 chars -> 4 bits, 3 chars -> 2 bits)
    if remainder and _ALPHABET[segment[-1]] & (0xF if remainder == 2 else 0x3):
        raise MalformedJWS("non_canonical_base64url")
    return data


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedJWS("duplicate_member")
    return out


def _reject_constant(name: str) -> Any:
    raise MalformedJWS("non_finite_number")


# the C scanner behind json.JSONDecoder, called directly: `decode` adds only a whitespace regex around it
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(  # type: ignore[attr-defined] # not in typeshed
    object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant).scan_once
_JSON_WHITESPACE = " \t\n\r"


def strict_json_object(data: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON into a dict: no BOM, no UTF-16/32 guessing, no duplicates, no NaN/Infinity."""
    try:
        text = data.decode("utf-8")  # strict: lone surrogates and invalid bytes raise
        body = text.strip(_JSON_WHITESPACE)  # a BOM is not JSON whitespace: the scan below refuses it
        value, end = _SCAN(body, 0)
        if end != len(body):
            raise MalformedJWS("bad_json")
        # a "\ud800" escape decodes to a lone surrogate: refuse it now, not later when something re-encodes
        if "\\" in text and _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except MalformedJWS:
        raise
    except (UnicodeError, ValueError, RecursionError, StopIteration):  # StopIteration: no value at all
        raise MalformedJWS("bad_json") from None
    if type(value) is not dict:
        raise MalformedJWS("not_an_object")
    return value


# Checked headers by their base64url text: an issuer signs every token with one of a few headers (alg, kid,
# typ), and a DPoP client every proof with one (typ, alg, jwk), so a JWS costs one dict lookup for its header.
# Only small headers of scalar members or objects of scalars are kept, read-only all the way down (every JWS
# with that header shares the one view); bounded, and emptied when full, so a flood of distinct headers costs
# nothing but the parse it would have cost anyway.
_HEADERS: dict[str, Mapping[str, Any]] = {}
_HEADERS_MAX = 256
_HEADER_MAX_CHARS = 512
_SCALARS = (str, int, float, bool, type(None))


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
    known = _HEADERS.get(header_b64)
    header: Mapping[str, Any] = strict_json_object(b64url_decode(header_b64)) if known is None else known
    payload = b64url_decode(payload_b64)
    claims = strict_json_object(payload)
    signature = b64url_decode(signature_b64)
    if known is None:
        _check_header(header)
        if len(header_b64) <= _HEADER_MAX_CHARS and all(_shareable(v) for v in header.values()):
            if len(_HEADERS) >= _HEADERS_MAX:
                _HEADERS.clear()
            _HEADERS[header_b64] = MappingProxyType({name: MappingProxyType(dict(v)) if type(v) is dict else v
                                                     for name, v in header.items()})
    return _make_compact(header, claims, token[:len(header_b64) + len(payload_b64) + 1].encode("ascii"), signature,
                         payload)


def _shareable(value: Any) -> bool:
    """A scalar, or an object of scalars (a DPoP proof's `jwk`), kept read-only: callers share it."""
    if type(value) in _SCALARS:
        return True
    return type(value) is dict and all(type(v) in _SCALARS for v in value.values())


def _check_header(header: Mapping[str, Any]) -> None:
    if not isinstance(header.get("alg"), str):
        raise MalformedJWS("missing_alg")
    if "crit" in header:  # no extensions are supported, so any crit is not understood (RFC 7515 §4.1.11)
        raise MalformedJWS("unsupported_crit")
    if isinstance(header.get("cty"), str) and header["cty"].upper() in ("JWT", "APPLICATION/JWT"):
        raise MalformedJWS("nested_jwt")
    if "b64" in header or "zip" in header or "enc" in header:  # even as null: we implement none of them
        raise MalformedJWS("unsupported_header")


def media_type_is(value: Any, expected: str) -> bool:
    """RFC 7515 §4.1.9: `typ` compares case-insensitively, and a value without '/' means application/<value>."""
    if not isinstance(value, str):
        return False
    text: str = value.lower()
    if "/" not in text:
        text = "application/" + text
    return text == "application/" + expected.lower()


_IMPORTED: LRU[tuple[Any, ...], Any] = LRU(4096)
_MEMBERS = {"EC": ("kty", "crv", "x", "y"), "RSA": ("kty", "n", "e"), "OKP": ("kty", "crv", "x")}


def import_public_jwk(jwk: Mapping[str, Any], *, allow_private: bool = False) -> ECKey | RSAKey | OKPKey:
    """Import an asymmetric public JWK after checking it is canonical (RFC 7518 §6.2.1, §6.3.1).

    Symmetric (`oct`) keys are never imported: public material must never become an HMAC secret. Imports are
    remembered by their exact public members (bounded LRU): a DPoP client sends the same key on every request,
    and parsing and curve-checking it again each time was most of a proof check's cost.
    """
    if not isinstance(jwk, Mapping):
        raise MalformedJWS("bad_jwk")
    kty = jwk.get("kty")
    if not allow_private and _PRIVATE_MEMBERS & set(jwk):
        raise MalformedJWS("private_jwk")
    names = _MEMBERS.get(kty) if isinstance(kty, str) else None
    cache_key = tuple(jwk.get(n) for n in names) if names else None
    if cache_key is not None and all(isinstance(v, str) for v in cache_key):
        cached: ECKey | RSAKey | OKPKey | None = _IMPORTED.get(cache_key)
        if cached is not None:
            return cached
        key = _import_public_jwk(jwk, kty)
        _IMPORTED.put(cache_key, key)
        return key
    return _import_public_jwk(jwk, kty)


def _import_public_jwk(jwk: Mapping[str, Any], kty: Any) -> ECKey | RSAKey | OKPKey:
    try:
        if kty == "EC":
            size = _EC_SIZES.get(jwk.get("crv"))  # type: ignore[arg-type]
            if size is None or not isinstance(jwk.get("x"), str) or not isinstance(jwk.get("y"), str):
                raise MalformedJWS("bad_jwk")
            if len(b64url_decode(jwk["x"])) != size or len(b64url_decode(jwk["y"])) != size:
                raise MalformedJWS("bad_jwk")
            key: ECKey | RSAKey | OKPKey = ECKey.import_key(_public_members(jwk, ("kty", "crv", "x", "y")))
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


def _public_members(jwk: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str | list[str]]:
    return {name: jwk[name] for name in names}


def key_fits_algorithm(key: ECKey | RSAKey | OKPKey, alg: str) -> bool:
    expected = ALGORITHM_KEY_TYPES.get(alg)
    if expected is None:
        return False
    kty, crv = expected
    if key.key_type != kty:
        return False
    return crv is None or key.curve_name == crv  # type: ignore[union-attr]


class _PerKey:
    """Values remembered per key object for as long as it lives (joserfc keys are not hashable)."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, key: Any) -> Any:
        entry = self._data.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else None

    def set(self, key: Any, value: Any) -> Any:
        ident = id(key)
        self._data[ident] = (weakref.ref(key, lambda _ref: self._data.pop(ident, None)), value)
        return value


_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512,
}
_VERIFIERS = _PerKey()
Verify = Callable[[bytes, bytes], bool]


def _prepared(key: ECKey | RSAKey | OKPKey, alg: str) -> Verify:
    """A ready `verify(message, signature)` on the cryptography key, built once per key and algorithm.

    Written on cryptography directly (not joserfc's JWS layer) because the general path re-derived the
    operation key and re-encoded on every call; the checks are the same: raw R||S of the exact length for
    ECDSA (JOSE-11), the algorithm's own hash and padding, and nothing but True/False out.
    """
    per_key: dict[str, Verify] = _VERIFIERS.get(key) or _VERIFIERS.set(key, {})
    verify = per_key.get(alg)
    if verify is not None:
        return verify
    public = key.get_op_key("verify")
    family, bits = alg[:2], alg[2:]
    if family == "ES" and isinstance(public, ec.EllipticCurvePublicKey):
        verify = _ecdsa(public, _HASHES[bits]())
    elif family in ("RS", "PS") and isinstance(public, rsa.RSAPublicKey):
        verify = _rsa(public, _HASHES[bits], pss=family == "PS")
    elif family == "Ed" and isinstance(public, ed25519.Ed25519PublicKey):
        verify = _eddsa(public)
    else:  # key_fits_algorithm rules this out; fail closed all the same
        raise ValueError(f"no verifier for {alg} with {type(public).__name__}")
    per_key[alg] = verify
    return verify


def _ecdsa(public: ec.EllipticCurvePublicKey, digest: hashes.HashAlgorithm) -> Verify:
    size = (public.curve.key_size + 7) // 8
    algorithm = ec.ECDSA(digest)

    def verify(message: bytes, signature: bytes) -> bool:
        if len(signature) != 2 * size:
            return False
        der = der_signature(signature, size)
        if der is None:  # degenerate signatures (CVE-2022-21449 class) never verify
            return False
        public.verify(der, message, algorithm)
        return True

    return verify


_BYTE = [bytes((i,)) for i in range(256)]


def der_signature(raw: bytes, size: int) -> bytes | None:
    """The DER `SEQUENCE { INTEGER r, INTEGER s }` of a JWS ECDSA signature `r || s` (RFC 7518 §3.4), each half
    `size` octets; None when r or s is zero. What `encode_dss_signature(int(r), int(s))` returns, built from
    the bytes without the two integer conversions (a third of the cost); r and s not below the group order
    are left to OpenSSL, which refuses them."""
    r = raw[:size].lstrip(b"\0")
    s = raw[size:].lstrip(b"\0")
    if not r or not s:
        return None
    if r[0] > 127:  # DER INTEGERs are signed: a set high bit needs a leading zero octet
        r = b"\0" + r
    if s[0] > 127:
        s = b"\0" + s
    length = len(r) + len(s) + 4  # at most 2 * (2 + 67) for P-521: one length octet, long form above 127
    head = b"\x30" + _BYTE[length] if length < 128 else b"\x30\x81" + _BYTE[length]
    return b"".join((head, b"\x02", _BYTE[len(r)], r, b"\x02", _BYTE[len(s)], s))


def _rsa(public: rsa.RSAPublicKey, digest: Callable[[], hashes.HashAlgorithm], *, pss: bool) -> Verify:
    pad: padding.AsymmetricPadding = (
        padding.PSS(mgf=padding.MGF1(digest()), salt_length=digest().digest_size) if pss else padding.PKCS1v15()
    )

    def verify(message: bytes, signature: bytes) -> bool:
        public.verify(signature, message, pad, digest())
        return True

    return verify


def _eddsa(public: ed25519.Ed25519PublicKey) -> Verify:
    def verify(message: bytes, signature: bytes) -> bool:
        public.verify(signature, message)
        return True

    return verify


def verify_signature(jws: CompactJWS, key: ECKey | RSAKey | OKPKey, alg: str) -> bool:
    """Check the signature with exactly this algorithm and key; False for any mismatch, never an exception.

    A prepared verifier exists only for a key and algorithm that `key_fits_algorithm` accepted (keys are
    immutable), so a key seen before skips that check."""
    per_key: dict[str, Verify] | None = _VERIFIERS.get(key)
    verify = per_key.get(alg) if per_key is not None else None
    try:
        if verify is None:
            if not key_fits_algorithm(key, alg):
                return False
            verify = _prepared(key, alg)
        return verify(jws.signing_input, jws.signature)
    except (InvalidSignature, JoseError, ValueError, TypeError):
        return False


_THUMBPRINTS = _PerKey()


def thumbprint(key: ECKey | RSAKey | OKPKey) -> str:
    """RFC 7638 SHA-256 thumbprint, unpadded base64url (43 characters); keys are canonical by import."""
    value = _THUMBPRINTS.get(key)
    return str(value) if value is not None else str(_THUMBPRINTS.set(key, key.thumbprint()))


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


_MAX_DATE = 2**53


def numeric_date(value: Any) -> float | None:
    """A NumericDate (RFC 7519 §2): a finite JSON number that is not a boolean; None when it is not one."""
    if type(value) is int and -_MAX_DATE < value < _MAX_DATE:  # the common case, answered first
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value) if isinstance(value, int) and abs(value) < 2**53 else value
    if not isinstance(value, float) or not math.isfinite(value) or abs(value) > 2**53:
        return None
    return value
