"""KeySet: what a JWKS may contain (JWKS-01..13) and how it is fetched (real loopback servers, fake clock)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from ztmw.config import Config, IssuerConfig, load_config
from ztmw.errors import ConfigurationError, InvalidToken, UpstreamUnavailable
from ztmw.testing.clock import FakeClock
from ztmw.testing.issuer import DevIssuer
from ztmw.typing import PluginDeps
from ztmw_plugins.jwks import MAX_JWKS_BYTES, MAX_KEYS, JWKSRejected, KeySet, parse_jwks


class Hooks:
    """Stands in for the app's lifetime: the plugin registers hooks, the test runs them."""

    def __init__(self) -> None:
        self.startup: list[Callable[[], Awaitable[None]]] = []
        self.cleanup: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        for hook in self.startup:
            await hook()

    async def stop(self) -> None:
        for hook in reversed(self.cleanup):
            await hook()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def rsa_jwk(bits: int, kid: str) -> dict[str, Any]:
    """An RSA public JWK of any size (joserfc warns below 2048 bits, so build it by hand)."""
    numbers = rsa.generate_private_key(65537, bits).public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "kid": kid, "n": b64(n), "e": "AQAB"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BASE = load_config({"resource": {"identifier": "https://api.example.com"}})


def load(**table: Any) -> Config:
    table.setdefault("issuer", "https://as.example.com")
    return load_config({"resource": {"identifier": "https://api.example.com"},
                        "issuers": [{k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}]})


def issuer_config(**table: Any) -> IssuerConfig:
    """One validated `[[issuers]]` table, through the same loader the app uses."""
    return load(**table).issuers[0]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_750_000_000.0)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def make_keyset(
    session: aiohttp.ClientSession, clock: FakeClock
) -> AsyncIterator[Callable[..., Awaitable[KeySet]]]:
    started: list[Hooks] = []

    async def make(cfg: IssuerConfig, *, start: bool = True, **options: Any) -> KeySet:
        hooks = Hooks()
        deps = PluginDeps(config=replace(BASE, issuers=(cfg,)), clock=clock, http=lambda: session, logger=structlog.get_logger(),
                          on_startup=hooks.startup.append, on_cleanup=hooks.cleanup.append)
        keyset = KeySet(cfg, deps, **options)
        started.append(hooks)
        if start:
            await hooks.start()
        return keyset

    yield make
    for hooks in started:
        await hooks.stop()


@pytest.fixture
def issuer() -> DevIssuer:
    return DevIssuer("https://as.example.com")


class JWKSServer:
    """A hand-made key server whose answer the test chooses; counts requests."""

    def __init__(self) -> None:
        self.count = 0
        self.respond: Callable[[web.Request], Awaitable[web.StreamResponse]] = self.ok
        self.document: Any = {"keys": []}
        self.release = asyncio.Event()

    async def ok(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.document)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.count += 1
        return await self.respond(request)


@pytest.fixture
async def jwks_server(aiohttp_server: Any) -> AsyncIterator[tuple[JWKSServer, str]]:
    state = JWKSServer()
    app = web.Application()
    app.router.add_get("/jwks", state.handle)
    app.router.add_get("/elsewhere", state.ok)
    server = await aiohttp_server(app)
    yield state, str(server.make_url("/jwks"))
    state.release.set()


# -- parse_jwks: the document and each key ----------------------------------------------------------------

def test_jwks_01_document_must_be_an_object_with_a_keys_array() -> None:
    for document in ([], {"keys": {}}, {"key": []}, "x", None):
        with pytest.raises(JWKSRejected):
            parse_jwks(document)


def test_jwks_01_unknown_kty_and_missing_members_are_ignored(issuer: DevIssuer) -> None:
    good = issuer.jwks()["keys"][0]
    index = parse_jwks({"keys": [
        {"kty": "XYZ", "kid": "a"}, {"kty": "EC", "kid": "b", "crv": "P-256"}, "not-a-key", None,
        {"kty": "OKP", "kid": "c", "crv": "X25519", "x": good["x"]}, good,
    ]})
    assert list(index.by_kid) == [good["kid"]]


def test_jwks_02_kid_is_an_exact_case_sensitive_map_key(issuer: DevIssuer) -> None:
    index = parse_jwks(issuer.jwks())
    assert index.find(issuer.kid, "ES256") is not None
    assert index.find(issuer.kid.upper(), "ES256") is None
    assert index.find(issuer.kid + " ", "ES256") is None


def test_jwks_02_non_string_kid_ignores_the_key(issuer: DevIssuer) -> None:
    jwk = {**issuer.jwks()["keys"][0], "kid": 7}
    assert parse_jwks({"keys": [jwk]}).keys == ()


def test_jwks_03_use_other_than_sig_and_key_ops_without_verify_are_ignored(issuer: DevIssuer) -> None:
    base = issuer.jwks()["keys"][0]
    for bad in ({"use": "enc"}, {"key_ops": ["sign"]}, {"key_ops": "verify"}, {"key_ops": []}):
        assert parse_jwks({"keys": [{**base, **bad}]}).keys == (), bad
    assert parse_jwks({"keys": [{**base, "key_ops": ["verify"]}]}).keys
    assert parse_jwks({"keys": [{k: v for k, v in base.items() if k != "use"}]}).keys


def test_jwks_04_jwk_alg_restricts_the_key_to_that_algorithm() -> None:
    jwk = rsa_jwk(2048, "r")
    assert parse_jwks({"keys": [jwk]}).keys[0].algorithms >= {"RS256", "PS256"}
    [key] = parse_jwks({"keys": [{**jwk, "alg": "PS256"}]}).keys
    assert key.algorithms == {"PS256"}
    assert parse_jwks({"keys": [{**jwk, "alg": "ES256"}]}).keys == ()  # alg of another key type
    assert parse_jwks({"keys": [{**jwk, "alg": "HS256"}]}).keys == ()


def test_jwks_05_ec_coordinates_must_have_full_length(issuer: DevIssuer) -> None:
    jwk = issuer.jwks()["keys"][0]
    short = {**jwk, "x": b64(unb64(jwk["x"])[1:])}
    padded = {**jwk, "y": b64(b"\x00" + unb64(jwk["y"]))}
    assert parse_jwks({"keys": [short, padded]}).keys == ()


def test_bcp_04_ec_point_not_on_the_curve_is_ignored(issuer: DevIssuer) -> None:
    jwk = issuer.jwks()["keys"][0]
    y = bytearray(unb64(jwk["y"]))
    y[-1] ^= 1
    assert parse_jwks({"keys": [{**jwk, "y": b64(bytes(y))}]}).keys == ()


def test_jwks_06_rsa_with_leading_zero_octets_is_ignored() -> None:
    jwk = rsa_jwk(2048, "r")
    assert parse_jwks({"keys": [{**jwk, "n": b64(b"\x00" + unb64(jwk["n"]))}]}).keys == ()
    assert parse_jwks({"keys": [{**jwk, "e": "AAEAAQ"}]}).keys == ()


def test_jose_12_rsa_keys_under_2048_bits_are_ignored() -> None:
    assert parse_jwks({"keys": [rsa_jwk(1024, "small")]}).keys == ()
    assert parse_jwks({"keys": [rsa_jwk(2048, "big")]}).keys


def test_jwks_07_oct_keys_are_ignored() -> None:
    oct_key = {"kty": "oct", "kid": "h", "k": "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcg"}
    assert parse_jwks({"keys": [oct_key]}).keys == ()


def test_jwks_private_members_in_a_published_key_ignore_it() -> None:
    jwk = {**DevIssuer("https://as.example.com").jwks()["keys"][0], "d": "AAAA"}
    assert parse_jwks({"keys": [jwk]}).keys == ()


def test_jwks_11_x5c_and_x5u_are_ignored(issuer: DevIssuer) -> None:
    jwk = {**issuer.jwks()["keys"][0], "x5c": ["not a certificate"], "x5u": "http://127.0.0.1:9/x"}
    [key] = parse_jwks({"keys": [jwk]}).keys
    assert "x5c" not in key.key.as_dict() and "x5u" not in key.key.as_dict()


def test_jwks_12_without_kid_only_a_single_fitting_key_is_chosen(issuer: DevIssuer) -> None:
    issuer.add_key("PS256")
    index = parse_jwks(issuer.jwks())
    assert index.find(None, "ES256") is index.by_kid[issuer.kid]
    issuer.add_key("ES256")
    assert parse_jwks(issuer.jwks()).find(None, "ES256") is None
    assert parse_jwks(issuer.jwks()).find(None, "ES384") is None


def test_jwks_13_duplicate_kid_ignores_every_key_with_it(issuer: DevIssuer) -> None:
    first = issuer.jwks()["keys"][0]
    second = {**DevIssuer("https://as.example.com").jwks()["keys"][0], "kid": first["kid"]}
    rsa_key = rsa_jwk(2048, first["kid"])
    for keys in ([first, second], [first, rsa_key]):
        index = parse_jwks({"keys": keys})
        assert index.keys == () and index.find(first["kid"], "ES256") is None


def test_jwks_10_key_count_is_capped() -> None:
    with pytest.raises(JWKSRejected):
        parse_jwks({"keys": [{"kty": "XYZ"}] * (MAX_KEYS + 1)})
    assert parse_jwks({"keys": [{"kty": "XYZ"}] * MAX_KEYS}).keys == ()


def test_at_14_pins_keep_only_pinned_kids(issuer: DevIssuer) -> None:
    other = issuer.add_key("ES256")
    index = parse_jwks(issuer.jwks(), pins=(issuer.kid,))
    assert list(index.by_kid) == [issuer.kid] and other not in index.by_kid


# -- KeySet from a file -----------------------------------------------------------------------------------

async def test_jwks_file_is_read_once_at_creation(tmp_path: Any, issuer: DevIssuer, make_keyset: Any) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(issuer.jwks()))
    keyset = await make_keyset(issuer_config(jwks_file=str(path)))
    path.unlink()
    assert (await keyset.key_for(issuer.kid, "ES256")).kid == issuer.kid
    with pytest.raises(InvalidToken) as info:
        await keyset.key_for("other", "ES256")
    assert info.value.reason == "unknown_key"


@pytest.mark.parametrize("content", [b"", b"[]", b'{"keys": 1}', b'\xef\xbb\xbf{"keys": []}', b"x" * (MAX_JWKS_BYTES + 1)])
async def test_broken_jwks_file_stops_start_up(tmp_path: Any, make_keyset: Any, content: bytes) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError):
        await make_keyset(issuer_config(jwks_file=str(path)))


async def test_missing_jwks_file_stops_start_up(tmp_path: Any, make_keyset: Any) -> None:
    with pytest.raises(ConfigurationError):
        await make_keyset(issuer_config(jwks_file=str(tmp_path / "absent.json")))


# -- KeySet from a URI ------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["http://as.example.com/jwks", "http://10.0.0.1/jwks", "ftp://127.0.0.1/jwks"])
def test_jwks_09_jwks_uri_must_be_https_except_on_loopback(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        issuer_config(jwks_uri=uri)
    assert issuer_config(jwks_uri="http://localhost:8080/jwks").jwks_uri == "http://localhost:8080/jwks"


async def test_jwks_09_keys_are_fetched_at_start_up(make_keyset: Any) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri))
        assert issuer.fetch_count == 1 and keyset.loaded
        assert (await keyset.key_for(issuer.kid, "ES256")).kid == issuer.kid
        assert issuer.fetch_count == 1


async def _assert_unavailable(keyset: KeySet) -> None:
    assert not keyset.loaded
    with pytest.raises(UpstreamUnavailable) as info:
        await keyset.key_for("any", "ES256")
    assert info.value.reason == "jwks_unavailable"


async def test_jwks_10_garbage_answer_leaves_the_issuer_unavailable(jwks_server: Any, make_keyset: Any) -> None:
    state, uri = jwks_server

    async def garbage(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"\x00not json{", content_type="application/json")

    state.respond = garbage
    await _assert_unavailable(await make_keyset(issuer_config(jwks_uri=uri)))


@pytest.mark.parametrize("document", [[], {"keys": "none"}, '{"keys": [], "keys": []}', '{"keys": [NaN]}'])
async def test_jwks_01_fetched_document_must_be_a_strict_jwks(jwks_server: Any, make_keyset: Any,
                                                              document: Any) -> None:
    state, uri = jwks_server

    async def answer(request: web.Request) -> web.StreamResponse:
        text = document if isinstance(document, str) else json.dumps(document)
        return web.Response(text=text, content_type="application/json")

    state.respond = answer
    await _assert_unavailable(await make_keyset(issuer_config(jwks_uri=uri)))


@pytest.mark.parametrize("chunked", [False, True])
async def test_jwks_10_oversized_answer_is_refused(jwks_server: Any, make_keyset: Any, chunked: bool) -> None:
    state, uri = jwks_server
    body = json.dumps({"keys": [], "pad": "x" * MAX_JWKS_BYTES}).encode()

    async def big(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 65536):
            await response.write(body[start:start + 65536])
        await response.write_eof()
        return response

    state.respond = big
    await _assert_unavailable(await make_keyset(issuer_config(jwks_uri=uri)))


async def test_jwks_10_slow_key_server_times_out(jwks_server: Any, make_keyset: Any) -> None:
    state, uri = jwks_server

    async def slow(request: web.Request) -> web.StreamResponse:
        await state.release.wait()
        return web.json_response({"keys": []})

    state.respond = slow
    await _assert_unavailable(await make_keyset(issuer_config(jwks_uri=uri, fetch_timeout=0.2)))


async def test_jwks_10_error_status_is_a_failed_fetch(jwks_server: Any, make_keyset: Any) -> None:
    state, uri = jwks_server

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.json_response({"keys": []}, status=500)

    state.respond = broken
    await _assert_unavailable(await make_keyset(issuer_config(jwks_uri=uri)))


async def test_jwks_10_redirects_are_not_followed(jwks_server: Any, make_keyset: Any) -> None:
    state, uri = jwks_server
    fetched_elsewhere = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/elsewhere")

    original_ok = state.ok

    async def counting_ok(request: web.Request) -> web.StreamResponse:
        fetched_elsewhere.append(request.path)
        return await original_ok(request)

    state.respond = redirect
    state.ok = counting_ok  # type: ignore[method-assign]
    await _assert_unavailable(await make_keyset(issuer_config(jwks_uri=uri)))
    assert state.count == 1 and fetched_elsewhere == []


async def test_unreachable_key_server_does_not_stop_start_up_and_recovers_by_itself(make_keyset: Any) -> None:
    port = free_port()
    issuer = DevIssuer()
    cfg = issuer_config(jwks_uri=f"http://127.0.0.1:{port}/jwks")
    keyset = await make_keyset(cfg, retry_initial=0.02, retry_max=0.1)  # start-up returns despite the failure
    await _assert_unavailable(keyset)
    await issuer.start(port=port)
    try:
        for _ in range(500):
            if keyset.loaded:
                break
            await asyncio.sleep(0.02)
        assert keyset.loaded and issuer.fetch_count >= 1
        assert (await keyset.key_for(issuer.kid, "ES256")).kid == issuer.kid
    finally:
        await issuer.close()


async def test_cleanup_cancels_the_background_retry(make_keyset: Any, session: Any, clock: FakeClock) -> None:
    hooks = Hooks()
    config = load(jwks_uri=f"http://127.0.0.1:{free_port()}/jwks")
    cfg = config.issuers[0]
    deps = PluginDeps(config=config, clock=clock, http=lambda: session, logger=structlog.get_logger(),
                      on_startup=hooks.startup.append, on_cleanup=hooks.cleanup.append)
    keyset = KeySet(cfg, deps, retry_initial=30)
    await hooks.start()
    task = keyset._retry_task
    assert task is not None and not task.done()
    await hooks.stop()
    assert task.cancelled()


async def test_jwks_10_unknown_kid_flood_is_one_shared_fetch_per_cooldown(make_keyset: Any, clock: FakeClock) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri, refetch_cooldown=30))
        assert issuer.fetch_count == 1
        clock.now += 30  # the start-up fetch's cooldown is over: one refetch is allowed now

        async def lookup(kid: str) -> str:
            try:
                await keyset.key_for(kid, "ES256")
            except InvalidToken as exc:
                return exc.reason
            return "found"

        results = await asyncio.gather(*(lookup(f"random-{i}") for i in range(50)))
        assert set(results) == {"unknown_key"}
        assert issuer.fetch_count == 2  # single flight: fifty requests shared one fetch
        assert set(await asyncio.gather(*(lookup(f"again-{i}") for i in range(50)))) == {"unknown_key"}
        clock.now += 29.9
        assert await lookup("still-cooling") == "unknown_key"
        assert issuer.fetch_count == 2
        clock.now += 0.1
        assert await lookup("cooled-down") == "unknown_key"
        assert issuer.fetch_count == 3


async def test_jwks_10_rotation_is_picked_up_by_an_unknown_kid_refetch(make_keyset: Any, clock: FakeClock) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri))
        old = issuer.kid
        new = issuer.rotate_key()
        clock.now += 30
        assert (await keyset.key_for(new, "ES256")).kid == new
        with pytest.raises(InvalidToken):
            await keyset.key_for(old, "ES256")
        assert issuer.fetch_count == 2


async def test_jwks_10_failed_refetch_keeps_the_old_keys(jwks_server: Any, make_keyset: Any, clock: FakeClock,
                                                         issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri))

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    state.respond = broken
    clock.now += 30
    with pytest.raises(InvalidToken):
        await keyset.key_for("unknown", "ES256")
    assert state.count == 2
    assert (await keyset.key_for(issuer.kid, "ES256")).kid == issuer.kid


async def test_jwks_10_a_valid_empty_set_replaces_the_keys(jwks_server: Any, make_keyset: Any, clock: FakeClock,
                                                           issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    state.document = {"keys": []}
    clock.now += 30
    with pytest.raises(InvalidToken):
        await keyset.key_for("unknown", "ES256")
    with pytest.raises(InvalidToken):
        await keyset.key_for(issuer.kid, "ES256")


async def test_at_14_unpinned_kid_never_causes_a_fetch(make_keyset: Any, clock: FakeClock) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri, kids=(issuer.kid,)))
        clock.now += 3600
        with pytest.raises(InvalidToken):
            await keyset.key_for("not-pinned", "ES256")
        assert issuer.fetch_count == 1


async def test_requests_fetch_when_start_up_never_ran(make_keyset: Any) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri), start=False)
        assert (await keyset.key_for(issuer.kid, "ES256")).kid == issuer.kid
        assert issuer.fetch_count == 1
