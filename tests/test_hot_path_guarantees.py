"""The three promises of the cached hot path (issue #6), each shown on a live server with the audit trail
proving the request really was answered from the cache (or the decision memo):

- the cache never skips a binding check (DPoP proof on every request, also on a hit);
- the cache never outlives `exp` (nor the memo, which stands on the cache);
- the cache never stores a token (nor the memo, nor the audit log).
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import DevIssuer, DPoPKey, FakeClock
from ztmw.testing.http import free_port

from .conftest import base_config, items_app
from .reachable import reachable

pytestmark = pytest.mark.usefixtures("decision_path")  # decided without awaiting, and in full


async def start(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, **sections: Any) -> tuple[Any, Any, str]:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = base_config(issuer, **sections)
    config["resource"]["public_origin"] = origin
    app = items_app()
    pipeline = ztmw.setup(app, config, clock=clock)
    return await aiohttp_client(TestServer(app, host="127.0.0.1", port=port)), pipeline, origin


async def send(client: Any, **headers: str) -> tuple[int, dict[str, Any]]:
    """Status and the one audit event of a GET /items."""
    with capture_logs() as logs:
        async with client.get("/items", headers=headers) as response:
            await response.read()
    [event] = [e for e in logs if e["event"] in ("ztmw.decision", "ztmw.security")]
    return response.status, event


async def test_the_cache_never_skips_a_binding_check(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline, origin = await start(aiohttp_client, issuer, clock, verifiers={"enabled": ["bearer", "dpop"]})
    key, stranger = DPoPKey(), DPoPKey()
    token = issuer.mint(scope="items:read", cnf={"jkt": key.thumbprint})
    url = origin + "/items"

    def proof(by: DPoPKey = key, **kwargs: Any) -> str:
        return by.proof("GET", url, access_token=token, iat=clock(), **kwargs)

    results = [await send(client, Authorization=f"DPoP {token}", DPoP=proof()) for _ in range(3)]
    assert [(status, event["cache"]) for status, event in results] == [(200, "miss"), (200, "hit"), (200, "hit")]
    used = proof()
    assert (await send(client, Authorization=f"DPoP {token}", DPoP=used))[0] == 200
    refusals = {
        "no proof": {"Authorization": f"DPoP {token}"},
        "replayed proof": {"Authorization": f"DPoP {token}", "DPoP": used},
        "another key's proof": {"Authorization": f"DPoP {token}", "DPoP": proof(stranger)},
        "as a bearer token": {"Authorization": f"Bearer {token}"},
    }
    for what, headers in refusals.items():
        hits = pipeline.cache.hits
        status, event = await send(client, **headers)
        assert (status, event["decision"]) == (401, "deny"), what
        assert pipeline.cache.hits == hits + 1, f"{what}: the token check was a cache hit, the binding still decided"
        assert event["cache"] == "hit", f"{what}: the audit trail says the token itself was a cache hit"


async def test_the_cache_never_outlives_exp(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline, _ = await start(aiohttp_client, issuer, clock, cache={"max_ttl": 3600})
    leeway = pipeline.config.issuers[0].leeway
    token = issuer.mint(scope="items:read", lifetime=60)
    statuses = [(await send(client, Authorization=f"Bearer {token}"))[0] for _ in range(4)]
    assert statuses == [200] * 4 and pipeline.memo is not None and len(pipeline.memo) == 1  # replayed
    clock.advance(60 + leeway)  # exp plus the issuer's leeway: the per-request re-check refuses
    status, event = await send(client, Authorization=f"Bearer {token}")
    assert (status, event["reason"]) == (401, "token_expired")
    assert len(pipeline.memo) == 0 and len(pipeline.cache) == 0


async def test_sec_03_the_cache_never_stores_a_token(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline, _ = await start(aiohttp_client, issuer, clock)
    token = issuer.mint(scope="items:read")
    for _ in range(3):
        assert (await send(client, Authorization=f"Bearer {token}"))[0] == 200
    assert len(pipeline.cache) == 1 and pipeline.memo is not None and len(pipeline.memo) == 1
    stored = [pipeline.cache._lru._entries, pipeline.memo._entries]  # what the two caches hold, keys included
    texts = [v for v in reachable(stored) if isinstance(v, (str, bytes))]
    assert texts, "the walk must reach the stored values"
    secrets = [token, *token.split(".")]
    for text in texts:
        data = text if isinstance(text, str) else text.decode("latin-1")
        assert not any(secret in data for secret in secrets)
