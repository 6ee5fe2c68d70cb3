"""The fixtures app authors get through the pytest11 entry point, used exactly as the README shows."""

from __future__ import annotations

from typing import Any

from aiohttp import web

import ztmw


def create_app() -> web.Application:
    async def profile(request: web.Request) -> web.Response:
        return web.json_response({"sub": request[ztmw.PRINCIPAL].subject})

    app = web.Application()
    app.router.add_get("/profile", profile)
    return app


async def test_readme_example(aiohttp_client: Any, ztmw_issuer: Any) -> None:
    app = create_app()
    ztmw.setup(app, {"resource": {"identifier": "https://api.example.com"},
                     "issuers": [ztmw_issuer.issuer_config()],
                     "rules": [{"id": "p", "path": "/profile", "scopes": ["profile:read"]}]})
    client = await aiohttp_client(app)
    token = ztmw_issuer.mint("alice", scope="profile:read")
    response = await client.get("/profile", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    assert await response.json() == {"sub": "alice"}
    assert (await client.get("/profile")).status == 401


async def test_audit_fixture_captures_decisions(aiohttp_client: Any, ztmw_issuer: Any, ztmw_audit: list) -> None:
    app = create_app()
    ztmw.setup(app, {"resource": {"identifier": "https://api.example.com"},
                     "issuers": [ztmw_issuer.issuer_config()],
                     "rules": [{"id": "p", "path": "/profile", "scopes": ["profile:read"]}]})
    client = await aiohttp_client(app)
    await client.get("/profile")
    assert [(e["decision"], e["reason"]) for e in ztmw_audit if e["event"] == "ztmw.decision"] == [
        ("deny", "no_credentials")]


def test_dpop_key_and_ca_fixtures(ztmw_dpop_key: Any, ztmw_test_ca: Any) -> None:
    assert len(ztmw_dpop_key.thumbprint) == 43
    cert = ztmw_test_ca.client_cert("client-a")
    assert cert.cnf == {"x5t#S256": cert.thumbprint}
