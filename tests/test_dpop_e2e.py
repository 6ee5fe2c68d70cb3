"""DPoP end to end (RFC 9449; checklist §0 and §7): `ztmw.setup` on a real aiohttp server, a real client.

The server listens on a fixed free loopback port so that `resource.public_origin` (what `htu` is compared
with, DPOP-10) can be configured before `setup()`; every test checks that the origin really is the one the
client talks to. Proofs are made by `ztmw.testing.DPoPKey`, which shares no code with the verifier. The
FakeClock drives the issuer, the verifier and the proofs' `iat`, so nonce windows move only when a test
says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import DevIssuer, DPoPKey, FakeClock
from ztmw.testing.http import challenges, free_port

from .conftest import (
    DEFAULT_ALGS,
    METADATA_URL,
    NONCE_LIFETIME,
    NONCE_SECRET_ENV,
    base_config,
    dpop_headers,
    items_app,
)


@dataclass
class Api:
    """A protected app on a real server, and what a client needs to talk to it."""

    client: Any
    origin: str
    clock: FakeClock
    last_audit: dict[str, Any] | None = None
    """The audit event of the last request: which check refused it (a test cannot pass for another reason)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Every structlog event of every request so far."""

    def url(self, path: str) -> str:
        return self.origin + path

    def proof(self, key: DPoPKey, method: str, path: str, token: str | None, **kwargs: Any) -> str:
        kwargs.setdefault("iat", int(self.clock()))
        return key.proof(method, self.url(path), access_token=token, **kwargs)

    async def request(self, method: str, path: str, headers: Any = None) -> Any:
        with capture_logs() as events:
            response = await self.client.request(method, path, headers=headers or {})
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

    async def get(self, path: str, headers: Any = None) -> Any:
        return await self.request("GET", path, headers)

    async def dpop_get(self, path: str, token: str, proof: str) -> Any:
        return await self.get(path, {"Authorization": f"DPoP {token}", "DPoP": proof})


async def _whoami(request: web.Request) -> web.Response:
    principal = request[ztmw.PRINCIPAL]
    assert principal is not None
    return web.json_response({"subject": principal.subject, "binding": principal.binding,
                              "jkt": principal.caller.key_thumbprint})


RULES = [
    {"id": "me", "path": "/me", "methods": ["GET"], "scopes": ["items:read"]},
    {"id": "bound", "path": "/bound", "methods": ["GET"], "scopes": ["items:read"], "binding": "dpop"},
]


async def start_api(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, **dpop: Any) -> Api:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]})
    config["resource"]["public_origin"] = origin
    config["rules"] = config["rules"] + RULES
    if dpop:
        config["dpop"] = dpop
    app = items_app()
    app.router.add_get("/me", _whoami)
    app.router.add_get("/bound", _whoami)
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    served = client.make_url("/")
    assert f"{served.scheme}://{served.host}:{served.port}" == origin  # htu is built from what we talk to
    return Api(client, origin, clock)


@pytest.fixture
async def api(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> Api:
    return await start_api(aiohttp_client, issuer, clock)


@pytest.fixture
async def nonce_api(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: Any) -> Api:
    monkeypatch.setenv(NONCE_SECRET_ENV, "e2e-test-secret-of-32-bytes-long")
    return await start_api(aiohttp_client, issuer, clock, require_nonce=True,
                           nonce_secret_env=NONCE_SECRET_ENV, nonce_lifetime=NONCE_LIFETIME)


@pytest.fixture
def key() -> DPoPKey:
    return DPoPKey()


def bound_token(issuer: DevIssuer, key: DPoPKey, scope: str = "items:read") -> str:
    return issuer.mint("alice", scope=scope, cnf={"jkt": key.thumbprint})


def assert_proof_error(api: Api, response: Any, reason: str) -> None:
    """R-PROOF: 401, the DPoP challenge alone carries invalid_dpop_proof (RESP-07, RESP-15), for `reason`."""
    assert api.reason == reason
    assert response.status == 401
    assert challenges(response) == {"DPoP": {
        "algs": DEFAULT_ALGS, "error": "invalid_dpop_proof", "error_description": "Invalid DPoP proof",
        "resource_metadata": METADATA_URL}}
    assert "DPoP-Nonce" not in response.headers


# -- the positive path ------------------------------------------------------------------------------------

async def test_rfc9449_client_with_bound_token_and_proof_reaches_the_handler(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token))
    assert response.status == 200
    assert await response.json() == {"subject": "alice", "binding": "dpop", "jkt": key.thumbprint}
    assert "WWW-Authenticate" not in response.headers
    assert "DPoP-Nonce" not in response.headers  # nonces are off: nothing to hand out (RESP-18 is a MAY)


@pytest.mark.parametrize("kind", ["EdDSA", "PS256"])
async def test_every_advertised_algorithm_works(api: Api, issuer: DevIssuer, kind: Any) -> None:
    key = DPoPKey(kind)
    token = bound_token(issuer, key)
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token))
    assert response.status == 200
    assert (await response.json())["binding"] == "dpop"


# -- bad proofs: R-PROOF ----------------------------------------------------------------------------------

async def test_dpop_22_replayed_proof_is_invalid_dpop_proof(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    proof = api.proof(key, "GET", "/me", token)
    assert (await api.dpop_get("/me", token, proof)).status == 200
    assert_proof_error(api, await api.dpop_get("/me", token, proof), "dpop_replay")
    fresh = api.proof(key, "GET", "/me", token)  # control: the token and key are still good
    assert (await api.dpop_get("/me", token, fresh)).status == 200


async def test_dpop_22_replay_on_another_route_is_still_a_replay(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    jti = "one-jti-for-two-uris"
    assert (await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, jti=jti))).status == 200
    # same key and jti, other htu: the store is keyed by (jkt, jti), so a reused jti never passes twice
    proof = api.proof(key, "GET", "/bound", token, jti=jti)
    assert_proof_error(api, await api.dpop_get("/bound", token, proof), "dpop_replay")


async def test_dpop_09_wrong_htu_is_invalid_dpop_proof(api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    token = bound_token(issuer, key)
    for htu in (api.url("/items"), "https://api.example.com/me", api.origin.replace("127.0.0.1", "localhost")
                + "/me"):
        proof = key.proof("GET", htu, access_token=token, iat=api.clock())
        response = await api.dpop_get("/me", token, proof)
        assert_proof_error(api, response, "dpop_htu_mismatch")


async def test_dpop_09_normalised_htu_is_accepted(api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    token = bound_token(issuer, key)
    htu = api.origin.replace("http://", "HTTP://") + "/./%6De"  # scheme case, dot segment, %6D = "m"
    response = await api.dpop_get("/me", token, key.proof("GET", htu, access_token=token, iat=api.clock()))
    assert response.status == 200


async def test_dpop_09_query_is_not_part_of_htu(api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    token = bound_token(issuer, key)
    response = await api.dpop_get("/me?page=2", token, api.proof(key, "GET", "/me", token))
    assert response.status == 200
    proof = api.proof(key, "GET", "/me?page=2", token)  # DPOP-10: htu is "without query and fragment parts"
    assert_proof_error(api, await api.dpop_get("/me?page=2", token, proof), "dpop_htu_mismatch")


async def test_http_01_dpop_scheme_is_case_insensitive(api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    token = bound_token(issuer, key)
    for scheme in ("dpop", "DPOP"):
        headers = {"Authorization": f"{scheme} {token}", "DPoP": api.proof(key, "GET", "/me", token)}
        response = await api.get("/me", headers)
        assert response.status == 200 and (await response.json())["binding"] == "dpop"


async def test_dpop_08_wrong_htm_is_invalid_dpop_proof(api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    token = bound_token(issuer, key)
    for htm in ("POST", "get"):  # RFC 9110 §9.1: methods are case-sensitive
        assert_proof_error(api, await api.dpop_get("/me", token, api.proof(key, htm, "/me", token)),
                           "dpop_htm_mismatch")


async def test_dpop_17_missing_proof_is_invalid_dpop_proof(api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    token = bound_token(issuer, key)
    assert_proof_error(api, await api.get("/me", {"Authorization": f"DPoP {token}"}), "dpop_proof_missing")


async def test_dpop_01_two_dpop_headers_are_invalid_dpop_proof(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    headers = [("Authorization", f"DPoP {token}"), ("DPoP", api.proof(key, "GET", "/me", token)),
               ("DPoP", api.proof(key, "GET", "/me", token))]
    assert_proof_error(api, await api.get("/me", headers), "dpop_multiple_proofs")


async def test_dpop_02_comma_joined_proofs_are_invalid_dpop_proof(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    joined = api.proof(key, "GET", "/me", token) + ", " + api.proof(key, "GET", "/me", token)
    assert_proof_error(api, await api.dpop_get("/me", token, joined), "dpop_malformed")


async def test_dpop_13_proof_for_another_token_is_invalid_dpop_proof(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    other = bound_token(issuer, key)  # same key, another token: only `ath` tells them apart
    assert other != token
    proof = api.proof(key, "GET", "/me", other)
    assert_proof_error(api, await api.dpop_get("/me", token, proof), "dpop_ath_mismatch")
    assert_proof_error(api, await api.dpop_get("/me", token, api.proof(key, "GET", "/me", None)),
                       "dpop_missing_claim")  # no ath at all


async def test_dpop_12_stale_proof_is_invalid_dpop_proof(api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    token = bound_token(issuer, key)
    proof = api.proof(key, "GET", "/me", token)
    api.clock.advance(61)  # past dpop.max_age (60 s); the token itself is still valid
    assert_proof_error(api, await api.dpop_get("/me", token, proof), "dpop_iat_out_of_window")


# -- token and binding errors -----------------------------------------------------------------------------

async def test_resp_09_proof_signed_by_another_key_is_invalid_token_on_dpop(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    thief = DPoPKey()
    response = await api.dpop_get("/me", token, api.proof(thief, "GET", "/me", token))
    assert response.status == 401 and api.reason == "dpop_key_mismatch"
    parsed = challenges(response)
    assert parsed["DPoP"] == {"algs": DEFAULT_ALGS, "error": "invalid_token",
                              "error_description": "Invalid DPoP key binding",
                              "resource_metadata": METADATA_URL}
    assert "error" not in parsed.get("Bearer", {})  # only the attempted scheme carries the error (RESP-15)


async def test_resp_10_bound_token_presented_as_bearer_is_refused(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    for headers in ({"Authorization": f"Bearer {token}"},
                    {"Authorization": f"Bearer {token}", "DPoP": api.proof(key, "GET", "/me", token)}):
        response = await api.get("/me", headers)
        assert response.status == 401
        assert api.reason == "dpop_bound_token_as_bearer"
        assert api.last_audit is not None
        assert api.last_audit["event"] == "ztmw.security"  # a downgrade attempt
        assert challenges(response) == {
            "Bearer": {"realm": "api", "error": "invalid_token",
                       "error_description": "DPoP-bound token presented as Bearer",
                       "resource_metadata": METADATA_URL},
            "DPoP": {"algs": DEFAULT_ALGS, "resource_metadata": METADATA_URL},
        }


async def test_dpop_21_unbound_token_with_dpop_scheme_is_r_tok_d(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = issuer.mint("alice", scope="items:read")  # no cnf
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token))  # a valid proof
    assert response.status == 401 and api.reason == "unbound_token_as_dpop"
    assert challenges(response) == {
        "Bearer": {"realm": "api", "resource_metadata": METADATA_URL},
        "DPoP": {"algs": DEFAULT_ALGS, "error": "invalid_token",
                 "error_description": "Token is not DPoP-bound",
                 "resource_metadata": METADATA_URL},
    }
    assert (await api.get("/me", {"Authorization": f"Bearer {token}"})).status == 200  # control


async def test_http_05_bearer_and_dpop_authorization_lines_are_400_invalid_request(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"DPoP {token}"),
               ("DPoP", api.proof(key, "GET", "/me", token))]
    response = await api.get("/me", headers)
    assert response.status == 400 and api.reason == "multiple_authorization"
    parsed = challenges(response)
    assert set(parsed) == {"Bearer", "DPoP"}
    # ambiguous: both schemes carry the error (R-REQ, RESP-15)
    assert parsed["Bearer"]["error"] == parsed["DPoP"]["error"] == "invalid_request"
    assert parsed["Bearer"]["realm"] == "api" and parsed["DPoP"]["algs"] == DEFAULT_ALGS


async def test_resp_01_no_credentials_gets_bare_bearer_and_dpop_challenges(api: Api) -> None:
    response = await api.get("/me")
    assert response.status == 401
    assert challenges(response) == {
        "Bearer": {"realm": "api", "resource_metadata": METADATA_URL},
        "DPoP": {"algs": DEFAULT_ALGS, "resource_metadata": METADATA_URL},
    }


async def test_dpop_26_algs_equals_the_metadata_document(api: Api) -> None:
    metadata = await api.get("/.well-known/oauth-protected-resource")
    assert metadata.status == 200
    document = await metadata.json()
    challenge = challenges(await api.get("/me"))["DPoP"]
    assert challenge["algs"] == " ".join(document["dpop_signing_alg_values_supported"]) == DEFAULT_ALGS


async def test_binding_dpop_rule_refuses_an_unbound_bearer_token(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    unbound = issuer.mint("alice", scope="items:read")
    # control: the same token passes where the rule says binding = "any"
    assert (await api.get("/me", {"Authorization": f"Bearer {unbound}"})).status == 200
    response = await api.get("/bound", {"Authorization": f"Bearer {unbound}"})
    assert response.status == 401 and api.reason == "binding_required"
    parsed = challenges(response)
    assert parsed["Bearer"]["error"] == "invalid_token"
    assert parsed["Bearer"]["error_description"] == "Sender-constrained token required"
    assert parsed["DPoP"] == {"algs": DEFAULT_ALGS, "resource_metadata": METADATA_URL}
    token = bound_token(issuer, key)
    response = await api.dpop_get("/bound", token, api.proof(key, "GET", "/bound", token))
    assert response.status == 200 and (await response.json())["binding"] == "dpop"


async def test_resp_15_missing_scope_of_a_dpop_token_is_said_on_the_dpop_scheme(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key, scope="other")
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token))
    assert response.status == 403 and api.reason == "insufficient_scope"
    assert challenges(response) == {"DPoP": {
        "algs": DEFAULT_ALGS, "error": "insufficient_scope", "error_description": "Insufficient scope",
        "scope": "items:read"}}


# -- server nonces (RFC 9449 §9) ----------------------------------------------------------------------------

def nonce_of(response: Any) -> str:
    """R-NONCE: 401 use_dpop_nonce on DPoP only, exactly one DPoP-Nonce, Cache-Control: no-store."""
    assert response.status == 401
    assert challenges(response) == {"DPoP": {
        "algs": DEFAULT_ALGS, "error": "use_dpop_nonce",
        "error_description": "Resource server requires nonce in DPoP proof",
        "resource_metadata": METADATA_URL}}
    nonces = response.headers.getall("DPoP-Nonce", [])
    assert len(nonces) == 1
    assert re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e]+", nonces[0])  # 1*NQCHAR (DPOP-24)
    assert response.headers.getall("Cache-Control") == ["no-store"]
    return str(nonces[0])


async def test_dpop_11_nonce_round_trip(nonce_api: Api, issuer: DevIssuer, key: DPoPKey) -> None:
    api = nonce_api
    token = bound_token(issuer, key)
    nonce = nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token)))
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=nonce))
    assert response.status == 200
    assert (await response.json())["binding"] == "dpop"
    assert "DPoP-Nonce" not in response.headers  # the nonce is current: nothing new to hand out
    # DPOP-25: the nonce may be reused while it is current, with a new jti each time
    again = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=nonce))
    assert again.status == 200


async def test_dpop_11_forged_or_foreign_nonce_gets_use_dpop_nonce(
    nonce_api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    api = nonce_api
    token = bound_token(issuer, key)
    real = nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token)))
    forged = real[:-2] + ("AA" if real[-2:] != "AA" else "BB")
    for nonce in (forged, "eyJ7S_zG.eyJH0-Z.HX4w-7v"):  # a tampered MAC; the RFC's example (another server)
        nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=nonce)))


async def test_dpop_11_nonce_from_an_old_window_gets_use_dpop_nonce(
    nonce_api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    api = nonce_api
    token = bound_token(issuer, key)
    old = nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token)))
    api.clock.advance(2 * NONCE_LIFETIME)  # two windows later: neither current nor previous
    fresh = nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=old)))
    assert fresh != old
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=fresh))
    assert response.status == 200


async def test_resp_18_next_nonce_on_a_2xx_is_no_store(
    nonce_api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    api = nonce_api
    token = bound_token(issuer, key)
    first = nonce_of(await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token)))
    api.clock.advance(NONCE_LIFETIME)  # one window later: still accepted, and the server hands out the next
    response = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=first))
    assert response.status == 200
    nonces = response.headers.getall("DPoP-Nonce", [])
    assert len(nonces) == 1 and nonces[0] != first
    assert response.headers.getall("Cache-Control") == ["no-store"]  # RESP-17
    follow_up = await api.dpop_get("/me", token, api.proof(key, "GET", "/me", token, nonce=nonces[0]))
    assert follow_up.status == 200 and "DPoP-Nonce" not in follow_up.headers


async def test_nonce_required_still_checks_the_proof_before_the_nonce(
    nonce_api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    api = nonce_api
    token = bound_token(issuer, key)
    # a proof for another method: the nonce would not help, so the client is not asked for one
    proof = api.proof(key, "POST", "/me", token)
    assert_proof_error(api, await api.dpop_get("/me", token, proof), "dpop_htm_mismatch")


# -- audit ------------------------------------------------------------------------------------------------

async def test_replay_is_a_security_event_without_token_or_proof_text(
    api: Api, issuer: DevIssuer, key: DPoPKey
) -> None:
    token = bound_token(issuer, key)
    proof = api.proof(key, "GET", "/me", token)
    assert (await api.dpop_get("/me", token, proof)).status == 200
    assert_proof_error(api, await api.dpop_get("/me", token, proof), "dpop_replay")
    audit = [e for e in api.events if e["event"] in ("ztmw.decision", "ztmw.security")]
    assert [(e["event"], e["decision"], e["status"]) for e in audit] == [
        ("ztmw.decision", "allow", 200), ("ztmw.security", "deny", 401)]
    allowed, replay = audit
    assert allowed["binding"] == "dpop" and allowed["reason"] == "allowed"
    assert replay["reason"] == "dpop_replay" and replay["log_level"] == "warning"
    assert replay["route"] == "/me" and replay["rule_id"] == "me"
    secrets = [token, proof, *token.split("."), *proof.split(".")]
    for event in api.events:
        text = repr(event)
        for secret in secrets:
            assert secret not in text


# -- MTLS-15: an unknown cnf member beside a satisfied jkt fails closed ------------------------------------

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


# -- IMPL-01..IMPL-03: every field line read, htu from the configured origin, htm from the method ---------

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


# -- VEC-9449-3 / -4 / -8 / -9 ------------------------------------------------------------------------------

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
