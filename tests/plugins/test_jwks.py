"""KeySet: what a JWKS may contain (JWKS-01..13), how it is fetched and kept fresh (Cache-Control lifetimes,
background refresh, bounded stale-if-error, negative-kid memory, version and removal notices). Real loopback
key servers, a fake clock, and no assertion about how long anything takes."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict
from ztmw_plugins.jwks import (
    DEFAULT_LIFETIME,
    MAX_JWKS_BYTES,
    MAX_KEYS,
    MAX_LIFETIME,
    MIN_LIFETIME,
    NEGATIVE_TTL,
    REFRESH_AT,
    STALE_MAX,
    UNKNOWN_KIDS_MAX,
    JWKSRejected,
    KeySet,
    freshness_lifetime,
    parse_jwks,
)

from ztmw.config import Config, IssuerConfig, load_config
from ztmw.errors import ConfigurationError, InvalidToken, UpstreamUnavailable
from ztmw.testing.clock import FakeClock
from ztmw.testing.http import free_port
from ztmw.testing.issuer import DevIssuer
from ztmw.testing.lifetime import PluginLifetime


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def rsa_jwk(bits: int, kid: str) -> dict[str, Any]:
    """An RSA public JWK of any size (joserfc warns below 2048 bits, so build it by hand)."""
    numbers = rsa.generate_private_key(65537, bits).public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "kid": kid, "n": b64(n), "e": "AQAB"}


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
async def make_keyset(
    session: aiohttp.ClientSession, clock: FakeClock
) -> AsyncIterator[Callable[..., Awaitable[KeySet]]]:
    started: list[PluginLifetime] = []

    async def make(cfg: IssuerConfig, *, start: bool = True, **options: Any) -> KeySet:
        lifetime = PluginLifetime()
        keyset = KeySet(cfg, lifetime.deps(replace(BASE, issuers=(cfg,)), clock=clock, http=lambda: session),
                        **options)
        started.append(lifetime)
        if start:
            await lifetime.start()
        return keyset

    yield make
    for lifetime in started:
        await lifetime.stop()


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
    lifetime = PluginLifetime()
    config = load(jwks_uri=f"http://127.0.0.1:{free_port()}/jwks")
    keyset = KeySet(config.issuers[0], lifetime.deps(config, clock=clock, http=lambda: session), retry_initial=30)
    await lifetime.start()
    task = keyset._task
    assert task is not None and not task.done()
    await lifetime.stop()
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
    with pytest.raises(UpstreamUnavailable):  # the server could not say: 503, the client keeps its token
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


# -- freshness: helpers -------------------------------------------------------------------------------------

async def outcome(keyset: KeySet, kid: str | None, alg: str = "ES256") -> str:
    """What a lookup ends in: the kid found, or the error's reason."""
    try:
        return (await keyset.key_for(kid, alg)).kid or "found"
    except (InvalidToken, UpstreamUnavailable) as exc:
        return exc.reason


async def eventually(condition: Callable[[], bool]) -> bool:
    """Let the event loop run until `condition` holds (bounded number of turns, no timing assertion)."""
    for _ in range(1000):
        if condition():
            return True
        await asyncio.sleep(0.005)
    return condition()


def other_key(kid: str | None = None) -> dict[str, Any]:
    jwk = DevIssuer("https://as.example.com").jwks()["keys"][0]
    return jwk if kid is None else {**jwk, "kid": kid}


# -- Cache-Control -> freshness lifetime ----------------------------------------------------------------

@pytest.mark.parametrize(("lines", "age", "expected"), [
    ([], None, DEFAULT_LIFETIME),
    (["public"], None, DEFAULT_LIFETIME),
    (["s-maxage=7200"], None, DEFAULT_LIFETIME),
    (["max-age=600"], None, 600),
    (["public, max-age=7200, must-revalidate"], None, 7200),
    (['MAX-AGE="900"'], None, 900),
    (["max-age=600", "max-age=600"], None, 600),
    (["max-age=3600"], "600", 3000),
    (["max-age=3600"], "soon", 3600),
    (["max-age=10"], None, MIN_LIFETIME),
    (["max-age=0"], None, MIN_LIFETIME),
    (["max-age=31536000"], None, MAX_LIFETIME),
    (["max-age=" + "9" * 5000], "9" * 5000, MIN_LIFETIME),
    (["max-age=" + "9" * 5000], None, MAX_LIFETIME),
    (["max-age=600"], "900", MIN_LIFETIME),
    (["no-store"], None, MIN_LIFETIME),
    (["max-age=7200, no-cache"], None, MIN_LIFETIME),
    (['no-cache="Set-Cookie, X-Other"', "max-age=7200"], None, MIN_LIFETIME),
    (["max-age=7200", "No-Store"], None, MIN_LIFETIME),
    (["max-age=abc"], None, MIN_LIFETIME),
    (["max-age=-5"], None, MIN_LIFETIME),
    (["max-age=1.5e3"], None, MIN_LIFETIME),
    (["max-age=\u0663\u0660\u0660"], None, MIN_LIFETIME),  # Arabic-Indic digits are not delta-seconds
    (["max-age"], None, MIN_LIFETIME),
    (["max-age=600", "max-age=900"], None, MIN_LIFETIME),  # conflicting: stale (RFC 9111 §4.2.1)
])
def test_freshness_lifetime_from_cache_control(lines: list[str], age: str | None, expected: float) -> None:
    assert freshness_lifetime(lines, age) == expected


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def cache_server(headers: CIMultiDict[str] | dict[str, str], document: Any) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(document, headers=headers)
    return answer


@pytest.mark.parametrize(("headers", "lifetime"), [
    ({}, DEFAULT_LIFETIME),
    ({"Cache-Control": "public, max-age=600"}, 600),
    ({"Cache-Control": "no-store"}, MIN_LIFETIME),
    ({"Cache-Control": "no-cache, max-age=7200"}, MIN_LIFETIME),
    ({"Cache-Control": "max-age=999999999"}, MAX_LIFETIME),
    ({"Cache-Control": "max-age=7200", "Age": "3600"}, 3600),
    (CIMultiDict([("Cache-Control", "max-age=600"), ("Cache-Control", "max-age=900")]), MIN_LIFETIME),
    (CIMultiDict([("Cache-Control", "public"), ("Cache-Control", "max-age=900")]), 900),
])
async def test_key_server_cache_control_sets_when_the_background_refresh_is_due(
        jwks_server: Any, make_keyset: Any, clock: FakeClock, issuer: DevIssuer,
        headers: Any, lifetime: float) -> None:
    state, uri = jwks_server
    state.respond = cache_server(headers, issuer.jwks())
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    assert keyset.lifetime == lifetime and state.count == 1
    clock.now += lifetime * REFRESH_AT - 1
    assert await keyset.refresh_if_due() is None
    assert state.count == 1
    clock.now += 1
    assert await keyset.refresh_if_due() is True
    assert state.count == 2
    assert await keyset.refresh_if_due() is None  # the new set is fresh again


async def test_jwks_file_is_never_refreshed(tmp_path: Any, make_keyset: Any, clock: FakeClock,
                                            issuer: DevIssuer) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(issuer.jwks()))
    keyset = await make_keyset(issuer_config(jwks_file=str(path)))
    assert keyset.version == 1 and keyset.lifetime is None
    clock.now += 10 * MAX_LIFETIME + STALE_MAX
    assert await keyset.refresh_if_due() is None
    assert await outcome(keyset, issuer.kid) == issuer.kid


# -- background refresh -----------------------------------------------------------------------------------

async def test_removed_key_stops_being_accepted_within_one_lifetime(make_keyset: Any,
                                                                    clock: FakeClock) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri))
        old = issuer.kid
        new = issuer.rotate_key()
        clock.now += DEFAULT_LIFETIME * REFRESH_AT - 1
        assert await keyset.refresh_if_due() is None
        assert await outcome(keyset, old) == old  # still within its lifetime, known kid: no fetch
        assert issuer.fetch_count == 1
        clock.now += 1  # still before the lifetime ends
        assert await keyset.refresh_if_due() is True
        assert issuer.fetch_count == 2
        assert await outcome(keyset, old) == "unknown_key"
        assert await outcome(keyset, new) == new
        assert not keyset.knows(old) and keyset.knows(new)


async def test_background_task_refreshes_when_due_and_is_cancelled_by_cleanup(make_keyset: Any,
                                                                              clock: FakeClock) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri), check_interval=0.005)
        task = keyset._task
        assert task is not None and not task.done()
        for _ in range(20):  # the task looks at the clock many times; nothing is due, nothing is fetched
            await asyncio.sleep(0.005)
        assert issuer.fetch_count == 1
        old = issuer.kid
        issuer.rotate_key()
        clock.now += DEFAULT_LIFETIME * REFRESH_AT
        assert await eventually(lambda: issuer.fetch_count == 2)
        assert await eventually(lambda: not keyset.knows(old))
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert issuer.fetch_count == 2  # fresh again: no further fetch
        await keyset.close()
        assert task.cancelled() and keyset._task is None
        await keyset.close()  # idempotent (the fixture's cleanup calls it again too)


async def test_background_task_retries_failed_refreshes_and_recovers(
        jwks_server: Any, make_keyset: Any, clock: FakeClock, issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri), check_interval=0.005, retry_initial=0.005,
                               retry_max=0.01)

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    state.respond = broken
    clock.now += DEFAULT_LIFETIME * REFRESH_AT
    assert await eventually(lambda: state.count >= 4)  # retried, with backoff, while it keeps failing
    assert await outcome(keyset, issuer.kid) == issuer.kid  # stale-if-error meanwhile
    new = issuer.rotate_key()
    state.document = issuer.jwks()
    state.respond = state.ok
    assert await eventually(lambda: keyset.knows(new))
    settled = state.count
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert state.count == settled  # back to sleeping until the next refresh is due


# -- stale-if-error, bounded --------------------------------------------------------------------------------

async def test_stale_keys_are_served_for_stale_max_then_fail_closed(
        jwks_server: Any, make_keyset: Any, clock: FakeClock, issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.respond = cache_server({"Cache-Control": "max-age=600"}, issuer.jwks())
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    fetched_at = clock.now

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    state.respond = broken
    clock.now = fetched_at + 600 * REFRESH_AT
    assert await keyset.refresh_if_due() is False
    clock.now = fetched_at + 600 + STALE_MAX - 1
    assert await outcome(keyset, issuer.kid) == issuer.kid  # stale but within the bound
    assert await outcome(keyset, "unknown") == "jwks_unavailable"  # the refetch failed: nobody can say
    count = state.count
    clock.now += 1
    assert await outcome(keyset, issuer.kid) == "jwks_unavailable"  # too stale: fail closed (503)
    assert await outcome(keyset, "unknown") == "jwks_unavailable"
    assert state.count == count  # within the cooldown: no fetch
    clock.now += 30
    assert await outcome(keyset, issuer.kid) == "jwks_unavailable"
    assert state.count == count + 1  # one refetch attempt per cooldown, failing
    assert keyset.loaded and keyset.knows(issuer.kid)  # `loaded`/`knows` keep their meaning
    state.respond = cache_server({"Cache-Control": "max-age=600"}, issuer.jwks())
    assert await keyset.refresh_if_due() is True
    assert await outcome(keyset, issuer.kid) == issuer.kid
    clock.now += 600 + STALE_MAX - 1  # the bound counts from the successful fetch
    assert await outcome(keyset, issuer.kid) == issuer.kid


async def test_stale_max_can_be_set_per_key_set(jwks_server: Any, make_keyset: Any, clock: FakeClock,
                                                issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri), stale_max=0)

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    state.respond = broken
    clock.now += DEFAULT_LIFETIME - 1
    assert await outcome(keyset, issuer.kid) == issuer.kid
    clock.now += 1
    assert await outcome(keyset, issuer.kid) == "jwks_unavailable"


# -- key-set version and removal notices ------------------------------------------------------------------

async def test_version_counts_changes_and_callbacks_hear_about_removals(make_keyset: Any,
                                                                        clock: FakeClock) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri), start=False)
        heard: list[tuple[str, frozenset[str]]] = []

        def broken_listener(iss: str, removed: frozenset[str]) -> None:
            raise RuntimeError("a listener bug must not break key refresh")

        keyset.on_change(broken_listener)
        keyset.on_change(lambda iss, removed: heard.append((iss, removed)))
        assert keyset.version == 0
        assert await keyset.refresh_if_due() is True  # nothing loaded: due
        assert keyset.version == 1 and heard == []

        clock.now += DEFAULT_LIFETIME
        assert await keyset.refresh_if_due() is True  # same keys
        assert keyset.version == 1 and heard == []

        added = issuer.add_key("PS256")
        clock.now += DEFAULT_LIFETIME
        assert await keyset.refresh_if_due() is True  # a key added, none removed
        assert keyset.version == 2 and heard == [] and keyset.knows(added)

        old = issuer.kid
        new = issuer.rotate_key()
        clock.now += DEFAULT_LIFETIME
        assert await keyset.refresh_if_due() is True
        assert keyset.version == 3
        assert heard == [(keyset.issuer, frozenset({old}))]
        assert await outcome(keyset, new) == new  # the new keys were in place despite the broken listener


async def test_kid_with_new_key_material_counts_as_removed(jwks_server: Any, make_keyset: Any,
                                                           clock: FakeClock) -> None:
    state, uri = jwks_server
    first, second, kept = other_key("k1"), other_key("k1"), rsa_jwk(2048, "k2")
    state.document = {"keys": [first, kept]}
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    heard: list[frozenset[str]] = []
    keyset.on_change(lambda iss, removed: heard.append(removed))
    before = (await keyset.key_for("k1", "ES256")).key.thumbprint()

    state.document = {"keys": [second, kept]}  # same kid, other key
    clock.now += DEFAULT_LIFETIME
    assert await keyset.refresh_if_due() is True
    assert heard == [frozenset({"k1"})] and keyset.version == 2
    assert (await keyset.key_for("k1", "ES256")).key.thumbprint() != before

    state.document = {"keys": [second, {**kept, "alg": "PS256"}]}  # same material, narrower algorithms
    clock.now += DEFAULT_LIFETIME
    assert await keyset.refresh_if_due() is True
    assert heard[-1] == frozenset({"k2"}) and keyset.version == 3


async def test_unknown_kid_refetch_also_reports_removals_and_failures_change_nothing(
        jwks_server: Any, make_keyset: Any, clock: FakeClock, issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    heard: list[frozenset[str]] = []
    keyset.on_change(lambda iss, removed: heard.append(removed))

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    state.respond = broken
    clock.now += 30
    assert await outcome(keyset, "new-kid") == "jwks_unavailable"  # the refetch failed
    assert state.count == 2 and keyset.version == 1 and heard == []

    state.respond = state.ok
    state.document = {"keys": [other_key("new-kid")]}
    clock.now += 30
    assert await outcome(keyset, "new-kid") == "new-kid"
    assert keyset.version == 2 and heard == [frozenset({issuer.kid})]


# -- negative-kid memory ---------------------------------------------------------------------------------

async def test_kid_proven_absent_causes_no_further_fetch(make_keyset: Any, clock: FakeClock) -> None:
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri, refetch_cooldown=30))
        clock.now += 30
        assert await outcome(keyset, "ghost") == "unknown_key"
        assert issuer.fetch_count == 2
        for _ in range(3):
            clock.now += 30  # the cooldown is over each time, but "ghost" is remembered
            assert await outcome(keyset, "ghost") == "unknown_key"
        assert issuer.fetch_count == 2
        assert await outcome(keyset, "another-ghost") == "unknown_key"  # an unremembered kid still may fetch
        assert issuer.fetch_count == 3
        assert await outcome(keyset, issuer.kid) == issuer.kid


async def test_remembered_kid_fails_without_waiting_for_a_fetch_in_flight(
        jwks_server: Any, make_keyset: Any, clock: FakeClock, issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri, fetch_timeout=30))
    clock.now += 30
    assert await outcome(keyset, "ghost") == "unknown_key"
    assert state.count == 2

    async def held(request: web.Request) -> web.StreamResponse:
        await state.release.wait()
        return web.json_response(state.document)

    state.respond = held
    clock.now += 30
    waiting = asyncio.create_task(outcome(keyset, "other"))
    assert await eventually(lambda: state.count == 3)  # the fetch is at the server, held there
    assert await outcome(keyset, "ghost") == "unknown_key"
    assert not waiting.done()  # "ghost" did not wait on the fetch "other" is waiting on
    state.release.set()
    assert await waiting == "unknown_key"
    assert state.count == 3


async def test_remembered_kid_is_forgotten_after_the_next_successful_fetch(
        jwks_server: Any, make_keyset: Any, clock: FakeClock, issuer: DevIssuer) -> None:
    state, uri = jwks_server
    late = other_key()
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    clock.now += 30
    assert await outcome(keyset, late["kid"]) == "unknown_key"  # proven absent
    state.document = {"keys": [*issuer.jwks()["keys"], late]}  # then published
    clock.now += 30
    assert await outcome(keyset, late["kid"]) == "unknown_key"  # remembered: no fetch
    assert state.count == 2
    assert await outcome(keyset, "someone-else") == "unknown_key"  # a successful fetch for another kid...
    assert state.count == 3
    assert await outcome(keyset, late["kid"]) == late["kid"]  # ...forgets it, and the new set has it


async def test_remembered_kid_is_retried_after_the_negative_ttl(jwks_server: Any, make_keyset: Any,
                                                                clock: FakeClock, issuer: DevIssuer) -> None:
    state, uri = jwks_server
    late = other_key()
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    clock.now += 30
    assert await outcome(keyset, late["kid"]) == "unknown_key"
    state.document = {"keys": [*issuer.jwks()["keys"], late]}  # published after our fetch (or a lagging CDN)
    clock.now += NEGATIVE_TTL - 1
    assert await outcome(keyset, late["kid"]) == "unknown_key"
    assert state.count == 2
    clock.now += 1
    assert await outcome(keyset, late["kid"]) == late["kid"]
    assert state.count == 3


async def test_negative_memory_is_bounded(jwks_server: Any, make_keyset: Any, clock: FakeClock,
                                          issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri))
    clock.now += 30
    kids = [f"flood-{i}" for i in range(UNKNOWN_KIDS_MAX + 500)]
    assert set(await asyncio.gather(*(outcome(keyset, kid) for kid in kids))) == {"unknown_key"}
    assert state.count == 2  # one shared fetch
    remembered = set(keyset._unknown)
    assert len(remembered) == UNKNOWN_KIDS_MAX  # every waiter was proven absent; the oldest were dropped
    forgotten = next(kid for kid in kids if kid not in remembered)
    kept = list(keyset._unknown)[-1]  # the most recent
    clock.now += 30
    assert await outcome(keyset, kept) == "unknown_key"
    assert state.count == 2
    assert await outcome(keyset, forgotten) == "unknown_key"  # dropped from memory: it may fetch again
    assert state.count == 3
    assert len(keyset._unknown) == 1  # the successful fetch cleared the memory, then remembered this kid


async def test_random_kid_flood_costs_at_most_one_fetch_per_cooldown(make_keyset: Any,
                                                                     clock: FakeClock) -> None:
    cooldown, step, duration = 30, 3, 600
    async with DevIssuer() as issuer:
        keyset = await make_keyset(issuer_config(jwks_uri=issuer.jwks_uri, refetch_cooldown=cooldown))
        seen: list[str] = []
        for _ in range(duration // step):
            clock.now += step
            fresh = [f"rnd-{secrets.token_urlsafe(8)}" for _ in range(25)]
            repeated = seen[-25:]
            seen += fresh
            results = await asyncio.gather(*(outcome(keyset, kid) for kid in fresh + repeated),
                                           outcome(keyset, issuer.kid))
            assert set(results[:-1]) == {"unknown_key"} and results[-1] == issuer.kid
        refetches = issuer.fetch_count - 1
        assert 1 <= refetches <= duration // cooldown


def test_each_key_carries_its_rfc7638_thumbprint() -> None:
    issuer = DevIssuer("https://as.example.com", algorithm="ES256")
    index = parse_jwks(issuer.jwks())
    assert index.keys and all(key.thumbprint == key.key.thumbprint() for key in index.keys)
    assert index.thumbprints == {key.thumbprint for key in index.keys}


# -- ready_key: key_for's answer when no fetch or wait is needed, else None ---------------------------------

async def test_ready_key_is_key_for_without_the_await(jwks_server: Any, make_keyset: Any, clock: FakeClock,
                                                      issuer: DevIssuer) -> None:
    state, uri = jwks_server
    state.document = issuer.jwks()
    keyset = await make_keyset(issuer_config(jwks_uri=uri), start=False, stale_max=0)
    assert keyset.ready_key(issuer.kid, "ES256") is None  # nothing loaded: key_for must fetch
    assert await keyset.refresh_if_due() is True
    found = await keyset.key_for(issuer.kid, "ES256")
    assert keyset.ready_key(issuer.kid, "ES256") is found
    assert keyset.ready_key(None, "ES256") is await keyset.key_for(None, "ES256")
    assert keyset.ready_key("unknown", "ES256") is None  # key_for decides: refetch or unknown_key
    assert keyset.ready_key(None, "RS256") is None

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    state.respond = broken
    clock.now += DEFAULT_LIFETIME
    assert keyset.ready_key(issuer.kid, "ES256") is None  # too stale to use: key_for fails closed
    assert await outcome(keyset, issuer.kid) == "jwks_unavailable"


async def test_ready_key_leaves_an_unpinned_kid_to_key_for(issuer: DevIssuer, make_keyset: Any,
                                                           tmp_path: Any) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [issuer.jwks()["keys"][0], {**issuer.jwks()["keys"][0], "kid": "other"}]}))
    keyset = await make_keyset(issuer_config(jwks_file=str(path), kids=(issuer.kid,)))
    assert keyset.ready_key(issuer.kid, "ES256") is await keyset.key_for(issuer.kid, "ES256")
    assert keyset.ready_key("other", "ES256") is None
    with pytest.raises(InvalidToken):
        await keyset.key_for("other", "ES256")
