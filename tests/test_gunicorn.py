"""`ztmw.setup` under gunicorn (ztmw/workers.py: refuse_per_process_state; ztmw/gunicorn_worker.py).

A real gunicorn with two worker processes serves tests/gunicorn_app.py. gunicorn can add workers at any time
(TTIN) and replaces them (max_requests, timeouts), so its start-up worker count proves nothing: DPoP state
kept in one process (the "memory" replay store, a per-process nonce secret) is refused at start-up, and with
a shared store and a shared secret every guarantee holds across the workers. A request aiohttp's parser
refuses is answered by ztmw's worker without a byte of it, and logged without one under either worker.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ztmw.testing import DevIssuer, DPoPKey
from ztmw.testing.http import free_port

from .raw_requests import leaked, new_marker, raw_exchange
from .replica_config import AUDIENCE, PUBLIC_ORIGIN, ROOT, dpop_error, write_replica_config
from .worker_servers import environment, pinned_to_two_workers, running, served_by

pytest.importorskip("gunicorn", reason="the test extra installs gunicorn")

PATH = "/hello/x"
HTU = PUBLIC_ORIGIN + PATH
SECRET = "gunicorn-test-nonce-secret-shared"
AIOHTTP_WORKER = "aiohttp.GunicornWebWorker"
ZTMW_WORKER = "ztmw.gunicorn_worker.GunicornWebWorker"


def gunicorn(port: int, worker: str = ZTMW_WORKER, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "tests.gunicorn_app:create_app", "-k", worker,
            "-w", str(workers), "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5"]


@pytest.fixture
async def dev_issuer() -> Any:
    async with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


def config(tmp_path: Path, issuer: DevIssuer, replay_store: str) -> Path:
    return write_replica_config(tmp_path / "ztmw.toml", issuer=issuer.issuer, jwks_uri=issuer.jwks_uri,
                                replay_store=replay_store)


async def start_up(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, gunicorn(free_port()), cwd=ROOT, env={**environment(), **env,
                                                              "ZTMW_TEST_CONFIG": str(path)},
        capture_output=True, text=True, timeout=120,
    )


async def test_memory_replay_store_under_gunicorn_is_a_start_up_error(
    dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    result = await start_up(config(tmp_path, dev_issuer, "memory"), {"ZTMW_DPOP_NONCE_SECRET": SECRET})
    assert result.returncode != 0  # gunicorn: "Worker failed to boot", the master stops
    assert 'dpop.replay_store = "memory" keeps proof ids in one process' in result.stderr
    assert "Worker failed to boot" in result.stderr


async def test_per_process_nonce_secret_under_gunicorn_is_a_start_up_error(
    dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    store = f"sqlite://{tmp_path}/replay.sqlite3"
    result = await start_up(config(tmp_path, dev_issuer, store), {})
    assert result.returncode != 0
    assert "ZTMW_DPOP_NONCE_SECRET unset gives each process its own nonce secret" in result.stderr
    assert "dpop.replay_store" not in result.stderr  # the shared store itself is fine
    assert SECRET not in result.stderr


async def test_shared_store_and_secret_hold_across_gunicorn_workers(dev_issuer: DevIssuer, tmp_path: Path) -> None:
    path = config(tmp_path, dev_issuer, f"sqlite://{tmp_path}/replay.sqlite3")
    port = free_port()
    key = DPoPKey()
    token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
    auth = {"Authorization": f"DPoP {token}"}
    env = {"ZTMW_DPOP_NONCE_SECRET": SECRET, "ZTMW_TEST_CONFIG": str(path)}
    async with running(gunicorn(port), port, env=env) as server, \
            pinned_to_two_workers(server, {}) as (one, other):
        for first, second in ((one, other), (other, one)):
            # a nonce from one worker is good at the other
            status, headers, _ = await served_by(first, server.base + PATH, {
                **auth, "DPoP": key.proof("GET", HTU, access_token=token)})
            assert status == 401 and dpop_error(headers) == "use_dpop_nonce"
            proof = key.proof("GET", HTU, access_token=token, nonce=headers["DPoP-Nonce"])
            status, _, body = await served_by(second, server.base + PATH, {**auth, "DPoP": proof})
            assert status == 200 and body["hello"] == "x"
            # and a proof accepted by one worker is a replay at the other
            status, headers, _ = await served_by(first, server.base + PATH, {**auth, "DPoP": proof})
            assert status == 401 and dpop_error(headers) == "invalid_dpop_proof"
            status, _, again = await served_by(first, server.base + "/open", {})
            assert again["pid"] != body["pid"]


def refused_request(marker: str) -> bytes:
    """A request aiohttp's parser refuses (a control byte in a header value) with the marker in a token."""
    return f"GET /hello/x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {marker}\x01x\r\n\r\n".encode()


async def refuse_under(worker: str, dev_issuer: DevIssuer, tmp_path: Path, marker: str) -> tuple[bytes, bytes]:
    """The answer to `refused_request(marker)` from a gunicorn with `worker`, which still serves after it,
    and everything gunicorn wrote once stopped."""
    path = config(tmp_path, dev_issuer, f"sqlite://{tmp_path}/replay.sqlite3")
    port = free_port()
    env = {"ZTMW_DPOP_NONCE_SECRET": SECRET, "ZTMW_TEST_CONFIG": str(path)}
    async with running(gunicorn(port, worker, workers=1), port, env=env) as server:
        answer = await raw_exchange(port, refused_request(marker))
        async with aiohttp.ClientSession() as client:
            status, _, body = await served_by(client, server.base + "/open", {})
        assert status == 200 and body["pid"] != server.process.pid  # served by the worker, not the arbiter
    return answer, bytes(server.stdout + server.stderr)


async def test_sec_03_ztmw_worker_answers_a_parser_rejection_with_a_fixed_400_and_logs_no_request_byte(
    dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    marker = new_marker()
    answer, output = await refuse_under(ZTMW_WORKER, dev_issuer, tmp_path, marker)
    assert answer.split(b" ", 2)[1] == b"400"
    assert answer.endswith(b"\r\n\r\n400 Bad Request\n")
    assert leaked(marker, answer) == []
    assert leaked(marker, output) == []
    assert b"HTTP parser rejected a request from 127.0.0.1: BadHttpMessage" in output


async def test_sec_03_setup_under_aiohttps_worker_keeps_the_line_out_of_gunicorns_log_but_not_its_answer(
    dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    """What README's gunicorn section says: with aiohttp's own worker the log is clean, the answer is not."""
    marker = new_marker()
    answer, output = await refuse_under(AIOHTTP_WORKER, dev_issuer, tmp_path, marker)
    assert answer.split(b" ", 2)[1] == b"400"
    assert leaked(marker, answer) != []  # aiohttp's own answer quotes the line: use ztmw's worker
    assert leaked(marker, output) == []
    assert b"(request bytes withheld)" in output
