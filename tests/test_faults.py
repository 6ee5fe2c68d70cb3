"""Fault behaviour against real components (issue "Reliability and hardening", part 1).

Every case runs a real key server (an aiohttp app serving a `DevIssuer`'s JWK Set, which the test can stop,
slow down or make lie) or a real, private `redis-server`, and a real ztmw app behind a real client. The only
double is the `FakeClock` ztmw and the issuer share, which is how cooldowns and cache lifetimes pass.

Each case checks outcomes only, never timings: no 500, no allow that should be a deny, recovery without
restarting ztmw, and a bounded answer (short `fetch_timeout` / `redis_timeout`, and an `asyncio.timeout`
guard that turns a hang into a failure instead of a stuck suite).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import DevIssuer, DPoPKey, FakeClock
from ztmw.testing.http import free_port

from .conftest import AUDIENCE, items_app, reasons
from .guarded_http import GUARD, bearer, call

FETCH_TIMEOUT = 0.5  # seconds for one JWKS fetch: a slow key server must cost a request this much, no more
COOLDOWN = 30  # refetch_cooldown of the issuer under test
CACHE_TTL = 120  # cache.max_ttl: how long a verified token is remembered at most
REDIS_TIMEOUT = 0.3  # plugins.dpop.redis_timeout


# -- a key server the test controls ------------------------------------------------------------------------


class KeyServer:
    """Serves `issuer.jwks()` at /jwks on a fixed loopback port, or misbehaves as `mode` says.

    Modes: ok, slow (answers only after `release` or 5 s), html (not JSON), not_jwks (JSON without a `keys`
    array), oversized (a valid-looking document over the 512 KiB cap), status_500, redirect. `stop()` closes
    the port (connection refused) and `start()` opens the same port again.
    """

    def __init__(self, issuer: DevIssuer, port: int) -> None:
        self.issuer = issuer
        self.port = port
        self.mode = "ok"
        self.hits = 0
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        mode = self.mode
        if mode == "slow":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.release.wait(), 5)
            return web.json_response(self.issuer.jwks())
        if mode == "html":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if mode == "not_jwks":
            return web.json_response({"keys": "none today"})
        if mode == "oversized":
            document = self.issuer.jwks()
            document["padding"] = "x" * (600 * 1024)
            return web.json_response(document)
        if mode == "status_500":
            return web.json_response(self.issuer.jwks(), status=500)
        if mode == "redirect":
            raise web.HTTPFound("http://127.0.0.1:1/jwks")
        return web.json_response(self.issuer.jwks())

    async def start(self) -> None:
        assert self._runner is None
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        self.release.set()  # a slow answer still pending must not hold the shutdown
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.release = asyncio.Event()


@pytest.fixture
async def keys(clock: FakeClock) -> AsyncIterator[KeyServer]:
    """A key server that is NOT running yet: each test decides when (and whether) it comes up."""
    port = free_port()
    issuer = DevIssuer(f"http://127.0.0.1:{port}", audience=AUDIENCE, clock=clock)
    server = KeyServer(issuer, port)
    try:
        yield server
    finally:
        await server.stop()


def fault_config(keys: KeyServer, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "resource": {"identifier": AUDIENCE, "public_origin": "http://127.0.0.1", "realm": "api"},
        "issuers": [{
            "issuer": keys.issuer.issuer,
            "jwks_uri": keys.uri,
            "algorithms": ["ES256"],
            "audiences": [AUDIENCE],
            "fetch_timeout": FETCH_TIMEOUT,
            "refetch_cooldown": COOLDOWN,
        }],
        "cache": {"max_ttl": CACHE_TTL},
        "rules": [
            {"id": "health", "path": "/health", "methods": ["GET"], "public": True},
            {"id": "read", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]},
        ],
    }
    config.update(sections)
    return config


async def protected_client(aiohttp_client: Any, keys: KeyServer, clock: FakeClock) -> Any:
    app = items_app()
    ztmw.setup(app, fault_config(keys), clock=clock)
    return await aiohttp_client(app)


def forge(token: str) -> str:
    """The same token with another signature tail."""
    return token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")


def assert_unavailable(result: tuple[int, Any, str]) -> None:
    """R-UPSTREAM: 503, no challenge (the client did nothing wrong), a fixed body."""
    status, headers, body = result
    assert status == 503, (status, body)
    assert "WWW-Authenticate" not in headers
    assert json.loads(body) == {"error": "temporarily_unavailable"}


def bearer_error(headers: Any) -> str | None:
    for line in headers.getall("WWW-Authenticate", []):
        if line.startswith("Bearer "):
            for part in line[7:].split(", "):
                name, _, value = part.partition("=")
                if name == "error":
                    return value.strip('"')
    return None


def assert_invalid_token(result: tuple[int, Any, str]) -> None:
    status, headers, body = result
    assert status == 401, (status, body)
    assert bearer_error(headers) == "invalid_token"


def assert_refused_or_unavailable(result: tuple[int, Any, str]) -> None:
    """An unknown kid while keys cannot be fetched: 401 invalid_token or 503, each in its proper shape."""
    if result[0] == 503:
        assert_unavailable(result)
    else:
        assert_invalid_token(result)


# -- JWKS server down at start -----------------------------------------------------------------------------


async def test_jwks_down_at_start_is_503_until_it_comes_up_then_200_without_restart(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    client = await protected_client(aiohttp_client, keys, clock)  # start-up does not fail (DESIGN §4.5)
    token = keys.issuer.mint(scope="items:read")
    for _ in range(3):
        assert_unavailable(await bearer(client, token))
    clock.advance(COOLDOWN + 1)  # a request past the cooldown tries again, and the server is still down
    assert_unavailable(await bearer(client, token))
    assert (await call(client, "/health"))[0] == 200  # public routes need no keys
    await keys.start()
    clock.advance(COOLDOWN + 1)
    status, _, body = await bearer(client, token)
    assert status == 200, body
    # and a forged token is still refused now that keys are there (recovery is not "allow everything")
    assert_invalid_token(await bearer(client, forge(token)))


async def test_jwks_down_at_start_heals_by_the_background_retry_alone(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    """No clock movement at all: only the background retry (DESIGN §4.5) can load the keys."""
    client = await protected_client(aiohttp_client, keys, clock)
    token = keys.issuer.mint(scope="items:read")
    assert_unavailable(await bearer(client, token))
    await keys.start()
    statuses = []
    async with asyncio.timeout(GUARD):
        while True:
            result = await bearer(client, token)
            statuses.append(result[0])
            if result[0] != 503:
                break
            await asyncio.sleep(0.1)
    assert statuses[-1] == 200
    assert set(statuses[:-1]) <= {503}
    assert keys.hits >= 1


# -- JWKS server down mid-run ------------------------------------------------------------------------------


async def test_jwks_down_mid_run_cached_keys_and_tokens_keep_working(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    await keys.start()
    client = await protected_client(aiohttp_client, keys, clock)
    cached = keys.issuer.mint(scope="items:read", lifetime=3600)
    assert (await bearer(client, cached))[0] == 200
    await keys.stop()

    # a token verified before: from the verification cache
    assert (await bearer(client, cached))[0] == 200
    # a NEW token whose kid is known: from the cached keys, no fetch needed
    fresh = keys.issuer.mint(scope="items:read", lifetime=3600)
    assert (await bearer(client, fresh))[0] == 200
    # past the cache lifetime the first token is verified again, still from the cached keys
    clock.advance(CACHE_TTL + 1)
    assert (await bearer(client, cached))[0] == 200
    # forged and expired tokens are still refused while the key server is away
    assert_invalid_token(await bearer(client, forge(fresh)))
    assert_invalid_token(await bearer(client, keys.issuer.mint(scope="items:read", lifetime=-120)))

    # an unknown kid: the refetch fails, so it cannot be verified; never 200, never 500
    new_kid = keys.issuer.add_key("ES256")
    unknown = keys.issuer.mint(scope="items:read", key=new_kid)
    assert_refused_or_unavailable(await bearer(client, unknown))
    clock.advance(COOLDOWN + 1)  # the refetch is attempted now, and fails
    assert_refused_or_unavailable(await bearer(client, unknown))
    assert (await bearer(client, fresh))[0] == 200  # the failed fetch threw no key away

    await keys.start()
    clock.advance(COOLDOWN + 1)
    assert (await bearer(client, unknown))[0] == 200  # back without restarting ztmw
    assert (await bearer(client, fresh))[0] == 200


async def test_unknown_kid_while_jwks_is_down_is_503_so_the_client_keeps_its_token(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    """A kid the key server would know, asked for while it is down: nobody can say the token is bad (§4.4)."""
    await keys.start()
    client = await protected_client(aiohttp_client, keys, clock)
    await keys.stop()
    unknown = keys.issuer.mint(scope="items:read", key=keys.issuer.add_key("ES256"))
    clock.advance(COOLDOWN + 1)
    assert_unavailable(await bearer(client, unknown))


# -- slow key server ---------------------------------------------------------------------------------------


async def test_slow_jwks_at_start_is_503_not_a_hang_and_recovers(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    keys.mode = "slow"
    await keys.start()
    async with asyncio.timeout(GUARD):
        client = await protected_client(aiohttp_client, keys, clock)  # the start-up fetch times out
    token = keys.issuer.mint(scope="items:read")
    assert_unavailable(await bearer(client, token))
    clock.advance(COOLDOWN + 1)  # this request waits for a fetch that times out after fetch_timeout
    assert_unavailable(await bearer(client, token))
    assert keys.hits >= 2
    keys.mode = "ok"
    keys.release.set()
    clock.advance(COOLDOWN + 1)
    status, _, body = await bearer(client, token)
    assert status == 200, body


async def test_slow_jwks_mid_run_known_kid_unaffected_unknown_kid_bounded(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    await keys.start()
    client = await protected_client(aiohttp_client, keys, clock)
    keys.mode = "slow"
    fresh = keys.issuer.mint(scope="items:read")
    assert (await bearer(client, fresh))[0] == 200
    unknown = keys.issuer.mint(scope="items:read", key=keys.issuer.add_key("ES256"))
    clock.advance(COOLDOWN + 1)
    # several requests wait for the same (single-flight) fetch, which times out: all answered, none allowed
    results = await asyncio.gather(*(bearer(client, unknown) for _ in range(5)))
    for result in results:
        assert_refused_or_unavailable(result)
    assert keys.hits == 2  # start-up + one shared refetch, not one per request
    assert (await bearer(client, fresh))[0] == 200
    keys.mode = "ok"
    keys.release.set()
    clock.advance(COOLDOWN + 1)
    assert (await bearer(client, unknown))[0] == 200


# -- garbage from the key server ---------------------------------------------------------------------------

BAD_DOCUMENTS = ["html", "not_jwks", "oversized", "status_500", "redirect"]


@pytest.mark.parametrize("mode", BAD_DOCUMENTS)
async def test_bad_jwks_document_mid_run_keeps_the_old_keys(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock, mode: str
) -> None:
    await keys.start()
    client = await protected_client(aiohttp_client, keys, clock)
    keys.mode = mode
    old_kid_token = keys.issuer.mint(scope="items:read")
    unknown = keys.issuer.mint(scope="items:read", key=keys.issuer.add_key("ES256"))
    clock.advance(COOLDOWN + 1)
    hits = keys.hits
    assert_refused_or_unavailable(await bearer(client, unknown))
    assert keys.hits == hits + 1  # it did fetch, and refused what it got
    assert (await bearer(client, old_kid_token))[0] == 200  # old keys kept (stale-if-error, JWKS-10)
    keys.mode = "ok"
    clock.advance(COOLDOWN + 1)
    assert (await bearer(client, unknown))[0] == 200


@pytest.mark.parametrize("mode", BAD_DOCUMENTS)
async def test_bad_jwks_document_at_start_is_503_then_recovers(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock, mode: str
) -> None:
    keys.mode = mode
    await keys.start()
    client = await protected_client(aiohttp_client, keys, clock)
    token = keys.issuer.mint(scope="items:read")
    assert_unavailable(await bearer(client, token))
    keys.mode = "ok"
    clock.advance(COOLDOWN + 1)
    assert (await bearer(client, token))[0] == 200


# -- rotation ----------------------------------------------------------------------------------------------


async def test_rotation_new_kid_is_picked_up_by_the_refetch_after_the_cooldown(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    await keys.start()
    client = await protected_client(aiohttp_client, keys, clock)
    assert keys.hits == 1
    keys.issuer.rotate_key()
    rotated = keys.issuer.mint(scope="items:read")
    # within the cooldown of the start-up fetch: no refetch, the kid is unknown
    assert_invalid_token(await bearer(client, rotated))
    assert_invalid_token(await bearer(client, rotated))
    assert keys.hits == 1
    clock.advance(COOLDOWN + 1)
    assert (await bearer(client, rotated))[0] == 200
    assert keys.hits == 2
    # more unknown kids within the new cooldown cost no fetch at all (JWKS-10)
    stranger = DevIssuer(keys.issuer.issuer, audience=AUDIENCE, clock=clock).mint(scope="items:read")
    for _ in range(3):
        assert_invalid_token(await bearer(client, stranger))
    assert keys.hits == 2


async def test_removed_key_stops_working_after_the_refetch_even_for_cached_tokens(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    """A key that leaves the JWKS stops verifying: new tokens at once, and the tokens it verified before
    (already in the verification cache) too, not only when their cache entry runs out (cache.max_ttl).

    At commit b458bb9 the cached token kept working until cache.max_ttl / exp (reported to the lead); the
    `still_trusted` re-check in the working tree (authenticate.py / bearer.py) is what makes this pass.
    """
    await keys.start()
    client = await protected_client(aiohttp_client, keys, clock)
    seen = keys.issuer.mint(scope="items:read", lifetime=3600)
    unseen = keys.issuer.mint(scope="items:read", lifetime=3600)
    assert (await bearer(client, seen))[0] == 200
    assert (await bearer(client, seen))[0] == 200  # a cache hit
    keys.issuer.rotate_key()  # the old key leaves the JWKS
    assert (await bearer(client, seen))[0] == 200  # nothing fetched yet: ztmw cannot know
    clock.advance(COOLDOWN + 1)
    assert (await bearer(client, keys.issuer.mint(scope="items:read")))[0] == 200  # triggers the refetch
    assert_invalid_token(await bearer(client, unseen))
    assert_invalid_token(await bearer(client, seen))
    clock.advance(CACHE_TTL)
    assert_invalid_token(await bearer(client, seen))


# -- Redis replay store ------------------------------------------------------------------------------------


class PrivateRedis:
    """A throw-away `redis-server` on its own port (no persistence), which the test may stop and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("private redis-server did not start")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel does), but nothing ever answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _proc_state(self.process.pid) != "T":
            assert time.monotonic() < deadline, "redis-server did not stop"
            time.sleep(0.01)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


class DPoPApi:
    def __init__(self, client: Any, origin: str, clock: FakeClock, issuer: DevIssuer) -> None:
        self.client, self.origin, self.clock, self.issuer = client, origin, clock, issuer
        self.key = DPoPKey()
        self.token = issuer.mint("alice", scope="items:read", cnf={"jkt": self.key.thumbprint}, lifetime=3600)
        self.plain = issuer.mint("bob", scope="items:read", lifetime=3600)

    async def dpop(self, proof: str | None = None) -> tuple[int, Any, str]:
        proof = proof or self.new_proof()
        return await call(self.client, "/items", {"Authorization": f"DPoP {self.token}", "DPoP": proof})

    def new_proof(self) -> str:
        return self.key.proof("GET", self.origin + "/items", access_token=self.token, iat=int(self.clock()))

    async def bearer(self) -> tuple[int, Any, str]:
        return await bearer(self.client, self.plain)


@pytest.fixture
async def dpop_api(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, private_redis: PrivateRedis
) -> DPoPApi:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = {
        "resource": {"identifier": AUDIENCE, "public_origin": origin},
        "issuers": [issuer.issuer_config(audiences=[AUDIENCE])],
        "verifiers": {"enabled": ["bearer", "dpop"]},
        "dpop": {"replay_store": private_redis.url},
        "plugins": {"dpop": {"redis_timeout": REDIS_TIMEOUT}},
        "rules": [
            {"id": "health", "path": "/health", "methods": ["GET"], "public": True},
            {"id": "read", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]},
        ],
    }
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    return DPoPApi(client, origin, clock, issuer)


async def test_redis_down_dpop_fails_closed_bearer_keeps_working_and_restart_heals(
    dpop_api: DPoPApi, private_redis: PrivateRedis
) -> None:
    assert (await dpop_api.dpop())[0] == 200
    private_redis.stop()
    for _ in range(3):
        assert_unavailable(await dpop_api.dpop())
    replayed = dpop_api.new_proof()
    assert_unavailable(await dpop_api.dpop(replayed))
    assert_unavailable(await dpop_api.dpop(replayed))  # a replay is not let through either
    assert (await dpop_api.bearer())[0] == 200
    assert (await call(dpop_api.client, "/health"))[0] == 200

    private_redis.start()  # same port, empty store
    status, _, body = await dpop_api.dpop()
    assert status == 200, body  # the pooled connection to the dead server is replaced by itself
    proof = dpop_api.new_proof()
    assert (await dpop_api.dpop(proof))[0] == 200
    status, headers, _ = await dpop_api.dpop(proof)  # and replay detection works again
    assert status == 401 and "invalid_dpop_proof" in headers.get("WWW-Authenticate", "")


async def test_redis_stalled_dpop_is_503_within_the_store_timeout_not_a_hang(
    dpop_api: DPoPApi, private_redis: PrivateRedis
) -> None:
    assert (await dpop_api.dpop())[0] == 200
    private_redis.pause()
    try:
        stalled = dpop_api.new_proof()
        assert_unavailable(await dpop_api.dpop(stalled))
        assert_unavailable(await dpop_api.dpop())
        assert (await dpop_api.bearer())[0] == 200
    finally:
        private_redis.resume()
    status, _, body = await dpop_api.dpop()
    assert status == 200, body
    # the stalled SET may still have run once Redis woke up: resending that proof is then a replay; either
    # way it is never allowed twice
    first = await dpop_api.dpop(stalled)
    second = await dpop_api.dpop(stalled)
    assert [first[0], second[0]].count(200) <= 1
    assert second[0] == 401


# -- RESP-20: an unreachable key source is a 503 without a challenge, the token never echoed or logged ---

async def test_resp_20_key_source_unreachable_is_503_without_challenge(
    aiohttp_client: Any, keys: KeyServer, clock: FakeClock
) -> None:
    client = await protected_client(aiohttp_client, keys, clock)  # the key server never comes up
    token = keys.issuer.mint(scope="items:read")
    with capture_logs() as events:
        result = await bearer(client, token)
    assert_unavailable(result)
    assert token not in result[2] and token not in str(dict(result[1]))
    assert token not in json.dumps(events, default=str)
    assert reasons(events) == ["jwks_unavailable"]
