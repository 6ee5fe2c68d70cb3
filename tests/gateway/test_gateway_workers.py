"""`ztmw gateway --workers 2`: two processes on one port, like `ztmw serve --workers`, sharing what must be
shared (the DPoP replay store and nonce secret), and stopping together."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp

from ztmw.testing import DevIssuer, DPoPKey

from .conftest import Upstream, gateway_config
from .processes import ztmw_gateway

PROOF_URL = "https://api.example.com/payments"  # resource.public_origin + the original path


async def test_a_dpop_proof_is_accepted_once_across_the_workers(
    issuer: DevIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    config = gateway_config(issuer, {"mode": "proxy", "upstream": upstream.url})
    async with ztmw_gateway(config, tmp_path, "--workers", "2") as gateway:
        log = gateway.log.read_text()
        assert "2 workers on" in log, log
        key = DPoPKey()
        token = issuer.mint("alice", cnf={"jkt": key.thumbprint})
        proof = key.proof("POST", PROOF_URL, access_token=token)
        statuses = []
        for _ in range(16):  # a new connection each time: the kernel spreads them over both workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                async with session.post(gateway.url + "/payments", data=b"{}",
                                        headers={"Authorization": f"DPoP {token}", "DPoP": proof}) as response:
                    statuses.append(response.status)
        # one use, whichever worker saw it first; with a replay store per process, both workers would accept
        # it once (16 connections all landing on one worker: 1 in 2^15)
        assert sorted(statuses) == [200] + [401] * 15
        assert len(upstream.requests) == 1  # a refused request never reaches the upstream
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0  # the parent stops its workers and exits cleanly
