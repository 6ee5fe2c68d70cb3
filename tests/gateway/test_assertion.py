"""The identity assertion round trip: the gateway signs, an upstream written with ztmw verifies it by listing
the gateway as an issuer (profile "ztmw-identity"), and refuses a forged, expired or foreign-audience one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import ztmw
from ztmw.gateway import JWKS_PATH, create_gateway_app
from ztmw.gateway.assertion import AssertionIssuer, SigningKey, load_signing_key
from ztmw.jws import b64url_decode
from ztmw.models import Caller, Principal, TrustAssessment, VerifiedToken
from ztmw.testing import DevIssuer, FakeClock, challenges, free_port
from ztmw.testing.issuer import _generate

from ..conftest import AUDIENCE
from .conftest import gateway_config

UPSTREAM_ID = "https://upstream.internal"


def upstream_app(gateway_url: str, clock: FakeClock) -> web.Application:
    """A service written with ztmw that accepts only the gateway's assertions."""

    async def whoami(request: web.Request) -> web.Response:
        principal = request[ztmw.PRINCIPAL]
        assert principal is not None
        return web.json_response({"sub": principal.subject, "iss": principal.issuer,
                                  "acr": principal.token.acr, "claims": dict(principal.token.claims)})

    app = web.Application()
    app.router.add_get("/items", whoami)
    ztmw.setup(app, {
        "resource": {"identifier": UPSTREAM_ID},
        "issuers": [{"issuer": AUDIENCE, "jwks_uri": gateway_url + JWKS_PATH, "profile": "ztmw-identity",
                     "algorithms": ["ES256"]}],
        "rules": [{"id": "items", "path": "/items", "methods": ["GET"]}],
    }, clock=clock)
    return app


@pytest.fixture
async def pair(issuer: DevIssuer, signing_key: Path, clock: FakeClock) -> AsyncIterator[tuple[str, str]]:
    """(gateway URL, upstream URL): a proxy-mode gateway in front of the ztmw-protected upstream."""
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    gateway = TestServer(create_gateway_app(gateway_config(issuer, {
        "mode": "proxy", "upstream": upstream_url, "signing_key": str(signing_key),
        "assertion_audience": UPSTREAM_ID, "assertion_in_authorization": True}), clock=clock))
    await gateway.start_server()
    gateway_url = str(gateway.make_url("")).rstrip("/")
    upstream = TestServer(upstream_app(gateway_url, clock), port=upstream_port)
    await upstream.start_server()
    try:
        yield gateway_url, upstream_url
    finally:
        await upstream.close()
        await gateway.close()


def principal(subject: str = "alice") -> tuple[Principal, TrustAssessment]:
    token = VerifiedToken(issuer="x", subject=subject, audience=(AUDIENCE,), expires_at=0, token_id="t",
                          verifier="bearer", client_id="app-1", auth_time=1000.0, acr="urn:example:acr:mfa")
    return (Principal(subject=subject, issuer="x", token=token, caller=Caller("app-1"), raw_subject=subject),
            TrustAssessment(aal=2, ial=1, acr="urn:example:acr:mfa"))


async def test_round_trip_through_the_gateway(pair: tuple[str, str], issuer: DevIssuer,
                                              session: aiohttp.ClientSession) -> None:
    gateway_url, _ = pair
    token = issuer.mint("alice", scope="items:read", client_id="app-1", acr="urn:example:acr:mfa")
    async with session.get(gateway_url + "/items", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
        body = await response.json()
    assert (body["sub"], body["iss"], body["acr"]) == ("alice", AUDIENCE, "urn:example:acr:mfa")
    claims = body["claims"]
    assert claims["aud"] == UPSTREAM_ID and claims["client_id"] == "app-1" and claims["binding"] == "bearer"
    assert claims["aal"] == 2 and claims["ial"] == 0
    assert claims["exp"] - claims["iat"] == 60 and claims["jti"]


async def test_assertion_claims_and_header(signing_key: Path, clock: FakeClock) -> None:
    issuer = AssertionIssuer(load_signing_key(str(signing_key)), AUDIENCE, UPSTREAM_ID, 60, clock)
    who, trust = principal()
    header_b64, claims_b64, _ = issuer.issue(who, trust).split(".")
    header = json.loads(b64url_decode(header_b64))
    claims = json.loads(b64url_decode(claims_b64))
    assert header == {"alg": "ES256", "typ": "ztmw-id+jwt", "kid": issuer.key.kid}
    assert set(claims) == {"iss", "aud", "sub", "client_id", "acr", "aal", "ial", "binding", "auth_time", "iat",
                           "exp", "jti"}
    assert (claims["aal"], claims["ial"], claims["auth_time"]) == (2, 1, 1000)


async def refused(upstream_url: str, assertion: str, session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get(upstream_url + "/items", headers={"Authorization": f"Bearer {assertion}"}) as response:
        assert response.status == 401
        return challenges(response)["Bearer"]


async def test_forged_assertion_is_refused(pair: tuple[str, str], signing_key: Path, clock: FakeClock,
                                           session: aiohttp.ClientSession) -> None:
    real = load_signing_key(str(signing_key))
    other = _generate("ES256")
    forger = AssertionIssuer(SigningKey(other.key, "ES256", real.kid), AUDIENCE, UPSTREAM_ID, 60, clock)
    assert (await refused(pair[1], forger.issue(*principal()), session))["error"] == "invalid_token"


async def test_expired_assertion_is_refused(pair: tuple[str, str], signing_key: Path, clock: FakeClock,
                                            session: aiohttp.ClientSession) -> None:
    past = FakeClock(clock.now - 3600)
    stale = AssertionIssuer(load_signing_key(str(signing_key)), AUDIENCE, UPSTREAM_ID, 60, past)
    assert (await refused(pair[1], stale.issue(*principal()), session))["error"] == "invalid_token"


async def test_assertion_for_another_audience_is_refused(pair: tuple[str, str], signing_key: Path,
                                                         clock: FakeClock, session: aiohttp.ClientSession) -> None:
    elsewhere = AssertionIssuer(load_signing_key(str(signing_key)), AUDIENCE, "https://other.internal", 60, clock)
    assert (await refused(pair[1], elsewhere.issue(*principal()), session))["error"] == "invalid_token"


async def test_an_access_token_cannot_pass_for_an_assertion(pair: tuple[str, str], signing_key: Path,
                                                            clock: FakeClock, session: aiohttp.ClientSession) -> None:
    """Same key, same issuer, right audience, but typ at+jwt: the ztmw-identity profile takes only its own type."""
    key = load_signing_key(str(signing_key))
    dev = DevIssuer(AUDIENCE, audience=UPSTREAM_ID, clock=clock)
    dev._primary = type(dev._primary)(kid=key.kid, algorithm="ES256", key=key.key)  # sign with the gateway's key
    dev._keys = {key.kid: dev._primary}
    assert (await refused(pair[1], dev.mint("alice"), session))["error"] == "invalid_token"


async def test_the_key_set_holds_no_private_member(pair: tuple[str, str], session: aiohttp.ClientSession) -> None:
    async with session.get(pair[0] + JWKS_PATH) as response:
        [key] = (await response.json())["keys"]
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)


@pytest.mark.parametrize("content, problem", [
    ("not json", "not JSON"),
    ('{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0"}', "private EC, RSA or OKP"),
    ('{"kty": "EC", "crv": "P-256", "x": "AAAA"}', "not a usable JWK"),
])
def test_unusable_signing_keys_stop_start_up(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "key.json"
    path.write_text(content)
    with pytest.raises(ztmw.ConfigurationError, match=problem):
        load_signing_key(str(path))


def test_a_public_key_cannot_sign(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(_generate("ES256").key.as_dict(private=False)))
    with pytest.raises(ztmw.ConfigurationError, match="no private part"):
        load_signing_key(str(path))
