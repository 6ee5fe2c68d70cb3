"""The decision memo: a repeated bearer request is answered from memory, and never when that could be wrong.

Every test drives a real aiohttp server with real tokens; "served from the memo" is observed through
`pipeline.memo` (its size) and the audit trail, "refused anyway" through the response on the wire.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import DevIssuer, DPoPKey, FakeClock

from .conftest import base_config


def whoami_app() -> web.Application:
    """Answers with what the handler sees: the principal, trust and decision ztmw published on the request."""

    async def whoami(request: web.Request) -> web.Response:
        principal, trust, decision = request[ztmw.PRINCIPAL], request[ztmw.TRUST], request[ztmw.DECISION]
        seen = {"sub": principal.subject if principal else None, "aal": trust.aal, "rule": decision.rule_id}
        if trust.auth_age is not None:
            seen["auth_age"] = trust.auth_age
        return web.json_response(seen)

    app = web.Application()
    for path in ("/items", "/users/{user}/items", "/health"):
        app.router.add_get(path, whoami)
    return app


async def protected(aiohttp_client: Any, config: dict[str, Any], clock: FakeClock,
                    app: web.Application | None = None) -> tuple[Any, ztmw.Pipeline]:
    app = app if app is not None else whoami_app()
    pipeline = ztmw.setup(app, config, clock=clock)
    return await aiohttp_client(app), pipeline


async def call(client: Any, token: str | None = None, path: str = "/items", method: str = "GET",
               **headers: Any) -> tuple[int, Any]:
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {token}")
    async with client.request(method, path, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


def memo_size(pipeline: ztmw.Pipeline) -> int:
    assert pipeline.memo is not None
    return len(pipeline.memo)


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
