"""The pipeline's two ways to decide: `decide_plain` (a plain bearer request, without awaiting) answers exactly
what `evaluate` answers, and leaves to `evaluate` whatever it cannot decide so.

Each case is decided by two pipelines built alike, one through each way, on the same request view, so their
caches are in the same state; outcomes are compared field by field (decision, principal, trust, the error as
it is rendered and audited, the cache result). A real JWKS server (DevIssuer) signs and serves the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import pytest

import ztmw
from ztmw.extract import plain_bearer
from ztmw.models import RequestView, RouteRef
from ztmw.pipeline import Outcome, Pipeline
from ztmw.testing import DevIssuer, FakeClock

from .conftest import AUDIENCE, base_config, introspection_endpoint

STEP_UP = {"id": "strong", "path": "/strong", "methods": ["GET"], "scopes": ["items:read"], "min_aal": 2}
USERS_ONLY = {"id": "users", "path": "/people", "methods": ["GET"], "scopes": ["items:read"], "subject_type": "user"}
TRUST = {"acr": {"urn:mfa": {"aal": 2, "ial": 1}, "urn:pwd": {"aal": 1, "ial": 1}}}


def config(issuer: DevIssuer) -> dict[str, Any]:
    built = base_config(issuer, trust=TRUST)
    built["rules"] += [STEP_UP, USERS_ONLY]
    return built


@dataclass(frozen=True)
class Case:
    path: str
    token: Callable[[DevIssuer, DevIssuer], str]
    pattern: str | None = None
    match_info: tuple[tuple[str, str], ...] = ()
    later: float = 0.0  # seconds the clock moves between the first and the second sighting


CASES = {
    "allowed": Case("/items", lambda i, o: i.mint(scope="items:read")),
    "scope_missing": Case("/items", lambda i, o: i.mint(scope="other")),
    "expired": Case("/items", lambda i, o: i.mint(scope="items:read", lifetime=-120)),
    "bad_signature": Case("/items", lambda i, o: i.mint(scope="items:read")[:-6] + "AAAAAA"),
    "malformed": Case("/items", lambda i, o: "abc.def"),
    "unknown_issuer": Case("/items", lambda i, o: o.mint(scope="items:read")),
    "wrong_audience": Case("/items", lambda i, o: i.mint(scope="items:read", audience="https://elsewhere")),
    "resp_10_dpop_bound_as_bearer": Case("/items", lambda i, o: i.mint(scope="items:read", cnf={"jkt": "A" * 43})),
    "mtls_15_unknown_binding": Case("/items", lambda i, o: i.mint(scope="items:read", cnf={"x5t#S256": "A" * 43})),
    "step_up_needed": Case("/strong", lambda i, o: i.mint(scope="items:read", acr="urn:pwd")),
    "step_up_met": Case("/strong", lambda i, o: i.mint(scope="items:read", acr="urn:mfa")),
    "client_token_on_user_rule": Case("/people", lambda i, o: i.mint("demo-client", scope="items:read")),
    "owner": Case("/users/alice/items", lambda i, o: i.mint(scope="items:read"), "/users/{user}/items",
                  (("user", "alice"),)),
    "not_owner": Case("/users/bob/items", lambda i, o: i.mint(scope="items:read"), "/users/{user}/items",
                      (("user", "bob"),)),
    "no_rule": Case("/admin", lambda i, o: i.mint(scope="items:read")),
    "expires_while_cached": Case("/items", lambda i, o: i.mint(scope="items:read", lifetime=60), later=120),
    "step_10_login_in_the_future": Case("/items", lambda i, o: i.mint(scope="items:read", auth_time=i.clock() + 3600)),
}


@pytest.fixture
async def other_issuer(clock: FakeClock) -> AsyncIterator[DevIssuer]:
    async with DevIssuer("https://other.example", audience=AUDIENCE, clock=clock) as other:
        yield other


async def started(built: dict[str, Any], clock: FakeClock) -> Pipeline:
    pipeline = Pipeline(ztmw.load_config(built), clock=clock)
    await pipeline.start()
    return pipeline


def view_of(case: Case, value: str) -> RequestView:
    """The view the middleware builds for a plain request (no DPoP header, query or form token)."""
    return RequestView("GET", case.path, RouteRef("GET", case.pattern or case.path), dict(case.match_info),
                       authorization=(value,), peer="127.0.0.1")


def summary(outcome: Outcome) -> dict[str, Any]:
    """Everything a response and an audit event are made of."""
    error = outcome.error
    return {
        "decision": outcome.decision, "principal": outcome.principal, "trust": outcome.trust,
        "cache": outcome.cache, "cache_key": outcome.cache_key,
        "error": None if error is None else (type(error).__name__, error.reason, error.status,
                                             getattr(error, "scheme", None), getattr(error, "params", None),
                                             getattr(error, "security", None), error.cache),
    }


@pytest.mark.parametrize("name", CASES)
async def test_decide_plain_answers_what_evaluate_answers(
    name: str, issuer: DevIssuer, other_issuer: DevIssuer, clock: FakeClock
) -> None:
    case = CASES[name]
    value = f"Bearer {case.token(issuer, other_issuer)}"
    credential = plain_bearer(value)
    assert credential is not None
    plain, full = await started(config(issuer), clock), await started(config(issuer), clock)
    try:
        for sighting in ("first", "second"):  # a miss, then a cache hit (or the remembered refusal)
            clock.advance(case.later if sighting == "second" else 0)
            expected = summary(await full.evaluate(view_of(case, value)))
            decided = plain.decide_plain(view_of(case, value), credential)
            assert decided is not None, f"{name}, {sighting}: left to evaluate"
            assert summary(decided) == expected, f"{name}, {sighting}"
    finally:
        await plain.close()
        await full.close()


async def test_the_allowed_case_is_allowed_and_the_refusals_refuse(
    issuer: DevIssuer, other_issuer: DevIssuer, clock: FakeClock
) -> None:
    """The matrix above compares like with like; this pins what each case is, so it cannot compare nothing."""
    pipeline = await started(config(issuer), clock)
    try:
        reasons = {}
        for name, case in CASES.items():
            value = f"Bearer {case.token(issuer, other_issuer)}"
            outcome = pipeline.decide_plain(view_of(case, value), plain_bearer(value))  # type: ignore[arg-type]
            assert outcome is not None
            reasons[name] = (outcome.decision.allowed, outcome.decision.reason, outcome.decision.status)
    finally:
        await pipeline.close()
    assert reasons == {
        "allowed": (True, "allowed", 200), "scope_missing": (False, "insufficient_scope", 403),
        "expired": (False, "token_expired", 401), "bad_signature": (False, "bad_signature", 401),
        "malformed": (False, "malformed_token", 401), "unknown_issuer": (False, "unknown_issuer", 401),
        "wrong_audience": (False, "audience_mismatch", 401),
        "resp_10_dpop_bound_as_bearer": (False, "dpop_bound_token_as_bearer", 401),
        "mtls_15_unknown_binding": (False, "unsupported_binding", 401),
        "step_up_needed": (False, "insufficient_user_authentication", 401),
        "step_up_met": (True, "allowed", 200), "client_token_on_user_rule": (False, "user_required", 403),
        "owner": (True, "allowed", 200), "not_owner": (False, "not_owner", 403), "no_rule": (False, "no_rule", 403),
        "expires_while_cached": (True, "allowed", 200), "step_10_login_in_the_future": (False, "invalid_claim", 401),
    }


async def test_a_key_not_loaded_yet_is_left_to_evaluate_which_fetches_it(issuer: DevIssuer, clock: FakeClock) -> None:
    pipeline = await started(config(issuer), clock)
    try:
        issuer.rotate_key()  # the JWKS the pipeline loaded at start does not have the new key
        clock.advance(31)  # past the refetch cooldown that began with that fetch
        value = f"Bearer {issuer.mint(scope='items:read')}"
        view = view_of(CASES["allowed"], value)
        assert pipeline.decide_plain(view, plain_bearer(value)) is None  # type: ignore[arg-type]
        outcome = await pipeline.evaluate(view)
        assert outcome.decision.allowed and outcome.cache == "miss"
        decided = pipeline.decide_plain(view, plain_bearer(value))  # type: ignore[arg-type]
        assert decided is not None and decided.decision.allowed and decided.cache == "hit"
    finally:
        await pipeline.close()


@pytest.mark.parametrize("setting", ["identity_links", "two_verifiers"])
async def test_what_may_await_is_always_left_to_evaluate(
    setting: str, issuer: DevIssuer, clock: FakeClock, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An identity chain, or a second verifier (an introspection endpoint to ask): `evaluate` decides."""
    built = config(issuer)
    if setting == "identity_links":
        built["identity"] = {"links": [{"account": "acct-1", "issuer": issuer.issuer, "subject": "alice"}]}
    else:
        _, settings = await introspection_endpoint(aiohttp_server, monkeypatch, "ZTMW_TEST_INTROSPECTION_SECRET")
        built["verifiers"] = {"enabled": ["bearer", "introspection"]}
        built["plugins"] = {"introspection": settings}
    pipeline = await started(built, clock)
    try:
        value = f"Bearer {issuer.mint(scope='items:read')}"
        assert not pipeline.authenticator.immediate
        assert pipeline.decide_plain(view_of(CASES["allowed"], value), plain_bearer(value)) is None  # type: ignore[arg-type]
    finally:
        await pipeline.close()


@pytest.mark.parametrize("value", [
    "Bearer  two-spaces", "bearer lower-case-scheme", "Bearer tab\there", "Bearer trailing-space ", "Basic abc",
    "Bearer caf\u00e9", "Bearer a=b", "Bearer ",
])
def test_plain_bearer_takes_only_the_canonical_spelling(value: str) -> None:
    """Anything else is left to extract_credential, which may refuse it: never refused here."""
    assert plain_bearer(value) is None


def test_plain_bearer_is_what_extract_credential_gives_for_the_canonical_spelling() -> None:
    from ztmw.extract import extract_credential

    for token in ("abc.def.ghi", "a-b_c~d+e/f==", "x" * 100):
        value = f"Bearer {token}"
        extracted = extract_credential(RequestView("GET", "/", None, authorization=(value,)),
                                       schemes=frozenset({"bearer"}))
        assert plain_bearer(value) == extracted
        assert plain_bearer(value).digest == extracted.digest  # type: ignore[union-attr]  # not compared by ==
    assert plain_bearer("Bearer " + "x" * 100, max_bytes=50) is None  # too large: extract_credential refuses it
