"""Account linking end to end (issue 15): real `ztmw serve` processes, the SQLite store and real Redis.

Every response of the ceremony's contract, the concurrent double-link race across two replicas sharing one
store, replay of a link token, unlink, and the assurance rule: a linked login owns the account's resources but
never inherits the trust of another login of it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import AsyncIterator

import pytest

from ztmw.testing import DevIssuer, DPoPKey
from ztmw.testing.http import challenges

from .linking_kit import AUDIENCE, BANKID, LINKS, Deployment, deployment, unique

STORES = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=STORES)
async def linking(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Deployment]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    async with deployment(request.param, tmp_path, redis_url=redis_url) as running:
        yield running


def challenges_of(headers: object) -> dict[str, dict[str, str]]:
    return challenges(SimpleNamespace(headers=headers))


def bearer_error(headers: object) -> dict[str, str]:
    return challenges_of(headers).get("Bearer", {})


async def test_link_is_201_then_200_and_both_logins_own_the_account(linking: Deployment) -> None:
    john, google = unique("john"), unique("google")
    bank = linking.bank_login(john)
    status, body, headers = await linking.link(bank, linking.social_login(google))
    assert (status, body) == (201, {"account": john, "issuer": linking.social.issuer, "subject": google})
    assert headers["Cache-Control"] == "no-store"
    # the same login again, with a fresh link token: nothing changes
    status, body, _ = await linking.link(bank, linking.social_login(google))
    assert (status, body["account"]) == (200, john)
    # both logins are linked (owner_requires_link is on): both own the account's data
    for token in (bank, linking.social_login(google)):
        status, body, _ = await linking.request("GET", f"/accounts/{john}/data", token)
        assert (status, body["account"]) == (200, john)
    status, body, _ = await linking.request("GET", LINKS, linking.social_login(google))
    assert status == 200 and body["account"] == john
    assert {(x["issuer"], x["subject"]) for x in body["logins"]} == {
        (linking.bank.issuer, john), (linking.social.issuer, google)}
    assert all(x["linked_at"].endswith("Z") for x in body["logins"])
    # one audit event for the link, subjects hashed; the raw subjects appear in no log line
    linked = linking.events("ztmw.identity_linked")
    assert len(linked) == 1 and linked[0]["issuer"] == linking.social.issuer
    assert linked[0]["subject"] != google and linked[0]["account"] != john
    assert google not in linking.log_text() and john not in linking.log_text()


async def test_a_login_that_is_not_linked_lists_no_logins(linking: Deployment) -> None:
    alone = unique("alone")
    status, body, _ = await linking.request("GET", LINKS, linking.bank_login(alone))
    assert (status, body) == (200, {"account": alone, "logins": []})


@pytest.mark.parametrize("raw, content_type", [
    (None, "application/json"),
    (b"", "application/json"),
    (b"{not json", "application/json"),
    (b'"a string"', "application/json"),
    (b"[]", "application/json"),
    (b"{}", "application/json"),
    (b'{"link_token": 42}', "application/json"),
    (b'{"link_token": ""}', "application/json"),
    (b'{"link_token": "x"}', "text/plain"),
    (b"\xff\xfe", "application/json"),
], ids=["no-body", "empty", "not-json", "string", "array", "no-token", "number", "empty-token",
        "not-json-type", "not-utf8"])
async def test_malformed_link_requests_are_400_invalid_request(
        linking: Deployment, raw: bytes | None, content_type: str) -> None:
    status, body, headers = await linking.request("POST", LINKS, linking.bank_login(unique("john")),
                                                  raw=raw, content_type=content_type)
    assert status == 400 and body["error"] == "invalid_request"
    assert bearer_error(headers)["error"] == "invalid_request"


async def test_hostile_strings_in_link_and_unlink_bodies_are_400(linking: Deployment) -> None:
    bank = linking.bank_login(unique("john"))
    for token in ("\ud800", "é" * 10, "a b", "x" * 20_000, "\u0000"):
        status, body, _ = await linking.link(bank, token)
        assert (status, body["error"]) == (400, "invalid_request"), token
    for issuer, subject in (("\ud800", "x"), ("https://a\u0000b", "x"), (linking.social.issuer, ""),
                            (linking.social.issuer, ["x"]), (linking.social.issuer, "s" * 5000)):
        status, body, _ = await linking.request("DELETE", LINKS, bank, body={"issuer": issuer, "subject": subject})
        assert (status, body["error"]) == (400, "invalid_request"), (issuer, subject)


async def test_link_tokens_that_do_not_verify_are_401_invalid_token(linking: Deployment) -> None:
    bank = linking.bank_login(unique("john"))
    now = time.time()
    forged = DevIssuer(linking.social.issuer, audience=AUDIENCE).mint("google", acr="x", auth_time=now - 5)
    cases = {
        "forged": forged,
        "expired": linking.social_login(unique("g"), lifetime=-120),
        "other audience": linking.social.mint(unique("g"), audience="https://other.example", auth_time=now - 5),
        "id token type": linking.social.mint(unique("g"), typ="JWT", auth_time=now - 5),
        "not a jwt": "not-a-token",
    }
    for name, token in cases.items():
        status, body, headers = await linking.link(bank, token)
        assert status == 401, name
        assert body["error"] == "invalid_token" and bearer_error(headers)["error"] == "invalid_token", name
    assert linking.events("ztmw.identity_linked") == []


async def test_a_replayed_link_token_is_401_even_after_the_link_it_made_is_removed(linking: Deployment) -> None:
    john, google = unique("john"), unique("google")
    link_token = linking.social_login(google)
    assert (await linking.link(linking.bank_login(john), link_token))[0] == 201
    status, body, _ = await linking.link(linking.bank_login(john), link_token)
    assert (status, body["error_description"]) == (401, "Link token already used")
    # replayed by someone else against another account: still refused, and no link moves
    status, _, _ = await linking.link(linking.bank_login(unique("mallory")), link_token)
    assert status == 401
    assert (await linking.request("GET", f"/accounts/{john}/data", linking.social_login(google)))[0] == 200
    # the link it made is removed: the token still cannot make it again, for anyone
    target = {"issuer": linking.social.issuer, "subject": google}
    assert (await linking.request("DELETE", LINKS, linking.bank_login(john), body=target))[0] == 200
    for current in (linking.bank_login(john), linking.bank_login(unique("mallory"))):
        status, body, _ = await linking.link(current, link_token)
        assert (status, body["error_description"]) == (401, "Link token already used")
    assert (await linking.request("GET", f"/accounts/{john}/data", linking.social_login(google)))[0] == 403
    assert any(e["reason"] == "link_token_replayed" for e in linking.events("ztmw.security"))


async def test_weak_or_stale_logins_get_an_rfc9470_step_up(linking: Deployment) -> None:
    google = unique("google")
    # the current login is too weak (social, AAL 1): acr_values names what would do, max_age too
    weak = linking.social_login(unique("john"))
    status, body, headers = await linking.link(weak, linking.social_login(google))
    challenge = bearer_error(headers)
    assert status == 401 and challenge["error"] == "insufficient_user_authentication"
    assert challenge["acr_values"] == BANKID and challenge["max_age"] == "300"
    assert challenge["error_description"] == "The current login needs a stronger authentication"
    # the current login is strong but stale
    stale = linking.bank_login(unique("john"), age=3600)
    status, _, headers = await linking.link(stale, linking.social_login(google))
    challenge = bearer_error(headers)
    assert status == 401 and challenge["error"] == "insufficient_user_authentication"
    assert challenge["max_age"] == "300" and "acr_values" not in challenge
    assert challenge["error_description"] == "The current login needs a more recent authentication"
    # the login to link is stale, or says nothing of when it happened
    fresh = linking.bank_login(unique("john"))
    for link_token in (linking.social_login(google, age=3600), linking.social.mint(google, acr="x")):
        status, _, headers = await linking.link(fresh, link_token)
        challenge = bearer_error(headers)
        assert status == 401 and challenge["max_age"] == "300"
        assert challenge["error_description"] == "The login to link needs a more recent authentication"
    assert linking.events("ztmw.identity_linked") == []


async def test_unlinkable_issuer_client_mismatch_and_max_links_are_403(linking: Deployment) -> None:
    john = unique("john")
    bank = linking.bank_login(john)
    other = linking.other.mint(unique("x"), acr="x", auth_time=time.time() - 5)
    status, body, headers = await linking.link(bank, other)
    assert (status, body["error_description"]) == (403, "Logins of this issuer cannot be linked")
    assert "WWW-Authenticate" not in headers
    status, body, _ = await linking.link(bank, linking.social_login(unique("g"), client_id="another-app"))
    assert (status, body["error_description"]) == (403, "Both logins must come from the same client")
    # max_links = 3: the bank login and two social logins, then no more (and nothing half-written)
    assert (await linking.link(bank, linking.social_login(unique("g"))))[0] == 201
    assert (await linking.link(bank, linking.social_login(unique("g"))))[0] == 201
    fourth = unique("g")
    status, body, _ = await linking.link(bank, linking.social_login(fourth))
    assert (status, body["error_description"]) == (403, "The account has the most logins allowed")
    assert len((await linking.request("GET", LINKS, bank))[1]["logins"]) == 3
    assert (await linking.request("GET", f"/accounts/{john}/data", linking.social_login(fourth)))[0] == 403


async def test_another_accounts_login_and_the_own_login_are_409(linking: Deployment) -> None:
    john, jane, google = unique("john"), unique("jane"), unique("google")
    assert (await linking.link(linking.bank_login(john), linking.social_login(google)))[0] == 201
    status, body, headers = await linking.link(linking.bank_login(jane), linking.social_login(google))
    assert (status, body["error"]) == (409, "conflict") and "WWW-Authenticate" not in headers
    security = [e for e in linking.events("ztmw.security") if e["reason"] == "link_conflict"]
    assert len(security) == 1 and google not in str(security)
    # jane's bank login was not recorded by the refused attempt: it owns nothing it did not own
    assert (await linking.request("GET", LINKS, linking.bank_login(jane)))[1]["logins"] == []
    status, body, _ = await linking.link(linking.bank_login(john), linking.bank_login(john))
    assert (status, body["error_description"]) == (409, "The current login cannot be linked to itself")


async def test_another_issuers_user_with_the_same_sub_cannot_walk_into_an_account(linking: Deployment) -> None:
    sam = unique("sam")
    assert (await linking.link(linking.bank_login(sam), linking.social_login(unique("g"))))[0] == 201
    # a social user whose sub is "sam" too, strong enough to link (AAL 2), founds no account named "sam":
    # that account exists and this login is none of its logins
    impostor = linking.social.mint(sam, acr=BANKID, auth_time=time.time() - 5)
    status, body, _ = await linking.link(impostor, linking.social_login(unique("g")))
    assert (status, body["error"]) == (409, "conflict")
    assert body["error_description"] == "An account with this id exists and the current login is not one of its logins"
    assert (await linking.request("GET", f"/accounts/{sam}/data", impostor))[0] == 403
    assert len((await linking.request("GET", LINKS, linking.bank_login(sam)))[1]["logins"]) == 2


async def test_concurrent_double_link_leaves_exactly_one_link(tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    for kind in ("sqlite", "redis"):
        redis_url = request.getfixturevalue("redis_url") if kind == "redis" else None
        (tmp_path / kind).mkdir()
        async with deployment(kind, tmp_path / kind, redis_url=redis_url, replicas=2) as linking:
            google = unique("google")
            owners = [unique("owner") for _ in range(24)]
            attempts = [linking.link(linking.bank_login(owner), linking.social_login(google), replica=i % 2)
                        for i, owner in enumerate(owners)]
            results = await asyncio.gather(*attempts)
            statuses = sorted(status for status, _, _ in results)
            assert statuses == [201] + [409] * (len(owners) - 1), kind
            winner = next(body["account"] for status, body, _ in results if status == 201)
            for i, owner in enumerate(owners):  # only the winner owns the data, on either replica
                expected = 200 if owner == winner else 403
                assert (await linking.request("GET", f"/accounts/{owner}/data", linking.social_login(google),
                                              replica=i % 2))[0] == expected
            for owner in owners:  # the losers' own logins were not recorded either
                logins = (await linking.request("GET", LINKS, linking.bank_login(owner)))[1]["logins"]
                assert len(logins) == (2 if owner == winner else 0)


async def test_unlink_takes_effect_on_the_very_next_request(linking: Deployment) -> None:
    john, google = unique("john"), unique("google")
    bank = linking.bank_login(john)
    assert (await linking.link(bank, linking.social_login(google)))[0] == 201
    social = linking.social_login(google)
    assert (await linking.request("GET", f"/accounts/{john}/data", social))[0] == 200
    target = {"issuer": linking.social.issuer, "subject": google}
    # a weak or stale login cannot unlink; the social login cannot unlink the bank login's account from
    # under it either (it is AAL 1), and no login can unlink itself
    status, _, headers = await linking.request("DELETE", LINKS, social, body=target)
    assert status == 401 and bearer_error(headers)["error"] == "insufficient_user_authentication"
    status, _, headers = await linking.request("DELETE", LINKS, linking.bank_login(john, age=3600), body=target)
    assert status == 401 and bearer_error(headers)["max_age"] == "300"
    status, body, _ = await linking.request("DELETE", LINKS, bank,
                                            body={"issuer": linking.bank.issuer, "subject": john})
    assert (status, body["error_description"]) == (409, "The current login cannot unlink itself")
    status, _, _ = await linking.request("DELETE", LINKS, bank, body={"issuer": target["issuer"]})
    assert status == 400
    status, body, _ = await linking.request("DELETE", LINKS, bank, body=target)
    assert (status, body) == (200, {"account": john, **target})
    # the very next request of the social login: it no longer owns the account
    assert (await linking.request("GET", f"/accounts/{john}/data", social))[0] == 403
    status, body, _ = await linking.request("DELETE", LINKS, bank, body=target)
    assert (status, body["error"]) == (404, "not_found")
    # another account's login cannot be unlinked from here
    jane, jane_google = unique("jane"), unique("google")
    assert (await linking.link(linking.bank_login(jane), linking.social_login(jane_google)))[0] == 201
    status, _, _ = await linking.request("DELETE", LINKS, bank,
                                         body={"issuer": linking.social.issuer, "subject": jane_google})
    assert status == 404
    assert (await linking.request("GET", f"/accounts/{jane}/data", linking.social_login(jane_google)))[0] == 200
    assert len(linking.events("ztmw.identity_unlinked")) == 1


async def test_a_linked_login_owns_the_account_but_never_inherits_its_assurance(linking: Deployment) -> None:
    john, google = unique("john"), unique("google")
    assert (await linking.link(linking.bank_login(john), linking.social_login(google)))[0] == 201
    social = linking.social_login(google)
    assert (await linking.request("GET", f"/accounts/{john}/data", social))[0] == 200
    status, _, headers = await linking.request("POST", f"/accounts/{john}/payments", social)
    challenge = bearer_error(headers)
    assert status == 401 and challenge["error"] == "insufficient_user_authentication"
    assert challenge["acr_values"] == BANKID
    # the bank login of the same account satisfies the same route, but only while its own login is fresh
    assert (await linking.request("POST", f"/accounts/{john}/payments", linking.bank_login(john)))[0] == 201
    stale = linking.bank_login(john, age=3600)
    status, _, headers = await linking.request("POST", f"/accounts/{john}/payments", stale)
    assert status == 401 and bearer_error(headers)["max_age"] == "300"


async def test_a_dpop_bound_link_token_needs_the_key_this_request_proves(linking: Deployment) -> None:
    john = unique("john")
    key, other_key = DPoPKey(), DPoPKey()
    current = linking.bank_login(john, cnf={"jkt": key.thumbprint})
    # bound to another key than the one this request proves: refused
    bound_elsewhere = linking.social_login(unique("g"), cnf={"jkt": other_key.thumbprint})
    status, body, _ = await linking.link(current, bound_elsewhere, dpop=key)
    assert (status, body["error"]) == (401, "invalid_token")
    # a bound link token with a bearer current login (nothing proven): refused
    status, _, _ = await linking.link(linking.bank_login(unique("john")), bound_elsewhere)
    assert status == 401
    # bound to the very key this request proves: no second proof needed
    google = unique("google")
    status, body, _ = await linking.link(current, linking.social_login(google, cnf={"jkt": key.thumbprint}),
                                         dpop=key)
    assert (status, body["subject"]) == (201, google)


async def test_credentials_are_required_on_the_ceremony(linking: Deployment) -> None:
    status, _, headers = await linking.request("GET", LINKS, None)
    assert status == 401 and "Bearer" in challenges_of(headers)
    status, _, _ = await linking.request("PUT", LINKS, linking.bank_login(unique("john")))
    assert status == 405


async def test_a_locked_sqlite_store_is_503_and_writes_nothing(tmp_path: Path) -> None:
    """Another writer holds the file longer than the busy timeout: the ceremony answers 503, never 500."""
    async with deployment("sqlite", tmp_path) as linking:
        john, google = unique("john"), unique("google")
        path = linking.store[len("sqlite:///"):]
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            status, body, headers = await linking.link(linking.bank_login(john), linking.social_login(google))
            assert (status, body["error"]) == (503, "temporarily_unavailable")
            assert "WWW-Authenticate" not in headers
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert (await linking.request("GET", LINKS, linking.bank_login(john)))[1]["logins"] == []
        assert (await linking.request("GET", f"/accounts/{john}/data", linking.social_login(google)))[0] == 403


@pytest.mark.redis
async def test_an_unreachable_store_is_503_never_a_guess(tmp_path: Path) -> None:
    async with deployment("redis", tmp_path, store="redis://127.0.0.1:1/0") as linking:
        bank = linking.bank_login(unique("john"))
        assert (await linking.request("GET", LINKS, bank))[0] == 503
        assert (await linking.link(bank, linking.social_login(unique("g"))))[0] == 503
        assert (await linking.request("GET", "/accounts/x/data", bank))[0] == 503
