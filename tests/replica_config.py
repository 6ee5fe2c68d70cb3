"""Helpers for tests that run `ztmw serve` replicas as real subprocesses (tests/test_dpop_replicas.py).

Each replica is `python -m ztmw serve tests.factories:create_app --config <toml> --port <p>`, started from the
repository root with its own environment; its JSON log lines go to a file the test can read afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from ztmw.testing.http import free_port

from .command import HELLO_RULE, OPEN_RULE, ROOT

PUBLIC_ORIGIN = "https://api.example.com"  # the load balancer's origin, shared by every replica
AUDIENCE = "https://api.example.com"
START_TIMEOUT = 60.0


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_replica_config(path: Path, *, issuer: str, jwks_uri: str, replay_store: str,
                         require_nonce: bool = True) -> Path:
    """One config for every replica behind the balancer: same origin, same issuer, same replay store."""
    path.write_text(f"""
[resource]
identifier = {_toml_string(AUDIENCE)}
public_origin = {_toml_string(PUBLIC_ORIGIN)}

[[issuers]]
issuer = {_toml_string(issuer)}
jwks_uri = {_toml_string(jwks_uri)}
algorithms = ["ES256"]

[verifiers]
enabled = ["bearer", "dpop"]

[dpop]
require_nonce = {"true" if require_nonce else "false"}
replay_store = {_toml_string(replay_store)}

{HELLO_RULE}
{OPEN_RULE}""", encoding="utf-8")
    return path


@dataclass
class Replica:
    name: str
    base: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (the subprocess runs unbuffered)."""
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8")

    async def audit_events(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The audit events once `count` of them are written: `ztmw serve` writes decisions in batches (at most
        0.2 s late; security events at once, with everything queued before them)."""
        deadline = time.monotonic() + timeout
        while True:
            events = [e for e in self.events() if e.get("event") in ("ztmw.decision", "ztmw.security")]
            if len(events) >= count or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.05)


async def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Poll the port without blocking the event loop: the replica fetches its JWKS from an issuer in it."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(encoding="utf-8")
                raise AssertionError(f"replica did not start:\n{output}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - only when shutdown hangs
        process.kill()
        process.wait(timeout=30)


@contextlib.asynccontextmanager
async def serving(name: str, config: Path, workdir: Path, env: Mapping[str, str], *,
                  factory: str = "tests.factories:create_app") -> AsyncIterator[Replica]:
    """Run one `ztmw serve` replica on a free loopback port until the block ends, then stop and reap it."""
    port = free_port()
    log_path = workdir / f"{name}.log"
    environment = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ztmw", "serve", factory, "--config", str(config),
             "--port", str(port)],
            cwd=ROOT, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            await _wait_until_listening(process, port, log_path)
            yield Replica(name, f"http://127.0.0.1:{port}", log_path, process)
        finally:
            _stop(process)


def dpop_error(headers: Any) -> str | None:
    """The `error` of the DPoP challenge (the scheme every refusal in the multi-process tests is about)."""
    for line in headers.getall("WWW-Authenticate", []):
        if line.startswith("DPoP "):
            for part in line[5:].split(", "):
                name, _, value = part.partition("=")
                if name == "error":
                    return value.strip('"')
    return None
