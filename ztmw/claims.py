"""Typed, strict readers for access-token claims, shared by every verifier that produces a `VerifiedToken`.

JWT claims (RFC 9068) and introspection responses (RFC 7662) carry the same members with the same rules, so
the checks live once here: NumericDates that are real numbers (JOSE-14), `aud` as a string or a non-empty
array of strings (JOSE-17), `scope` as a space-delimited string (AT-10), `amr` as an array (AMR-01), `cnf` and
`act` as objects. Every failure is an `InvalidToken` with a stable reason; nothing here ever raises anything else.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import Any, Callable, Hashable, ItemsView, Iterator, KeysView, Mapping, TypeVar, ValuesView

from ._frozen import positional_factory
from .errors import InvalidToken
from .jws import numeric_date, strict_json_object
from .models import VerifiedToken, frozen_mapping

H = TypeVar("H", bound=Hashable)
V = TypeVar("V")


class SharedValues:
    """One stored object for each equal value that many cached tokens carry (claim names, issuer, audiences,
    client ids, scope strings and sets), so 100,000 cached tokens hold them once instead of 100,000 times.

    Bounded: at most `max_entries` values (when full it starts over, so it follows what tokens carry now; values
    already handed out stay shared), each a string of at most `max_chars` or a short tuple of such strings, so
    the table itself never holds more than a few MB. It is fed only from tokens that verified.
    """

    __slots__ = ("_values", "_max_entries", "_max_chars")

    def __init__(self, max_entries: int = 4096, max_chars: int = 256) -> None:
        self._values: dict[Any, Any] = {}
        self._max_entries = max_entries
        self._max_chars = max_chars

    def __len__(self) -> int:
        return len(self._values)

    @property
    def values(self) -> Mapping[Any, Any]:
        """The table itself, read-only by contract: a hot loop may look a value up here before calling `share`."""
        return self._values

    def share(self, value: H) -> H:
        """The stored object equal to `value` (`value` itself the first time, or when it is too large)."""
        found = self._values.get(value)
        if found is None:
            found = self._remember(value, value)
        return found  # type: ignore[no-any-return]

    def derive(self, key: H, make: Callable[[H], V]) -> V:
        """The stored `make(key)`, made once per distinct `key` while it stays in the table."""
        found = self._values.get(key)
        if found is None:
            found = self._remember(key, make(key))
        return found  # type: ignore[no-any-return]

    def _remember(self, key: Any, value: Any) -> Any:
        limit = self._max_chars
        if type(key) is str:
            small = len(key) <= limit
        else:  # a tuple of strings
            small = len(key) <= 16 and all(type(v) is str and len(v) <= limit for v in key)
        if small:
            if len(self._values) >= self._max_entries:
                self._values.clear()
            self._values[key] = value
        return value


def _scope_set(scope: str) -> frozenset[str]:
    return frozenset(s for s in scope.split(" ") if s)


_STRINGS = SharedValues()  # claim names and the string values in _REPEATED
_TUPLES = SharedValues()  # audience and amr tuples
_SCOPES = SharedValues()  # scope string -> frozenset of scope names
# claims whose values recur across the tokens of an issuer (one issuer, a few audiences, clients and scope sets);
# `sub` and `jti` are per user or per token, so sharing them would only churn the table
_REPEATED = frozenset({"iss", "aud", "azp", "client_id", "scope", "acr", "amr", "token_type", "typ"})


def stored_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of verified claims for a long-lived `VerifiedToken`: equal values, with the names and the recurring
    string values (see `_REPEATED`) taken from the shared tables, so a cached token holds only what is its own
    (sub, jti, times, private claims). Lists are copied, never shared: a reader cannot change another token."""
    out: dict[str, Any] = {}
    share = _STRINGS.share
    known = _STRINGS.values  # looked up here first: a function call per claim name was most of this copy's cost
    for name, value in claims.items():
        if name in _REPEATED:
            if type(value) is str:
                value = known.get(value) or share(value)
            elif type(value) is list:
                value = [share(v) if type(v) is str else v for v in value]
        out[known.get(name) or share(name)] = value
    return out


class VerifiedClaims(Mapping[str, Any]):
    """Every claim of a verified JWT, read-only, kept as the payload's JSON until something reads one.

    Most requests never read a claim beyond what `VerifiedToken`'s own fields hold, so a new token keeps the
    few hundred bytes it arrived as instead of a dict of its claims: no copy per token (a tenth of what a new
    token costs beside its signature) and a smaller cache entry. The first read parses the JSON once (it was
    checked strictly when the token was verified) into `stored_claims`' shared form, and keeps that.
    """

    __slots__ = ("_json", "_claims")

    def __init__(self, payload: bytes) -> None:
        self._json: bytes | None = payload
        self._claims: Mapping[str, Any] | None = None

    def _read(self) -> Mapping[str, Any]:
        claims = self._claims
        if claims is None:
            assert self._json is not None
            claims = self._claims = MappingProxyType(stored_claims(strict_json_object(self._json)))
            self._json = None
        return claims

    def __getitem__(self, name: str) -> Any:
        return self._read()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __contains__(self, name: object) -> bool:
        return name in self._read()

    def get(self, name: str, default: Any = None) -> Any:
        return self._read().get(name, default)

    def keys(self) -> KeysView[str]:
        return self._read().keys()

    def items(self) -> ItemsView[str, Any]:
        return self._read().items()

    def values(self) -> ValuesView[Any]:
        return self._read().values()

    def __eq__(self, other: object) -> bool:
        return self._read() == other

    __hash__ = None  # type: ignore[assignment]  # a mapping, as dict and MappingProxyType

    def __repr__(self) -> str:
        return f"VerifiedClaims({dict(self._read())!r})"


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
    payload: bytes | None = None,
) -> VerifiedToken:
    """The `VerifiedToken` for checked claims; reads and validates sub, scope, acr, amr, auth_time, cnf, act.
    `payload`: the JSON `claims` was parsed from (a JWT's), kept instead of a copy of them (`VerifiedClaims`).

    Each claim is checked in the same order, with the same reason, as the generic readers above would; the
    common case (a plain non-empty string, an absent optional claim) is answered inline and anything else
    goes to those readers, which either return the same value or raise the reason."""
    get = claims.get
    subject = get("sub")
    if type(subject) is not str or not subject:
        subject = required(claims, "sub", str)
    scope = get("scope", "")
    if not isinstance(scope, str):  # AT-10: the space-delimited string form only
        raise InvalidToken("invalid_claim")
    amr = None
    if "amr" in claims:
        amr = optional(claims, "amr", list)
        if not all(isinstance(m, str) for m in amr):  # AMR-01
            raise InvalidToken("invalid_claim")
    acr = optional(claims, "acr", str) if "acr" in claims else None
    cnf = None
    if "cnf" in claims:
        cnf = optional(claims, "cnf", dict)  # confirmed per request by the core, never here
        if not cnf:
            # RFC 7800 §3: the issuer claimed a binding and named no key: fail closed rather than accept it
            # as an unbound bearer token (members nobody understands are refused per request, MTLS-15)
            raise InvalidToken("unsupported_binding")
    actor = optional(claims, "act", dict) if "act" in claims else None
    jti = get("jti")
    if jti is not None and (type(jti) is not str or not jti):
        jti = optional(claims, "jti", str)
    elif jti is None and "jti" in claims:  # a JSON null is no absent jti
        raise InvalidToken("invalid_claim")
    auth_time = date(claims, "auth_time") if "auth_time" in claims else None
    known = _STRINGS.values
    share = _STRINGS.share
    return _make_verified(
        known.get(issuer) or share(issuer),
        subject,
        _TUPLES.values.get(audience) or _TUPLES.share(audience),
        expires_at,
        jti if jti is not None and _printable_id(jti) else token_hash(token),
        verifier,
        # shared: a cache of 100k tokens from a few clients holds each client id, scope set and acr once
        (known.get(client_id) or share(client_id)) if client_id is not None else None,
        _SCOPES.values.get(scope) or _SCOPES.derive(scope, _scope_set),
        issued_at,
        not_before,
        auth_time,
        share(acr) if acr is not None else None,
        _TUPLES.share(tuple(share(m) for m in amr)) if amr else (),
        frozen_mapping(cnf),
        frozen_mapping(actor) if actor is not None else None,
        # every claim stays readable (AT-12: groups, roles... reach policy plugins), in a compact read-only copy
        VerifiedClaims(payload) if payload is not None else MappingProxyType(stored_claims(claims)),
        (known.get(key_id) or share(key_id)) if key_id is not None else None,
        leeway,
        key_thumbprint,
    )


def _printable_id(jti: str) -> bool:
    """`jti` fits a log line as it is: 1-128 printable ASCII characters, no space ([\\x21-\\x7e]{1,128})."""
    return len(jti) <= 128 and jti.isascii() and jti.isprintable() and " " not in jti


# VerifiedToken's fields, in order: the positional maker below is called with exactly these
_VERIFIED_FIELDS = ("issuer", "subject", "audience", "expires_at", "token_id", "verifier", "client_id", "scopes",
                    "issued_at", "not_before", "auth_time", "acr", "amr", "cnf", "actor", "claims", "key_id",
                    "leeway", "key_thumbprint")
_make_verified = positional_factory(VerifiedToken, _VERIFIED_FIELDS)
