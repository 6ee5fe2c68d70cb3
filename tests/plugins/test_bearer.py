"""The bearer verifier against the checklist (JOSE, BCP, AT, JWKS) and the RFC vectors of §14.

Keys are served by real loopback servers (DevIssuer, or a hand-made one for key sets no AS should publish);
time is a fake clock; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import random
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from ztmw_plugins import bearer
from ztmw_plugins.bearer import BearerVerifier

from ztmw.config import Config, load_config
from ztmw.errors import DESCRIPTIONS, ConfigurationError, InvalidToken, UpstreamUnavailable
from ztmw.jws import import_public_jwk
from ztmw.models import VerifiedToken
from ztmw.testing.clock import FakeClock
from ztmw.testing.http import free_port
from ztmw.testing.issuer import DevIssuer
from ztmw.testing.lifetime import PluginLifetime
from ztmw.typing import TokenVerifier

API = "https://api.example.com"
VEC_7519_1 = ("eyJhbGciOiJub25lIn0.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb"
              "290Ijp0cnVlfQ.")
VEC_7515_1 = ("eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt"
              "cGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
VEC_7515_1_KEY = "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"
VEC_9449_2 = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
ECDSA_R_S_ZERO = "A" * 86
ECDSA_R_S_ZERO_DER = "MAYCAQACAQA"
ECDSA_R_S_ORDER = ("_____wAAAAD__________7zm-q2nF56E87nKwvxjJVH_____AAAAAP__________vOb6racXnoTzucrC_GMlUQ")


# -- harness ----------------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    return json.loads(unb64(header)), json.loads(unb64(payload))


def make_config(*tables: dict[str, Any]) -> Config:
    return load_config({"resource": {"identifier": API}, "issuers": list(tables)})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_750_000_000.0)


@pytest.fixture
async def issuer(clock: FakeClock) -> AsyncIterator[DevIssuer]:
    async with DevIssuer(clock=clock) as dev:
        yield dev


@pytest.fixture
async def make_verifier(
    session: aiohttp.ClientSession, clock: FakeClock
) -> AsyncIterator[Callable[..., Awaitable[BearerVerifier]]]:
    made: list[PluginLifetime] = []

    async def make(*tables: dict[str, Any], settings: dict[str, Any] | None = None) -> BearerVerifier:
        lifetime = PluginLifetime()
        made.append(lifetime)
        verifier = bearer.create(settings or {}, lifetime.deps(make_config(*tables), clock=clock,
                                                               http=lambda: session))
        await lifetime.start()
        return verifier

    yield make
    for lifetime in made:
        await lifetime.stop()


@pytest.fixture
async def verifier(issuer: DevIssuer, make_verifier: Any) -> BearerVerifier:
    return await make_verifier(issuer.issuer_config())


async def rejects(verifier: BearerVerifier, token: str, reason: str, *, security: bool | None = None) -> None:
    with pytest.raises(InvalidToken) as info:
        await verifier.verify_token(token)
    assert info.value.reason == reason
    assert reason in DESCRIPTIONS
    assert info.value.error == "invalid_token" and info.value.status == 401
    if security is not None:
        assert info.value.security is security


def resign(issuer: DevIssuer, token: str, *, header: Any = None, claims: Any = None) -> str:
    """The token's header/claims changed (dicts are merged, bytes used as-is), signed by the issuer again."""
    old_header, old_claims = decode(token)
    head = header if isinstance(header, bytes) else dumps({**old_header, **(header or {})})
    body = claims if isinstance(claims, bytes) else dumps({**old_claims, **(claims or {})})
    return issuer.sign(head, body)


def with_signature(token: str, signature: str) -> str:
    return token.rsplit(".", 1)[0] + "." + signature


# -- the positive path ------------------------------------------------------------------------------------

async def test_valid_token_fills_every_field(issuer: DevIssuer, verifier: BearerVerifier, clock: FakeClock) -> None:
    token = issuer.mint(
        "alice", scope="read  write", audience=[API, "https://other.example.com"], acr="urn:acr:2",
        amr=["pwd", "otp"], auth_time=clock.now - 10, cnf={"jkt": "x" * 43},
        claims={"act": {"sub": "svc"}, "groups": ["g"], "jti": "id-1"},
    )
    result = await verifier.verify_token(token)
    assert result == VerifiedToken(
        issuer=issuer.issuer, subject="alice", audience=(API, "https://other.example.com"),
        expires_at=float(int(clock.now) + 300), token_id="id-1", verifier="bearer", client_id="demo-client",
        scopes=frozenset({"read", "write"}), issued_at=float(int(clock.now)), not_before=float(int(clock.now)),
        auth_time=clock.now - 10, acr="urn:acr:2", amr=("pwd", "otp"), cnf={"jkt": "x" * 43},
        actor={"sub": "svc"}, claims=decode(token)[1], key_id=issuer.kid, leeway=30.0,
        key_thumbprint=import_public_jwk(issuer.jwks()["keys"][0]).thumbprint(),
    )


async def test_verifier_shape_and_result_depends_only_on_the_token(issuer: DevIssuer,
                                                                   verifier: BearerVerifier) -> None:
    assert verifier.name == "bearer" and isinstance(verifier, TokenVerifier)
    token = issuer.mint()
    assert await verifier.verify_token(token) == await verifier.verify_token(token)


@pytest.mark.parametrize("algorithm", ["ES256", "ES384", "PS256", "RS256", "EdDSA"])
async def test_every_supported_algorithm_verifies(algorithm: str, clock: FakeClock, make_verifier: Any) -> None:
    async with DevIssuer(algorithm=algorithm, clock=clock) as dev:
        verifier = await make_verifier(dev.issuer_config())
        assert (await verifier.verify_token(dev.mint())).key_id == dev.kid


async def test_create_rejects_unknown_settings(issuer: DevIssuer, make_verifier: Any) -> None:
    with pytest.raises(ConfigurationError):
        await make_verifier(issuer.issuer_config(), settings={"leeway": 5})


async def test_create_needs_an_issuer(make_verifier: Any) -> None:
    with pytest.raises(ConfigurationError):
        await make_verifier()


async def test_token_id_is_a_short_jti_or_a_hash_of_the_token(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    long_jti = issuer.mint(claims={"jti": "j" * 129})
    assert (await verifier.verify_token(long_jti)).token_id == hashlib.sha256(long_jti.encode()).hexdigest()[:16]
    odd_jti = issuer.mint(claims={"jti": "has space"})
    assert (await verifier.verify_token(odd_jti)).token_id == hashlib.sha256(odd_jti.encode()).hexdigest()[:16]


# -- JOSE: parsing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["a.b", "a.b.c.d", "", "a..c", ".b.c"])
async def test_jose_01_only_three_segments(issuer: DevIssuer, verifier: BearerVerifier, shape: str) -> None:
    await rejects(verifier, shape, "malformed_token")
    head, body, sig = issuer.mint().split(".")
    await rejects(verifier, f"{head}.{body}", "malformed_token")
    await rejects(verifier, f"{head}.{body}.{sig}.{sig}", "malformed_token")


async def test_jose_01_jwe_five_segments_is_rejected(verifier: BearerVerifier) -> None:
    header = b64(dumps({"alg": "RSA-OAEP", "enc": "A256GCM", "typ": "at+jwt"}))
    await rejects(verifier, f"{header}.{b64(b'k' * 32)}.{b64(b'iv')}.{b64(b'ct')}.{b64(b'tag')}", "malformed_token")


async def test_at_02_encrypted_token_is_rejected(verifier: BearerVerifier) -> None:
    await test_jose_01_jwe_five_segments_is_rejected(verifier)


@pytest.mark.parametrize("segment", [0, 1, 2])
@pytest.mark.parametrize("damage", ["=", "==", "+", "/", " ", "é", "\n"])
async def test_jose_02_padding_in_segment_is_rejected(issuer: DevIssuer, verifier: BearerVerifier,
                                                      segment: int, damage: str) -> None:
    parts = issuer.mint().split(".")
    parts[segment] = parts[segment] + damage
    await rejects(verifier, ".".join(parts), "malformed_token")


async def test_jose_02_padded_segment_of_a_valid_token_is_rejected(issuer: DevIssuer,
                                                                   verifier: BearerVerifier) -> None:
    token = issuer.mint(claims={"x": "ab"})
    head, body, sig = token.split(".")
    padded = [s + "=" * (-len(s) % 4) for s in (head, body, sig)]
    for index, part in enumerate(padded):
        if part.endswith("="):
            parts = [head, body, sig]
            parts[index] = part
            await rejects(verifier, ".".join(parts), "malformed_token")


async def test_jose_03_non_canonical_signature_is_rejected(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    token = issuer.mint()  # ES256: 64 octets -> 86 characters, the last carries 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    twin = token[:-1] + alphabet[last ^ 1]
    assert unb64(twin.split(".")[2]) == unb64(token.split(".")[2])  # same bytes, other spelling
    await rejects(verifier, twin, "malformed_token")


@pytest.mark.parametrize("where", ["header", "claims"])
async def test_jose_04_bom_and_non_utf8_json_are_rejected(issuer: DevIssuer, verifier: BearerVerifier,
                                                          where: str) -> None:
    token = issuer.mint()
    header, claims = decode(token)
    value = header if where == "header" else claims
    for raw in (b"\xef\xbb\xbf" + dumps(value), json.dumps(value).encode("utf-16"), json.dumps(value).encode("utf-32")):
        await rejects(verifier, resign(issuer, token, **{where: raw}), "malformed_token")


async def test_bcp_06_utf8_only(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    token = issuer.mint()
    claims = json.dumps(decode(token)[1], ensure_ascii=False).replace('"alice"', '"al\u00efce"')
    await rejects(verifier, resign(issuer, token, claims=claims.encode("latin-1")), "malformed_token")


async def test_jose_05_duplicate_members_are_rejected(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    token = issuer.mint()
    header, claims = decode(token)
    dup_header = dumps(header)[:-1] + b',"alg":"ES256"}'
    dup_claims = dumps(claims)[:-1] + b',"sub":"mallory"}'
    await rejects(verifier, resign(issuer, token, header=dup_header), "malformed_token")
    await rejects(verifier, resign(issuer, token, claims=dup_claims), "malformed_token")


@pytest.mark.parametrize("raw", [b'"exp":NaN', b'"exp":Infinity', b'"exp":-Infinity', b'"sub":"\\ud800"'])
async def test_jose_06_non_finite_numbers_and_lone_surrogates_are_rejected(issuer: DevIssuer,
                                                                           verifier: BearerVerifier,
                                                                           raw: bytes) -> None:
    token = issuer.mint()
    claims = {k: v for k, v in decode(token)[1].items() if k not in ("exp", "sub")}
    sub_or_exp = b'"sub":"alice",' if b"exp" in raw else b'"exp":' + str(int(decode(token)[1]["exp"])).encode() + b","
    body = b"{" + sub_or_exp + raw + b"," + dumps(claims)[1:]
    await rejects(verifier, resign(issuer, token, claims=body), "malformed_token")


async def test_jose_06_numeric_dates_beyond_2_pow_53_are_rejected(issuer: DevIssuer,
                                                                   verifier: BearerVerifier) -> None:
    await rejects(verifier, issuer.mint(claims={"exp": 2**60}), "invalid_claim")
    await rejects(verifier, issuer.mint(claims={"exp": 10**400}), "invalid_claim")  # JSON int, too big for a float
    await rejects(verifier, issuer.mint(claims={"exp": 1e300}), "invalid_claim")


@pytest.mark.parametrize("alg", ["es256", "Es256", "ES256 ", "ES-256"])
async def test_jose_07_alg_is_case_sensitive(issuer: DevIssuer, verifier: BearerVerifier, alg: str) -> None:
    await rejects(verifier, issuer.mint(header={"alg": alg}), "unsupported_algorithm")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_jose_08_alg_none_is_rejected(issuer: DevIssuer, verifier: BearerVerifier, alg: str) -> None:
    token = issuer.mint(header={"alg": alg})
    await rejects(verifier, with_signature(token, ""), "unsupported_algorithm", security=True)
    await rejects(verifier, token, "unsupported_algorithm", security=True)


async def test_vec_7519_1_unsecured_jwt_is_rejected(verifier: BearerVerifier) -> None:
    await rejects(verifier, VEC_7519_1, "unsupported_algorithm", security=True)


@pytest.mark.parametrize("crit", [["exp"], [], ["b64"], "exp", ["x-unknown"]])
async def test_jose_09_any_crit_is_rejected(issuer: DevIssuer, verifier: BearerVerifier, crit: Any) -> None:
    await rejects(verifier, issuer.mint(header={"crit": crit, "x-unknown": 1}), "unsupported_crit")


async def test_jose_10_header_keys_and_urls_are_never_used(issuer: DevIssuer, verifier: BearerVerifier,
                                                           clock: FakeClock) -> None:
    async with DevIssuer(issuer.issuer, clock=clock) as attacker:
        jwk = attacker.jwks()["keys"][0]
        smuggled = {"jwk": jwk, "jku": attacker.jwks_uri, "x5u": attacker.jwks_uri, "x5c": ["MIIB"]}
        forged = attacker.mint(header={**smuggled, "kid": issuer.kid})
        await rejects(verifier, forged, "bad_signature")
        forged_without_kid = attacker.mint(header={**smuggled, "kid": None})
        forged_without_kid = resign(attacker, forged_without_kid,
                                    header=dumps({k: v for k, v in decode(forged_without_kid)[0].items() if v}))
        await rejects(verifier, forged_without_kid, "bad_signature")
        assert attacker.fetch_count == 0
        assert (await verifier.verify_token(issuer.mint(header=smuggled))).subject == "alice"


@pytest.mark.parametrize("kid", [None, "", 7, ["k"], {"kid": "k"}, True])
async def test_jwks_02_a_kid_that_is_not_a_non_empty_string_is_malformed_even_when_signed(
    issuer: DevIssuer, verifier: BearerVerifier, kid: Any
) -> None:
    """JWKS-02, RFC 7515 §4.1.4: `kid` is a string; `"kid": null` is no absent kid (JWKS-12 would pick the one key)."""
    token = resign(issuer, issuer.mint(), header={"kid": kid})
    assert decode(token)[0]["kid"] == kid
    await rejects(verifier, token, "malformed_token")


async def test_jose_11_degenerate_ecdsa_signatures_are_rejected(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    token = issuer.mint()
    for signature in (ECDSA_R_S_ZERO, ECDSA_R_S_ORDER, ECDSA_R_S_ZERO_DER, b64(b"\x01" * 65), b64(b"\x01" * 63)):
        await rejects(verifier, with_signature(token, signature), "bad_signature")


async def test_vec_ecdsa_1_degenerate_signatures_in_our_issuers_tokens(issuer: DevIssuer,
                                                                       verifier: BearerVerifier) -> None:
    await test_jose_11_degenerate_ecdsa_signatures_are_rejected(issuer, verifier)


async def test_jose_11_der_encoded_signature_is_rejected(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    token = issuer.mint()
    raw = unb64(token.split(".")[2])
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    await rejects(verifier, with_signature(token, b64(der)), "bad_signature")


# -- JOSE: claims -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["exp", "nbf", "iat", "auth_time"])
@pytest.mark.parametrize("value", ["1750000000", True, False, None, [1750000000], {"v": 1}])
async def test_jose_14_numeric_dates_must_be_numbers(issuer: DevIssuer, verifier: BearerVerifier,
                                                     name: str, value: Any) -> None:
    await rejects(verifier, issuer.mint(claims={name: value}), "invalid_claim")


async def test_jose_14_fractional_numeric_dates_are_accepted(issuer: DevIssuer, verifier: BearerVerifier,
                                                             clock: FakeClock) -> None:
    result = await verifier.verify_token(issuer.mint(claims={"exp": clock.now + 0.5, "iat": clock.now - 0.5}))
    assert result.expires_at == clock.now + 0.5


async def test_jose_15_expired_token_is_rejected_after_the_leeway(issuer: DevIssuer, verifier: BearerVerifier,
                                                                  clock: FakeClock) -> None:
    await rejects(verifier, issuer.mint(claims={"exp": clock.now - 30}), "token_expired")
    await rejects(verifier, issuer.mint(lifetime=-3600), "token_expired")
    assert (await verifier.verify_token(issuer.mint(claims={"exp": clock.now - 29}))).expires_at == clock.now - 29


async def test_at_06_exp_is_required_and_checked(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    await rejects(verifier, issuer.mint(drop=["exp"]), "missing_claim")
    await rejects(verifier, issuer.mint(lifetime=-60), "token_expired")


async def test_jose_16_not_before_is_honoured_with_the_leeway(issuer: DevIssuer, verifier: BearerVerifier,
                                                              clock: FakeClock) -> None:
    await rejects(verifier, issuer.mint(claims={"nbf": clock.now + 31}), "token_not_yet_valid")
    assert (await verifier.verify_token(issuer.mint(claims={"nbf": clock.now + 30}))).not_before == clock.now + 30


async def test_iat_in_the_future_is_rejected(issuer: DevIssuer, verifier: BearerVerifier, clock: FakeClock) -> None:
    await rejects(verifier, issuer.mint(claims={"iat": clock.now + 31}), "token_issued_in_future")
    assert (await verifier.verify_token(issuer.mint(claims={"iat": clock.now + 30}))).issued_at == clock.now + 30


@pytest.mark.parametrize("aud", [[], [1], [API, 2], {"aud": API}, 7, "", None, [None]])
async def test_jose_17_aud_must_be_a_string_or_non_empty_string_array(issuer: DevIssuer, verifier: BearerVerifier,
                                                                       aud: Any) -> None:
    token = issuer.mint(claims={"aud": aud})
    await rejects(verifier, token, "invalid_claim")  # an empty string is no audience at all


async def test_jose_17_aud_array_containing_ours_is_accepted(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    result = await verifier.verify_token(issuer.mint(audience=["https://a.example", API]))
    assert result.audience == ("https://a.example", API)


@pytest.mark.parametrize("aud", [API + "/", API.upper(), API + ".evil.example", API[:-1], " " + API, "api.example.com"])
async def test_jose_18_aud_is_compared_exactly(issuer: DevIssuer, verifier: BearerVerifier, aud: str) -> None:
    await rejects(verifier, issuer.mint(audience=aud), "audience_mismatch")
    await rejects(verifier, issuer.mint(audience=[aud]), "audience_mismatch")


async def test_jose_18_iss_is_compared_exactly(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    for iss in (issuer.issuer + "/", issuer.issuer.upper(), issuer.issuer[:-1], issuer.issuer + " "):
        await rejects(verifier, issuer.mint(claims={"iss": iss}), "unknown_issuer")
    for iss in ([issuer.issuer], {"iss": issuer.issuer}, 1, ""):
        await rejects(verifier, issuer.mint(claims={"iss": iss}), "invalid_claim")


@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/jwt"])
async def test_jose_19_nested_jwt_is_rejected(issuer: DevIssuer, verifier: BearerVerifier, cty: str) -> None:
    await rejects(verifier, issuer.mint(header={"cty": cty}), "malformed_token")


async def test_jose_20_alg_outside_the_issuer_allowlist_is_rejected(issuer: DevIssuer, make_verifier: Any) -> None:
    verifier = await make_verifier(issuer.issuer_config(algorithms=["ES384", "PS256"]))
    await rejects(verifier, issuer.mint(), "unsupported_algorithm")


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "at+JWT", "application/at+jwt", "Application/AT+JWT"])
async def test_jose_21_typ_is_a_case_insensitive_media_type(issuer: DevIssuer, verifier: BearerVerifier,
                                                            typ: str) -> None:
    assert (await verifier.verify_token(issuer.mint(typ=typ))).subject == "alice"


# -- BCP --------------------------------------------------------------------------------------------------

async def test_bcp_01_alg_is_bound_to_the_key_type(issuer: DevIssuer, make_verifier: Any) -> None:
    verifier = await make_verifier(issuer.issuer_config(algorithms=["ES256", "ES384", "RS256", "PS256", "EdDSA"]))
    for alg in ("RS256", "PS256", "ES384", "EdDSA"):  # kid names the ES256 key: any other alg is confusion
        await rejects(verifier, issuer.mint(header={"alg": alg}), "unsupported_algorithm", security=True)


async def test_jwks_04_token_alg_must_equal_the_jwk_alg(clock: FakeClock, make_verifier: Any,
                                                        aiohttp_server: Any) -> None:
    private = rsa.generate_private_key(65537, 2048)
    numbers = private.public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": b64(numbers.n.to_bytes(256, "big")), "e": "AQAB"}
    uri, _ = await serve_jwks(aiohttp_server, {"keys": [jwk]})
    verifier = await make_verifier(table(uri, algorithms=["RS256", "PS256"]))
    token = sign_rsa(private, {"alg": "RS256", "kid": "ps", "typ": "at+jwt"}, claims_for(clock))
    await rejects(verifier, token, "unsupported_algorithm", security=True)
    good = sign_rsa(private, {"alg": "PS256", "kid": "ps", "typ": "at+jwt"}, claims_for(clock), pss=True)
    assert (await verifier.verify_token(good)).key_id == "ps"


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512", "es256"])
async def test_bcp_02_only_current_asymmetric_algorithms_can_be_configured(alg: str) -> None:
    with pytest.raises(ConfigurationError):
        make_config(table("https://as.example.com/jwks", algorithms=["ES256", alg]))


async def test_bcp_03_any_cryptographic_failure_rejects(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    token = issuer.mint()
    head, body, sig = token.split(".")
    flipped = bytearray(unb64(sig))
    flipped[10] ^= 0x01
    await rejects(verifier, f"{head}.{body}.{b64(bytes(flipped))}", "bad_signature")
    other_body = issuer.mint("mallory").split(".")[1]
    await rejects(verifier, f"{head}.{other_body}.{sig}", "bad_signature")


@pytest.mark.parametrize("secret", ["secret", "password", "your-256-bit-secret", ""])
async def test_bcp_05_hmac_with_common_secrets_never_verifies(issuer: DevIssuer, verifier: BearerVerifier,
                                                              secret: str) -> None:
    token = hmac_token(secret.encode(), {"alg": "HS256", "typ": "at+jwt", "kid": issuer.kid}, decode(issuer.mint())[1])
    await rejects(verifier, token, "unsupported_algorithm", security=True)


async def test_bcp_07_key_of_another_issuer_is_never_used(clock: FakeClock, make_verifier: Any) -> None:
    async with DevIssuer(clock=clock) as first, DevIssuer(clock=clock) as second:
        verifier = await make_verifier(first.issuer_config(), second.issuer_config())
        foreign = second.mint(claims={"iss": first.issuer})  # signed with second's key, claims to be first
        await rejects(verifier, foreign, "unknown_key", security=True)
        assert (await verifier.verify_token(second.mint())).issuer == second.issuer
        assert (await verifier.verify_token(first.mint())).issuer == first.issuer


async def test_bcp_09_aud_must_be_present_and_ours(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    await rejects(verifier, issuer.mint(drop=["aud"]), "missing_claim")
    await rejects(verifier, issuer.mint(audience="https://other-rs.example.com"), "audience_mismatch")


@pytest.mark.parametrize("kid", ["../../etc/passwd", "' OR 1=1 --", "http://127.0.0.1:9/jwks", "$(id)", "K"])
async def test_bcp_10_kid_is_only_a_map_key(issuer: DevIssuer, verifier: BearerVerifier, kid: str) -> None:
    await rejects(verifier, issuer.mint(header={"kid": kid}), "unknown_key")


@pytest.mark.parametrize("kid", [1, ["a"], {"k": 1}, "", True])
async def test_bcp_10_non_string_kid_is_malformed(issuer: DevIssuer, verifier: BearerVerifier, kid: Any) -> None:
    await rejects(verifier, issuer.mint(header={"kid": kid}), "malformed_token")


async def test_bcp_11_typ_is_validated(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    await rejects(verifier, issuer.mint(typ=None), "wrong_token_type")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "dpop+jwt", "logout+jwt", "secevent+jwt", "application/jwt",
                                 "at+jwt; x=1", "at+jwt2", 1, ["at+jwt"]])
async def test_bcp_12_other_kinds_of_jwt_are_rejected(issuer: DevIssuer, verifier: BearerVerifier, typ: Any) -> None:
    await rejects(verifier, issuer.mint(typ=typ), "wrong_token_type")


async def test_bcp_13_id_token_is_stopped_by_typ_and_aud(issuer: DevIssuer, make_verifier: Any) -> None:
    id_token = issuer.mint(typ="JWT", audience="demo-client", drop=["client_id", "scope"],
                           claims={"azp": "demo-client", "nonce": "n"})
    strict = await make_verifier(issuer.issuer_config())
    await rejects(strict, id_token, "wrong_token_type")
    legacy = await make_verifier(issuer.issuer_config(profile="jwt"))
    await rejects(legacy, id_token, "audience_mismatch")


async def test_at_12_authorization_claims_reach_the_policy(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    extra = {"groups": ["admins"], "roles": ["r"], "entitlements": ["e"]}
    result = await verifier.verify_token(issuer.mint(scope="a", claims=extra))
    assert {k: result.claims[k] for k in extra} == extra and result.scopes == {"a"}


async def test_at_13_id_token_is_never_accepted(issuer: DevIssuer, make_verifier: Any) -> None:
    await test_bcp_13_id_token_is_stopped_by_typ_and_aud(issuer, make_verifier)


# -- AT (RFC 9068) ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("typ", [None, "JWT", "dpop+jwt", "at+jwt+x"])
async def test_at_01_typ_at_jwt_required(issuer: DevIssuer, verifier: BearerVerifier, typ: str | None) -> None:
    await rejects(verifier, issuer.mint(typ=typ), "wrong_token_type")


async def test_at_03_iss_must_match_a_configured_issuer(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    await rejects(verifier, issuer.mint(drop=["iss"]), "missing_claim")
    await rejects(verifier, issuer.mint(claims={"iss": "https://as.example.com"}), "unknown_issuer")
    await rejects(verifier, issuer.mint(claims={"iss": None}), "invalid_claim")


async def test_at_04_aud_must_name_this_resource(issuer: DevIssuer, make_verifier: Any) -> None:
    verifier = await make_verifier(issuer.issuer_config(audiences=["https://rs-a.example", "https://rs-b.example"]))
    assert (await verifier.verify_token(issuer.mint(audience="https://rs-b.example"))).audience == (
        "https://rs-b.example",)
    await rejects(verifier, issuer.mint(), "audience_mismatch")


async def test_at_05_signature_only_with_the_issuers_published_keys(issuer: DevIssuer, verifier: BearerVerifier,
                                                                    clock: FakeClock) -> None:
    impostor = DevIssuer(issuer.issuer, clock=clock)
    await rejects(verifier, impostor.mint(header={"kid": issuer.kid}), "bad_signature")
    await rejects(verifier, impostor.mint(), "unknown_key")


async def test_at_07_every_failure_is_invalid_token(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    bad = [issuer.mint(typ=None), issuer.mint(lifetime=-100), issuer.mint(audience="x"), "x", "a.b.c",
           issuer.mint(header={"alg": "none"}), VEC_9449_2]
    for token in bad:
        with pytest.raises(InvalidToken) as info:
            await verifier.verify_token(token)
        assert info.value.error == "invalid_token" and info.value.status == 401


@pytest.mark.parametrize("claim", ["iss", "exp", "aud", "sub", "client_id", "iat", "jti"])
async def test_at_08_required_claims(issuer: DevIssuer, verifier: BearerVerifier, claim: str) -> None:
    await rejects(verifier, issuer.mint(drop=[claim]), "missing_claim")


@pytest.mark.parametrize("claim", ["sub", "client_id", "jti"])
@pytest.mark.parametrize("value", [1, "", None, ["x"], {"x": 1}, True])
async def test_at_08_required_string_claims_must_be_non_empty_strings(issuer: DevIssuer, verifier: BearerVerifier,
                                                                      claim: str, value: Any) -> None:
    await rejects(verifier, issuer.mint(claims={claim: value}), "invalid_claim")


async def test_at_09_unsigned_and_mac_tokens_are_rejected(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    claims = decode(issuer.mint())[1]
    header = {"alg": "HS256", "typ": "at+jwt", "kid": issuer.kid}
    await rejects(verifier, hmac_token(b"k" * 32, header, claims), "unsupported_algorithm", security=True)
    unsigned = b64(dumps({"alg": "none", "typ": "at+jwt"})) + "." + b64(dumps(claims)) + "."
    await rejects(verifier, unsigned, "unsupported_algorithm", security=True)


async def test_jose_13_hmac_with_the_public_key_as_secret_is_rejected(issuer: DevIssuer,
                                                                      verifier: BearerVerifier) -> None:
    jwk = issuer.jwks()["keys"][0]
    claims = decode(issuer.mint())[1]
    for alg in ("HS256", "HS384", "HS512", "hs256"):
        token = hmac_token(dumps(jwk), {"alg": alg, "typ": "at+jwt", "kid": issuer.kid}, claims)
        await rejects(verifier, token, "unsupported_algorithm", security=True)


async def test_vec_7515_1_hs256_example_is_rejected(verifier: BearerVerifier) -> None:
    await rejects(verifier, VEC_7515_1, "unsupported_algorithm", security=True)
    assert VEC_7515_1_KEY  # the published key would verify it; it never gets the chance


async def test_at_10_scope_is_a_space_delimited_string(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    assert (await verifier.verify_token(issuer.mint(scope="a b  c"))).scopes == {"a", "b", "c"}
    assert (await verifier.verify_token(issuer.mint())).scopes == frozenset()
    assert (await verifier.verify_token(issuer.mint(scope=""))).scopes == frozenset()
    for scope in (["a", "b"], 1, {"a": 1}, None):
        await rejects(verifier, issuer.mint(claims={"scope": scope}), "invalid_claim")


async def test_at_11_auth_time_acr_amr_are_optional_but_typed(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    plain = await verifier.verify_token(issuer.mint())
    assert plain.auth_time is None and plain.acr is None and plain.amr == ()
    for claims in ({"amr": "pwd"}, {"amr": ["pwd", 1]}, {"amr": {"pwd": 1}}, {"acr": 2}, {"acr": ["a"]},
                   {"auth_time": "1"}, {"cnf": "jkt"}, {"cnf": ["x"]}, {"act": "svc"}):
        await rejects(verifier, issuer.mint(claims=claims), "invalid_claim")


async def test_at_11_cnf_and_act_are_passed_through(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    result = await verifier.verify_token(issuer.mint(cnf={"x5t#S256": "abc"}, claims={"act": {"sub": "a"}}))
    assert dict(result.cnf) == {"x5t#S256": "abc"} and dict(result.actor or {}) == {"sub": "a"}


async def test_at_14_kid_pinning(issuer: DevIssuer, make_verifier: Any, clock: FakeClock) -> None:
    other = issuer.add_key("ES256")
    verifier = await make_verifier(issuer.issuer_config(kids=[issuer.kid]))
    assert (await verifier.verify_token(issuer.mint())).key_id == issuer.kid
    clock.now += 3600
    await rejects(verifier, issuer.mint(key=other), "unknown_key")
    assert issuer.fetch_count == 1


# -- profile "jwt" ----------------------------------------------------------------------------------------

async def test_jwt_profile_accepts_legacy_tokens(issuer: DevIssuer, make_verifier: Any) -> None:
    verifier = await make_verifier(issuer.issuer_config(profile="jwt"))
    for typ in (None, "JWT", "at+jwt"):
        token = issuer.mint(typ=typ, drop=["client_id", "iat", "jti"], claims={"azp": "legacy-client"})
        result = await verifier.verify_token(token)
        assert result.client_id == "legacy-client" and result.issued_at is None
        assert result.token_id == hashlib.sha256(token.encode()).hexdigest()[:16]
    assert (await verifier.verify_token(issuer.mint(claims={"azp": "other"}))).client_id == "demo-client"


async def test_jwt_profile_still_checks_type_signature_and_core_claims(issuer: DevIssuer, make_verifier: Any) -> None:
    verifier = await make_verifier(issuer.issuer_config(profile="jwt"))
    await rejects(verifier, issuer.mint(typ="dpop+jwt"), "wrong_token_type")
    for claim in ("iss", "aud", "exp", "sub"):
        await rejects(verifier, issuer.mint(drop=[claim]), "missing_claim")
    await rejects(verifier, issuer.mint(lifetime=-100), "token_expired")
    await rejects(verifier, issuer.mint(claims={"azp": 1}, drop=["client_id"]), "invalid_claim")


# -- JWKS through the verifier ----------------------------------------------------------------------------

async def serve_jwks(aiohttp_server: Any, document: Any) -> tuple[str, list[int]]:
    hits: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(1)
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/jwks", handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/jwks")), hits


def table(uri: str, **overrides: Any) -> dict[str, Any]:
    return {"issuer": "https://as.example.com", "jwks_uri": uri, "audiences": [API], **overrides}


def claims_for(clock: FakeClock) -> dict[str, Any]:
    now = int(clock.now)
    return {"iss": "https://as.example.com", "sub": "alice", "aud": API, "exp": now + 300, "iat": now,
            "jti": "j1", "client_id": "c"}


def sign_rsa(private: rsa.RSAPrivateKey, header: dict[str, Any], claims: dict[str, Any], *, pss: bool = False) -> str:
    signing_input = f"{b64(dumps(header))}.{b64(dumps(claims))}"
    pad = padding.PSS(padding.MGF1(hashes.SHA256()), 32) if pss else padding.PKCS1v15()
    return f"{signing_input}.{b64(private.sign(signing_input.encode(), pad, hashes.SHA256()))}"


def hmac_token(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{b64(dumps(header))}.{b64(dumps(claims))}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


async def test_jose_12_rsa_1024_key_is_ignored(clock: FakeClock, make_verifier: Any, aiohttp_server: Any) -> None:
    private = rsa.generate_private_key(65537, 1024)
    n = private.public_key().public_numbers().n.to_bytes(128, "big")
    uri, _ = await serve_jwks(aiohttp_server, {"keys": [{"kty": "RSA", "kid": "small", "n": b64(n), "e": "AQAB"}]})
    verifier = await make_verifier(table(uri, algorithms=["RS256"]))
    await rejects(verifier, sign_rsa(private, {"alg": "RS256", "kid": "small", "typ": "at+jwt"}, claims_for(clock)),
                  "unknown_key")
    no_kid = sign_rsa(private, {"alg": "RS256", "typ": "at+jwt"}, claims_for(clock))
    await rejects(verifier, no_kid, "unknown_key")


async def test_jwks_01_unknown_kty_is_skipped_and_good_keys_still_work(issuer: DevIssuer, make_verifier: Any,
                                                                        aiohttp_server: Any) -> None:
    document = {"keys": [{"kty": "XYZ", "kid": "weird"}, *issuer.jwks()["keys"]]}
    uri, _ = await serve_jwks(aiohttp_server, document)
    verifier = await make_verifier(issuer.issuer_config(jwks_uri=uri))
    assert (await verifier.verify_token(issuer.mint())).key_id == issuer.kid
    await rejects(verifier, issuer.mint(header={"kid": "weird"}), "unknown_key")


async def test_jwks_02_kid_is_case_sensitive(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    await rejects(verifier, issuer.mint(header={"kid": issuer.kid.swapcase()}), "unknown_key")


@pytest.mark.parametrize("bad", [{"use": "enc"}, {"key_ops": ["encrypt"]}])
async def test_jwks_03_keys_not_for_verification_are_ignored(issuer: DevIssuer, make_verifier: Any,
                                                             aiohttp_server: Any, bad: dict[str, Any]) -> None:
    uri, _ = await serve_jwks(aiohttp_server, {"keys": [{**issuer.jwks()["keys"][0], **bad}]})
    verifier = await make_verifier(issuer.issuer_config(jwks_uri=uri))
    await rejects(verifier, issuer.mint(), "unknown_key")


async def test_jwks_05_short_ec_coordinate_ignores_the_key(issuer: DevIssuer, make_verifier: Any,
                                                           aiohttp_server: Any) -> None:
    jwk = issuer.jwks()["keys"][0]
    uri, _ = await serve_jwks(aiohttp_server, {"keys": [{**jwk, "x": b64(unb64(jwk["x"])[1:])}]})
    verifier = await make_verifier(issuer.issuer_config(jwks_uri=uri))
    await rejects(verifier, issuer.mint(), "unknown_key")


async def test_jwks_06_non_minimal_rsa_modulus_ignores_the_key(clock: FakeClock, make_verifier: Any,
                                                               aiohttp_server: Any) -> None:
    private = rsa.generate_private_key(65537, 2048)
    n = private.public_key().public_numbers().n.to_bytes(257, "big")  # one leading zero octet
    uri, _ = await serve_jwks(aiohttp_server, {"keys": [{"kty": "RSA", "kid": "r", "n": b64(n), "e": "AQAB"}]})
    verifier = await make_verifier(table(uri, algorithms=["RS256"]))
    await rejects(verifier, sign_rsa(private, {"alg": "RS256", "kid": "r", "typ": "at+jwt"}, claims_for(clock)),
                  "unknown_key")


async def test_jwks_07_oct_key_in_jwks_never_becomes_an_hmac_secret(clock: FakeClock, make_verifier: Any,
                                                                   aiohttp_server: Any) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    uri, _ = await serve_jwks(aiohttp_server, {"keys": [{"kty": "oct", "kid": "h", "k": b64(secret)}]})
    verifier = await make_verifier(table(uri, algorithms=["ES256"]))
    token = hmac_token(secret, {"alg": "HS256", "kid": "h", "typ": "at+jwt"}, claims_for(clock))
    await rejects(verifier, token, "unsupported_algorithm", security=True)
    await rejects(verifier, token.replace(token.split(".")[0], b64(dumps({"alg": "ES256", "kid": "h",
                                                                             "typ": "at+jwt"}))), "unknown_key")


async def test_jwks_11_x5c_and_x5u_in_the_jwks_are_ignored(issuer: DevIssuer, make_verifier: Any,
                                                           aiohttp_server: Any) -> None:
    async with DevIssuer() as elsewhere:
        jwk = {**issuer.jwks()["keys"][0], "x5u": elsewhere.jwks_uri, "x5c": ["bm90IGEgY2VydA=="]}
        uri, _ = await serve_jwks(aiohttp_server, {"keys": [jwk]})
        verifier = await make_verifier(issuer.issuer_config(jwks_uri=uri))
        assert (await verifier.verify_token(issuer.mint())).subject == "alice"
        assert elsewhere.fetch_count == 0


async def test_jwks_12_token_without_kid_needs_exactly_one_fitting_key(issuer: DevIssuer, make_verifier: Any,
                                                                        clock: FakeClock) -> None:
    issuer.add_key("PS256")
    verifier = await make_verifier(issuer.issuer_config())
    kidless = resign(issuer, issuer.mint(), header=dumps({"alg": "ES256", "typ": "at+jwt"}))
    result = await verifier.verify_token(kidless)
    # key_id names the JWKS key that verified it, so a cached result can be dropped when that key leaves
    assert result.key_id == issuer.kid and result.subject == "alice"
    issuer.add_key("ES256")
    clock.now += 60
    ambiguous = await make_verifier(issuer.issuer_config())
    await rejects(ambiguous, kidless, "unknown_key")


async def test_jwks_13_duplicate_kid_is_treated_as_unknown(issuer: DevIssuer, make_verifier: Any,
                                                           aiohttp_server: Any) -> None:
    jwk = issuer.jwks()["keys"][0]
    twin = {**DevIssuer("https://x.example").jwks()["keys"][0], "kid": jwk["kid"]}
    uri, _ = await serve_jwks(aiohttp_server, {"keys": [jwk, twin]})
    verifier = await make_verifier(issuer.issuer_config(jwks_uri=uri))
    await rejects(verifier, issuer.mint(), "unknown_key")


async def test_jwks_10_random_kid_flood_fetches_once_per_cooldown(issuer: DevIssuer, verifier: BearerVerifier,
                                                                  clock: FakeClock) -> None:
    assert issuer.fetch_count == 1
    clock.now += 30
    tokens = [issuer.mint(header={"kid": f"kid-{random.random()}"}) for _ in range(40)]
    results = await asyncio.gather(*(verifier.verify_token(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, InvalidToken) and r.reason == "unknown_key" for r in results)
    assert issuer.fetch_count == 2
    for token in tokens[:10]:
        await rejects(verifier, token, "unknown_key")
    assert issuer.fetch_count == 2
    clock.now += 30
    await rejects(verifier, tokens[0], "unknown_key")  # remembered as unknown: no fetch for it again
    assert issuer.fetch_count == 2
    await rejects(verifier, issuer.mint(header={"kid": "kid-fresh"}), "unknown_key")
    assert issuer.fetch_count == 3


async def test_jwks_10_key_rotation_is_picked_up(issuer: DevIssuer, verifier: BearerVerifier,
                                                 clock: FakeClock) -> None:
    old_token = issuer.mint()
    assert (await verifier.verify_token(old_token)).subject == "alice"
    issuer.rotate_key()
    clock.now += 30
    assert (await verifier.verify_token(issuer.mint("bob"))).subject == "bob"
    assert issuer.fetch_count == 2
    await rejects(verifier, resign(issuer, old_token, header={"kid": "gone"}), "unknown_key")


async def test_jwks_down_at_start_is_unavailable_then_recovers(clock: FakeClock, make_verifier: Any) -> None:
    port = free_port()
    dev = DevIssuer(f"http://127.0.0.1:{port}", clock=clock)
    verifier = await make_verifier({"issuer": dev.issuer, "jwks_uri": f"{dev.issuer}/jwks", "audiences": [API]})
    token = dev.mint()
    with pytest.raises(UpstreamUnavailable) as info:
        await verifier.verify_token(token)
    assert info.value.reason == "jwks_unavailable"
    await dev.start(port=port)
    try:
        clock.now += 30  # whichever comes first, the background retry or a request after the cooldown
        assert (await verifier.verify_token(token)).subject == "alice"
    finally:
        await dev.close()


# -- RFC vectors and robustness ---------------------------------------------------------------------------

async def test_vec_9068_1_mixed_case_typ_and_trailing_slash_audience(clock: FakeClock, make_verifier: Any) -> None:
    async with DevIssuer("https://authorization-server.example.com/", clock=clock, algorithm="RS256",
                         audience="https://rs.example.com/") as dev:
        verifier = await make_verifier(dev.issuer_config())
        token = dev.mint("5ba552d67", typ="at+JWT", client_id="s6BhdRkqt3", scope="openid profile reademail",
                         claims={"jti": "dbe39bf3a3ba4238a513f51d6e1691c4"})
        result = await verifier.verify_token(token)
        assert result.audience == ("https://rs.example.com/",) and result.issuer.endswith("/")
        await rejects(verifier, dev.mint(audience="https://rs.example.com"), "audience_mismatch")
        await rejects(verifier, dev.mint(claims={"iss": "https://authorization-server.example.com"}),
                      "unknown_issuer")
        no_slash = await make_verifier(dev.issuer_config(issuer="https://authorization-server.example.com",
                                                         audiences=["https://rs.example.com"]))
        await rejects(no_slash, token, "unknown_issuer")


async def test_vec_9449_2_opaque_token_is_invalid_never_an_exception(verifier: BearerVerifier) -> None:
    await rejects(verifier, VEC_9449_2, "malformed_token")


async def test_vec_9449_6_foreign_as_token_is_rejected(verifier: BearerVerifier) -> None:
    token = ("eyJhbGciOiJFUzI1NiIsImtpZCI6IkJlQUxrYiJ9.eyJzdWIiOiJzb21lb25lQGV4YW1wbGUuY29tIiwiaXNzIjoiaHR0cHM6Ly9zZXJ"
             "2ZXIuZXhhbXBsZS5jb20iLCJuYmYiOjE1NjIyNjI2MTEsImV4cCI6MTU2MjI2NjIxNiwiY25mIjp7ImprdCI6IjBaY09DT1JaTll5LUR"
             "XcHFxMzBqWnlKR0hUTjBkMkhnbEJWM3VpZ3VBNEkifX0.3Tyo8VTcn6u_PboUmAOYUY1kfAavomW_YwYMkmRNizLJoQzWy2fCo79Zi5"
             "yObpIzjWb5xW4OGld7ESZrh0fsrA")
    await rejects(verifier, token, "unknown_issuer")


async def test_mutated_tokens_only_ever_raise_invalid_token(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    token = issuer.mint(scope="read")
    rng = random.Random(9068)
    alphabet = "ABCxyz019-_.=+/~ \x00é{}\"\\"
    for _ in range(400):
        chars = list(token)
        for _ in range(rng.randint(1, 3)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        mutated = "".join(chars)
        if mutated == token:  # the random character happened to be the one already there
            continue
        with pytest.raises(InvalidToken):
            await verifier.verify_token(mutated)


@pytest.mark.parametrize("value", ["", ".", "..", "...", "\x00", "é.é.é", "a" * 20000, None, 5, b"a.b.c"])
async def test_garbage_is_invalid_token(verifier: BearerVerifier, value: Any) -> None:
    with pytest.raises(InvalidToken):
        await verifier.verify_token(value)


@pytest.mark.parametrize("claims", [{"exp": 10**400}, {"sub": "a" * 10}, {"aud": [[API]]}, {"nested": [[[[[]]]]]}])
async def test_odd_but_wellformed_json_never_escapes(issuer: DevIssuer, verifier: BearerVerifier,
                                                     claims: dict[str, Any]) -> None:
    try:
        await verifier.verify_token(issuer.mint(claims=claims))
    except InvalidToken:
        pass


async def test_deeply_nested_json_is_invalid_token(issuer: DevIssuer, verifier: BearerVerifier) -> None:
    token = issuer.mint()
    body = dumps(decode(token)[1])[:-1] + b',"deep":' + b"[" * 100000 + b"]" * 100000 + b"}"
    head = token.split(".")[0]
    signed = issuer.sign(unb64(head), body)
    await rejects(verifier, signed, "malformed_token")


# -- the inline claim checks (integer NumericDates, string aud) answer what the generic readers answer ------

@pytest.mark.parametrize("claims, reason", [
    ({"exp": "T-30"}, "token_expired"), ({"exp": "T-29"}, None),
    ({"nbf": "T+31"}, "token_not_yet_valid"), ({"nbf": "T+30"}, None),
    ({"iat": "T+31"}, "token_issued_in_future"), ({"iat": "T+30"}, None),
    ({"exp": 2**53}, "invalid_claim"), ({"exp": 2**53 - 1}, None), ({"nbf": -(2**53)}, "invalid_claim"),
    ({"iat": 2**53}, "invalid_claim"), ({"nbf": None}, "invalid_claim"), ({"iat": None}, "invalid_claim"),
    ({"exp": "T-30", "nbf": "T+31"}, "token_expired"), ({"exp": "T-30", "nbf": "x"}, "invalid_claim"),
    ({"nbf": "T+31", "iat": True}, "invalid_claim"), ({"nbf": "T+31", "iat": "T+31"}, "token_not_yet_valid"),
    ({"exp": "T-30", "aud": 5}, "token_expired"), ({"aud": ""}, "invalid_claim"),
    ({"aud": "https://other.example.com"}, "audience_mismatch"), ({"aud": "https://other.example.com",
                                                                   "client_id": 5}, "audience_mismatch"),
    ({"client_id": ""}, "invalid_claim"), ({"client_id": 5}, "invalid_claim"), ({"client_id": None}, "invalid_claim"),
    ({"client_id": "", "sub": ""}, "invalid_claim"),
])
async def test_integer_dates_and_string_aud_keep_the_generic_reasons(
        issuer: DevIssuer, verifier: BearerVerifier, clock: FakeClock, claims: dict[str, Any],
        reason: str | None) -> None:
    now = int(clock.now)
    values = {name: now + int(value[1:]) if isinstance(value, str) and value.startswith("T") else value
              for name, value in claims.items()}
    token = issuer.mint(claims=values)
    if reason is None:
        await verifier.verify_token(token)
    else:
        await rejects(verifier, token, reason)


async def test_integer_and_float_dates_give_equal_results(issuer: DevIssuer, verifier: BearerVerifier,
                                                          clock: FakeClock) -> None:
    now = int(clock.now)
    as_int = {"exp": now + 60, "nbf": now - 5, "iat": now - 5}
    as_float = {name: float(value) for name, value in as_int.items()}
    common = {"jti": "same", "aud": API}
    first = await verifier.verify_token(issuer.mint(claims={**as_int, **common}))
    second = await verifier.verify_token(issuer.mint(claims={**as_float, **common}))
    assert dataclasses.replace(first, claims={}) == dataclasses.replace(second, claims={})
    assert (first.expires_at, first.not_before, first.issued_at) == (now + 60.0, now - 5.0, now - 5.0)
    assert type(first.expires_at) is float and type(first.not_before) is float and type(first.issued_at) is float
