"""Trust on separate axes (DESIGN.md §1, §4.5): AAL and IAL from acr/amr, freshness, binding (AMR-01..03)."""

from __future__ import annotations

from typing import Any

import pytest

from ztmw import load_config
from ztmw.config import Levels, TrustConfig
from ztmw.models import (
    ANONYMOUS_TRUST,
    Binding,
    Caller,
    Principal,
    RequestView,
    RouteRef,
    TrustAssessment,
    VerifiedToken,
)
from ztmw.trust import MappingTrustEvaluator

NOW = 1_700_000_000.0
BANKID = "urn:example:acr:bankid"
SOCIAL = "urn:example:acr:social"

CONFIG = TrustConfig(
    acr={BANKID: Levels(aal=2, ial=3), SOCIAL: Levels(aal=1, ial=1)},
    amr={"pwd": Levels(aal=1), "otp": Levels(aal=2), "hwk": Levels(aal=3), "face": Levels(aal=2, ial=2)},
)
REQUEST = RequestView(method="GET", path="/x", route=RouteRef("GET", "/x"))


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(*, acr: str | None = None, amr: tuple[str, ...] = (), auth_time: float | None = None,
              binding: Binding | None = None) -> Principal:
    token = VerifiedToken(issuer="https://as.example.com", subject="john", audience=("https://api",),
                          expires_at=NOW + 3600, token_id="t", verifier="bearer", client_id="app",
                          auth_time=auth_time, acr=acr, amr=amr)
    return Principal(subject="john", issuer=token.issuer, token=token,
                     caller=Caller(client_id="app", proof=binding), raw_subject="john")


def evaluate(config: TrustConfig = CONFIG, clock: FakeClock | None = None, **claims: Any) -> TrustAssessment:
    return MappingTrustEvaluator(config, clock or FakeClock()).evaluate(principal(**claims), REQUEST)


@pytest.mark.parametrize(
    ("acr", "amr", "aal", "ial"),
    [
        (None, ("pwd",), 1, 0),  # password: strength 1, no assurance
        (None, ("otp",), 2, 0),  # a TOTP adds strength, not assurance
        (None, ("hwk",), 3, 0),  # hardware key
        (None, ("pwd", "otp"), 2, 0),
        (None, ("pwd", "hwk"), 3, 0),
        (BANKID, (), 2, 3),  # eID with biometrics: high assurance
        (SOCIAL, (), 1, 1),  # social login: low assurance
        (SOCIAL, ("hwk",), 3, 1),  # strength from amr, assurance from acr
        (BANKID, ("pwd",), 2, 3),  # max, never a downgrade
        (None, (), 0, 0),
        (None, ("face", "otp"), 2, 2),
    ],
)
def test_levels_from_acr_and_amr(acr: str | None, amr: tuple[str, ...], aal: int, ial: int) -> None:
    assessment = evaluate(acr=acr, amr=amr)
    assert (assessment.aal, assessment.ial) == (aal, ial)
    assert assessment.acr == acr


def test_levels_combine_by_maximum_on_each_axis_separately() -> None:
    config = TrustConfig(acr={"a": Levels(aal=1, ial=3)}, amr={"m": Levels(aal=3, ial=1)})
    assessment = evaluate(config, acr="a", amr=("m",))
    assert (assessment.aal, assessment.ial) == (3, 3)


def test_design_example_config_maps_the_same_way() -> None:
    config = load_config({
        "resource": {"identifier": "https://api.example.com"},
        "trust": {"acr": {BANKID: {"ial": 3, "aal": 2}},
                  "amr": {"pwd": {"aal": 1}, "otp": {"aal": 2}, "hwk": {"aal": 3}}},
    })
    assessment = MappingTrustEvaluator(config.trust, FakeClock()).evaluate(
        principal(acr=BANKID, amr=("pwd", "otp")), REQUEST)
    assert (assessment.aal, assessment.ial) == (2, 3)


class TestUnknownValues:
    @pytest.mark.parametrize("amr", [("retina",), ("PWD",), ("pwd ",), ("mfa",), ("",)])
    def test_amr_03_unknown_amr_counts_for_nothing(self, amr: tuple[str, ...]) -> None:
        assert (evaluate(amr=amr).aal, evaluate(amr=amr).ial) == (0, 0)

    @pytest.mark.parametrize("acr", ["urn:example:acr:BankID", "urn:unknown", "", BANKID + " "])
    def test_unknown_or_differently_cased_acr_counts_for_nothing(self, acr: str) -> None:
        assessment = evaluate(acr=acr)
        assert (assessment.aal, assessment.ial) == (0, 0)
        assert assessment.acr == acr  # kept for the policy's exact acr_values comparison

    def test_unknown_values_beside_known_ones_do_not_lower_the_level(self) -> None:
        assert evaluate(amr=("hwk", "unknown")).aal == 3

    def test_empty_mapping_gives_nothing(self) -> None:
        assessment = evaluate(TrustConfig(), acr=BANKID, amr=("hwk",))
        assert (assessment.aal, assessment.ial) == (0, 0)


class TestFreshness:
    def test_auth_age_is_now_minus_auth_time(self) -> None:
        assert evaluate(auth_time=NOW - 120).auth_age == 120

    def test_auth_age_follows_the_clock(self) -> None:
        clock = FakeClock()
        evaluator = MappingTrustEvaluator(CONFIG, clock)
        who = principal(auth_time=NOW - 10)
        assert evaluator.evaluate(who, REQUEST).auth_age == 10
        clock.now += 290
        assert evaluator.evaluate(who, REQUEST).auth_age == 300

    def test_no_auth_time_means_unknown_age(self) -> None:
        assert evaluate().auth_age is None

    def test_auth_time_slightly_in_the_future_is_age_zero(self) -> None:
        assert evaluate(auth_time=NOW + 3).auth_age == 0


class TestBindingAndInputs:
    @pytest.mark.parametrize("binding", [None, "dpop", "mtls"])
    def test_binding_is_passed_through(self, binding: Binding | None) -> None:
        assert evaluate(binding=binding).binding == binding

    def test_inputs_explain_each_level(self) -> None:
        assessment = evaluate(acr=BANKID, amr=("otp", "nope"), auth_time=NOW - 5, binding="dpop")
        text = " ".join(assessment.inputs)
        assert BANKID in text and "otp" in text and "nope" not in text
        assert "dpop" in text

    def test_anonymous_request_gets_no_trust(self) -> None:
        assert MappingTrustEvaluator(CONFIG, FakeClock()).evaluate(None, REQUEST) == ANONYMOUS_TRUST
        assert (ANONYMOUS_TRUST.aal, ANONYMOUS_TRUST.ial, ANONYMOUS_TRUST.binding) == (0, 0, None)


def test_one_evaluator_answers_each_login_as_a_fresh_one_would_whatever_it_assessed_before() -> None:
    """The evaluator keeps what it assessed for (acr, amr, binding) of logins without auth_time: the answers
    must be those of a new evaluator, for every combination, in any order, and auth_time logins still age."""
    clock = FakeClock()
    kept = MappingTrustEvaluator(CONFIG, clock)
    logins = [dict(acr=acr, amr=amr, binding=binding) for acr in (None, BANKID, SOCIAL, "urn:unknown")
              for amr in ((), ("pwd",), ("otp", "face")) for binding in (None, "dpop")]
    for login in logins + logins[::-1]:
        assert kept.evaluate(principal(**login), REQUEST) == MappingTrustEvaluator(CONFIG, clock).evaluate(
            principal(**login), REQUEST)
    aged = principal(acr=BANKID, auth_time=NOW - 10)
    assert kept.evaluate(aged, REQUEST).auth_age == 10
    clock.now += 50
    assert kept.evaluate(aged, REQUEST).auth_age == 60
    later = kept.evaluate(principal(acr=BANKID), REQUEST, TrustAssessment(aal=3, inputs=("earlier",)))
    assert later.aal == 3 and later.inputs[0] == "earlier"  # what an earlier evaluator found is refined, not replaced


def test_an_amr_list_from_another_verifier_is_assessed_as_a_tuple_would_be() -> None:
    """Another verifier may hand `amr` over as a list (unhashable): assessed in full, never a 503."""
    kept = MappingTrustEvaluator(CONFIG, FakeClock())
    listed = principal(amr=("otp",))
    object.__setattr__(listed.token, "amr", ["otp"])
    assert kept.evaluate(listed, REQUEST) == kept.evaluate(principal(amr=("otp",)), REQUEST)
