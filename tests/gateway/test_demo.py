"""`ztmw demo --gateway` and its framework-free upstream."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from ztmw.gateway.demo import _raw_upstream, run_gateway_demo
from ztmw.testing import free_port

from .processes import nginx_binary


async def test_gateway_demo_scenarios_all_behave(capsys: pytest.CaptureFixture[str]) -> None:
    nginx_binary()  # the demo uses nginx when installed: run it that way here (skip, or fail under CI)
    assert await run_gateway_demo() == 0
    out = capsys.readouterr().out
    assert "upstream: nginx (no Python in it)" in out
    assert "16 of 16 gateway scenarios behaved as expected" in out
    assert "saw subject=[alice] rule=[orders] assertion=[yes]" in out


async def test_raw_upstream_echoes_the_identity_headers(session: aiohttp.ClientSession) -> None:
    port = free_port()
    server = await asyncio.start_server(_raw_upstream, "127.0.0.1", port)
    try:
        headers = {"X-Ztmw-Subject": "alice", "X-Ztmw-Rule": "orders", "X-Ztmw-Identity": "e.y.j"}
        async with session.post(f"http://127.0.0.1:{port}/orders", headers=headers, data=b"body") as response:
            assert response.status == 200
            assert await response.text() == "upstream (raw socket) saw subject=[alice] rule=[orders] assertion=[yes]"
    finally:
        server.close()
        await server.wait_closed()
