"""Keys found through the issuer's metadata (JWKS-08, JWKS-09): `discovery = "oauth"` (RFC 8414) and
`discovery = "openid"` (OpenID Connect Discovery 1.0). A real authorization server on loopback serves the
metadata and the JWKS; no HTTP is mocked. The KeySet helpers and fixtures are those of tests/plugins/test_jwks.py.
"""
# ruff: noqa: F811 - `make_keyset` is a fixture imported from tests/plugins/test_jwks.py, named by the tests' arguments

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from structlog.testing import capture_logs
from ztmw_plugins.jwks import (
    DEFAULT_LIFETIME,
    MAX_METADATA_BYTES,
    MIN_LIFETIME,
    JWKSRejected,
    KeySet,
    metadata_jwks_uri,
)

import ztmw
from ztmw.config import IssuerConfig
from ztmw.testing import DevIssuer, FakeClock

from .command import write_config
from .command import ztmw as ztmw_command
from .conftest import AUDIENCE, items_app
from .plugins.test_jwks import JWKSServer, cache_server, issuer_config, make_keyset, outcome  # noqa: F401

TENANT = "/tenant1"
OAUTH_PATH = "/.well-known/oauth-authorization-server" + TENANT
OPENID_PATH = TENANT + "/.well-known/openid-configuration"

MakeKeySet = Callable[..., Awaitable[KeySet]]


class AuthorizationServer:
    """A loopback AS: its metadata and its JWKS are each a `JWKSServer` whose answer the test chooses; every
    request path is recorded, so a test can say exactly which URLs were fetched."""

    def __init__(self) -> None:
        self.base = ""
        self.metadata = JWKSServer()
        self.keys = JWKSServer()
        self.paths: list[str] = []
        self.metadata_paths = {OAUTH_PATH, OPENID_PATH, "/.well-known/oauth-authorization-server"}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        if request.path in self.metadata_paths:
            return await self.metadata.handle(request)
        if request.path == "/jwks":
            return await self.keys.handle(request)
        raise web.HTTPNotFound()

    def publish(self, owner: DevIssuer, **metadata: Any) -> None:
        """Serve `owner`'s keys at /jwks and metadata naming it and them (members overridable, None drops)."""
        self.keys.document = owner.jwks()
        document = {"issuer": owner.issuer, "jwks_uri": f"{self.base}/jwks", **metadata}
        self.metadata.document = {name: value for name, value in document.items() if value is not None}


async def start_server(aiohttp_server: Any) -> AuthorizationServer:
    state = AuthorizationServer()
    app = web.Application()
    app.router.add_get("/{path:.*}", state.handle)
    server = await aiohttp_server(app)
    state.base = f"http://{server.host}:{server.port}"
    return state


@pytest.fixture
async def auth_server(aiohttp_server: Any) -> AsyncIterator[AuthorizationServer]:
    state = await start_server(aiohttp_server)
    yield state
    state.metadata.release.set()


@pytest.fixture
def tenant(auth_server: AuthorizationServer, clock: FakeClock) -> DevIssuer:
    """An issuer with a path (RFC 8414 §3.1), published by `auth_server`."""
    issuer = DevIssuer(auth_server.base + TENANT, audience=AUDIENCE, clock=clock)
    auth_server.publish(issuer)
    return issuer


def discovering(issuer: DevIssuer, discovery: str = "oauth", **table: Any) -> IssuerConfig:
    return issuer_config(issuer=issuer.issuer, discovery=discovery, **table)


async def assert_refused(keyset: KeySet, reason: str, events: list[dict[str, Any]], stage: str = "metadata") -> None:
    """Nothing usable came of the fetch: lookups fail closed (503), and the warning says why, at which step."""
    assert not keyset.loaded
    assert await outcome(keyset, "any") == "jwks_unavailable"
    failures = [e for e in events if e["event"] == "jwks_fetch_failed"]
    assert failures and failures[0]["reason"] == reason and failures[0]["stage"] == stage
    assert failures[0]["log_level"] == "warning"


async def refused_at_start(make_keyset: MakeKeySet, cfg: IssuerConfig, reason: str, stage: str = "metadata") -> None:
    with capture_logs() as events:
        keyset = await make_keyset(cfg)
    await assert_refused(keyset, reason, events, stage)


# -- the metadata URL (RFC 8414 §3/§3.1, OIDC Discovery §4) ------------------------------------------------

@pytest.mark.parametrize(("issuer", "url"), [
    ("https://as.example.com/tenant1", "https://as.example.com/.well-known/oauth-authorization-server/tenant1"),
    ("https://as.example.com/tenant1/", "https://as.example.com/.well-known/oauth-authorization-server/tenant1"),
    ("https://as.example.com/a/b", "https://as.example.com/.well-known/oauth-authorization-server/a/b"),
    ("https://as.example.com", "https://as.example.com/.well-known/oauth-authorization-server"),
    ("https://as.example.com/", "https://as.example.com/.well-known/oauth-authorization-server"),
    ("https://as.example.com:8443/t", "https://as.example.com:8443/.well-known/oauth-authorization-server/t"),
])
def test_rfc8414_3_1_metadata_url_inserts_the_well_known_string_between_host_and_path(issuer: str, url: str) -> None:
    assert issuer_config(issuer=issuer, discovery="oauth").metadata_url == url


@pytest.mark.parametrize(("issuer", "url"), [
    ("https://as.example.com/tenant1", "https://as.example.com/tenant1/.well-known/openid-configuration"),
    ("https://as.example.com/tenant1/", "https://as.example.com/tenant1/.well-known/openid-configuration"),
    ("https://as.example.com", "https://as.example.com/.well-known/openid-configuration"),
    ("https://as.example.com/", "https://as.example.com/.well-known/openid-configuration"),
])
def test_oidc_discovery_4_metadata_url_appends_openid_configuration(issuer: str, url: str) -> None:
    assert issuer_config(issuer=issuer, discovery="openid").metadata_url == url


def test_no_metadata_url_without_discovery() -> None:
    assert issuer_config(jwks_uri="https://as.example.com/jwks").metadata_url is None


async def test_rfc8414_3_1_issuer_with_a_path_is_fetched_at_the_inserted_url(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet) -> None:
    keyset = await make_keyset(discovering(tenant, "oauth"))
    assert auth_server.paths == [OAUTH_PATH, "/jwks"]
    assert await outcome(keyset, tenant.kid) == tenant.kid
    assert keyset.jwks_uri == f"{auth_server.base}/jwks"


async def test_openid_discovery_is_fetched_at_issuer_plus_openid_configuration(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet) -> None:
    keyset = await make_keyset(discovering(tenant, "openid"))
    assert auth_server.paths == [OPENID_PATH, "/jwks"]
    assert await outcome(keyset, tenant.kid) == tenant.kid


async def test_issuer_without_a_path_is_fetched_at_the_bare_well_known_url(
        auth_server: AuthorizationServer, make_keyset: MakeKeySet) -> None:
    issuer = DevIssuer(auth_server.base)
    auth_server.publish(issuer)
    keyset = await make_keyset(discovering(issuer, "oauth"))
    assert auth_server.paths == ["/.well-known/oauth-authorization-server", "/jwks"]
    assert await outcome(keyset, issuer.kid) == issuer.kid


# -- JWKS-08: the metadata's issuer is identical to the configured one, or the metadata is not used ----------

@pytest.mark.parametrize("discovery", ["oauth", "openid"])
@pytest.mark.parametrize("claimed", [
    "https://evil.example/tenant1",  # another issuer
    "{base}/tenant1/",  # trailing slash: not identical
    "{base}/Tenant1",  # case: not identical
    "{base}/tenant2",  # another tenant of the same host
    "{base}",  # the host's own issuer
    5,
    None,  # no issuer member at all
])
async def test_jwks_08_metadata_issuer_mismatch_is_not_used(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet, claimed: Any,
        discovery: str) -> None:
    auth_server.publish(tenant, issuer=claimed.format(base=auth_server.base) if isinstance(claimed, str) else claimed)
    await refused_at_start(make_keyset, discovering(tenant, discovery), "issuer_mismatch")
    assert auth_server.keys.count == 0  # the jwks_uri of a document not used is never fetched


def test_jwks_08_issuer_is_compared_as_an_exact_string() -> None:
    document = {"issuer": "https://as.example.com/t", "jwks_uri": "https://as.example.com/jwks"}
    assert metadata_jwks_uri(document, "https://as.example.com/t") == "https://as.example.com/jwks"
    for configured in ("https://as.example.com/t/", "https://AS.example.com/t", "https://as.example.com:443/t"):
        with pytest.raises(JWKSRejected, match="issuer_mismatch"):
            metadata_jwks_uri(document, configured)


async def test_jwks_08_refreshed_metadata_naming_another_issuer_is_not_used(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet, clock: FakeClock) -> None:
    keyset = await make_keyset(discovering(tenant))
    attacker = DevIssuer(auth_server.base + TENANT)
    auth_server.publish(attacker, issuer="https://evil.example")
    clock.now += DEFAULT_LIFETIME
    with capture_logs() as events:
        assert await keyset.refresh_if_due() is False
    assert [e["reason"] for e in events if e["event"] == "jwks_fetch_failed"] == ["issuer_mismatch"]
    assert auth_server.keys.count == 1  # the refused document's jwks_uri was not fetched
    assert await outcome(keyset, attacker.kid) == "unknown_key"  # within the cooldown: no fetch, not a key
    clock.now += 30
    assert await outcome(keyset, attacker.kid) == "jwks_unavailable"  # the refetch is refused again: 503
    assert auth_server.keys.count == 1 and auth_server.metadata.count == 3
    assert await outcome(keyset, tenant.kid) == tenant.kid  # the old keys stay, within the stale bound


# -- JWKS-09: keys come from the metadata's jwks_uri, which must be https ------------------------------------

@pytest.mark.parametrize("jwks_uri", [
    "http://as.example.com/jwks",
    "http://10.0.0.1/jwks",
    "http://127.0.0.1@evil.example/jwks",
    "http://localhost.evil.example/jwks",
    "ftp://127.0.0.1/jwks",
    "/jwks",  # relative: never resolved against anything
    "jwks",
])
async def test_jwks_09_jwks_uri_from_metadata_must_be_https(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet, jwks_uri: str) -> None:
    auth_server.publish(tenant, jwks_uri=jwks_uri)
    await refused_at_start(make_keyset, discovering(tenant), "jwks_uri_not_https")
    assert auth_server.keys.count == 0


def test_jwks_09_https_and_loopback_http_jwks_uris_are_taken() -> None:
    for uri in ("https://keys.example.net/jwks", "http://127.0.0.1:8080/jwks", "http://[::1]/jwks",
                "http://localhost:9000/jwks"):
        assert metadata_jwks_uri({"issuer": "https://as.example.com", "jwks_uri": uri},
                                 "https://as.example.com") == uri


@pytest.mark.parametrize("jwks_uri", [None, "", 5, ["https://as.example.com/jwks"], {"uri": "x"}])
async def test_jwks_09_metadata_without_a_jwks_uri_is_refused(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet, jwks_uri: Any) -> None:
    auth_server.publish(tenant, jwks_uri=jwks_uri)  # None: no jwks_uri member at all
    await refused_at_start(make_keyset, discovering(tenant), "no_jwks_uri")


# -- the metadata fetch has the JWKS fetch's defenses ----------------------------------------------------------

def sized_answer(size: int, chunked: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A JSON object of `size` bytes, with a Content-Length or chunked (the cap must hold either way)."""
    body = json.dumps({"issuer": "x", "pad": ""}).encode()
    body = body[:-2] + b"x" * (size - len(body)) + b'"}'

    async def pieces() -> AsyncIterator[bytes]:  # an async iterable body is sent chunked, without a length
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=pieces() if chunked else body, content_type="application/json")

    return answer


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversize_metadata_is_refused(auth_server: AuthorizationServer, tenant: DevIssuer,
                                            make_keyset: MakeKeySet, chunked: bool) -> None:
    auth_server.metadata.respond = sized_answer(MAX_METADATA_BYTES + 1, chunked)
    await refused_at_start(make_keyset, discovering(tenant), "too_large")
    assert auth_server.keys.count == 0


async def test_metadata_at_the_size_cap_is_read(auth_server: AuthorizationServer, tenant: DevIssuer,
                                               make_keyset: MakeKeySet) -> None:
    auth_server.metadata.respond = sized_answer(MAX_METADATA_BYTES, True)
    await refused_at_start(make_keyset, discovering(tenant), "issuer_mismatch")  # read whole, then checked


@pytest.mark.parametrize(("body", "reason"), [
    ("[]", "not_an_object"),
    ('"https://as.example.com"', "not_an_object"),
    ("not json", "bad_json"),
    ('{"issuer": "a", "issuer": "b"}', "duplicate_member"),  # duplicate member: which one would be checked?
])
async def test_metadata_must_be_a_strict_json_object(auth_server: AuthorizationServer, tenant: DevIssuer,
                                                     make_keyset: MakeKeySet, body: str, reason: str) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text=body, content_type="application/json")

    auth_server.metadata.respond = answer
    await refused_at_start(make_keyset, discovering(tenant), reason)


async def test_metadata_error_status_is_refused(auth_server: AuthorizationServer, tenant: DevIssuer,
                                                make_keyset: MakeKeySet) -> None:
    auth_server.metadata_paths = set()  # the AS publishes no metadata: 404
    await refused_at_start(make_keyset, discovering(tenant), "http_404")


async def test_slow_metadata_times_out(auth_server: AuthorizationServer, tenant: DevIssuer,
                                       make_keyset: MakeKeySet) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await auth_server.metadata.release.wait()
        return web.json_response(auth_server.metadata.document)

    auth_server.metadata.respond = slow
    await refused_at_start(make_keyset, discovering(tenant, fetch_timeout=0.2), "TimeoutError")


async def test_cross_origin_redirect_of_the_metadata_is_refused(
        aiohttp_server: Any, auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet) -> None:
    elsewhere = await start_server(aiohttp_server)
    elsewhere.publish(tenant)  # even metadata that would pass every check is not fetched from there

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{elsewhere.base}{request.path}")

    auth_server.metadata.respond = redirect
    await refused_at_start(make_keyset, discovering(tenant), "http_302")
    assert elsewhere.paths == [] and auth_server.keys.count == 0


async def test_cross_origin_redirect_of_the_discovered_jwks_is_refused(
        aiohttp_server: Any, auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet) -> None:
    elsewhere = await start_server(aiohttp_server)
    elsewhere.publish(tenant)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{elsewhere.base}/jwks")

    auth_server.keys.respond = redirect
    await refused_at_start(make_keyset, discovering(tenant), "http_302", stage="jwks")
    assert elsewhere.paths == []


async def test_jwks_uri_on_another_host_is_followed(aiohttp_server: Any, auth_server: AuthorizationServer,
                                                    tenant: DevIssuer, make_keyset: MakeKeySet) -> None:
    """RFC 8414 §2 puts no origin rule on jwks_uri (keys on a CDN or a key service are common); only https."""
    keys_host = await start_server(aiohttp_server)
    keys_host.publish(tenant)
    auth_server.publish(tenant, jwks_uri=f"{keys_host.base}/jwks")
    keyset = await make_keyset(discovering(tenant))
    assert await outcome(keyset, tenant.kid) == tenant.kid
    assert auth_server.keys.count == 0 and keys_host.paths == ["/jwks"]


async def test_metadata_and_keys_are_one_shared_fetch(auth_server: AuthorizationServer, tenant: DevIssuer,
                                                      make_keyset: MakeKeySet) -> None:
    keyset = await make_keyset(discovering(tenant), start=False)
    results = await asyncio.gather(*(outcome(keyset, tenant.kid) for _ in range(30)))
    assert set(results) == {tenant.kid}
    assert auth_server.metadata.count == 1 and auth_server.keys.count == 1


# -- the metadata is cached for its lifetime, refetched when stale, and a new jwks_uri is followed ----------

async def test_metadata_is_kept_for_its_cache_control_lifetime_then_refetched_with_an_unknown_kid(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet, clock: FakeClock) -> None:
    auth_server.metadata.respond = cache_server({"Cache-Control": "max-age=600"}, auth_server.metadata.document)
    keyset = await make_keyset(discovering(tenant, refetch_cooldown=0))  # every unknown kid may refetch
    clock.now += 30
    assert await outcome(keyset, "unknown-1") == "unknown_key"  # keys refetched, metadata still fresh
    assert (auth_server.metadata.count, auth_server.keys.count) == (1, 2)
    clock.now += 600 - 30 - 1
    assert await outcome(keyset, "unknown-2") == "unknown_key"
    assert (auth_server.metadata.count, auth_server.keys.count) == (1, 3)
    clock.now += 1  # the metadata's lifetime is over: the next key fetch fetches it first
    assert await outcome(keyset, "unknown-3") == "unknown_key"
    assert (auth_server.metadata.count, auth_server.keys.count) == (2, 4)
    assert auth_server.paths[-2:] == [OAUTH_PATH, "/jwks"]


async def test_metadata_lifetime_is_bounded_below(auth_server: AuthorizationServer, tenant: DevIssuer,
                                                  make_keyset: MakeKeySet, clock: FakeClock) -> None:
    auth_server.metadata.respond = cache_server({"Cache-Control": "no-store"}, auth_server.metadata.document)
    keyset = await make_keyset(discovering(tenant, refetch_cooldown=0))
    clock.now += MIN_LIFETIME - 1
    assert await outcome(keyset, "unknown") == "unknown_key"
    assert auth_server.metadata.count == 1
    clock.now += 1
    assert await outcome(keyset, "unknown-again") == "unknown_key"
    assert auth_server.metadata.count == 2


async def test_a_changed_jwks_uri_is_followed(aiohttp_server: Any, auth_server: AuthorizationServer,
                                              tenant: DevIssuer, make_keyset: MakeKeySet, clock: FakeClock) -> None:
    keyset = await make_keyset(discovering(tenant))
    old = tenant.kid
    new_home = await start_server(aiohttp_server)
    new = tenant.rotate_key()
    new_home.publish(tenant)
    auth_server.publish(tenant, jwks_uri=f"{new_home.base}/jwks")
    auth_server.keys.document = {"keys": []}  # the old location no longer has the keys
    clock.now += DEFAULT_LIFETIME
    with capture_logs() as events:
        assert await outcome(keyset, new) == new
    assert keyset.jwks_uri == f"{new_home.base}/jwks" and new_home.paths == ["/jwks"]
    assert await outcome(keyset, old) == "unknown_key"
    [moved] = [e for e in events if e["event"] == "jwks_uri_discovered"]
    assert moved["changed"] is True and moved["jwks_uri"] == f"{new_home.base}/jwks"


async def test_a_changed_jwks_uri_is_checked_again(auth_server: AuthorizationServer, tenant: DevIssuer,
                                                   make_keyset: MakeKeySet, clock: FakeClock) -> None:
    keyset = await make_keyset(discovering(tenant))
    auth_server.publish(tenant, jwks_uri="http://keys.example.net/jwks")
    clock.now += DEFAULT_LIFETIME
    with capture_logs() as events:
        assert await keyset.refresh_if_due() is False
    assert [e["reason"] for e in events if e["event"] == "jwks_fetch_failed"] == ["jwks_uri_not_https"]
    assert auth_server.keys.count == 1


async def test_failed_metadata_fetch_is_retried_until_it_succeeds(
        auth_server: AuthorizationServer, tenant: DevIssuer, make_keyset: MakeKeySet) -> None:
    async def down(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    auth_server.metadata.respond = down
    keyset = await make_keyset(discovering(tenant), start=False)
    assert await keyset.refresh_if_due() is False
    assert await outcome(keyset, tenant.kid) == "jwks_unavailable"
    auth_server.metadata.respond = auth_server.metadata.ok
    assert await keyset.refresh_if_due() is True
    assert await outcome(keyset, tenant.kid) == tenant.kid


# -- end to end: ztmw.setup, a real client, a real authorization server ----------------------------------------

def discovery_app(issuer: DevIssuer, clock: FakeClock, discovery: str = "oauth") -> web.Application:
    app = items_app()
    ztmw.setup(app, {
        "resource": {"identifier": AUDIENCE, "public_origin": "http://127.0.0.1"},
        "issuers": [{"issuer": issuer.issuer, "discovery": discovery, "algorithms": ["ES256"],
                     "audiences": [AUDIENCE]}],
        "rules": [{"id": "read", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]}],
    }, clock=clock)
    return app


@pytest.mark.parametrize("discovery", ["oauth", "openid"])
async def test_token_signed_by_a_discovered_key_is_accepted_end_to_end(
        aiohttp_client: Any, aiohttp_server: Any, auth_server: AuthorizationServer, tenant: DevIssuer,
        clock: FakeClock, discovery: str) -> None:
    client = await aiohttp_client(discovery_app(tenant, clock, discovery))
    response = await client.get("/items", headers={"Authorization": f"Bearer {tenant.mint(scope='items:read')}"})
    assert response.status == 200
    assert auth_server.paths == [OAUTH_PATH if discovery == "oauth" else OPENID_PATH, "/jwks"]

    # BCP-10: keys named in a token (jku, x5u) are never fetched, whatever they point at
    attacker = await start_server(aiohttp_server)
    forged = DevIssuer(tenant.issuer, audience=AUDIENCE, clock=clock)
    attacker.publish(forged)
    token = forged.mint(scope="items:read", header={"jku": f"{attacker.base}/jwks", "x5u": f"{attacker.base}/x"})
    response = await client.get("/items", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 401 and attacker.paths == []


async def test_metadata_issuer_mismatch_refuses_tokens_end_to_end(
        aiohttp_client: Any, auth_server: AuthorizationServer, tenant: DevIssuer, clock: FakeClock) -> None:
    auth_server.publish(tenant, issuer=auth_server.base + "/tenant2")
    client = await aiohttp_client(discovery_app(tenant, clock))
    response = await client.get("/items", headers={"Authorization": f"Bearer {tenant.mint(scope='items:read')}"})
    assert response.status == 503  # like an unreachable key server: fail closed, the client keeps its token
    assert "WWW-Authenticate" not in response.headers
    assert auth_server.keys.count == 0


def test_check_names_the_discovery_mistake_in_one_line(tmp_path: Any) -> None:
    config = write_config(tmp_path / "ztmw.toml", '[[issuers]]\nissuer = "https://as.example.com"\n'
                          'discovery = "oauth"\njwks_uri = "https://as.example.com/jwks"\n')
    result = ztmw_command("check", "tests.factories:create_app", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ztmw: invalid configuration: issuers[0]: set exactly one of jwks_uri, jwks_file and discovery"]
