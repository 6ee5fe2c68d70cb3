"""DevIssuer: a real JWKS over loopback HTTP and tokens that verify with the strict JWS checks."""

from __future__ import annotations

import aiohttp
import pytest

from ztmw.config import load_config
from ztmw.jws import import_public_jwk, media_type_is, parse_compact, verify_signature
from ztmw.testing.clock import FakeClock
from ztmw.testing.issuer import DevIssuer

ALGORITHMS = ["ES256", "ES384", "PS256", "RS256", "EdDSA"]


def _verifies(issuer: DevIssuer, token: str) -> bool:
    jws = parse_compact(token)
    jwk = next(k for k in issuer.jwks()["keys"] if k["kid"] == jws.header["kid"])
    return verify_signature(jws, import_public_jwk(jwk), jws.header["alg"])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_mints_verifiable_tokens_for_every_algorithm(algorithm: str) -> None:
    async with DevIssuer(algorithm=algorithm) as issuer:
        token = issuer.mint()
        assert parse_compact(token).header["alg"] == algorithm
        assert _verifies(issuer, token)


async def test_serves_its_public_jwks_and_counts_fetches() -> None:
    async with DevIssuer() as issuer, aiohttp.ClientSession() as session:
        assert issuer.fetch_count == 0
        async with session.get(issuer.jwks_uri) as response:
            assert response.status == 200
            document = await response.json()
        assert document == issuer.jwks()
        assert issuer.fetch_count == 1
        [jwk] = document["keys"]
        assert jwk["kid"] == issuer.kid and jwk["use"] == "sig" and jwk["alg"] == "ES256"
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)


async def test_issuer_defaults_to_its_loopback_origin() -> None:
    issuer = DevIssuer()
    with pytest.raises(RuntimeError):
        issuer.issuer
    with pytest.raises(RuntimeError):
        issuer.jwks_uri
    async with issuer:
        with pytest.raises(RuntimeError):
            await issuer.start()
        assert issuer.issuer.startswith("http://127.0.0.1:")
        assert issuer.jwks_uri == issuer.issuer + "/jwks"


async def test_explicit_issuer_works_without_a_server() -> None:
    issuer = DevIssuer("https://as.example.com")
    claims = parse_compact(issuer.mint()).claims
    assert claims["iss"] == "https://as.example.com"


async def test_default_claims_follow_rfc9068() -> None:
    clock = FakeClock(1_750_000_000.0)
    issuer = DevIssuer("https://as.example.com", clock=clock, audience="https://rs.example.com")
    jws = parse_compact(issuer.mint("bob", scope="read write", lifetime=60))
    assert media_type_is(jws.header["typ"], "at+jwt")
    assert jws.header["kid"] == issuer.kid
    claims = jws.claims
    assert claims["sub"] == "bob" and claims["aud"] == "https://rs.example.com"
    assert claims["iat"] == claims["nbf"] == int(clock.now) and claims["exp"] == int(clock.now) + 60
    assert claims["client_id"] == "demo-client" and claims["scope"] == "read write"
    assert isinstance(claims["jti"], str) and claims["jti"]


async def test_mint_overrides_extends_and_drops() -> None:
    issuer = DevIssuer("https://as.example.com")
    jws = parse_compact(issuer.mint(
        audience=["a", "b"], claims={"sub": "carol", "groups": ["x"]}, drop=["jti", "nbf"],
        header={"x-test": 1}, typ=None, cnf={"jkt": "abc"}, acr="urn:acr", amr=["pwd", "otp"], auth_time=5.0,
    ))
    assert "typ" not in jws.header and jws.header["x-test"] == 1
    assert jws.claims["aud"] == ["a", "b"] and jws.claims["sub"] == "carol" and jws.claims["groups"] == ["x"]
    assert "jti" not in jws.claims and "nbf" not in jws.claims
    assert jws.claims["cnf"] == {"jkt": "abc"} and jws.claims["acr"] == "urn:acr"
    assert jws.claims["amr"] == ["pwd", "otp"] and jws.claims["auth_time"] == 5.0


async def test_header_may_lie_about_alg_but_signature_uses_the_key() -> None:
    issuer = DevIssuer("https://as.example.com")
    jws = parse_compact(issuer.mint(header={"alg": "RS256"}))
    assert jws.header["alg"] == "RS256"
    key = import_public_jwk(issuer.jwks()["keys"][0])
    assert verify_signature(jws, key, "ES256")


async def test_rotate_key_replaces_the_published_key() -> None:
    issuer = DevIssuer("https://as.example.com")
    old = issuer.kid
    new = issuer.rotate_key()
    assert new == issuer.kid != old
    assert [k["kid"] for k in issuer.jwks()["keys"]] == [new]
    assert parse_compact(issuer.mint()).header["kid"] == new


async def test_add_key_publishes_and_signs_with_an_extra_key() -> None:
    issuer = DevIssuer("https://as.example.com")
    kid = issuer.add_key("PS256")
    assert {k["kid"] for k in issuer.jwks()["keys"]} == {issuer.kid, kid}
    token = issuer.mint(key=kid)
    assert parse_compact(token).header == {"alg": "PS256", "kid": kid, "typ": "at+jwt"}
    assert _verifies(issuer, token)


async def test_issuer_config_is_a_valid_issuers_table() -> None:
    async with DevIssuer() as issuer:
        issuer.add_key("EdDSA")
        table = issuer.issuer_config(leeway=5)
        config = load_config({"resource": {"identifier": "https://api.example.com"}, "issuers": [table]})
        [cfg] = config.issuers
        assert cfg.issuer == issuer.issuer and cfg.jwks_uri == issuer.jwks_uri
        assert set(cfg.algorithms) == {"ES256", "EdDSA"}
        assert cfg.audiences == (issuer.audience,) and cfg.leeway == 5


def test_unsupported_algorithm_is_refused() -> None:
    with pytest.raises(ValueError):
        DevIssuer("https://as.example.com", algorithm="HS256")
