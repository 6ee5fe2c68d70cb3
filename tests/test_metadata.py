"""RFC 9728 protected resource metadata (checklist §10 PRM, VEC-9728-1), end to end through `ztmw.setup`.

Each PRM item that applies to a resource server has a named test; the document is fetched over a real server
by a real client, and compared with what the same app enforces (challenges, accepted issuers, DPoP `algs`).
PRM-10 and PRM-12 concern signed metadata and announcing changes: ztmw signs nothing and its document is
fixed for a process, so their tests pin the absence of `signed_metadata` and the constant URL.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector, web
from structlog.testing import capture_logs

import ztmw
from ztmw import load_config
from ztmw.metadata import resource_metadata
from ztmw.testing import DevIssuer, FakeClock, TestCA
from ztmw.testing.http import challenges

from .conftest import AUDIENCE, base_config, items_app

WELL_KNOWN = "/.well-known/oauth-protected-resource"
METADATA_URL = AUDIENCE + WELL_KNOWN
DEFAULT_ALGS = ["ES256", "EdDSA", "PS256"]


async def serve(aiohttp_client: Any, config: dict[str, Any], clock: FakeClock | None = None,
                app: web.Application | None = None) -> Any:
    app = app if app is not None else items_app()
    ztmw.setup(app, config, clock=clock)
    return await aiohttp_client(app)


async def fetch(client: Any, path: str = WELL_KNOWN, method: str = "GET", **headers: str) -> Any:
    response = await client.request(method, path, headers=headers)
    await response.read()
    return response


async def document(client: Any, path: str = WELL_KNOWN) -> dict[str, Any]:
    response = await fetch(client, path)
    assert response.status == 200
    assert response.content_type == "application/json"
    body = json.loads(await response.text())
    assert isinstance(body, dict)
    return body


def with_resource(config: dict[str, Any], identifier: str) -> dict[str, Any]:
    """Move the app to another resource identifier; tokens must then name it as audience."""
    config["resource"]["identifier"] = identifier
    config["issuers"][0]["audiences"] = [identifier]
    return config


def path_of(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


@pytest.fixture
async def client(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> Any:
    return await serve(aiohttp_client, base_config(issuer), clock)


# -- PRM-01: where the document lives ------------------------------------------------------------------------

async def test_prm_01_well_known_url_inserted_before_path(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    identifier = "https://resource.example.com/resource1"  # VEC-9728-1, second request line
    client = await serve(aiohttp_client, with_resource(base_config(issuer), identifier), clock)
    doc = await document(client, "/.well-known/oauth-protected-resource/resource1")
    assert doc["resource"] == identifier
    # not appended after the path, and not at the host root: the path belongs to the well-known URL
    assert (await fetch(client, "/resource1/.well-known/oauth-protected-resource")).status == 404
    assert (await fetch(client, WELL_KNOWN)).status == 404
    response = await fetch(client, "/items")
    assert challenges(response)["Bearer"]["resource_metadata"] == (
        "https://resource.example.com/.well-known/oauth-protected-resource/resource1")


async def test_prm_01_identifier_without_path_vec_9728_1(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    identifier = "https://resource.example.com"  # VEC-9728-1, first request line
    client = await serve(aiohttp_client, with_resource(base_config(issuer), identifier), clock)
    assert (await document(client, WELL_KNOWN))["resource"] == identifier
    response = await fetch(client, "/items")
    assert response.status == 401  # R-NONE, not the RFC example's 400 (RFC 6750 §3.1 wins, checklist note)
    assert challenges(response)["Bearer"] == {
        "realm": "api",
        "resource_metadata": "https://resource.example.com/.well-known/oauth-protected-resource"}


async def test_prm_01_terminating_slash_after_host_is_dropped(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    identifier = "https://api.example.com/"
    client = await serve(aiohttp_client, with_resource(base_config(issuer), identifier), clock)
    assert (await document(client, WELL_KNOWN))["resource"] == identifier  # byte for byte, slash kept
    assert (await fetch(client, WELL_KNOWN + "/")).status == 404
    assert challenges(await fetch(client, "/items"))["Bearer"]["resource_metadata"] == METADATA_URL


@pytest.mark.parametrize(
    ("identifier", "url"),
    [
        ("https://api.example.com/v1/", "https://api.example.com/.well-known/oauth-protected-resource/v1/"),
        ("https://api.example.com:8443/a/b",
         "https://api.example.com:8443/.well-known/oauth-protected-resource/a/b"),
    ],
)
async def test_prm_01_path_and_port_are_kept(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, identifier: str, url: str
) -> None:
    client = await serve(aiohttp_client, with_resource(base_config(issuer), identifier), clock)
    assert challenges(await fetch(client, "/items"))["Bearer"]["resource_metadata"] == url
    assert (await document(client, path_of(url)))["resource"] == identifier


async def test_prm_01_percent_encoded_identifier_path_is_served_where_advertised(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    identifier = "https://api.example.com/a%20b"
    client = await serve(aiohttp_client, with_resource(base_config(issuer), identifier), clock)
    url = challenges(await fetch(client, "/items"))["Bearer"]["resource_metadata"]
    assert url == "https://api.example.com/.well-known/oauth-protected-resource/a%20b"
    assert (await document(client, path_of(url)))["resource"] == identifier


# -- PRM-02: GET ---------------------------------------------------------------------------------------------

async def test_prm_02_fetched_with_get(client: Any) -> None:
    assert (await fetch(client)).status == 200
    head = await fetch(client, method="HEAD")
    assert head.status == 200 and await head.read() == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_prm_02_other_methods_are_aiohttps_own_405(client: Any, method: str) -> None:
    response = await fetch(client, method=method)
    assert response.status == 405
    assert "WWW-Authenticate" not in response.headers


# -- PRM-03: 200, JSON object, zero-valued parameters omitted ------------------------------------------------

async def test_prm_03_200_json_object(client: Any) -> None:
    response = await fetch(client)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert isinstance(json.loads(await response.text()), dict)


async def test_prm_03_zero_valued_parameters_are_omitted(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    public = {"id": "health", "path": "/health", "methods": ["GET"], "public": True}
    config = base_config(issuer, rules=[public])
    doc = await document(await serve(aiohttp_client, config, clock))
    assert doc == {"resource": AUDIENCE, "authorization_servers": [issuer.issuer],
                   "bearer_methods_supported": ["header"]}


def _walk(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value] + [item for v in value.values() for item in _walk(v)]
    if isinstance(value, list):
        return [value] + [item for v in value for item in _walk(v)]
    return [value]


async def test_prm_03_no_parameter_is_null_empty_or_false_in_any_configuration(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop", "mtls"]})
    doc = await document(await serve(aiohttp_client, config, clock))
    assert all(value not in (None, [], {}, "", False) for value in doc.values())


# -- PRM-04: resource is the identifier, identical -----------------------------------------------------------

@pytest.mark.parametrize("identifier", [
    "https://api.example.com", "https://api.example.com/", "https://API.Example.com/Res",
    "https://api.example.com:8443/v1/", "https://api.example.com/?tenant=1",
])
async def test_prm_04_resource_is_identical_to_the_identifier(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, identifier: str
) -> None:
    client = await serve(aiohttp_client, with_resource(base_config(issuer), identifier), clock)
    advertised = challenges(await fetch(client, "/items"))["Bearer"]["resource_metadata"]
    doc = await document(client, path_of(advertised).split("?", 1)[0])
    assert doc["resource"] == identifier
    # the advertised URL is the identifier with the well-known segment inserted, nothing else (RFC 9728 §3.3)
    scheme_host = identifier.split("/", 3)[:3]
    assert advertised.startswith("/".join(scheme_host) + WELL_KNOWN)


async def test_prm_04_every_401_challenge_points_at_the_document(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]},
                         trust={"acr": {"urn:acr:bank": {"aal": 2, "ial": 3}}})
    config["rules"].append({"id": "strong", "path": "/admin", "methods": ["GET"], "min_aal": 2})
    client = await serve(aiohttp_client, config, clock)
    cases = [
        await fetch(client, "/items"),                                                     # R-NONE
        await fetch(client, "/items", Authorization="Bearer not.a.token"),                 # R-TOK-B
        await fetch(client, "/items", Authorization=f"DPoP {issuer.mint(scope='items:read')}"),  # R-TOK-D
        await fetch(client, "/admin", Authorization=f"Bearer {issuer.mint()}"),             # R-STEP
        await fetch(client, "/items", Authorization="Bearer a,b"),                         # R-REQ (400)
    ]
    assert [r.status for r in cases] == [401, 401, 401, 401, 400]
    for response in cases:
        parsed = challenges(response)
        assert parsed, "every 401/400 carries a challenge"
        for params in parsed.values():
            assert params["resource_metadata"] == METADATA_URL
    assert (await document(client, path_of(METADATA_URL)))["resource"] == AUDIENCE


# -- PRM-05: authorization servers = accepted issuers --------------------------------------------------------

async def test_prm_05_authorization_servers_are_the_accepted_issuers(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    async with DevIssuer(audience=AUDIENCE, clock=clock) as second, \
               DevIssuer(audience=AUDIENCE, clock=clock) as stranger:
        config = base_config(issuer)
        config["issuers"].append(second.issuer_config())
        client = await serve(aiohttp_client, config, clock)
        assert (await document(client))["authorization_servers"] == [issuer.issuer, second.issuer]
        for listed in (issuer, second):
            token = listed.mint(scope="items:read")
            assert (await fetch(client, "/items", Authorization=f"Bearer {token}")).status == 200
        response = await fetch(client, "/items", Authorization=f"Bearer {stranger.mint(scope='items:read')}")
        assert response.status == 401
        assert challenges(response)["Bearer"]["error"] == "invalid_token"


def test_prm_05_introspection_issuer_is_an_authorization_server(monkeypatch: Any) -> None:
    monkeypatch.setenv("ZTMW_TEST_INTROSPECTION_SECRET", "s3cret")
    config = load_config({
        "resource": {"identifier": AUDIENCE},
        "issuers": [{"issuer": "https://as.example.com", "jwks_uri": "https://as.example.com/jwks"}],
        "verifiers": {"enabled": ["bearer", "introspection"]},
        "plugins": {"introspection": {"endpoint": "https://opaque.example.com/introspect", "client_id": "rs",
                                      "client_secret_env": "ZTMW_TEST_INTROSPECTION_SECRET",
                                      "issuer": "https://opaque.example.com"}},
    })
    servers = resource_metadata(config, dpop_algs=None, mtls=False)["authorization_servers"]
    assert servers == ["https://as.example.com", "https://opaque.example.com"]
    same = load_config({**_dict(config), "plugins": {"introspection": {"issuer": "https://as.example.com"}}})
    assert resource_metadata(same, dpop_algs=None, mtls=False)["authorization_servers"] == [
        "https://as.example.com"]


def _dict(config: Any) -> dict[str, Any]:
    return {"resource": {"identifier": config.resource.identifier},
            "issuers": [{"issuer": i.issuer, "jwks_uri": i.jwks_uri} for i in config.issuers],
            "verifiers": {"enabled": list(config.verifiers)}}


# -- PRM-06: bearer methods ----------------------------------------------------------------------------------

async def test_prm_06_bearer_methods_supported_is_header_only(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = items_app()
    app.router.add_post("/items", ok)
    config = base_config(issuer)
    config["rules"].append({"id": "write", "path": "/items", "methods": ["POST"], "scopes": ["items:read"]})
    client = await serve(aiohttp_client, config, clock, app)
    assert (await document(client))["bearer_methods_supported"] == ["header"]
    token = issuer.mint(scope="items:read")
    query = await fetch(client, f"/items?access_token={token}")
    body = await client.post("/items", data={"access_token": token})
    await body.read()
    for response in (query, body):  # the other RFC 6750 transports are not read: no credentials
        assert response.status == 401
        assert "error" not in challenges(response)["Bearer"]
    assert (await fetch(client, "/items", Authorization=f"Bearer {token}")).status == 200


# -- PRM-07: DPoP --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algs", [None, ["PS256", "ES256"]])
async def test_prm_07_dpop_algs_equal_the_challenge_algs(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, algs: list[str] | None
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]})
    if algs:
        config["dpop"] = {"algorithms": algs}
    client = await serve(aiohttp_client, config, clock)
    advertised = (await document(client))["dpop_signing_alg_values_supported"]
    assert advertised == (algs or DEFAULT_ALGS)
    assert challenges(await fetch(client, "/items"))["DPoP"]["algs"] == " ".join(advertised)


async def test_prm_07_no_dpop_parameters_without_dpop(client: Any) -> None:
    doc = await document(client)
    assert not [name for name in doc if name.startswith("dpop_")]
    assert "DPoP" not in challenges(await fetch(client, "/items"))


def _all_dpop(issuer: DevIssuer, **extra: Any) -> dict[str, Any]:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}, **extra)
    for rule in config["rules"]:
        if not rule.get("public"):
            rule["binding"] = "dpop"
    return config


async def test_prm_07_dpop_bound_tokens_required_when_every_protected_rule_needs_dpop(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client = await serve(aiohttp_client, _all_dpop(issuer), clock)
    assert (await document(client))["dpop_bound_access_tokens_required"] is True
    token = f"Bearer {issuer.mint('alice', scope='items:read')}"
    for path in ("/items", "/users/alice/items"):  # then every Bearer-scheme request is refused
        response = await fetch(client, path, Authorization=token)
        assert response.status == 401
        assert challenges(response)["Bearer"]["error"] == "invalid_token"
        assert "algs" in challenges(response)["DPoP"]
    assert (await fetch(client, "/health")).status == 200  # public routes need no token at all


async def test_prm_07_binding_required_counts_as_dpop_only_while_mtls_is_off(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = _all_dpop(issuer)
    config["rules"][1]["binding"] = "required"
    assert resource_metadata(load_config(config), dpop_algs=("ES256",), mtls=False)[
        "dpop_bound_access_tokens_required"] is True
    config["verifiers"]["enabled"].append("mtls")
    client = await serve(aiohttp_client, config, clock)
    doc = await document(client)
    assert "dpop_bound_access_tokens_required" not in doc  # a certificate-bound token can pass /items
    assert doc["tls_client_certificate_bound_access_tokens"] is True


@pytest.mark.parametrize("case", ["one rule accepts bearer", "dpop off", "only public rules"])
def test_prm_07_dpop_bound_tokens_not_required_otherwise(issuer: DevIssuer, case: str) -> None:
    config = _all_dpop(issuer)
    algs: tuple[str, ...] | None = ("ES256",)
    if case == "one rule accepts bearer":
        config["rules"][1]["binding"] = "any"
    elif case == "dpop off":
        config["verifiers"]["enabled"] = ["bearer"]
        algs = None
    else:
        config["rules"] = [config["rules"][0]]
    assert "dpop_bound_access_tokens_required" not in resource_metadata(
        load_config(config), dpop_algs=algs, mtls=False)


# -- PRM-08: certificate-bound tokens ------------------------------------------------------------------------

async def test_prm_08_tls_client_certificate_bound_tokens_when_mtls_is_on(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "mtls"]})
    assert (await document(await serve(aiohttp_client, config, clock)))[
        "tls_client_certificate_bound_access_tokens"] is True


async def test_prm_08_absent_when_mtls_is_off(client: Any) -> None:
    assert "tls_client_certificate_bound_access_tokens" not in await document(client)


# -- PRM-09: scopes, no none, nothing signed -----------------------------------------------------------------

async def test_prm_09_scopes_supported_are_the_rules_scopes(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = base_config(issuer)
    config["rules"].append({"id": "admin", "path": "/admin", "scopes": ["admin", "items:read"]})
    doc = await document(await serve(aiohttp_client, config, clock))
    assert doc["scopes_supported"] == ["admin", "items:read"]


async def test_prm_09_no_none_anywhere(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop", "mtls"]})
    doc = await document(await serve(aiohttp_client, config, clock))
    strings = [v for v in _walk(doc) if isinstance(v, str)]
    assert not [v for v in strings if v.lower() == "none"]
    assert "resource_signing_alg_values_supported" not in doc
    assert "jwks_uri" not in doc


def test_prm_09_none_is_refused_by_configuration(issuer: DevIssuer) -> None:
    with pytest.raises(ztmw.ConfigurationError, match="dpop.algorithms"):
        load_config(base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]},
                                dpop={"algorithms": ["none"]}))


# -- PRM-10..15 ----------------------------------------------------------------------------------------------

async def test_prm_10_no_signed_metadata(client: Any) -> None:
    assert "signed_metadata" not in await document(client)


async def test_prm_11_resource_metadata_on_401_and_400_never_on_403(client: Any, issuer: DevIssuer) -> None:
    assert challenges(await fetch(client, "/items"))["Bearer"]["resource_metadata"] == METADATA_URL
    scope = await fetch(client, "/items", Authorization=f"Bearer {issuer.mint(scope='other')}")
    assert scope.status == 403
    assert "resource_metadata" not in challenges(scope)["Bearer"]
    assert "WWW-Authenticate" not in (await fetch(client, "/admin")).headers


async def test_prm_11_metadata_disabled_removes_document_and_parameter(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client = await serve(aiohttp_client, base_config(issuer, metadata={"enabled": False}), clock)
    assert (await fetch(client)).status == 404
    assert challenges(await fetch(client, "/items")) == {"Bearer": {"realm": "api"}}


async def test_prm_12_the_advertised_url_is_the_same_on_every_challenge(
    client: Any, issuer: DevIssuer
) -> None:
    seen = set()
    expired = f"Bearer {issuer.mint(lifetime=-100)}"
    for headers in ({}, {"Authorization": "Bearer x"}, {"Authorization": expired}):
        seen.add(challenges(await fetch(client, "/items", **headers))["Bearer"]["resource_metadata"])
    good = f"Bearer {issuer.mint(scope='items:read')}"
    assert (await fetch(client, "/items", Authorization=good)).status == 200
    seen.add(challenges(await fetch(client, "/items"))["Bearer"]["resource_metadata"])
    assert seen == {METADATA_URL}


async def test_prm_13_identifier_compared_code_point_by_code_point(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    identifier = "https://API.Example.com/Res"
    client = await serve(aiohttp_client, with_resource(base_config(issuer), identifier), clock)
    assert (await document(client, WELL_KNOWN + "/Res"))["resource"] == identifier
    assert (await fetch(client, WELL_KNOWN + "/res")).status == 404
    for audience in ("https://api.example.com/Res", "https://API.Example.com/Res/",
                     "https://API.Example.com/res"):
        token = issuer.mint(scope="items:read", audience=audience)
        response = await fetch(client, "/items", Authorization=f"Bearer {token}")
        assert response.status == 401, audience
    good = issuer.mint(scope="items:read", audience=identifier)
    assert (await fetch(client, "/items", Authorization=f"Bearer {good}")).status == 200


async def test_prm_14_document_served_over_verified_tls(
    aiohttp_server: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    ca = TestCA()
    app = items_app()
    ztmw.setup(app, base_config(issuer), clock=clock)
    server = await aiohttp_server(app, ssl=ca.server_ssl_context())
    async with ClientSession(connector=TCPConnector(ssl=ca.client_ssl_context())) as session:
        async with session.get(f"https://localhost:{server.port}{WELL_KNOWN}") as response:
            assert response.status == 200
            assert (await response.json())["resource"] == AUDIENCE


async def test_prm_15_tokens_must_be_audience_restricted_to_the_resource(
    client: Any, issuer: DevIssuer
) -> None:
    foreign = issuer.mint(scope="items:read", audience="https://other.example.com")
    response = await fetch(client, "/items", Authorization=f"Bearer {foreign}")
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "invalid_token"
    good = f"Bearer {issuer.mint(scope='items:read')}"
    assert (await fetch(client, "/items", Authorization=good)).status == 200


# -- public even though every other route is denied ----------------------------------------------------------

async def test_metadata_is_public_while_every_other_route_is_denied(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client = await serve(aiohttp_client, base_config(issuer, rules=[]), clock)
    token = f"Bearer {issuer.mint(scope='items:read')}"
    for path in ("/health", "/items", "/users/alice/items", "/admin"):
        assert (await fetch(client, path, Authorization=token)).status == 403
    with capture_logs() as events:
        assert (await document(client))["resource"] == AUDIENCE
    decision = [e for e in events if e["event"] == "ztmw.decision"]
    assert [(e["decision"], e["reason"], e["rule_id"]) for e in decision] == [
        ("allow", "public", "ztmw-metadata")]


async def test_metadata_with_bad_credentials_is_still_refused(client: Any) -> None:
    # DESIGN §4.5: credentials presented are always checked, even on a public route
    response = await fetch(client, Authorization="Bearer not.a.token")
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "invalid_token"


async def test_document_is_derived_from_the_same_config_the_pipeline_enforces(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop", "mtls"]})
    app = items_app()
    pipeline = ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    assert await document(client) == resource_metadata(
        pipeline.config, dpop_algs=pipeline.dpop_algs, mtls=pipeline.mtls_enabled)
    assert pipeline.renderer.dpop_algs == tuple((await document(client))["dpop_signing_alg_values_supported"])
