"""Deny-by-default rules (DESIGN.md §4.5): matching, and every requirement a rule can carry (STEP, AMR)."""

from __future__ import annotations

from typing import Any

import pytest

from ztmw.config import Levels, Rule
from ztmw.errors import (
    AccessDenied,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidToken,
    MissingCredentials,
)
from ztmw.models import (
    Binding,
    Caller,
    Decision,
    Principal,
    RequestView,
    RouteRef,
    TrustAssessment,
    VerifiedToken,
    frozen_mapping,
)
from ztmw.policy import RulePolicy, canonical_pattern

ISSUER = "https://as.example.com"


def principal(
    subject: str = "john",
    *,
    raw_subject: str | None = None,
    scopes: tuple[str, ...] = (),
    client_id: str | None = "app",
    binding: Binding | None = None,
    actor: dict[str, Any] | None = None,
) -> Principal:
    token = VerifiedToken(
        issuer=ISSUER,
        subject=raw_subject or subject,
        audience=("https://api.example.com",),
        expires_at=2_000_000_000.0,
        token_id="jti-1",
        verifier="bearer",
        client_id=client_id,
        scopes=frozenset(scopes),
        actor=actor,
    )
    caller = Caller(client_id=client_id, proof=binding, actor=actor)
    return Principal(subject=subject, issuer=ISSUER, token=token, caller=caller,
                     raw_subject=raw_subject or subject)


def request(pattern: str = "/things", method: str = "GET", **match_info: str) -> RequestView:
    return RequestView(method=method, path=pattern, route=RouteRef(method, pattern),
                       match_info=frozen_mapping(match_info))


def trust(aal: int = 0, ial: int = 0, *, acr: str | None = None, auth_age: float | None = None,
          binding: Binding | None = None) -> TrustAssessment:
    return TrustAssessment(aal=aal, ial=ial, acr=acr, auth_age=auth_age, binding=binding)


def decide(rule: Rule, who: Principal | None, level: TrustAssessment | None = None,
           req: RequestView | None = None, *, acr_levels: dict[str, Levels] | None = None) -> Decision:
    policy = RulePolicy([rule], acr_levels=acr_levels)
    return policy.decide(rule, who, level or trust(), req or request(rule.path))


# -- canonical_pattern ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "canonical"),
    [
        ("/users/{id:\\d+}", "/users/{id}"),
        ("/users/{id}", "/users/{id}"),
        ("/a/{x:[a-z]{2,3}}/b", "/a/{x}/b"),
        ("/a/{x:\\d{4}}/{y:(?:a|b){1}}", "/a/{x}/{y}"),
        ("/files/{path:.*}", "/files/{path}"),
        ("/health", "/health"),
        ("/", "/"),
    ],
)
def test_canonical_pattern_drops_the_regex(pattern: str, canonical: str) -> None:
    assert canonical_pattern(pattern) == canonical


# -- matching: rules match routes, first match wins, no match -> None ------------------------------------

class TestMatching:
    def test_no_rule_for_the_route_is_none(self) -> None:
        policy = RulePolicy([Rule(id="a", path="/a")])
        assert policy.rule_for(RouteRef("GET", "/b")) is None

    def test_rules_match_the_canonical_route_pattern(self) -> None:
        rule = Rule(id="u", path="/users/{id:\\d+}", methods=frozenset({"GET"}))
        policy = RulePolicy([rule])
        assert policy.rule_for(RouteRef("GET", "/users/{id}")) is rule

    def test_a_raw_path_is_not_a_route_pattern(self) -> None:
        policy = RulePolicy([Rule(id="u", path="/users/{id}")])
        assert policy.rule_for(RouteRef("GET", "/users/42")) is None

    def test_first_match_wins(self) -> None:
        first = Rule(id="first", path="/x", methods=frozenset({"GET"}), scopes=("a",))
        second = Rule(id="second", path="/x", public=True)
        policy = RulePolicy([first, second])
        assert policy.rule_for(RouteRef("GET", "/x")) is first
        assert policy.rule_for(RouteRef("POST", "/x")) is second

    def test_first_match_wins_across_spellings_of_the_same_pattern(self) -> None:
        first = Rule(id="first", path="/u/{id:\\d+}")
        second = Rule(id="second", path="/u/{id}")
        assert RulePolicy([first, second]).rule_for(RouteRef("GET", "/u/{id}")) is first

    def test_method_not_listed_is_not_covered(self) -> None:
        policy = RulePolicy([Rule(id="a", path="/a", methods=frozenset({"GET"}))])
        assert policy.rule_for(RouteRef("POST", "/a")) is None
        assert policy.rule_for(RouteRef("DELETE", "/a")) is None

    def test_get_covers_head(self) -> None:
        rule = Rule(id="a", path="/a", methods=frozenset({"GET"}))
        assert RulePolicy([rule]).rule_for(RouteRef("HEAD", "/a")) is rule

    def test_head_does_not_cover_get(self) -> None:
        rule = Rule(id="a", path="/a", methods=frozenset({"HEAD"}))
        assert RulePolicy([rule]).rule_for(RouteRef("GET", "/a")) is None

    @pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    def test_rule_without_methods_covers_every_method(self, method: str) -> None:
        rule = Rule(id="a", path="/a")
        assert RulePolicy([rule]).rule_for(RouteRef(method, "/a")) is rule


# -- public -----------------------------------------------------------------------------------------------

class TestPublic:
    def test_public_rule_allows_without_credentials(self) -> None:
        decision = decide(Rule(id="health", path="/health", public=True), None)
        assert decision.allowed and decision.rule_id == "health"

    def test_public_rule_allows_with_a_principal(self) -> None:
        assert decide(Rule(id="health", path="/health", public=True), principal()).allowed

    def test_protected_rule_without_credentials_is_missing_credentials(self) -> None:
        with pytest.raises(MissingCredentials) as info:
            decide(Rule(id="a", path="/a"), None)
        assert info.value.status == 401

    def test_rule_with_no_requirements_allows_any_principal(self) -> None:
        decision = decide(Rule(id="a", path="/a"), principal())
        assert decision == Decision(True, decision.reason, "a")


# -- scopes -----------------------------------------------------------------------------------------------

class TestScopes:
    rule = Rule(id="pay", path="/payments", scopes=("payments:write", "payments:read"))

    def test_all_scopes_present_allows(self) -> None:
        assert decide(self.rule, principal(scopes=("payments:read", "payments:write", "other"))).allowed

    def test_one_scope_missing_is_insufficient_scope_naming_the_required_scopes(self) -> None:
        with pytest.raises(InsufficientScope) as info:
            decide(self.rule, principal(scopes=("payments:write",)))
        assert info.value.status == 403
        assert set(info.value.params["scope"].split(" ")) == {"payments:write", "payments:read"}

    def test_no_scopes_is_insufficient_scope(self) -> None:
        with pytest.raises(InsufficientScope):
            decide(self.rule, principal())

    def test_scopes_compare_exactly(self) -> None:
        with pytest.raises(InsufficientScope):
            decide(Rule(id="a", path="/a", scopes=("Read",)), principal(scopes=("read",)))
        with pytest.raises(InsufficientScope):
            decide(Rule(id="a", path="/a", scopes=("read",)), principal(scopes=("read:all",)))

    def test_resp_15_insufficient_scope_for_a_dpop_token_names_the_dpop_scheme(self) -> None:
        with pytest.raises(InsufficientScope) as info:
            decide(self.rule, principal(binding="dpop"))
        assert info.value.scheme == "dpop"


# -- owner ------------------------------------------------------------------------------------------------

class TestOwner:
    rule = Rule(id="own", path="/users/{user}/transactions", owner="user")

    def test_owner_matches_the_canonical_subject(self) -> None:
        req = request("/users/{user}/transactions", user="acct-42")
        assert decide(self.rule, principal("acct-42", raw_subject="google|123"), req=req).allowed

    def test_owner_is_not_the_raw_subject(self) -> None:
        req = request("/users/{user}/transactions", user="google|123")
        with pytest.raises(AccessDenied) as info:
            decide(self.rule, principal("acct-42", raw_subject="google|123"), req=req)
        assert info.value.reason == "not_owner"
        assert info.value.status == 403

    def test_someone_else_is_denied(self) -> None:
        req = request("/users/{user}/transactions", user="jane")
        with pytest.raises(AccessDenied):
            decide(self.rule, principal("john"), req=req)

    def test_owner_compares_exactly(self) -> None:
        req = request("/users/{user}/transactions", user="John")
        with pytest.raises(AccessDenied):
            decide(self.rule, principal("john"), req=req)

    def test_missing_match_info_is_denied(self) -> None:
        with pytest.raises(AccessDenied):
            decide(self.rule, principal("john"), req=request("/users/{user}/transactions"))


# -- binding (DESIGN.md §4.5 binding shortfalls) ----------------------------------------------------------

class TestBinding:
    @pytest.mark.parametrize(
        ("required", "binding", "allowed"),
        [
            ("any", None, True), ("any", "dpop", True), ("any", "mtls", True),
            ("required", None, False), ("required", "dpop", True), ("required", "mtls", True),
            ("dpop", None, False), ("dpop", "dpop", True), ("dpop", "mtls", False),
            ("mtls", None, False), ("mtls", "dpop", False), ("mtls", "mtls", True),
        ],
    )
    def test_binding_requirement(self, required: Any, binding: Binding | None, allowed: bool) -> None:
        rule = Rule(id="b", path="/b", binding=required)
        who = principal(binding=binding)
        if allowed:
            assert decide(rule, who, trust(binding=binding)).allowed
        else:
            with pytest.raises(InvalidToken) as info:
                decide(rule, who, trust(binding=binding))
            assert info.value.reason == "binding_required"
            assert info.value.status == 401
            assert info.value.error == "invalid_token"


# -- caller: clients, subject_type, delegation ------------------------------------------------------------

class TestCaller:
    def test_listed_client_is_allowed(self) -> None:
        assert decide(Rule(id="c", path="/c", clients=("app", "cli")), principal(client_id="cli")).allowed

    def test_unlisted_client_is_denied(self) -> None:
        with pytest.raises(AccessDenied) as info:
            decide(Rule(id="c", path="/c", clients=("app",)), principal(client_id="other"))
        assert info.value.reason == "client_not_allowed"

    def test_token_without_client_id_is_denied_when_clients_are_listed(self) -> None:
        with pytest.raises(AccessDenied):
            decide(Rule(id="c", path="/c", clients=("app",)), principal(client_id=None))

    def test_user_route_refuses_a_client_token(self) -> None:
        with pytest.raises(AccessDenied) as info:
            decide(Rule(id="u", path="/u", subject_type="user"), principal("svc", client_id="svc"))
        assert info.value.reason == "user_required"

    def test_user_route_allows_a_user_token(self) -> None:
        rule = Rule(id="u", path="/u", subject_type="user")
        assert decide(rule, principal("john", client_id="app")).allowed

    def test_client_route_allows_a_client_token(self) -> None:
        rule = Rule(id="c", path="/c", subject_type="client")
        assert decide(rule, principal("svc", client_id="svc")).allowed

    def test_client_route_refuses_a_user_token(self) -> None:
        with pytest.raises(AccessDenied) as info:
            decide(Rule(id="c", path="/c", subject_type="client"), principal("john", client_id="app"))
        assert info.value.reason == "client_required"

    def test_client_route_refuses_a_token_without_client_id(self) -> None:
        with pytest.raises(AccessDenied):
            decide(Rule(id="c", path="/c", subject_type="client"), principal("john", client_id=None))

    def test_client_token_is_judged_on_the_raw_sub_not_the_linked_account(self) -> None:
        # sub == client_id on the token itself, whatever identity linking made of the subject
        who = principal("acct-1", raw_subject="svc", client_id="svc")
        assert decide(Rule(id="c", path="/c", subject_type="client"), who).allowed

    def test_delegated_token_is_refused_when_delegation_is_not_allowed(self) -> None:
        with pytest.raises(AccessDenied) as info:
            decide(Rule(id="d", path="/d", allow_delegation=False), principal(actor={"sub": "agent"}))
        assert info.value.reason == "delegation_not_allowed"

    def test_delegated_token_is_allowed_by_default(self) -> None:
        assert decide(Rule(id="d", path="/d"), principal(actor={"sub": "agent"})).allowed

    def test_undelegated_token_passes_a_no_delegation_rule(self) -> None:
        assert decide(Rule(id="d", path="/d", allow_delegation=False), principal()).allowed


# -- step-up (STEP-01..11, AMR-04) ------------------------------------------------------------------------

ACR_LEVELS = {
    "urn:example:acr:bankid": Levels(aal=2, ial=3),
    "urn:example:acr:social": Levels(aal=1, ial=1),
    "urn:example:acr:hwk": Levels(aal=3, ial=1),
}


class TestStepUp:
    def test_step_01_aal_below_minimum_is_insufficient_user_authentication(self) -> None:
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(Rule(id="s", path="/s", min_aal=2), principal(), trust(aal=1), acr_levels=ACR_LEVELS)
        assert info.value.status == 401
        assert info.value.error == "insufficient_user_authentication"

    def test_step_01_aal_at_minimum_allows(self) -> None:
        assert decide(Rule(id="s", path="/s", min_aal=2), principal(), trust(aal=2)).allowed

    def test_step_01_ial_below_minimum_is_step_up(self) -> None:
        with pytest.raises(InsufficientUserAuthentication):
            decide(Rule(id="s", path="/s", min_ial=2), principal(), trust(aal=3, ial=1))

    def test_strength_does_not_make_up_for_assurance(self) -> None:
        # a TOTP adds strength, not assurance (DESIGN.md §1)
        with pytest.raises(InsufficientUserAuthentication):
            decide(Rule(id="s", path="/s", min_aal=2, min_ial=2), principal(), trust(aal=3, ial=1))

    def test_amr_04_step_up_names_the_acrs_that_would_satisfy_the_levels(self) -> None:
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(Rule(id="s", path="/s", min_aal=2, min_ial=2), principal(), trust(aal=1, ial=1),
                   acr_levels=ACR_LEVELS)
        assert info.value.params["acr_values"].split(" ") == ["urn:example:acr:bankid"]
        assert "max_age" not in info.value.params

    def test_step_02_rule_acr_values_are_what_the_challenge_asks_for(self) -> None:
        rule = Rule(id="s", path="/s", acr_values=("urn:a", "urn:b"))
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(rule, principal(), trust(acr="urn:c"), acr_levels=ACR_LEVELS)
        assert info.value.params["acr_values"] == "urn:a urn:b"

    def test_step_02_acr_in_the_rule_list_allows(self) -> None:
        rule = Rule(id="s", path="/s", acr_values=("urn:a", "urn:b"))
        assert decide(rule, principal(), trust(acr="urn:b")).allowed

    def test_step_02_missing_acr_on_an_acr_route_is_step_up(self) -> None:
        with pytest.raises(InsufficientUserAuthentication):
            decide(Rule(id="s", path="/s", acr_values=("urn:a",)), principal(), trust(aal=3, ial=3))

    def test_step_11_acr_is_compared_exactly_and_case_sensitively(self) -> None:
        rule = Rule(id="s", path="/s", acr_values=("urn:example:acr:BankID",))
        for acr in ("urn:example:acr:bankid", "urn:example:acr:BankID ", "urn:example:acr:Bank",
                    "URN:example:acr:BankID"):
            with pytest.raises(InsufficientUserAuthentication):
                decide(rule, principal(), trust(aal=3, ial=3, acr=acr))

    def test_acr_values_and_levels_must_both_hold(self) -> None:
        # DESIGN.md §4.5: acr_values is a requirement as well, and min_aal/min_ial must also hold
        rule = Rule(id="s", path="/s", acr_values=("urn:a",), min_aal=2)
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(rule, principal(), trust(aal=1, acr="urn:a"))
        assert info.value.params["acr_values"] == "urn:a"
        assert decide(rule, principal(), trust(aal=2, acr="urn:a")).allowed

    def test_step_03_auth_too_old_is_step_up_with_max_age(self) -> None:
        rule = Rule(id="s", path="/s", max_auth_age=300)
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(rule, principal(), trust(auth_age=301))
        assert info.value.params == {"max_age": "300"}
        assert info.value.reason == "auth_too_old"

    def test_step_03_max_age_is_a_non_negative_integer_string(self) -> None:
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(Rule(id="s", path="/s", max_auth_age=0), principal(), trust(auth_age=0.5))
        assert info.value.params["max_age"] == "0"

    def test_step_10_auth_age_within_max_age_allows(self) -> None:
        rule = Rule(id="s", path="/s", max_auth_age=300)
        assert decide(rule, principal(), trust(auth_age=300)).allowed
        assert decide(rule, principal(), trust(auth_age=0)).allowed

    def test_step_10_missing_auth_time_on_a_max_age_route_is_step_up(self) -> None:
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(Rule(id="s", path="/s", max_auth_age=300), principal(), trust(aal=3, ial=3, auth_age=None))
        assert info.value.params["max_age"] == "300"

    def test_step_04_level_shortfall_on_a_max_age_route_names_both(self) -> None:
        rule = Rule(id="s", path="/s", acr_values=("urn:a",), max_auth_age=60)
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(rule, principal(), trust(acr="urn:b", auth_age=10))
        assert info.value.params == {"acr_values": "urn:a", "max_age": "60"}

    def test_step_08_scope_is_checked_before_step_up(self) -> None:
        # the scope shortfall is the one the client can do nothing about by logging in again
        rule = Rule(id="s", path="/s", scopes=("a",), min_aal=3)
        with pytest.raises(InsufficientScope):
            decide(rule, principal(), trust(aal=1))

    def test_step_09_step_up_params_are_per_route_not_per_user(self) -> None:
        rule = Rule(id="s", path="/s", min_aal=2)
        params = []
        for level in (trust(aal=0, acr="urn:x"), trust(aal=1, acr="urn:example:acr:social")):
            with pytest.raises(InsufficientUserAuthentication) as info:
                decide(rule, principal(), level, acr_levels=ACR_LEVELS)
            params.append(info.value.params)
        assert params[0] == params[1]

    def test_step_12_step_up_for_a_dpop_token_names_the_dpop_scheme(self) -> None:
        with pytest.raises(InsufficientUserAuthentication) as info:
            decide(Rule(id="s", path="/s", max_auth_age=60), principal(binding="dpop"),
                   trust(auth_age=None, binding="dpop"))
        assert info.value.scheme == "dpop"

    def test_allowed_decision_names_the_rule(self) -> None:
        rule = Rule(id="s", path="/s", min_aal=2, min_ial=2, acr_values=("urn:example:acr:bankid",),
                    max_auth_age=300, scopes=("x",), binding="required")
        decision = decide(rule, principal(scopes=("x",), binding="dpop"),
                          trust(aal=2, ial=3, acr="urn:example:acr:bankid", auth_age=10, binding="dpop"))
        assert decision.allowed and decision.rule_id == "s" and decision.status == 200


@pytest.mark.parametrize("container", [tuple, list, frozenset])
def test_scopes_a_third_party_verifier_returns_in_any_container_are_checked_alike(container: type) -> None:
    """`VerifiedToken.scopes` is a frozenset from the built-in verifiers; another verifier's tuple or list must
    be checked the same way, never turned into a 500 (SEC-07)."""
    rule = Rule(id="r", path="/things", scopes=("read",))

    def holding(*scopes: str) -> Principal:
        who = principal()
        token = VerifiedToken(**{**{f: getattr(who.token, f) for f in who.token.__dataclass_fields__},
                                 "scopes": container(scopes)})
        return Principal(subject=who.subject, issuer=who.issuer, token=token, caller=who.caller,
                         raw_subject=who.raw_subject)

    assert decide(rule, holding("read", "write")).allowed
    with pytest.raises(InsufficientScope):
        decide(rule, holding("write"))


class TestRulesThatAskNothingOfTheCaller:
    """A rule of the table with any binding, client, subject type and actor answers one shared allowed Decision;
    every other requirement still applies, and a rule the policy does not hold is decided in full."""

    def test_the_allowed_decision_is_shared_and_equal_to_a_fresh_one(self) -> None:
        rule = Rule(id="r", path="/things", scopes=("read",))
        policy = RulePolicy([rule])
        first = policy.decide(rule, principal(scopes=("read",)), trust(), request())
        again = policy.decide(rule, principal("mary", scopes=("read", "write")), trust(), request())
        assert first is again and first == Decision(True, "allowed", "r")

    def test_its_other_requirements_still_refuse(self) -> None:
        owner = Rule(id="o", path="/users/{id}", owner="id", scopes=("read",), min_aal=2)
        policy = RulePolicy([owner])
        with pytest.raises(InsufficientScope):
            policy.decide(owner, principal(scopes=()), trust(aal=2), request("/users/{id}", id="john"))
        with pytest.raises(InsufficientUserAuthentication):
            policy.decide(owner, principal(scopes=("read",)), trust(aal=1), request("/users/{id}", id="john"))
        with pytest.raises(AccessDenied):
            policy.decide(owner, principal(scopes=("read",)), trust(aal=2), request("/users/{id}", id="mary"))
        assert policy.decide(owner, principal(scopes=("read",)), trust(aal=2),
                             request("/users/{id}", id="john")).allowed

    @pytest.mark.parametrize("asks", [
        {"binding": "dpop"}, {"clients": ("other",)}, {"subject_type": "client"},
        {"allow_delegation": False}, {"proven_caller": True},
    ])
    def test_a_rule_that_asks_something_of_the_caller_is_checked_in_full(self, asks: dict[str, Any]) -> None:
        rule = Rule(id="r", path="/things", **asks)
        who = principal(actor={"sub": "admin"}) if "allow_delegation" in asks else principal()
        with pytest.raises((AccessDenied, InvalidToken)):
            RulePolicy([rule]).decide(rule, who, trust(), request())

    def test_a_rule_the_policy_does_not_hold_is_decided_in_full(self) -> None:
        held = Rule(id="r", path="/things")
        stranger = Rule(id="r", path="/things", clients=("other",))  # equal id, another object
        with pytest.raises(AccessDenied):
            RulePolicy([held]).decide(stranger, principal(), trust(), request())
