"""Credential extraction: the strict RFC 6750 §2.1 / RFC 9449 §7.1 Authorization grammar (checklist §1)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztmw.errors import InvalidRequest
from ztmw.extract import extract_credential
from ztmw.models import Credential, RequestView, RouteRef

BOTH = frozenset({"bearer", "dpop"})
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJqb2huIn0.c2lnbmF0dXJl"
# VEC-9449-2: "~" is legal in b64token
OPAQUE = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"


def view(*authorization: str, has_query_token: bool = False, dpop: tuple[str, ...] = ()) -> RequestView:
    return RequestView(
        method="GET",
        path="/things",
        route=RouteRef("GET", "/things"),
        authorization=authorization,
        dpop=dpop,
        has_query_token=has_query_token,
    )


def extract(*authorization: str, schemes: frozenset[str] = BOTH, **kwargs: object) -> Credential | None:
    return extract_credential(view(*authorization, **kwargs), schemes=schemes, max_bytes=8192)  # type: ignore


# -- HTTP-01: the scheme is case-insensitive ---------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_http_01_scheme_is_case_insensitive(scheme: str) -> None:
    assert extract(f"{scheme} {TOKEN}") == Credential("bearer", TOKEN)


@pytest.mark.parametrize("scheme", ["DPoP", "dpop", "DPOP", "dPoP"])
def test_http_01_dpop_scheme_is_case_insensitive(scheme: str) -> None:
    assert extract(f"{scheme} {TOKEN}") == Credential("dpop", TOKEN)


# -- HTTP-02 / HTTP-03: b64token / token68 ----------------------------------------------------------------

@pytest.mark.parametrize("token", [TOKEN, OPAQUE, "abc+/def==", "a", "A-._~+/", "x="])
def test_http_02_b64token_alphabet_is_accepted(token: str) -> None:
    assert extract(f"Bearer {token}") == Credential("bearer", token)


@pytest.mark.parametrize("spaces", [" ", "  ", "     "])
def test_http_02_several_spaces_after_the_scheme_are_valid(spaces: str) -> None:
    assert extract(f"Bearer{spaces}{TOKEN}") == Credential("bearer", TOKEN)


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer\t{TOKEN}",  # HTAB instead of SP
        f"Bearer \t{TOKEN}",
        f"Bearer {TOKEN},{TOKEN}",  # comma
        f"Bearer {TOKEN}, DPoP {TOKEN}",  # two credentials in one line
        f'Bearer "{TOKEN}"',  # quoted
        f"Bearer {TOKEN}\u00e9",  # non-ASCII
        "Bearer tök",
        "Bearer ",  # empty token
        "Bearer",
        "Bearer   ",
        f"Bearer {TOKEN} extra",  # a second word
        "Bearer =abc",  # padding may only trail
        "Bearer ab=c",
        f"Bearer {TOKEN};",
        f"Bearer token={TOKEN}",  # auth-param form is not b64token
    ],
)
def test_http_02_malformed_bearer_credentials_are_invalid_request(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        extract(value)
    assert info.value.status == 400
    assert info.value.error == "invalid_request"


@pytest.mark.parametrize(
    "value", [f"DPoP\t{TOKEN}", f"DPoP {TOKEN},x", 'DPoP "abc"', "DPoP ", "DPoP", "DPoP ä", f"DPoP {TOKEN} x"]
)
def test_http_03_malformed_dpop_credentials_are_invalid_request(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        extract(value)
    assert info.value.scheme in ("dpop", None)


def test_http_03_malformed_dpop_credential_names_the_dpop_scheme() -> None:
    with pytest.raises(InvalidRequest) as info:
        extract(f"DPoP {TOKEN},x")
    assert info.value.scheme == "dpop"


def test_http_02_malformed_bearer_credential_names_the_bearer_scheme() -> None:
    with pytest.raises(InvalidRequest) as info:
        extract(f"Bearer {TOKEN},x")
    assert info.value.scheme == "bearer"


# -- HTTP-04: surrounding whitespace is not part of the field value ---------------------------------------

@pytest.mark.parametrize("value", [f" Bearer {TOKEN}", f"Bearer {TOKEN} ", f"  Bearer {TOKEN}   "])
def test_http_04_leading_and_trailing_whitespace_is_ignored(value: str) -> None:
    assert extract(value) == Credential("bearer", TOKEN)


@pytest.mark.parametrize("value", [f"\tBearer {TOKEN}", f"Bearer {TOKEN}\t", f" \tBearer {TOKEN}\t "])
def test_http_04_leading_and_trailing_htab_is_ignored(value: str) -> None:
    assert extract(value) == Credential("bearer", TOKEN)


# -- HTTP-05: Authorization is not list-valued ------------------------------------------------------------

def test_http_05_two_authorization_lines_are_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        extract(f"Bearer {TOKEN}", f"DPoP {TOKEN}")
    assert info.value.reason == "multiple_authorization"
    assert info.value.scheme is None  # ambiguous: both schemes were attempted (RESP-15)


def test_http_05_two_identical_bearer_lines_are_invalid_request_naming_bearer() -> None:
    with pytest.raises(InvalidRequest) as info:
        extract(f"Bearer {TOKEN}", f"Bearer {TOKEN}")
    assert info.value.scheme == "bearer"


def test_http_05_two_lines_even_with_unsupported_schemes_are_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        extract("Basic dXNlcjpwYXNz", f"Bearer {TOKEN}")


# -- HTTP-06 / HTTP-08: one transport only; the query transport is not supported ---------------------------

def test_http_06_header_and_query_token_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        extract(f"Bearer {TOKEN}", has_query_token=True)
    assert info.value.reason == "multiple_authorization"
    assert info.value.scheme == "bearer"


def test_http_08_query_token_alone_is_no_credentials() -> None:
    assert extract(has_query_token=True) is None


def test_http_07_no_authorization_header_is_no_credentials() -> None:
    assert extract() is None


def test_http_07_dpop_header_alone_is_no_credentials() -> None:
    assert extract(dpop=("a.b.c",)) is None


# -- RESP-01: unsupported schemes are "no credentials" ----------------------------------------------------

@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", 'Digest username="x"', "Negotiate abc", "MAC id=x"])
def test_resp_01_unsupported_scheme_is_no_credentials(value: str) -> None:
    assert extract(value) is None


def test_resp_01_dpop_scheme_when_only_bearer_is_supported_is_no_credentials() -> None:
    assert extract(f"DPoP {TOKEN}", schemes=frozenset({"bearer"})) is None


def test_resp_01_bearer_scheme_when_only_dpop_is_supported_is_no_credentials() -> None:
    assert extract(f"Bearer {TOKEN}", schemes=frozenset({"dpop"})) is None


def test_http_05_unsupported_scheme_with_query_token_is_still_no_credentials() -> None:
    assert extract("Basic dXNlcjpwYXNz", has_query_token=True) is None


@pytest.mark.parametrize("value", ["Bea(rer abc", "Bea\"rer abc", "Bearer@ abc", "\u00e9 abc", ""])
def test_http_02_malformed_scheme_is_invalid_request(value: str) -> None:
    with pytest.raises(InvalidRequest):
        extract(value)


# -- HTTP-11: the DPoP scheme keeps the token exactly (case-sensitive token68) ---------------------------

def test_http_11_token_value_keeps_its_case() -> None:
    credential = extract("dpop AbCdEf.GhIj.KlMn")
    assert credential == Credential("dpop", "AbCdEf.GhIj.KlMn")


def test_http_11_opaque_dpop_token_from_rfc_9449_is_accepted() -> None:
    assert extract(f"DPoP {OPAQUE}") == Credential("dpop", OPAQUE)


# -- HTTP-12: Proxy-Authorization is never read -----------------------------------------------------------

def test_http_12_request_view_has_no_proxy_authorization_input() -> None:
    # The adapter copies Authorization only; RequestView has no field for Proxy-Authorization at all, so a
    # DPoP credential sent there can never reach extraction.
    fields = set(RequestView.__dataclass_fields__)
    assert not any("proxy" in name.lower() for name in fields)
    assert extract() is None


# -- HTTP-14: size cap before any decoding ----------------------------------------------------------------

def test_http_14_credential_at_the_limit_is_accepted() -> None:
    value = "Bearer " + "a" * (8192 - len("Bearer "))
    assert extract(value) == Credential("bearer", "a" * (8192 - 7))


def test_http_14_oversized_credential_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        extract("Bearer " + "a" * 8192)
    assert info.value.reason == "credentials_too_large"
    assert info.value.status == 400


def test_http_14_oversized_garbage_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidRequest) as info:
        extract("\t" * 9000)
    assert info.value.reason == "credentials_too_large"


def test_http_14_limit_is_configurable() -> None:
    with pytest.raises(InvalidRequest):
        extract_credential(view("Bearer " + "a" * 100), schemes=BOTH, max_bytes=64)


# -- SEC-03: a Credential never shows its token -----------------------------------------------------------

def test_sec_03_credential_repr_never_shows_the_token() -> None:
    credential = extract(f"Bearer {TOKEN}")
    assert credential is not None
    assert TOKEN not in repr(credential)
    assert TOKEN not in str(credential)
    assert TOKEN not in f"{credential!r} {[credential]}"


def test_sec_03_invalid_request_message_never_shows_the_token() -> None:
    secret = "SeCrEtToKeN"
    with pytest.raises(InvalidRequest) as info:
        extract(f"Bearer {secret},")
    assert secret not in str(info.value)
    assert secret not in repr(info.value)


# -- property: the only outcomes are None, a Credential or InvalidRequest ---------------------------------

_header_text = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda s, sp, t: s + sp + t,
        st.sampled_from(["Bearer", "bearer", "DPoP", "dpop", "Basic", "X"]),
        st.sampled_from(["", " ", "  ", "\t", ", "]),
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=80),
    ),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_header_text, max_size=3), query=st.booleans(),
       schemes=st.sampled_from([BOTH, frozenset({"bearer"}), frozenset({"dpop"})]))
def test_extract_outcome_is_none_credential_or_invalid_request(
    lines: list[str], query: bool, schemes: frozenset[str]
) -> None:
    try:
        result = extract_credential(view(*lines, has_query_token=query), schemes=schemes, max_bytes=8192)
    except InvalidRequest:
        return
    assert result is None or isinstance(result, Credential)
    if result is not None:
        assert result.scheme in schemes
        assert result.token and result.token.isascii()
        assert " " not in result.token and "\t" not in result.token



_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 §2.1's grammar, as a regular expression


@given(st.text(alphabet=st.sampled_from("aZ09-._~+/= \t\"'%é\u00ff\x00\x7f:,;"), max_size=12))
@settings(max_examples=500)
def test_http_02_the_token_is_accepted_exactly_when_the_b64token_grammar_matches(token: str) -> None:
    """The extractor checks the grammar on the token's bytes; it must agree with the grammar's expression."""
    try:
        credential = extract_credential(view(f"Bearer {token}"), schemes=frozenset({"bearer"}))
    except InvalidRequest:
        credential = None
    presented = f"Bearer {token}".strip(" \t").partition(" ")[2].lstrip(" ")  # what follows the scheme
    expected = _B64TOKEN.fullmatch(presented) is not None
    assert (credential is not None and credential.token == presented) == expected
