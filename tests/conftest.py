"""Shared fixtures: a real development issuer, a protected sample app on a real loopback server, Redis."""

from __future__ import annotations

import os
import socket
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from ztmw.testing import DevIssuer, FakeClock
from ztmw.testing.certs import TestCA

AUDIENCE = "https://api.example.com"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def redis_available() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_url() -> str:
    """A Redis database for tests; skipped with a reason when none answers, a failure in CI (ZTMW_REQUIRE_REDIS=1)."""
    if not redis_available():
        message = f"no Redis answers on {REDIS_HOST}:{REDIS_PORT}"
        if os.environ.get("ZTMW_REQUIRE_REDIS") == "1":
            pytest.fail(message + " and ZTMW_REQUIRE_REDIS=1 (CI must run the Redis tests)")
        pytest.skip(message + "; start redis-server to run this test")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/15"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for tests that talk to loopback servers themselves."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def issuer(clock: FakeClock) -> AsyncIterator[DevIssuer]:
    async with DevIssuer(audience=AUDIENCE, clock=clock) as dev_issuer:
        yield dev_issuer


def base_config(issuer: DevIssuer, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "resource": {"identifier": AUDIENCE, "public_origin": "http://127.0.0.1", "realm": "api"},
        "issuers": [issuer.issuer_config(audiences=[AUDIENCE])],
        "rules": [
            {"id": "health", "path": "/health", "methods": ["GET"], "public": True},
            {"id": "read", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]},
            {"id": "own", "path": "/users/{user}/items", "methods": ["GET"], "scopes": ["items:read"],
             "owner": "user"},
        ],
    }
    config.update(sections)
    return config


def items_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/health", ok)
    app.router.add_get("/items", ok)
    app.router.add_get("/users/{user}/items", ok)
    app.router.add_get("/admin", ok)
    return app


AppFactory = Callable[..., web.Application]


@pytest.fixture(scope="module")
def ca() -> TestCA:
    """A throw-away certificate authority (trustme underneath) for the client-certificate tests."""
    return TestCA()
