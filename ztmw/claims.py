"""Typed, strict readers for access-token claims, shared by every verifier that produces a `VerifiedToken`.

JWT claims (RFC 9068) and introspection responses (RFC 7662) carry the same members with the same rules, so
the checks live once here: NumericDates that are real numbers (JOSE-14), `aud` as a string or a non-empty
array of strings (JOSE-17), `scope` as a space-delimited string (AT-10), `amr` as an array (AMR-01), `cnf` and
`act` as objects. Every failure is an `InvalidToken` with a stable reason; nothing here ever raises anything else.
"""

from __future__ import annotations

import hashlib
import re
import sys
from types import MappingProxyType
from typing import Any, Mapping

from .errors import InvalidToken
from .jws import numeric_date
from .models import VerifiedToken, frozen_mapping

_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")


def optional(claims: Mapping[str, Any], name: str, kind: type) -> Any:
    """The member if present and of `kind` (a `str` non-empty, never a bool for numbers); None if absent."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or (kind is str and not value):
        raise InvalidToken("invalid_claim")
    return value


def required(claims: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in claims:
        raise InvalidToken("missing_claim")
    return optional(claims, name, kind)


def date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate, None when absent (booleans, strings, null, NaN and huge values are refused)."""
    if name not in claims:
        return None
    value = numeric_date(claims[name])
    if value is None:
        raise InvalidToken("invalid_claim")
    return value


def audience(claims: Mapping[str, Any]) -> tuple[str, ...] | None:
    """`aud` as a tuple, None when absent; the caller decides whether absence is allowed (BCP-09)."""
    if "aud" not in claims:
        return None
    aud = claims["aud"]
    if isinstance(aud, str) and aud:
        return (aud,)
    if isinstance(aud, list) and aud and all(isinstance(a, str) and a for a in aud):
        return tuple(aud)
    raise InvalidToken("invalid_claim")


def check_times(
    claims: Mapping[str, Any], *, now: float, leeway: float
) -> tuple[float | None, float | None, float | None]:
    """(exp, nbf, iat) after the validity checks with leeway (JOSE-15, JOSE-16); missing ones are None."""
    exp, nbf, iat = date(claims, "exp"), date(claims, "nbf"), date(claims, "iat")
    if exp is not None and exp <= now - leeway:
        raise InvalidToken("token_expired")
    if nbf is not None and nbf > now + leeway:
        raise InvalidToken("token_not_yet_valid")
    if iat is not None and iat > now + leeway:
        raise InvalidToken("token_issued_in_future")
    return exp, nbf, iat


def token_hash(token: str) -> str:
    """A log-safe id for a token without a usable jti: never the token, only a short hash of it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def verified_token(
    claims: Mapping[str, Any],
    *,
    token: str,
    verifier: str,
    issuer: str,
    audience: tuple[str, ...],
    expires_at: float,
    not_before: float | None,
    issued_at: float | None,
    client_id: str | None,
    leeway: float,
    key_id: str | None = None,
    key_thumbprint: str | None = None,
) -> VerifiedToken:
    """The `VerifiedToken` for checked claims; reads and validates sub, scope, acr, amr, auth_time, cnf, act."""
    subject = required(claims, "sub", str)
    scope = claims.get("scope", "")
    if not isinstance(scope, str):  # AT-10: the space-delimited string form only
        raise InvalidToken("invalid_claim")
    amr = optional(claims, "amr", list)
    if amr is not None and not all(isinstance(m, str) for m in amr):  # AMR-01
        raise InvalidToken("invalid_claim")
    cnf = optional(claims, "cnf", dict)  # confirmed per request by the core, never here
    actor = optional(claims, "act", dict)
    jti = optional(claims, "jti", str)
    return VerifiedToken(
        issuer=issuer,
        subject=subject,
        audience=audience,
        expires_at=expires_at,
        token_id=jti if jti is not None and _PRINTABLE_ID.fullmatch(jti) else token_hash(token),
        verifier=verifier,
        # interned: a cache of 100k tokens from a few clients holds each scope and client id string once
        client_id=sys.intern(client_id) if client_id is not None else None,
        scopes=frozenset(sys.intern(s) for s in scope.split(" ") if s),
        issued_at=issued_at,
        not_before=not_before,
        auth_time=date(claims, "auth_time"),
        acr=optional(claims, "acr", str),
        amr=tuple(amr or ()),
        cnf=frozen_mapping(cnf),
        actor=frozen_mapping(actor) if actor is not None else None,
        # a read-only view of the parsed claims, not a copy: the verifier's own dict, referenced by nobody else
        claims=MappingProxyType(claims) if isinstance(claims, dict) else frozen_mapping(claims),
        key_id=key_id,
        leeway=leeway,
        key_thumbprint=key_thumbprint,
    )
