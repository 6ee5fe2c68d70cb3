"""The `dpop` binding verifier: one named test per checklist item (§6 JKT, §7 DPOP) and the RFC vectors (§14).

Proofs come from `ztmw.testing.dpop`, which signs with `cryptography` directly, so the verifier is never
tested against itself. Time is a small mutable fake clock; nothing we own is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from ztmw_plugins.dpop import DPoPVerifier, create, normalize_uri

from ztmw import jws
from ztmw.config import Config, DPoPConfig, ResourceConfig
from ztmw.errors import (
    ConfigurationError,
    InvalidDPoPProof,
    InvalidToken,
    TokenBindingMismatch,
    UpstreamUnavailable,
    UseDPoPNonce,
)
from ztmw.extract import extract_credential
from ztmw.models import Credential, RequestView, VerifiedToken
from ztmw.testing.dpop import OMIT, DPoPKey, access_token_hash
from ztmw.typing import PluginDeps

ORIGIN = "https://api.example.com"
PATH = "/accounts/42"
URL = ORIGIN + PATH
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
NOW = 1_700_000_000.0
SECRET_ENV = "ZTMW_TEST_DPOP_NONCE_SECRET"
LOG = logging.getLogger("ztmw.test.dpop")

# RFC 9449, 7638 and 8037 vectors (checklist §14), verbatim; long strings are split, never changed
VEC_9449_1_JWK = {
    "kty": "EC",
    "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
    "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
    "crv": "P-256",
}
VEC_9449_1_HASH_INPUT = (
    '{"crv":"P-256","kty":"EC","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o'
    '64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}'
)
VEC_9449_1_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
VEC_9449_2_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
VEC_9449_2_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
VEC_9449_5_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNo"
    "UklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERW"
    "clUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR"
    "1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCw"
    "iYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-E"
    "y71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA"
)
VEC_9449_7 = {
    "active": True,
    "sub": "someone@example.com",
    "iss": "https://server.example.com",
    "nbf": 1562262611,
    "exp": 1562266216,
    "cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"},
}
VEC_7638_1_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
VEC_7638_1_HASH_INPUT = (
    '{"e":"AQAB","kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86'
    "zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6"
    "Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08"
    "qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqD"
    'Kgw"}'
)
VEC_7638_1_SHA256 = [
    55, 54, 203, 177, 120, 124, 184, 48, 156, 119, 238, 140, 55, 5, 197, 225, 111, 251, 158, 133, 151,
    21, 144, 31, 30, 76, 89, 177, 17, 130, 245, 123
]
VEC_7638_1_JKT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
VEC_8037_1_JWK = {
    "kty": "OKP",
    "crv": "Ed25519",
    "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
}
VEC_8037_1_HASH_INPUT = '{"crv":"Ed25519","kty":"OKP","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}'
VEC_8037_1_JKT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def no_http() -> Any:
    raise AssertionError("the dpop plugin must never make HTTP requests")


def bound_token(jkt: Any, *, lifetime: float = 600, clock: float = NOW) -> VerifiedToken:
    return VerifiedToken(issuer="https://as.example.com", subject="alice", audience=(ORIGIN,),
                         expires_at=clock + lifetime, issued_at=clock, token_id="t-1", verifier="bearer",
                         cnf={"jkt": jkt})


@dataclass
class Env:
    """One verifier wired exactly as the core wires it (through `create`), plus a client key and a clock."""

    verifier: DPoPVerifier
    clock: FakeClock
    key: DPoPKey
    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def proof(self, *, key: DPoPKey | None = None, method: str = "GET", url: str = URL, **kwargs: Any) -> str:
        kwargs.setdefault("access_token", TOKEN)
        kwargs.setdefault("iat", int(self.clock.now))
        return (key or self.key).proof(method, url, **kwargs)

    async def confirm(self, *proofs: str, method: str = "GET", path: str = PATH, token: str = TOKEN,
                      jkt: Any = None, scheme: str = "dpop", verified: VerifiedToken | None = None) -> str:
        verified = verified or bound_token(self.key.thumbprint if jkt is None else jkt, clock=self.clock.now)
        request = RequestView(method=method, path=path, route=None, dpop=proofs)
        return await self.verifier.confirm(verified, Credential(scheme=scheme, token=token), request)

    async def reject(self, exc: type[Exception], reason: str, *proofs: str, **kwargs: Any) -> Any:
        with pytest.raises(exc) as info:
            await self.confirm(*proofs, **kwargs)
        assert getattr(info.value, "reason", None) == reason
        return info.value


def make_env(*, origin: str = ORIGIN, settings: dict[str, Any] | None = None, clock: FakeClock | None = None,
             key: DPoPKey | None = None, **dpop: Any) -> Env:
    # Config is built directly (not through load_config) so these tests pin the plugin, not config parsing.
    dpop.setdefault("nonce_secret_env", SECRET_ENV)
    config = Config(resource=ResourceConfig(identifier=origin, public_origin=origin), dpop=DPoPConfig(**dpop))
    clock = clock or FakeClock()
    startup: list[Callable[[], Awaitable[None]]] = []
    cleanup: list[Callable[[], Awaitable[None]]] = []
    deps = PluginDeps(config=config, clock=clock, http=no_http, logger=LOG,
                      on_startup=startup.append, on_cleanup=cleanup.append)
    verifier = create(settings or {}, deps)
    return Env(verifier, clock, key or DPoPKey(), startup, cleanup)


@pytest.fixture
def env() -> Env:
    return make_env()


@pytest.fixture
def nonce_env(monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv(SECRET_ENV, "n" * 32)
    return make_env(require_nonce=True)


@pytest.fixture(scope="module")
def rsa_key() -> DPoPKey:
    return DPoPKey("PS256")


# -- the plugin object ---------------------------------------------------------------------------------------


def test_plugin_shape(env: Env) -> None:
    assert (env.verifier.name, env.verifier.cnf_member, env.verifier.scheme) == ("dpop", "jkt", "dpop")


def test_unknown_plugin_setting_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="replay_max_entrie"):
        make_env(settings={"replay_max_entrie": 10})


@pytest.mark.parametrize("settings", [{"replay_max_entries": 0}, {"replay_max_entries": True},
                                      {"redis_timeout": 0}, {"redis_timeout": "1"}])
def test_bad_plugin_setting_values(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        make_env(settings=settings)


def test_lifetime_hooks_are_registered(env: Env) -> None:
    assert len(env.startup) == 1 and len(env.cleanup) == 1


async def test_valid_proof_returns_the_matched_jkt(env: Env) -> None:
    assert await env.confirm(env.proof()) == env.key.thumbprint


@pytest.mark.parametrize("kind", ["ES256", "EdDSA"])
async def test_each_default_algorithm_is_accepted(env: Env, kind: str) -> None:
    key = DPoPKey(kind)  # type: ignore[arg-type]
    assert await env.confirm(env.proof(key=key), jkt=key.thumbprint) == key.thumbprint


async def test_ps256_is_accepted(env: Env, rsa_key: DPoPKey) -> None:
    assert await env.confirm(env.proof(key=rsa_key), jkt=rsa_key.thumbprint) == rsa_key.thumbprint


# -- §6 JWK thumbprints -------------------------------------------------------------------------------------


async def test_jkt_01_only_required_members_enter_the_thumbprint(env: Env) -> None:
    assert jws.thumbprint(jws.import_public_jwk(VEC_7638_1_JWK)) == VEC_7638_1_JKT  # alg and kid ignored
    jwk = dict(env.key.jwk, alg="ES256", kid="client-key-1", use="sig")
    assert await env.confirm(env.proof(header_overrides={"jwk": jwk})) == env.key.thumbprint


async def test_jkt_02_members_sorted_no_whitespace_member_order_irrelevant(env: Env) -> None:
    for jwk, hash_input, expected in ((VEC_7638_1_JWK, VEC_7638_1_HASH_INPUT, VEC_7638_1_JKT),
                                      (VEC_8037_1_JWK, VEC_8037_1_HASH_INPUT, VEC_8037_1_JKT),
                                      (VEC_9449_1_JWK, VEC_9449_1_HASH_INPUT, VEC_9449_1_JKT)):
        assert b64(hashlib.sha256(hash_input.encode()).digest()) == expected
        assert jws.thumbprint(jws.import_public_jwk(jwk)) == expected
    reordered = dict(reversed(list(env.key.jwk.items())))
    assert await env.confirm(env.proof(header_overrides={"jwk": reordered})) == env.key.thumbprint


def test_jkt_03_private_jwk_has_the_public_thumbprint() -> None:
    key = DPoPKey()
    assert jws.thumbprint(jws.import_public_jwk(key.private_jwk, allow_private=True)) == key.thumbprint


def test_jkt_04_sha256_unpadded_base64url_43_chars() -> None:
    assert list(hashlib.sha256(VEC_7638_1_HASH_INPUT.encode()).digest()) == VEC_7638_1_SHA256
    thumb = jws.thumbprint(jws.import_public_jwk(VEC_9449_1_JWK))
    assert thumb == VEC_9449_1_JKT and len(thumb) == 43 and "=" not in thumb


@pytest.mark.parametrize("jkt", [
    VEC_9449_1_JKT + "=",                      # padded
    VEC_9449_1_JKT[:-1],                       # 42 characters
    VEC_9449_1_JKT + "A",                      # 44 characters
    "0ZcOCORZNYy+DWpqq30jZyJGHTN0d2HglBV3uiguA4I",  # standard base64 alphabet
    "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4J",  # non-canonical: unused trailing bits set
    hashlib.sha256(b"x").hexdigest(),          # hex digest, 64 characters
    42, None, ["x"], {"jkt": VEC_9449_1_JKT}, "",
])
async def test_jkt_05_malformed_cnf_jkt_is_invalid_token(env: Env, jkt: Any) -> None:
    verified = VerifiedToken(issuer="i", subject="s", audience=(), expires_at=NOW + 60, token_id="t",
                             verifier="bearer", cnf={"jkt": jkt})
    error = await env.reject(InvalidToken, "invalid_claim", env.proof(), verified=verified)
    assert error.error == "invalid_token" and error.scheme == "dpop"


async def test_jkt_05_other_thumbprint_is_a_constant_time_mismatch(env: Env) -> None:
    other = VEC_9449_1_JKT
    await env.reject(TokenBindingMismatch, "dpop_key_mismatch", env.proof(), jkt=other)


async def test_jkt_06_non_canonical_jwk_spelling_is_refused(env: Env) -> None:
    jwk = env.key.jwk
    padded_x = dict(jwk, x=b64(b"\x00" + jws.b64url_decode(jwk["x"])))  # 33 bytes: a second spelling of x
    await env.reject(InvalidDPoPProof, "dpop_bad_key", env.proof(header_overrides={"jwk": padded_x}))


async def test_jkt_06_rsa_modulus_with_leading_zero_is_refused(env: Env, rsa_key: DPoPKey) -> None:
    jwk = dict(rsa_key.jwk, n=b64(b"\x00" + jws.b64url_decode(rsa_key.jwk["n"])))
    await env.reject(InvalidDPoPProof, "dpop_bad_key", env.proof(key=rsa_key, header_overrides={"jwk": jwk}),
                     jkt=rsa_key.thumbprint)


# -- §7 DPoP -----------------------------------------------------------------------------------------------


async def test_dpop_01_more_than_one_dpop_header_is_invalid_dpop_proof_not_400(env: Env) -> None:
    error = await env.reject(InvalidDPoPProof, "dpop_multiple_proofs", env.proof(), env.proof())
    assert error.status == 401 and error.error == "invalid_dpop_proof"


@pytest.mark.parametrize("mangle", [
    lambda p: p + "," + p,                      # two proofs joined into one field
    lambda p: p + ", " + p,
    lambda p: p.rsplit(".", 1)[0],              # two segments
    lambda p: p + ".x.y",                       # five segments (JWE shape)
    lambda p: " " + p,
    lambda p: p[:5] + "+" + p[6:],             # outside the base64url alphabet
    lambda p: "not a jwt",
    lambda p: "",
    lambda p: b64(b"[1]") + "." + p.split(".", 1)[1],  # header is not an object
    lambda p: b64(b'{"alg":"ES256","alg":"ES256"}') + "." + p.split(".", 1)[1],  # duplicate member
])
async def test_dpop_02_value_is_a_single_well_formed_jwt(env: Env, mangle: Callable[[str], str]) -> None:
    await env.reject(InvalidDPoPProof, "dpop_malformed", mangle(env.proof()))


@pytest.mark.parametrize("claim", ["jti", "htm", "htu", "iat", "ath"])
async def test_dpop_03_required_claims_present(env: Env, claim: str) -> None:
    await env.reject(InvalidDPoPProof, "dpop_missing_claim", env.proof(extra_claims={claim: OMIT}))


async def test_dpop_03_nonce_missing_once_required_is_use_dpop_nonce(nonce_env: Env) -> None:
    error = await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof())
    assert error.nonce and error.status == 401 and error.error == "use_dpop_nonce"


@pytest.mark.parametrize("typ", [OMIT, "jwt", "JWT", "at+jwt", "dpop", "application/jwt", 7, None])
async def test_dpop_04_typ_must_be_dpop_jwt(env: Env, typ: Any) -> None:
    await env.reject(InvalidDPoPProof, "dpop_wrong_typ", env.proof(header_overrides={"typ": typ}))


@pytest.mark.parametrize("typ", ["DPoP+JWT", "application/dpop+jwt"])
async def test_dpop_04_typ_compares_as_a_media_type(env: Env, typ: str) -> None:
    assert await env.confirm(env.proof(header_overrides={"typ": typ}))


@pytest.mark.parametrize("alg", ["none", "HS256", "es256", "ES384", "RS256", "ES256K", "", "Ed448"])
async def test_dpop_05_alg_must_be_an_allowed_asymmetric_algorithm(env: Env, alg: str) -> None:
    await env.reject(InvalidDPoPProof, "dpop_bad_alg", env.proof(header_overrides={"alg": alg}))


async def test_dpop_05_alg_must_fit_the_key_type(env: Env) -> None:
    ed = DPoPKey("EdDSA")
    await env.reject(InvalidDPoPProof, "dpop_bad_alg", env.proof(key=ed, header_overrides={"alg": "ES256"}),
                     jkt=ed.thumbprint)


async def test_dpop_05_hs256_with_the_public_key_as_secret_is_refused(env: Env) -> None:
    import hmac as _hmac

    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": env.key.jwk}
    claims = {"jti": "x", "htm": "GET", "htu": URL, "iat": int(NOW), "ath": access_token_hash(TOKEN)}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    mac = _hmac.new(json.dumps(env.key.jwk).encode(), signing_input.encode(), hashlib.sha256).digest()
    await env.reject(InvalidDPoPProof, "dpop_bad_alg", f"{signing_input}.{b64(mac)}")


async def test_dpop_06_signature_must_verify_with_the_header_jwk(env: Env) -> None:
    other = DPoPKey()
    forged = env.proof(key=other, header_overrides={"jwk": env.key.jwk})  # claims env.key, signed by other
    await env.reject(InvalidDPoPProof, "dpop_bad_signature", forged)


async def test_dpop_06_a_header_checked_before_still_needs_a_signature_by_its_key(env: Env) -> None:
    """The checked header (key, thumbprint) is remembered by its text; every proof is still verified."""
    assert await env.confirm(env.proof()) == env.key.thumbprint  # the header is now remembered
    forged = env.proof(key=DPoPKey(), header_overrides={"jwk": env.key.jwk})
    assert forged.split(".")[0] == env.proof().split(".")[0]  # the very same header text
    await env.reject(InvalidDPoPProof, "dpop_bad_signature", forged)
    assert await env.confirm(env.proof()) == env.key.thumbprint


async def test_dpop_06_a_refused_header_is_refused_again(env: Env) -> None:
    bad = env.proof(header_overrides={"jwk": {**env.key.jwk, "d": "AAAA"}})
    for _ in range(2):  # nothing about a refused header is remembered
        await env.reject(InvalidDPoPProof, "dpop_private_key", bad)


async def test_dpop_10_ath_from_the_extracted_digest(env: Env) -> None:
    """The hash extraction made of the token (the verification cache's key) is the one `ath` is checked on."""
    view = RequestView(method="GET", path=PATH, route=None, authorization=(f"DPoP {TOKEN}",),
                       dpop=(env.proof(),))
    credential = extract_credential(view, schemes=frozenset({"bearer", "dpop"}))
    assert credential is not None and credential.digest == hashlib.sha256(TOKEN.encode()).digest()
    verified = bound_token(env.key.thumbprint, clock=env.clock.now)
    assert await env.verifier.confirm(verified, credential, view) == env.key.thumbprint
    other = env.proof(access_token=TOKEN + "x")
    view = RequestView(method="GET", path=PATH, route=None, authorization=(f"DPoP {TOKEN}",), dpop=(other,))
    with pytest.raises(InvalidDPoPProof) as info:
        await env.verifier.confirm(verified, credential, view)
    assert info.value.reason == "dpop_ath_mismatch"


async def test_dpop_06_tampered_payload_fails_the_signature(env: Env) -> None:
    header, _, signature = env.proof().split(".")
    claims = {"jti": "x", "htm": "GET", "htu": URL, "iat": int(NOW), "ath": access_token_hash(TOKEN)}
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    await env.reject(InvalidDPoPProof, "dpop_bad_signature", tampered)


@pytest.mark.parametrize("signature", [
    "A" * 86,                   # VEC-ECDSA-1 r=s=0, raw R||S (86 "A"s)
    "MAYCAQACAQA",              # VEC-ECDSA-1 r=s=0 as DER
    "_____wAAAAD__________7zm-q2nF56E87nKwvxjJVH_____AAAAAP__________vOb6racXnoTzucrC_GMlUQ",  # r=s=n
])
async def test_dpop_06_degenerate_ecdsa_signatures_are_refused(env: Env, signature: str) -> None:
    header, payload, _ = env.proof().split(".")
    await env.reject(InvalidDPoPProof, "dpop_bad_signature", f"{header}.{payload}.{signature}")


async def test_dpop_06_kid_jku_x5u_x5c_are_ignored_as_key_sources(env: Env) -> None:
    # the plugin has no HTTP client (no_http raises), so accepting proves nothing was fetched
    overrides = {"kid": "attacker", "jku": "https://attacker.example/jwks",
                 "x5u": "https://attacker.example/c", "x5c": ["MIIB"]}
    assert await env.confirm(env.proof(header_overrides=overrides)) == env.key.thumbprint


async def test_dpop_06_missing_jwk_is_refused(env: Env) -> None:
    proof = env.proof(header_overrides={"jwk": OMIT, "kid": "k"})
    await env.reject(InvalidDPoPProof, "dpop_missing_jwk", proof)


@pytest.mark.parametrize("kind", ["ES256", "EdDSA"])
async def test_dpop_07_private_key_in_jwk_is_refused(env: Env, kind: str) -> None:
    key = DPoPKey(kind)  # type: ignore[arg-type]
    proof = env.proof(key=key, header_overrides={"jwk": key.private_jwk})
    await env.reject(InvalidDPoPProof, "dpop_private_key", proof, jkt=key.thumbprint)


async def test_dpop_07_rsa_private_members_are_refused(env: Env, rsa_key: DPoPKey) -> None:
    for member in ("d", "p", "q", "dp", "dq", "qi", "oth"):
        jwk = dict(rsa_key.jwk, **{member: rsa_key.private_jwk.get(member, "AQAB")})
        proof = env.proof(key=rsa_key, header_overrides={"jwk": jwk})
        await env.reject(InvalidDPoPProof, "dpop_private_key", proof, jkt=rsa_key.thumbprint)


async def test_dpop_07_symmetric_jwk_is_refused(env: Env) -> None:
    jwk = {"kty": "oct", "k": b64(os.urandom(32))}
    await env.reject(InvalidDPoPProof, "dpop_private_key", env.proof(header_overrides={"jwk": jwk}))


@pytest.mark.parametrize("htm,method", [("get", "GET"), ("POST", "GET"), ("GET", "HEAD"), ("GET ", "GET")])
async def test_dpop_08_htm_must_match_method(env: Env, htm: str, method: str) -> None:
    await env.reject(InvalidDPoPProof, "dpop_htm_mismatch", env.proof(method=htm), method=method)


async def test_dpop_08_htm_matches_other_methods(env: Env) -> None:
    assert await env.confirm(env.proof(method="DELETE"), method="DELETE")


@pytest.mark.parametrize("htu,path", [
    ("HTTPS://API.EXAMPLE.COM/accounts/42", PATH),          # scheme and host case
    ("https://api.example.com:443/accounts/42", PATH),      # default port
    ("https://api.example.com:/accounts/42", PATH),         # empty port
    ("https://api.example.com/%61ccounts/42", PATH),        # percent-encoded unreserved character
    ("https://api.example.com/accounts/./x/../42", PATH),   # dot segments
    ("https://api.example.com/accounts/%7Euser", "/accounts/~user"),
    ("https://api.example.com/a%2fb", "/a%2Fb"),            # reserved stays encoded; hex case normalised
    ("https://api.example.com", "/"),                       # empty path is /
    ("https://api.example.com/", ""),
])
async def test_dpop_09_htu_matches_after_rfc3986_normalisation(env: Env, htu: str, path: str) -> None:
    assert await env.confirm(env.proof(url=htu), path=path)


@pytest.mark.parametrize("htu", [
    "http://api.example.com/accounts/42",                   # scheme
    "https://api.example.com:8443/accounts/42",             # port
    "https://other.example.com/accounts/42",                # host
    "https://api.example.com/accounts/43",                  # path
    "https://api.example.com/Accounts/42",                  # path is case-sensitive
    "https://api.example.com/accounts/42/",                 # trailing slash
    "https://api.example.com/accounts%2F42",                # encoded reserved character
    "https://user@api.example.com/accounts/42",             # userinfo
    "/accounts/42",                                         # relative
    "api.example.com/accounts/42",
    "wss://api.example.com/accounts/42",
    "https://api.example.com:99999999999999999/accounts/42",
])
async def test_dpop_09_htu_mismatch_is_refused(env: Env, htu: str) -> None:
    await env.reject(InvalidDPoPProof, "dpop_htu_mismatch", env.proof(url=htu))


@pytest.mark.parametrize("htu", [URL + "?a=1", URL + "?", URL + "#frag", URL + "#"])
async def test_dpop_10_htu_with_query_or_fragment_is_refused(env: Env, htu: str) -> None:
    await env.reject(InvalidDPoPProof, "dpop_htu_mismatch", env.proof(url=htu))


async def test_dpop_10_request_uri_comes_from_the_configured_public_origin() -> None:
    env = make_env(origin="https://public.example.com")
    # a proof for the host a client (or a spoofed Host / X-Forwarded-Host) names is not for this resource
    await env.reject(InvalidDPoPProof, "dpop_htu_mismatch", env.proof(url="https://internal:8080" + PATH))
    assert await env.confirm(env.proof(url="https://public.example.com" + PATH))


async def test_dpop_11_valid_nonce_accepted_and_wrong_nonce_gets_a_fresh_one(nonce_env: Env) -> None:
    rfc_example_nonce = "eyJ7S_zG.eyJH0-Z.HX4w-7v"  # VEC-9449-9: well-formed, but not one of ours
    proof = nonce_env.proof(nonce=rfc_example_nonce)
    error = await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", proof)
    assert await nonce_env.confirm(nonce_env.proof(nonce=error.nonce)) == nonce_env.key.thumbprint


async def test_dpop_11_stale_nonce_gets_use_dpop_nonce(nonce_env: Env) -> None:
    error = await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof())
    nonce_env.clock.now += 120  # two windows later
    fresh = await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof(nonce=error.nonce))
    assert fresh.nonce != error.nonce


async def test_dpop_11_previous_window_nonce_is_accepted_and_rolled_over(nonce_env: Env) -> None:
    nonce = (await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof())).nonce
    proof = nonce_env.proof(nonce=nonce)
    request = RequestView(method="GET", path=PATH, route=None, dpop=(proof,))
    assert nonce_env.verifier.response_headers(request, True) == {}
    nonce_env.clock.now += 60
    proof = nonce_env.proof(nonce=nonce)
    assert await nonce_env.confirm(proof)
    headers = nonce_env.verifier.response_headers(RequestView("GET", PATH, None, dpop=(proof,)), True)
    assert set(headers) == {"DPoP-Nonce"} and headers["DPoP-Nonce"] != nonce
    assert await nonce_env.confirm(nonce_env.proof(nonce=headers["DPoP-Nonce"]))


async def test_sec_03_a_rolled_over_proof_is_remembered_by_digest_only(nonce_env: Env) -> None:
    """Between `confirm` and `response_headers` the verifier remembers which proof needs a fresh nonce: by a
    hash, so no proof sits in its memory (and a second response for the same proof gets no second nonce)."""
    from tests.reachable import texts_of

    nonce = (await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof())).nonce
    nonce_env.clock.now += 60
    proof = nonce_env.proof(nonce=nonce)
    assert await nonce_env.confirm(proof)
    texts: list[str] = []
    texts_of(nonce_env.verifier, texts)
    assert texts and not any(proof in text or proof.split(".")[2] in text for text in texts)
    request = RequestView("GET", PATH, None, dpop=(proof,))
    assert set(nonce_env.verifier.response_headers(request, True)) == {"DPoP-Nonce"}
    assert nonce_env.verifier.response_headers(request, True) == {}


def test_dpop_11_response_headers_are_empty_without_nonces(env: Env) -> None:
    request = RequestView(method="GET", path=PATH, route=None, dpop=(env.proof(nonce="abc"),))
    assert env.verifier.response_headers(request, True) == {}
    assert env.verifier.response_headers(RequestView("GET", PATH, None), False) == {}


def test_dpop_11_response_headers_never_raise_on_junk(nonce_env: Env) -> None:
    for dpop in [(), ("junk",), ("a.b.c",), (nonce_env.proof(), nonce_env.proof()), ("x" * 10000,)]:
        assert nonce_env.verifier.response_headers(RequestView("GET", PATH, None, dpop=dpop), False) == {}


@pytest.mark.parametrize("offset,ok", [(-60, True), (-61, False), (5, True), (6, False), (0, True),
                                       (-0.5, True), (-3600, False), (86400, False)])
async def test_dpop_12_iat_within_max_age_back_and_clock_skew_forward(
        env: Env, offset: float, ok: bool) -> None:
    proof = env.proof(iat=NOW + offset)
    if ok:
        assert await env.confirm(proof)
    else:
        await env.reject(InvalidDPoPProof, "dpop_iat_out_of_window", proof)


@pytest.mark.parametrize("iat", [str(int(NOW)), True, None, [NOW], 1e300, -1e300, 2**53 + 2])
async def test_dpop_12_iat_must_be_a_numeric_date(env: Env, iat: Any) -> None:
    await env.reject(InvalidDPoPProof, "dpop_invalid_claim", env.proof(extra_claims={"iat": iat}))


async def test_dpop_12_window_follows_configuration() -> None:
    env = make_env(max_age=10, clock_skew=0)
    await env.reject(InvalidDPoPProof, "dpop_iat_out_of_window", env.proof(iat=NOW - 11))
    await env.reject(InvalidDPoPProof, "dpop_iat_out_of_window", env.proof(iat=NOW + 1))
    assert await env.confirm(env.proof(iat=NOW - 10))


async def test_dpop_13_ath_must_hash_the_presented_token(env: Env) -> None:
    await env.reject(InvalidDPoPProof, "dpop_ath_mismatch", env.proof(access_token="another-token"))
    padded = access_token_hash(TOKEN) + "="
    await env.reject(InvalidDPoPProof, "dpop_ath_mismatch", env.proof(extra_claims={"ath": padded}))
    hexdigest = hashlib.sha256(TOKEN.encode()).hexdigest()
    await env.reject(InvalidDPoPProof, "dpop_ath_mismatch", env.proof(extra_claims={"ath": hexdigest}))


async def test_dpop_13_ath_of_a_non_ascii_token_never_matches(env: Env) -> None:
    await env.reject(InvalidDPoPProof, "dpop_ath_mismatch", env.proof(), token="tökén")


async def test_dpop_14_proof_key_must_be_the_bound_key(env: Env) -> None:
    other = DPoPKey()
    error = await env.reject(TokenBindingMismatch, "dpop_key_mismatch", env.proof(key=other))
    assert error.status == 401 and error.error == "invalid_token" and error.scheme == "dpop"  # RESP-09


async def test_dpop_15_rejected_proof_does_not_burn_its_jti(env: Env) -> None:
    other = DPoPKey()
    forged = env.proof(key=other, header_overrides={"jwk": env.key.jwk}, jti="jti-1")
    await env.reject(InvalidDPoPProof, "dpop_bad_signature", forged)
    await env.reject(InvalidDPoPProof, "dpop_htm_mismatch", env.proof(jti="jti-1", method="POST"))
    await env.reject(TokenBindingMismatch, "dpop_key_mismatch", env.proof(key=other, jti="jti-1"))
    assert await env.confirm(env.proof(jti="jti-1"))


async def test_dpop_16_proof_without_ath_is_refused_at_the_resource(env: Env) -> None:
    await env.reject(InvalidDPoPProof, "dpop_missing_claim", env.proof(access_token=None))


async def test_dpop_17_no_proof_no_access(env: Env) -> None:
    await env.reject(InvalidDPoPProof, "dpop_proof_missing")


def test_dpop_18_binding_is_recognised_by_cnf_jkt(env: Env) -> None:
    # the core routes a token to this plugin by its cnf member; the plugin declares which one it confirms
    assert env.verifier.cnf_member == "jkt" and env.verifier.scheme == "dpop"


async def test_dpop_19_introspected_binding_is_checked_locally() -> None:
    clock = FakeClock(1562262620)
    env = make_env(origin="https://resource.example.org", clock=clock)
    verified = VerifiedToken(issuer=VEC_9449_7["iss"], subject=VEC_9449_7["sub"], audience=(),
                             expires_at=VEC_9449_7["exp"], not_before=VEC_9449_7["nbf"], token_id="t",
                             verifier="introspection", cnf=VEC_9449_7["cnf"])
    wrong_key = env.key.proof("GET", "https://resource.example.org/protectedresource",
                              access_token=VEC_9449_2_TOKEN, iat=1562262618)
    await env.reject(TokenBindingMismatch, "dpop_key_mismatch", wrong_key, path="/protectedresource",
                     token=VEC_9449_2_TOKEN, verified=verified)


async def test_dpop_20_bound_token_with_bearer_scheme_is_refused(env: Env) -> None:
    error = await env.reject(TokenBindingMismatch, "dpop_bound_token_as_bearer", env.proof(), scheme="bearer")
    assert error.error == "invalid_token"


async def test_dpop_21_unbound_token_with_dpop_scheme_is_refused(env: Env) -> None:
    verified = VerifiedToken(issuer="i", subject="s", audience=(), expires_at=NOW + 60, token_id="t",
                             verifier="bearer")
    error = await env.reject(InvalidToken, "unbound_token_as_dpop", env.proof(), verified=verified)
    assert error.error == "invalid_token" and error.scheme == "dpop"


async def test_dpop_22_replayed_proof_is_refused_as_a_security_event(env: Env) -> None:
    proof = env.proof()
    assert await env.confirm(proof)
    error = await env.reject(InvalidDPoPProof, "dpop_replay", proof)
    assert error.security is True


async def test_dpop_22_replay_key_is_jkt_and_jti(env: Env) -> None:
    other = DPoPKey()
    assert await env.confirm(env.proof(jti="shared"))
    assert await env.confirm(env.proof(key=other, jti="shared"), jkt=other.thumbprint)  # another client's jti
    await env.reject(InvalidDPoPProof, "dpop_replay", env.proof(jti="shared", method="POST"), method="POST")


async def test_dpop_22_replay_is_remembered_for_the_whole_acceptance_window(env: Env) -> None:
    proof = env.proof(iat=NOW + 5)  # the latest iat we accept lives the longest
    assert await env.confirm(proof)
    env.clock.now = NOW + 5 + 60  # still inside the iat window
    await env.reject(InvalidDPoPProof, "dpop_replay", proof)
    env.clock.now += 1
    await env.reject(InvalidDPoPProof, "dpop_iat_out_of_window", proof)


async def test_dpop_22_full_memory_store_fails_closed() -> None:
    env = make_env(settings={"replay_max_entries": 1})
    assert await env.confirm(env.proof())
    with pytest.raises(UpstreamUnavailable):
        await env.confirm(env.proof())


@pytest.mark.parametrize("jti,ok", [("x", True), ("j" * 256, True), ("j" * 257, False), ("", False),
                                    (7, False), (None, False), (["a"], False)])
async def test_dpop_23_jti_is_1_to_256_characters(env: Env, jti: Any, ok: bool) -> None:
    proof = env.proof(extra_claims={"jti": jti})
    if ok:
        assert await env.confirm(proof)
    else:
        await env.reject(InvalidDPoPProof, "dpop_invalid_claim", proof)


async def test_dpop_24_nonces_are_nqchar_and_bound_to_this_server(
        nonce_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = (await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof())).nonce
    assert all(c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in nonce)
    # another server with the same secret (an AS, another API) issues nonces this one does not accept
    other = make_env(origin="https://as.example.com", require_nonce=True, clock=nonce_env.clock,
                     key=nonce_env.key)
    foreign = (await other.reject(UseDPoPNonce, "dpop_nonce_required",
                                  other.proof(url="https://as.example.com" + PATH))).nonce
    await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof(nonce=foreign))
    # and a server with another secret cannot mint ours
    monkeypatch.setenv(SECRET_ENV, "m" * 32)
    stranger = make_env(require_nonce=True, clock=nonce_env.clock, key=nonce_env.key)
    await stranger.reject(UseDPoPNonce, "dpop_nonce_required", stranger.proof(nonce=nonce))


async def test_dpop_25_nonce_may_be_reused_but_jti_may_not(nonce_env: Env) -> None:
    nonce = (await nonce_env.reject(UseDPoPNonce, "dpop_nonce_required", nonce_env.proof())).nonce
    assert await nonce_env.confirm(nonce_env.proof(nonce=nonce))
    assert await nonce_env.confirm(nonce_env.proof(nonce=nonce))
    assert await nonce_env.confirm(nonce_env.proof(nonce=nonce, jti="once"))
    await nonce_env.reject(InvalidDPoPProof, "dpop_replay", nonce_env.proof(nonce=nonce, jti="once"))


def test_dpop_26_algs_lists_the_configured_proof_algorithms() -> None:
    env = make_env(algorithms=("ES256", "PS256"))
    assert env.verifier.algorithms == ("ES256", "PS256")


async def test_dpop_26_algorithm_outside_the_configured_list_is_refused() -> None:
    env = make_env(algorithms=("PS256",))
    await env.reject(InvalidDPoPProof, "dpop_bad_alg", env.proof())


async def test_dpop_27_unknown_claims_ignored_past_exp_refused_crit_refused(env: Env) -> None:
    assert await env.confirm(env.proof(extra_claims={"foo": {"bar": [1]}, "exp": NOW + 30}))
    await env.reject(InvalidDPoPProof, "dpop_expired", env.proof(extra_claims={"exp": NOW}))
    await env.reject(InvalidDPoPProof, "dpop_invalid_claim", env.proof(extra_claims={"exp": "soon"}))
    await env.reject(InvalidDPoPProof, "dpop_unsupported_crit",
                     env.proof(header_overrides={"crit": ["exp"], "exp": 1}))


async def test_dpop_28_proof_over_8_kib_is_refused_before_decoding(env: Env) -> None:
    big = env.proof(extra_claims={"pad": "x" * 8192})
    await env.reject(InvalidDPoPProof, "dpop_too_large", big)
    await env.reject(InvalidDPoPProof, "dpop_too_large", "!" * 9000)  # not even base64url: size goes first


async def test_dpop_28_rsa_proof_key_over_4096_bits_is_refused(env: Env) -> None:
    modulus = b"\xc5" + os.urandom(575)  # 4608 bits; rejected before any import or signature work
    jwk = {"kty": "RSA", "n": b64(modulus), "e": "AQAB"}
    proof = env.proof(header_overrides={"jwk": jwk, "alg": "PS256"})
    await env.reject(InvalidDPoPProof, "dpop_bad_key", proof)


async def test_dpop_29_long_lived_tokens_without_nonces_are_warned_about_once(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    verified = bound_token(env.key.thumbprint, lifetime=86400)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        await env.confirm(env.proof(), verified=verified)
        await env.confirm(env.proof(), verified=verified)
    warnings = [r for r in caplog.records if "require_nonce" in r.getMessage()]
    assert len(warnings) == 1


# -- RFC 9449 §7.1 example (VEC-9449-5) ----------------------------------------------------------------------


def vec_env(now: float = 1562262620) -> Env:
    return make_env(origin="https://resource.example.org", clock=FakeClock(now))


def vec_verified() -> VerifiedToken:
    return VerifiedToken(issuer="https://server.example.com", subject="someone@example.com", audience=(),
                         expires_at=1562266216, not_before=1562262611, token_id="vec-9449-7",
                         verifier="introspection", cnf={"jkt": VEC_9449_1_JKT})


async def vec_confirm(env: Env, proof: str = VEC_9449_5_PROOF, method: str = "GET",
                      path: str = "/protectedresource", token: str = VEC_9449_2_TOKEN) -> str:
    return await env.confirm(proof, method=method, path=path, token=token, verified=vec_verified())


def test_vec_9449_1_jkt_of_the_example_key() -> None:
    assert b64(hashlib.sha256(VEC_9449_1_HASH_INPUT.encode()).digest()) == VEC_9449_1_JKT
    assert jws.thumbprint(jws.import_public_jwk(VEC_9449_1_JWK)) == VEC_9449_1_JKT


def test_vec_9449_2_ath_of_the_example_token() -> None:
    assert b64(hashlib.sha256(VEC_9449_2_TOKEN.encode("ascii")).digest()) == VEC_9449_2_ATH
    assert access_token_hash(VEC_9449_2_TOKEN) == VEC_9449_2_ATH


async def test_vec_9449_5_rfc_example_proof_is_accepted() -> None:
    assert await vec_confirm(vec_env()) == VEC_9449_1_JKT


async def test_vec_9449_5_is_accepted_only_once() -> None:
    env = vec_env()
    await vec_confirm(env)
    with pytest.raises(InvalidDPoPProof, match="dpop_replay"):
        await vec_confirm(env)


def _flip(text: str, index: int) -> str:
    return text[:index] + ("B" if text[index] != "B" else "C") + text[index + 1:]


@pytest.mark.parametrize("index", [10, 150, 300, 380, 420, len(VEC_9449_5_PROOF) - 30])
async def test_vec_9449_5_one_flipped_byte_is_refused(index: int) -> None:
    with pytest.raises(InvalidDPoPProof):
        await vec_confirm(vec_env(), proof=_flip(VEC_9449_5_PROOF, index))


async def test_vec_9449_5_other_method_is_refused() -> None:
    with pytest.raises(InvalidDPoPProof, match="dpop_htm_mismatch"):
        await vec_confirm(vec_env(), method="POST")


async def test_vec_9449_5_other_path_is_refused() -> None:
    with pytest.raises(InvalidDPoPProof, match="dpop_htu_mismatch"):
        await vec_confirm(vec_env(), path="/protectedresource2")


@pytest.mark.parametrize("now", [1562262618 - 6, 1562262618 + 61, 1562262618 + 86400])
async def test_vec_9449_5_other_clock_is_refused(now: float) -> None:
    with pytest.raises(InvalidDPoPProof, match="dpop_iat_out_of_window"):
        await vec_confirm(vec_env(now))


async def test_vec_9449_5_other_token_is_refused() -> None:
    with pytest.raises(InvalidDPoPProof, match="dpop_ath_mismatch"):
        await vec_confirm(vec_env(), token=VEC_9449_2_TOKEN[:-1])


# -- no secrets in errors ------------------------------------------------------------------------------------


async def test_errors_never_carry_proof_or_token_text(env: Env) -> None:
    proof = env.proof(access_token="another-token")
    with pytest.raises(InvalidDPoPProof) as info:
        await env.confirm(proof)
    text = f"{info.value!s} {info.value!r} {info.value.args}"
    assert proof[:20] not in text and TOKEN not in text and "another-token" not in text


def test_normalize_uri_rejects_non_http_and_garbage() -> None:
    assert normalize_uri("mailto:a@b") is None
    assert normalize_uri("https://") is None
    assert normalize_uri("https://[::1/x") is None
    assert normalize_uri("https://[::1]x/") is None
    assert normalize_uri("https://[::1]:8443/x") == "https://[::1]:8443/x"


# -- scale-out: Redis replay store and shared nonce secret -------------------------------------------------


@pytest.fixture
async def redis_pair(redis_url: str) -> AsyncIterator[tuple[Env, Env]]:
    """Two replicas: separate verifier instances sharing one Redis, one clock and one client key."""
    first = make_env(replay_store=redis_url)
    second = make_env(replay_store=redis_url, clock=first.clock, key=first.key)
    for env in (first, second):
        for hook in env.startup:
            await hook()
    try:
        yield first, second
    finally:
        for env in (first, second):
            for hook in env.cleanup:
                await hook()


@pytest.mark.redis
async def test_redis_replay_is_refused(redis_pair: tuple[Env, Env]) -> None:
    first, _ = redis_pair
    proof = first.proof()
    assert await first.confirm(proof)
    await first.reject(InvalidDPoPProof, "dpop_replay", proof)


@pytest.mark.redis
async def test_redis_proof_accepted_by_one_replica_is_refused_by_the_other(
        redis_pair: tuple[Env, Env]) -> None:
    first, second = redis_pair
    proof = first.proof()
    assert await first.confirm(proof)
    error = await second.reject(InvalidDPoPProof, "dpop_replay", proof)
    assert error.security


async def test_redis_unreachable_fails_closed_never_allows() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = make_env(replay_store=f"redis://127.0.0.1:{port}/0", settings={"redis_timeout": 0.2})
    for hook in env.startup:
        await hook()
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            await env.confirm(env.proof())
        assert info.value.reason == "replay_store_unavailable"
    finally:
        for hook in env.cleanup:
            await hook()


async def test_replicas_sharing_the_nonce_secret_accept_each_others_nonces(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "shared-secret-" * 3)
    first = make_env(require_nonce=True)
    second = make_env(require_nonce=True, clock=first.clock, key=first.key)
    nonce = (await first.reject(UseDPoPNonce, "dpop_nonce_required", first.proof())).nonce
    assert await second.confirm(second.proof(nonce=nonce)) == first.key.thumbprint
    other_way = (await second.reject(UseDPoPNonce, "dpop_nonce_required", second.proof())).nonce
    assert await first.confirm(first.proof(nonce=other_way))


async def test_without_the_secret_env_each_process_has_its_own_nonces(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        first = make_env(require_nonce=True)
        second = make_env(require_nonce=True, clock=first.clock, key=first.key)
    assert SECRET_ENV in caplog.text
    nonce = (await first.reject(UseDPoPNonce, "dpop_nonce_required", first.proof())).nonce
    assert await first.confirm(first.proof(nonce=nonce))
    await second.reject(UseDPoPNonce, "dpop_nonce_required", second.proof(nonce=nonce))


def test_htu_normal_forms_are_remembered_only_for_uris_of_a_sane_length() -> None:
    from ztmw_plugins.dpop import _normalize_cached, _normalized, normalize_uri

    short = "HTTPS://API.example.com:443/a/../hello/%7Eann"
    long = "https://api.example.com/" + "a" * 600
    before = _normalize_cached.cache_info().currsize
    assert _normalized(short) == normalize_uri(short) == "https://api.example.com/hello/~ann"
    assert _normalize_cached.cache_info().currsize <= before + 1
    size = _normalize_cached.cache_info().currsize
    assert _normalized(long) == normalize_uri(long)
    assert _normalize_cached.cache_info().currsize == size  # a hostile proof cannot fill the cache
