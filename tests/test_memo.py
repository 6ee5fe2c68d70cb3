"""The decision memo: a repeated bearer request is answered from memory, and never when that could be wrong.

Every test drives a real aiohttp server with real tokens; "served from the memo" is observed through
`pipeline.memo` (its size) and the audit trail, "refused anyway" through the response on the wire. Wherever
the memo could plausibly diverge from the full pipeline (header spellings, routes and paths, the clock and the
verification cache, introspection, identity, plugins, what the handler and the audit trail see), a test pins
that a replay gets exactly what the full pipeline gives; test_memo_key does the same for odd request bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

import ztmw
from ztmw.errors import ConfigurationError
from ztmw.testing import DevIssuer, DPoPKey, FakeClock

from .conftest import (
    OPAQUE_ISSUER,
    base_config,
    call,
    decisions,
    echo_app,
    echo_config,
    introspection_endpoint,
    memo_size,
    protected,
    raw,
    raw_get,
    staged_app,
    warm,
    whoami_app,
    with_query,
)

pytestmark = pytest.mark.usefixtures("decision_path")  # decided without awaiting, and in full


async def test_the_second_sighting_is_remembered_and_replayed_with_the_same_answer(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint("ann", scope="items:read", acr="urn:ztmw:acr:mfa")
    with capture_logs() as logs:
        first = await call(client, token)
        assert memo_size(pipeline) == 0  # a first sighting is never remembered
        second = await call(client, token)
        assert memo_size(pipeline) == 1
        replayed = [await call(client, token) for _ in range(3)]
    assert first == second
    assert replayed == [first] * 3  # same status, and the handler saw the same principal, trust and rule
    assert first[1]["sub"] == "ann" and first[1]["rule"] == "read"
    decisions = [e for e in logs if e["event"] == "ztmw.decision"]
    assert [e["cache"] for e in decisions] == ["miss", "hit", "hit", "hit", "hit"]  # one event per request
    assert {e["decision"] for e in decisions} == {"allow"} and {e["status"] for e in decisions} == {200}


async def test_refusals_are_never_remembered(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="other:read")
    assert [(await call(client, token))[0] for _ in range(4)] == [403] * 4
    assert memo_size(pipeline) == 0


async def test_an_owner_rule_is_decided_per_path(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint("ann", scope="items:read")
    assert [(await call(client, token, "/users/ann/items"))[0] for _ in range(3)] == [200] * 3
    assert memo_size(pipeline) == 1
    assert [(await call(client, token, "/users/bob/items"))[0] for _ in range(3)] == [403] * 3


async def test_replay_ends_when_the_token_leaves_the_verification_cache_at_exp(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read", lifetime=40)
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    clock.advance(40)  # at exp: the cache entry is gone, so is the memo entry; within leeway it verifies anew
    with capture_logs() as logs:
        assert (await call(client, token))[0] == 200
    assert [e["cache"] for e in logs if e["event"] == "ztmw.decision"] == ["miss"]
    assert memo_size(pipeline) == 0
    clock.advance(31)  # past exp + leeway
    assert (await call(client, token))[0] == 401


async def test_replay_ends_with_cache_max_ttl(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, cache={"max_ttl": 60}), clock)
    token = issuer.mint(scope="items:read", lifetime=3600)
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    clock.advance(61)
    with capture_logs() as logs:
        assert (await call(client, token))[0] == 200
    assert [e["cache"] for e in logs if e["event"] == "ztmw.decision"] == ["miss"]  # verified again
    assert memo_size(pipeline) == 0


async def test_replay_ends_when_the_key_leaves_the_jwks(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    old = issuer.mint(scope="items:read", lifetime=3600)
    assert [(await call(client, old))[0] for _ in range(3)] == [200] * 3
    assert memo_size(pipeline) == 1
    issuer.rotate_key()
    clock.advance(31)  # past the refetch cooldown
    assert (await call(client, issuer.mint(scope="items:read")))[0] == 200  # unknown kid -> refetch: old key gone
    assert (await call(client, old))[0] == 401
    assert memo_size(pipeline) == 0


async def test_two_authorization_headers_are_refused_even_after_a_replay(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    from multidict import CIMultiDict

    headers = CIMultiDict([("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")])
    async with client.get("/items", headers=headers) as response:
        assert response.status == 400


async def test_a_query_token_beside_the_header_is_refused_even_after_a_replay(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    assert (await call(client, token, f"/items?access_token={token}"))[0] == 400


async def test_a_dpop_header_always_takes_the_full_path(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}),
                                       clock)
    key = DPoPKey()
    bound = issuer.mint(scope="items:read", cnf={"jkt": key.thumbprint})
    url = f"{pipeline.config.resource.public_origin}/items"
    for _ in range(3):  # a fresh proof each time; the bound token is never remembered
        proof = key.proof("GET", url, access_token=bound, iat=clock())
        assert (await call(client, None, Authorization=f"DPoP {bound}", DPoP=proof))[0] == 200
    assert memo_size(pipeline) == 0
    # the bound token sent as a plain bearer token is a downgrade, whatever is remembered for other tokens
    plain = issuer.mint(scope="items:read")
    assert [(await call(client, plain))[0] for _ in range(3)] == [200] * 3
    assert (await call(client, bound))[0] == 401


async def test_a_token_with_auth_time_is_replayed_with_its_current_age(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read", auth_time=clock() - 10)
    with capture_logs() as logs:
        assert [(await call(client, token))[0] for _ in range(2)] == [200] * 2
        assert memo_size(pipeline) == 1  # remembered like any plain bearer token
        clock.advance(100)
        status, body = await call(client, token)
    assert status == 200 and body["auth_age"] == 110  # trust evaluated against the clock, not replayed stale
    decisions = [e for e in logs if e["event"] == "ztmw.decision"]
    assert [e["cache"] for e in decisions] == ["miss", "hit", "hit"]
    assert "auth_age=110s" in decisions[-1]["trust_inputs"]  # the audit trail records the age of this request


async def test_max_auth_age_holds_for_a_remembered_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """STEP-04: the memo replays an allowed decision only while the login is still fresh enough."""
    config = base_config(issuer)
    config["rules"][1]["max_auth_age"] = 300
    client, pipeline = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read", auth_time=clock() - 10)
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    assert memo_size(pipeline) == 1
    clock.advance(295)  # 305 s since the login
    async with client.get("/items", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 401
        assert 'error="insufficient_user_authentication"' in response.headers["WWW-Authenticate"]
        assert 'max_age="300"' in response.headers["WWW-Authenticate"]
    assert (await call(client, token))[0] == 401  # and again: a stale entry never allows


async def test_rules_with_conditions_are_never_remembered(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = base_config(issuer)
    config["rules"][1]["conditions"] = ["network"]
    config["plugins"] = {"network": {"allow": ["127.0.0.0/8"]}}
    client, pipeline = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read")
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    assert memo_size(pipeline) == 0


@pytest.mark.parametrize("sections", [
    pytest.param({"trust": {"evaluators": ["mapping", "ip-reputation"]},
                  "plugins": {"ip-reputation": {"deny": ["192.0.2.0/24"]}}}, id="evaluator-reading-the-peer"),
    pytest.param({"verifiers": {"enabled": ["bearer", "mtls"]}}, id="mtls"),
])
async def test_no_memo_when_a_stage_may_depend_on_the_request(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, sections: dict[str, Any]
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, **sections), clock)
    assert pipeline.memo is None
    token = issuer.mint(scope="items:read")
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3


async def test_memo_entries_zero_turns_the_memo_off(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, cache={"memo_entries": 0}), clock)
    assert pipeline.memo is None
    token = issuer.mint(scope="items:read")
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3


async def test_the_memo_is_bounded(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, cache={"memo_entries": 2}), clock)
    tokens = [issuer.mint(f"user{i}", scope="items:read") for i in range(4)]
    for token in tokens:
        assert [(await call(client, token))[0] for _ in range(2)] == [200] * 2
    assert memo_size(pipeline) <= 2


async def test_sec_03_the_memo_holds_no_token(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    assert [(await call(client, token))[0] for _ in range(2)] == [200] * 2
    assert memo_size(pipeline) == 1
    dumped = repr(pipeline.memo._entries)  # type: ignore[union-attr]
    for part in (token, *token.split(".")):
        assert part not in dumped


def window_around(now: float, *, minutes: int = 1) -> dict[str, str]:
    """A `time-window` (UTC, every day) open at `now` and shut again `minutes` + 2 minutes later."""
    minute = int(now // 60) % (24 * 60)
    start, end = (minute - minutes) % 1440, (minute + minutes) % 1440
    return {"start": f"{start // 60:02d}:{start % 60:02d}", "end": f"{end // 60:02d}:{end % 60:02d}"}


# -- reserved rule ids, a failing trust check, query tokens, spellings of one token --------------------------

async def test_a_user_rule_cannot_take_the_metadata_rule_id(issuer: DevIssuer, clock: FakeClock) -> None:
    """The memo trusts rule ids to name one rule: ztmw's own ids ("ztmw-metadata") are reserved."""
    config = base_config(issuer, plugins={"time-window": window_around(clock())})
    config["rules"][1]["id"] = "ztmw-metadata"
    config["rules"][1]["conditions"] = ["time-window"]
    with pytest.raises(ConfigurationError, match="reserved"):
        ztmw.setup(whoami_app(), config, clock=clock)


async def test_sec_07_a_still_trusted_check_that_raises_is_a_401_on_replay_too(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ztmw_plugins.jwks import KeySet

    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)

    def broken(self: Any, thumbprint: str) -> bool:
        raise RuntimeError("key set bug")

    monkeypatch.setattr(KeySet, "publishes", broken)
    with capture_logs():
        assert (await call(client, token, Authorization=f"bearer {token}"))[0] == 401  # the full pipeline
        # the replay asks the verifier once its keys changed: a new key, fetched for a token that names it
        new_kid = issuer.add_key("ES256")
        clock.advance(31)  # past the refetch cooldown
        assert (await call(client, issuer.mint("bob", scope="items:read", key=new_kid)))[0] == 200  # a miss: not asked
        assert (await call(client, token))[0] == 401  # the replay (once a 500)


ENCODED_QUERY_TOKEN_NAMES = ["access%5Ftoken", "access%5ftoken", "%61ccess_token", "access_t%6Fken"]


@pytest.mark.parametrize("name", ENCODED_QUERY_TOKEN_NAMES)
async def test_http_06_a_percent_encoded_query_token_beside_the_header_is_refused(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, name: str
) -> None:
    client, _ = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    assert await raw(client, with_query(f"{name}={token}", token)) == 400


@pytest.mark.parametrize("name", ENCODED_QUERY_TOKEN_NAMES)
async def test_http_06_a_percent_encoded_query_token_is_refused_after_a_replay_too(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, name: str
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)
    assert await raw(client, with_query(f"{name}={token}", token)) == 400


async def test_one_token_cannot_fill_the_memo_with_spellings_of_itself(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)
    for spaces in range(1, 65):  # one request each: every one of them is a cache hit, and remembered
        assert (await call(client, Authorization="Bearer" + " " * (spaces + 1) + token))[0] == 200
    assert memo_size(pipeline) <= 8


# -- header forms ------------------------------------------------------------------------

async def test_each_spelling_of_the_header_is_decided_in_full_once_and_then_replayed_alike(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    runs = full_runs(pipeline)
    token = issuer.mint("ann", scope="items:read")
    spellings = [f"Bearer {token}", f"bearer {token}", f"BEARER {token}", f"Bearer    {token}", f"bEaReR  {token}"]
    answers = []
    for value in spellings:
        answers += [await call(client, Authorization=value) for _ in range(3)]
    assert answers == [(200, {"sub": "ann", "aal": 0, "rule": "read"})] * 15
    # the canonical spelling: a miss and a hit in full, then a replay; every other spelling: in full each time
    assert len(runs) == 2 + 3 * (len(spellings) - 1) and memo_size(pipeline) == 1


@pytest.mark.parametrize("headers", [
    pytest.param(b"Authorization: Bearer {t}\r\nauthorization: Bearer {t}\r\n", id="second-in-lower-case"),
    pytest.param(b"Authorization: Bearer {t}\r\nAUTHORIZATION: Basic Zm9vOmJhcg==\r\n", id="second-other-scheme"),
    pytest.param(b"Authorization: Bearer {t}\r\nAuthorization: \r\n", id="second-empty"),
    pytest.param(b"Authorization:\r\nAuthorization: Bearer {t}\r\n", id="first-empty"),
])
async def test_a_second_authorization_field_in_any_spelling_is_refused_after_a_replay(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, headers: bytes
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    request = raw_get("/items", headers.replace(b"{t}", token.encode()))
    cold = await raw(client, request)
    await warm(client, pipeline, token)
    assert cold == await raw(client, request) == 400


@pytest.mark.parametrize("value", [
    pytest.param(b"Bearer\t{t}", id="tab-after-scheme"),
    pytest.param(b"Bearer\r\n {t}", id="obs-fold"),
    pytest.param(b"Bearer {t}\r\n x", id="obs-fold-after-token"),
    pytest.param(b"Bearer {t}\xff", id="invalid-utf-8"),
    pytest.param(b"Bearer \xed\xb3\xbf{t}", id="encoded-surrogate"),
    pytest.param(b"Bearer {t}{t}", id="token-twice"),
    pytest.param(b"Bearer", id="scheme-only"),
    pytest.param(b"", id="empty"),
    pytest.param(b"Bearer {t} x", id="trailing-junk"),
])
async def test_odd_header_values_get_the_same_refusal_cold_and_warm_never_a_500(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, value: bytes
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    request = raw_get("/items", b"Authorization: " + value.replace(b"{t}", token.encode()) + b"\r\n")
    cold = await raw(client, request)
    await warm(client, pipeline, token)
    assert [await raw(client, request) for _ in range(3)] == [cold] * 3
    assert cold in (400, 401)


async def test_trailing_whitespace_is_the_same_header_value(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    """The HTTP parser strips optional whitespace around a field value: the memo keys what the pipeline reads."""
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    for padding in (b" ", b"\t", b" \t "):
        request = raw_get("/items", b"Authorization:" + padding + b"Bearer " + token.encode() + padding + b"\r\n")
        assert await raw(client, request) == 200
    assert runs == [] and memo_size(pipeline) == 1


async def test_a_spelling_over_max_credential_bytes_is_refused_beside_a_remembered_one(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, limits={"max_credential_bytes": 1024}),
                                       clock)
    token = issuer.mint(scope="items:read", claims={"pad": "x" * 400})
    assert 700 < len(f"Bearer {token}") <= 1024
    await warm(client, pipeline, token)
    padded = "Bearer" + " " * (1025 - len(token) - len("Bearer")) + token
    assert len(padded) == 1025
    assert [(await call(client, Authorization=padded))[0] for _ in range(3)] == [400] * 3
    assert (await call(client, token))[0] == 200


@pytest.mark.parametrize("name", ["DPoP", "dpop", "DPOP"])
async def test_a_dpop_field_in_any_spelling_takes_the_full_pipeline(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any, name: str
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}),
                                       clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    request = raw_get("/items", f"Authorization: Bearer {token}\r\n{name}: x.y.z\r\n".encode())
    cold_like = await raw(client, request)
    assert runs == [1] and cold_like == 200  # a bearer token ignores the stray proof, as without the memo
    assert memo_size(pipeline) == 1


@pytest.mark.parametrize("query", ["access_token=x", "a=1&access_token=", "access_token", "x=access_token"])
async def test_a_raw_query_naming_access_token_takes_the_full_pipeline(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any, query: str
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    cold = await raw(client, with_query(query, token))
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    assert await raw(client, with_query(query, token)) == cold
    assert runs == ([] if query == "x=access_token" else [1])  # a value that merely reads access_token replays
    assert cold == (200 if query == "x=access_token" else 400)


async def test_an_unrelated_query_does_not_change_the_answer(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    for query in ("page=2", "ACCESS_TOKEN=x", "token=x"):
        assert await raw(client, with_query(query, token)) == 200
    assert runs == []  # the query is not part of the key: nothing in the pipeline reads it but access_token


# -- routes, methods, paths --------------------------------------------------------------

@pytest.mark.parametrize("target", ["http://x/items", "/items#frag", "/it%65ms"])
async def test_a_target_spelled_otherwise_than_a_plain_path_takes_the_full_pipeline(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any, target: str
) -> None:
    """The memo keys on the request target as sent: an absolute-form target, a fragment or percent-encoding
    is another spelling of a path, decided in full every time (and never remembered under its spelling)."""
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    request = raw_get(target, f"Authorization: Bearer {token}\r\n".encode("ascii"))
    cold = await raw(client, request)
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    assert [await raw(client, request) for _ in range(2)] == [cold] * 2
    assert runs == [1, 1] and memo_size(pipeline) == 1



async def test_head_is_its_own_route_and_decided_in_full(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    assert [(await call(client, token, method="HEAD"))[0] for _ in range(3)] == [200] * 3
    assert runs == [1] and memo_size(pipeline) == 2  # the HEAD route has its own entry
    assert (await call(client, issuer.mint(scope="other"), method="HEAD"))[0] == 403


async def test_a_star_route_is_decided_per_method(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    async def any_method(request: web.Request) -> web.Response:
        return web.json_response({"method": request.method})

    app = web.Application()
    app.router.add_route("*", "/items", any_method)
    config = base_config(issuer)
    config["rules"].append({"id": "write", "path": "/items", "methods": ["POST"], "scopes": ["items:write"]})
    client, pipeline = await protected(aiohttp_client, config, clock, app)
    reader = issuer.mint(scope="items:read")
    await warm(client, pipeline, reader)
    assert [(await call(client, reader, method="POST"))[0] for _ in range(3)] == [403] * 3
    assert [(await call(client, reader, method="DELETE"))[0] for _ in range(3)] == [403] * 3  # no rule
    writer = issuer.mint(scope="items:write")
    assert [(await call(client, writer, method="POST"))[0] for _ in range(3)] == [200] * 3
    assert [(await call(client, writer, method="GET"))[0] for _ in range(3)] == [403] * 3


async def test_host_based_sub_apps_with_different_rules_share_no_entry(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """The same raw path on two hosts resolves to two routes (and here two rules): the route is in the key."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"rule": request[ztmw.DECISION].rule_id})

    shop, admin = web.Application(), web.Application()
    shop.router.add_get("/items", ok)
    admin.router.add_get("/{page}", ok)
    app = web.Application()
    app.add_domain("shop.example", shop)
    app.add_domain("admin.example", admin)
    config = base_config(issuer)
    config["rules"].append({"id": "admin", "path": "/{page}", "methods": ["GET"], "scopes": ["admin"]})
    client, pipeline = await protected(aiohttp_client, config, clock, app)
    token = issuer.mint(scope="items:read")
    for _ in range(3):
        assert (await call(client, token, Host="shop.example")) == (200, {"rule": "read"})
    assert memo_size(pipeline) == 1
    assert [(await call(client, token, Host="admin.example"))[0] for _ in range(3)] == [403] * 3
    assert [(await call(client, token, Host="other.example"))[0] for _ in range(3)] == [404] * 3


async def test_a_prefixed_sub_app_keeps_owner_rules_per_path(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    app = web.Application()
    app.add_subapp("/v1", whoami_app())
    config = base_config(issuer)
    config["rules"] = [{**rule, "path": "/v1" + rule["path"]} for rule in config["rules"]]
    client, pipeline = await protected(aiohttp_client, config, clock, app)
    ann = issuer.mint("ann", scope="items:read")
    assert [(await call(client, ann, "/v1/users/ann/items"))[0] for _ in range(3)] == [200] * 3
    assert memo_size(pipeline) == 1
    assert [(await call(client, ann, "/v1/users/bob/items"))[0] for _ in range(3)] == [403] * 3


@pytest.mark.parametrize(("path", "status"), [
    ("/users/%61nn/items", 200),  # decodes to ann
    ("/users/%62ob/items", 403),  # decodes to bob
    ("/users/ann%2F/items", 403),  # the owner is "ann/", not ann
    ("/users/an%6E/items", 200),
    ("/users/ANN/items", 403),
    ("/users/ann%20/items", 403),
])
async def test_owner_rules_on_percent_encoded_paths_answer_alike_cold_and_warm(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, path: str, status: int
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    ann = issuer.mint("ann", scope="items:read")
    request = raw_get(path, f"Authorization: Bearer {ann}\r\n".encode())
    cold = await raw(client, request)
    await warm(client, pipeline, ann, "/users/ann/items")
    assert [await raw(client, request) for _ in range(3)] == [cold] * 3
    assert cold == status


async def test_public_and_metadata_routes_replay_their_own_rule(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint("ann", scope="nothing")
    assert [await call(client, token, "/health") for _ in range(3)] == [(200, {"sub": "ann", "aal": 0,
                                                                              "rule": "health"})] * 3
    metadata = pipeline.config.metadata_path
    answers = [await call(client, token, metadata) for _ in range(3)]
    assert {status for status, _ in answers} == {200} and answers[0][1]["resource"] == pipeline.config.resource.identifier
    assert answers[0] == answers[1] == answers[2]
    assert memo_size(pipeline) == 2
    # a refused token on a public route is refused whatever is remembered for valid ones
    expired = issuer.mint("ann", lifetime=-120)
    assert [(await call(client, expired, "/health"))[0] for _ in range(3)] == [401] * 3
    assert (await call(client, None, "/health"))[0] == 200  # anonymous: no key, the full pipeline


# -- the clock and the verification cache ------------------------------------------------

@pytest.mark.parametrize("leeway", [0, 30])
async def test_replays_stop_exactly_where_the_full_pipeline_stops_at_exp(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any, leeway: int
) -> None:
    config = base_config(issuer)
    config["issuers"][0]["leeway"] = leeway
    client, pipeline = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read", lifetime=100)
    exp = int(clock()) + 100
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    clock.now = exp - 0.001  # the last instant the cache entry stands: a replay, and the right answer
    assert (await call(client, token))[0] == 200 and runs == []
    clock.now = exp  # the cache entry (and so the memo entry) ends at exp; within leeway: verified anew
    assert (await call(client, token))[0] == (200 if leeway else 401) and runs == [1]
    assert memo_size(pipeline) == 0
    clock.now = exp + leeway
    assert [(await call(client, token))[0] for _ in range(3)] == [401] * 3


async def test_no_memo_entry_outlives_max_ttl_even_with_steady_traffic(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, cache={"max_ttl": 60}), clock)
    token = issuer.mint(scope="items:read", lifetime=3600)
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    for _ in range(59):  # replays do not extend the entry under them
        clock.advance(1)
        assert (await call(client, token))[0] == 200
    assert runs == []
    clock.advance(1.5)
    assert (await call(client, token))[0] == 200 and runs == [1]  # verified afresh


async def test_max_entries_zero_remembers_nothing(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, cache={"max_entries": 0}), clock)
    token = issuer.mint("ann", scope="items:read")
    assert [(await call(client, token))[0] for _ in range(4)] == [200] * 4
    assert [(await call(client, token, "/users/bob/items"))[0] for _ in range(2)] == [403] * 2
    assert memo_size(pipeline) == 0


async def test_eviction_from_a_small_verification_cache_ends_the_replay(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, cache={"max_entries": 1}), clock)
    first, second = issuer.mint("ann", scope="items:read"), issuer.mint("bob", scope="items:read")
    await warm(client, pipeline, first)
    assert (await call(client, second))[0] == 200  # evicts `first` from the verification cache
    runs = full_runs(pipeline)
    assert (await call(client, first))[1]["sub"] == "ann" and runs == [1]  # not replayed: verified again


async def test_a_bad_token_is_refused_next_to_a_remembered_good_one(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer, cache={"negative_ttl": 30}), clock)
    token = issuer.mint(scope="items:read")
    await warm(client, pipeline, token)
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    assert [(await call(client, forged))[0] for _ in range(3)] == [401] * 3  # the last two from the negative cache
    assert [(await call(client, token))[0] for _ in range(2)] == [200] * 2
    assert memo_size(pipeline) == 1


async def test_a_key_replaced_under_the_same_kid_ends_the_replay(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """still_trusted compares key material, not kids: a new key published under the old kid trusts nothing
    the old key verified, remembered or not."""
    from ztmw.testing.issuer import _generate, _SigningKey

    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read", lifetime=3600)
    await warm(client, pipeline, token)
    kid = issuer.kid
    replacement = _SigningKey(kid=kid, algorithm=issuer.algorithm, key=_generate(issuer.algorithm).key)
    issuer._keys[kid] = issuer._primary = replacement  # the same kid, other key material
    clock.advance(31)  # past the refetch cooldown
    assert (await call(client, token))[0] == 200  # the resource server has not seen the new JWKS yet
    assert (await call(client, issuer.mint(scope="items:read", header={"kid": "unknown"})))[0] == 401  # refetch
    assert issuer.jwks()["keys"][0]["kid"] == kid
    assert [(await call(client, token))[0] for _ in range(3)] == [401] * 3
    assert memo_size(pipeline) == 0


# -- introspection, the shared cache, identity -------------------------------------------

INTROSPECTION_ISSUER = OPAQUE_ISSUER


async def introspecting(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch, clock: Any,
                        issuer: DevIssuer, **cache: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The loopback RFC 7662 endpoint (conftest) and a config that verifies through it, with `cache`."""
    answers, settings = await introspection_endpoint(aiohttp_server, monkeypatch, "ZTMW_TEST_MEMO_INTROSPECTION")
    config = base_config(issuer, verifiers={"enabled": ["bearer", "introspection"]}, cache=cache)
    config["plugins"] = {"introspection": settings}
    return answers, config


def active_answer(clock: Any, lifetime: float = 3600) -> dict[str, Any]:
    return {"active": True, "sub": "alice", "aud": "https://api.example.com", "iss": INTROSPECTION_ISSUER,
            "exp": int(clock()) + lifetime, "scope": "items:read"}


async def test_a_revoked_introspected_token_is_replayed_no_longer_than_the_full_pipeline_accepts_it(
    aiohttp_client: Any, aiohttp_server: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    answers, config = await introspecting(aiohttp_server, monkeypatch, clock, issuer, max_ttl=60)
    client, pipeline = await protected(aiohttp_client, config, clock)
    answers["opaque-1"] = active_answer(clock)
    await warm(client, pipeline, "opaque-1")
    answers["opaque-1"] = {"active": False}  # revoked at the AS
    clock.advance(30)  # RFC 7662 §4's trade-off: both paths keep the cached result until max_ttl
    assert (await call(client, Authorization="bearer opaque-1"))[0] == 200  # the full pipeline
    assert (await call(client, "opaque-1"))[0] == 200  # the replay
    clock.advance(31)
    runs = full_runs(pipeline)
    assert [(await call(client, "opaque-1"))[0] for _ in range(3)] == [401] * 3
    assert runs == [1, 1, 1]  # (the other spelling's stale entry goes when that spelling comes back)


@pytest.mark.redis
async def test_a_replica_remembers_only_its_own_cache_hits(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZTMW_CACHE_SECRET", "test-cache-secret-0123456789")
    config = base_config(issuer, cache={"backend": redis_url})
    first, first_pipeline = await protected(aiohttp_client, config, clock)
    second, second_pipeline = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read")
    with capture_logs() as logs:
        assert (await call(first, token))[0] == 200
        for _ in range(4):
            assert (await call(second, token))[0] == 200
    assert [e["cache"] for e in decisions(logs)] == ["miss", "shared", "hit", "hit", "hit"]
    assert memo_size(first_pipeline) == 0 and memo_size(second_pipeline) == 1


@pytest.mark.redis
async def test_a_shared_result_is_not_replayed_past_max_ttl_after_its_verification(
    aiohttp_client: Any, aiohttp_server: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZTMW_CACHE_SECRET", "test-cache-secret-0123456789")
    answers, config = await introspecting(aiohttp_server, monkeypatch, clock, issuer, backend=redis_url, max_ttl=3)
    token = f"opaque-{clock()}-{id(answers)}"
    answers[token] = active_answer(clock)
    first_app, second_app = whoami_app(), whoami_app()
    ztmw.setup(first_app, config, clock=clock)
    second_pipeline = ztmw.setup(second_app, config, clock=clock)
    first, second = await aiohttp_client(first_app), await aiohttp_client(second_app)
    assert (await call(first, token))[0] == 200  # introspected at t0, shared for max_ttl = 3 s
    answers[token] = {"active": False}  # revoked
    clock.advance(2)
    assert [(await call(second, token))[0] for _ in range(2)] == [200, 200]  # shared, then a hit: remembered
    assert memo_size(second_pipeline) == 1
    clock.advance(1.5)  # t0 + 3.5: max_ttl since the verification is over, on both replicas
    assert (await call(first, token))[0] == 401  # the first replica asks the AS again
    assert (await call(second, token))[0] == 401  # so does the second: its copy ended with the original


async def test_config_identity_links_are_replayed_with_the_linked_account(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    links = [{"issuer": issuer.issuer, "subject": "19800101-1234", "account": "john"}]
    config = base_config(issuer, identity={"links": links, "owner_requires_link": True})
    client, pipeline = await protected(aiohttp_client, config, clock)
    assert pipeline.memo is not None
    linked = issuer.mint("19800101-1234", scope="items:read")
    unlinked = issuer.mint("john", scope="items:read")  # a raw sub that happens to equal the account id
    assert [await call(client, linked, "/users/john/items") for _ in range(3)] == [
        (200, {"sub": "john", "aal": 0, "rule": "own"})] * 3
    assert memo_size(pipeline) == 1
    assert [(await call(client, unlinked, "/users/john/items"))[0] for _ in range(3)] == [403] * 3


@pytest.mark.redis
async def test_the_redis_identity_resolver_turns_the_memo_off_and_link_changes_apply_at_once(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str
) -> None:
    import uuid

    from ztmw_plugins.redis_identity import link

    prefix = f"ztmw-memo-{uuid.uuid4().hex}:"
    config = base_config(issuer, identity={"resolvers": ["config", "redis"]},
                         plugins={"redis": {"url": redis_url, "prefix": prefix}})
    client, pipeline = await protected(aiohttp_client, config, clock)
    assert pipeline.memo is None
    await link(redis_url, issuer.issuer, "login-1", "john", prefix=prefix)
    token = issuer.mint("login-1", scope="items:read")
    assert [(await call(client, token, "/users/john/items"))[0] for _ in range(3)] == [200] * 3
    await link(redis_url, issuer.issuer, "login-1", "jane", prefix=prefix, replace=True)
    assert (await call(client, token, "/users/john/items"))[0] == 403
    assert (await call(client, token, "/users/jane/items"))[0] == 200


# -- plugins and the stage middlewares ---------------------------------------------------

@pytest.mark.parametrize(("sections", "memo_on"), [
    pytest.param({}, True, id="defaults"),
    pytest.param({"trust": {"evaluators": []}}, True, id="no-evaluators"),
    pytest.param({"verifiers": {"enabled": ["bearer", "dpop"]}}, True, id="dpop-decorator-is-memo-safe"),
    pytest.param({"trust": {"evaluators": ["mapping", "raises-at-request"]}}, False, id="evaluator-without-flag"),
    pytest.param({"trust": {"evaluators": ["ip-reputation", "mapping"]},
                  "plugins": {"ip-reputation": {"deny": ["192.0.2.0/24"]}}}, False, id="ip-reputation-first"),
    pytest.param({"identity": {"resolvers": ["config"],
                               "links": [{"issuer": "https://x.example", "subject": "a", "account": "b"}]}},
                 True, id="config-links"),
    pytest.param({"verifiers": {"enabled": ["bearer", "dpop", "mtls"]}}, False, id="mtls"),
])
def test_the_memo_is_on_only_when_every_request_dependent_stage_is_memo_safe(
    issuer: DevIssuer, clock: FakeClock, sections: dict[str, Any], memo_on: bool
) -> None:
    pipeline = ztmw.setup(web.Application(), base_config(issuer, **sections), clock=clock)
    assert (pipeline.memo is not None) is memo_on


async def test_the_ip_reputation_evaluator_answers_per_request(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """The sample evaluator reads the peer: with it the memo is off, so a request whose peer it now denies is
    refused, however often the same token was allowed on the same path before."""
    import ipaddress

    config = base_config(issuer, trust={"evaluators": ["mapping", "ip-reputation"],
                                        "acr": {"urn:example:mfa": {"aal": 2, "ial": 1}}},
                         plugins={"ip-reputation": {"deny": ["192.0.2.0/24"]}})
    config["rules"][1]["min_aal"] = 2
    client, pipeline = await protected(aiohttp_client, config, clock)
    assert pipeline.memo is None
    token = issuer.mint(scope="items:read", acr="urn:example:mfa")
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    (evaluator,) = [p.instance for p in pipeline.plugins if p.name == "ip-reputation"]
    evaluator._deny = (ipaddress.ip_network("127.0.0.0/8"),)  # what a request from a denied peer meets
    assert [(await call(client, token))[0] for _ in range(2)] == [401] * 2  # step-up: aal 0 from here


async def test_the_stage_middlewares_alone_never_use_the_memo(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    pipeline = ztmw.Pipeline(ztmw.load_config(base_config(issuer)), clock=clock)
    client = await aiohttp_client(staged_app(pipeline, whoami_app()))
    ann = issuer.mint("ann", scope="items:read")
    assert [(await call(client, ann, "/users/ann/items"))[0] for _ in range(3)] == [200] * 3
    assert [(await call(client, ann, "/users/bob/items"))[0] for _ in range(3)] == [403] * 3
    assert memo_size(pipeline) == 0


# -- what the handler and the audit trail see --------------------------------------------

def failing_app() -> web.Application:
    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def broken(request: web.Request) -> web.Response:
        raise ValueError("handler bug")

    async def created(request: web.Request) -> web.Response:
        return web.json_response({"sub": request[ztmw.PRINCIPAL].subject}, status=201)

    app = web.Application()
    app.router.add_get("/items", created)
    app.router.add_get("/users/{user}/items", missing)
    app.router.add_get("/health", broken)
    return app


async def test_replayed_audit_events_equal_the_full_pipeline_s_with_the_handler_s_status(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock, failing_app())
    for path, status in (("/items", 201), ("/users/ann/items", 404), ("/health", 500)):
        token = issuer.mint("ann", scope="items:read", acr="urn:ztmw:acr:mfa", amr=["pwd", "otp"])
        with capture_logs() as logs:
            answers = [(await call(client, token, path))[0] for _ in range(4)]
        assert answers == [status] * 4
        events = decisions(logs)
        assert len(events) == 4 and events[0]["cache"] == "miss"
        full, replays = events[1], events[2:]  # the second sighting is decided in full, then remembered
        for event in (full, *replays):
            event.pop("duration_ms")
        assert replays == [full, full] and full["status"] == status and full["decision"] == "allow"
    assert memo_size(pipeline) == 3


async def test_replayed_jsonl_lines_equal_the_full_pipeline_s(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Any
) -> None:
    import json

    from ztmw.audit_chain import verify_file

    target, chained = tmp_path / "audit.jsonl", tmp_path / "chain.jsonl"
    config = base_config(issuer, audit={"sinks": ["jsonl", "chain", "structlog"]},
                         plugins={"jsonl": {"path": str(target), "buffer_bytes": 0},
                                  "chain": {"path": str(chained)}})
    client, pipeline = await protected(aiohttp_client, config, clock, failing_app())
    token = issuer.mint("ann", scope="items:read")
    statuses = []
    for _ in range(4):
        statuses.append((await call(client, token, "/health"))[0])
        clock.advance(1.5)
    assert statuses == [500] * 4 and memo_size(pipeline) == 1
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert len({line.pop("timestamp") for line in lines}) == 4  # each replay is stamped when it happens
    for line in lines:
        line.pop("duration_ms")
    assert len(lines) == 4 and lines[2:] == [lines[1], lines[1]] and lines[1]["status"] == 500
    result = verify_file(chained)
    assert result.ok and result.events == 4  # the hash chain gets a fresh, linked line per replay
    chain = [json.loads(line) for line in chained.read_text().splitlines()]
    assert [line["seq"] for line in chain] == [0, 1, 2, 3] and len({line["ts"] for line in chain}) == 4
    assert {line["status"] for line in chain} == {500} and {line["cache"] for line in chain[1:]} == {"hit"}


async def test_the_handler_sees_the_same_principal_trust_and_decision_on_replays(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request[ztmw.PRINCIPAL], request[ztmw.TRUST], request[ztmw.DECISION]))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/items", record)
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock, app)
    token = issuer.mint("ann", scope="items:read", acr="urn:ztmw:acr:mfa", client_id="c-1")
    for _ in range(4):
        async with client.get("/items", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
    assert seen[1] == seen[2] == seen[3]
    assert seen[0][1:] == seen[1][1:] and seen[0][0].subject == seen[1][0].subject == "ann"


@pytest.mark.parametrize("auth_time", [False, True], ids=["plain", "auth_time"])
async def test_with_audit_off_replays_still_publish_principal_trust_and_decision(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, auth_time: bool
) -> None:
    """Audit off: a replay calls the handler straight from the middleware (or, for a token with auth_time,
    after trust is evaluated again), and the handler still reads what the full pipeline published."""
    seen: list[tuple[Any, Any, Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request[ztmw.PRINCIPAL], request[ztmw.TRUST], request[ztmw.DECISION]))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/items", record)
    config = base_config(issuer, audit={"enabled": False})
    client, pipeline = await protected(aiohttp_client, config, clock, app)
    assert pipeline.audit_sink is None
    extra = {"auth_time": int(clock()) - 10} if auth_time else {}
    token = issuer.mint("ann", scope="items:read", client_id="c-1", **extra)
    for _ in range(4):
        async with client.get("/items", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
    assert memo_size(pipeline) == 1 and len(seen) == 4
    principal, trust, decision = seen[3]
    assert principal.subject == "ann" and principal.token.client_id == "c-1"
    assert decision.allowed and decision.rule_id == seen[0][2].rule_id
    assert trust == seen[0][1]


# -- nothing secret in the memo ----------------------------------------------------------

def strings_in(value: Any, depth: int = 0) -> list[str]:
    """Every string reachable through dataclass fields (repr=False ones too), mappings and sequences."""
    import dataclasses

    if depth > 8:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes):
        return [value.hex()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [s for f in dataclasses.fields(value) for s in strings_in(getattr(value, f.name), depth + 1)]
    if isinstance(value, dict) or hasattr(value, "items") and callable(value.items):
        try:
            items = list(value.items())
        except Exception:
            return []
        return [s for k, v in items for s in strings_in(k, depth + 1) + strings_in(v, depth + 1)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [s for item in value for s in strings_in(item, depth + 1)]
    return []


async def test_where_str_hashing_is_not_siphash_the_memo_keys_on_sha_256(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, full_runs: Any
) -> None:
    """An interpreter whose str hash is not keyed SipHash: the memo key is SHA-256 of the Authorization value,
    and replays work as before."""
    import hashlib

    from ztmw import middleware

    monkeypatch.setattr(middleware, "_SIPHASH", False)
    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3 and runs == []
    [key] = pipeline.memo._entries  # type: ignore[union-attr]
    assert key[3:] == (hashlib.sha256(f"Bearer {token}".encode()).digest(), 0)


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_a_fixed_str_hash_seed_makes_the_memo_key_on_sha_256(seed: str) -> None:
    """PYTHONHASHSEED fixes SipHash's key: the keyed hashes would be anyone's to compute, so SHA-256 it is."""
    import os
    import subprocess
    import sys

    probe = "import ztmw.middleware as m; print(m._SIPHASH)"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    fixed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    env.pop("PYTHONHASHSEED")
    randomised = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert (fixed.stdout.strip(), randomised.stdout.strip()) == ("False", "True")


async def test_no_memo_entry_holds_the_token_or_the_authorization_value(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    import hashlib
    import sys

    client, pipeline = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token, "/users/ann/items")
    entries = pipeline.memo._entries  # type: ignore[union-attr]
    found = strings_in(list(entries.items()))
    assert found  # the walk reaches the entries' fields (claims included)
    for secret in (token, *token.split("."), f"Bearer {token}"):
        assert not any(secret in s for s in found)
        assert secret not in repr(entries)
    # the key holds two keyed hashes of the Authorization value (SipHash, a per-process secret key), nothing
    # an outsider can compute from the token: not the token's SHA-256 (the verification cache's key)
    [key] = entries
    assert key[3:] == (hash(f"Bearer {token}"), hash(f" {token}")) and isinstance(key[3], int)
    assert hashlib.sha256(token.encode()).digest() not in key and sys.hash_info.algorithm.startswith("siphash")
    (entry,) = entries.values()
    assert entry.view.authorization == () and entry.view.dpop == () and entry.view.peer is None
    assert entry.cache_key == hashlib.sha256(token.encode()).digest()


# -- the memo's size: at most memo_entries entries, each about its documented size ---------------------------

def held_chars_per_entry(pipeline: ztmw.Pipeline) -> float:
    """Characters of text the memo holds per entry (keys, views, match info, claims), each string once."""
    entries = pipeline.memo._entries  # type: ignore[union-attr]
    held = {id(s): s for s in strings_in(list(entries.items())) if isinstance(s, str)}
    return sum(len(s) for s in held.values()) / len(entries)


async def test_short_targets_cost_about_what_the_config_documents(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    for index in range(20):
        assert (await call(client, token, f"/files/{index}"))[0] == 200
    assert memo_size(pipeline) == 19  # the first sighting is not remembered
    assert held_chars_per_entry(pipeline) < 1000


async def test_a_long_target_does_not_make_a_memo_entry_many_times_its_documented_size(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    assert (await call(client, token, "/files/warm"))[0] == 200
    for index in range(20):
        assert (await call(client, token, f"/files/{index:04d}" + "a" * 8000))[0] == 200
    assert memo_size(pipeline) == 0 or held_chars_per_entry(pipeline) < 2000


async def test_the_memo_never_holds_more_than_memo_entries_whatever_the_targets(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer, cache={"memo_entries": 8}), clock,
                                       echo_app())
    tokens = [issuer.mint(f"user-{n}", scope="items:read") for n in range(3)]
    for index in range(40):
        token = tokens[index % 3]
        assert (await call(client, token, f"/files/{index}" + "b" * 500))[0] == 200
        assert (await call(client, token, f"/files/{index}?page={index}"))[0] == 200
        assert memo_size(pipeline) <= 8
    assert memo_size(pipeline) == 8
    # first in, first out: the newest entries are the ones kept, and they still replay
    assert (await call(client, tokens[39 % 3], "/files/39?other"))[1]["sub"] == "user-0"


# -- holds() and the verifier's still_trusted, resolved once per entry ---------------------------------------

async def test_the_verifier_is_asked_again_whenever_its_keys_changed(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, full_runs: Any
) -> None:
    """A replay does not ask the verifier while its trust version stands still; once the issuer's keys were
    fetched anew and differ, the next replay asks (once), and a "no longer trusted" sends it to the full path."""
    from ztmw_plugins.jwks import KeySet

    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token)
    (entry,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    bearer = next(p.instance for p in pipeline.plugins if p.name == "bearer")
    assert entry.still_trusted == bearer.still_trusted
    asked: list[bool] = []
    publishes = KeySet.publishes

    def counted(self: Any, thumbprint: str) -> bool:
        asked.append(True)
        return publishes(self, thumbprint)

    async def new_key_set() -> None:  # a token naming a new key: its kid is unknown, so the keys are fetched
        kid = issuer.add_key("ES256")
        clock.advance(31)  # past the refetch cooldown
        version = bearer.trust_version
        assert (await call(client, issuer.mint("bob", scope="items:read", key=kid)))[0] == 200
        assert bearer.trust_version == version + 1

    monkeypatch.setattr(KeySet, "publishes", counted)
    runs = full_runs(pipeline)
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    assert asked == [] and runs == []
    await new_key_set()
    runs.clear()
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    assert len(asked) == 1 and runs == []  # asked by the first replay after the change only
    monkeypatch.setattr(KeySet, "publishes", lambda self, thumbprint: False)  # "no longer trusted"
    await new_key_set()
    runs.clear()
    with capture_logs() as logs:
        assert (await call(client, token))[0] == 200  # the key still verifies it: verified again, in full
    assert runs == [1] and token_memo_entries(pipeline, entry) == 0
    assert [e["cache"] for e in logs if e["event"] == "ztmw.decision"] == ["miss"]


def token_memo_entries(pipeline: ztmw.Pipeline, entry: Any) -> int:
    """How many memo entries stand on the verification-cache entry `entry` stood on."""
    assert pipeline.memo is not None
    return sum(1 for e in pipeline.memo._entries.values() if e.cache_key == entry.cache_key)


def test_a_verifier_that_cannot_version_its_trust_is_asked_on_every_replay(clock: FakeClock) -> None:
    """A verifier with `still_trusted` but no `trust_version` (a third party's): nothing tells the memo when
    its answer may change, so every replay asks it, and the first "no" ends the entry."""
    from ztmw.cache import MemoryVerificationCache
    from ztmw.config import Rule
    from ztmw.memo import DecisionMemo
    from ztmw.models import ANONYMOUS_TRUST, Caller, Decision, Principal, RequestView, VerifiedToken
    from ztmw.pipeline import Outcome

    cache = MemoryVerificationCache(max_entries=10, max_ttl=300, clock=clock)
    token = VerifiedToken(issuer="https://issuer.test", subject="ann", audience=("api",), expires_at=clock() + 60,
                          token_id="t1", verifier="third-party")
    cache.set(b"k" * 32, token)
    answers = [True, True, False]
    asked: list[VerifiedToken] = []

    def still_trusted(verified: VerifiedToken) -> bool:
        asked.append(verified)
        return answers[len(asked) - 1]

    memo = DecisionMemo(rules=[Rule(id="read", path="/items")], max_entries=10, cache=cache,
                        trust_check=lambda verified: still_trusted, trust_source=lambda verified: None, clock=clock)
    principal = Principal("ann", token.issuer, token, Caller(None), "ann")
    outcome = Outcome(Decision(True, "allowed", "read", 200), principal, ANONYMOUS_TRUST, None, "hit", b"k" * 32)
    assert memo.accepts(outcome)
    key = ("route", "GET", "/items", b"d" * 32)
    memo.remember(key, RequestView(method="GET", path="/items", route=None), outcome, None)
    assert memo.recall(key) is not None and memo.recall(key) is not None
    assert memo.recall(key) is None and len(memo) == 0
    assert asked == [token] * 3


async def test_a_verifier_without_still_trusted_is_replayed_until_its_cache_entry_ends(
    aiohttp_client: Any, aiohttp_server: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
    full_runs: Any
) -> None:
    """The introspection verifier cannot tell whether its result still stands: the entry then carries no
    check (None), and lives exactly as long as the verification-cache entry, as the full pipeline's hit does."""
    answers, config = await introspecting(aiohttp_server, monkeypatch, clock, issuer, max_ttl=20)
    client, pipeline = await protected(aiohttp_client, config, clock)
    answers["opaque-2"] = active_answer(clock)
    await warm(client, pipeline, "opaque-2")
    (entry,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    assert entry.still_trusted is None and pipeline.authenticator.trust_check(entry.token) is None
    runs = full_runs(pipeline)
    clock.advance(19)
    assert (await call(client, "opaque-2"))[0] == 200 and runs == []
    answers["opaque-2"] = {"active": False}
    clock.advance(1.5)
    assert (await call(client, "opaque-2"))[0] == 401 and runs == [1] and memo_size(pipeline) == 0


async def test_a_cache_entry_replaced_by_an_equal_result_ends_the_entry_and_the_next_hit_remembers_anew(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token, "/users/ann/items")
    (entry,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    equal = dataclasses.replace(entry.token)
    assert equal == entry.token and equal is not entry.token
    pipeline.cache.set(entry.cache_key, equal)  # e.g. verified again after a discard, or learnt from a replica
    runs = full_runs(pipeline)
    answers = [await call(client, token, "/users/ann/items") for _ in range(3)]
    assert answers == [(200, {"sub": "ann", "rule": "own", "match": {"user": "ann"}})] * 3
    assert runs == [1]  # the old entry is dropped, the hit on the new result is decided in full and remembered
    (renewed,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    assert renewed.token is equal and memo_size(pipeline) == 1


def test_an_entry_is_kept_only_when_the_verifier_trusts_it_at_the_version_it_is_stamped_with(
    clock: FakeClock,
) -> None:
    """Authentication asked still_trusted at the trust version of its moment; when the keys changed before the
    outcome is remembered (a resolver that awaited), the memo asks again at the version it stamps: a token
    whose key has just left is not kept, so no replay can outlive the rotation."""
    from ztmw.cache import MemoryVerificationCache
    from ztmw.config import Rule
    from ztmw.memo import DecisionMemo
    from ztmw.models import ANONYMOUS_TRUST, Caller, Decision, Principal, RequestView, VerifiedToken
    from ztmw.pipeline import Outcome

    class Keys:
        trust_version = 1
        published = True

        def still_trusted(self, verified: VerifiedToken) -> bool:
            return self.published

    keys = Keys()
    cache = MemoryVerificationCache(max_entries=10, max_ttl=300, clock=clock)
    token = VerifiedToken(issuer="https://issuer.test", subject="ann", audience=("api",), expires_at=clock() + 60,
                          token_id="t1", verifier="bearer")
    cache.set(b"k" * 32, token)
    memo = DecisionMemo(rules=[Rule(id="read", path="/items")], max_entries=10, cache=cache,
                        trust_check=lambda verified: keys.still_trusted, trust_source=lambda verified: keys,
                        clock=clock)
    principal = Principal("ann", token.issuer, token, Caller(None), "ann")
    outcome = Outcome(Decision(True, "allowed", "read", 200), principal, ANONYMOUS_TRUST, None, "hit", b"k" * 32)
    view = RequestView(method="GET", path="/items", route=None)
    keys.trust_version, keys.published = 2, False  # the key left after the cache hit, before remember
    memo.remember(("route", "GET", "/items", 1, 2), view, outcome, None)
    assert len(memo) == 0
    keys.published = True
    memo.remember(("route", "GET", "/items", 1, 2), view, outcome, None)
    assert len(memo) == 1


async def test_a_replay_counts_no_verification_cache_hit_but_keeps_the_entry_recent(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    """holds() is not a lookup (no hit counted), yet it refreshes recency as get() did: a replayed token is not
    the least recently used entry of a full verification cache."""
    client, pipeline = await protected(aiohttp_client, echo_config(issuer, cache={"max_entries": 2}), clock,
                                       echo_app())
    first, second, third = (issuer.mint(name, scope="items:read") for name in ("ann", "bob", "cid"))
    await warm(client, pipeline, first)
    assert (await call(client, second))[0] == 200  # the cache: first, second
    hits = pipeline.cache.hits
    assert (await call(client, first))[0] == 200  # replayed: first is the most recent again
    assert pipeline.cache.hits == hits
    assert (await call(client, third))[0] == 200  # evicts second, not first
    runs = full_runs(pipeline)
    assert (await call(client, first))[0] == 200 and runs == []
