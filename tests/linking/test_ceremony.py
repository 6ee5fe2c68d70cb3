"""The ceremony in one process over real TLS: certificate-bound link tokens (RFC 8705), static links that
already name another account, and a replay that is answered as one whoever's login it names.

The app is the accounts app behind `ztmw.setup`, served by aiohttp on a loopback TLS listener that asks for a
client certificate (trustme CA); the issuer is a `DevIssuer` with a real JWKS endpoint; the store is SQLite.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import ClientCert, DevIssuer, TestCA
from ztmw.testing.http import free_port

from ..factories import create_accounts_app

AUDIENCE = "https://api.example.com"
BANKID = "urn:example:acr:bankid"
LINKS = "/account/links"


class Server:
    def __init__(self, issuer: DevIssuer, ca: TestCA, base: str) -> None:
        self.issuer, self.ca, self.base = issuer, ca, base

    def bank(self, sub: str, **kwargs: Any) -> str:
        return self.issuer.mint(sub, acr=BANKID, auth_time=time.time() - 10, **kwargs)

    def social(self, sub: str, **kwargs: Any) -> str:
        return self.issuer.mint(sub, acr="social", auth_time=time.time() - 10, **kwargs)

    async def post(self, token: str, body: Any, cert: ClientCert | None = None) -> tuple[int, Any]:
        connector = aiohttp.TCPConnector(ssl=self.ca.client_ssl_context(cert))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(self.base + LINKS, json=body,
                                    headers={"Authorization": f"Bearer {token}"}) as response:
                return response.status, await response.json()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    ca = TestCA()
    async with DevIssuer(audience=AUDIENCE) as issuer:
        port = free_port()
        app = create_accounts_app()
        ztmw.setup(app, {
            "resource": {"identifier": AUDIENCE, "public_origin": f"https://127.0.0.1:{port}"},
            "issuers": [issuer.issuer_config(audiences=[AUDIENCE])],
            "verifiers": {"enabled": ["bearer", "mtls"]},
            "trust": {"acr": {BANKID: {"aal": 2, "ial": 3}}},
            "identity": {"links": [{"issuer": issuer.issuer, "subject": "jane-static", "account": "jane"}]},
            "linking": {"enabled": True, "store": f"sqlite:///{tmp_path / 'links.db'}"},
        })
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ca.server_ssl_context()).start()
        try:
            yield Server(issuer, ca, f"https://127.0.0.1:{port}")
        finally:
            await runner.cleanup()


async def test_a_certificate_bound_link_token_needs_the_certificate_of_this_connection(server: Server) -> None:
    alice_device, other_device = server.ca.client_cert("alice-device"), server.ca.client_cert("other-device")
    bound = server.social("alice-social", cnf=alice_device.cnf)
    # no certificate, or another one, on this connection: the binding is not proven here
    for cert in (None, other_device):
        status, body = await server.post(server.bank("alice"), {"link_token": bound}, cert)
        assert (status, body["error"]) == (401, "invalid_token")
        assert body["error_description"] == "Link token is bound to a key this request does not prove"
    # the connection proves the certificate the link token is bound to: linked without a second proof
    status, body = await server.post(server.bank("alice"), {"link_token": bound}, alice_device)
    assert (status, body["subject"]) == (201, "alice-social")


async def test_a_login_a_static_link_gives_another_account_is_409_and_nothing_is_written(server: Server) -> None:
    with capture_logs() as logs:
        status, body = await server.post(server.bank("john"), {"link_token": server.social("jane-static")})
    assert (status, body["error"]) == (409, "conflict")
    assert [e["reason"] for e in logs if e["event"] == "ztmw.security"] == ["link_conflict"]
    assert all("jane-static" not in str(e) for e in logs)  # the subject is hashed in every event
    # the refused attempt recorded nothing, not even john's own login
    connector = aiohttp.TCPConnector(ssl=server.ca.client_ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(server.base + LINKS,
                               headers={"Authorization": f"Bearer {server.bank('john')}"}) as response:
            assert (response.status, (await response.json())["logins"]) == (200, [])


async def test_an_unlinked_login_cannot_found_an_account_a_static_link_names(server: Server) -> None:
    status, body = await server.post(server.bank("jane"), {"link_token": server.social("jane-other")})
    assert (status, body["error"]) == (409, "conflict")
    assert body["error_description"].startswith("An account with this id exists")


async def test_a_replay_is_answered_as_a_replay_even_against_another_accounts_login(server: Server) -> None:
    link_token = server.social("alice-social")
    assert (await server.post(server.bank("alice"), {"link_token": link_token}))[0] == 201
    status, body = await server.post(server.bank("mallory"), {"link_token": link_token})
    assert (status, body["error_description"]) == (401, "Link token already used")


async def test_oversized_link_requests_are_400(server: Server) -> None:
    status, body = await server.post(server.bank("alice"), {"link_token": "a" * 40_000})
    assert (status, body["error"]) == (400, "invalid_request")
    status, body = await server.post(server.bank("alice"), {"link_token": "a" * 20_000})
    assert (status, body["error"]) == (400, "invalid_request")


async def test_a_verifier_that_raises_on_a_link_token_refuses_it_never_500(tmp_path: Path) -> None:
    """SEC-07 for the ceremony: the link token goes through the same verifiers, a plugin bug refuses it."""
    async with DevIssuer(audience=AUDIENCE) as issuer:
        app = create_accounts_app()
        pipeline = ztmw.setup(app, {
            "resource": {"identifier": AUDIENCE},
            "issuers": [issuer.issuer_config(audiences=[AUDIENCE])],
            "verifiers": {"enabled": ["bearer", "raises-at-request"]},
            "linking": {"enabled": True, "store": f"sqlite:///{tmp_path / 'links.db'}"},
        })
        await pipeline.start()
        try:
            with capture_logs() as logs:
                with pytest.raises(ztmw.InvalidToken) as raised:
                    await pipeline.authenticator.verify("opaque-token-no-jwt-verifier-takes")
            assert raised.value.reason == "verifier_error"
            assert any(e["event"] == "ztmw.verifier_error" for e in logs)
        finally:
            await pipeline.close()
