"""Challenge rendering: every row of the response catalogue (checklist §0), parsed back field by field."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztmw.challenge import ChallengeRenderer, ErrorResponse, quote
from ztmw.errors import (
    DESCRIPTIONS,
    AccessDenied,
    AuthError,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingCredentials,
    TokenBindingMismatch,
    UseDPoPNonce,
)

from .challenge_syntax import parse_challenge

REALM = "api"
ALGS = ("ES256", "PS256")
PRM = "https://api.example.com/.well-known/oauth-protected-resource"
NONCE = "eyJ7S_zG.eyJH0-Z.HX4w-7v"
DESCRIPTION_CHARSET = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


def challenges(response: ErrorResponse) -> dict[str, dict[str, str]]:
    """scheme (lower-case) -> params; asserts one line per scheme and each param at most once (RESP-16)."""
    out: dict[str, dict[str, str]] = {}
    for name, value in response.headers:
        if name.lower() != "www-authenticate":
            continue
        scheme, params = parse_challenge(value)
        names = [n for n, _ in params]
        assert len(names) == len(set(names)), f"a parameter appears twice in {value!r}"
        assert scheme.lower() not in out, f"two {scheme} challenges"
        out[scheme.lower()] = dict(params)
    return out


def header_values(response: ErrorResponse, name: str) -> list[str]:
    return [v for k, v in response.headers if k.lower() == name.lower()]


def renderer(*, dpop: bool = True, prm: bool = False, realm: str = REALM) -> ChallengeRenderer:
    return ChallengeRenderer(realm=realm, dpop_algs=ALGS if dpop else None,
                             resource_metadata=PRM if prm else None)


class TestParser:
    def test_parses_token_and_quoted_string_with_escapes(self) -> None:
        assert parse_challenge('Bearer realm="a\\"b\\\\c", error=invalid_token') == (
            "Bearer", [("realm", 'a"b\\c'), ("error", "invalid_token")])

    def test_parses_bare_scheme(self) -> None:
        assert parse_challenge("Bearer") == ("Bearer", [])


# -- R-NONE (RESP-01, RESP-02, RESP-03) -------------------------------------------------------------------

class TestNoCredentials:
    def test_resp_01_no_credentials_is_401_with_bare_bearer_and_dpop(self) -> None:
        response = renderer().render(MissingCredentials())
        assert response.status == 401
        assert challenges(response) == {"bearer": {"realm": REALM}, "dpop": {"algs": "ES256 PS256"}}

    def test_resp_01_no_credentials_without_dpop_is_bare_bearer_only(self) -> None:
        response = renderer(dpop=False).render(MissingCredentials())
        assert response.status == 401
        assert challenges(response) == {"bearer": {"realm": REALM}}

    def test_resp_03_one_field_line_per_scheme(self) -> None:
        response = renderer().render(MissingCredentials())
        lines = header_values(response, "WWW-Authenticate")
        assert len(lines) == 2
        assert lines[0].startswith("Bearer ") and lines[1].startswith("DPoP ")

    def test_resp_12_no_credentials_carries_resource_metadata_on_every_challenge(self) -> None:
        response = renderer(prm=True).render(MissingCredentials())
        assert challenges(response) == {
            "bearer": {"realm": REALM, "resource_metadata": PRM},
            "dpop": {"algs": "ES256 PS256", "resource_metadata": PRM},
        }

    def test_resp_01_no_error_information_at_all(self) -> None:
        for params in challenges(renderer(prm=True).render(MissingCredentials())).values():
            assert not {"error", "error_description", "error_uri"} & set(params)


# -- R-REQ (RESP-04, RESP-15) -----------------------------------------------------------------------------

class TestInvalidRequest:
    def test_resp_04_bearer_invalid_request_is_400_on_bearer(self) -> None:
        response = renderer().render(InvalidRequest("malformed_authorization", scheme="bearer"))
        assert response.status == 400
        found = challenges(response)
        assert found["bearer"] == {
            "realm": REALM, "error": "invalid_request", "error_description": "Malformed Authorization header"}
        assert found.get("dpop", {}) == {"algs": "ES256 PS256"}  # the other scheme stays bare (RESP-15)

    def test_resp_04_dpop_invalid_request_carries_the_error_on_dpop(self) -> None:
        response = renderer().render(InvalidRequest("malformed_authorization", scheme="dpop"))
        assert response.status == 400
        found = challenges(response)
        assert found["dpop"]["error"] == "invalid_request"
        assert found["bearer"] == {"realm": REALM}

    def test_resp_15_ambiguous_invalid_request_carries_the_error_on_both_schemes(self) -> None:
        # VEC-9449-8: Bearer + DPoP Authorization lines -> both challenges carry invalid_request
        response = renderer().render(InvalidRequest("multiple_authorization"))
        assert response.status == 400
        found = challenges(response)
        text = "Multiple methods used to include access token"
        assert found["bearer"] == {"realm": REALM, "error": "invalid_request", "error_description": text}
        assert found["dpop"] == {"algs": "ES256 PS256", "error": "invalid_request", "error_description": text}

    def test_resp_04_invalid_request_without_dpop_is_bearer_only(self) -> None:
        response = renderer(dpop=False).render(InvalidRequest("multiple_authorization"))
        assert response.status == 400
        assert set(challenges(response)) == {"bearer"}
        assert challenges(response)["bearer"]["error"] == "invalid_request"

    def test_resp_12_invalid_request_carries_resource_metadata(self) -> None:
        found = challenges(renderer(prm=True).render(InvalidRequest("multiple_authorization")))
        assert found["bearer"]["resource_metadata"] == PRM
        assert found["dpop"]["resource_metadata"] == PRM


# -- R-TOK-B / R-TOK-D (RESP-05, RESP-09, RESP-10, RESP-11) ------------------------------------------------

class TestInvalidToken:
    def test_resp_05_expired_bearer_token_is_r_tok_b(self) -> None:
        response = renderer().render(InvalidToken("token_expired", scheme="bearer"))
        assert response.status == 401
        assert challenges(response) == {
            "bearer": {"realm": REALM, "error": "invalid_token", "error_description": "Token expired"},
            "dpop": {"algs": "ES256 PS256"},
        }

    def test_resp_05_invalid_dpop_token_is_r_tok_d(self) -> None:
        response = renderer().render(InvalidToken("token_expired", scheme="dpop"))
        assert response.status == 401
        assert challenges(response) == {
            "bearer": {"realm": REALM},
            "dpop": {"algs": "ES256 PS256", "error": "invalid_token", "error_description": "Token expired"},
        }

    def test_resp_05_invalid_bearer_token_without_dpop(self) -> None:
        response = renderer(dpop=False).render(InvalidToken("bad_signature", scheme="bearer"))
        assert challenges(response) == {
            "bearer": {"realm": REALM, "error": "invalid_token", "error_description": "Invalid token"}}

    def test_resp_09_dpop_key_binding_failure_is_invalid_token_on_dpop(self) -> None:
        response = renderer().render(TokenBindingMismatch("dpop_key_mismatch", scheme="dpop"))
        assert response.status == 401
        assert challenges(response)["dpop"] == {
            "algs": "ES256 PS256", "error": "invalid_token", "error_description": "Invalid DPoP key binding"}

    def test_resp_10_dpop_bound_token_as_bearer_renders_bearer_error(self) -> None:
        response = renderer().render(TokenBindingMismatch("dpop_bound_token_as_bearer", scheme="bearer"))
        assert response.status == 401
        found = challenges(response)
        assert found["bearer"]["error"] == "invalid_token"
        assert found["dpop"] == {"algs": "ES256 PS256"}

    def test_resp_11_certificate_mismatch_is_r_tok_b(self) -> None:
        response = renderer(dpop=False).render(TokenBindingMismatch("certificate_mismatch", scheme="bearer"))
        assert response.status == 401
        assert challenges(response)["bearer"]["error"] == "invalid_token"

    def test_resp_12_invalid_token_carries_resource_metadata_on_both(self) -> None:
        found = challenges(renderer(prm=True).render(InvalidToken("token_expired", scheme="bearer")))
        assert found["bearer"]["resource_metadata"] == PRM
        assert found["dpop"]["resource_metadata"] == PRM


# -- R-PROOF / R-NONCE (RESP-07, RESP-08, RESP-17) ---------------------------------------------------------

class TestDPoPProof:
    def test_resp_07_invalid_proof_is_dpop_only(self) -> None:
        response = renderer().render(InvalidDPoPProof("invalid_dpop_proof", scheme="dpop"))
        assert response.status == 401
        assert challenges(response) == {
            "dpop": {"algs": "ES256 PS256", "error": "invalid_dpop_proof",
                     "error_description": "Invalid DPoP proof"}}

    def test_resp_07_invalid_proof_names_dpop_even_without_a_scheme(self) -> None:
        response = renderer().render(InvalidDPoPProof())
        assert challenges(response)["dpop"]["error"] == "invalid_dpop_proof"

    def test_resp_12_invalid_proof_carries_resource_metadata(self) -> None:
        assert challenges(renderer(prm=True).render(InvalidDPoPProof()))["dpop"]["resource_metadata"] == PRM

    def test_resp_08_nonce_required_is_r_nonce(self) -> None:
        response = renderer().render(UseDPoPNonce(nonce=NONCE, scheme="dpop"))
        assert response.status == 401
        assert challenges(response) == {"dpop": {
            "algs": "ES256 PS256", "error": "use_dpop_nonce",
            "error_description": "Resource server requires nonce in DPoP proof"}}

    def test_resp_08_exactly_one_dpop_nonce_header(self) -> None:
        response = renderer().render(UseDPoPNonce(nonce=NONCE))
        assert header_values(response, "DPoP-Nonce") == [NONCE]

    def test_resp_17_nonce_response_is_not_cacheable(self) -> None:
        response = renderer().render(UseDPoPNonce(nonce=NONCE))
        assert header_values(response, "Cache-Control") == ["no-store"]

    def test_resp_08_nonce_challenge_carries_resource_metadata(self) -> None:
        response = renderer(prm=True).render(UseDPoPNonce(nonce=NONCE))
        assert challenges(response)["dpop"]["resource_metadata"] == PRM

    @pytest.mark.parametrize("error", [
        MissingCredentials(), InvalidToken(scheme="bearer"), InvalidRequest(), InvalidDPoPProof(),
        InsufficientScope(params={"scope": "a"}), AccessDenied(),
    ])
    def test_resp_08_only_the_nonce_error_sends_a_nonce(self, error: AuthError) -> None:
        response = renderer().render(error)
        assert header_values(response, "DPoP-Nonce") == []
        assert header_values(response, "Cache-Control") == []


# -- R-SCOPE (RESP-06) ------------------------------------------------------------------------------------

class TestInsufficientScope:
    def test_resp_06_insufficient_scope_is_403_with_scope(self) -> None:
        error = InsufficientScope(scheme="bearer", params={"scope": "payments:write a:b"})
        response = renderer().render(error)
        assert response.status == 403
        assert challenges(response) == {"bearer": {
            "realm": REALM, "error": "insufficient_scope", "error_description": "Insufficient scope",
            "scope": "payments:write a:b"}}

    def test_resp_06_insufficient_scope_for_a_dpop_token_is_on_dpop(self) -> None:
        response = renderer().render(InsufficientScope(scheme="dpop", params={"scope": "s"}))
        assert response.status == 403
        assert challenges(response) == {"dpop": {
            "algs": "ES256 PS256", "error": "insufficient_scope", "error_description": "Insufficient scope",
            "scope": "s"}}

    def test_resp_12_403_carries_no_resource_metadata(self) -> None:
        # POLICY: resource_metadata goes on 401 (and 400) challenges
        response = renderer(prm=True).render(InsufficientScope(scheme="bearer", params={"scope": "s"}))
        assert "resource_metadata" not in challenges(response)["bearer"]

    def test_resp_06_without_a_scheme_falls_back_to_bearer(self) -> None:
        response = renderer().render(InsufficientScope(params={"scope": "s"}))
        assert set(challenges(response)) == {"bearer"}


# -- R-STEP (RESP-13, STEP-01..05, STEP-12) ---------------------------------------------------------------

class TestStepUp:
    def test_step_02_acr_values_challenge(self) -> None:
        # VEC-9470-1, first example
        error = InsufficientUserAuthentication(scheme="bearer", params={"acr_values": "myACR"})
        response = renderer().render(error)
        assert response.status == 401
        found = challenges(response)
        assert found["bearer"] == {
            "realm": REALM, "error": "insufficient_user_authentication",
            "error_description": "A different authentication level is required", "acr_values": "myACR"}
        assert found["dpop"] == {"algs": "ES256 PS256"}

    def test_step_03_max_age_challenge(self) -> None:
        # VEC-9470-1, second example
        response = renderer(dpop=False).render(
            InsufficientUserAuthentication("auth_too_old", scheme="bearer", params={"max_age": "5"}))
        assert response.status == 401
        assert challenges(response) == {"bearer": {
            "realm": REALM, "error": "insufficient_user_authentication",
            "error_description": "More recent authentication is required", "max_age": "5"}}

    def test_step_04_acr_values_and_max_age_together(self) -> None:
        response = renderer(prm=True).render(InsufficientUserAuthentication(
            scheme="bearer", params={"acr_values": "urn:a urn:b", "max_age": "300"}))
        bearer = challenges(response)["bearer"]
        assert bearer["acr_values"] == "urn:a urn:b"
        assert bearer["max_age"] == "300"
        assert bearer["resource_metadata"] == PRM

    def test_step_05_step_up_is_401_not_403(self) -> None:
        assert renderer().render(InsufficientUserAuthentication(params={"max_age": "1"})).status == 401

    def test_step_12_step_up_for_a_dpop_token_uses_the_dpop_scheme(self) -> None:
        response = renderer().render(
            InsufficientUserAuthentication(scheme="dpop", params={"acr_values": "myACR", "max_age": "60"}))
        found = challenges(response)
        assert found["dpop"] == {
            "algs": "ES256 PS256", "error": "insufficient_user_authentication",
            "error_description": "A different authentication level is required",
            "acr_values": "myACR", "max_age": "60"}
        assert found["bearer"] == {"realm": REALM}


# -- AccessDenied -----------------------------------------------------------------------------------------

class TestAccessDenied:
    @pytest.mark.parametrize("reason", ["no_rule", "not_owner", "client_not_allowed", "access_denied"])
    @pytest.mark.parametrize("dpop", [True, False])
    def test_access_denied_is_403_without_a_challenge(self, reason: str, dpop: bool) -> None:
        rendering = ChallengeRenderer(realm=REALM, dpop_algs=ALGS if dpop else None, resource_metadata=PRM)
        response = rendering.render(AccessDenied(reason, scheme="bearer"))
        assert response.status == 403
        assert response.headers == ()


# -- RESP-02, RESP-03, RESP-16 across the catalogue --------------------------------------------------------

CATALOGUE: list[AuthError] = [
    MissingCredentials(),
    InvalidRequest("multiple_authorization"),
    InvalidRequest("malformed_authorization", scheme="bearer"),
    InvalidRequest("credentials_too_large", scheme="dpop"),
    InvalidToken("token_expired", scheme="bearer"),
    InvalidToken("unbound_token_as_dpop", scheme="dpop"),
    TokenBindingMismatch("dpop_bound_token_as_bearer", scheme="bearer"),
    InvalidDPoPProof(scheme="dpop"),
    UseDPoPNonce(nonce=NONCE, scheme="dpop"),
    InsufficientScope(scheme="bearer", params={"scope": "a b"}),
    InsufficientUserAuthentication(scheme="bearer", params={"acr_values": "x", "max_age": "5"}),
    InsufficientUserAuthentication(scheme="dpop", params={"max_age": "0"}),
]


@pytest.mark.parametrize("prm", [True, False])
@pytest.mark.parametrize("error", CATALOGUE, ids=lambda e: f"{type(e).__name__}-{e.reason}-{e.scheme}")
class TestCatalogueInvariants:
    def test_resp_03_every_401_has_a_challenge(self, error: AuthError, prm: bool) -> None:
        response = renderer(prm=prm).render(error)
        assert response.status == error.status
        if response.status == 401:
            assert header_values(response, "WWW-Authenticate")

    def test_resp_02_every_bearer_challenge_has_realm(self, error: AuthError, prm: bool) -> None:
        found = challenges(renderer(prm=prm).render(error))
        if "bearer" in found:
            assert found["bearer"]["realm"] == REALM
        if "dpop" in found:
            assert found["dpop"]["algs"] == "ES256 PS256"

    def test_resp_16_descriptions_are_in_the_rfc_6750_charset(self, error: AuthError, prm: bool) -> None:
        for params in challenges(renderer(prm=prm).render(error)).values():
            for name in ("error_description", "error_uri"):
                if name in params:
                    assert DESCRIPTION_CHARSET.fullmatch(params[name])

    def test_resp_15_at_most_one_scheme_carries_the_error_unless_ambiguous(
        self, error: AuthError, prm: bool
    ) -> None:
        carriers = [s for s, p in challenges(renderer(prm=prm).render(error)).items() if "error" in p]
        if error.error is None:
            assert carriers == []
        elif error.scheme is None and isinstance(error, InvalidRequest):
            assert sorted(carriers) == ["bearer", "dpop"]
        else:
            assert len(carriers) == 1


# -- RESP-16 / RESP-20: nothing from the token or exception text reaches the wire ----------------------------

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJqb2huIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize("cls", [InvalidToken, InvalidRequest, InvalidDPoPProof, InsufficientScope,
                                 InsufficientUserAuthentication, TokenBindingMismatch])
def test_resp_16_unknown_reason_never_reaches_the_description(cls: type[AuthError]) -> None:
    # a careless caller passing token text or exception text as the reason gets the class's fixed description
    error = cls(f"bad {TOKEN} \"quoted\" \n", scheme="bearer")
    response = renderer(prm=True).render(error)
    for _, value in response.headers:
        assert TOKEN not in value
        assert "\n" not in value
    carrier = "dpop" if cls is InvalidDPoPProof else "bearer"
    description = challenges(response)[carrier]["error_description"]
    assert description == DESCRIPTIONS[cls.default_reason]


def test_resp_16_descriptions_table_is_in_the_charset() -> None:
    for reason, text in DESCRIPTIONS.items():
        assert DESCRIPTION_CHARSET.fullmatch(text), reason


@pytest.mark.parametrize(("name", "scheme"), [
    ("realm", "bearer"), ("error", "bearer"), ("error_description", "bearer"),
    ("resource_metadata", "bearer"),
    ("algs", "dpop"), ("error", "dpop"),
])
def test_resp_16_error_params_cannot_repeat_a_standard_parameter(name: str, scheme: str) -> None:
    error = InvalidToken("token_expired", scheme=scheme, params={name: "x"})
    response = ChallengeRenderer(realm=REALM, dpop_algs=ALGS, resource_metadata=PRM).render(error)
    challenges(response)  # asserts each parameter at most once per challenge


# -- quoting (RFC 9110 §5.6.4) ----------------------------------------------------------------------------

class TestQuoting:
    def test_quote_escapes_dquote_and_backslash(self) -> None:
        assert quote('a"b\\c') == '"a\\"b\\\\c"'

    def test_realm_with_quote_and_backslash_round_trips(self) -> None:
        realm = 'my "special" realm \\ here'
        response = renderer(realm=realm).render(MissingCredentials())
        expected = 'Bearer realm="my \\"special\\" realm \\\\ here"'
        assert header_values(response, "WWW-Authenticate")[0] == expected
        assert challenges(response)["bearer"] == {"realm": realm}


_printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_reserved = {"realm", "error", "error_description", "error_uri", "algs", "resource_metadata"}
# the catalogue's extra parameters; any other name is dropped by the renderer (RESP-16)
_param_names = st.sampled_from(["scope", "acr_values", "max_age"])


@settings(max_examples=200, deadline=None)
@given(
    realm=_printable,
    params=st.dictionaries(_param_names, _printable, max_size=5),
    scheme=st.sampled_from(["bearer", "dpop"]),
    prm=st.booleans(),
)
def test_render_then_parse_round_trips(realm: str, params: dict[str, str], scheme: str, prm: bool) -> None:
    response = ChallengeRenderer(realm=realm, dpop_algs=ALGS, resource_metadata=PRM if prm else None).render(
        InvalidToken("token_expired", scheme=scheme, params=params))
    found = challenges(response)
    carrier = found[scheme]
    expected = {"error": "invalid_token", "error_description": "Token expired", **params}
    expected.update({"realm": realm} if scheme == "bearer" else {"algs": "ES256 PS256"})
    if prm:
        expected["resource_metadata"] = PRM
    assert carrier == expected
    other = found["dpop" if scheme == "bearer" else "bearer"]
    assert "error" not in other
    assert found["bearer"]["realm"] == realm
