"""`ztmw demo --gateway`: an upstream that knows nothing of Python or ztmw, protected by the gateway.

The upstream is nginx answering from its own configuration (a C program that only reads request headers), or,
where nginx is not installed, a framework-free HTTP/1.1 responder on raw sockets: either way it just echoes
the identity headers it received. In front of it: the gateway in proxy mode, and (with nginx) nginx asking the
gateway with `auth_request`. Each scenario states what it expects; the demo exits non-zero when one does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web
from joserfc.jwk import ECKey

from ..testing import DevIssuer, DPoPKey, free_port
from .app import create_gateway_app
from .nginx import FORWARD_AUTH_HTTP, FORWARD_AUTH_LOCATIONS, nginx_conf

AUDIENCE = "https://api.example.com"
RULES = [
    {"id": "health", "path": "/health", "methods": ["GET"], "public": True},
    {"id": "orders", "path": "/orders", "methods": ["GET"], "scopes": ["orders:read"]},
    {"id": "pay", "path": "/payments", "methods": ["POST"], "binding": "dpop"},
]
# the upstream as nginx: it echoes what the gateway told it, nothing else
UPSTREAM_LOCATIONS = """
        location / {
            default_type text/plain;
            return 200 "upstream (nginx) saw subject=[$http_x_ztmw_subject] rule=[$http_x_ztmw_rule] assertion=[$ztmw_seen]";
        }
"""
UPSTREAM_HTTP = """
    map $http_x_ztmw_identity $ztmw_seen { "" no; default yes; }
"""


def _nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


@contextlib.asynccontextmanager
async def _nginx_process(binary: str, prefix: Path, port: int, conf: str) -> AsyncIterator[None]:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(conf)
    process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(400):
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(prefix / 'error.log').read_text(errors='replace')}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


async def _raw_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 without a framework: read the head, echo the identity headers, close."""
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        length = int(fields.get("content-length", "0") or 0)
        if length:
            await reader.readexactly(length)
        body = (f"upstream (raw socket) saw subject=[{fields.get('x-ztmw-subject', '')}] "
                f"rule=[{fields.get('x-ztmw-rule', '')}] "
                f"assertion=[{'yes' if fields.get('x-ztmw-identity') else 'no'}]").encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _gateway(config: dict[str, Any], port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(create_gateway_app(config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def run_gateway_demo() -> int:
    binary = _nginx()
    work = Path(tempfile.mkdtemp(prefix="ztmw-gateway-demo."))
    key_path = work / "gateway-key.json"
    key = ECKey.generate_key("P-256")  # the gateway's signing key, as `ztmw token keygen` writes it
    key_path.write_text(json.dumps({**key.as_dict(private=True), "alg": "ES256", "kid": key.thumbprint()[:16]}))
    results: list[tuple[str, str, int, int, str]] = []
    async with contextlib.AsyncExitStack() as stack:
        issuer = await stack.enter_async_context(DevIssuer(audience=AUDIENCE))
        upstream_port, proxy_port, decider_port, front_port = (free_port() for _ in range(4))
        if binary is not None:
            await stack.enter_async_context(_nginx_process(binary, work / "upstream", upstream_port, nginx_conf(
                work / "upstream", port=upstream_port, gateway_port=decider_port, upstream_port=upstream_port,
                locations=UPSTREAM_LOCATIONS, http_extra=UPSTREAM_HTTP)))
        else:
            server = await asyncio.start_server(_raw_upstream, "127.0.0.1", upstream_port)
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)
        resource = {"identifier": AUDIENCE, "realm": "demo"}
        base: dict[str, Any] = {"resource": resource,
                "issuers": [issuer.issuer_config(audiences=[AUDIENCE])],
                "verifiers": {"enabled": ["bearer", "dpop"]}, "rules": RULES, "audit": {"enabled": False}}
        fronts = {"proxy": f"http://127.0.0.1:{proxy_port}"}
        await stack.enter_async_context(_gateway({
            **base, "resource": {**resource, "public_origin": fronts["proxy"]},
            "gateway": {"mode": "proxy", "upstream": f"http://127.0.0.1:{upstream_port}",
                        "signing_key": str(key_path)}}, proxy_port))
        if binary is not None:
            fronts["nginx"] = f"http://127.0.0.1:{front_port}"
            await stack.enter_async_context(_gateway({
                **base, "resource": {**resource, "public_origin": fronts["nginx"]},
                "gateway": {"mode": "forward-auth", "signing_key": str(key_path), "combine_challenges": True,
                            "assertion_audience": "https://upstream.internal"}}, decider_port))
            await stack.enter_async_context(_nginx_process(binary, work / "front", front_port, nginx_conf(
                work / "front", port=front_port, gateway_port=decider_port, upstream_port=upstream_port,
                locations=FORWARD_AUTH_LOCATIONS, http_extra=FORWARD_AUTH_HTTP)))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        key_dpop = DPoPKey()
        for front, url in fronts.items():
            reader = issuer.mint("alice", scope="orders:read")
            writer = issuer.mint("alice", scope="orders:write")
            bound = issuer.mint("alice", cnf={"jkt": key_dpop.thumbprint})
            cases: list[tuple[str, str, str, dict[str, str], int]] = [
                ("public route, no token", "GET", "/health", {}, 200),
                ("valid token", "GET", "/orders", {"Authorization": f"Bearer {reader}"}, 200),
                ("no token", "GET", "/orders", {}, 401),
                ("missing scope", "GET", "/orders", {"Authorization": f"Bearer {writer}"}, 403),
                ("DPoP-bound token sent as Bearer", "GET", "/orders", {"Authorization": f"Bearer {bound}"}, 401),
                ("no rule covers it", "DELETE", "/orders", {"Authorization": f"Bearer {reader}"}, 403),
                ("forged X-Ztmw-Subject", "GET", "/health", {"X-Ztmw-Subject": "admin"}, 200),
                ("DPoP-bound token + proof", "POST", "/payments", {
                    "Authorization": f"DPoP {bound}",
                    "DPoP": key_dpop.proof("POST", url + "/payments", access_token=bound)}, 200),
            ]
            for name, method, path, headers, expected in cases:
                async with session.request(method, url + path, headers=headers) as response:
                    body = await response.text()
                    seen = body if body.startswith("upstream") else \
                        "; ".join(response.headers.getall("WWW-Authenticate", [])) or "-"
                    results.append((front, name, expected, response.status, seen[:110]))
    shutil.rmtree(work, ignore_errors=True)
    upstream = "nginx (no Python in it)" if binary else "a raw-socket HTTP/1.1 responder (nginx not installed)"
    print(f"upstream: {upstream}; fronts: gateway proxy mode" + (", nginx auth_request + gateway" if binary else ""))
    widths = [max(len(str(r[i])) for r in results) for i in range(5)]
    print("  ".join(h.ljust(w) for h, w in zip(("front", "scenario", "want", "got", "what came back"), widths)))
    for row in results:
        mark = "" if row[2] == row[3] else "  FAIL"
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + mark)
    failed = sum(1 for r in results if r[2] != r[3])
    print(f"\n{len(results) - failed} of {len(results)} gateway scenarios behaved as expected")
    return 1 if failed else 0
