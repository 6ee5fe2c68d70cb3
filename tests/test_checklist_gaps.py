"""Named tests for the checklist items that had none (review of checklist coverage, spec-checklist.md).

Every MUST and POLICY item of the checklist needs a test whose name carries its id. This module holds the ones
that were missing or only mentioned in a comment: RESP-19, RESP-20, HTTP-06 (form body), HTTP-09, MTLS-15
(both members, DPoP and mTLS together), SEC-06, the IMPL-* notes, and the vectors VEC-9449-3/4/8/9.

Everything runs end to end as the rest of the suite does: `ztmw.setup` on a real aiohttp server, a real client,
the `DevIssuer` and its JWKS server, `DPoPKey` proofs, trustme certificates through `TestCA`, and the key and
introspection servers of test_faults / test_introspection. Helpers and fixtures are imported from the modules
that own them. A test marked xfail(strict) pins a place where ztmw does not do what the checklist says.
"""

from __future__ import annotations

import ast
import base64
import hmac
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import ClientCert, DevIssuer, DPoPKey, FakeClock, TestCA, challenges
from ztmw.testing.http import free_port

from .conftest import AUDIENCE, base_config, items_app
from .plugins.test_introspection import assert_upstream, auth_server, closed_port, opaque, secret_env
from .plugins.test_introspection import start_api as start_introspection_api
from .test_dpop_e2e import (
    DEFAULT_ALGS,
    METADATA_URL,
    NONCE_LIFETIME,
    NONCE_SECRET_ENV,
    Api,
    assert_proof_error,
    bound_token,
    nonce_of,
    start_api,
)
from .test_faults import KeyServer, assert_unavailable, bearer, keys, protected_client
from .test_mtls_e2e import MTLS_RULES, alice_cert, fetch, mallory_cert, mtls_app

# fixtures used here by name, owned by the modules they come from
__all__ = ["alice_cert", "auth_server", "keys", "mallory_cert", "secret_env"]

ROOT = Path(__file__).resolve().parent.parent
BEARER_ONLY = {"Bearer": {"realm": "api", "resource_metadata": METADATA_URL}}
RFC_NONCES = ("eyJ7S_zG.eyJH0-Z.HX4w-7v", "eyJ7S_zG.eyJbYu3.xQmBj-1")  # VEC-9449-9
NQCHAR = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
VEC_9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
VEC_9449_3 = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpD"
    "a0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6"
    "IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUu"
    "Y29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FN"
    "yJK70nfbV37xRZT3Lg"
)
VEC_9449_4 = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpD"
    "a0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6"
    "IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUu"
    "Y29tL3Rva2VuIiwiaWF0IjoxNTYyMjY1Mjk2fQ.pAqut2IRDm_De6PR93SYmGBPXpwrAk90e8cP2hjiaG5QsGSuKDYW7_X620BxqhvYC8yn"
    "rrvZLTk41mSRroapUA"
)


# -- small local helpers (nothing like them exists elsewhere in the suite) ------------------------------------

def reasons(events: list[Any]) -> list[str]:
    """The audit reasons of the requests made while `events` was captured."""
    return [str(e["reason"]) for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]


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


def raw_token(issuer: DevIssuer, payload: bytes) -> str:
    """A token signed by the issuer's real key over exactly these claim bytes (for JSON no AS would send)."""
    header = json.dumps({"alg": issuer.algorithm, "kid": issuer.kid, "typ": "at+jwt"}).encode()
    return issuer.sign(header, payload)


def claims_json(issuer: DevIssuer, clock: FakeClock, **raw: str) -> bytes:
    """The claims of a good token as JSON text, with members replaced by raw JSON text (`exp="1e400"`)."""
    now = int(clock())
    members = {"iss": json.dumps(issuer.issuer), "sub": '"alice"', "aud": json.dumps(AUDIENCE),
               "exp": str(now + 300), "iat": str(now), "nbf": str(now), "jti": '"gap-jti"',
               "client_id": '"demo-client"', "scope": '"items:read"'}
    members.update(raw)
    return ("{" + ",".join(f'"{name}":{value}' for name, value in members.items()) + "}").encode("utf-8")


async def bound_tls_server(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA,
                           monkeypatch: pytest.MonkeyPatch, **dpop: Any) -> str:
    """bearer + dpop + mtls behind a TLS listener that asks for a client certificate; returns its origin."""
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop", "mtls"]})
    config["resource"]["public_origin"] = origin
    config["rules"] = config["rules"] + MTLS_RULES
    if dpop.get("require_nonce"):
        monkeypatch.setenv(NONCE_SECRET_ENV, "gap-test-secret-of-32-bytes-long!")
        dpop.update(nonce_secret_env=NONCE_SECRET_ENV, nonce_lifetime=NONCE_LIFETIME)
    if dpop:
        config["dpop"] = dpop
    app = mtls_app()
    ztmw.setup(app, config, clock=clock)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server(ssl=ca.server_ssl_context())
    await aiohttp_client(server)  # the fixture owns the server from here on (and closes it)
    return origin


def dpop_headers(token: str, proof: str) -> dict[str, str]:
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


@pytest.fixture
async def api(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> Api:
    """The DPoP end-to-end API of test_dpop_e2e (bearer + dpop on a known loopback origin)."""
    return await start_api(aiohttp_client, issuer, clock)


# -- RESP-19: CORS exposure of the challenge headers -----------------------------------------------------------

def exposed(response: Any) -> set[str]:
    return {v.strip().lower() for line in response.headers.getall("Access-Control-Expose-Headers", [])
            for v in line.split(",")}


async def test_resp_19_cors_expose_headers_is_configurable(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    app = items_app()
    ztmw.setup(app, base_config(issuer, cors={"expose_headers": True}), clock=clock)
    client = await aiohttp_client(app)
    response = await client.get("/items", headers={"Origin": "https://spa.example.com"})
    assert response.status == 401
    assert {"www-authenticate", "dpop-nonce"} <= exposed(response)
    token = issuer.mint(scope="items:read")
    for _ in range(3):  # allowed answers too, also when the decision memo replays them
        allowed = await client.get("/items", headers={"Authorization": f"Bearer {token}"})
        assert allowed.status == 200 and exposed(allowed) == {"www-authenticate", "dpop-nonce"}


async def test_resp_19_off_by_default_and_merged_with_the_app_s_own_exposed_headers(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    async def listed(request: web.Request) -> web.Response:
        return web.json_response([], headers={"Access-Control-Expose-Headers": "X-Total-Count, dpop-nonce"})

    plain = items_app()
    ztmw.setup(plain, base_config(issuer), clock=clock)
    assert exposed(await (await aiohttp_client(plain)).get("/items")) == set()
    app = items_app()
    app.router.add_get("/listed", listed)
    config = base_config(issuer, cors={"expose_headers": True})
    config["rules"] = config["rules"] + [{"id": "listed", "path": "/listed", "methods": ["GET"], "public": True}]
    ztmw.setup(app, config, clock=clock)
    response = await (await aiohttp_client(app)).get("/listed")
    assert exposed(response) == {"x-total-count", "dpop-nonce", "www-authenticate"}
    assert response.headers.getall("Access-Control-Expose-Headers") == ["X-Total-Count, dpop-nonce", "WWW-Authenticate"]


# -- RESP-20: upstream failures are 503 without a challenge, and the token is never echoed or logged --------

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


async def test_resp_20_introspection_endpoint_unreachable_is_503_without_challenge(
    aiohttp_client: Any, issuer: DevIssuer, auth_server: Any, clock: FakeClock
) -> None:
    api = await start_introspection_api(aiohttp_client, issuer, auth_server, clock,
                                        plugin={"endpoint": f"http://127.0.0.1:{closed_port()}/introspect"})
    token = opaque()
    response = await api.get("/me", token)
    assert_upstream(api, response)
    assert json.loads(await response.text()) == {"error": "temporarily_unavailable"}
    assert token not in json.dumps(api.events, default=str)
    assert token not in str(dict(response.headers))


# -- HTTP-06 / HTTP-09: the form-body transport -------------------------------------------------------------

async def post_form_token(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, headers: dict[str, str],
                          token: str | None = None) -> tuple[Any, str, Any, list[str]]:
    """POST /items with `access_token=<token>` as an urlencoded form: client, token, response, handler calls."""
    calls: list[str] = []
    client = await bearer_client(aiohttp_client, issuer, clock, calls)
    token = token or issuer.mint(scope="items:read")
    response = await client.post("/items", data={"access_token": token}, headers=headers)
    return client, token, response, calls


async def test_http_09_form_body_token_is_not_a_transport(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """Off by default (and ztmw has no switch for it): a body `access_token` is no credential -> R-NONE."""
    with capture_logs() as events:
        client, token, response, calls = await post_form_token(aiohttp_client, issuer, clock, {})
        body = await response.text()
    assert response.status == 401
    assert challenges(response) == BEARER_ONLY  # R-NONE: no error, no error_description
    assert calls == []
    assert token not in body and token not in json.dumps(events, default=str)
    # and a GET with a form body is no credential either
    response = await client.request("GET", "/items", data={"access_token": token})
    assert response.status == 401 and challenges(response) == BEARER_ONLY


async def test_http_06_header_and_form_body_token_is_invalid_request(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    token = issuer.mint(scope="items:read")
    _, _, response, calls = await post_form_token(aiohttp_client, issuer, clock,
                                                  {"Authorization": f"Bearer {token}"}, token)
    assert response.status == 400
    assert challenges(response)["Bearer"]["error"] == "invalid_request"
    assert calls == []


async def test_http_06_a_remembered_decision_never_skips_the_body_check(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """The decision memo keeps no form request: the same token allowed twice before still meets the check."""
    calls: list[str] = []
    client = await bearer_client(aiohttp_client, issuer, clock, calls)
    token = issuer.mint(scope="items:read")
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert (await client.post("/items", data={"note": "x"}, headers=auth)).status == 200
    response = await client.post("/items", data={"access_token": token}, headers=auth)
    assert response.status == 400 and challenges(response)["Bearer"]["error"] == "invalid_request"
    encoded = await client.post("/items", data=b"access%5Ftoken=x", headers={
        **auth, "Content-Type": "application/x-www-form-urlencoded"})  # the name as a form decoder reads it
    assert encoded.status == 400
    assert calls == ["POST"] * 3


async def test_http_06_a_form_too_large_for_the_app_gets_aiohttp_s_own_413(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """Reading the body to look for a token must not hand the handler half a body: too large is a 413."""
    calls: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        calls.append(str(len(await request.post())))
        return web.json_response({})

    client = await post_route_client(aiohttp_client, issuer, clock, "/items", ok,
                                     app=web.Application(client_max_size=1024))
    auth = {"Authorization": f"Bearer {issuer.mint(scope='items:read')}"}
    with capture_logs() as events:
        assert (await client.post("/items", data={"note": "x" * 4000}, headers=auth)).status == 413
    assert [(e["decision"], e["reason"], e["status"]) for e in events if e.get("event") == "ztmw.decision"] \
        == [("deny", "unreadable_body", 413)]
    assert (await client.post("/items", data={"note": "x"}, headers=auth)).status == 200
    assert calls == ["1"]


async def test_http_06_ztmw_reads_no_large_form_body_for_a_request_it_may_deny(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """Over 64 KiB the body is the handler's business only: an unauthenticated client cannot make ztmw buffer
    it (the header alone decides, and a body token is never taken anyway)."""
    calls: list[str] = []
    client = await bearer_client(aiohttp_client, issuer, clock, calls)
    padded = {"access_token": "x", "pad": "y" * (64 * 1024)}
    refused = await client.post("/items", data=padded, headers={"Authorization": "Bearer not.a.token"})
    assert refused.status == 401 and challenges(refused)["Bearer"]["error"] == "invalid_token"
    allowed = await client.post("/items", data=padded,
                                headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"})
    assert allowed.status == 200 and calls == ["POST"]


async def test_http_06_only_a_form_body_is_a_transport_and_the_handler_still_reads_it(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    async def echo(request: web.Request) -> web.Response:
        form = await request.post()  # ztmw read it first: aiohttp hands the same form again
        return web.json_response({"note": form.get("note")})

    client = await post_route_client(aiohttp_client, issuer, clock, "/echo", echo)
    auth = {"Authorization": f"Bearer {issuer.mint(scope='items:read')}"}
    response = await client.post("/echo", data={"note": "kept"}, headers=auth)
    assert response.status == 200 and await response.json() == {"note": "kept"}
    as_json = await client.post("/echo", json={"access_token": "x"}, headers=auth)  # JSON is no transport
    assert as_json.status == 200


# -- MTLS-15: a cnf with jkt and x5t#S256 must satisfy both; unknown members fail closed ---------------------

async def test_mtls_15_jkt_and_x5t_bound_token_needs_the_proof_and_the_certificate(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA, alice_cert: ClientCert,
    mallory_cert: ClientCert, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = await bound_tls_server(aiohttp_client, issuer, clock, ca, monkeypatch)
    key, thief = DPoPKey(), DPoPKey()
    token = issuer.mint("alice", scope="items:read", cnf={"jkt": key.thumbprint, **alice_cert.cnf})
    url = origin + "/whoami"

    def proof(signer: DPoPKey = key) -> str:
        return signer.proof("GET", url, access_token=token, iat=int(clock()))

    # both satisfied: allowed
    allowed = await fetch(url, headers=dpop_headers(token, proof()), ssl_context=ca.client_ssl_context(alice_cert))
    assert allowed.status == 200, allowed.body
    assert allowed.json()["certificate_thumbprint"] == alice_cert.thumbprint

    # the proof is right, the certificate is not (another one, or none): invalid_token on the DPoP scheme
    for context, reason in ((ca.client_ssl_context(mallory_cert), "certificate_mismatch"),
                            (ca.client_ssl_context(), "certificate_missing")):
        with capture_logs() as events:
            reply = await fetch(url, headers=dpop_headers(token, proof()), ssl_context=context)
        assert reply.status == 401, reply.body
        parsed = challenges(reply)
        assert parsed["DPoP"]["error"] == "invalid_token"
        assert "error" not in parsed["Bearer"]
        assert reasons(events) == [reason]

    # the certificate is right, the proof key is not: RESP-09 key binding failure
    reply = await fetch(url, headers=dpop_headers(token, proof(thief)), ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401
    assert challenges(reply)["DPoP"] == {"algs": DEFAULT_ALGS, "error": "invalid_token",
                                         "error_description": "Invalid DPoP key binding",
                                         "resource_metadata": METADATA_URL}

    # the certificate is right, no proof at all (Bearer scheme): the DPoP downgrade is refused (RESP-10)
    reply = await fetch(url, token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401
    parsed = challenges(reply)
    assert parsed["Bearer"]["error"] == "invalid_token"
    assert "error" not in parsed["DPoP"]


async def test_mtls_15_unknown_cnf_member_beside_a_satisfied_jkt_is_invalid_token(
    api: Api, issuer: DevIssuer
) -> None:
    key = DPoPKey()
    for extra in ({"x5t": "abc"}, {"JKT": key.thumbprint}, {"kid": "k1"}):
        token = issuer.mint("alice", scope="items:read", cnf={"jkt": key.thumbprint, **extra})
        response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token))
        assert response.status == 401, extra
        parsed = challenges(response)
        assert parsed["DPoP"]["error"] == "invalid_token"
        assert "error" not in parsed["Bearer"]
        assert api.reason == "unsupported_binding"


# -- SEC-06: ath, jkt, x5t#S256 and the nonce MAC are compared in constant time ------------------------------

async def test_sec_06_binding_values_and_nonce_mac_are_compared_with_compare_digest(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA, alice_cert: ClientCert,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = await bound_tls_server(aiohttp_client, issuer, clock, ca, monkeypatch, require_nonce=True)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append((a.encode() if isinstance(a, str) else bytes(a), b.encode() if isinstance(b, str) else bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    key = DPoPKey()
    token = issuer.mint("alice", scope="items:read", cnf={"jkt": key.thumbprint, **alice_cert.cnf})
    url = origin + "/whoami"
    context = ca.client_ssl_context(alice_cert)
    first = await fetch(url, headers=dpop_headers(token, key.proof("GET", url, access_token=token, iat=int(clock()))),
                        ssl_context=context)
    nonce = first.headers["DPoP-Nonce"]
    compared.clear()
    proof = key.proof("GET", url, access_token=token, iat=int(clock()), nonce=nonce)
    reply = await fetch(url, headers=dpop_headers(token, proof), ssl_context=context)
    assert reply.status == 200, reply.body
    ath = json.loads(_b64(proof.split(".")[1]))["ath"].encode()
    values = {value for pair in compared for value in pair}
    assert ath in values, "ath"
    assert key.thumbprint.encode() in values, "jkt"
    assert alice_cert.thumbprint.encode() in values, "x5t#S256"
    known = {ath, key.thumbprint.encode(), alice_cert.thumbprint.encode()}
    assert any(len(a) == len(b) == 32 and a not in known for a, b in compared), "the nonce MAC"


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# -- IMPL-01..IMPL-11: the Python / aiohttp implementation notes ---------------------------------------------

async def test_impl_01_every_authorization_and_dpop_field_line_is_read(
    api: Api, issuer: DevIssuer
) -> None:
    """`headers.get` would see only the first line; a second Authorization or DPoP line must be noticed."""
    key = DPoPKey()
    good = issuer.mint(scope="items:read")
    response = await api.get("/me", [("Authorization", f"Bearer {good}"), ("Authorization", "Bearer x.y.z")])
    assert response.status == 400
    assert challenges(response)["Bearer"]["error"] == "invalid_request"
    token = bound_token(issuer, key)
    proof = api.proof(key, "GET", "/me", token)
    response = await api.get("/me", [("Authorization", f"DPoP {token}"), ("DPoP", proof), ("DPoP", proof)])
    assert_proof_error(api, response, "dpop_multiple_proofs")  # even two copies of one good proof


async def test_impl_02_htu_is_the_configured_origin_and_raw_path_never_the_host_header(
    api: Api, issuer: DevIssuer
) -> None:
    key = DPoPKey()
    token = bound_token(issuer, key)
    spoofed = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    # a proof for the origin the client really talks to is good whatever Host and X-Forwarded-* say
    proof = api.proof(key, "GET", "/me", token)
    response = await api.get("/me", {**dpop_headers(token, proof), **spoofed})
    assert response.status == 200
    # a proof for the origin the Host header names is refused
    for htu in ("http://evil.example/me", "https://evil.example/me"):
        forged = key.proof("GET", htu, access_token=token, iat=int(api.clock()))
        response = await api.get("/me", {**dpop_headers(token, forged), **spoofed})
        assert response.status == 401
        assert_proof_error(api, response, api.reason)
    # the query is not part of htu: the same proof target with a query string is accepted
    response = await api.get("/me?page=2", dpop_headers(token, api.proof(key, "GET", "/me", token)))
    assert response.status == 200


async def test_impl_03_htm_is_the_request_method_never_an_override_header(api: Api, issuer: DevIssuer) -> None:
    key = DPoPKey()
    token = bound_token(issuer, key)
    post_proof = api.proof(key, "POST", "/me", token)
    overrides = {"X-HTTP-Method-Override": "POST", "X-HTTP-Method": "POST", "X-Method-Override": "POST"}
    response = await api.get("/me", {**dpop_headers(token, post_proof), **overrides})
    assert response.status == 401
    assert_proof_error(api, response, "dpop_htm_mismatch")


async def test_impl_04_client_certificate_is_the_tls_layers_peer_certificate(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA, alice_cert: ClientCert,
    mallory_cert: ClientCert, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DER of the handshake's certificate is what binds; a Client-Cert header naming another one is noise."""
    origin = await bound_tls_server(aiohttp_client, issuer, clock, ca, monkeypatch)
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    reply = await fetch(origin + "/bound", token=token, ssl_context=ca.client_ssl_context(alice_cert),
                        headers={"Client-Cert": mallory_cert.rfc9440_header()})
    assert reply.status == 200, reply.body
    assert reply.json()["certificate"]["thumbprint"] == alice_cert.thumbprint


async def test_impl_06_booleans_are_not_numeric_dates_and_aud_iss_are_not_substrings(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    cases = [
        {"exp": "true"}, {"iat": "true"}, {"nbf": "false"},
        {"aud": json.dumps(AUDIENCE + ".evil.test")}, {"aud": json.dumps("x" + AUDIENCE)},
        {"aud": json.dumps(AUDIENCE[:-1])}, {"aud": json.dumps([AUDIENCE + "/x"])},
        {"iss": json.dumps(issuer.issuer + "x")}, {"iss": json.dumps(issuer.issuer[:-1])},
    ]
    good = raw_token(issuer, claims_json(issuer, clock))
    assert (await bearer(client, good))[0] == 200
    for case in cases:
        status, headers, _ = await bearer(client, raw_token(issuer, claims_json(issuer, clock, **case)))
        assert status == 401, case
        assert challenges_of(headers)["Bearer"]["error"] == "invalid_token", case


def challenges_of(headers: Any) -> dict[str, dict[str, str]]:
    """`challenges` for the (status, headers, body) results of test_faults' `bearer`."""
    return challenges(SimpleNamespace(headers=headers))


@pytest.mark.parametrize("case", [
    {"exp": "1e400"},  # json turns this into inf: `now >= exp` would never hold
    {"nbf": "-1e400"},
    {"iat": "-1e400"},
    {"exp": "1e400", "nbf": "-1e400", "iat": "-1e400"},
])
async def test_impl_07_non_finite_numeric_dates_are_invalid_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, case: dict[str, str]
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    status, headers, _ = await bearer(client, raw_token(issuer, claims_json(issuer, clock, **case)))
    assert status == 401
    assert challenges_of(headers)["Bearer"]["error"] == "invalid_token"


async def test_impl_08_base64url_alphabet_is_checked_before_decoding(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """`urlsafe_b64decode` drops characters outside the alphabet and takes `+` `/` `=`: none may get through."""
    client = await bearer_client(aiohttp_client, issuer, clock)
    token = issuer.mint(scope="items:read")
    header, payload, signature = token.split(".")
    spellings = [
        f"{header}.{payload}.{signature[:10]}!{signature[10:]}",  # a dropped character, same bytes
        f"{header}.{payload}.{signature[:10]}*{signature[10:]}",
        f"{header}.{payload.replace('-', '+').replace('_', '/')}.{signature}x",
        f"{header}.{payload}=.{signature}",
        f"{header}.{payload}.{signature.replace('-', '+').replace('_', '/')}",
    ]
    swapped = signature.replace("-", "+").replace("_", "/")
    assert swapped != signature or "-" not in signature  # the last spelling differs when it can
    for spelling in spellings:
        if spelling == token:
            continue
        status, headers, _ = await bearer(client, spelling)
        assert status in (400, 401), spelling
        error = challenges_of(headers)["Bearer"]["error"]
        assert error == ("invalid_request" if status == 400 else "invalid_token"), spelling


@pytest.mark.parametrize("payload", [
    "BOM",
    "SURROGATE",
    "LATIN1",
])
async def test_impl_09_claims_are_strict_utf8_without_bom_or_lone_surrogates(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, payload: str
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    good = claims_json(issuer, clock)
    raw = {
        "BOM": b"\xef\xbb\xbf" + good,
        "SURROGATE": claims_json(issuer, clock, sub='"\\ud800"'),
        "LATIN1": claims_json(issuer, clock, sub='"al\xefce"').decode("utf-8").encode("latin-1"),
    }[payload]
    status, headers, _ = await bearer(client, raw_token(issuer, raw))
    assert status == 401
    assert challenges_of(headers)["Bearer"]["error"] == "invalid_token"


@pytest.mark.parametrize("case", [
    {"exp": "1e300"},
    {"exp": "9007199254740993"},
    {"exp": str(10 ** 30)},
    {"iat": "1e300"},
    {"nbf": "-1e300"},
    {"auth_time": "1e300"},
    {"auth_time": "-1e300"},
])
async def test_impl_10_huge_numeric_dates_are_invalid_token_never_500(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, case: dict[str, str]
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    status, headers, body = await bearer(client, raw_token(issuer, claims_json(issuer, clock, **case)))
    assert status == 401, body
    assert challenges_of(headers)["Bearer"]["error"] == "invalid_token"


def test_impl_11_no_jwt_library_with_known_bypasses_is_used() -> None:
    """ztmw verifies JWS with `cryptography` itself; PyJWT, python-jose and Authlib are never imported, and
    joserfc (JWK import only) is not asked to treat key material as an HMAC secret."""
    banned = {"jwt", "jose", "authlib", "python_jose"}
    for folder in (ROOT / "ztmw", ROOT / "plugins" / "ztmw_plugins"):
        for source in folder.rglob("*.py"):
            tree = ast.parse(source.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    assert name.split(".")[0] not in banned, f"{source.relative_to(ROOT)} imports {name}"
                    if name.startswith("joserfc"):
                        assert "OctKey" not in ast.unparse(node), f"{source.relative_to(ROOT)} imports OctKey"


# -- VEC-9449-3 / -4 / -8 / -9 ------------------------------------------------------------------------------

@pytest.mark.parametrize("proof", [VEC_9449_3, VEC_9449_4], ids=["vec_9449_3", "vec_9449_4"])
async def test_vec_9449_3_and_vec_9449_4_token_endpoint_proofs_are_refused_at_the_resource(
    api: Api, issuer: DevIssuer, proof: str
) -> None:
    """The AS-side proofs (POST https://server.example.com/token, no ath, 2019) are not resource proofs."""
    token = issuer.mint("alice", scope="items:read", cnf={"jkt": VEC_9449_JKT})
    response = await api.dpop_get("/me", token, proof)
    assert response.status == 401
    assert_proof_error(api, response, "dpop_missing_claim")  # no ath: the first of several failed checks


async def test_vec_9449_8_challenges_as_printed(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, api: Api
) -> None:
    key, other = DPoPKey(), DPoPKey()
    token = bound_token(issuer, key)
    # no credentials: "DPoP algs=..." beside a bare Bearer challenge (ours always has realm, RESP-02)
    response = await api.get("/me")
    assert response.status == 401
    assert challenges(response) == {"Bearer": {"realm": "api", "resource_metadata": METADATA_URL},
                                    "DPoP": {"algs": DEFAULT_ALGS, "resource_metadata": METADATA_URL}}
    # key binding: DPoP error="invalid_token", error_description="Invalid DPoP key binding"
    response = await api.dpop_get("/me", token, api.proof(other, "GET", "/me", token))
    assert response.status == 401
    assert challenges(response)["DPoP"] == {"algs": DEFAULT_ALGS, "error": "invalid_token",
                                            "error_description": "Invalid DPoP key binding",
                                            "resource_metadata": METADATA_URL}
    # an invalid Bearer token: Bearer error="invalid_token", error_description="Invalid token", bare DPoP
    response = await api.get("/me", {"Authorization": "Bearer " + issuer.mint(scope="items:read", audience="x")})
    parsed = challenges(response)
    assert response.status == 401 and parsed["Bearer"]["error"] == "invalid_token"
    assert parsed["DPoP"] == {"algs": DEFAULT_ALGS, "resource_metadata": METADATA_URL}
    # Bearer and DPoP lines with the same token: 400, invalid_request on both schemes
    response = await api.get("/me", [("Authorization", f"Bearer {token}"), ("Authorization", f"DPoP {token}"),
                                     ("DPoP", api.proof(key, "GET", "/me", token))])
    assert response.status == 400
    parsed = challenges(response)
    assert parsed["Bearer"]["error"] == parsed["DPoP"]["error"] == "invalid_request"
    # nonce required: DPoP error="use_dpop_nonce" and one DPoP-Nonce (nonce_of checks the whole R-NONCE shape)
    monkeypatch.setenv(NONCE_SECRET_ENV, "gap-test-secret-of-32-bytes-long!")
    nonce_api = await start_api(aiohttp_client, issuer, clock, require_nonce=True,
                                nonce_secret_env=NONCE_SECRET_ENV, nonce_lifetime=NONCE_LIFETIME)
    nonce_of(await nonce_api.dpop_get("/me", token, nonce_api.proof(key, "GET", "/me", token)))


async def test_vec_9449_9_nonces_are_nqchar_and_the_next_one_comes_on_a_2xx_with_no_store(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for value in RFC_NONCES:
        assert NQCHAR.fullmatch(value)
    monkeypatch.setenv(NONCE_SECRET_ENV, "gap-test-secret-of-32-bytes-long!")
    api = await start_api(aiohttp_client, issuer, clock, require_nonce=True,
                          nonce_secret_env=NONCE_SECRET_ENV, nonce_lifetime=NONCE_LIFETIME)
    key = DPoPKey()
    token = bound_token(issuer, key)
    first = nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token)))
    api.clock.advance(NONCE_LIFETIME)  # the nonce is now from the previous window: still good, a new one is due
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=first))
    assert response.status == 200
    nonces = response.headers.getall("DPoP-Nonce", [])
    assert len(nonces) == 1 and nonces[0] != first and NQCHAR.fullmatch(nonces[0])
    assert response.headers.getall("Cache-Control") == ["no-store"]
    # the RFC's own sample nonces come from another server: refused with a fresh nonce of ours
    for value in RFC_NONCES:
        assert nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=value)))


# -- SEC-01 / SEC-02 (SHOULD): sender-constrained and audience-restricted tokens ----------------------------

async def test_sec_01_a_binding_rule_refuses_a_bearer_token_and_takes_a_dpop_bound_one(
    api: Api, issuer: DevIssuer
) -> None:
    key = DPoPKey()
    response = await api.get("/bound", {"Authorization": "Bearer " + issuer.mint("alice", scope="items:read")})
    assert response.status == 401 and api.reason == "binding_required"
    assert challenges(response)["Bearer"]["error"] == "invalid_token"
    token = bound_token(issuer, key)
    response = await api.dpop_get("/bound", token, api.proof(key, "GET", "/bound", token))
    assert response.status == 200 and (await response.json())["binding"] == "dpop"


async def test_sec_02_a_token_for_another_audience_is_refused_on_either_scheme(api: Api, issuer: DevIssuer) -> None:
    key = DPoPKey()
    foreign = issuer.mint("alice", scope="items:read", audience="https://other-api.example.com")
    response = await api.get("/me", {"Authorization": f"Bearer {foreign}"})
    assert response.status == 401 and challenges(response)["Bearer"]["error"] == "invalid_token"
    bound = issuer.mint("alice", scope="items:read", audience=["https://other-api.example.com"],
                        cnf={"jkt": key.thumbprint})
    response = await api.dpop_get("/me", bound, api.proof(key, "GET", "/me", bound))
    assert response.status == 401 and challenges(response)["DPoP"]["error"] == "invalid_token"
