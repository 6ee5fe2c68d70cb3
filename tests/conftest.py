"""Shared fixtures: a real development issuer, a protected sample app on a real loopback server, Redis."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

import ztmw
from ztmw.authenticate import Authenticator
from ztmw.testing import DevIssuer, FakeClock
from ztmw.testing.certs import TestCA

AUDIENCE = "https://api.example.com"
METADATA_URL = AUDIENCE + "/.well-known/oauth-protected-resource"  # what base_config's resource publishes
MINIMAL_CONFIG = ztmw.load_config({"resource": {"identifier": AUDIENCE}})  # for a plugin's deps alone
# the DPoP end-to-end modules: the algorithms a DPoP challenge names by default, and the nonce settings
DEFAULT_ALGS = "ES256 EdDSA PS256"
NONCE_SECRET_ENV = "ZTMW_TEST_E2E_DPOP_NONCE_SECRET"
NONCE_LIFETIME = 60
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


# -- raw requests and audit trails, for the modules that send bytes as they are or read decisions ----------

def raw_get(path: str, header_lines: bytes) -> bytes:
    """A GET request as bytes, `header_lines` (each ending in CRLF) sent exactly as given."""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + header_lines + b"Connection: close\r\n\r\n"


async def raw(client: Any, request: bytes) -> int:
    """Send bytes as they are (no client-side normalisation) and return the status code of the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


def decisions(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] in ("ztmw.decision", "ztmw.security")]


def with_query(query: str, token: str, path: str = "/items") -> bytes:
    """A request with `query` sent byte for byte (an HTTP client would normalise the percent-encoding)."""
    return raw_get(f"{path}?{query}", f"Authorization: Bearer {token}\r\n".encode("ascii"))


@pytest.fixture(params=["plain", "full"])
def decision_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test twice, so the two ways a request is decided must answer alike: "plain", as shipped (a plain
    bearer request decided without awaiting, `Pipeline.decide_plain`), and "full" (every request by
    `Pipeline.evaluate`). Apply with `pytestmark = pytest.mark.usefixtures("decision_path")`."""
    if request.param == "full":  # read when the middleware is made: each test's setup() sees this
        monkeypatch.setattr(Authenticator, "immediate", property(lambda self: False))
    return str(request.param)


@pytest.fixture
def full_runs(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`full_runs(pipeline)` -> a list that grows by one each time the full pipeline (not the memo) decides:
    `evaluate`, or `decide_plain` when it decided (when it cannot, `evaluate` decides next)."""

    def install(pipeline: ztmw.Pipeline) -> list[int]:
        runs: list[int] = []
        evaluate, decide_plain = pipeline.evaluate, pipeline.decide_plain

        async def counted(view: Any) -> Any:
            runs.append(1)
            return await evaluate(view)

        def counted_plain(view: Any, credential: Any) -> Any:
            outcome = decide_plain(view, credential)
            if outcome is not None:
                runs.append(1)
            return outcome

        monkeypatch.setattr(pipeline, "evaluate", counted)
        monkeypatch.setattr(pipeline, "decide_plain", counted_plain)
        return runs

    return install


# -- protected apps and calls, for the modules that drive ztmw.setup or the stage middlewares -------------

def staged_app(pipeline: ztmw.Pipeline, app: web.Application | None = None) -> web.Application:
    """An app (the items app by default) protected by the three stage middlewares used alone, as an app author
    would compose them."""

    async def lifetime(app: web.Application) -> Any:
        await pipeline.start()
        yield
        await pipeline.close()

    app = app if app is not None else items_app()
    app.middlewares.extend([ztmw.audit_middleware(pipeline), ztmw.authentication_middleware(pipeline),
                            ztmw.authorization_middleware(pipeline)])
    app.cleanup_ctx.append(lifetime)
    return app


def whoami_app() -> web.Application:
    """Answers with what the handler sees: the principal, trust and decision ztmw published on the request."""

    async def whoami(request: web.Request) -> web.Response:
        principal, trust, decision = request[ztmw.PRINCIPAL], request[ztmw.TRUST], request[ztmw.DECISION]
        seen = {"sub": principal.subject if principal else None, "aal": trust.aal, "rule": decision.rule_id}
        if trust.auth_age is not None:
            seen["auth_age"] = trust.auth_age
        return web.json_response(seen)

    app = web.Application()
    for path in ("/items", "/users/{user}/items", "/health"):
        app.router.add_get(path, whoami)
    return app


async def protected(aiohttp_client: Any, config: dict[str, Any], clock: FakeClock,
                    app: web.Application | None = None) -> tuple[Any, ztmw.Pipeline]:
    app = app if app is not None else whoami_app()
    pipeline = ztmw.setup(app, config, clock=clock)
    return await aiohttp_client(app), pipeline


async def call(client: Any, token: str | None = None, path: str = "/items", method: str = "GET",
               **headers: Any) -> tuple[int, Any]:
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {token}")
    async with client.request(method, path, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


# -- the decision memo: an app that echoes what the handler was given, and remembered sightings ------------

def memo_size(pipeline: ztmw.Pipeline) -> int:
    assert pipeline.memo is not None
    return len(pipeline.memo)


def echo_app() -> web.Application:
    """Answers with what the handler was given: principal, rule and match info (what an owner rule reads)."""

    async def echo(request: web.Request) -> web.Response:
        principal, decision = request[ztmw.PRINCIPAL], request[ztmw.DECISION]
        return web.json_response({"sub": principal.subject if principal else None, "rule": decision.rule_id,
                                  "match": dict(request.match_info)})

    app = web.Application()
    for path in ("/items", "/users/{user}/items", "/files/{name:.*}"):
        app.router.add_get(path, echo)
    app.router.add_route("*", "/any", echo)
    return app


def echo_config(issuer: DevIssuer, **sections: Any) -> dict[str, Any]:
    config = base_config(issuer, **sections)
    config["rules"] += [
        {"id": "files", "path": "/files/{name:.*}", "methods": ["GET"], "scopes": ["items:read"]},
        {"id": "any", "path": "/any", "scopes": ["items:read"]},  # every method
    ]
    return config


async def warm(client: Any, pipeline: ztmw.Pipeline, token: str, path: str = "/items", **headers: Any) -> None:
    """Two sightings: the second is a verification-cache hit and is remembered."""
    before = memo_size(pipeline)
    for _ in range(2):
        assert (await call(client, token, path, **headers))[0] == 200
    assert memo_size(pipeline) == before + 1


# -- audit reasons and requests the checklist tests share ------------------------------------------------

def reasons(events: list[Any]) -> list[str]:
    """The audit reasons of the requests made while `events` was captured."""
    return [str(e["reason"]) for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]


def dpop_headers(token: str, proof: str) -> dict[str, str]:
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


async def bearer_client(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock,
                        handler_calls: list[str] | None = None) -> Any:
    """The base config (bearer only) with a POST route, on a real server; handler calls are recorded."""
    async def ok(request: web.Request) -> web.Response:
        if handler_calls is not None:
            handler_calls.append(request.method)
        return web.json_response({"ok": True})

    return await post_route_client(aiohttp_client, issuer, clock, "/items", ok)


async def post_route_client(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, path: str, handler: Any,
                            app: web.Application | None = None) -> Any:
    """`handler` as `POST path` (scope items:read) beside the base config's routes, protected, on a server."""
    app = app if app is not None else items_app()
    app.router.add_post(path, handler)
    config = base_config(issuer)
    config["rules"] = config["rules"] + [{"id": "post", "path": path, "methods": ["POST"],
                                          "scopes": ["items:read"]}]
    ztmw.setup(app, config, clock=clock)
    return await aiohttp_client(app)


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Remove every key a test wrote under its own prefix (never FLUSHDB: the Redis is shared)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


OPAQUE_ISSUER = "https://opaque.example.com"


async def introspection_endpoint(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch,
                                 secret_env: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """A real RFC 7662 endpoint on loopback answering from a dict the test fills (inactive for any other
    token), and the `[plugins.introspection]` settings that use it (client secret in `secret_env`)."""
    answers: dict[str, dict[str, Any]] = {}

    async def introspect(request: web.Request) -> web.Response:
        form = await request.post()
        return web.json_response(answers.get(str(form["token"]), {"active": False}))

    endpoint = web.Application()
    endpoint.router.add_post("/introspect", introspect)
    server = await aiohttp_server(endpoint)
    monkeypatch.setenv(secret_env, "s3cret")
    return answers, {"endpoint": f"http://127.0.0.1:{server.port}/introspect", "client_id": "rs",
                     "client_secret_env": secret_env, "issuer": OPAQUE_ISSUER}
