"""The exception tree: each class has the status and RFC error code of the response catalogue (spec §0)."""

from __future__ import annotations

import re

import pytest

import ztmw
from ztmw.errors import (
    DESCRIPTIONS,
    AccessDenied,
    AccountConflict,
    AuthError,
    ConfigurationError,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingCredentials,
    NotLinked,
    TokenBindingMismatch,
    UnknownSubject,
    UpstreamUnavailable,
    UseDPoPNonce,
    ZtmwError,
)

RFC6750_CHARSET = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")

CATALOGUE: list[tuple[type[AuthError], int, str | None]] = [
    (MissingCredentials, 401, None),  # R-NONE
    (InvalidRequest, 400, "invalid_request"),  # R-REQ
    (InvalidToken, 401, "invalid_token"),  # R-TOK-B / R-TOK-D
    (TokenBindingMismatch, 401, "invalid_token"),  # RESP-09/10/11
    (UnknownSubject, 401, "invalid_token"),  # BCP-08: RFC 8725 §3.8
    (InvalidDPoPProof, 401, "invalid_dpop_proof"),  # R-PROOF
    (UseDPoPNonce, 401, "use_dpop_nonce"),  # R-NONCE
    (InsufficientUserAuthentication, 401, "insufficient_user_authentication"),  # R-STEP
    (InsufficientScope, 403, "insufficient_scope"),  # R-SCOPE
    (AccessDenied, 403, None),  # policy "no", no challenge
    (AccountConflict, 409, "conflict"),  # account linking: another account's login, no challenge
    (NotLinked, 404, "not_found"),  # account linking: not a login of this account, no challenge
]


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


@pytest.mark.parametrize(("cls", "status", "error"), CATALOGUE, ids=lambda v: getattr(v, "__name__", str(v)))
def test_status_and_error_code_follow_the_catalogue(
    cls: type[AuthError], status: int, error: str | None
) -> None:
    instance = cls(nonce="n") if cls is UseDPoPNonce else cls()
    assert instance.status == status
    assert instance.error == error
    assert cls.status == status and cls.error == error


def test_the_catalogue_lists_every_auth_error_subclass_in_ztmw() -> None:
    ours = {c for c in _all_subclasses(AuthError) if c.__module__.startswith("ztmw.")}
    assert ours == {cls for cls, _, _ in CATALOGUE}


def test_upstream_unavailable_is_503_and_not_an_auth_error() -> None:
    error = UpstreamUnavailable()
    assert error.status == 503
    assert not isinstance(error, AuthError)
    assert error.reason == "upstream_unavailable"


def test_tree_shape() -> None:
    assert issubclass(AuthError, ZtmwError)
    assert issubclass(UpstreamUnavailable, ZtmwError)
    assert issubclass(ConfigurationError, ZtmwError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(TokenBindingMismatch, InvalidToken)


def test_errors_are_exported_from_the_package() -> None:
    for cls, _, _ in CATALOGUE:
        if cls in (AccountConflict, NotLinked):  # raised only by the linking ceremony's own handlers
            continue
        assert getattr(ztmw, cls.__name__) is cls
    for cls in (AuthError, ConfigurationError, UpstreamUnavailable, ZtmwError):
        assert getattr(ztmw, cls.__name__) is cls


@pytest.mark.parametrize(("cls", "status", "error"), CATALOGUE, ids=lambda v: getattr(v, "__name__", str(v)))
def test_default_reason_has_a_description(cls: type[AuthError], status: int, error: str | None) -> None:
    assert cls.default_reason in DESCRIPTIONS


class TestDescriptions:
    @pytest.mark.parametrize("reason", sorted(DESCRIPTIONS))
    def test_resp_16_description_is_in_the_rfc_6750_charset(self, reason: str) -> None:
        assert RFC6750_CHARSET.fullmatch(DESCRIPTIONS[reason])

    @pytest.mark.parametrize("reason", sorted(DESCRIPTIONS))
    def test_reason_ids_are_snake_case(self, reason: str) -> None:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", reason)

    def test_reason_ids_are_unique_regardless_of_case_or_separators(self) -> None:
        normalised = [r.lower().replace("-", "_") for r in DESCRIPTIONS]
        assert len(normalised) == len(set(normalised))

    def test_reason_ids_in_the_dict_literal_are_not_repeated(self) -> None:
        # a repeated key in a dict literal silently keeps the last text; read the source to catch it
        import inspect

        import ztmw.errors as module

        source = inspect.getsource(module)
        table = source[source.index("DESCRIPTIONS: dict[str, str] = {"):]
        table = table[: table.index("\n}\n")]
        keys = re.findall(r'^\s*"([^"]+)":', table, flags=re.M)
        assert len(keys) == len(set(keys)) == len(DESCRIPTIONS)


class TestAuthErrorValue:
    def test_unknown_reason_falls_back_to_the_class_description(self) -> None:
        assert InvalidToken("something_new").description == DESCRIPTIONS["invalid_token"]

    def test_reason_defaults_per_class(self) -> None:
        assert InvalidRequest().reason == "malformed_request"
        assert TokenBindingMismatch().reason == "binding_mismatch"
        assert UseDPoPNonce(nonce="n").reason == "dpop_nonce_required"

    def test_scheme_params_and_security_flag_are_kept(self) -> None:
        error = InsufficientScope(scheme="dpop", params={"scope": "a"}, security=True)
        assert (error.scheme, error.params, error.security) == ("dpop", {"scope": "a"}, True)

    def test_params_are_copied(self) -> None:
        params = {"scope": "a"}
        error = InsufficientScope(params=params)
        params["scope"] = "b"
        assert error.params == {"scope": "a"}

    def test_nonce_is_required_for_use_dpop_nonce(self) -> None:
        with pytest.raises(TypeError):
            UseDPoPNonce()  # type: ignore[call-arg]
        assert UseDPoPNonce(nonce="abc").nonce == "abc"

    def test_message_is_the_reason_id_only(self) -> None:
        assert str(InvalidToken("token_expired", scheme="bearer")) == "token_expired"


def test_every_reason_id_raised_in_the_core_has_a_description() -> None:
    from pathlib import Path

    root = Path(ztmw.__file__).parent
    names = "|".join(cls.__name__ for cls, _, _ in CATALOGUE)
    pattern = re.compile(rf'\b(?:{names})\(\s*"([^"]+)"')
    used = {m for path in root.rglob("*.py") for m in pattern.findall(path.read_text(encoding="utf-8"))}
    assert used, "the scan found nothing: the pattern is wrong"
    assert sorted(used - set(DESCRIPTIONS)) == []
