"""Real processes for the gateway's integration tests: `ztmw gateway` and nginx, each on loopback ports chosen
at run time, with their own temporary files, stopped by the process id they were started with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from ztmw.gateway.nginx import nginx_conf
from ztmw.testing import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 60.0


def toml(data: dict[str, Any]) -> str:
    """Enough TOML for a ztmw config: tables, arrays of tables, strings, numbers, booleans, string lists."""
    lines: list[str] = []

    def scalars(table: dict[str, Any]) -> None:
        for key, value in table.items():
            if not isinstance(value, dict) and not (isinstance(value, list) and value and isinstance(value[0], dict)):
                lines.append(f"{json.dumps(key)} = {json.dumps(value)}")

    def tables(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            name = f"{prefix}{json.dumps(key)}"
            if isinstance(value, dict):
                lines.append(f"[{name}]")
                scalars(value)
                tables(value, name + ".")
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for item in value:
                    lines.append(f"[[{name}]]")
                    scalars(item)

    scalars(data)
    tables(data, "")
    return "\n".join(lines) + "\n"


def nginx_binary() -> str:
    """nginx from the system (Debian's package); skipped with the reason without it, a failure under CI."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        message = "nginx is not installed"
        if os.environ.get("ZTMW_REQUIRE_NGINX") == "1":
            pytest.fail(message + " and ZTMW_REQUIRE_NGINX=1 (CI must run the nginx tests)")
        pytest.skip(message + "; `apt-get install nginx-light` (or nginx) to run the real-nginx tests")
    return found


async def wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"not listening on {port} after {START_TIMEOUT}s:\n{log.read_text(errors='replace')}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - only when shutdown hangs
            process.kill()
            process.wait()


class Running:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def rss_kib(self) -> int:
        """Resident memory of the process, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")  # pragma: no cover

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@contextlib.asynccontextmanager
async def ztmw_gateway(config: dict[str, Any], directory: Path, *extra: str) -> AsyncIterator[Running]:
    """`python -m ztmw gateway --config <toml> --port <p> [extra]` as its own process."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gateway.toml"
    path.write_text(toml(config), encoding="utf-8")
    log = directory / "gateway.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ztmw", "gateway", "--config", str(path),
                                    "--port", str(port), *extra], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        await wait_listening(process, port, log)
        yield Running(process, port, log)
    finally:
        stop(process)


@contextlib.asynccontextmanager
async def nginx(directory: Path, *, port: int, gateway_port: int, upstream_port: int,
                locations: str, http_extra: str = "") -> AsyncIterator[Running]:
    """nginx in the foreground with its own prefix, config, pid and logs, as the current user."""
    binary = nginx_binary()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(nginx_conf(directory, port=port, gateway_port=gateway_port, upstream_port=upstream_port,
                               locations=locations, http_extra=http_extra))
    log = directory / "error.log"
    log.touch()
    process = subprocess.Popen([binary, "-p", str(directory), "-c", str(conf)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        await wait_listening(process, port, log)
        yield Running(process, port, log)
    finally:
        stop(process)

