"""The mission's policies end to end: trust axes, subject vs caller, and one person behind several logins.

"Payments need a bound token, AAL 2 and a login in the last five minutes"; "profile changes need IAL 3".
A table of logins (password, password + OTP, hardware key, bank ID eID with biometrics, social login) meets
both routes on a real server; each answer is checked on the wire and in its audit event (aal, ial,
failed_requirement). Then the caller: client-credentials tokens, allowed clients, delegation (`act`). Then
identity linking through the config resolver and the Redis resolver (real Redis, database 15), including
Redis going away (503, fail closed).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs
from ztmw_plugins.redis_identity import link

import ztmw
from ztmw.audit import hash_subject
from ztmw.testing import DevIssuer, DPoPKey, FakeClock
from ztmw.testing.http import challenges, free_port

from .conftest import AUDIENCE, METADATA_URL, base_config

pytestmark = pytest.mark.usefixtures("decision_path")  # decided without awaiting, and in full


ALGS = "ES256 EdDSA PS256"
BANKID = "urn:example:acr:bankid"   # bank ID: eID with biometrics, the person is verified
SOCIAL = "urn:example:acr:social"   # a social login: anyone can open the account
TRUST = {
    "acr": {BANKID: {"aal": 2, "ial": 3}, SOCIAL: {"aal": 1, "ial": 1}},
    "amr": {"pwd": {"aal": 1}, "otp": {"aal": 2}, "hwk": {"aal": 3}},  # strength, never assurance
}
RULES = [
    {"id": "payments", "path": "/payments", "methods": ["POST"], "scopes": ["payments:write"],
     "binding": "required", "min_aal": 2, "max_auth_age": 300},
    {"id": "profile", "path": "/profile", "methods": ["PUT"], "scopes": ["profile:write"], "min_ial": 3},
    {"id": "own-items", "path": "/users/{user}/items", "methods": ["GET"], "scopes": ["items:read"],
     "owner": "user"},
    {"id": "items", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]},
    {"id": "reports", "path": "/reports", "methods": ["GET"], "subject_type": "user"},
    {"id": "jobs", "path": "/jobs", "methods": ["GET"], "subject_type": "client"},
    {"id": "mobile", "path": "/mobile", "methods": ["GET"], "clients": ["mobile-app", "web-app"]},
    {"id": "self-only", "path": "/self-only", "methods": ["GET"], "allow_delegation": False},
    {"id": "delegable", "path": "/delegable", "methods": ["GET"]},
    {"id": "health", "path": "/health", "methods": ["GET"], "public": True},
]


async def _whoami(request: web.Request) -> web.Response:
    principal = request[ztmw.PRINCIPAL]
    trust = request[ztmw.TRUST]
    return web.json_response({
        "subject": principal.subject if principal else None,
        "raw_subject": principal.raw_subject if principal else None,
        "aal": trust.aal, "ial": trust.ial, "binding": trust.binding,
    })


@dataclass
class Api:
    client: Any
    origin: str
    clock: FakeClock
    audit: dict[str, Any] | None = None

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
        with capture_logs() as events:
            response = await self.client.request(method, path, headers=headers or {})
            await response.read()
        decisions = [e for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]
        assert len(decisions) == 1, "one audit event per request"
        self.audit = decisions[0]
        return response

    async def bearer(self, method: str, path: str, token: str) -> Any:
        return await self.request(method, path, {"Authorization": f"Bearer {token}"})

    async def dpop(self, method: str, path: str, token: str, key: DPoPKey) -> Any:
        proof = key.proof(method, self.origin + path, access_token=token, iat=int(self.clock()))
        return await self.request(method, path, {"Authorization": f"DPoP {token}", "DPoP": proof})


async def start(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, **sections: Any) -> Api:
    clock.now = float(int(clock.now))
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}, trust=TRUST, rules=RULES)
    config["resource"]["public_origin"] = origin
    config.update(sections)
    app = web.Application()
    app.router.add_post("/payments", _whoami)
    app.router.add_put("/profile", _whoami)
    for path in ("/users/{user}/items", "/items", "/reports", "/jobs", "/mobile", "/self-only", "/delegable",
                 "/health"):
        app.router.add_get(path, _whoami)
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    return Api(client, origin, clock)


@pytest.fixture
async def api(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> Api:
    return await start(aiohttp_client, issuer, clock)


# -- the trust table -----------------------------------------------------------------------------------------

LOGINS: dict[str, dict[str, Any]] = {
    "password only": {"amr": ["pwd"]},
    "password + OTP": {"amr": ["pwd", "otp"]},
    "hardware key": {"amr": ["hwk"]},
    "bank ID (eID + biometrics)": {"acr": BANKID, "amr": ["face", "hwk"]},
    "social login": {"acr": SOCIAL},
}
LEVELS = {"password only": (1, 0), "password + OTP": (2, 0), "hardware key": (3, 0),
          "bank ID (eID + biometrics)": (3, 3), "social login": (1, 1)}
PAY_STEP_UP = f"acr_values={BANKID} max_age=300"
PROFILE_STEP_UP = f"acr_values={BANKID}"
# login -> (payments with a fresh DPoP-bound token, profile change): status, failed_requirement
TABLE = {
    "password only": ((401, PAY_STEP_UP), (401, PROFILE_STEP_UP)),
    "password + OTP": ((200, None), (401, PROFILE_STEP_UP)),
    "hardware key": ((200, None), (401, PROFILE_STEP_UP)),  # strength is not assurance
    "bank ID (eID + biometrics)": ((200, None), (200, None)),
    "social login": ((401, PAY_STEP_UP), (401, PROFILE_STEP_UP)),
}


def step_up_params(requirement: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in requirement.split(" "))


def check_audit(api: Api, login: str, status: int, requirement: str | None) -> None:
    event = api.audit or {}
    assert (event["aal"], event["ial"]) == LEVELS[login]
    assert event["status"] == status
    assert event["decision"] == ("allow" if status == 200 else "deny")
    assert event.get("failed_requirement") == requirement
    assert "token" not in event and not any("eyJ" in str(v) for v in event.values())


@pytest.mark.parametrize("login", list(TABLE))
async def test_payments_need_a_bound_token_aal2_and_a_fresh_login(
    api: Api, issuer: DevIssuer, login: str
) -> None:
    key = DPoPKey()
    (status, requirement), _ = TABLE[login]
    token = issuer.mint("alice", scope="payments:write", auth_time=int(api.clock()) - 60,
                        cnf={"jkt": key.thumbprint}, **LOGINS[login])
    response = await api.dpop("POST", "/payments", token, key)
    assert response.status == status
    check_audit(api, login, status, requirement)
    if status == 200:
        assert (await response.json())["binding"] == "dpop"
    else:  # on the DPoP scheme the token came with (STEP-12)
        assert challenges(response)["DPoP"] == {
            "algs": ALGS, "error": "insufficient_user_authentication",
            "error_description": "A different authentication level is required",
            **step_up_params(requirement or ""), "resource_metadata": METADATA_URL}


@pytest.mark.parametrize("login", list(TABLE))
async def test_profile_changes_need_ial3(api: Api, issuer: DevIssuer, login: str) -> None:
    _, (status, requirement) = TABLE[login]
    token = issuer.mint("alice", scope="profile:write", auth_time=int(api.clock()) - 60, **LOGINS[login])
    response = await api.bearer("PUT", "/profile", token)
    assert response.status == status
    check_audit(api, login, status, requirement)
    if status != 200:
        bearer = challenges(response)["Bearer"]
        assert (bearer["error"], bearer["acr_values"]) == ("insufficient_user_authentication", BANKID)
        assert "max_age" not in bearer


@pytest.mark.parametrize("login", ["password + OTP", "bank ID (eID + biometrics)"])
async def test_payments_refuse_an_unbound_token_whatever_the_login(
    api: Api, issuer: DevIssuer, login: str
) -> None:
    token = issuer.mint("alice", scope="payments:write", auth_time=int(api.clock()) - 60, **LOGINS[login])
    response = await api.bearer("POST", "/payments", token)
    assert response.status == 401
    parsed = challenges(response)
    assert parsed["Bearer"]["error"] == "invalid_token"
    assert parsed["DPoP"] == {"algs": ALGS, "resource_metadata": METADATA_URL}  # DPoP would satisfy the route
    assert (api.audit or {})["reason"] == "binding_required"
    assert (api.audit or {})["aal"] == LEVELS[login][0]


@pytest.mark.parametrize(("age", "status"), [(300, 200), (301, 401), (None, 401)])
async def test_payments_need_a_login_in_the_last_five_minutes(
    api: Api, issuer: DevIssuer, age: int | None, status: int
) -> None:
    key = DPoPKey()
    auth_time = None if age is None else int(api.clock()) - age
    token = issuer.mint("alice", scope="payments:write", amr=["pwd", "otp"], auth_time=auth_time,
                        cnf={"jkt": key.thumbprint})
    response = await api.dpop("POST", "/payments", token, key)
    assert response.status == status
    if status == 401:
        assert challenges(response)["DPoP"]["max_age"] == "300"
        assert "acr_values" not in challenges(response)["DPoP"]  # the level is fine, only the age is not
        assert (api.audit or {})["failed_requirement"] == "max_age=300"
        assert (api.audit or {})["reason"] == "auth_too_old"


async def test_payments_missing_scope_is_403(api: Api, issuer: DevIssuer) -> None:
    key = DPoPKey()
    token = issuer.mint("alice", scope="items:read", amr=["hwk"], auth_time=int(api.clock()),
                        cnf={"jkt": key.thumbprint})
    response = await api.dpop("POST", "/payments", token, key)
    assert response.status == 403
    assert challenges(response)["DPoP"]["error"] == "insufficient_scope"
    assert (api.audit or {})["failed_requirement"] == "scope=payments:write"


# -- subject vs caller ---------------------------------------------------------------------------------------

async def test_client_credentials_token_is_refused_on_user_routes(api: Api, issuer: DevIssuer) -> None:
    machine = issuer.mint("svc-reporting", client_id="svc-reporting")
    response = await api.bearer("GET", "/reports", machine)
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers
    assert (api.audit or {})["reason"] == "user_required"
    user = issuer.mint("alice", client_id="svc-reporting")  # the same client acting for a user
    assert (await api.bearer("GET", "/reports", user)).status == 200


async def test_client_credentials_token_is_accepted_on_client_routes(api: Api, issuer: DevIssuer) -> None:
    machine = issuer.mint("svc-reporting", client_id="svc-reporting")
    response = await api.bearer("GET", "/jobs", machine)
    assert response.status == 200
    assert (await response.json())["subject"] == "svc-reporting"
    user = await api.bearer("GET", "/jobs", issuer.mint("alice", client_id="svc-reporting"))
    assert user.status == 403
    assert (api.audit or {})["reason"] == "client_required"


async def test_token_without_client_id_is_never_a_client_token(api: Api, issuer: DevIssuer) -> None:
    token = issuer.mint("svc-reporting", drop=["client_id"])
    assert (await api.bearer("GET", "/jobs", token)).status in (401, 403)
    assert (api.audit or {})["decision"] == "deny"


@pytest.mark.parametrize(("client_id", "status"), [
    ("mobile-app", 200), ("web-app", 200), ("demo-client", 403), ("Mobile-App", 403), ("mobile-app ", 403),
])
async def test_clients_lists_the_callers_allowed(
    api: Api, issuer: DevIssuer, client_id: str, status: int
) -> None:
    response = await api.bearer("GET", "/mobile", issuer.mint("alice", client_id=client_id))
    assert response.status == status
    if status == 403:
        assert (api.audit or {})["reason"] == "client_not_allowed"
        assert (api.audit or {})["client_id"] == client_id


async def test_allow_delegation_false_refuses_an_act_claim(api: Api, issuer: DevIssuer) -> None:
    act = {"sub": "https://agent.example.com", "client_id": "agent"}  # RFC 8693 §4.1: agent acts for alice
    delegated = issuer.mint("alice", claims={"act": act})
    response = await api.bearer("GET", "/self-only", delegated)
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers
    assert (api.audit or {})["reason"] == "delegation_not_allowed"
    assert (await api.bearer("GET", "/delegable", delegated)).status == 200  # the default allows it
    assert (await api.bearer("GET", "/self-only", issuer.mint("alice"))).status == 200


@pytest.mark.parametrize("act", ["agent", ["agent"], 1])
async def test_malformed_act_claim_is_invalid_token(api: Api, issuer: DevIssuer, act: Any) -> None:
    response = await api.bearer("GET", "/delegable", issuer.mint("alice", claims={"act": act}))
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "invalid_token"


# -- one person, several logins: the config resolver --------------------------------------------------------

@pytest.fixture
async def social(clock: FakeClock) -> AsyncIterator[DevIssuer]:
    async with DevIssuer(audience=AUDIENCE, clock=clock) as second:
        yield second


def with_second_issuer(issuer: DevIssuer, second: DevIssuer) -> list[dict[str, Any]]:
    return [issuer.issuer_config(audiences=[AUDIENCE]), second.issuer_config(audiences=[AUDIENCE])]


async def assert_john_owns_johns_items(api: Api, issuer: DevIssuer, social: DevIssuer) -> None:
    john_bank = issuer.mint("19800101-1234", scope="items:read")
    john_social = social.mint("google|42", scope="items:read")
    for token in (john_bank, john_social):
        response = await api.bearer("GET", "/users/john/items", token)
        assert response.status == 200
        assert (await response.json())["subject"] == "john"
        assert (api.audit or {})["subject"] == hash_subject("john")  # one pseudonym whichever login
    jane = social.mint("google|43", scope="items:read")
    stranger = social.mint("google|99", scope="items:read")
    same_sub_other_issuer = issuer.mint("google|42", scope="items:read")  # another person at the bank
    for token in (jane, stranger, same_sub_other_issuer):
        response = await api.bearer("GET", "/users/john/items", token)
        assert response.status == 403
        assert (api.audit or {})["reason"] == "not_owner"
    response = await api.bearer("GET", "/users/jane/items", jane)
    assert response.status == 200
    assert (await response.json()) == {"subject": "jane", "raw_subject": "google|43", "aal": 0, "ial": 0,
                                       "binding": None}
    assert (await api.bearer("GET", "/users/jane/items", john_bank)).status == 403


async def test_linked_logins_through_the_config_resolver(
    aiohttp_client: Any, issuer: DevIssuer, social: DevIssuer, clock: FakeClock
) -> None:
    links = [{"issuer": issuer.issuer, "subject": "19800101-1234", "account": "john"},
             {"issuer": social.issuer, "subject": "google|42", "account": "john"},
             {"issuer": social.issuer, "subject": "google|43", "account": "jane"}]
    api = await start(aiohttp_client, issuer, clock, issuers=with_second_issuer(issuer, social),
                      identity={"links": links})
    await assert_john_owns_johns_items(api, issuer, social)


async def test_an_unlinked_sub_equal_to_an_account_id_does_not_own_it_when_links_are_required(
    aiohttp_client: Any, issuer: DevIssuer, social: DevIssuer, clock: FakeClock
) -> None:
    # account ids and raw subs share one namespace unless owner rules require a linked account
    links = [{"issuer": issuer.issuer, "subject": "19800101-1234", "account": "john"}]
    api = await start(aiohttp_client, issuer, clock, issuers=with_second_issuer(issuer, social),
                      identity={"links": links, "owner_requires_link": True})
    impostor = social.mint("john", scope="items:read")  # someone registered "john" at the social IdP
    assert (await api.bearer("GET", "/users/john/items", impostor)).status == 403
    john = issuer.mint("19800101-1234", scope="items:read")
    assert (await api.bearer("GET", "/users/john/items", john)).status == 200


async def test_with_two_issuers_owner_rules_require_a_link_by_default(
    aiohttp_client: Any, issuer: DevIssuer, social: DevIssuer, clock: FakeClock
) -> None:
    links = [{"issuer": issuer.issuer, "subject": "19800101-1234", "account": "john"}]
    impostor = social.mint("john", scope="items:read")  # the social IdP's "john" is not the bank's account john
    api = await start(aiohttp_client, issuer, clock, issuers=with_second_issuer(issuer, social),
                      identity={"links": links})
    assert (await api.bearer("GET", "/users/john/items", impostor)).status == 403
    assert (api.audit or {})["reason"] == "not_owner"
    assert (await api.bearer("GET", "/users/john/items", issuer.mint("19800101-1234", scope="items:read"))).status == 200
    # an operator who knows both issuers share one namespace of subjects can say so
    trusting = await start(aiohttp_client, issuer, clock, issuers=with_second_issuer(issuer, social),
                           identity={"links": links, "owner_requires_link": False})
    assert (await trusting.bearer("GET", "/users/john/items", impostor)).status == 200


# -- the Redis resolver --------------------------------------------------------------------------------------

@pytest.fixture
async def redis_links(redis_url: str) -> AsyncIterator[tuple[Any, str]]:
    prefix = f"ztmw:test:trust:{secrets.token_hex(6)}:"
    client = aioredis.from_url(redis_url)
    try:
        yield client, prefix
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.mark.redis
async def test_linked_logins_through_the_redis_resolver(
    aiohttp_client: Any, issuer: DevIssuer, social: DevIssuer, clock: FakeClock, redis_url: str,
    redis_links: tuple[Any, str]
) -> None:
    client, prefix = redis_links
    await link(client, issuer.issuer, "19800101-1234", "john", prefix=prefix)
    await link(client, social.issuer, "google|42", "john", prefix=prefix)
    await link(client, social.issuer, "google|43", "jane", prefix=prefix)
    api = await start(aiohttp_client, issuer, clock, issuers=with_second_issuer(issuer, social),
                      identity={"resolvers": ["redis"]},
                      plugins={"redis": {"url": redis_url, "prefix": prefix}})
    await assert_john_owns_johns_items(api, issuer, social)


@pytest.mark.redis
async def test_config_then_redis_resolvers(
    aiohttp_client: Any, issuer: DevIssuer, social: DevIssuer, clock: FakeClock, redis_url: str,
    redis_links: tuple[Any, str]
) -> None:
    client, prefix = redis_links
    await link(client, social.issuer, "google|42", "john", prefix=prefix)
    await link(client, social.issuer, "google|43", "jane", prefix=prefix)
    await link(client, issuer.issuer, "19800101-1234", "mallory", prefix=prefix)  # shadowed by config
    links = [{"issuer": issuer.issuer, "subject": "19800101-1234", "account": "john"}]
    api = await start(aiohttp_client, issuer, clock, issuers=with_second_issuer(issuer, social),
                      identity={"links": links, "resolvers": ["config", "redis"]},
                      plugins={"redis": {"url": redis_url, "prefix": prefix}})
    await assert_john_owns_johns_items(api, issuer, social)  # config answered first for the bank login


@pytest.mark.redis
async def test_a_link_removed_in_redis_takes_effect_on_the_next_request(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, redis_links: tuple[Any, str]
) -> None:
    client, prefix = redis_links
    await link(client, issuer.issuer, "google|42", "john", prefix=prefix)
    api = await start(aiohttp_client, issuer, clock, identity={"resolvers": ["redis"]},
                      plugins={"redis": {"url": redis_url, "prefix": prefix}})
    token = issuer.mint("google|42", scope="items:read")
    assert (await api.bearer("GET", "/users/john/items", token)).status == 200
    await client.delete(*[key async for key in client.scan_iter(match=prefix + "*")])
    # the verification cache holds the token, never the link: unlinking applies at once
    assert (await api.bearer("GET", "/users/john/items", token)).status == 403


@pytest.mark.parametrize("resolvers", [["redis"], ["config", "redis"]])
async def test_unreachable_redis_resolver_answers_503_never_200_or_500(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, resolvers: list[str]
) -> None:
    # needs no Redis at all: nothing listens on the port, which is the point
    url = f"redis://127.0.0.1:{free_port()}/15"
    links = [{"issuer": issuer.issuer, "subject": "someone-else", "account": "bob"}]
    api = await start(aiohttp_client, issuer, clock, identity={"links": links, "resolvers": resolvers},
                      plugins={"redis": {"url": url, "timeout": 0.5}})
    token = issuer.mint("google|42", scope="items:read")
    for path in ("/users/john/items", "/users/google|42/items", "/items"):
        response = await api.bearer("GET", path, token)
        assert response.status == 503, path
        assert "WWW-Authenticate" not in response.headers
        assert (api.audit or {})["reason"] == "identity_unavailable"
        assert (await response.json()) == {"error": "temporarily_unavailable"}
    assert (await api.request("GET", "/health")).status == 200  # no credentials: nothing to resolve
    if resolvers == ["config", "redis"]:  # a login the config resolver links never reaches Redis
        linked = issuer.mint("someone-else", scope="items:read")
        assert (await api.bearer("GET", "/users/bob/items", linked)).status == 200
