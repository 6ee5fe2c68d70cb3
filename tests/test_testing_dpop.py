"""The DPoP test kit must be right on its own terms: checked against RFC vectors and `cryptography` alone."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ztmw.testing.dpop import OMIT, DPoPKey, access_token_hash, jwk_thumbprint


def b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def decode(proof: str) -> tuple[dict, dict, bytes, bytes]:
    header, payload, signature = proof.split(".")
    signing_input = f"{header}.{payload}".encode()
    return json.loads(b64d(header)), json.loads(b64d(payload)), signing_input, b64d(signature)


def verify_with_cryptography(jwk: dict, alg: str, signing_input: bytes, signature: bytes) -> None:
    def num(name: str) -> int:
        return int.from_bytes(b64d(jwk[name]), "big")

    if alg == "ES256":
        assert len(signature) == 64
        public = ec.EllipticCurvePublicNumbers(num("x"), num("y"), ec.SECP256R1()).public_key()
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        der = encode_dss_signature(r, s)
        public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    elif alg == "EdDSA":
        ed25519.Ed25519PublicKey.from_public_bytes(b64d(jwk["x"])).verify(signature, signing_input)
    else:
        public = rsa.RSAPublicNumbers(num("e"), num("n")).public_key()
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public.verify(signature, signing_input, pss, hashes.SHA256())


@pytest.fixture(scope="module", params=["ES256", "EdDSA", "PS256"])
def key(request: pytest.FixtureRequest) -> DPoPKey:
    return DPoPKey(request.param)


def test_vec_7638_1_rsa_thumbprint_ignores_optional_members() -> None:
    jwk = {"kty": "RSA",
           "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tS"
                "oc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQ"
                "R0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTW"
                "hAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
           "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_vec_8037_1_ed25519_thumbprint() -> None:
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_vec_9449_1_ec_thumbprint() -> None:
    jwk = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
           "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
    assert jwk_thumbprint(jwk) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


def test_vec_9449_2_ath() -> None:
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == \
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


def test_proof_signature_verifies_with_cryptography(key: DPoPKey) -> None:
    header, claims, signing_input, signature = decode(key.proof("GET", "https://api.example.com/x", iat=1000))
    assert header == {"typ": "dpop+jwt", "alg": key.alg, "jwk": key.jwk}
    assert claims["htm"] == "GET" and claims["htu"] == "https://api.example.com/x" and claims["iat"] == 1000
    verify_with_cryptography(key.jwk, key.alg, signing_input, signature)


def test_tampered_proof_does_not_verify(key: DPoPKey) -> None:
    _, _, signing_input, signature = decode(key.proof("GET", "https://api.example.com/x"))
    with pytest.raises(InvalidSignature):
        verify_with_cryptography(key.jwk, key.alg, signing_input + b"x", signature)


def test_public_jwk_has_no_private_members_and_private_jwk_has_them(key: DPoPKey) -> None:
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key.jwk)
    assert "d" in key.private_jwk
    assert jwk_thumbprint(key.private_jwk) == key.thumbprint


def test_thumbprint_is_sha256_of_required_members(key: DPoPKey) -> None:
    required = {"EC": ["crv", "kty", "x", "y"], "OKP": ["crv", "kty", "x"], "RSA": ["e", "kty", "n"]}
    members = {name: key.jwk[name] for name in required[key.jwk["kty"]]}
    text = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    expected = base64.urlsafe_b64encode(hashlib.sha256(text).digest()).rstrip(b"=").decode()
    assert key.thumbprint == expected and len(expected) == 43


def test_ath_nonce_jti_and_overrides() -> None:
    key = DPoPKey()
    proof = key.proof("POST", "https://a/b", access_token="tok", nonce="n-1", jti="id-1",
                      extra_claims={"iat": OMIT, "extra": True}, header_overrides={"typ": "jwt", "kid": "k"})
    header, claims, _, _ = decode(proof)
    assert header["typ"] == "jwt" and header["kid"] == "k"
    assert claims == {"jti": "id-1", "htm": "POST", "htu": "https://a/b", "ath": access_token_hash("tok"),
                      "nonce": "n-1", "extra": True}


def test_fresh_jti_per_proof() -> None:
    key = DPoPKey()
    first, second = key.proof("GET", "https://a/"), key.proof("GET", "https://a/")
    assert decode(first)[1]["jti"] != decode(second)[1]["jti"]


def test_unknown_key_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        DPoPKey("HS256")  # type: ignore[arg-type]
