"""Helpers for tests of multi-process servers (`ztmw serve --workers`, gunicorn): start, pin, stop.

A keep-alive connection stays with the worker process that accepted it, so a client pinned to one connection
talks to one worker; the test app's answers carry the pid of the process that served them
(tests/factories.py:create_worker_app), which is how a test knows it reached two different workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import aiohttp

from .replica_config import ROOT

START_TIMEOUT = 60.0


@dataclass
class Server:
    """A running `ztmw serve --workers N`: the parent process and everything it wrote to stdout and stderr."""

    process: subprocess.Popen[bytes]
    base: str
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    def lines(self) -> list[str]:
        return self.stdout.decode("utf-8").splitlines()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


def _drain(stream: Any, into: bytearray) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        into.extend(chunk)


def environment() -> dict[str, str]:
    """The test's environment without a nonce secret: the servers under test must cope without one."""
    return {k: v for k, v in os.environ.items() if k != "ZTMW_DPOP_NONCE_SECRET"}


@contextlib.asynccontextmanager
async def running(command: Sequence[str], port: int, *, env: Mapping[str, str] | None = None,
                  scheme: str = "http", ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """Run a multi-process server until the block ends: stdout and stderr read through pipes, then stopped."""
    process = subprocess.Popen(
        list(command), cwd=ROOT, env={**environment(), **(env or {})}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    server = Server(process, f"{scheme}://127.0.0.1:{port}")
    readers = [threading.Thread(target=_drain, args=(process.stdout, server.stdout), daemon=True),
               threading.Thread(target=_drain, args=(process.stderr, server.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        await _until_listening(server, port, ssl_context)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover - only when shutdown hangs
            process.kill()
            process.wait()
        for reader in readers:
            reader.join(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


async def _until_listening(server: Server, port: int, ssl_context: ssl.SSLContext | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)
        except OSError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{server.stderr.decode()}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


@contextlib.asynccontextmanager
async def pinned_to_two_workers(
    server: Server, headers: dict[str, str], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[aiohttp.ClientSession, aiohttp.ClientSession]]:
    """Two one-connection clients whose connections were accepted by different workers.

    A new connection lands on either worker (the kernel hashes its addresses), so connect until two answers
    name different processes; both workers only start listening once they have started, so keep trying.
    """
    found: dict[int, aiohttp.ClientSession] = {}
    pending: list[aiohttp.ClientSession] = []
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while len(found) < 2:
            assert time.monotonic() < deadline, "the connections never reached two workers"
            client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, ssl=ssl_context or False))
            pending.append(client)
            try:
                async with client.get(server.base + "/open", headers=headers) as response:
                    assert response.status == 200
                    pid = (await response.json())["pid"]
            except aiohttp.ClientConnectionError as exc:
                raise AssertionError(f"{exc}; the server said:\n{server.stderr.decode()}") from None
            pending.pop()
            if pid in found:
                await client.close()  # same worker again: the other may still be starting
                await asyncio.sleep(0.02)
            else:
                found[pid] = client
        first, second = found.values()
        yield first, second
    finally:
        for client in [*pending, *found.values()]:
            await client.close()


async def served_by(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with client.get(url, headers=headers) as response:
        body = await response.json() if response.status == 200 else await response.text()
        return response.status, response.headers.copy(), body


def alive(pid: int) -> bool:
    """Running, and not a zombie left for a reaper that may never come in a container."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


async def until_gone(pids: Sequence[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        await asyncio.sleep(0.1)
