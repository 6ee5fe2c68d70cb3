"""End to end through a real aiohttp server and client: the response catalogue (spec-checklist §0) on the wire."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog
from aiohttp import web
from structlog.testing import capture_logs

import ztmw
from ztmw.errors import InvalidDPoPProof
from ztmw.models import RouteRef
from ztmw.testing import DevIssuer, DPoPKey, FakeClock
from ztmw.testing.http import challenges

from .conftest import (
    AUDIENCE,
    METADATA_URL,
    base_config,
    bearer_client,
    call,
    decisions,
    items_app,
    post_route_client,
    protected,
    raw,
    staged_app,
    with_query,
)

pytestmark = pytest.mark.usefixtures("decision_path")  # decided without awaiting, and in full



@pytest.fixture
async def client(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> Any:
    app = items_app()
    ztmw.setup(app, base_config(issuer), clock=clock)
    return await aiohttp_client(app)


async def get(client: Any, path: str = "/items", **headers: str) -> Any:
    response = await client.get(path, headers=headers)
    await response.read()
    return response


async def test_valid_bearer_token_reaches_the_handler(client: Any, issuer: DevIssuer) -> None:
    response = await get(client, Authorization=f"Bearer {issuer.mint(scope='items:read')}")
    assert response.status == 200
    assert await response.json() == {"ok": True}


async def test_resp_01_no_credentials_gets_bare_challenge(client: Any) -> None:
    response = await get(client)
    assert response.status == 401
    parsed = challenges(response)
    assert parsed == {"Bearer": {"realm": "api", "resource_metadata": METADATA_URL}}


async def test_resp_01_unsupported_scheme_counts_as_no_credentials(client: Any) -> None:
    response = await get(client, Authorization="Basic YWxpY2U6c2VjcmV0")
    assert response.status == 401
    assert "error" not in challenges(response)["Bearer"]


async def test_http_08_query_token_is_not_read(client: Any, issuer: DevIssuer) -> None:
    response = await get(client, f"/items?access_token={issuer.mint(scope='items:read')}")
    assert response.status == 401
    assert "error" not in challenges(response)["Bearer"]


async def test_resp_04_malformed_header_is_400_invalid_request(client: Any) -> None:
    response = await get(client, Authorization="Bearer a,b")
    assert response.status == 400
    assert challenges(response)["Bearer"]["error"] == "invalid_request"


async def test_http_05_two_authorization_lines_are_400(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint(scope="items:read")
    response = await client.get("/items", headers=[("Authorization", f"Bearer {token}"),
                                                  ("Authorization", f"Bearer {token}")])
    assert response.status == 400
    assert challenges(response)["Bearer"]["error"] == "invalid_request"


async def test_resp_05_expired_token_is_401_invalid_token(client: Any, issuer: DevIssuer) -> None:
    response = await get(client, Authorization=f"Bearer {issuer.mint(scope='items:read', lifetime=-60)}")
    assert response.status == 401
    bearer = challenges(response)["Bearer"]
    assert bearer["error"] == "invalid_token"
    assert bearer["realm"] == "api"
    assert bearer["resource_metadata"] == METADATA_URL


async def test_cached_token_expires_on_the_per_request_recheck(
    client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    token = issuer.mint(scope="items:read", lifetime=60)
    assert (await get(client, Authorization=f"Bearer {token}")).status == 200
    clock.advance(60 + 31)  # past exp + leeway: the cache must not keep it alive
    response = await get(client, Authorization=f"Bearer {token}")
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "invalid_token"


async def test_resp_06_missing_scope_is_403_with_scope(client: Any, issuer: DevIssuer) -> None:
    response = await get(client, Authorization=f"Bearer {issuer.mint(scope='other')}")
    assert response.status == 403
    assert challenges(response) == {
        "Bearer": {"realm": "api", "error": "insufficient_scope", "error_description": "Insufficient scope",
                   "scope": "items:read"}
    }


async def test_route_without_rule_is_403_before_credentials(client: Any) -> None:
    response = await get(client, "/admin")
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers


async def test_route_refs_are_made_once_per_route_and_method_and_kept_by_their_pipeline(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """A route's RouteRef lives in the pipeline of its app (not in a module-wide table): it goes with the app."""
    (first, first_pipeline), (second, second_pipeline) = [
        await protected(aiohttp_client, base_config(issuer), clock) for _ in range(2)]
    token = issuer.mint("ann", scope="items:read")
    for _ in range(3):
        assert (await call(first, token))[0] == 200
    assert (await call(first, token, "/users/ann/items"))[0] == 200
    refs = first_pipeline.route_refs
    assert sorted((ref.method, ref.pattern) for ref in refs.values()) == [
        ("GET", "/items"), ("GET", "/users/{user}/items")]
    assert second_pipeline.route_refs == {}
    assert (await call(second, token))[0] == 200
    [ref] = second_pipeline.route_refs.values()
    assert ref == RouteRef("GET", "/items") and all(ref is not other for other in refs.values())


async def test_unknown_path_is_aiohttps_own_404(client: Any) -> None:
    assert (await get(client, "/no/such/path")).status == 404


async def test_wrong_method_is_aiohttps_own_405(client: Any) -> None:
    response = await client.post("/items")
    assert response.status == 405


async def test_public_route_without_credentials_is_allowed(client: Any) -> None:
    assert (await get(client, "/health")).status == 200


async def test_public_route_with_invalid_credentials_is_rejected(client: Any) -> None:
    response = await get(client, "/health", Authorization="Bearer not.a.token")
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "invalid_token"


async def test_head_is_covered_by_a_get_rule(client: Any, issuer: DevIssuer) -> None:
    response = await client.head("/items", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"})
    assert response.status == 200


async def test_owner_rule_compares_canonical_subject(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint("alice", scope="items:read")
    assert (await get(client, "/users/alice/items", Authorization=f"Bearer {token}")).status == 200
    assert (await get(client, "/users/bob/items", Authorization=f"Bearer {token}")).status == 403


async def test_linked_identity_owns_the_account(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    app = items_app()
    config = base_config(issuer, identity={"links": [
        {"issuer": issuer.issuer, "subject": "google|123", "account": "alice"}]})
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    token = issuer.mint("google|123", scope="items:read")
    assert (await get(client, "/users/alice/items", Authorization=f"Bearer {token}")).status == 200
    assert (await get(client, "/users/google|123/items", Authorization=f"Bearer {token}")).status == 403


async def test_principal_and_trust_are_published_to_the_handler(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["principal"] = request[ztmw.PRINCIPAL]
        seen["trust"] = request[ztmw.TRUST]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/items", handler)
    ztmw.setup(app, base_config(issuer, trust={"amr": {"otp": {"aal": 2}}}), clock=clock)
    client = await aiohttp_client(app)
    await get(client, Authorization=f"Bearer {issuer.mint('alice', scope='items:read', amr=['pwd', 'otp'])}")
    principal = seen["principal"]
    assert principal.subject == "alice"
    assert principal.caller.client_id == "demo-client"
    assert principal.binding is None
    assert seen["trust"].aal == 2


async def test_metadata_document_is_served_publicly(client: Any, issuer: DevIssuer) -> None:
    response = await client.get("/.well-known/oauth-protected-resource")
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document["resource"] == AUDIENCE
    assert document["authorization_servers"] == [issuer.issuer]
    assert document["bearer_methods_supported"] == ["header"]
    assert document["scopes_supported"] == ["items:read"]


async def test_jwks_unreachable_is_503_never_500_or_allow(aiohttp_client: Any, clock: FakeClock) -> None:
    issuer = DevIssuer(audience=AUDIENCE, clock=clock)
    await issuer.start()
    config = base_config(issuer)
    await issuer.close()  # the key server is gone before the app starts
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    response = await get(client, Authorization=f"Bearer {issuer.mint(scope='items:read')}")
    assert response.status == 503
    assert "WWW-Authenticate" not in response.headers


async def test_one_audit_event_per_request_and_no_token_in_it(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint("alice", scope="items:read")
    with capture_logs() as events:
        await get(client, Authorization=f"Bearer {token}")
        await get(client, Authorization="Bearer x.y.z")
        await get(client, "/admin", Authorization=f"Bearer {token}")
    decisions = [e for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]
    assert [(e["decision"], e["status"], e["reason"]) for e in decisions] == [
        ("allow", 200, "allowed"), ("deny", 401, "malformed_token"), ("deny", 403, "no_rule")]
    allowed = decisions[0]
    assert allowed["rule_id"] == "read" and allowed["route"] == "/items" and allowed["method"] == "GET"
    assert allowed["subject"].startswith("sha256:") and "alice" not in allowed["subject"]
    assert allowed["client_id"] == "demo-client" and allowed["issuer"] == issuer.issuer
    assert allowed["verifier"] == "bearer" and allowed["cache"] in ("hit", "miss")
    assert "duration_ms" in allowed and allowed["token_id"]
    for event in events:
        assert token not in repr(event)
        assert token.split(".")[2] not in repr(event)


async def test_stage_middlewares_work_alone(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    pipeline = ztmw.Pipeline(ztmw.load_config(base_config(issuer)), clock=clock)

    async def handler(request: web.Request) -> web.Response:
        principal = request[ztmw.PRINCIPAL]
        return web.json_response({"subject": principal.subject if principal else None})

    async def lifetime(app: web.Application) -> Any:
        await pipeline.start()
        yield
        await pipeline.close()

    app = web.Application(middlewares=[ztmw.audit_middleware(pipeline), ztmw.authentication_middleware(pipeline)])
    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/anything", handler)
    client = await aiohttp_client(app)
    anonymous = await client.get("/anything")
    assert await anonymous.json() == {"subject": None}
    authed = await client.get("/anything", headers={"Authorization": f"Bearer {issuer.mint('bob')}"})
    assert await authed.json() == {"subject": "bob"}
    bad = await client.get("/anything", headers={"Authorization": "Bearer bad.token.here"})
    assert bad.status == 401


async def test_handler_errors_keep_their_status_and_are_audited(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPConflict()

    app = web.Application()
    app.router.add_get("/items", handler)
    ztmw.setup(app, base_config(issuer), clock=clock)
    client = await aiohttp_client(app)
    with capture_logs() as events:
        response = await get(client, Authorization=f"Bearer {issuer.mint(scope='items:read')}")
    assert response.status == 409
    assert [e["status"] for e in events if e["event"] == "ztmw.decision"] == [409]


def test_library_never_configures_structlog() -> None:
    before = structlog.get_config()
    ztmw.load_config({"resource": {"identifier": AUDIENCE}})
    assert structlog.get_config() == before


async def test_stage_middlewares_build_the_view_once_and_vary_on_cert_header(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    from ztmw.testing import TestCA

    cert = TestCA().client_cert("client-a")
    config = base_config(issuer, verifiers={"enabled": ["bearer", "mtls"]},
                         mtls={"source": "header", "trusted_proxies": ["10.0.0.0/8"]})
    pipeline = ztmw.Pipeline(ztmw.load_config(config), clock=clock)

    app = staged_app(pipeline)
    client = await aiohttp_client(app)
    with capture_logs() as events:
        response = await get(client, Authorization=f"Bearer {issuer.mint(scope='items:read')}",
                             **{"Client-Cert": cert.rfc9440_header()})
    assert response.status == 200
    assert response.headers.getall("Vary") == ["Client-Cert"]
    assert [e["reason"] for e in events if e["event"] == "ztmw.security"] == ["untrusted_client_cert_header"]


async def test_proven_caller_rule_needs_a_certificate_or_a_bound_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    from ztmw.testing import TestCA

    cert = TestCA().client_cert("service-a")
    config = base_config(issuer, verifiers={"enabled": ["bearer", "mtls"]},
                         mtls={"source": "header", "trusted_proxies": ["127.0.0.1/32"]})
    config["rules"][1] = {**config["rules"][1], "proven_caller": True}
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    token = issuer.mint(scope="items:read")  # not bound to anything
    assert (await get(client, Authorization=f"Bearer {token}")).status == 403
    with_cert = await get(client, Authorization=f"Bearer {token}", **{"Client-Cert": cert.rfc9440_header()})
    assert with_cert.status == 200
    bound = issuer.mint(scope="items:read", cnf=cert.cnf)
    assert (await get(client, Authorization=f"Bearer {bound}",
                      **{"Client-Cert": cert.rfc9440_header()})).status == 200


async def test_no_rule_is_403_even_with_a_malformed_certificate_header(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "mtls"]},
                         mtls={"source": "header", "trusted_proxies": ["127.0.0.1/32"]})
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    assert (await get(client, "/admin", **{"Client-Cert": ":not base64:"})).status == 403
    assert (await get(client, "/items", **{"Client-Cert": ":not base64:"})).status == 400


async def test_no_credentials_body_names_no_rfc_error_code(client: Any) -> None:
    response = await get(client)
    assert response.status == 401
    assert await response.json() == {"error": "authentication_required"}


async def test_sec_04_http_08_query_token_never_authenticates(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint(scope="items:read")
    assert (await get(client, f"/items?access_token={token}")).status == 401
    assert (await get(client, f"/items?access_token={token}", Authorization=f"Bearer {token}")).status == 400


async def test_http_13_tokens_in_cookies_are_not_read(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint(scope="items:read")
    response = await get(client, Cookie=f"access_token={token}; Authorization=Bearer%20{token}")
    assert response.status == 401


async def test_mtls_13_responses_selected_by_a_forwarded_certificate_vary_on_it(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    from ztmw.testing import TestCA

    cert = TestCA().client_cert("client-a")
    config = base_config(issuer, verifiers={"enabled": ["bearer", "mtls"]},
                         mtls={"source": "header", "trusted_proxies": ["127.0.0.1/32"]})
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    bound = issuer.mint(scope="items:read", cnf=cert.cnf)
    for headers in ({"Authorization": f"Bearer {bound}", "Client-Cert": cert.rfc9440_header()},
                    {"Authorization": f"Bearer {bound}"}, {}):
        response = await get(client, **headers)
        assert "Client-Cert" in response.headers.getall("Vary", []), response.status


async def test_stage_middlewares_audit_security_refusals_and_cache_results(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    from ztmw.testing import DPoPKey

    pipeline = ztmw.Pipeline(ztmw.load_config(base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]})),
                             clock=clock)

    app = staged_app(pipeline)
    client = await aiohttp_client(app)
    bound = issuer.mint(scope="items:read", cnf={"jkt": DPoPKey().thumbprint})
    plain = issuer.mint(scope="items:read")
    with capture_logs() as events:
        assert (await get(client, Authorization=f"Bearer {bound}")).status == 401  # downgrade
        assert (await get(client, Authorization=f"Bearer {plain}")).status == 200
    audited = [(e["event"], e["reason"], e.get("cache")) for e in events if e["event"].startswith("ztmw.")]
    # the downgrade is refused after the token check itself: its cache result is recorded too
    assert audited == [("ztmw.security", "dpop_bound_token_as_bearer", "miss"),
                       ("ztmw.decision", "allowed", "miss")]


# -- the cache result a refusal after the token check records --------------------------------------------

async def test_a_reused_refusal_instance_carries_each_request_s_own_cache_result(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binding plugin that raises one module-level exception for every refusal: `cache` is set afresh by the
    authenticator each time, and a refusal that comes before the token check records no cache result."""
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]})
    client, pipeline = await protected(aiohttp_client, config, clock)
    shared_refusal = InvalidDPoPProof("invalid_dpop_proof")

    async def confirm(*args: Any, **kwargs: Any) -> str:
        raise shared_refusal

    monkeypatch.setattr(pipeline.authenticator._bindings["jkt"], "confirm", confirm)
    token = issuer.mint(scope="items:read", cnf={"jkt": DPoPKey().thumbprint})
    with capture_logs() as logs:
        answers = [await call(client, None, Authorization=f"DPoP {token}", DPoP="x.y.z") for _ in range(3)]
        answers.append(await call(client, None, Authorization="DPoP a b"))  # malformed: before the token check
        answers.append(await call(client, None, Authorization=f"Bearer {token}"))  # downgrade, a hit
    assert [status for status, _ in answers] == [401, 401, 401, 400, 401]
    assert [e.get("cache") for e in decisions(logs)] == ["miss", "hit", "hit", None, "hit"]


async def test_a_negatively_cached_token_records_no_cache_result(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await protected(aiohttp_client, base_config(issuer), clock)
    forged = issuer.mint(scope="items:read")[:-4] + "AAAA"
    with capture_logs() as logs:
        assert [(await call(client, forged))[0] for _ in range(2)] == [401, 401]
    assert [e.get("cache") for e in decisions(logs)] == [None, None]


async def test_the_stage_middlewares_record_the_cache_result_of_a_refusal_too(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = ztmw.load_config(base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}))
    token = issuer.mint(scope="items:read", cnf={"jkt": DPoPKey().thumbprint})
    trails = []
    for app in (None, staged_app(ztmw.Pipeline(config, clock=clock))):
        if app is None:
            client, _ = await protected(aiohttp_client, base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}),
                                        clock)
        else:
            client = await aiohttp_client(app)
        with capture_logs() as logs:
            assert [(await call(client, token))[0] for _ in range(2)] == [401, 401]  # a DPoP token as Bearer
        trails.append([(e["reason"], e.get("cache")) for e in decisions(logs)])
    all_in_one, staged = trails
    assert all_in_one == [("dpop_bound_token_as_bearer", "miss"), ("dpop_bound_token_as_bearer", "hit")]
    assert staged == all_in_one


# -- the query-token check: any spelling of access_token beside the header, and only that --------------

@pytest.mark.parametrize("query", [
    "access_token=x", "access_tok%65n=x", "%61ccess_token=x", "access%5Ftoken=x", "access_token",
    "a=1&access_token=", "ACCESS=1&access_token=x&b=2",
])
async def test_http_06_any_spelling_of_the_access_token_parameter_beside_the_header_is_refused(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, query: str
) -> None:
    client, _ = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    for _ in range(2):  # warm: the header alone is remembered
        assert (await call(client, token))[0] == 200
    request = with_query(query, token)
    assert await raw(client, request) == 400


@pytest.mark.parametrize("query", [
    "access_token%00=x", "access_token+=x", "%2Baccess_token=x", "a=1;access_token=x", "x=access_token",
    "access%20token=x",
])
async def test_names_that_only_resemble_access_token_are_not_a_second_transport(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, query: str
) -> None:
    """Neither ztmw nor a handler reading request.query sees an `access_token` parameter in these."""
    seen: list[bool] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append("access_token" in request.query)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/items", handler)
    client, _ = await protected(aiohttp_client, base_config(issuer), clock, app)
    token = issuer.mint(scope="items:read")
    request = with_query(query, token)
    assert await raw(client, request) == 200
    assert seen == [False]


BEARER_ONLY = {"Bearer": {"realm": "api", "resource_metadata": METADATA_URL}}


# -- RESP-19: CORS exposure of the challenge headers ---------------------------------------------------------

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


def test_replays_write_the_request_keys_into_aiohttps_own_request_storage() -> None:
    """Replays and full decisions write PRINCIPAL, TRUST and DECISION into `request._state`; this aiohttp still
    keeps its storage there (the fast path, not the fallback, is in use) and `request[key]` reads them back."""
    from aiohttp.test_utils import make_mocked_request

    from ztmw.middleware import _STORAGE, DECISION, PRINCIPAL, TRUST, _publish
    from ztmw.models import ANONYMOUS_TRUST, Decision
    from ztmw.pipeline import Outcome

    request = make_mocked_request("GET", "/")
    outcome = Outcome(Decision(True, "public", "health", 200))
    _publish(request, outcome)
    assert _STORAGE and set(request._state) == {PRINCIPAL, TRUST, DECISION}
    assert (request[PRINCIPAL], request[TRUST], request[DECISION]) == (None, ANONYMOUS_TRUST, outcome.decision)
