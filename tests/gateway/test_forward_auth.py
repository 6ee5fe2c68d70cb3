"""Forward-auth mode: each request to the gateway is a question about an original request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from ztmw import ConfigurationError, load_config
from ztmw.gateway import JWKS_PATH, create_gateway_app
from ztmw.models import AuditEvent
from ztmw.testing import DevIssuer, DPoPKey, challenges

from ..conftest import AUDIENCE
from .conftest import gateway_config

FORWARD = {"mode": "forward-auth"}


class Sink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None:
        raise AssertionError("the gateway never replays a memo entry")


async def gateway(aiohttp_client: AiohttpClient, issuer: DevIssuer, settings: dict[str, Any] | None = None,
                  sink: Sink | None = None, **sections: Any) -> Any:
    app = create_gateway_app(gateway_config(issuer, settings or FORWARD, **sections), clock=issuer.clock,
                             audit_sink=sink)
    return await aiohttp_client(app)


def ask(method: str, uri: str, token: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **extra}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def test_allowed_question_is_200_with_identity_headers(aiohttp_client: AiohttpClient, issuer: DevIssuer,
                                                           signing_key: Path) -> None:
    client = await gateway(aiohttp_client, issuer, {**FORWARD, "signing_key": str(signing_key),
                                                    "assertion_audience": "https://upstream.internal"})
    token = issuer.mint("alice", scope="items:read", client_id="app-1")
    response = await client.get("/auth", headers=ask("GET", "/items?page=2", token))
    assert response.status == 200
    assert await response.read() == b""
    assert response.headers["X-Ztmw-Subject"] == "alice"
    assert response.headers["X-Ztmw-Client-Id"] == "app-1"
    assert response.headers["X-Ztmw-Aal"] == "0"
    assert response.headers["X-Ztmw-Ial"] == "0"
    assert response.headers["X-Ztmw-Binding"] == "bearer"
    assert response.headers["X-Ztmw-Rule"] == "read"
    assert response.headers["X-Ztmw-Identity"].count(".") == 2


async def test_the_question_method_and_path_do_not_matter(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    """Traefik asks with GET on its configured address, Envoy with the original method under a prefix."""
    client = await gateway(aiohttp_client, issuer)
    token = issuer.mint(scope="items:write")
    response = await client.get("/", headers=ask("POST", "/items", token))
    assert response.status == 200
    assert (await client.put("/ext_authz/items", headers=ask("GET", "/items", token))).status == 403


async def test_no_credentials_is_401_with_bare_challenges(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    response = await client.get("/auth", headers=ask("GET", "/items"))
    assert response.status == 401
    found = challenges(response)
    assert found["Bearer"] == {"realm": "api", "resource_metadata":
                               "https://api.example.com/.well-known/oauth-protected-resource"}
    assert "error" not in found["DPoP"]
    assert "X-Ztmw-Subject" not in response.headers


async def test_invalid_token_is_401_invalid_token(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    token = issuer.mint(scope="items:read", audience="https://other.example.com")
    response = await client.get("/auth", headers=ask("GET", "/items", token))
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "invalid_token"


async def test_missing_scope_is_403_insufficient_scope(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    response = await client.get("/auth", headers=ask("POST", "/items", issuer.mint(scope="items:read")))
    assert response.status == 403
    assert challenges(response)["Bearer"]["error"] == "insufficient_scope"
    assert challenges(response)["Bearer"]["scope"] == "items:write"


@pytest.mark.parametrize("method, uri", [("GET", "/nowhere"), ("DELETE", "/items"), ("GET", "/items/"),
                                         ("GET", "/users/alice/items/extra")])
async def test_a_request_no_rule_covers_is_403_even_without_credentials(
        aiohttp_client: AiohttpClient, issuer: DevIssuer, method: str, uri: str) -> None:
    client = await gateway(aiohttp_client, issuer)
    response = await client.get("/auth", headers=ask(method, uri))
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers


async def test_public_rule_allows_without_credentials(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    response = await client.get("/auth", headers=ask("HEAD", "/health"))  # GET also covers HEAD
    assert response.status == 200
    assert response.headers["X-Ztmw-Rule"] == "health"
    assert "X-Ztmw-Subject" not in response.headers


async def test_owner_rule_reads_the_original_path(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    token = issuer.mint("alice", scope="items:read")
    assert (await client.get("/a", headers=ask("GET", "/users/alice/items", token))).status == 200
    assert (await client.get("/a", headers=ask("GET", "/users/bob/items", token))).status == 403
    # percent-encoded spelling of the same name decodes as aiohttp's router would
    assert (await client.get("/a", headers=ask("GET", "/users/%61lice/items", token))).status == 200


async def test_step_up_challenge_is_synthesised(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    response = await client.get("/a", headers=ask("GET", "/admin", issuer.mint(acr="urn:example:acr:pwd")))
    assert response.status == 401
    bearer = challenges(response)["Bearer"]
    assert bearer["error"] == "insufficient_user_authentication"
    assert bearer["acr_values"] == "urn:example:acr:mfa"
    response = await client.get("/a", headers=ask("GET", "/admin", issuer.mint(acr="urn:example:acr:mfa")))
    assert response.status == 200
    assert response.headers["X-Ztmw-Aal"] == "2"


@pytest.mark.parametrize("uri", ["/users/../admin", "/users/%2e%2e/admin", "/items%2Fx", "//items", "items",
                                 "/items#frag", "/it%ems", "/items\\x", "http://evil/items", "/users/%ff/items"])
async def test_an_ambiguous_target_is_400(aiohttp_client: AiohttpClient, issuer: DevIssuer, uri: str) -> None:
    client = await gateway(aiohttp_client, issuer)
    response = await client.get("/a", headers=ask("GET", uri, issuer.mint(scope="items:read")))
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_a_trusted_question_without_the_forwarded_headers_is_400(
        aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    token = issuer.mint(scope="items:read")
    assert (await client.get("/a", headers={"Authorization": f"Bearer {token}"})).status == 400
    assert (await client.get("/a", headers={"X-Forwarded-Uri": "/items"})).status == 400
    doubled = [("X-Forwarded-Method", "GET"), ("X-Forwarded-Method", "POST"), ("X-Forwarded-Uri", "/items")]
    assert (await client.get("/a", headers=doubled)).status == 400


async def test_an_untrusted_peer_gets_403_and_a_security_event(aiohttp_client: AiohttpClient,
                                                               issuer: DevIssuer) -> None:
    sink = Sink()
    client = await gateway(aiohttp_client, issuer, {**FORWARD, "trusted_proxies": ["10.0.0.0/8"]}, sink=sink)
    with capture_logs() as logs:
        response = await client.get("/a", headers=ask("GET", "/health"))
    assert response.status == 403
    assert [e["reason"] for e in logs if e["event"] == "ztmw.security"] == ["untrusted_forward_auth_peer"]
    assert [(e.decision, e.reason, e.status, e.security) for e in sink.events] == [
        ("deny", "untrusted_peer", 403, True)]


async def test_configured_header_names_are_read(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer, {**FORWARD, "method_header": "X-Original-Method",
                                                    "uri_header": "X-Original-URI"})
    headers = {"X-Original-Method": "GET", "X-Original-URI": "/items",
               "Authorization": f"Bearer {issuer.mint(scope='items:read')}"}
    assert (await client.get("/a", headers=headers)).status == 200
    assert (await client.get("/a", headers=ask("GET", "/items"))).status == 400


async def test_dpop_htu_is_the_public_origin_and_original_path(aiohttp_client: AiohttpClient,
                                                               issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    key = DPoPKey()
    token = issuer.mint(cnf={"jkt": key.thumbprint})
    good = key.proof("POST", "https://api.example.com/payments", access_token=token)
    headers = ask("POST", "/payments?ref=1", None, Authorization=f"DPoP {token}", DPoP=good)
    response = await client.get("/a", headers=headers)
    assert response.status == 200
    assert response.headers["X-Ztmw-Binding"] == "dpop"
    # a proof for the gateway's own URL (where the question went) is not a proof for the original request
    own = key.proof("POST", f"http://127.0.0.1:{client.port}/a", access_token=token)
    response = await client.get("/a", headers=ask("POST", "/payments", None, Authorization=f"DPoP {token}", DPoP=own))
    assert response.status == 401
    assert challenges(response)["DPoP"]["error"] == "invalid_dpop_proof"


async def test_dpop_bound_token_as_bearer_is_rejected_through_the_gateway(
        aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    token = issuer.mint(scope="items:read", cnf={"jkt": DPoPKey().thumbprint})
    response = await client.get("/a", headers=ask("GET", "/items", token))
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "invalid_token"


async def test_nonce_refusal_carries_nonce_and_no_store(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer, dpop={"require_nonce": True})
    key = DPoPKey()
    token = issuer.mint(cnf={"jkt": key.thumbprint})
    proof = key.proof("POST", "https://api.example.com/payments", access_token=token)
    response = await client.get("/a", headers=ask("POST", "/payments", None, Authorization=f"DPoP {token}",
                                                  DPoP=proof))
    assert response.status == 401
    assert challenges(response)["DPoP"]["error"] == "use_dpop_nonce"
    assert len(response.headers.getall("DPoP-Nonce")) == 1
    assert response.headers["Cache-Control"] == "no-store"


async def test_one_audit_event_per_question(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    sink = Sink()
    client = await gateway(aiohttp_client, issuer, sink=sink)
    token = issuer.mint("alice", scope="items:read")
    await client.get("/a", headers=ask("GET", "/items", token))
    await client.get("/a", headers=ask("POST", "/items", token))
    await client.get("/a", headers=ask("GET", "/nowhere"))
    await client.get("/a", headers=ask("GET", "/../x"))
    assert [(e.decision, e.status, e.route, e.rule_id) for e in sink.events] == [
        ("allow", 200, "/items", "read"), ("deny", 403, "/items", "write"), ("deny", 403, None, None),
        ("deny", 400, None, None)]
    assert all(token not in json.dumps(e.__repr__()) for e in sink.events)


async def test_header_values_cannot_be_split_by_claims(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer)
    token = issuer.mint("eve\r\nX-Ztmw-Subject: admin", scope="items:read", client_id="caf\u00e9%")
    response = await client.get("/a", headers=ask("GET", "/items", token))
    assert response.status == 200
    assert response.headers.getall("X-Ztmw-Subject") == ["eve%0D%0AX-Ztmw-Subject: admin"]
    assert response.headers["X-Ztmw-Client-Id"] == "caf%C3%A9%25"


async def test_gateway_serves_metadata_and_its_key_set(aiohttp_client: AiohttpClient, issuer: DevIssuer,
                                                       signing_key: Path) -> None:
    client = await gateway(aiohttp_client, issuer, {**FORWARD, "signing_key": str(signing_key),
                                                    "assertion_audience": "https://upstream.internal"})
    metadata = await (await client.get("/.well-known/oauth-protected-resource")).json()
    assert metadata["resource"] == AUDIENCE
    keys = (await (await client.get(JWKS_PATH)).json())["keys"]
    assert len(keys) == 1 and "d" not in keys[0] and keys[0]["alg"] == "ES256"


def test_forward_auth_with_a_signing_key_needs_an_audience(issuer: DevIssuer, signing_key: Path) -> None:
    with pytest.raises(ConfigurationError, match="assertion_audience"):
        load_config(gateway_config(issuer, {**FORWARD, "signing_key": str(signing_key)}))


def test_rules_differing_only_in_regex_are_refused(issuer: DevIssuer) -> None:
    rules = [{"id": "a", "path": "/u/{id:\\d+}", "public": True}, {"id": "b", "path": "/u/{id:[a-z]+}"}]
    with pytest.raises(ConfigurationError, match="differ only"):
        create_gateway_app(gateway_config(issuer, FORWARD, rules=rules))


async def test_challenges_can_be_combined_in_one_line(aiohttp_client: AiohttpClient, issuer: DevIssuer) -> None:
    client = await gateway(aiohttp_client, issuer, {**FORWARD, "combine_challenges": True})
    response = await client.get("/a", headers=ask("GET", "/items"))
    assert response.status == 401
    [line] = response.headers.getall("WWW-Authenticate")
    assert line.startswith('Bearer realm="api", resource_metadata=') and ', DPoP algs="' in line
