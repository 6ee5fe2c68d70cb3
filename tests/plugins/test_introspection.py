"""The introspection verifier (RFC 7662; checklist INTRO-01..10, DPOP-18/19, MTLS-05, STEP-07, VEC-9449-7).

The authorization server is a real aiohttp server on loopback (`AuthorizationServer`): it checks HTTP Basic
client authentication and the form body exactly, answers per token from a dict the test controls, and counts
calls. The verifier is exercised directly (through its entry-point factory, with a real ClientSession) and
end to end through `ztmw.setup` with bearer, dpop and mtls enabled beside it. Time is a FakeClock shared by
the AS and ztmw; nothing of ours is mocked and no test measures time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import ssl
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import parse_qs, unquote_plus

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs
from ztmw_plugins.introspection import IntrospectionVerifier, create, looks_like_jws

import ztmw
from ztmw.cache import token_key
from ztmw.config import load_config
from ztmw.errors import ConfigurationError, InvalidToken, UpstreamUnavailable
from ztmw.registry import available, load_plugin
from ztmw.testing import ClientCert, DevIssuer, DPoPKey, FakeClock, TestCA
from ztmw.testing.http import free_port
from ztmw.typing import PluginDeps, TokenVerifier

from ..conftest import AUDIENCE, base_config, items_app

ISSUER = "https://as.example.com"
# Characters that RFC 6749 §2.3.1 form-urlencoding must escape before HTTP Basic: ':' '+' ' ' '%' non-ASCII.
CLIENT_ID = "rs:client +1/ü"
CLIENT_SECRET = "s3cr:et +/=%ü~"
SECRET_ENV = "ZTMW_TEST_INTROSPECTION_SECRET"
BANKID = "urn:example:acr:bankid"
VEC_9449_2 = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
VEC_9449_5 = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNo"
    "UklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERW"
    "clUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1"
    "IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwi"
    "YXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey7"
    "1EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA"
)
VEC_9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
VEC_9449_7 = {"active": True, "sub": "someone@example.com", "iss": "https://server.example.com",
              "nbf": 1562262611, "exp": 1562266216, "cnf": {"jkt": VEC_9449_JKT}}


# -- the authorization server ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Raw:
    """An answer no well-behaved AS gives: any status, body and content type (optionally chunked)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False


SLOW = "slow"
"""Answer only when the test ends (longer than any timeout the verifier has)."""


class AuthorizationServer:
    """An RFC 7662 endpoint: Basic client auth, form body with `token` (and the expected hint), nothing else.

    `answers[token]` is a response object (an active one turns inactive once the shared clock reaches its
    `exp`, as a real AS would), a `Raw` reply or `SLOW`; unknown tokens are inactive. Anything a correct
    client would never send is recorded in `problems` (checked at teardown) and answered 400.
    """

    def __init__(self, clock: FakeClock, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.clock = clock
        self.ssl_context = ssl_context
        self.answers: dict[str, Any] = {}
        self.calls = 0
        self.received: list[str] = []
        self.forms: list[dict[str, str]] = []
        self.problems: list[str] = []
        self.secret = CLIENT_SECRET
        self.expected_hint: str | None = None
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> AuthorizationServer:
        app = web.Application()
        app.router.add_route("*", "/introspect", self._introspect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context).start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{port}/introspect"
        return self

    async def close(self) -> None:
        self._release.set()
        if self.gate is not None:
            self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def _client_authenticated(self, request: web.Request) -> bool:
        """RFC 6749 §2.3.1 decoded independently: Basic, then form-urldecode each half."""
        values = request.headers.getall("Authorization", [])
        if len(values) != 1 or not values[0].startswith("Basic "):
            return False
        try:
            pair = base64.b64decode(values[0][6:], validate=True).decode("ascii")
        except (ValueError, UnicodeError):
            self.problems.append("Basic credentials are not base64 of ASCII (form-urlencoding missing)")
            return False
        raw_id, sep, raw_secret = pair.partition(":")
        return bool(sep) and unquote_plus(raw_id) == CLIENT_ID and unquote_plus(raw_secret) == self.secret

    async def _introspect(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if not self._client_authenticated(request):
            return web.json_response({"error": "invalid_client"}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="as"'})
        problems = []
        if request.method != "POST":
            problems.append(f"method {request.method}")
        if request.content_type != "application/x-www-form-urlencoded":
            problems.append(f"content type {request.content_type}")
        if request.query_string:
            problems.append("a query string")
        body = await request.text()
        try:
            form = parse_qs(body, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            form = {}
        expected = {"token"} | ({"token_type_hint"} if self.expected_hint else set())
        if set(form) != expected or any(len(v) != 1 for v in form.values()):
            problems.append(f"form members {sorted(form)}")
        elif self.expected_hint and form["token_type_hint"] != [self.expected_hint]:
            problems.append("token_type_hint")
        if problems:
            self.problems.extend(problems)
            return web.json_response({"error": "invalid_request"}, status=400)
        token = form["token"][0]
        self.received.append(token)
        self.forms.append({k: v[0] for k, v in form.items()})
        if self.gate is not None:
            self.arrived.set()
            await self.gate.wait()
        answer = self.answers.get(token, {"active": False})
        if answer == SLOW:
            await self._release.wait()
            return web.json_response({"active": False})
        if isinstance(answer, Raw):
            return await self._raw(request, answer)
        exp = answer.get("exp")
        if answer.get("active") is True and type(exp) in (int, float) and self.clock() >= exp:
            answer = {"active": False}  # RFC 7662 §2.2: an expired token is not active
        return web.json_response(answer)

    @staticmethod
    async def _raw(request: web.Request, raw: Raw) -> web.StreamResponse:
        headers = {"Content-Type": raw.content_type, **raw.headers}
        if not raw.chunked:
            return web.Response(status=raw.status, body=raw.body, headers=headers)
        response = web.StreamResponse(status=raw.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(raw.body), 4096):
            await response.write(raw.body[start:start + 4096])
        await response.write_eof()
        return response


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, CLIENT_SECRET)


@pytest.fixture
async def auth_server(clock: FakeClock, secret_env: None) -> AsyncIterator[AuthorizationServer]:
    server = await AuthorizationServer(clock).start()
    try:
        yield server
    finally:
        await server.close()
    assert server.problems == [], "the verifier sent something an RFC 7662 endpoint must not receive"


def plugin_settings(server: AuthorizationServer, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "endpoint": server.url, "client_id": CLIENT_ID, "client_secret_env": SECRET_ENV, "issuer": ISSUER,
    }
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


def active(clock: FakeClock, drop: tuple[str, ...] = (), **claims: Any) -> dict[str, Any]:
    """An active RFC 7662 response for this API (RFC 9068 field set), overridable."""
    now = int(clock())
    body: dict[str, Any] = {
        "active": True, "iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "exp": now + 300, "iat": now,
        "scope": "items:read", "client_id": "demo-client", "jti": "intro-jti-1", "token_type": "Bearer",
    }
    body.update(claims)
    for name in drop:
        body.pop(name, None)
    return body


def opaque() -> str:
    return "op_" + secrets.token_urlsafe(24)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the verifier alone --------------------------------------------------------------------------------------

@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def build(http: aiohttp.ClientSession, clock: FakeClock, settings: dict[str, Any],
          identifier: str = AUDIENCE) -> IntrospectionVerifier:
    """The verifier as ztmw builds it: a validated config, the entry point's factory, real deps."""
    config = load_config({"resource": {"identifier": identifier}, "plugins": {"introspection": settings}})
    deps = PluginDeps(config=config, clock=clock, http=lambda: http, logger=structlog.get_logger("ztmw"))
    return create(config.plugins["introspection"], deps)


Make = Callable[..., IntrospectionVerifier]


@pytest.fixture
def make(http: aiohttp.ClientSession, clock: FakeClock, auth_server: AuthorizationServer) -> Make:
    def factory(**overrides: Any) -> IntrospectionVerifier:
        return build(http, clock, plugin_settings(auth_server, **overrides))
    return factory


async def refused(verifier: IntrospectionVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify_token(token)
    return caught.value.reason


async def unavailable(verifier: IntrospectionVerifier, token: str) -> list[Any]:
    """Asserts 503 (UpstreamUnavailable) and returns the log events, which must not hold the token."""
    with capture_logs() as events:
        with pytest.raises(UpstreamUnavailable) as caught:
            await verifier.verify_token(token)
    assert caught.value.reason == "introspection_unavailable"
    assert token not in "".join(traceback.format_exception(caught.value))
    assert token not in json.dumps(events, default=str)
    return events


def cause(events: list[Any]) -> str:
    found = [e for e in events if e["event"] == "introspection_unavailable"]
    assert len(found) == 1
    return str(found[0]["cause"])


# -- entry point and settings ------------------------------------------------------------------------------

async def test_entry_point_is_registered_and_loads_by_name(
    http: aiohttp.ClientSession, clock: FakeClock, auth_server: AuthorizationServer
) -> None:
    assert "introspection" in available("ztmw.verifiers")
    settings = plugin_settings(auth_server)
    config = load_config({"resource": {"identifier": AUDIENCE}, "plugins": {"introspection": settings}})
    deps = PluginDeps(config=config, clock=clock, http=lambda: http, logger=structlog.get_logger("ztmw"))
    loaded = load_plugin("ztmw.verifiers", "introspection", config.plugins["introspection"], deps)
    assert loaded.instance.name == "introspection"
    assert isinstance(loaded.instance, TokenVerifier)
    assert loaded.distribution == "ztmw"


async def test_unknown_setting_stops_start_up_naming_the_key(
    http: aiohttp.ClientSession, clock: FakeClock, auth_server: AuthorizationServer
) -> None:
    with pytest.raises(ConfigurationError, match=r"plugins\.introspection\.client_secret\b"):
        build(http, clock, plugin_settings(auth_server, client_secret="inline secrets are refused"))


async def test_unknown_setting_through_setup_stops_start_up(
    issuer: DevIssuer, auth_server: AuthorizationServer
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "introspection"]})
    config["plugins"] = {"introspection": plugin_settings(auth_server, audience=[AUDIENCE])}
    with pytest.raises(ConfigurationError, match=r"plugins\.introspection\.audience\b"):
        ztmw.setup(web.Application(), config)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"endpoint": None}, "endpoint"),
    ({"endpoint": "http://as.example.com/introspect"}, "endpoint"),
    ({"endpoint": "http://10.0.0.1/introspect"}, "endpoint"),
    ({"endpoint": "ftp://127.0.0.1/introspect"}, "endpoint"),
    ({"endpoint": "https://rs:secret@as.example.com/introspect"}, "endpoint"),
    ({"endpoint": "https://as.example.com/introspect#frag"}, "endpoint"),
    ({"client_id": None}, "client_id"),
    ({"client_id": ""}, "client_id"),
    ({"client_secret_env": None}, "client_secret_env"),
    ({"client_secret_env": "ZTMW_TEST_INTROSPECTION_UNSET"}, "client_secret_env"),
    ({"issuer": None}, "issuer"),
    ({"issuer": 7}, "issuer"),
    ({"audiences": []}, "audiences"),
    ({"audiences": "https://api.example.com"}, "audiences"),
    ({"audiences": [""]}, "audiences"),
    ({"require_audience": "yes"}, "require_audience"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"timeout": 61}, "timeout"),
    ({"max_response_bytes": 1500.5}, "max_response_bytes"),
    ({"max_response_bytes": 10}, "max_response_bytes"),
    ({"token_type_hint": "access token"}, "token_type_hint"),
    ({"token_type_hint": ""}, "token_type_hint"),
    ({"only_opaque": 1}, "only_opaque"),
    ({"default_ttl": 0}, "default_ttl"),
    ({"default_ttl": float("nan")}, "default_ttl"),
    ({"leeway": -1}, "leeway"),
    ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
])
async def test_bad_settings_name_the_key(
    http: aiohttp.ClientSession, clock: FakeClock, auth_server: AuthorizationServer,
    overrides: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigurationError, match=rf"plugins\.introspection\.{key}\b") as caught:
        build(http, clock, plugin_settings(auth_server, **overrides))
    assert CLIENT_SECRET not in str(caught.value)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "[::1]"])
async def test_plain_http_endpoint_is_allowed_on_loopback_only(
    http: aiohttp.ClientSession, clock: FakeClock, auth_server: AuthorizationServer, host: str
) -> None:
    verifier = build(http, clock, plugin_settings(auth_server, endpoint=f"http://{host}:1/introspect"))
    assert verifier.name == "introspection"


async def test_the_secret_is_not_in_the_verifiers_repr(make: Make) -> None:
    verifier = make()
    assert CLIENT_SECRET not in repr(verifier)
    assert base64.b64encode(CLIENT_SECRET.encode()).decode() not in repr(verifier)


# -- INTRO-01: the request --------------------------------------------------------------------------------

async def test_intro_01_post_form_with_basic_client_auth(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """POST, form-urlencoded `token` only; Basic auth of the form-urlencoded id and secret (RFC 6749)."""
    token = opaque()
    auth_server.answers[token] = active(clock)
    verified = await make().verify_token(token)
    assert verified.subject == "alice"
    assert auth_server.forms == [{"token": token}]


async def test_intro_01_token_type_hint_is_sent_when_configured(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    auth_server.expected_hint = "access_token"
    token = opaque()
    auth_server.answers[token] = active(clock)
    await make(token_type_hint="access_token").verify_token(token)
    assert auth_server.forms == [{"token": token, "token_type_hint": "access_token"}]


async def test_intro_01_wrong_client_secret_is_upstream_unavailable(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """The AS refuses the RS (401 invalid_client): that is our misconfiguration, not the caller's: 503."""
    auth_server.secret = "the AS expects another secret"
    token = opaque()
    auth_server.answers[token] = active(clock)
    events = await unavailable(make(), token)
    assert cause(events) == "http_401"
    assert auth_server.received == []  # refused before the AS looked at the token


# -- INTRO-02/04/07: active ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["true", 1, 1.0, "True", None, [True], {"value": True}, "missing"])
async def test_intro_02_active_must_be_json_true(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock, value: Any
) -> None:
    token = opaque()
    response = active(clock, active=value)
    if value == "missing":
        del response["active"]
    auth_server.answers[token] = response
    assert await refused(make(), token) == "inactive_token"


async def test_intro_02_json_true_is_active(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock)
    assert (await make().verify_token(token)).verifier == "introspection"


async def test_intro_04_inactive_and_unknown_tokens_are_invalid_token(
    make: Make, auth_server: AuthorizationServer
) -> None:
    verifier = make()
    revoked = opaque()
    auth_server.answers[revoked] = {"active": False}
    assert await refused(verifier, revoked) == "inactive_token"
    assert await refused(verifier, opaque()) == "inactive_token"  # the AS never heard of it


async def test_intro_07_claims_of_an_inactive_response_are_ignored(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """A (non-conforming) inactive response full of good-looking claims is still only inactive."""
    token = opaque()
    auth_server.answers[token] = active(clock, active=False, scope="admin", acr=BANKID)
    assert await refused(make(), token) == "inactive_token"


# -- INTRO-03: what an active response must satisfy -------------------------------------------------------

async def test_intro_03_active_response_becomes_a_verified_token(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    now = int(clock())
    token = opaque()
    auth_server.answers[token] = active(
        clock, aud=["https://other.example.com", AUDIENCE], scope="items:read  items:write", nbf=now - 5,
        auth_time=now - 60, acr=BANKID, amr=["pwd", "hwk"], act={"sub": "agent-7"},
        username="alice@example.com",
    )
    verified = await make().verify_token(token)
    assert verified.issuer == ISSUER
    assert verified.subject == "alice"
    assert verified.audience == ("https://other.example.com", AUDIENCE)
    assert verified.expires_at == now + 300
    assert verified.token_id == "intro-jti-1"
    assert verified.verifier == "introspection"
    assert verified.client_id == "demo-client"
    assert verified.scopes == frozenset({"items:read", "items:write"})
    assert (verified.issued_at, verified.not_before, verified.auth_time) == (now, now - 5, now - 60)
    assert (verified.acr, verified.amr) == (BANKID, ("pwd", "hwk"))
    assert dict(verified.cnf) == {}
    assert verified.actor == {"sub": "agent-7"}
    assert verified.claims["username"] == "alice@example.com"
    assert verified.leeway == 30


async def test_intro_03_expired_exp_is_refused_with_leeway(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    verifier = make(leeway=10)
    stale, recent = opaque(), opaque()
    # the AS's clock runs behind ours: it still calls these active
    auth_server.answers[stale] = active(clock, exp=clock() - 11)
    auth_server.answers[recent] = active(clock, exp=clock() - 9)
    auth_server.clock = FakeClock(clock() - 60)
    assert await refused(verifier, stale) == "token_expired"
    assert (await verifier.verify_token(recent)).expires_at == clock() - 9


async def test_intro_03_nbf_and_iat_in_the_future_are_refused(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    verifier = make()
    early, minted_later, within = opaque(), opaque(), opaque()
    auth_server.answers[early] = active(clock, nbf=clock() + 31)
    auth_server.answers[minted_later] = active(clock, iat=clock() + 31)
    auth_server.answers[within] = active(clock, nbf=clock() + 29, iat=clock() + 29)
    assert await refused(verifier, early) == "token_not_yet_valid"
    assert await refused(verifier, minted_later) == "token_issued_in_future"
    assert (await verifier.verify_token(within)).subject == "alice"


async def test_intro_03_foreign_iss_is_refused_and_a_missing_iss_means_the_configured_issuer(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    verifier = make()
    tokens = {name: opaque() for name in ("foreign", "case", "slash", "absent", "number")}
    auth_server.answers[tokens["foreign"]] = active(clock, iss="https://evil.example.com")
    auth_server.answers[tokens["case"]] = active(clock, iss=ISSUER.upper())
    auth_server.answers[tokens["slash"]] = active(clock, iss=ISSUER + "/")
    auth_server.answers[tokens["absent"]] = active(clock, drop=("iss",))
    auth_server.answers[tokens["number"]] = active(clock, iss=1)
    for name in ("foreign", "case", "slash"):
        assert await refused(verifier, tokens[name]) == "unknown_issuer", name
    assert await refused(verifier, tokens["number"]) == "invalid_claim"
    assert (await verifier.verify_token(tokens["absent"])).issuer == ISSUER


async def test_intro_03_audience_must_name_this_api(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    verifier = make()
    foreign, prefix, missing, empty = opaque(), opaque(), opaque(), opaque()
    auth_server.answers[foreign] = active(clock, aud=["https://other.example.com"])
    auth_server.answers[prefix] = active(clock, aud=AUDIENCE + "/v1")
    auth_server.answers[missing] = active(clock, drop=("aud",))
    auth_server.answers[empty] = active(clock, aud=[])
    assert await refused(verifier, foreign) == "audience_mismatch"
    assert await refused(verifier, prefix) == "audience_mismatch"
    assert await refused(verifier, missing) == "missing_claim"  # SEC-02: audience-restricted by default
    assert await refused(verifier, empty) == "invalid_claim"


async def test_intro_03_audience_may_be_optional_and_configured(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    missing, custom = opaque(), opaque()
    auth_server.answers[missing] = active(clock, drop=("aud",))
    auth_server.answers[custom] = active(clock, aud="urn:api:items")
    assert (await make(require_audience=False).verify_token(missing)).audience == ()
    assert await refused(make(), custom) == "audience_mismatch"
    assert (await make(audiences=["urn:api:items"]).verify_token(custom)).audience == ("urn:api:items",)


@pytest.mark.parametrize(("claims", "drop", "reason"), [
    ({}, ("sub",), "missing_claim"),
    ({"sub": ""}, (), "invalid_claim"),
    ({"sub": 42}, (), "invalid_claim"),
    ({"exp": "1999999999"}, (), "invalid_claim"),
    ({"exp": True}, (), "invalid_claim"),
    ({"exp": None}, (), "invalid_claim"),
    ({"nbf": [1]}, (), "invalid_claim"),
    ({"scope": ["items:read"]}, (), "invalid_claim"),
    ({"amr": "pwd"}, (), "invalid_claim"),
    ({"amr": ["pwd", 1]}, (), "invalid_claim"),
    ({"acr": 2}, (), "invalid_claim"),
    ({"auth_time": "yesterday"}, (), "invalid_claim"),
    ({"cnf": "jkt"}, (), "invalid_claim"),
    ({"cnf": {}}, (), "unsupported_binding"),  # RFC 7800 §3: a binding claimed with no key named fails closed
    ({"act": "agent"}, (), "invalid_claim"),
    ({"client_id": False}, (), "invalid_claim"),
    ({"aud": [AUDIENCE, 7]}, (), "invalid_claim"),
])
async def test_intro_03_malformed_members_are_invalid_token(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock,
    claims: dict[str, Any], drop: tuple[str, ...], reason: str
) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock, drop=drop, **claims)
    assert await refused(make(), token) == reason


async def test_intro_03_huge_or_non_finite_dates_are_invalid(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    token = opaque()
    body = json.dumps(active(clock)).replace(f'"exp": {int(clock()) + 300}', '"exp": 1e400')
    assert "1e400" in body
    auth_server.answers[token] = Raw(body=body.encode())  # parses to inf: not a NumericDate (JOSE-06)
    assert await refused(make(), token) == "invalid_claim"
    huge = opaque()
    auth_server.answers[huge] = active(clock, exp=2**60)
    assert await refused(make(), huge) == "invalid_claim"


# -- DPOP-19 / INTRO-08: token_type and cnf -----------------------------------------------------------------

async def test_dpop_19_token_type_must_agree_with_cnf_jkt(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    jkt = DPoPKey().thumbprint
    verifier = make()
    cases = {
        "bound-but-bearer": (active(clock, cnf={"jkt": jkt}, token_type="Bearer"), "invalid_claim"),
        "dpop-without-key": (active(clock, token_type="DPoP"), "invalid_claim"),
        "not-a-string": (active(clock, cnf={"jkt": jkt}, token_type=1), "invalid_claim"),
    }
    for name, (response, reason) in cases.items():
        token = opaque()
        auth_server.answers[token] = response
        assert await refused(verifier, token) == reason, name
    accepted = [active(clock, cnf={"jkt": jkt}, token_type="DPoP"),
                active(clock, cnf={"jkt": jkt}, token_type="dpop"),  # RFC 6749 §5.1: case-insensitive
                active(clock, cnf={"jkt": jkt}, drop=("token_type",))]  # absent: cnf.jkt alone decides
    for response in accepted:
        token = opaque()
        auth_server.answers[token] = response
        assert dict((await verifier.verify_token(token)).cnf) == {"jkt": jkt}


async def test_intro_08_cnf_members_pass_through_for_the_binding_verifiers(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    token = opaque()
    cnf = {"jkt": DPoPKey().thumbprint, "x5t#S256": "v68ffgcPn6jdYpBfFY2nP4ShE2Yk-6_Mk5PI9yh6aes"}
    auth_server.answers[token] = active(clock, cnf=cnf, token_type="DPoP")
    assert dict((await make().verify_token(token)).cnf) == cnf


# -- INTRO-05: the endpoint's certificate ------------------------------------------------------------------

async def test_intro_05_endpoint_certificate_is_verified(
    http: aiohttp.ClientSession, clock: FakeClock, secret_env: None, tmp_path: Path
) -> None:
    """https to an AS whose CA we do not trust: 503. With that CA as `ca_file`: it works."""
    ca = TestCA()
    server = await AuthorizationServer(clock, ssl_context=ca.server_ssl_context()).start()
    try:
        token = opaque()
        server.answers[token] = active(clock)
        untrusted = build(http, clock, plugin_settings(server))
        assert server.url.startswith("https://")
        assert cause(await unavailable(untrusted, token)) == "tls_certificate"
        assert server.received == []  # the token never left over an unverified connection
        ca_file = tmp_path / "as-ca.pem"
        ca_file.write_text(ca.cert_pem)
        trusted = build(http, clock, plugin_settings(server, ca_file=str(ca_file)))
        assert (await trusted.verify_token(token)).subject == "alice"
        assert server.received == [token]
    finally:
        await server.close()
    assert server.problems == []


async def test_intro_05_ca_file_does_not_turn_hostname_checks_off(
    http: aiohttp.ClientSession, clock: FakeClock, secret_env: None, tmp_path: Path
) -> None:
    ca = TestCA(server_names=("as.internal.test",))  # a certificate for another name
    server = await AuthorizationServer(clock, ssl_context=ca.server_ssl_context()).start()
    try:
        token = opaque()
        server.answers[token] = active(clock)
        ca_file = tmp_path / "as-ca.pem"
        ca_file.write_text(ca.cert_pem)
        verifier = build(http, clock, plugin_settings(server, ca_file=str(ca_file)))
        assert cause(await unavailable(verifier, token)) == "tls_certificate"
        assert server.received == []
    finally:
        await server.close()


# -- INTRO-10: an endpoint that gives no usable answer -----------------------------------------------------

BIG = json.dumps({"active": True, "sub": "alice", "pad": "x" * 70_000}).encode()
FAILURES = {
    "500": (Raw(status=500, body=b'{"error": "server_error"}'), "http_500"),
    "503": (Raw(status=503, body=b""), "http_503"),
    "400": (Raw(status=400, body=b'{"error": "invalid_request"}'), "http_400"),
    "204": (Raw(status=204), "http_204"),
    "redirect": (Raw(status=302, headers={"Location": "/introspect"}), "http_302"),
    "html": (Raw(body=b"<html><body>Sign in</body></html>", content_type="text/html"), "content_type"),
    "json-as-text": (Raw(body=b'{"active": true, "sub": "alice"}', content_type="text/plain"),
                     "content_type"),
    "jwt-response": (Raw(body=b"e30.e30.sig", content_type="application/token-introspection+jwt"),
                     "content_type"),
    "latin-1": (Raw(body=b'{"active": true, "sub": "alice"}',
                    content_type="application/json; charset=latin-1"), "charset"),
    "not-json": (Raw(body=b"active=true"), "body_bad_json"),
    "truncated": (Raw(body=b'{"active": true, "sub": "al'), "body_bad_json"),
    "array": (Raw(body=b'[{"active": true}]'), "body_not_an_object"),
    "string": (Raw(body=b'"active"'), "body_not_an_object"),
    "duplicate-active": (Raw(body=b'{"active": false, "active": true, "sub": "alice"}'),
                         "body_duplicate_member"),
    "nan": (Raw(body=b'{"active": true, "sub": "alice", "exp": NaN}'), "body_non_finite_number"),
    "bom": (Raw(body=b'\xef\xbb\xbf{"active": true}'), "body_bad_json"),
    "oversize": (Raw(body=BIG), "too_large"),
    "oversize-chunked": (Raw(body=BIG, chunked=True), "too_large"),
}


@pytest.mark.parametrize("name", list(FAILURES))
async def test_intro_10_unusable_answers_are_upstream_unavailable(
    make: Make, auth_server: AuthorizationServer, name: str
) -> None:
    reply, expected = FAILURES[name]
    token = opaque()
    auth_server.answers[token] = reply
    assert cause(await unavailable(make(), token)) == expected
    assert auth_server.calls == 1  # redirects are not followed


async def test_intro_10_response_size_limit_is_configurable(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock, pad="x" * 2000)
    assert cause(await unavailable(make(max_response_bytes=1024), token)) == "too_large"
    assert (await make(max_response_bytes=4096).verify_token(token)).subject == "alice"


async def test_intro_10_slow_endpoint_times_out(make: Make, auth_server: AuthorizationServer) -> None:
    token = opaque()
    auth_server.answers[token] = SLOW
    assert cause(await unavailable(make(timeout=0.2), token)) == "timeout"


async def test_intro_10_closed_http_session_is_upstream_unavailable(
    clock: FakeClock, auth_server: AuthorizationServer
) -> None:
    """The app is shutting down (the shared session is closed): the endpoint cannot be asked, so 503."""
    async with aiohttp.ClientSession() as session:
        verifier = build(session, clock, plugin_settings(auth_server))
    assert session.closed
    assert cause(await unavailable(verifier, opaque())) == "RuntimeError"
    assert auth_server.calls == 0


async def test_intro_10_endpoint_down_is_upstream_unavailable(
    http: aiohttp.ClientSession, clock: FakeClock, auth_server: AuthorizationServer
) -> None:
    verifier = build(http, clock, plugin_settings(
        auth_server, endpoint=f"http://127.0.0.1:{closed_port()}/introspect"))
    assert cause(await unavailable(verifier, opaque())) == "ClientConnectorError"


# -- what is sent where: JWTs, RFC vectors, single flight ---------------------------------------------------

async def test_jwt_is_left_to_bearer_without_calling_the_endpoint(
    make: Make, auth_server: AuthorizationServer, issuer: DevIssuer
) -> None:
    jwt = issuer.mint("alice", scope="items:read")
    assert looks_like_jws(jwt)
    assert await refused(make(), jwt) == "malformed_token"
    assert auth_server.calls == 0


@pytest.mark.parametrize("token", [
    VEC_9449_5,  # a DPoP proof is a JWS too
    "eyJhbGciOiJub25lIn0.eyJpc3MiOiJqb2UifQ.",  # unsecured (alg none, empty signature): bearer refuses it
    "eyJhbGciOiJFUzI1NiJ9..c2ln",  # detached payload
])
async def test_jws_shapes_never_reach_the_endpoint(make: Make, auth_server: AuthorizationServer,
                                                   token: str) -> None:
    assert looks_like_jws(token)
    assert await refused(make(), token) == "malformed_token"
    assert auth_server.calls == 0


async def test_only_opaque_false_introspects_jwts_too(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock, issuer: DevIssuer
) -> None:
    jwt = issuer.mint("alice", scope="items:read")
    auth_server.answers[jwt] = active(clock)
    assert (await make(only_opaque=False).verify_token(jwt)).subject == "alice"
    assert auth_server.received == [jwt]


@pytest.mark.parametrize("token", [
    VEC_9449_2,  # '~' is not base64url: three segments, yet not a JWS
    "abc.def.ghi",  # base64url segments, but the first is not JSON
    "eyJ0eXAiOiJKV1QifQ.e30.c2ln",  # a JSON header without alg
    "e30.e30",  # two segments
    "a.b.c.d.e",  # JWE-shaped: opaque to us, the AS may know it
    "2YotnFZFEjr1zCsicMWpAA",  # RFC 6749 §4.1.4's example access token
])
def test_opaque_shapes_are_not_mistaken_for_jws(token: str) -> None:
    assert not looks_like_jws(token)


async def test_vec_9449_2_opaque_token_is_sent_to_introspection(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    auth_server.answers[VEC_9449_2] = active(clock, cnf={"jkt": VEC_9449_JKT}, token_type="DPoP")
    verified = await make().verify_token(VEC_9449_2)
    assert auth_server.received == [VEC_9449_2]  # exactly the token, '~' and '.' intact
    assert verified.cnf["jkt"] == VEC_9449_JKT


async def test_vec_9449_7_response_needs_require_audience_false(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """RFC 9449 6.2's example response has no `aud`: refused by default (SEC-02), accepted when configured."""
    clock.now = 1562262618
    auth_server.answers[VEC_9449_2] = dict(VEC_9449_7)
    assert await refused(make(issuer="https://server.example.com"), VEC_9449_2) == "missing_claim"
    lenient = make(issuer="https://server.example.com", require_audience=False)
    verified = await lenient.verify_token(VEC_9449_2)
    assert (verified.subject, verified.issuer, verified.expires_at) == (
        "someone@example.com", "https://server.example.com", 1562266216)
    assert len(verified.token_id) == 16 and verified.token_id not in VEC_9449_2  # no jti: a short hash


async def test_concurrent_checks_of_one_token_share_one_endpoint_call(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    verifier = make()
    token, inactive = opaque(), opaque()
    auth_server.answers[token] = active(clock)
    auth_server.answers[inactive] = {"active": False}
    auth_server.gate = asyncio.Event()
    pending = asyncio.gather(*(verifier.verify_token(token) for _ in range(5)))
    await auth_server.arrived.wait()
    auth_server.gate.set()
    results = await pending
    assert {r.subject for r in results} == {"alice"} and auth_server.calls == 1
    auth_server.gate = None
    errors = await asyncio.gather(*(verifier.verify_token(inactive) for _ in range(3)),
                                  return_exceptions=True)
    assert all(isinstance(e, InvalidToken) and e.reason == "inactive_token" for e in errors)
    assert len({id(e) for e in errors}) == 3  # each caller its own exception (the core sets its scheme)


async def test_a_cancelled_caller_does_not_cancel_the_shared_call(
    make: Make, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    verifier = make()
    token = opaque()
    auth_server.answers[token] = active(clock)
    auth_server.gate = asyncio.Event()
    first = asyncio.ensure_future(verifier.verify_token(token))
    second = asyncio.ensure_future(verifier.verify_token(token))
    await auth_server.arrived.wait()
    first.cancel()
    auth_server.gate.set()
    assert (await second).subject == "alice"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert auth_server.calls == 1


# -- end to end through ztmw.setup --------------------------------------------------------------------------

async def whoami(request: web.Request) -> web.Response:
    principal = request[ztmw.PRINCIPAL]
    assert principal is not None
    return web.json_response({
        "subject": principal.subject, "issuer": principal.issuer, "verifier": principal.token.verifier,
        "binding": principal.binding, "scopes": sorted(principal.scopes),
        "jkt": principal.caller.key_thumbprint, "x5t": principal.caller.certificate_thumbprint,
    })


RULES = [
    {"id": "me", "path": "/me", "methods": ["GET"], "scopes": ["items:read"]},
    {"id": "bound", "path": "/bound", "methods": ["GET"], "scopes": ["items:read"], "binding": "dpop"},
    {"id": "cert", "path": "/cert", "methods": ["GET"], "scopes": ["items:read"], "binding": "mtls"},
    {"id": "pay", "path": "/pay", "methods": ["GET"], "max_auth_age": 300},
    {"id": "bankid", "path": "/bankid", "methods": ["GET"], "acr_values": [BANKID], "min_ial": 3},
    {"id": "vector", "path": "/protectedresource", "methods": ["GET"]},
]


def protected_app() -> web.Application:
    app = items_app()
    for path in ("/me", "/bound", "/cert", "/pay", "/bankid", "/protectedresource"):
        app.router.add_get(path, whoami)
    return app


def e2e_config(dev_issuer: DevIssuer, server: AuthorizationServer, enabled: tuple[str, ...],
               plugin: dict[str, Any] | None = None) -> dict[str, Any]:
    config = base_config(dev_issuer, verifiers={"enabled": list(enabled)})
    config["rules"] = config["rules"] + RULES
    config["plugins"] = {"introspection": plugin_settings(server, **(plugin or {}))}
    config["trust"] = {"acr": {BANKID: {"aal": 2, "ial": 3}}}
    return config


@dataclass
class Api:
    client: Any
    origin: str
    pipeline: Any
    events: list[Any] = field(default_factory=list)
    last_audit: Any = None

    async def get(self, path: str, token: str | None = None, *, scheme: str = "Bearer",
                  headers: dict[str, str] | None = None) -> Any:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"{scheme} {token}"
        with capture_logs() as events:
            response = await self.client.get(path, headers=sent)
            await response.read()
        self.events.extend(events)
        audit = [e for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]
        assert len(audit) == 1, "one audit event per request"
        self.last_audit = audit[0]
        return response

    @property
    def reason(self) -> str:
        assert self.last_audit is not None
        return str(self.last_audit["reason"])


async def start_api(aiohttp_client: Any, issuer: DevIssuer, server: AuthorizationServer, clock: FakeClock,
                    enabled: tuple[str, ...] = ("bearer", "introspection"), *, origin: str | None = None,
                    config_changes: dict[str, Any] | None = None,
                    plugin: dict[str, Any] | None = None) -> Api:
    port = free_port()
    config = e2e_config(issuer, server, enabled, plugin)
    config["resource"]["public_origin"] = origin or f"http://127.0.0.1:{port}"
    config.update(config_changes or {})
    app = protected_app()
    pipeline = ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    return Api(client, f"http://127.0.0.1:{port}", pipeline)


@pytest.fixture
async def api(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> Api:
    return await start_api(aiohttp_client, issuer, auth_server, clock)


def bearer_challenge(response: Any) -> str:
    found = [c for c in response.headers.getall("WWW-Authenticate", []) if c.startswith("Bearer ")]
    assert len(found) == 1, response.headers.getall("WWW-Authenticate", [])
    return str(found[0])


def assert_invalid_token(response: Any) -> None:
    """R-TOK-B: 401 with error="invalid_token" on the Bearer challenge."""
    assert response.status == 401
    assert 'error="invalid_token"' in bearer_challenge(response)


def assert_upstream(api: Api, response: Any) -> None:
    """R-UPSTREAM: 503, no challenge, fail closed."""
    assert response.status == 503
    assert "WWW-Authenticate" not in response.headers
    assert api.reason == "introspection_unavailable"


async def test_e2e_active_opaque_token_is_allowed(api: Api, auth_server: AuthorizationServer,
                                                  clock: FakeClock) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock)
    response = await api.get("/me", token)
    assert response.status == 200
    assert await response.json() == {"subject": "alice", "issuer": ISSUER, "verifier": "introspection",
                                     "binding": None, "scopes": ["items:read"], "jkt": None, "x5t": None}
    assert api.last_audit is not None
    assert api.last_audit["verifier"] == "introspection" and api.last_audit["token_id"] == "intro-jti-1"
    assert auth_server.received == [token]


async def test_e2e_scope_from_introspection_feeds_the_policy(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock, scope="profile:read")
    response = await api.get("/me", token)
    assert response.status == 403 and 'error="insufficient_scope"' in bearer_challenge(response)


async def test_e2e_inactive_token_is_invalid_token(api: Api, auth_server: AuthorizationServer) -> None:
    token = opaque()
    auth_server.answers[token] = {"active": False}
    response = await api.get("/me", token)
    assert_invalid_token(response)
    assert (await response.json())["error"] == "invalid_token"


@pytest.mark.parametrize("value", ["true", 1, "missing"])
async def test_e2e_active_not_json_true_is_invalid_token(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock, value: Any
) -> None:
    token = opaque()
    response = active(clock, active=value)
    if value == "missing":
        del response["active"]
    auth_server.answers[token] = response
    assert_invalid_token(await api.get("/me", token))


@pytest.mark.parametrize("claims", [
    {"exp": "past"}, {"aud": "https://other.example.com"}, {"iss": "https://evil.example.com"},
])
async def test_e2e_expired_foreign_audience_or_issuer_is_invalid_token(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock, claims: dict[str, Any]
) -> None:
    if claims.get("exp") == "past":
        claims = {"exp": clock() - 3600}
        auth_server.clock = FakeClock(clock() - 7200)  # an AS whose clock still says active
    token = opaque()
    auth_server.answers[token] = active(clock, **claims)
    assert_invalid_token(await api.get("/me", token))


@pytest.mark.parametrize("name", ["500", "html", "not-json", "oversize", "array", "redirect"])
async def test_e2e_unusable_answers_are_503(api: Api, auth_server: AuthorizationServer, name: str) -> None:
    token = opaque()
    auth_server.answers[token] = FAILURES[name][0]
    assert_upstream(api, await api.get("/me", token))


async def test_e2e_wrong_client_secret_is_503(api: Api, auth_server: AuthorizationServer,
                                              clock: FakeClock) -> None:
    auth_server.secret = "rotated at the AS, not at the RS"
    token = opaque()
    auth_server.answers[token] = active(clock)
    assert_upstream(api, await api.get("/me", token))


async def test_e2e_slow_endpoint_is_503(aiohttp_client: Any, issuer: DevIssuer,
                                        auth_server: AuthorizationServer, clock: FakeClock) -> None:
    api = await start_api(aiohttp_client, issuer, auth_server, clock, plugin={"timeout": 0.2})
    token = opaque()
    auth_server.answers[token] = SLOW
    assert_upstream(api, await api.get("/me", token))


async def test_e2e_endpoint_down_is_503_while_jwts_keep_working(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    api = await start_api(aiohttp_client, issuer, auth_server, clock,
                          plugin={"endpoint": f"http://127.0.0.1:{closed_port()}/introspect"})
    assert_upstream(api, await api.get("/me", opaque()))
    response = await api.get("/me", issuer.mint("alice", scope="items:read"))
    assert response.status == 200 and (await response.json())["verifier"] == "bearer"


@pytest.mark.parametrize("enabled", [("bearer", "introspection"), ("introspection", "bearer")])
async def test_e2e_jwt_goes_to_bearer_and_never_reaches_the_endpoint(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock,
    enabled: tuple[str, ...]
) -> None:
    api = await start_api(aiohttp_client, issuer, auth_server, clock, enabled)
    good = issuer.mint("alice", scope="items:read")
    response = await api.get("/me", good)
    assert response.status == 200 and (await response.json())["verifier"] == "bearer"
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    assert_invalid_token(await api.get("/me", forged))
    foreign = issuer.mint("alice", scope="items:read", audience="https://other.example.com")
    assert_invalid_token(await api.get("/me", foreign))
    assert auth_server.calls == 0


async def test_e2e_vec_9449_2_token_goes_to_introspection(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """Three dot-separated segments, not a JWT: bearer refuses it, introspection is asked and decides."""
    auth_server.answers[VEC_9449_2] = active(clock)
    response = await api.get("/me", VEC_9449_2)
    assert response.status == 200 and (await response.json())["verifier"] == "introspection"
    assert auth_server.received == [VEC_9449_2]


# -- INTRO-06: caching ------------------------------------------------------------------------------------

async def test_intro_06_second_request_with_an_active_token_uses_the_cache(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock)
    assert (await api.get("/me", token)).status == 200
    assert api.last_audit is not None and api.last_audit["cache"] == "miss"
    assert (await api.get("/me", token)).status == 200
    assert api.last_audit["cache"] == "hit"
    assert auth_server.calls == 1


async def test_intro_06_inactive_result_never_enters_the_verification_cache(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """Only successes are cached: with the core's negative cache off, every request asks the AS again."""
    api = await start_api(aiohttp_client, issuer, auth_server, clock,
                          config_changes={"cache": {"negative_ttl": 0}})
    token = opaque()
    auth_server.answers[token] = {"active": False}
    for expected_calls in (1, 2, 3):
        assert_invalid_token(await api.get("/me", token))
        assert auth_server.calls == expected_calls
    assert api.pipeline.cache.get(token_key(token)) is None


async def test_intro_06_inactive_token_is_asked_again_every_time(
    api: Api, auth_server: AuthorizationServer
) -> None:
    """The default configuration: an inactive token is never remembered, and audit names why it failed."""
    token = opaque()
    auth_server.answers[token] = {"active": False}
    for expected_calls in (1, 2, 3):
        assert_invalid_token(await api.get("/me", token))
        assert api.reason == "inactive_token"
        assert auth_server.calls == expected_calls


async def test_intro_06_result_is_not_used_beyond_exp(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock, exp=int(clock()) + 100)
    assert (await api.get("/me", token)).status == 200
    clock.advance(99)
    assert (await api.get("/me", token)).status == 200
    assert auth_server.calls == 1
    clock.advance(1)  # at exp: the cached result is gone and the AS now calls the token inactive
    assert_invalid_token(await api.get("/me", token))
    assert auth_server.calls == 2


async def test_intro_06_response_without_exp_is_cached_for_default_ttl_only(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    api = await start_api(aiohttp_client, issuer, auth_server, clock, plugin={"default_ttl": 60})
    token = opaque()
    auth_server.answers[token] = active(clock, drop=("exp",))
    assert (await api.get("/me", token)).status == 200
    clock.advance(59)
    assert (await api.get("/me", token)).status == 200
    assert auth_server.calls == 1
    clock.advance(1)
    assert (await api.get("/me", token)).status == 200
    assert auth_server.calls == 2


async def test_intro_06_revocation_is_seen_after_cache_max_ttl(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """The trade-off RFC 7662 §4 names: a revoked token works until the cached result expires (max_ttl)."""
    api = await start_api(aiohttp_client, issuer, auth_server, clock,
                          config_changes={"cache": {"max_ttl": 30}})
    token = opaque()
    auth_server.answers[token] = active(clock, exp=int(clock()) + 3600)
    assert (await api.get("/me", token)).status == 200
    auth_server.answers[token] = {"active": False}  # revoked at the AS
    clock.advance(29)
    assert (await api.get("/me", token)).status == 200
    clock.advance(1)
    assert_invalid_token(await api.get("/me", token))
    assert auth_server.calls == 2


# -- INTRO-08: binding and step-up ------------------------------------------------------------------------

async def test_intro_08_dpop_bound_response_needs_the_proof(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """DPOP-18: top-level cnf.jkt makes the token DPoP-bound; as Bearer it is a downgrade (DPOP-20)."""
    api = await start_api(aiohttp_client, issuer, auth_server, clock, ("bearer", "introspection", "dpop"))
    key = DPoPKey()
    token = opaque()
    auth_server.answers[token] = active(clock, cnf={"jkt": key.thumbprint}, token_type="DPoP")
    proof = key.proof("GET", api.origin + "/bound", access_token=token, iat=int(clock()))
    response = await api.get("/bound", token, scheme="DPoP", headers={"DPoP": proof})
    assert response.status == 200
    body = await response.json()
    assert (body["binding"], body["jkt"], body["verifier"]) == ("dpop", key.thumbprint, "introspection")

    downgrade = await api.get("/me", token)
    assert_invalid_token(downgrade)
    assert api.reason == "dpop_bound_token_as_bearer"

    other = DPoPKey()
    stolen = await api.get("/bound", token, scheme="DPoP", headers={
        "DPoP": other.proof("GET", api.origin + "/bound", access_token=token, iat=int(clock()))})
    assert stolen.status == 401 and api.reason == "dpop_key_mismatch"
    no_proof = await api.get("/bound", token, scheme="DPoP")
    assert no_proof.status == 401
    assert auth_server.calls == 1  # the token check was cached; the proofs were checked every time


async def test_intro_08_unbound_introspected_token_is_refused_on_a_dpop_route(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    api = await start_api(aiohttp_client, issuer, auth_server, clock, ("bearer", "introspection", "dpop"))
    token = opaque()
    auth_server.answers[token] = active(clock)
    response = await api.get("/bound", token)
    assert response.status == 401 and 'error="invalid_token"' in bearer_challenge(response)


async def test_vec_9449_5_rfc_request_with_vec_9449_7_introspection_is_allowed(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """The RFC 9449 §7.1 request verbatim: its token introspects to VEC-9449-7, its proof is VEC-9449-5."""
    clock.now = 1562262618
    api = await start_api(aiohttp_client, issuer, auth_server, clock, ("bearer", "introspection", "dpop"),
                          origin="https://resource.example.org",
                          plugin={"issuer": "https://server.example.com", "require_audience": False})
    auth_server.answers[VEC_9449_2] = dict(VEC_9449_7)
    response = await api.get("/protectedresource", VEC_9449_2, scheme="DPoP", headers={"DPoP": VEC_9449_5})
    assert response.status == 200
    assert (await response.json())["subject"] == "someone@example.com"
    clock.advance(120)  # the same proof two minutes later: too old (and a replay)
    late = await api.get("/protectedresource", VEC_9449_2, scheme="DPoP", headers={"DPoP": VEC_9449_5})
    assert late.status == 401
    assert any('error="invalid_dpop_proof"' in c for c in late.headers.getall("WWW-Authenticate"))


@asynccontextmanager
async def serving(app: web.Application, ssl_context: ssl.SSLContext) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def fetch(url: str, token: str, context: ssl.SSLContext) -> tuple[int, str, Any]:
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            challenge = ",".join(response.headers.getall("WWW-Authenticate", []))
            body = await response.json()
            return response.status, challenge, body


async def test_intro_08_certificate_bound_response_with_and_without_the_certificate(
    issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    """MTLS-05: top-level cnf x5t#S256 from introspection binds the token to the client certificate."""
    ca = TestCA()
    alice: ClientCert = ca.client_cert("alice.client.test")
    mallory: ClientCert = ca.client_cert("mallory.client.test")
    app = protected_app()
    ztmw.setup(app, e2e_config(issuer, auth_server, ("bearer", "introspection", "mtls")), clock=clock)
    token = opaque()
    auth_server.answers[token] = active(clock, cnf=alice.cnf)
    async with serving(app, ca.server_ssl_context()) as base:
        status, _, body = await fetch(base + "/cert", token, ca.client_ssl_context(alice))
        assert status == 200, body
        assert (body["binding"], body["x5t"], body["verifier"]) == ("mtls", alice.thumbprint, "introspection")
        for context in (ca.client_ssl_context(), ca.client_ssl_context(mallory)):
            status, challenge, body = await fetch(base + "/me", token, context)
            assert status == 401 and 'error="invalid_token"' in challenge and body["error"] == "invalid_token"
    assert auth_server.calls == 1


async def test_step_07_auth_time_from_introspection_feeds_max_auth_age(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    stale, fresh, unknown = opaque(), opaque(), opaque()
    auth_server.answers[stale] = active(clock, auth_time=clock() - 1000)
    auth_server.answers[fresh] = active(clock, auth_time=clock() - 10)
    auth_server.answers[unknown] = active(clock)
    response = await api.get("/pay", stale)
    assert response.status == 401
    challenge = bearer_challenge(response)
    assert 'error="insufficient_user_authentication"' in challenge and 'max_age="300"' in challenge
    assert (await api.get("/pay", unknown)).status == 401  # STEP-10: no auth_time, no proof of freshness
    assert (await api.get("/pay", fresh)).status == 200


async def test_step_07_acr_from_introspection_feeds_acr_values(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    weak, strong = opaque(), opaque()
    auth_server.answers[weak] = active(clock, acr="urn:example:acr:pwd")
    auth_server.answers[strong] = active(clock, acr=BANKID)
    response = await api.get("/bankid", weak)
    assert response.status == 401
    challenge = bearer_challenge(response)
    assert 'error="insufficient_user_authentication"' in challenge and f'acr_values="{BANKID}"' in challenge
    assert (await api.get("/bankid", strong)).status == 200


# -- INTRO-09: the token is a secret ------------------------------------------------------------------------

async def test_intro_09_token_never_logged_cached_in_clear_or_sent_elsewhere(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: AuthorizationServer, clock: FakeClock
) -> None:
    api = await start_api(aiohttp_client, issuer, auth_server, clock, ("bearer", "introspection", "dpop"),
                          plugin={"timeout": 0.2})
    good, bad, broken, slow, weird = opaque(), opaque(), opaque(), opaque(), opaque()
    auth_server.answers[good] = active(clock, drop=("jti",))
    auth_server.answers[bad] = {"active": False}
    auth_server.answers[broken] = FAILURES["not-json"][0]
    auth_server.answers[slow] = SLOW
    auth_server.answers[weird] = active(clock, sub=7)
    jwt = issuer.mint("alice", scope="items:read")
    for token in (good, bad, broken, slow, weird, jwt, VEC_9449_2):
        await api.get("/me", token)
        await api.get("/me", token, scheme="DPoP")
    assert set(auth_server.received) == {good, bad, broken, slow, weird, VEC_9449_2}  # never the JWT
    logged = json.dumps(api.events, default=str)
    for token in (good, bad, broken, slow, weird, jwt, VEC_9449_2):
        assert token not in logged
    assert CLIENT_SECRET not in logged
    cached = api.pipeline.cache.get(token_key(good))  # the cache key is SHA-256 of the token
    assert cached is not None and good not in repr(cached) and good not in json.dumps(dict(cached.claims))
    assert len(cached.token_id) == 16 and cached.token_id not in good  # no jti: a short hash, not the token


@pytest.mark.parametrize("cnf", [{}, {"x5c": "MIIB"}, {"jwk": {"kty": "EC"}}])
async def test_e2e_intro_08_cnf_without_a_member_ztmw_understands_is_invalid_token(
    api: Api, auth_server: AuthorizationServer, clock: FakeClock, cnf: dict[str, Any]
) -> None:
    token = opaque()
    auth_server.answers[token] = active(clock, cnf=cnf)
    assert_invalid_token(await api.get("/me", token))
    assert api.reason == "unsupported_binding"


# -- RESP-20: an unreachable introspection endpoint is a 503 without a challenge ---------------------------

async def test_resp_20_introspection_endpoint_unreachable_is_503_without_challenge(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: Any, clock: FakeClock
) -> None:
    api = await start_api(aiohttp_client, issuer, auth_server, clock,
                          plugin={"endpoint": f"http://127.0.0.1:{closed_port()}/introspect"})
    token = opaque()
    response = await api.get("/me", token)
    assert_upstream(api, response)
    assert json.loads(await response.text()) == {"error": "temporarily_unavailable"}
    assert token not in json.dumps(api.events, default=str)
    assert token not in str(dict(response.headers))
