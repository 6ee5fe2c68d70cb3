"""Proxy mode: allowed requests reach a real upstream on loopback, unchanged but for the headers the gateway
owns; refused ones never do."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient
from yarl import URL

from ztmw.gateway import create_gateway_app
from ztmw.testing import DevIssuer, challenges, free_port

from .conftest import Upstream, gateway_config, header


async def proxy(aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream_url: str, **settings: Any) -> Any:
    config = gateway_config(issuer, {"mode": "proxy", "upstream": upstream_url, **settings})
    return await aiohttp_client(create_gateway_app(config, clock=issuer.clock))


async def test_allowed_request_is_forwarded_unchanged_with_identity(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream: Upstream, signing_key: Path) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url, signing_key=str(signing_key),
                         trusted_proxies=["10.0.0.0/8"])  # the test client is no proxy
    token = issuer.mint("alice", scope="items:write", client_id="app-1")
    response = await client.post("/items?b=2&a=%20x", data=b"payload", headers={
        "Authorization": f"Bearer {token}", "X-Ztmw-Subject": "admin", "x-ztmw-rule": "forged",
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example", "Forwarded": "for=6.6.6.6",
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "X-App": "kept",
        "Content-Type": "text/plain"})
    assert response.status == 200
    assert response.headers["X-Upstream"] == "yes"
    assert "X-Hop" not in response.headers  # named in the upstream's Connection header
    seen = await response.json()
    assert (seen["method"], seen["target"], seen["body_bytes"]) == ("POST", "/items?b=2&a=%20x", 7)
    assert header(seen, "X-Ztmw-Subject") == ["alice"]
    assert header(seen, "X-Ztmw-Rule") == ["write"]
    assert header(seen, "X-Ztmw-Client-Id") == ["app-1"]
    assert len(header(seen, "X-Ztmw-Identity")) == 1
    assert header(seen, "Authorization") == [] and header(seen, "X-Secret-Hop") == []
    assert header(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header(seen, "X-Forwarded-Proto") == ["https"]
    assert header(seen, "X-Forwarded-Host") == ["api.example.com"]
    assert header(seen, "Forwarded") == []
    assert header(seen, "X-App") == ["kept"] and header(seen, "Content-Type") == ["text/plain"]


async def test_forwarding_headers_of_a_trusted_proxy_are_extended(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream: Upstream) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url)  # 127.0.0.1 is a trusted proxy by default
    seen = await (await client.get("/health", headers={"X-Forwarded-For": "192.0.2.7"})).json()
    assert header(seen, "X-Forwarded-For") == ["192.0.2.7, 127.0.0.1"]
    assert header(seen, "X-Ztmw-Rule") == ["health"] and header(seen, "X-Ztmw-Subject") == []


async def test_credentials_are_forwarded_only_when_configured(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream: Upstream) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url, forward_credentials=True)
    token = issuer.mint(scope="items:read")
    seen = await (await client.get("/items", headers={"Authorization": f"Bearer {token}"})).json()
    assert header(seen, "Authorization") == [f"Bearer {token}"]
    assert header(seen, "X-Ztmw-Identity") == []  # no signing key, no assertion


async def test_refused_requests_never_reach_the_upstream(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream: Upstream) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url)
    no_token = await client.get("/items")
    assert no_token.status == 401 and "Bearer" in challenges(no_token)
    assert (await client.post("/items", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"},
                              data=b"x")).status == 403
    assert (await client.get("/not-covered")).status == 403
    raw = URL(f"http://127.0.0.1:{client.port}/users/%2e%2e/admin", encoded=True)  # as sent, not normalised
    assert (await client.session.get(raw)).status == 400
    assert upstream.requests == []


async def test_metadata_is_served_by_the_gateway(aiohttp_client: AiohttpClient, issuer: DevIssuer,
                                                 upstream: Upstream) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url)
    document = await (await client.get("/.well-known/oauth-protected-resource")).json()
    assert document["resource"] == "https://api.example.com"
    assert upstream.requests == []


async def test_unreachable_upstream_is_502(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await proxy(aiohttp_client, issuer, f"http://127.0.0.1:{free_port()}")
    response = await client.get("/items", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"})
    assert response.status == 502


async def test_upstream_without_response_headers_in_time_is_504(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream: Upstream) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url, upstream_timeout=0.3)
    response = await client.get("/slow", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"})
    assert response.status == 504
    assert [r["target"] for r in upstream.requests] == ["/slow"]


async def test_assertion_can_replace_the_authorization_header(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream: Upstream, signing_key: Path) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url, signing_key=str(signing_key),
                         assertion_in_authorization=True)
    token = issuer.mint(scope="items:read")
    seen = await (await client.get("/items", headers={"Authorization": f"Bearer {token}"})).json()
    [identity] = header(seen, "X-Ztmw-Identity")
    assert header(seen, "Authorization") == [f"Bearer {identity}"]
    assert token not in json.dumps(seen)


async def test_head_keeps_the_upstream_length_without_a_body(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, upstream: Upstream) -> None:
    client = await proxy(aiohttp_client, issuer, upstream.url)
    response = await client.head("/health")
    assert response.status == 200
    assert int(response.headers["Content-Length"]) > 0
    assert await response.read() == b""
    assert [r["method"] for r in upstream.requests] == ["HEAD"]


async def test_an_upstream_breaking_off_mid_body_breaks_the_response_off(
        aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(half, "127.0.0.1", port)
    try:
        client = await proxy(aiohttp_client, issuer, f"http://127.0.0.1:{port}")
        response = await client.get("/items", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"})
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # never a complete-looking short body
    finally:
        server.close()
        await server.wait_closed()
