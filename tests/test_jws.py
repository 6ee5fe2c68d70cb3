"""Strict compact-JWS parsing, JWK import, thumbprints and signatures (spec-checklist §2, §3, §5, §6, §14)."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from ztmw.jws import (
    CompactJWS,
    MalformedJWS,
    b64url_decode,
    b64url_encode,
    der_signature,
    import_public_jwk,
    key_fits_algorithm,
    media_type_is,
    numeric_date,
    parse_compact,
    strict_json_object,
    thumbprint,
    verify_signature,
)
from ztmw.testing import DevIssuer, FakeClock
from ztmw.testing.http import challenges

from .conftest import AUDIENCE, bearer_client
from .guarded_http import bearer


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def seg(value: Any) -> str:
    return b64(json.dumps(value).encode("utf-8"))


def compact(header: Any, claims: Any, signature: bytes = b"sig") -> str:
    return f"{seg(header)}.{seg(claims)}.{b64(signature)}"


def reason_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(MalformedJWS) as info:
        call(*args, **kwargs)
    return info.value.reason


def int_b64(value: int, length: int | None = None) -> str:
    length = length or (value.bit_length() + 7) // 8
    return b64(value.to_bytes(length, "big"))


def ec_jwk(curve: ec.EllipticCurve = ec.SECP256R1(), crv: str = "P-256", size: int = 32) -> dict[str, str]:
    numbers = ec.generate_private_key(curve).public_key().public_numbers()
    return {"kty": "EC", "crv": crv, "x": int_b64(numbers.x, size), "y": int_b64(numbers.y, size)}


def rsa_jwk(bits: int = 2048) -> dict[str, str]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key().public_numbers()
    return {"kty": "RSA", "n": int_b64(numbers.n), "e": int_b64(numbers.e)}


# -- §14 vectors ------------------------------------------------------------------------------------------

VEC_7638_1 = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJE"
         "CPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Q"
         "vzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6"
         "WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
VEC_8037_1 = {"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
VEC_9449_1 = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
              "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
VEC_9449_5 = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZ"
    "OXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIs"
    "ImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJ"
    "jZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05"
    "yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmc"
    "w6Fy1dqd-jfxSYoMxhAJpLjA"
)
ECDSA_ZERO_RAW = "A" * 86
ECDSA_ZERO_DER = "MAYCAQACAQA"
ECDSA_ORDER_RAW = "_____wAAAAD__________7zm-q2nF56E87nKwvxjJVH_____AAAAAP__________vOb6racXnoTzucrC_GMlUQ"


class TestVectors:
    def test_vec_7638_1_rsa_thumbprint_ignores_optional_members(self) -> None:
        assert thumbprint(import_public_jwk(VEC_7638_1)) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        bare = {k: VEC_7638_1[k] for k in ("kty", "n", "e")}
        assert thumbprint(import_public_jwk(bare)) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

    def test_vec_8037_1_ed25519_thumbprint(self) -> None:
        assert thumbprint(import_public_jwk(VEC_8037_1)) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"

    def test_vec_9449_1_dpop_key_jkt(self) -> None:
        assert thumbprint(import_public_jwk(VEC_9449_1)) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"

    def test_vec_9449_5_parses(self) -> None:
        jws = parse_compact(VEC_9449_5)
        assert jws.header["typ"] == "dpop+jwt" and jws.header["alg"] == "ES256"
        assert jws.claims["htu"] == "https://resource.example.org/protectedresource"
        assert jws.claims["ath"] == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        assert len(jws.signature) == 64

    def test_vec_9449_5_signature_verifies_with_es256(self) -> None:
        jws = parse_compact(VEC_9449_5)
        assert verify_signature(jws, import_public_jwk(jws.header["jwk"]), "ES256") is True

    @pytest.mark.parametrize("alg", ["ES384", "ES512", "RS256", "PS256", "EdDSA", "HS256", "none", "es256"])
    def test_vec_9449_5_signature_does_not_verify_with_another_algorithm(self, alg: str) -> None:
        jws = parse_compact(VEC_9449_5)
        assert verify_signature(jws, import_public_jwk(jws.header["jwk"]), alg) is False

    def test_vec_9449_5_with_one_payload_byte_flipped_does_not_verify(self) -> None:
        header, payload, signature = VEC_9449_5.split(".")
        claims = json.loads(b64url_decode(payload))
        claims["htm"] = "POST"
        jws = parse_compact(f"{header}.{seg(claims)}.{signature}")
        assert verify_signature(jws, import_public_jwk(VEC_9449_1), "ES256") is False

    def test_vec_9449_5_does_not_verify_with_another_key(self) -> None:
        jws = parse_compact(VEC_9449_5)
        assert verify_signature(jws, import_public_jwk(ec_jwk()), "ES256") is False

    @pytest.mark.parametrize("signature", [ECDSA_ZERO_RAW, ECDSA_ZERO_DER, ECDSA_ORDER_RAW],
                             ids=["r=s=0 raw", "r=s=0 DER", "r=s=n raw"])
    def test_vec_ecdsa_1_degenerate_signatures_do_not_verify(self, signature: str) -> None:
        header, payload, _ = VEC_9449_5.split(".")
        jws = parse_compact(f"{header}.{payload}.{signature}")
        assert verify_signature(jws, import_public_jwk(VEC_9449_1), "ES256") is False

    def test_jose_11_der_encoded_valid_signature_does_not_verify(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        header, payload, signature = VEC_9449_5.split(".")
        raw = b64url_decode(signature)
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        jws = parse_compact(f"{header}.{payload}.{b64(der)}")
        assert verify_signature(jws, import_public_jwk(VEC_9449_1), "ES256") is False


# -- base64url (JOSE-02, JOSE-03, IMPL-08) ----------------------------------------------------------------

class TestBase64url:
    @pytest.mark.parametrize("data", [b"", b"A", b"AB", b"ABC", bytes(range(256))])
    def test_round_trip(self, data: bytes) -> None:
        assert b64url_decode(b64url_encode(data)) == data

    @pytest.mark.parametrize(
        "segment",
        ["QQ==", "QUI=", "a+b/", "ab+c", "ab/c", "ab cd", " abcd", "abcd ", "ab\ncd", "abcd\n", "ab\tcd",
         "éabc",
         "ab.c", "abcde", "A", "ab%3D", "\u0660\u0661\u0662\u0663"],
    )
    def test_jose_02_anything_but_unpadded_base64url_is_refused(self, segment: str) -> None:
        assert reason_of(b64url_decode, segment) in ("bad_base64url", "non_canonical_base64url")

    @pytest.mark.parametrize("segment", ["QR", "QUJ", "AB", "_x", "AAAAAAB"])
    def test_jose_03_non_canonical_trailing_bits_are_refused(self, segment: str) -> None:
        assert reason_of(b64url_decode, segment) == "non_canonical_base64url"

    def test_jose_03_vec_8705_1_thumbprint_is_non_canonical(self) -> None:
        with pytest.raises(MalformedJWS):
            b64url_decode("bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2")
        assert len(b64url_decode("bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg0")) == 32

    def test_jose_02_padding_in_a_token_segment_is_refused(self) -> None:
        token = f"{seg({'alg': 'ES256'})}.{seg({'sub': 'x'})}.{b64(b'sig')}"
        header, payload, signature = token.split(".")
        assert reason_of(parse_compact, f"{header}=.{payload}.{signature}") == "bad_base64url"


def reference_b64url_decode(segment: str) -> bytes:
    """The straightforward spelling of the rule b64url_decode implements faster: alphabet by regex, then
    canonical trailing bits, then the standard decoder."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]*", segment) or len(segment) % 4 == 1:
        raise MalformedJWS("bad_base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if b64url_encode(data) != segment:
        raise MalformedJWS("non_canonical_base64url")
    return data


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/= \n\t.\x00é~",
               max_size=12))
def test_b64url_decode_agrees_with_the_reference(segment: str) -> None:
    outcomes = []
    for decode in (b64url_decode, reference_b64url_decode):
        try:
            outcomes.append(decode(segment))
        except MalformedJWS as error:
            outcomes.append(error.reason)
    assert outcomes[0] == outcomes[1]



# -- strict JSON (JOSE-04..06, IMPL-05, IMPL-09) ----------------------------------------------------------

class TestStrictJson:
    def test_plain_object(self) -> None:
        assert strict_json_object(b'{"a": 1, "b": [true, null], "c": "\\u00e9"}') == {
            "a": 1, "b": [True, None], "c": "é"}

    @pytest.mark.parametrize("data", [b'{"a": 1, "a": 2}', b'{"x": {"b": 1, "b": 1}}', b'[{"a": 1, "a": 1}]'])
    def test_jose_05_duplicate_members_are_refused(self, data: bytes) -> None:
        assert reason_of(strict_json_object, data) == "duplicate_member"

    @pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
    def test_jose_06_nan_and_infinity_are_refused(self, constant: bytes) -> None:
        assert reason_of(strict_json_object, b'{"exp": ' + constant + b"}") == "non_finite_number"

    def test_jose_04_bom_is_refused(self) -> None:
        assert reason_of(strict_json_object, b'\xef\xbb\xbf{"a": 1}') == "bad_json"

    @pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
    def test_jose_04_utf16_and_utf32_are_refused(self, encoding: str) -> None:
        assert reason_of(strict_json_object, '{"a": 1}'.encode(encoding)) == "bad_json"

    @pytest.mark.parametrize("data", [b'{"a": "\xff"}', b'{"a": "\xc3"}', b'{"a": "\xed\xa0\x80"}'])
    def test_jose_04_invalid_utf8_is_refused(self, data: bytes) -> None:
        assert reason_of(strict_json_object, data) == "bad_json"

    @pytest.mark.parametrize("data", [b'{"a": "\\ud800"}', b'{"\\udfff": 1}', b'{"a": ["x\\udc00y"]}'])
    def test_jose_06_lone_surrogates_are_refused(self, data: bytes) -> None:
        assert reason_of(strict_json_object, data) == "bad_json"

    def test_surrogate_pair_escape_is_a_valid_character(self) -> None:
        assert strict_json_object(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}

    @pytest.mark.parametrize("data", [b"[]", b'"x"', b"1", b"null", b"true", b"[{}]"])
    def test_non_object_is_refused(self, data: bytes) -> None:
        assert reason_of(strict_json_object, data) == "not_an_object"

    @pytest.mark.parametrize("data", [b"", b"{", b"{'a': 1}", b'{"a": 1,}', b'{"a": 1} x', b"\x00"])
    def test_malformed_json_is_refused(self, data: bytes) -> None:
        assert reason_of(strict_json_object, data) == "bad_json"

    def test_impl_05_deep_nesting_is_refused_not_a_crash(self) -> None:
        assert reason_of(strict_json_object, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") == "bad_json"

    def test_impl_05_huge_integer_is_refused_not_a_crash(self) -> None:
        assert reason_of(strict_json_object, b'{"exp": 1' + b"0" * 5000 + b"}") == "bad_json"


# -- compact parsing (JOSE-01, JOSE-09, JOSE-19) ----------------------------------------------------------

class TestParseCompact:
    def test_three_segments(self) -> None:
        jws = parse_compact(compact({"alg": "ES256", "typ": "at+jwt"}, {"sub": "john"}, b"\x01\x02"))
        assert isinstance(jws, CompactJWS)
        assert jws.header == {"alg": "ES256", "typ": "at+jwt"}
        assert jws.claims == {"sub": "john"}
        assert jws.signature == b"\x01\x02"
        assert jws.signing_input == compact({"alg": "ES256", "typ": "at+jwt"}, {"sub": "john"}).rsplit(
            ".", 1)[0].encode()

    @pytest.mark.parametrize(
        "token", ["", "a", "a.b", "a.b.c.d", "a.b.c.d.e", "....", "a..c", ".b.c", "a.b."])
    def test_jose_01_not_three_non_empty_segments_is_refused(self, token: str) -> None:
        assert reason_of(parse_compact, token) in ("not_a_jws", "bad_base64url")

    def test_jose_01_five_segment_jwe_is_refused(self) -> None:
        jwe = ".".join([seg({"alg": "RSA-OAEP", "enc": "A256GCM"}), b64(b"k" * 32), b64(b"iv"), b64(b"ct"),
                        b64(b"tag")])
        assert reason_of(parse_compact, jwe) == "not_a_jws"

    def test_jose_08_unsecured_jws_has_no_signature_and_is_refused(self) -> None:
        # VEC-7519-1: alg none with an empty signature segment
        token = ("eyJhbGciOiJub25lIn0.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt"
                 "cGxlLmNvbS9"
                 "pc19yb290Ijp0cnVlfQ.")
        assert reason_of(parse_compact, token) == "not_a_jws"

    @pytest.mark.parametrize("crit", [["exp"], ["b64"], [], ["x"], "x"])
    def test_jose_09_any_crit_is_refused(self, crit: Any) -> None:
        token = compact({"alg": "ES256", "crit": crit, "x": 1}, {})
        assert reason_of(parse_compact, token) == "unsupported_crit"

    @pytest.mark.parametrize("cty", ["JWT", "jwt", "application/jwt", "Application/JWT"])
    def test_jose_19_nested_jwt_is_refused(self, cty: str) -> None:
        assert reason_of(parse_compact, compact({"alg": "ES256", "cty": cty}, {})) == "nested_jwt"

    def test_other_cty_is_left_to_the_caller(self) -> None:
        assert parse_compact(compact({"alg": "ES256", "cty": "json"}, {})).header["cty"] == "json"

    @pytest.mark.parametrize("header", [{}, {"alg": None}, {"alg": 256}, {"alg": ["ES256"]}])
    def test_missing_or_non_string_alg_is_refused(self, header: dict[str, Any]) -> None:
        assert reason_of(parse_compact, compact(header, {})) == "missing_alg"

    @pytest.mark.parametrize("extra", [{"b64": False}, {"zip": "DEF"}, {"enc": "A128GCM"}])
    def test_unsupported_header_parameters_are_refused(self, extra: dict[str, Any]) -> None:
        assert reason_of(parse_compact, compact({"alg": "ES256", **extra}, {})) == "unsupported_header"

    def test_duplicate_header_member_is_refused(self) -> None:
        header = b64(b'{"alg":"none","alg":"ES256"}')
        assert reason_of(parse_compact, f"{header}.{seg({})}.{b64(b's')}") == "duplicate_member"

    def test_claims_must_be_an_object(self) -> None:
        assert reason_of(parse_compact, f"{seg({'alg': 'ES256'})}.{seg([1])}.{b64(b's')}") == "not_an_object"

    def test_oversized_token_is_refused_before_decoding(self) -> None:
        assert reason_of(parse_compact, "a" * 20_000) == "too_large"
        token = compact({"alg": "ES256"}, {"x": "y" * 100})
        assert reason_of(parse_compact, token, max_bytes=50) == "too_large"

    def test_a_remembered_header_is_shared_read_only(self) -> None:
        header = {"alg": "ES256", "kid": "k1", "typ": "at+jwt"}
        parse_compact(compact(header, {"sub": "a"}))
        second = parse_compact(compact(header, {"sub": "b"}))
        with pytest.raises(TypeError):
            second.header["alg"] = "none"  # type: ignore[index]
        third = parse_compact(compact(header, {"sub": "c"}))
        assert third.header == second.header == header
        assert (second.claims, third.claims) == ({"sub": "b"}, {"sub": "c"})

    def test_a_refused_header_is_refused_every_time(self) -> None:
        for _ in range(3):
            assert reason_of(parse_compact, compact({"alg": "ES256", "crit": ["exp"]}, {})) == "unsupported_crit"
            assert reason_of(parse_compact, compact({"alg": "ES256"}, [])) == "not_an_object"

    def test_headers_with_nested_members_parse_every_time(self) -> None:
        header = {"alg": "ES256", "typ": "dpop+jwt", "jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}}
        first, second = parse_compact(compact(header, {})), parse_compact(compact(header, {}))
        assert first.header == second.header == header
        with pytest.raises(TypeError):  # the remembered one is shared: read-only all the way down
            second.header["jwk"]["x"] = "c"

    def test_remembered_headers_are_bounded(self) -> None:
        from ztmw import jws

        for i in range(jws._HEADERS_MAX * 3):
            parse_compact(compact({"alg": "ES256", "kid": f"k{i}"}, {}))
            assert len(jws._HEADERS) <= jws._HEADERS_MAX

    def test_vec_9449_2_opaque_token_is_not_a_jws(self) -> None:
        # three dot-separated segments, but "~" is not base64url: refused as malformed, never a crash
        assert reason_of(parse_compact, "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == "bad_base64url"


_b64_segment = st.one_of(
    st.binary(max_size=64).map(b64),
    st.dictionaries(st.sampled_from(["alg", "crit", "cty", "typ", "b64", "zip", "enc", "kid"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                              st.lists(st.text(max_size=4), max_size=2)), max_size=4).map(seg),
    st.text(alphabet="ABCDEFabcdef0123456789-_+/= .~", max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_b64_segment, min_size=1, max_size=6).map(".".join)))
def test_parse_compact_on_any_text_raises_only_malformed_jws(token: str) -> None:
    try:
        result = parse_compact(token)
    except MalformedJWS as error:
        assert error.reason
        return
    assert isinstance(result, CompactJWS)
    assert isinstance(result.header["alg"], str)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_strict_json_object_on_any_bytes_raises_only_malformed_jws(data: bytes) -> None:
    try:
        assert isinstance(strict_json_object(data), dict)
    except MalformedJWS:
        pass


# -- NumericDate (JOSE-14, IMPL-06, IMPL-07, IMPL-10) ------------------------------------------------------

class TestNumericDate:
    @pytest.mark.parametrize(("value", "expected"), [
        (0, 0.0), (1_700_000_000, 1_700_000_000.0), (1_700_000_000.5, 1_700_000_000.5), (-1, -1.0),
        (2**53 - 1, float(2**53 - 1)),
    ])
    def test_finite_numbers_are_numeric_dates(self, value: float, expected: float) -> None:
        assert numeric_date(value) == expected
        assert isinstance(numeric_date(value), float)

    @pytest.mark.parametrize("value", [
        True, False, "1700000000", "", None, [1], {"t": 1}, float("nan"), float("inf"), float("-inf"),
        2**53 + 1, 2**64, 10**400, -(2**60), 1e300,
    ], ids=repr)
    def test_non_numeric_dates_are_none(self, value: Any) -> None:
        assert numeric_date(value) is None


# -- media types (JOSE-21, AT-01) -------------------------------------------------------------------------

class TestMediaType:
    @pytest.mark.parametrize(
        "value", ["at+jwt", "at+JWT", "AT+JWT", "application/at+jwt", "Application/AT+JWT"])
    def test_at_jwt_spellings_match(self, value: str) -> None:
        assert media_type_is(value, "at+jwt") is True

    @pytest.mark.parametrize("value", ["jwt", "JWT", "at+jwt2", "text/at+jwt", "application/jwt", "at+jwt ",
                                       "", None, 1, ["at+jwt"], "dpop+jwt", "application/application/at+jwt"])
    def test_other_values_do_not_match(self, value: Any) -> None:
        assert media_type_is(value, "at+jwt") is False

    def test_dpop_type(self) -> None:
        assert media_type_is("dpop+jwt", "dpop+jwt") and not media_type_is("at+jwt", "dpop+jwt")


# -- JWK import (JWKS-05..07, DPOP-07, BCP-04, JOSE-12) ---------------------------------------------------

class TestImportPublicJwk:
    def test_ec_keys_of_each_curve_import(self) -> None:
        for curve, crv, size in ((ec.SECP256R1(), "P-256", 32), (ec.SECP384R1(), "P-384", 48),
                                 (ec.SECP521R1(), "P-521", 66)):
            key = import_public_jwk(ec_jwk(curve, crv, size))
            assert key.key_type == "EC"

    def test_ed25519_imports(self) -> None:
        raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert import_public_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}).key_type == "OKP"

    @pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
    def test_dpop_07_private_members_are_refused(self, member: str) -> None:
        jwk = {**VEC_9449_1, member: "AQAB"}
        assert reason_of(import_public_jwk, jwk) == "private_jwk"

    def test_a_real_private_ec_key_is_refused(self) -> None:
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = {**ec_jwk(), "d": int_b64(private.private_numbers().private_value, 32)}
        assert reason_of(import_public_jwk, jwk) == "private_jwk"

    def test_jwks_07_oct_is_refused(self) -> None:
        jwk = {"kty": "oct",
               "k": "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"}
        assert reason_of(import_public_jwk, jwk) == "private_jwk"
        assert reason_of(import_public_jwk, {"kty": "oct"}) == "unsupported_key_type"

    @pytest.mark.parametrize("jwk", [{}, {"kty": "ec"}, {"kty": "X"}, {"kty": None}], ids=repr)
    def test_unknown_key_types_are_refused(self, jwk: dict[str, Any]) -> None:
        assert reason_of(import_public_jwk, jwk) == "unsupported_key_type"

    def test_not_a_mapping_is_refused(self) -> None:
        assert reason_of(import_public_jwk, ["kty", "EC"]) == "bad_jwk"

    def test_jwks_05_ec_coordinate_without_leading_zero_is_refused(self) -> None:
        x = b64url_decode(VEC_9449_1["x"])
        assert reason_of(import_public_jwk, {**VEC_9449_1, "x": b64(x[1:])}) == "bad_jwk"
        padded_y = b64(b"\x00" + b64url_decode(VEC_9449_1["y"]))
        assert reason_of(import_public_jwk, {**VEC_9449_1, "y": padded_y}) == "bad_jwk"

    def test_jwks_05_coordinates_of_another_curve_are_refused(self) -> None:
        p384 = ec_jwk(ec.SECP384R1(), "P-384", 48)
        assert reason_of(import_public_jwk, {**p384, "crv": "P-256"}) == "bad_jwk"

    @pytest.mark.parametrize("crv", ["P-192", "secp256k1", "p-256", None, "Ed25519"])
    def test_unsupported_ec_curve_is_refused(self, crv: Any) -> None:
        assert reason_of(import_public_jwk, {**VEC_9449_1, "crv": crv}) == "bad_jwk"

    def test_bcp_04_point_not_on_the_curve_is_refused(self) -> None:
        y = bytearray(b64url_decode(VEC_9449_1["y"]))
        y[-1] ^= 1
        assert reason_of(import_public_jwk, {**VEC_9449_1, "y": b64(bytes(y))}) == "bad_jwk"

    def test_bcp_04_coordinate_not_below_the_field_prime_is_refused(self) -> None:
        assert reason_of(import_public_jwk, {**VEC_9449_1, "x": b64(b"\xff" * 32)}) == "bad_jwk"

    def test_non_canonical_base64url_coordinate_is_refused(self) -> None:
        with pytest.raises(MalformedJWS):
            import_public_jwk({**VEC_9449_1, "x": VEC_9449_1["x"] + "="})

    @pytest.mark.parametrize("member", ["x", "y"])
    def test_non_string_coordinate_is_refused(self, member: str) -> None:
        assert reason_of(import_public_jwk, {**VEC_9449_1, member: 12}) == "bad_jwk"

    def test_jwks_06_rsa_modulus_with_a_leading_zero_octet_is_refused(self) -> None:
        n = b64url_decode(VEC_7638_1["n"])
        assert reason_of(import_public_jwk, {**VEC_7638_1, "n": b64(b"\x00" + n)}) == "bad_jwk"

    def test_jwks_06_rsa_exponent_with_a_leading_zero_octet_is_refused(self) -> None:
        assert reason_of(import_public_jwk, {**VEC_7638_1, "e": b64(b"\x00\x01\x00\x01")}) == "bad_jwk"

    def test_jose_12_rsa_below_2048_bits_is_refused(self) -> None:
        assert reason_of(import_public_jwk, rsa_jwk(1024)) == "weak_key"

    def test_jose_12_rsa_2048_bits_imports(self) -> None:
        assert import_public_jwk(rsa_jwk(2048)).key_type == "RSA"

    def test_rsa_2047_bit_modulus_is_refused(self) -> None:
        n = (1 << 2046) | 1
        assert reason_of(import_public_jwk, {"kty": "RSA", "n": int_b64(n), "e": "AQAB"}) == "weak_key"

    @pytest.mark.parametrize("jwk", [{"kty": "RSA", "e": "AQAB"}, {"kty": "RSA", "n": "AQAB"},
                                     {"kty": "RSA", "n": "", "e": "AQAB"}], ids=repr)
    def test_incomplete_rsa_key_is_refused(self, jwk: dict[str, Any]) -> None:
        assert reason_of(import_public_jwk, jwk) == "bad_jwk"

    @pytest.mark.parametrize("x", ["", b64(b"\x01" * 31), b64(b"\x01" * 33)])
    def test_ed25519_key_of_wrong_length_is_refused(self, x: str) -> None:
        assert reason_of(import_public_jwk, {"kty": "OKP", "crv": "Ed25519", "x": x}) == "bad_jwk"

    @pytest.mark.parametrize("crv", ["X25519", "Ed448", None])
    def test_other_okp_curves_are_refused(self, crv: Any) -> None:
        assert reason_of(import_public_jwk, {**VEC_8037_1, "crv": crv}) == "bad_jwk"

    def test_jkt_03_thumbprint_ignores_members_outside_the_required_set(self) -> None:
        extended = {**VEC_9449_1, "kid": "k", "use": "sig", "alg": "ES256", "ext": True}
        assert thumbprint(import_public_jwk(extended)) == thumbprint(import_public_jwk(VEC_9449_1))


# -- algorithm bound to key type (BCP-01) -----------------------------------------------------------------

class TestKeyFitsAlgorithm:
    def test_ec_p256_fits_es256_only(self) -> None:
        key = import_public_jwk(VEC_9449_1)
        assert [a for a in ("ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA", "HS256", "none")
                if key_fits_algorithm(key, a)] == ["ES256"]

    def test_p384_fits_es384_only(self) -> None:
        key = import_public_jwk(ec_jwk(ec.SECP384R1(), "P-384", 48))
        assert key_fits_algorithm(key, "ES384") and not key_fits_algorithm(key, "ES256")

    def test_rsa_fits_rs_and_ps(self) -> None:
        key = import_public_jwk(VEC_7638_1)
        assert all(key_fits_algorithm(key, a) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"))
        assert not any(key_fits_algorithm(key, a) for a in ("ES256", "EdDSA", "HS256"))

    def test_ed25519_fits_eddsa(self) -> None:
        key = import_public_jwk(VEC_8037_1)
        assert key_fits_algorithm(key, "EdDSA") and key_fits_algorithm(key, "Ed25519")
        assert not key_fits_algorithm(key, "ES256")

    def test_verify_signature_never_raises_on_garbage(self) -> None:
        jws = parse_compact(compact({"alg": "RS256"}, {}, b"\x00" * 7))
        assert verify_signature(jws, import_public_jwk(VEC_7638_1), "RS256") is False
        assert verify_signature(jws, import_public_jwk(VEC_8037_1), "EdDSA") is False
        assert verify_signature(jws, import_public_jwk(VEC_9449_1), "ES256") is False


# -- IMPL-06..IMPL-10 end to end: numeric dates, aud/iss, base64url and UTF-8 as a client sends them --------

def raw_token(issuer: DevIssuer, payload: bytes) -> str:
    """A token signed by the issuer's real key over exactly these claim bytes (for JSON no AS would send)."""
    header = json.dumps({"alg": issuer.algorithm, "kid": issuer.kid, "typ": "at+jwt"}).encode()
    return issuer.sign(header, payload)


def claims_json(issuer: DevIssuer, clock: FakeClock, **raw: str) -> bytes:
    """The claims of a good token as JSON text, with members replaced by raw JSON text (`exp="1e400"`)."""
    now = int(clock())
    members = {"iss": json.dumps(issuer.issuer), "sub": '"alice"', "aud": json.dumps(AUDIENCE),
               "exp": str(now + 300), "iat": str(now), "nbf": str(now), "jti": '"gap-jti"',
               "client_id": '"demo-client"', "scope": '"items:read"'}
    members.update(raw)
    return ("{" + ",".join(f'"{name}":{value}' for name, value in members.items()) + "}").encode("utf-8")


async def test_impl_06_booleans_are_not_numeric_dates_and_aud_iss_are_not_substrings(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    cases = [
        {"exp": "true"}, {"iat": "true"}, {"nbf": "false"},
        {"aud": json.dumps(AUDIENCE + ".evil.test")}, {"aud": json.dumps("x" + AUDIENCE)},
        {"aud": json.dumps(AUDIENCE[:-1])}, {"aud": json.dumps([AUDIENCE + "/x"])},
        {"iss": json.dumps(issuer.issuer + "x")}, {"iss": json.dumps(issuer.issuer[:-1])},
    ]
    good = raw_token(issuer, claims_json(issuer, clock))
    assert (await bearer(client, good))[0] == 200
    for case in cases:
        status, headers, _ = await bearer(client, raw_token(issuer, claims_json(issuer, clock, **case)))
        assert status == 401, case
        assert challenges_of(headers)["Bearer"]["error"] == "invalid_token", case


def challenges_of(headers: Any) -> dict[str, dict[str, str]]:
    """`challenges` for the (status, headers, body) results of test_faults' `bearer`."""
    return challenges(SimpleNamespace(headers=headers))


@pytest.mark.parametrize("case", [
    {"exp": "1e400"},  # json turns this into inf: `now >= exp` would never hold
    {"nbf": "-1e400"},
    {"iat": "-1e400"},
    {"exp": "1e400", "nbf": "-1e400", "iat": "-1e400"},
])
async def test_impl_07_non_finite_numeric_dates_are_invalid_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, case: dict[str, str]
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    status, headers, _ = await bearer(client, raw_token(issuer, claims_json(issuer, clock, **case)))
    assert status == 401
    assert challenges_of(headers)["Bearer"]["error"] == "invalid_token"


async def test_impl_08_base64url_alphabet_is_checked_before_decoding(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """`urlsafe_b64decode` drops characters outside the alphabet and takes `+` `/` `=`: none may get through."""
    client = await bearer_client(aiohttp_client, issuer, clock)
    token = issuer.mint(scope="items:read")
    header, payload, signature = token.split(".")
    spellings = [
        f"{header}.{payload}.{signature[:10]}!{signature[10:]}",  # a dropped character, same bytes
        f"{header}.{payload}.{signature[:10]}*{signature[10:]}",
        f"{header}.{payload.replace('-', '+').replace('_', '/')}.{signature}x",
        f"{header}.{payload}=.{signature}",
        f"{header}.{payload}.{signature.replace('-', '+').replace('_', '/')}",
    ]
    swapped = signature.replace("-", "+").replace("_", "/")
    assert swapped != signature or "-" not in signature  # the last spelling differs when it can
    for spelling in spellings:
        if spelling == token:
            continue
        status, headers, _ = await bearer(client, spelling)
        assert status in (400, 401), spelling
        error = challenges_of(headers)["Bearer"]["error"]
        assert error == ("invalid_request" if status == 400 else "invalid_token"), spelling


@pytest.mark.parametrize("payload", [
    "BOM",
    "SURROGATE",
    "LATIN1",
])
async def test_impl_09_claims_are_strict_utf8_without_bom_or_lone_surrogates(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, payload: str
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    good = claims_json(issuer, clock)
    raw = {
        "BOM": b"\xef\xbb\xbf" + good,
        "SURROGATE": claims_json(issuer, clock, sub='"\\ud800"'),
        "LATIN1": claims_json(issuer, clock, sub='"al\xefce"').decode("utf-8").encode("latin-1"),
    }[payload]
    status, headers, _ = await bearer(client, raw_token(issuer, raw))
    assert status == 401
    assert challenges_of(headers)["Bearer"]["error"] == "invalid_token"


@pytest.mark.parametrize("case", [
    {"exp": "1e300"},
    {"exp": "9007199254740993"},
    {"exp": str(10 ** 30)},
    {"iat": "1e300"},
    {"nbf": "-1e300"},
    {"auth_time": "1e300"},
    {"auth_time": "-1e300"},
])
async def test_impl_10_huge_numeric_dates_are_invalid_token_never_500(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, case: dict[str, str]
) -> None:
    client = await bearer_client(aiohttp_client, issuer, clock)
    status, headers, body = await bearer(client, raw_token(issuer, claims_json(issuer, clock, **case)))
    assert status == 401, body
    assert challenges_of(headers)["Bearer"]["error"] == "invalid_token"


# -- der_signature: the DER form of a raw ECDSA signature, as cryptography's encoder writes it ----------------

@settings(max_examples=1500, deadline=None)
@given(size=st.sampled_from([32, 48, 66]), data=st.data())
def test_der_signature_agrees_with_encode_dss_signature(size: int, data: st.DataObject) -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    half = st.one_of(st.binary(min_size=size, max_size=size),
                     st.integers(0, 3).flatmap(lambda zeros: st.binary(min_size=size - zeros, max_size=size - zeros)
                                               .map(lambda tail: b"\0" * zeros + tail)),
                     st.sampled_from([b"\0" * size, b"\xff" * size, b"\0" * (size - 1) + b"\x80"]))
    r, s = data.draw(half), data.draw(half)
    r_int, s_int = int.from_bytes(r, "big"), int.from_bytes(s, "big")
    expected = encode_dss_signature(r_int, s_int) if r_int and s_int else None
    assert der_signature(r + s, size) == expected
