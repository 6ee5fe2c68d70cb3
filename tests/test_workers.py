"""`ztmw serve --workers N` (ztmw/workers.py): real multi-process servers on one loopback port.

Every test starts the real command as a subprocess: a supervising parent and two `ztmw serve` children that
bind the same port with SO_REUSEPORT. A keep-alive connection stays with the worker that accepted it, and the
app's answers carry the pid of the process that served them (tests/worker_servers.py), which is how a test
knows it reached both workers. The configuration keeps the defaults a user gets ("memory" replay store, no
nonce secret in the environment): the parent must make them safe across workers by itself (DPOP-22: the
replay store is shared across workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator, Sequence

import aiohttp
import pytest
import trustme

from ztmw.testing import DevIssuer, DPoPKey
from ztmw.testing.http import free_port
from ztmw.workers import worker_count

from .replica_config import AUDIENCE, PUBLIC_ORIGIN, ROOT, dpop_error, write_replica_config
from .worker_servers import (
    Server,
    environment,
    pinned_to_two_workers,
    running,
    served_by,
    until_gone,
)

PATH = "/hello/x"
HTU = PUBLIC_ORIGIN + PATH
FACTORY = "tests.factories:create_worker_app"


@contextlib.asynccontextmanager
async def serving(config: Path, *, workers: str = "2", args: Sequence[str] = (), scheme: str = "http",
                  ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """`ztmw serve --workers N` on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "ztmw", "serve", FACTORY, "--config", str(config), "--port", str(port),
               "--workers", workers, *args]
    async with running(command, port, scheme=scheme, ssl_context=ssl_context) as server:
        yield server


@pytest.fixture
async def dev_issuer() -> AsyncIterator[DevIssuer]:
    async with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


@pytest.fixture
def config(dev_issuer: DevIssuer, tmp_path: Path) -> Path:
    """The defaults a user gets: memory replay store, nonces required, no nonce secret in the environment."""
    return write_replica_config(tmp_path / "ztmw.toml", issuer=dev_issuer.issuer, jwks_uri=dev_issuer.jwks_uri,
                                replay_store="memory")


# -- what must hold across workers ------------------------------------------------------------------------


async def test_proof_accepted_by_one_worker_is_a_replay_at_the_other(
    config: Path, dev_issuer: DevIssuer
) -> None:
    key = DPoPKey()
    token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
    auth = {"Authorization": f"DPoP {token}"}
    async with serving(config) as server, pinned_to_two_workers(server, {}) as (one, other):
        status, headers, _ = await served_by(one, server.base + PATH, {**auth, "DPoP": key.proof(
            "GET", HTU, access_token=token)})
        assert status == 401 and dpop_error(headers) == "use_dpop_nonce"
        nonce = headers["DPoP-Nonce"]
        for first, second in ((one, other), (other, one)):
            proof = key.proof("GET", HTU, access_token=token, nonce=nonce)
            status, _, body = await served_by(first, server.base + PATH, {**auth, "DPoP": proof})
            assert status == 200
            # the attacker sends the same proof to the other worker
            status, headers, _ = await served_by(second, server.base + PATH, {**auth, "DPoP": proof})
            assert status == 401 and dpop_error(headers) == "invalid_dpop_proof"
            # the refusal came from the other worker: its connection still leads to the other process
            status, _, again = await served_by(second, server.base + "/open", {})
            assert status == 200 and again["pid"] != body["pid"]
        server.process.send_signal(signal.SIGTERM)  # audit lines are written in batches: all of them by exit
        assert await asyncio.to_thread(server.process.wait, 60) == 0
    replays = [e for e in server.events() if e.get("reason") == "dpop_replay"]
    assert len(replays) == 2
    assert token not in server.stdout.decode()


@pytest.mark.redis
async def test_a_configured_redis_store_is_kept_and_shared_by_the_workers(
    redis_url: str, dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    config = write_replica_config(tmp_path / "redis.toml", issuer=dev_issuer.issuer,
                                  jwks_uri=dev_issuer.jwks_uri, replay_store=redis_url, require_nonce=False)
    key = DPoPKey()
    token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
    auth = {"Authorization": f"DPoP {token}"}
    async with serving(config) as server, pinned_to_two_workers(server, {}) as (one, other):
        proof = key.proof("GET", HTU, access_token=token)
        status, _, body = await served_by(one, server.base + PATH, {**auth, "DPoP": proof})
        assert status == 200
        status, headers, _ = await served_by(other, server.base + PATH, {**auth, "DPoP": proof})
        assert status == 401 and dpop_error(headers) == "invalid_dpop_proof"
        _, _, again = await served_by(other, server.base + "/open", {})
        for pid in (body["pid"], again["pid"]):  # no SQLite file handed to the workers: Redis as configured
            assert b"--worker-replay-store" not in Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_nonce_issued_by_one_worker_is_accepted_by_the_other(config: Path, dev_issuer: DevIssuer) -> None:
    key = DPoPKey()
    token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
    auth = {"Authorization": f"DPoP {token}"}
    async with serving(config) as server, pinned_to_two_workers(server, {}) as (one, other):
        for issuing, accepting in ((one, other), (other, one)):
            status, headers, _ = await served_by(issuing, server.base + PATH, {
                **auth, "DPoP": key.proof("GET", HTU, access_token=token)})
            assert status == 401 and dpop_error(headers) == "use_dpop_nonce"
            proof = key.proof("GET", HTU, access_token=token, nonce=headers["DPoP-Nonce"])
            status, _, body = await served_by(accepting, server.base + PATH, {**auth, "DPoP": proof})
            assert status == 200 and body["hello"] == "x"
        # control: a nonce neither worker made is refused
        forged = headers["DPoP-Nonce"][:-4] + ("AAAA" if not headers["DPoP-Nonce"].endswith("AAAA") else "BBBB")
        status, headers, _ = await served_by(one, server.base + PATH, {
            **auth, "DPoP": key.proof("GET", HTU, access_token=token, nonce=forged)})
        assert status == 401 and dpop_error(headers) == "use_dpop_nonce"
    assert b"ZTMW_DPOP_NONCE_SECRET" not in server.stderr and b"per-process secret" not in server.stdout


async def test_audit_lines_of_busy_workers_are_never_interleaved(config: Path, dev_issuer: DevIssuer) -> None:
    """Every line both workers wrote to one shared stdout pipe, under concurrent load, is one whole JSON object."""
    # a long client_id makes long lines (about 3 KB, still below PIPE_BUF), the easiest to tear
    token = dev_issuer.mint("alice", scope="hello:read", client_id="c" * 2500)
    headers = {"Authorization": f"Bearer {token}"}
    requests, concurrency = 3000, 32
    async with serving(config) as server:
        pids: set[int] = set()

        async def client() -> None:
            connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time: both workers
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(requests // concurrency):
                    async with session.get(server.base + PATH, headers=headers) as response:
                        assert response.status == 200
                        pids.add((await response.json())["pid"])

        await asyncio.gather(*(client() for _ in range(concurrency)))
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    assert len(pids) == 2
    lines = server.lines()
    events = [json.loads(line) for line in lines]  # raises on any torn or merged line
    decisions = [e for e in events if e.get("event") == "ztmw.decision"]
    assert len(decisions) == requests // concurrency * concurrency
    assert all(e["client_id"] == "c" * 2500 for e in decisions)


async def test_workers_serve_tls(dev_issuer: DevIssuer, config: Path, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    token = dev_issuer.mint("alice", scope="hello:read")
    args = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    async with serving(config, args=args, scheme="https", ssl_context=client_context) as server, \
            pinned_to_two_workers(server, {}, client_context) as (one, other):
        for client in (one, other):
            status, _, body = await served_by(client, server.base + PATH, {"Authorization": f"Bearer {token}"})
            assert status == 200 and body["hello"] == "x"
            status, _, _ = await served_by(client, server.base + PATH, {})
            assert status == 401


# -- lifetimes ----------------------------------------------------------------------------------------------


async def worker_pids(server: Server) -> list[int]:
    async with pinned_to_two_workers(server, {}) as clients:
        pids = []
        for client in clients:
            pids.append((await served_by(client, server.base + "/open", {}))[2]["pid"])
        return pids


async def test_sigterm_to_the_parent_stops_every_worker(config: Path) -> None:
    async with serving(config) as server:
        pids = await worker_pids(server)
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.process.wait, 60) == 0
        await until_gone(pids)


async def test_a_worker_that_dies_stops_the_parent_with_an_error(config: Path) -> None:
    async with serving(config) as server:
        victim, survivor = await worker_pids(server)
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.to_thread(server.process.wait, 60) != 0
        await until_gone([survivor])
    assert f"(pid {victim}) exited with signal SIGKILL; stopping the others" in server.stderr.decode()


async def test_workers_stop_when_the_parent_is_killed(config: Path) -> None:
    async with serving(config) as server:
        pids = await worker_pids(server)
        server.process.kill()  # no chance to clean up: the children must notice by themselves
        await asyncio.to_thread(server.process.wait, 60)
        await until_gone(pids)


async def test_a_worker_that_cannot_start_fails_the_whole_server(dev_issuer: DevIssuer, tmp_path: Path) -> None:
    """A config error only the app's set-up finds (an unknown verifier plugin) stops parent and children."""
    config = tmp_path / "bad.toml"
    good = write_replica_config(tmp_path / "good.toml", issuer=dev_issuer.issuer, jwks_uri=dev_issuer.jwks_uri,
                                replay_store="memory").read_text()
    config.write_text(good.replace('enabled = ["bearer", "dpop"]', 'enabled = ["bearer", "no-such-plugin"]'))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ztmw", "serve", FACTORY, "--config", str(config), "--port", str(free_port()),
         "--workers", "2"],
        cwd=ROOT, env=environment(), capture_output=True, timeout=120,
    )
    assert result.returncode == 2
    assert b"no-such-plugin" in result.stderr and b"stopping the others" in result.stderr


async def test_a_port_in_use_is_a_start_up_error(config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ztmw", "serve", FACTORY, "--config", str(config), "--port", str(port),
             "--workers", "2"],
            cwd=ROOT, env=environment(), capture_output=True, timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr.decode()


# -- the option ---------------------------------------------------------------------------------------------


def test_auto_is_the_number_of_usable_cpus() -> None:
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count("3") == 3


@pytest.mark.parametrize("text", ["0", "-1", "many", "1.5", "100000"])
def test_a_bad_worker_count_is_refused(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        worker_count(text)
