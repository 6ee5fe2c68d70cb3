"""`ztmw gateway` in proxy mode as its own process, in front of the upstream the nginx tests use: bodies of
100 MB pass both ways while the gateway's memory stays flat (nothing is buffered whole)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import aiohttp

from ztmw.testing import DevIssuer

from .conftest import BIG, Upstream, gateway_config, header
from .processes import Running, ztmw_gateway

FLAT_BOUND_KIB = 60 * 1024  # generous: a buffered 100 MB body would be 100 MB and more
_BLOCK = b"u" * (256 * 1024)


async def _upload() -> AsyncIterator[bytes]:
    for _ in range(BIG // len(_BLOCK)):
        yield _BLOCK


async def _peak_rss(gateway: Running, stop: asyncio.Event) -> int:
    peak = gateway.rss_kib()
    while not stop.is_set():
        peak = max(peak, gateway.rss_kib())
        await asyncio.sleep(0.02)
    return max(peak, gateway.rss_kib())


async def test_100_mb_both_ways_with_flat_memory(issuer: DevIssuer, upstream: Upstream, tmp_path: Path,
                                                 session: aiohttp.ClientSession) -> None:
    config = gateway_config(issuer, {"mode": "proxy", "upstream": upstream.url})
    async with ztmw_gateway(config, tmp_path) as gateway:
        auth = {"Authorization": f"Bearer {issuer.mint(scope='items:read items:write')}"}
        async with session.get(gateway.url + "/health") as response:  # warm up: imports, JWKS, first requests
            assert response.status == 200
        async with session.get(gateway.url + "/items", headers=auth) as response:
            assert response.status == 200
        baseline = gateway.rss_kib()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_peak_rss(gateway, stop))
        async with session.post(gateway.url + "/upload", headers=auth, data=_upload()) as response:
            assert response.status == 200
            assert (await response.json())["body_bytes"] == BIG
        received = 0
        async with session.get(gateway.url + "/big", headers=auth) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(BIG)
            async for chunk in response.content.iter_chunked(256 * 1024):
                received += len(chunk)
        stop.set()
        peak = await sampler
    assert received == BIG
    assert peak - baseline < FLAT_BOUND_KIB, f"gateway grew by {(peak - baseline) // 1024} MiB"


async def test_proxy_process_in_front_of_the_upstream(issuer: DevIssuer, upstream: Upstream, tmp_path: Path,
                                                      session: aiohttp.ClientSession, signing_key: Path) -> None:
    config = gateway_config(issuer, {"mode": "proxy", "upstream": upstream.url, "signing_key": str(signing_key)})
    async with ztmw_gateway(config, tmp_path) as gateway:
        token = issuer.mint("alice", scope="items:read")
        async with session.get(gateway.url + "/items?x=1", headers={"Authorization": f"Bearer {token}",
                                                                    "X-Ztmw-Subject": "admin"}) as response:
            assert response.status == 200
            seen = await response.json()
        async with session.get(gateway.url + "/items") as response:
            assert response.status == 401
    assert seen["target"] == "/items?x=1"
    assert header(seen, "X-Ztmw-Subject") == ["alice"] and len(header(seen, "X-Ztmw-Identity")) == 1
    assert len(upstream.requests) == 1


async def test_a_parser_rejection_never_echoes_the_credential(issuer: DevIssuer, upstream: Upstream,
                                                              tmp_path: Path) -> None:
    """A control byte in an Authorization line is refused by aiohttp's parser before the gateway sees it: the
    answer and the gateway's log must not carry a byte of it (ztmw.parser_rejection, as for `ztmw serve`)."""
    config = gateway_config(issuer, {"mode": "proxy", "upstream": upstream.url})
    marker = "SECRETMARKER" + "x" * 20
    async with ztmw_gateway(config, tmp_path) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + marker.encode()
                     + b"\x01tail\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        await writer.wait_closed()
    assert reply.split(b" ", 2)[1] == b"400"
    assert marker.encode() not in reply
    assert marker not in gateway.log.read_text(errors="replace")
    assert upstream.requests == []
