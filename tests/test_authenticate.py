"""The authenticator: cached token checks, the negative cache, the shared cache, key removal, downgrade rules."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as redis
import structlog
from aiohttp import web
from structlog.testing import capture_logs

import ztmw
from ztmw.authenticate import Authenticator, _immediate
from ztmw.cache import MemoryVerificationCache, token_key
from ztmw.errors import InvalidToken
from ztmw.models import Credential
from ztmw.testing import DevIssuer, FakeClock

from .conftest import base_config, items_app


class CountingVerifier:
    """Wraps the real bearer verifier to count how often the (expensive) token check really runs."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.calls = inner, inner.name, 0

    async def verify_token(self, token: str) -> Any:
        self.calls += 1
        return await self.inner.verify_token(token)

    def verify_now(self, token: str) -> Any:
        self.calls += 1
        verified = self.inner.verify_now(token)
        if verified is None:  # nothing was checked: verify_token runs next
            self.calls -= 1
        return verified

    def still_trusted(self, verified: Any) -> bool:
        return bool(self.inner.still_trusted(verified))


async def protected(aiohttp_client: Any, config: dict[str, Any], clock: FakeClock) -> tuple[Any, Any, Any]:
    app = items_app()
    pipeline = ztmw.setup(app, config, clock=clock)
    counting = CountingVerifier(pipeline.authenticator._token_verifiers[0])
    pipeline.authenticator._token_verifiers = (counting,)
    pipeline.authenticator._still_trusted_by_name = {counting.name: counting.still_trusted}
    pipeline.authenticator._immediate = counting  # plain bearer requests are verified without awaiting
    return await aiohttp_client(app), pipeline, counting


async def status(client: Any, token: str, path: str = "/items") -> int:
    async with client.get(path, headers={"Authorization": f"Bearer {token}"}) as response:
        return int(response.status)


async def test_cached_token_costs_one_verification(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, _, counting = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    assert [await status(client, token) for _ in range(5)] == [200] * 5
    assert counting.calls == 1


async def test_a_flood_of_one_bad_token_costs_one_verification(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline, counting = await protected(aiohttp_client, base_config(issuer), clock)
    forged = issuer.mint(scope="items:read")[:-4] + "AAAA"
    assert [await status(client, forged) for _ in range(20)] == [401] * 20
    assert counting.calls == 1
    assert len(pipeline.negative_cache) == 1
    clock.advance(31)  # the memory of a failure is short
    assert await status(client, forged) == 401
    assert counting.calls == 2


async def test_unknown_key_is_never_negatively_cached(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, pipeline, counting = await protected(aiohttp_client, base_config(issuer), clock)
    stranger = DevIssuer(issuer.issuer, audience=issuer.audience, clock=clock)
    token = stranger.mint(scope="items:read")
    assert await status(client, token) == 401
    assert await status(client, token) == 401
    assert counting.calls == 2 and len(pipeline.negative_cache) == 0


async def test_a_key_removed_from_the_jwks_drops_what_it_verified(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _, counting = await protected(aiohttp_client, base_config(issuer), clock)
    old = issuer.mint(scope="items:read", lifetime=3600)
    assert await status(client, old) == 200
    issuer.rotate_key()
    clock.advance(31)  # past the refetch cooldown
    assert await status(client, issuer.mint(scope="items:read")) == 200  # unknown kid -> refetch: old key gone
    calls = counting.calls
    assert await status(client, old) == 401  # the cached result is not trusted any more
    assert counting.calls == calls + 1


async def test_expiry_is_rechecked_on_every_cache_hit(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, _, _ = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read", lifetime=40)
    assert await status(client, token) == 200
    clock.advance(40 + 30 + 1)
    assert await status(client, token) == 401


@pytest.fixture
def cache_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    secret = "test-cache-secret-0123456789"
    monkeypatch.setenv("ZTMW_CACHE_SECRET", secret)
    return secret


@pytest.mark.redis
async def test_shared_cache_serves_a_second_replica(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, cache_secret: str
) -> None:
    config = base_config(issuer, cache={"backend": redis_url})
    first, _, first_count = await protected(aiohttp_client, config, clock)
    second, second_pipeline, second_count = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read")
    assert await status(first, token) == 200
    assert await status(second, token) == 200
    assert (first_count.calls, second_count.calls) == (1, 0)
    raw = await _redis_get(redis_url, token_key(token))
    assert raw is not None and token.encode() not in raw and token.split(".")[2].encode() not in raw
    assert second_pipeline.cache.hits == 0  # it came from the shared level, then sits in level 1


@pytest.mark.redis
async def test_a_shared_result_lives_max_ttl_from_its_verification_not_from_its_reading(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, cache_secret: str
) -> None:
    config = base_config(issuer, cache={"backend": redis_url, "max_ttl": 60})
    first, _, first_count = await protected(aiohttp_client, config, clock)
    second, _, second_count = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read", lifetime=3600)
    assert await status(first, token) == 200  # verified at t0, shared until t0 + 60
    clock.advance(50)
    assert await status(second, token) == 200  # read from the shared level at t0 + 50
    assert second_count.calls == 0
    clock.advance(11)  # t0 + 61: past max_ttl since the verification, though only 11 s since the reading
    assert await status(second, token) == 200
    assert second_count.calls == 1  # verified again, not served from a copy that outlived max_ttl


@pytest.mark.redis
async def test_forged_shared_cache_entry_is_ignored(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, cache_secret: str
) -> None:
    config = base_config(issuer, cache={"backend": redis_url})
    client, _, counting = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read")
    assert await status(client, token) == 200
    key = token_key(token)
    raw = await _redis_get(redis_url, key)
    assert raw is not None
    # someone with Redis write access claims a never-issued token is verified, reusing a real payload
    forged = issuer.mint("mallory", scope="items:read")[:-3] + "xyz"
    conn = redis.from_url(redis_url)
    try:
        await conn.set("ztmw:vt2:" + token_key(forged).hex(), b"\x00" * 32 + raw[32:], ex=60)
    finally:
        await conn.aclose()
    assert await status(client, forged) == 401


@pytest.mark.redis
async def test_shared_cache_down_falls_back_to_verifying(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, cache_secret: str
) -> None:
    config = base_config(issuer, cache={"backend": "redis://127.0.0.1:1/0"})
    client, _, counting = await protected(aiohttp_client, config, clock)
    token = issuer.mint(scope="items:read")
    assert await status(client, token) == 200
    assert counting.calls == 1


def test_shared_cache_without_a_secret_refuses_to_start(issuer: DevIssuer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZTMW_CACHE_SECRET", raising=False)
    with pytest.raises(ztmw.ConfigurationError, match="ZTMW_CACHE_SECRET"):
        ztmw.setup(web.Application(), base_config(issuer, cache={"backend": "redis://127.0.0.1:6379/15"}))


async def _redis_get(url: str, key: bytes) -> bytes | None:
    conn = redis.from_url(url)
    try:
        return await conn.get("ztmw:vt2:" + key.hex())
    finally:
        await conn.aclose()



async def test_a_remembered_attack_is_still_audited_as_one(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    from structlog.testing import capture_logs

    from ztmw.jws import b64url_encode

    client, _, counting = await protected(aiohttp_client, base_config(issuer), clock)
    valid = issuer.mint(scope="items:read")
    unsigned = b64url_encode(b'{"alg":"none","typ":"at+jwt"}') + "." + valid.split(".")[1] + "."
    with capture_logs() as events:
        assert [await status(client, unsigned) for _ in range(3)] == [401] * 3
    assert [e["event"] for e in events if e["event"].startswith("ztmw.")] == ["ztmw.security"] * 3
    assert counting.calls == 1


async def test_a_failed_start_up_closes_what_it_opened(issuer: DevIssuer, tmp_path: Any) -> None:
    config = ztmw.load_config(base_config(issuer, audit={"sinks": ["chain"]},
                                          plugins={"chain": {"path": str(tmp_path / "missing" / "a.jsonl")}}))
    pipeline = ztmw.Pipeline(config)
    with pytest.raises(Exception):
        await pipeline.start()
    assert pipeline._session is None  # the HTTP session and the plugins' tasks were closed again


@pytest.mark.redis
async def test_a_genuine_shared_entry_copied_to_another_tokens_key_is_void(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, cache_secret: str
) -> None:
    config = base_config(issuer, cache={"backend": redis_url})
    first, _, _ = await protected(aiohttp_client, config, clock)
    second, _, _ = await protected(aiohttp_client, config, clock)
    token = issuer.mint("admin", scope="items:read")
    assert await status(first, token) == 200
    raw = await _redis_get(redis_url, token_key(token))
    assert raw is not None
    chosen = "attacker-chosen-string"  # anyone with Redis write access copies a valid entry under its key
    conn = redis.from_url(redis_url)
    try:
        await conn.set("ztmw:vt2:" + token_key(chosen).hex(), raw, ex=60)
    finally:
        await conn.aclose()
    assert await status(second, chosen) == 401


async def test_new_key_material_under_an_old_kid_does_not_inherit_cached_trust(
    aiohttp_client: Any, aiohttp_server: Any, clock: FakeClock
) -> None:
    from joserfc import jwt
    from joserfc.jwk import ECKey

    old, new = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    published = {"keys": [{**old.as_dict(private=False), "kid": "k1", "use": "sig"}]}

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(published)

    jwks_app = web.Application()
    jwks_app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(jwks_app)
    iss = str(server.make_url("")).rstrip("/")
    config = {
        "resource": {"identifier": "https://api.example.com"},
        "issuers": [{"issuer": iss, "jwks_uri": f"{iss}/jwks", "algorithms": ["ES256"]}],
        "rules": [{"id": "read", "path": "/items", "methods": ["GET"], "scopes": ["items:read"]}],
    }

    def mint(key: Any, kid: str) -> str:
        now = int(clock())
        claims = {"iss": iss, "aud": "https://api.example.com", "sub": "alice", "client_id": "c", "iat": now,
                  "exp": now + 3600, "jti": f"j{kid}{now}", "scope": "items:read"}
        return jwt.encode({"alg": "ES256", "typ": "at+jwt", "kid": kid}, claims, key, algorithms=["ES256"])

    client, _, _ = await protected(aiohttp_client, config, clock)
    token = mint(old, "k1")
    assert await status(client, token) == 200
    published["keys"] = [{**new.as_dict(private=False), "kid": "k1", "use": "sig"}]  # same kid, new key
    clock.advance(31)
    assert await status(client, mint(new, "k2")) == 401  # an unknown kid makes the key set refetch
    assert await status(client, token) == 401  # the cached result named a key that is no longer published


# -- RFC 7800 §3: a confirmation claim ztmw cannot check is never an unbound bearer token ----------------------

@pytest.mark.parametrize(("cnf", "bearer_reason", "dpop_reason"), [
    ({}, "unsupported_binding", "unsupported_binding"),    # a binding claimed, no key named
    # only members no enabled verifier understands (with DPoP, the missing jkt is named first: DPOP-21)
    ({"x5c": "MIIB"}, "unsupported_binding", "unbound_token_as_dpop"),
    ({"kid": "k1", "jwk": {"kty": "EC"}}, "unsupported_binding", "unbound_token_as_dpop"),
    ("jkt", "invalid_claim", "invalid_claim"),              # not an object at all
    (["jkt"], "invalid_claim", "invalid_claim"),
    (None, "invalid_claim", "invalid_claim"),
])
@pytest.mark.parametrize("scheme", ["Bearer", "DPoP"])
async def test_cnf_without_a_member_ztmw_understands_is_invalid_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, cnf: Any, bearer_reason: str, dpop_reason: str,
    scheme: str,
) -> None:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop", "mtls"]})
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    token = issuer.mint(scope="items:read", claims={"cnf": cnf})
    with capture_logs() as events:
        for _ in range(2):  # the second time from the caches (verification, negative, memo): still refused
            async with client.get("/items", headers={"Authorization": f"{scheme} {token}"}) as response:
                assert response.status == 401
                challenges = " ".join(response.headers.getall("WWW-Authenticate"))
                assert 'error="invalid_token"' in challenges
    reason = bearer_reason if scheme == "Bearer" else dpop_reason
    assert [e["reason"] for e in events if e["event"] in ("ztmw.decision", "ztmw.security")] == [reason] * 2


class _Verifying:
    """A verifier with both ways to verify (what the checks below need of one)."""

    name = "stub"

    async def verify_token(self, token: str) -> Any:
        raise InvalidToken("bad_signature")

    def verify_now(self, token: str) -> Any:
        raise InvalidToken("bad_signature")


class _AddsACheck(_Verifying):
    """A subclass that refuses more in verify_token: an inherited verify_now would skip that check."""

    async def verify_token(self, token: str) -> Any:
        raise InvalidToken("invalid_claim")


class _Wrapping:
    """A wrapper that passes everything else through to the verifier it wraps (verify_now included)."""

    name = "wrapper"

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def verify_token(self, token: str) -> Any:
        raise InvalidToken("invalid_claim")


class _AwaitingNow(_Verifying):
    async def verify_now(self, token: str) -> Any:  # type: ignore[override]
        raise InvalidToken("bad_signature")

    async def verify_token(self, token: str) -> Any:
        raise InvalidToken("bad_signature")


@pytest.mark.parametrize(("verifier", "immediate"), [
    (_Verifying(), True), (_AddsACheck(), False), (_Wrapping(_Verifying()), False), (_AwaitingNow(), False),
], ids=["own_verify_now", "subclass_overrides_verify_token", "pass_through_wrapper", "async_verify_now"])
def test_verify_now_stands_in_for_verify_token_only_where_the_same_class_defines_both(
    verifier: Any, immediate: bool, clock: FakeClock
) -> None:
    authenticator = Authenticator(token_verifiers=[verifier], binding_verifiers=[],
                                  cache=MemoryVerificationCache(max_entries=10, max_ttl=60, clock=clock),
                                  identity=None, clock=clock, logger=None)
    assert authenticator.immediate is immediate
    if not immediate:  # then a plain request is always left to verify_token
        credential = Credential("bearer", "abc", token_key("abc"))
        assert authenticator.authenticate_now(credential) is None


async def test_a_verifier_subclass_that_refuses_more_is_asked_on_every_plain_request(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """End to end: a bearer subclass adding a tenant check in verify_token refuses what the plain path would
    otherwise have let through with the inherited verify_now."""
    from ztmw_plugins.bearer import BearerVerifier

    class TenantBearer(BearerVerifier):
        async def verify_token(self, token: str) -> Any:
            verified = await super().verify_token(token)
            if verified.claims.get("tenant") != "acme":
                raise InvalidToken("invalid_claim")
            return verified

    app = items_app()
    pipeline = ztmw.setup(app, base_config(issuer), clock=clock)
    bearer = pipeline.authenticator._token_verifiers[0]
    bearer.__class__ = TenantBearer  # the same verifier, as its subclass a third party would ship
    pipeline.authenticator._immediate = _immediate(bearer)  # what a pipeline built with it would hold
    client = await aiohttp_client(app)
    assert await status(client, issuer.mint(scope="items:read", claims={"tenant": "other"})) == 401
    assert await status(client, issuer.mint(scope="items:read", claims={"tenant": "acme"})) == 200


class _Broken(_Verifying):
    """A verifier with a bug: verify_now raises something that is no refusal."""

    def verify_now(self, token: str) -> Any:
        raise RuntimeError("bug")

    async def verify_token(self, token: str) -> Any:
        raise RuntimeError("bug")


def test_sec_07_a_verify_now_that_raises_refuses_the_plain_request_never_allows_or_answers_500(
    clock: FakeClock
) -> None:
    authenticator = Authenticator(token_verifiers=[_Broken()], binding_verifiers=[],
                                  cache=MemoryVerificationCache(max_entries=10, max_ttl=60, clock=clock),
                                  identity=None, clock=clock, logger=structlog.get_logger("test"))
    assert authenticator.immediate
    with capture_logs() as logs, pytest.raises(InvalidToken) as refused:
        authenticator.authenticate_now(Credential("bearer", "abc", token_key("abc")))
    assert (refused.value.reason, refused.value.scheme, refused.value.status) == ("verifier_error", "bearer", 401)
    assert [entry["event"] for entry in logs] == ["ztmw.verifier_error"]
