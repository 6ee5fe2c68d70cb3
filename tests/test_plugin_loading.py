"""Plugins by name from entry points, with the sample distribution (tests/sample_plugin) installed.

Every way a plugin can fail (unknown name, failing import, refused settings, raising factory, raising at
request time) ends in a ConfigurationError at start-up or a closed door at request time: never a 500, never
an allow.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs
from ztmw_sample_plugin import hash_key

import ztmw
from ztmw.testing import DevIssuer, FakeClock

from .conftest import base_config

API_KEY = "zsk_sample-plugin-loading-key-0123456789abcdef"


def sample_config(issuer: DevIssuer, **sections: Any) -> dict[str, Any]:
    config = base_config(
        issuer,
        verifiers={"enabled": ["bearer", "static-api-key"]},
        trust={"evaluators": ["mapping", "ip-reputation"], "amr": {"otp": {"aal": 2}}},
        plugins={
            "static-api-key": {"keys": [{"id": "loading-test", "sha256": hash_key(API_KEY), "subject": "svc",
                                         "client_id": "svc", "scopes": ["items:read"]}]},
            "ip-reputation": {"deny": ["192.0.2.0/24"]},
        },
        rules=[{"id": "read", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]},
               {"id": "strong", "path": "/strong", "methods": ["GET"], "min_aal": 2}],
    )
    config.update(sections)
    return config


def enabling(issuer: DevIssuer, verifier: str) -> dict[str, Any]:
    return sample_config(issuer, verifiers={"enabled": ["bearer", verifier]})


def app_with_trust_echo() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        trust = request[ztmw.TRUST]
        return web.json_response({"aal": trust.aal, "inputs": list(trust.inputs),
                                  "subject": request[ztmw.PRINCIPAL].subject})

    app = web.Application()
    app.router.add_get("/items", echo)
    app.router.add_get("/strong", echo)
    return app


async def get(client: Any, path: str, token: str) -> Any:
    response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    await response.read()
    return response


async def test_sample_plugins_are_loaded_by_name(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    app = app_with_trust_echo()
    ztmw.setup(app, sample_config(issuer), clock=clock)
    client = await aiohttp_client(app)
    by_key = await get(client, "/items", API_KEY)
    assert by_key.status == 200 and (await by_key.json())["subject"] == "svc"
    strong_jwt = issuer.mint("alice", scope="items:read", amr=["pwd", "otp"])
    by_jwt = await get(client, "/strong", strong_jwt)
    assert by_jwt.status == 200
    assert (await by_jwt.json())["aal"] == 2  # 127.0.0.1 is not denied: mapping's level stands


async def test_ip_reputation_lowers_aal_for_a_denied_peer_and_says_why(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    app = app_with_trust_echo()
    config = sample_config(issuer)
    config["plugins"]["ip-reputation"]["deny"] = ["127.0.0.0/8"]
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    token = issuer.mint("alice", scope="items:read", amr=["pwd", "otp"])
    with capture_logs() as events:
        weak = await get(client, "/strong", token)
        read = await get(client, "/items", token)
    assert weak.status == 401
    assert 'error="insufficient_user_authentication"' in weak.headers["WWW-Authenticate"]
    body = await read.json()
    assert body["aal"] == 0
    assert body["inputs"][-1] == "ip_reputation=deny:127.0.0.0/8"
    assert any(i.startswith("amr=otp") for i in body["inputs"]), "mapping's reasons are kept"
    decisions = [e for e in events if e["event"] == "ztmw.decision"]
    assert decisions[0]["reason"] == "insufficient_user_authentication"


def test_unknown_name_names_it_and_lists_what_is_installed(issuer: DevIssuer) -> None:
    with pytest.raises(ztmw.ConfigurationError) as caught:
        ztmw.setup(web.Application(), enabling(issuer, "static-api-kee"))
    message = str(caught.value)
    assert "'static-api-kee'" in message and "ztmw.verifiers" in message
    for installed in ("bearer", "static-api-key", "dpop", "mtls"):
        assert installed in message


def test_unknown_trust_evaluator_name_lists_installed_evaluators(issuer: DevIssuer) -> None:
    config = sample_config(issuer)
    config["trust"]["evaluators"] = ["mapping", "ip-reputaton"]
    expected = r"'ip-reputaton'.*ztmw\.trust_evaluators.*ip-reputation"
    with pytest.raises(ztmw.ConfigurationError, match=expected):
        ztmw.setup(web.Application(), config)


def test_plugin_that_fails_to_import_stops_start_up(issuer: DevIssuer) -> None:
    with pytest.raises(ztmw.ConfigurationError, match=r"'broken-import'.*cannot be imported"):
        ztmw.setup(web.Application(), enabling(issuer, "broken-import"))


def test_factory_that_rejects_its_settings_stops_start_up(issuer: DevIssuer) -> None:
    config = sample_config(issuer)
    config["plugins"]["static-api-key"]["key"] = "a typo for keys"
    with pytest.raises(ztmw.ConfigurationError, match=r"plugins\.static-api-key: unknown key 'key'"):
        ztmw.setup(web.Application(), config)
    config = sample_config(issuer)
    config["plugins"]["ip-reputation"]["deny"] = ["192.0.2.1/24"]  # host bits set: not a network
    with pytest.raises(ztmw.ConfigurationError, match=r"plugins\.ip-reputation\.deny"):
        ztmw.setup(web.Application(), config)


def test_factory_that_raises_stops_start_up(issuer: DevIssuer) -> None:
    with pytest.raises(ztmw.ConfigurationError, match=r"'raises-at-start' failed to start"):
        ztmw.setup(web.Application(), enabling(issuer, "raises-at-start"))


@pytest.mark.parametrize("enabled", [["raises-at-request"], ["bearer", "raises-at-request"],
                                     ["raises-at-request", "bearer"]])
async def test_verifier_raising_at_request_time_is_401(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, enabled: list[str]
) -> None:
    app = app_with_trust_echo()
    ztmw.setup(app, sample_config(issuer, verifiers={"enabled": enabled}), clock=clock)
    client = await aiohttp_client(app)
    with capture_logs():
        for token in ("not-a-jwt-at-all", API_KEY):
            response = await get(client, "/items", token)
            assert response.status == 401
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        valid = await get(client, "/items", issuer.mint(scope="items:read"))
    # first verifier to accept wins: bearer before the broken one still serves, after it nothing gets through
    assert valid.status == (200 if enabled[0] == "bearer" else 401)


async def test_trust_evaluator_raising_at_request_time_is_503(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = sample_config(issuer)
    config["trust"]["evaluators"] = ["mapping", "raises-at-request"]
    app = app_with_trust_echo()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    with capture_logs() as events:
        for token in (issuer.mint(scope="items:read"), API_KEY):
            response = await get(client, "/items", token)
            assert response.status == 503
            assert "WWW-Authenticate" not in response.headers
    errors = [e for e in events if e["event"] == "ztmw.plugin_error"]
    assert errors and all(e["plugin"] == "raises-at-request" for e in errors)


async def test_start_up_log_names_every_plugin_with_distribution_and_version(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    app = app_with_trust_echo()
    ztmw.setup(app, sample_config(issuer), clock=clock)
    with capture_logs() as events:
        await aiohttp_client(app)
    loaded = {(e["group"], e["plugin"]): (e["distribution"], e["version"])
              for e in events if e["event"] == "ztmw.plugin_loaded"}
    assert loaded[("ztmw.verifiers", "static-api-key")] == ("ztmw-sample-plugin", "0.1.0")
    assert loaded[("ztmw.trust_evaluators", "ip-reputation")] == ("ztmw-sample-plugin", "0.1.0")
    assert loaded[("ztmw.verifiers", "bearer")] == ("ztmw", ztmw.__version__)
    assert loaded[("ztmw.trust_evaluators", "mapping")] == ("ztmw", ztmw.__version__)
    assert {p for _, p in loaded} >= {"bearer", "static-api-key", "mapping", "ip-reputation"}
