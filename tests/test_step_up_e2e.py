"""Step-up authentication end to end (RFC 9470, RFC 8176; checklist §9 STEP-01..12, AMR-01..04, VEC-9470-1).

`ztmw.setup` on a real loopback server with rules that use `min_aal`, `min_ial`, `acr_values` and
`max_auth_age`; tokens from the development issuer, DPoP proofs from `ztmw.testing.DPoPKey`, time from one
FakeClock. Every challenge is parsed back field by field (scheme, error, error_description, acr_values,
max_age, realm/algs, resource_metadata), and the audit event of each request says which check decided it, so
no test can pass for another reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import DevIssuer, DPoPKey, FakeClock
from ztmw.testing.http import challenges, free_port

from .conftest import AUDIENCE, METADATA_URL, base_config, introspection_endpoint

pytestmark = pytest.mark.usefixtures("decision_path")  # decided without awaiting, and in full


ALGS = "ES256 EdDSA PS256"
LEEWAY = 30  # the issuer's default clock-skew allowance

SOCIAL = "urn:example:acr:social"
BANKID = "urn:example:acr:bankid"
EID = "urn:example:acr:eid"
OTP_ACR = "urn:example:acr:otp"
ACRS = {  # configuration order is the order a step-up challenge lists them in (AMR-04)
    SOCIAL: {"aal": 1, "ial": 1},
    OTP_ACR: {"aal": 2},
    BANKID: {"aal": 2, "ial": 3},
    EID: {"aal": 3, "ial": 3},
}
AMRS = {"pwd": {"aal": 1}, "otp": {"aal": 2}, "hwk": {"aal": 3}, "face": {"ial": 2}}

RULES = [
    {"id": "acr", "path": "/acr", "methods": ["GET"], "acr_values": [BANKID, EID]},
    {"id": "aal2", "path": "/aal2", "methods": ["GET"], "min_aal": 2},
    {"id": "aal3", "path": "/aal3", "methods": ["GET"], "min_aal": 3},
    {"id": "ial3", "path": "/ial3", "methods": ["GET"], "min_ial": 3},
    {"id": "fresh", "path": "/fresh", "methods": ["GET"], "max_auth_age": 300},
    {"id": "now", "path": "/now", "methods": ["GET"], "max_auth_age": 0},
    {"id": "both", "path": "/both", "methods": ["GET"], "acr_values": [BANKID], "max_auth_age": 300},
    {"id": "strict", "path": "/strict", "methods": ["GET"], "acr_values": [BANKID], "min_aal": 3},
    {"id": "vec-acr", "path": "/vec-acr", "methods": ["GET"], "acr_values": ["myACR"]},
    {"id": "vec-age", "path": "/vec-age", "methods": ["GET"], "max_auth_age": 5},
    {"id": "scoped", "path": "/scoped", "methods": ["GET"], "scopes": ["pay"], "min_aal": 2},
]



async def _whoami(request: web.Request) -> web.Response:
    trust = request[ztmw.TRUST]
    return web.json_response({"aal": trust.aal, "ial": trust.ial, "acr": trust.acr,
                              "binding": trust.binding, "auth_age": trust.auth_age})


@dataclass
class Api:
    client: Any
    origin: str
    clock: FakeClock
    issuer: DevIssuer
    audit: dict[str, Any] | None = None

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        with capture_logs() as events:
            response = await self.client.get(path, headers=headers or {})
            await response.read()
        decisions = [e for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]
        assert len(decisions) == 1, "one audit event per request"
        self.audit = decisions[0]
        return response

    async def bearer(self, path: str, **claims: Any) -> Any:
        return await self.get(path, {"Authorization": f"Bearer {self.token(**claims)}"})

    def token(self, sub: str = "alice", *, age: float | None = 10, **claims: Any) -> str:
        """A token whose login happened `age` seconds ago (None: no auth_time claim)."""
        if age is not None:
            claims.setdefault("auth_time", int(self.clock() - age))
        return self.issuer.mint(sub, **claims)

    @property
    def reason(self) -> str:
        assert self.audit is not None
        return str(self.audit["reason"])


async def start(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, *, rules: list[dict[str, Any]],
                acrs: dict[str, Any] = ACRS) -> Api:
    clock.now = float(int(clock.now))  # whole seconds, so auth_time = now - age is exact
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]},
                         trust={"acr": acrs, "amr": AMRS})
    config["resource"]["public_origin"] = origin
    config["rules"] = rules
    app = web.Application()
    for rule in rules:
        app.router.add_get(rule["path"], _whoami)
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    return Api(client, origin, clock, issuer)


@pytest.fixture
async def api(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> AsyncIterator[Api]:
    yield await start(aiohttp_client, issuer, clock, rules=RULES)


LEVEL = "A different authentication level is required"
AGE = "More recent authentication is required"


def assert_step_up(response: Any, description: str = LEVEL, *, scheme: str = "Bearer", **params: str) -> None:
    """R-STEP on `scheme` with exactly `params` (acr_values / max_age); the other scheme stays bare."""
    assert response.status == 401  # STEP-05: 401, never 403
    parsed = challenges(response)
    carrier = {"realm": "api"} if scheme == "Bearer" else {"algs": ALGS}
    assert parsed[scheme] == {**carrier, "error": "insufficient_user_authentication",
                              "error_description": description, **params, "resource_metadata": METADATA_URL}
    other = "DPoP" if scheme == "Bearer" else "Bearer"
    bare = {"algs": ALGS} if other == "DPoP" else {"realm": "api"}
    assert parsed[other] == {**bare, "resource_metadata": METADATA_URL}
    if "max_age" in parsed[scheme]:  # STEP-03: always a non-negative integer
        assert re.fullmatch(r"0|[1-9][0-9]*", parsed[scheme]["max_age"])


def assert_invalid_token(response: Any) -> None:
    assert response.status == 401
    parsed = challenges(response)
    assert parsed["Bearer"]["error"] == "invalid_token"
    for params in parsed.values():  # STEP-08: an invalid token learns nothing about the route's requirements
        assert "acr_values" not in params and "max_age" not in params


# -- STEP-01..05: the challenge ------------------------------------------------------------------------------

async def test_step_01_weak_login_gets_insufficient_user_authentication(api: Api) -> None:
    response = await api.bearer("/aal2", amr=["pwd"])
    assert_step_up(response, acr_values=f"{OTP_ACR} {BANKID} {EID}")
    assert api.reason == "insufficient_user_authentication"
    assert (api.audit or {})["aal"] == 1
    assert (await api.bearer("/aal2", amr=["pwd", "otp"])).status == 200  # control


async def test_step_02_acr_values_in_order_of_preference(api: Api) -> None:
    response = await api.bearer("/acr", acr=SOCIAL)
    assert_step_up(response, acr_values=f"{BANKID} {EID}")  # the rule's order, space-separated
    for acr in (BANKID, EID):  # one of them is required, any one will do
        assert (await api.bearer("/acr", acr=acr)).status == 200


async def test_step_03_max_age_is_a_non_negative_integer(api: Api) -> None:
    assert_step_up(await api.bearer("/fresh", age=301), AGE, max_age="300")
    assert api.reason == "auth_too_old"
    assert_step_up(await api.bearer("/now", age=1), AGE, max_age="0")
    assert (await api.bearer("/now", age=0)).status == 200


async def test_step_04_acr_values_and_max_age_together(api: Api) -> None:
    assert_step_up(await api.bearer("/both", acr=SOCIAL), acr_values=BANKID, max_age="300")
    # the level is right, only the login is old: max_age alone
    assert_step_up(await api.bearer("/both", acr=BANKID, age=400), AGE, max_age="300")
    assert (await api.bearer("/both", acr=BANKID, age=100)).status == 200


async def test_step_04_missing_scope_is_answered_first_with_403(api: Api) -> None:
    # POLICY: the scope check precedes step-up, so a client is not sent to log in again for a token that
    # could never be enough; RFC 9470's optional `scope` on a step-up challenge is therefore never needed
    response = await api.bearer("/scoped", amr=["pwd"], scope="other")
    assert response.status == 403
    assert challenges(response)["Bearer"]["error"] == "insufficient_scope"
    response = await api.bearer("/scoped", amr=["pwd"], scope="pay")
    assert_step_up(response, acr_values=f"{OTP_ACR} {BANKID} {EID}")


@pytest.mark.parametrize("path", ["/acr", "/aal2", "/aal3", "/ial3", "/fresh", "/both", "/strict"])
async def test_step_05_step_up_is_401_not_403(api: Api, path: str) -> None:
    response = await api.bearer(path, age=None)
    assert response.status == 401
    assert challenges(response)["Bearer"]["error"] == "insufficient_user_authentication"


# -- STEP-06/07: where acr and auth_time come from -----------------------------------------------------------

async def test_step_06_jwt_acr_and_auth_time_are_used(api: Api) -> None:
    response = await api.bearer("/both", acr=BANKID, age=42)
    assert response.status == 200
    assert await response.json() == {"aal": 2, "ial": 3, "acr": BANKID, "binding": None, "auth_age": 42}


async def test_step_07_introspection_acr_and_auth_time_are_used(
    aiohttp_client: Any, aiohttp_server: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: Any
) -> None:
    answers, settings = await introspection_endpoint(aiohttp_server, monkeypatch, "ZTMW_TEST_STEP_UP_INTROSPECTION")
    config = base_config(issuer, verifiers={"enabled": ["bearer", "introspection"]},
                         trust={"acr": ACRS, "amr": AMRS})
    config["rules"] = [r for r in RULES if r["id"] in ("both", "aal3")]
    config["plugins"] = {"introspection": settings}
    app = web.Application()
    app.router.add_get("/both", _whoami)
    app.router.add_get("/aal3", _whoami)
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    now = int(clock())
    base = {"active": True, "sub": "alice", "aud": AUDIENCE, "iss": "https://opaque.example.com",
            "exp": now + 300}
    answers["fresh-bankid"] = {**base, "acr": BANKID, "auth_time": now - 60}
    answers["old-bankid"] = {**base, "acr": BANKID, "auth_time": now - 600}
    answers["hwk"] = {**base, "amr": ["hwk"]}
    reply = await client.get("/both", headers={"Authorization": "Bearer fresh-bankid"})
    assert reply.status == 200
    assert (await reply.json())["acr"] == BANKID
    old = await client.get("/both", headers={"Authorization": "Bearer old-bankid"})
    assert old.status == 401
    assert challenges(old)["Bearer"]["max_age"] == "300"
    assert (await client.get("/aal3", headers={"Authorization": "Bearer hwk"})).status == 200


# -- STEP-08/09: only valid tokens are challenged, and per route ------------------------------------------

@pytest.mark.parametrize("case", ["expired", "foreign audience", "garbage", "bad signature"])
async def test_step_08_invalid_token_gets_invalid_token_never_a_step_up(
    api: Api, issuer: DevIssuer, case: str
) -> None:
    if case == "expired":
        token = api.token(acr=SOCIAL, lifetime=-LEEWAY - 10)
    elif case == "foreign audience":
        token = api.token(acr=SOCIAL, audience="https://other.example.com")
    elif case == "garbage":
        token = "not.a.token"
    else:
        good = api.token(acr=SOCIAL)
        token = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for path in ("/acr", "/aal3", "/fresh", "/both"):
        assert_invalid_token(await api.get(path, {"Authorization": f"Bearer {token}"}))
        assert api.reason != "insufficient_user_authentication"


async def test_step_09_acr_values_are_per_route_never_per_user(api: Api) -> None:
    seen = set()
    for sub, claims in (("alice", {"acr": SOCIAL}), ("bob", {"acr": OTP_ACR}), ("carol", {"amr": ["pwd"]}),
                        ("dave", {})):
        response = await api.get("/ial3", {"Authorization": f"Bearer {api.token(sub, **claims)}"})
        assert response.status == 401
        seen.add(challenges(response)["Bearer"]["acr_values"])
    assert seen == {f"{BANKID} {EID}"}  # from the rule and [trust.acr], never from the caller's token


# -- STEP-10: freshness ------------------------------------------------------------------------------------

async def test_step_10_auth_age_up_to_max_age_is_fresh(api: Api) -> None:
    assert (await api.bearer("/fresh", age=300)).status == 200
    assert_step_up(await api.bearer("/fresh", age=301), AGE, max_age="300")


async def test_step_10_freshness_moves_with_the_clock(api: Api) -> None:
    token = api.token(age=250)
    assert (await api.get("/fresh", {"Authorization": f"Bearer {token}"})).status == 200
    api.clock.advance(51)  # the cached token check must not cache the login's age
    assert_step_up(await api.get("/fresh", {"Authorization": f"Bearer {token}"}), AGE, max_age="300")


async def test_step_10_missing_auth_time_on_max_age_route_is_step_up(api: Api) -> None:
    assert_step_up(await api.bearer("/fresh", age=None), AGE, max_age="300")
    assert api.reason == "auth_too_old"
    assert (await api.bearer("/aal2", age=None, amr=["otp"])).status == 200  # no max_age: not needed


async def test_step_10_auth_time_in_the_future_beyond_leeway_is_invalid_token(api: Api) -> None:
    assert_invalid_token(await api.bearer("/fresh", age=-(LEEWAY + 1)))
    assert_invalid_token(await api.bearer("/aal2", age=-(LEEWAY + 60), amr=["otp"]))  # any route
    assert (await api.bearer("/fresh", age=-(LEEWAY - 1))).status == 200  # within the leeway: counts as now


# -- STEP-11: acr is compared exactly -----------------------------------------------------------------------

@pytest.mark.parametrize("acr", [BANKID.upper(), "URN:example:acr:bankid", BANKID + " ", " " + BANKID,
                                 BANKID + "/", "urn:example:acr:bankID"])
async def test_step_11_acr_exact_and_case_sensitive(api: Api, acr: str) -> None:
    assert_step_up(await api.bearer("/acr", acr=acr), acr_values=f"{BANKID} {EID}")


async def test_step_11_acr_must_match_and_levels_must_hold(api: Api) -> None:
    # DESIGN §4.5: acr_values is a requirement; min_aal must hold as well
    assert_step_up(await api.bearer("/strict", acr=BANKID), acr_values=BANKID)
    assert_step_up(await api.bearer("/strict", acr=EID), acr_values=BANKID)  # stronger, but not listed
    assert (await api.bearer("/strict", acr=BANKID, amr=["hwk"])).status == 200


# -- STEP-12: DPoP ------------------------------------------------------------------------------------------

async def test_step_12_dpop_token_gets_the_challenge_on_the_dpop_scheme(api: Api, issuer: DevIssuer) -> None:
    key = DPoPKey()
    cnf = {"jkt": key.thumbprint}
    cases = [("/acr", api.token(acr=SOCIAL, cnf=cnf), LEVEL, {"acr_values": f"{BANKID} {EID}"}),
             ("/fresh", api.token(age=301, cnf=cnf), AGE, {"max_age": "300"})]
    for path, token, description, params in cases:
        proof = key.proof("GET", api.origin + path, access_token=token, iat=int(api.clock()))
        response = await api.get(path, {"Authorization": f"DPoP {token}", "DPoP": proof})
        assert_step_up(response, description, scheme="DPoP", **params)
    good = api.token(acr=BANKID, cnf={"jkt": key.thumbprint})
    proof = key.proof("GET", api.origin + "/acr", access_token=good, iat=int(api.clock()))
    response = await api.get("/acr", {"Authorization": f"DPoP {good}", "DPoP": proof})
    assert response.status == 200
    assert (await response.json())["binding"] == "dpop"


# -- AMR ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("amr", ["pwd", "otp hwk"])
async def test_amr_01_bare_string_amr_is_invalid_token(api: Api, amr: str) -> None:
    assert_invalid_token(await api.bearer("/aal2", amr=amr))
    assert api.reason == "invalid_claim"


@pytest.mark.parametrize("amr", [["pwd", 1], [None], [["otp"]], {"otp": True}])
async def test_amr_01_amr_must_be_an_array_of_strings(api: Api, amr: Any) -> None:
    assert_invalid_token(await api.bearer("/aal2", amr=amr))


@pytest.mark.parametrize(("amr", "aal", "ial"), [
    (["pwd"], 1, 0), (["pwd", "otp"], 2, 0), (["hwk"], 3, 0), (["pwd", "hwk", "otp"], 3, 0),
    (["face"], 0, 2), (["mfa"], 0, 0), (["sms", "tel", "user"], 0, 0),
])
async def test_amr_02_registered_values_count_only_through_the_mapping(
    api: Api, amr: list[str], aal: int, ial: int
) -> None:
    # `mfa`, `sms`, ... are registered RFC 8176 values, but mean nothing until [trust.amr] says what they are
    response = await api.bearer("/aal2", amr=amr)
    assert (api.audit or {})["aal"] == aal and (api.audit or {})["ial"] == ial
    assert response.status == (200 if aal >= 2 else 401)


@pytest.mark.parametrize("amr", [["quantum"], ["PWD", "OTP", "HWK"], ["otp "], ["pop"]])
async def test_amr_03_unknown_values_are_ignored(api: Api, amr: list[str]) -> None:
    assert_step_up(await api.bearer("/aal2", amr=amr), acr_values=f"{OTP_ACR} {BANKID} {EID}")
    assert (api.audit or {})["aal"] == 0
    assert (await api.bearer("/aal2", amr=[*amr, "otp"])).status == 200  # ignored, not poisoning


async def test_amr_04_aal_requirement_names_the_acrs_that_satisfy_it(api: Api) -> None:
    assert_step_up(await api.bearer("/aal2", amr=["pwd"]), acr_values=f"{OTP_ACR} {BANKID} {EID}")
    assert_step_up(await api.bearer("/aal3", amr=["pwd", "otp"]), acr_values=EID)
    assert_step_up(await api.bearer("/ial3", acr=SOCIAL), acr_values=f"{BANKID} {EID}")
    for acr in (OTP_ACR, BANKID, EID):  # every ACR named really satisfies the rule it was named for
        assert (await api.bearer("/aal2", acr=acr)).status == 200
    assert (await api.bearer("/aal3", acr=EID)).status == 200


async def test_amr_04_no_acr_satisfies_no_acr_values(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    # nothing in [trust.acr] reaches AAL 3 here: the challenge cannot name an ACR (only `amr` hwk satisfies)
    rules = [{"id": "aal3", "path": "/aal3", "methods": ["GET"], "min_aal": 3}]
    acrs = {SOCIAL: {"aal": 1}, BANKID: {"aal": 2}}
    api = await start(aiohttp_client, issuer, clock, rules=rules, acrs=acrs)
    assert_step_up(await api.bearer("/aal3", acr=BANKID))
    assert (await api.bearer("/aal3", amr=["hwk"])).status == 200


# -- VEC-9470-1 --------------------------------------------------------------------------------------------

async def test_vec_9470_1_challenges_as_printed(api: Api) -> None:
    response = await api.bearer("/vec-acr", acr="otherACR")
    assert_step_up(response, "A different authentication level is required", acr_values="myACR")
    response = await api.bearer("/vec-age", age=6)
    assert_step_up(response, "More recent authentication is required", max_age="5")


async def test_vec_9470_1_token_claims_satisfy_both_routes(api: Api) -> None:
    # the RFC's token shape: typ at+JWT (mixed case), scope purchase, acr myACR, auth_time 2 s before iat
    now = int(api.clock())
    token = api.issuer.mint("someone@example.net", typ="at+JWT", client_id="s6BhdRkqt3", scope="purchase",
                            acr="myACR", auth_time=now - 2)
    for path in ("/vec-acr", "/vec-age"):
        response = await api.get(path, {"Authorization": f"Bearer {token}"})
        assert response.status == 200, path
