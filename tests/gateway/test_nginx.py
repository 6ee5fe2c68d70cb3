"""Real nginx with `auth_request` in front of an upstream, asking a real `ztmw gateway` process."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from ztmw.gateway.nginx import FORWARD_AUTH_HTTP, FORWARD_AUTH_LOCATIONS
from ztmw.testing import DevIssuer, DPoPKey, free_port

from ..conftest import AUDIENCE
from .conftest import Upstream, gateway_config, header
from .processes import Running, nginx, nginx_binary, ztmw_gateway

UPSTREAM_ID = "https://upstream.internal"


class Front:
    def __init__(self, nginx: Running, gateway: Running, upstream: Upstream) -> None:
        self.nginx, self.gateway, self.upstream = nginx, gateway, upstream
        self.url = nginx.url


@pytest.fixture
async def front(issuer: DevIssuer, upstream: Upstream, signing_key: Path, tmp_path: Path) -> AsyncIterator[Front]:
    nginx_binary()  # skip (or fail under CI) before starting anything
    port = free_port()
    config = gateway_config(issuer, {"mode": "forward-auth", "signing_key": str(signing_key),
                                     "assertion_audience": UPSTREAM_ID, "combine_challenges": True},
                            audit={"sinks": ["jsonl"]}, plugins={"jsonl": {"path": "-", "flush_interval": 0.01}})
    config["resource"]["public_origin"] = f"http://127.0.0.1:{port}"
    async with contextlib.AsyncExitStack() as stack:
        gateway = await stack.enter_async_context(ztmw_gateway(config, tmp_path / "gateway"))
        upstream_port = int(upstream.url.rsplit(":", 1)[1])
        server = await stack.enter_async_context(nginx(tmp_path / "nginx", port=port, gateway_port=gateway.port,
                                                       upstream_port=upstream_port,
                                                       locations=FORWARD_AUTH_LOCATIONS,
                                                       http_extra=FORWARD_AUTH_HTTP))
        yield Front(server, gateway, upstream)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_valid_token_reaches_the_upstream_with_identity(front: Front, issuer: DevIssuer,
                                                              session: aiohttp.ClientSession) -> None:
    token = issuer.mint("alice", scope="items:read", client_id="app-1")
    async with session.get(front.url + "/items?page=1", headers={**bearer(token), "X-Ztmw-Subject": "admin"}) as r:
        assert r.status == 200
        seen = await r.json()
    assert seen["target"] == "/items?page=1"
    assert header(seen, "X-Ztmw-Subject") == ["alice"]
    assert header(seen, "X-Ztmw-Client-Id") == ["app-1"]
    assert header(seen, "X-Ztmw-Rule") == ["read"]
    assert header(seen, "X-Ztmw-Binding") == ["bearer"]
    assert len(header(seen, "X-Ztmw-Identity")) == 1
    assert header(seen, "Authorization") == []


async def test_no_token_gets_ztmw_401_with_the_challenges_intact(front: Front,
                                                                 session: aiohttp.ClientSession) -> None:
    async with session.get(front.url + "/items") as response:
        assert response.status == 401
        [challenge] = response.headers.getall("WWW-Authenticate")
    assert challenge.startswith('Bearer realm="api", resource_metadata="https://api.example.com/.well-known/')
    assert ', DPoP algs="ES256 EdDSA PS256"' in challenge
    assert front.upstream.requests == []


async def test_invalid_and_unauthorised_requests_get_ztmw_answers(front: Front, issuer: DevIssuer,
                                                                  session: aiohttp.ClientSession) -> None:
    foreign = issuer.mint(scope="items:read", audience="https://elsewhere.example.com")
    async with session.get(front.url + "/items", headers=bearer(foreign)) as response:
        assert response.status == 401
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    async with session.post(front.url + "/items", headers=bearer(issuer.mint(scope="items:read"))) as response:
        assert response.status == 403
        challenge = response.headers["WWW-Authenticate"]
        assert 'error="insufficient_scope"' in challenge and 'scope="items:write"' in challenge
    async with session.get(front.url + "/admin", headers=bearer(issuer.mint(acr="urn:example:acr:pwd"))) as r:
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
        assert 'error="insufficient_user_authentication"' in challenge
        assert 'acr_values="urn:example:acr:mfa"' in challenge
    async with session.get(front.url + "/not-covered", headers=bearer(issuer.mint(scope="items:read"))) as r:
        assert r.status == 403
    assert front.upstream.requests == []


async def test_dpop_bound_token_with_its_proof_works_through_nginx(front: Front, issuer: DevIssuer,
                                                                   session: aiohttp.ClientSession) -> None:
    key = DPoPKey()
    token = issuer.mint("alice", cnf={"jkt": key.thumbprint})
    proof = key.proof("POST", front.url + "/payments", access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    async with session.post(front.url + "/payments?id=7", headers=headers, data=b"{}") as response:
        assert response.status == 200
        seen = await response.json()
    assert header(seen, "X-Ztmw-Binding") == ["dpop"] and header(seen, "DPoP") == []
    async with session.post(front.url + "/payments", headers=headers) as response:  # the same proof again
        assert response.status == 401
        assert 'DPoP algs="ES256 EdDSA PS256", error="invalid_dpop_proof"' in response.headers["WWW-Authenticate"]
    assert len(front.upstream.requests) == 1


async def test_client_sent_identity_headers_never_reach_the_upstream(front: Front,
                                                                     session: aiohttp.ClientSession) -> None:
    forged = {"X-Ztmw-Subject": "admin", "X-Ztmw-Aal": "3", "X-Ztmw-Identity": "forged", "X-Ztmw-Rule": "x"}
    async with session.get(front.url + "/health", headers=forged) as response:  # public: no principal
        assert response.status == 200
        seen = await response.json()
    assert header(seen, "X-Ztmw-Subject") == [] and header(seen, "X-Ztmw-Aal") == []
    assert header(seen, "X-Ztmw-Identity") == [] and header(seen, "X-Ztmw-Rule") == ["health"]


async def test_a_400_and_a_503_of_the_decision_service_are_kept(front: Front, issuer: DevIssuer,
                                                                session: aiohttp.ClientSession) -> None:
    token = issuer.mint(scope="items:read")
    malformed = {"Authorization": f"Bearer {token}, {token}"}  # two credentials in one line (HTTP-05)
    async with session.get(front.url + "/items", headers=malformed) as response:
        assert response.status == 400
        assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]
    front.gateway.process.terminate()
    front.gateway.process.wait(timeout=15)
    async with session.get(front.url + "/items", headers=bearer(token)) as response:
        assert response.status == 503  # the decision service is gone: fail closed
    assert front.upstream.requests == []


async def test_metadata_and_audit_through_nginx(front: Front, issuer: DevIssuer,
                                                session: aiohttp.ClientSession) -> None:
    async with session.get(front.url + "/.well-known/oauth-protected-resource") as response:
        assert (await response.json())["resource"] == AUDIENCE
    async with session.get(front.url + "/items", headers=bearer(issuer.mint(scope="items:read"))) as response:
        assert response.status == 200
    front.gateway.process.terminate()  # flushes the audit buffer
    front.gateway.process.wait(timeout=15)
    decisions = [e for e in front.gateway.events() if e.get("event") == "ztmw.decision"]
    assert [(e["decision"], e["route"], e["status"]) for e in decisions] == [("allow", "/items", 200)]
