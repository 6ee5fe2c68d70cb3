"""Gateway fixtures: a real upstream on loopback that reports what reached it, a signing key, configs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from ztmw.testing import DevIssuer
from ztmw.testing.issuer import _generate

from ..conftest import AUDIENCE

BIG = 100 * 1024 * 1024
_BLOCK = b"z" * (256 * 1024)


class Upstream:
    """An HTTP service that knows nothing of ztmw: it echoes what it received and counts requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_get("/big", self._big)
        app.router.add_post("/upload", self._upload)
        app.router.add_get("/slow", self._slow)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def _seen(self, request: web.Request, body_bytes: int) -> dict[str, Any]:
        seen = {"method": request.method, "target": request.raw_path, "body_bytes": body_bytes,
                "headers": [[k, v] for k, v in request.headers.items()]}
        self.requests.append(seen)
        return seen

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = self._seen(request, len(body))
        return web.Response(text=json.dumps(seen), content_type="application/json",
                            headers={"X-Upstream": "yes", "Connection": "keep-alive, X-Hop", "X-Hop": "drop me"})

    async def _big(self, request: web.Request) -> web.StreamResponse:
        self._seen(request, 0)
        response = web.StreamResponse(headers={"Content-Length": str(BIG)})
        await response.prepare(request)
        for _ in range(BIG // len(_BLOCK)):
            await response.write(_BLOCK)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            total += len(chunk)
        self._seen(request, total)
        return web.json_response({"body_bytes": total})

    async def _slow(self, request: web.Request) -> web.Response:
        self._seen(request, 0)
        await asyncio.wait_for(self._release.wait(), 30)  # until the test is over: headers never come in time
        return web.Response(text="late")


def header(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await Upstream().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gateway signing key as `ztmw token keygen` writes it (private JWK with alg and kid)."""
    key = _generate("ES256")
    path = tmp_path_factory.mktemp("gateway") / "gateway-key.json"
    path.write_text(json.dumps({**key.key.as_dict(private=True), "alg": "ES256", "kid": key.kid}))
    return path


GATEWAY_RULES = [
    {"id": "health", "path": "/health", "methods": ["GET"], "public": True},
    {"id": "read", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]},
    {"id": "write", "path": "/items", "methods": ["POST"], "scopes": ["items:write"]},
    {"id": "own", "path": "/users/{user}/items", "methods": ["GET"], "scopes": ["items:read"], "owner": "user"},
    {"id": "pay", "path": "/payments", "methods": ["POST"], "binding": "dpop"},
    {"id": "admin", "path": "/admin", "min_aal": 2, "acr_values": ["urn:example:acr:mfa"]},
    {"id": "big", "path": "/big", "methods": ["GET"], "scopes": ["items:read"]},
    {"id": "upload", "path": "/upload", "methods": ["POST"], "scopes": ["items:write"]},
    {"id": "slow", "path": "/slow", "methods": ["GET"], "scopes": ["items:read"]},
]


def gateway_config(issuer: DevIssuer, gateway: dict[str, Any], **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "resource": {"identifier": AUDIENCE, "public_origin": "https://api.example.com", "realm": "api"},
        "issuers": [issuer.issuer_config(audiences=[AUDIENCE])],
        "verifiers": {"enabled": ["bearer", "dpop"]},
        "trust": {"acr": {"urn:example:acr:mfa": {"aal": 2}}},
        "rules": GATEWAY_RULES,
        "gateway": gateway,
    }
    config.update(sections)
    return config
