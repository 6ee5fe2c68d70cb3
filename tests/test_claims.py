"""ztmw.claims: the VerifiedToken built from verified claims keeps every claim, and shares what tokens repeat."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ztmw.claims import SharedValues, VerifiedClaims, verified_token
from ztmw.errors import InvalidToken


def claims_of(**extra: Any) -> dict[str, Any]:
    # a fresh parse per call, as a verifier gets it: equal values, distinct objects
    body = {"iss": "https://as.example.com", "sub": "alice", "aud": ["https://api.example.com", "https://b"],
            "exp": 2_000_000_000, "iat": 1_700_000_000, "jti": "j-1", "client_id": "demo-client",
            "scope": "read write", "acr": "urn:acr:1", "amr": ["pwd", "otp"], "groups": ["admins"]}
    body.update(extra)
    return json.loads(json.dumps(body))


def build(claims: dict[str, Any]) -> Any:
    return verified_token(
        claims, token="t", verifier="bearer", issuer=claims["iss"], audience=tuple(claims["aud"]),
        expires_at=float(claims["exp"]), not_before=None, issued_at=float(claims["iat"]),
        client_id=claims["client_id"], leeway=30.0, key_id="k1", key_thumbprint="tp",
    )


def test_every_claim_stays_readable_with_equal_values() -> None:
    claims = claims_of(nested={"a": [1, {"b": None}]}, flag=True)
    token = build(claims)
    assert dict(token.claims) == claims
    assert list(token.claims) == list(claims)  # order kept
    with pytest.raises(TypeError):
        token.claims["sub"] = "mallory"  # type: ignore[index]


def test_recurring_names_and_values_are_stored_once() -> None:
    a, b = build(claims_of()), build(claims_of(sub="bob", jti="j-2"))
    for name in ("iss", "client_id", "scope", "acr"):
        assert a.claims[name] is b.claims[name]
    assert [x is y for x, y in zip(a.claims["aud"], b.claims["aud"])] == [True, True]
    assert all(x is y for x, y in zip(a.claims, b.claims))  # the claim names
    assert a.scopes is b.scopes and a.scopes == {"read", "write"}
    assert a.audience is b.audience and a.amr is b.amr and a.amr == ("pwd", "otp")
    assert a.client_id is b.client_id is a.claims["client_id"] and a.acr is b.acr
    assert a.issuer is b.issuer and a.key_id is b.key_id


def test_lists_are_copied_per_token() -> None:
    a, b = build(claims_of()), build(claims_of())
    assert a.claims["aud"] == b.claims["aud"] and a.claims["aud"] is not b.claims["aud"]
    assert a.claims["groups"] is not b.claims["groups"]


def test_per_token_values_are_not_pooled() -> None:
    a, b = build(claims_of(sub="carol")), build(claims_of(sub="carol"))
    assert a.subject == b.subject == "carol"
    assert a.subject is a.claims["sub"]  # one object per token, not a second copy


def build_from_payload(claims: dict[str, Any]) -> Any:
    payload = json.dumps(claims).encode()
    return verified_token(
        json.loads(payload), token="t", verifier="bearer", issuer=claims["iss"], audience=tuple(claims["aud"]),
        expires_at=float(claims["exp"]), not_before=None, issued_at=float(claims["iat"]),
        client_id=claims["client_id"], leeway=30.0, key_id="k1", key_thumbprint="tp", payload=payload,
    )


def test_claims_kept_as_their_payload_read_the_same() -> None:
    claims = claims_of(nested={"a": [1, {"b": None}]}, flag=True)
    token = build_from_payload(claims)
    assert isinstance(token.claims, VerifiedClaims)
    assert token.claims == claims and claims == token.claims and token.claims == build(claims).claims
    assert list(token.claims) == list(claims) and len(token.claims) == len(claims)  # order kept
    assert token.claims["groups"] == ["admins"] and token.claims.get("absent", 7) == 7 and "sub" in token.claims
    assert dict(token.claims.items()) == claims and list(token.claims.values()) == list(claims.values())
    with pytest.raises(TypeError):
        token.claims["sub"] = "mallory"  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(token.claims)


def test_claims_kept_as_their_payload_share_names_and_values_once_read() -> None:
    a, b = build_from_payload(claims_of()), build_from_payload(claims_of(sub="bob", jti="j-2"))
    assert all(x is y for x, y in zip(a.claims, b.claims))  # the claim names
    for name in ("iss", "client_id", "scope", "acr"):
        assert a.claims[name] is b.claims[name]
    assert a.claims["aud"] is not b.claims["aud"]  # lists stay per token


def test_claims_kept_as_their_payload_equal_what_was_checked() -> None:
    # the checked dict and the kept JSON are one payload: what a reader sees is what the checks saw
    payload = b'{"iss":"https://as.example.com","sub":"alice","aud":"https://api.example.com","exp":2000000000}'
    claims = VerifiedClaims(payload)
    assert claims == json.loads(payload) and claims["sub"] == "alice"


def test_checks_still_apply() -> None:
    for bad in ({"scope": ["a"]}, {"amr": "pwd"}, {"amr": [1]}, {"acr": ""}, {"cnf": "x"}, {"act": []}):
        with pytest.raises(InvalidToken) as caught:
            build(claims_of(**bad))
        assert caught.value.reason == "invalid_claim"


class TestSharedValues:
    def test_equal_values_get_the_first_object(self) -> None:
        table = SharedValues()
        first = "".join(["ab", "c"])
        assert table.share(first) is first
        assert table.share("".join(["a", "bc"])) is first

    def test_derive_makes_once(self) -> None:
        table, made = SharedValues(), []
        for _ in range(3):
            table.derive("a b", lambda key: made.append(key) or frozenset(key.split()))
        assert made == ["a b"]

    def test_bounded_and_starts_over_when_full(self) -> None:
        table = SharedValues(max_entries=3)
        for i in range(10):
            table.share(f"v{i}")
            assert len(table) <= 3
        again = "".join(["v", "9"])
        assert table.share(again) == "v9"

    def test_large_values_are_not_kept(self) -> None:
        table = SharedValues(max_chars=8)
        assert table.share("x" * 9) == "x" * 9 and table.share(("a", "y" * 9)) == ("a", "y" * 9)
        assert table.derive("z" * 9, len) == 9
        assert len(table) == 0
        assert table.share(("a", "b")) == ("a", "b") and len(table) == 1


def test_an_empty_cnf_is_refused_not_taken_for_an_unbound_token() -> None:
    """RFC 7800 §3: `cnf` says the token is bound; with no key named, nothing could confirm it."""
    with pytest.raises(InvalidToken) as caught:
        build(claims_of(cnf={}))
    assert caught.value.reason == "unsupported_binding"
    assert dict(build(claims_of(cnf={"jkt": "x" * 43})).cnf) == {"jkt": "x" * 43}


# -- the inline checks answer what the generic readers answer, reason and order included --------------------

def reference_verified_token(claims: dict[str, Any]) -> Any:
    """The straightforward spelling verified_token implements faster: every claim through the generic readers,
    in order (sub, scope, amr, acr, cnf, act, jti, auth_time)."""
    from ztmw.claims import date, optional, required

    required(claims, "sub", str)
    if not isinstance(claims.get("scope", ""), str):
        raise InvalidToken("invalid_claim")
    amr = optional(claims, "amr", list)
    if amr is not None and not all(isinstance(m, str) for m in amr):
        raise InvalidToken("invalid_claim")
    optional(claims, "acr", str)
    cnf = optional(claims, "cnf", dict)
    if cnf is not None and not cnf:
        raise InvalidToken("unsupported_binding")
    optional(claims, "act", dict)
    optional(claims, "jti", str)
    date(claims, "auth_time")
    return "ok"


_ODD = {
    "sub": [None, "", 1, ["a"], True],
    "scope": [None, 1, ["a"], ""],
    "amr": [None, "pwd", [], [1], ["pwd", None]],
    "acr": [None, "", 2, "urn:x"],
    "cnf": [None, {}, [], "x", {"jkt": "y"}],
    "act": [None, [], {}, "svc", {"sub": "s"}],
    "jti": [None, "", 7, ["j"], "has space", "j" * 129, "é"],
    "auth_time": [None, "1", True, 1.5, 2**53, float("inf")],
}
_CASES: list[dict[str, Any]] = [{name: value} for name, values in _ODD.items() for value in values]
_CASES += [{name: ...} for name in _ODD]  # absent
_CASES += [{"jti": None, "auth_time": "x"}, {"sub": "", "scope": 1}, {"cnf": {}, "act": []},
           {"acr": "", "amr": "pwd"}, {"jti": "", "cnf": "x"}]  # two faults: the first in order wins


@pytest.mark.parametrize("changes", _CASES)
def test_verified_token_agrees_with_the_generic_readers(changes: dict[str, Any]) -> None:
    claims = claims_of(**{name: value for name, value in changes.items() if value is not ...})
    for name, value in changes.items():
        if value is ...:
            claims.pop(name, None)
    outcomes = []
    for check in (build, reference_verified_token):
        try:
            check(claims)
            outcomes.append("ok")
        except InvalidToken as error:
            outcomes.append(error.reason)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("jti, kept", [("j-1", True), ("a" * 128, True), ("a" * 129, False), ("has space", False),
                                       ("tab\there", False), ("é", False), ("\x7f", False), ("~!", True)])
def test_token_id_is_the_jti_only_when_it_is_printable_ascii(jti: str, kept: bool) -> None:
    assert (build(claims_of(jti=jti)).token_id == jti) is kept
