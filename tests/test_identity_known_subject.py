"""BCP-08 (RFC 8725 §3.8): `sub` must be a valid subject, or issuer-subject pair, at the application.

The application's hook is the identity chain: a resolver may answer "no such subject here" by raising
`UnknownSubject`, and `identity.require_known_subject = true` makes every pair no resolver links a refusal.
Each test drives a real aiohttp server with tokens from the development issuer.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, AsyncIterator

import pytest
from structlog.testing import capture_logs

import ztmw
from ztmw.config import IdentityLink
from ztmw.errors import InvalidToken, UnknownSubject
from ztmw.identity import ConfigIdentityResolver, IdentityChain
from ztmw.testing import DevIssuer, FakeClock
from ztmw.testing.http import free_port

from .conftest import AUDIENCE, base_config, call, delete_prefix, memo_size, protected

ALICE_LOGIN, ALICE = "alice-login", "acct-alice"
DESCRIPTION = "Token subject is not known here"


def known_subjects(issuer: DevIssuer, **identity: Any) -> dict[str, Any]:
    """A config that links one login (alice's) and requires every subject to be known, unless overridden."""
    section = {"links": [{"issuer": issuer.issuer, "subject": ALICE_LOGIN, "account": ALICE}],
               "require_known_subject": True}
    section.update(identity)
    return base_config(issuer, identity=section)


async def get(client: Any, token: str, path: str = "/items") -> tuple[Any, dict[str, Any]]:
    """One bearer request: the response (body read) and the one audit event it produced."""
    with capture_logs() as logs:
        response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
        await response.read()
    events = [e for e in logs if e["event"] in ("ztmw.decision", "ztmw.security")]
    assert len(events) == 1, "one audit event per request"
    return response, events[0]


def identity_resolver(pipeline: ztmw.Pipeline) -> Any:
    return next(p.instance for p in pipeline.plugins if p.group == "ztmw.identity_resolvers")


def assert_unknown_subject(response: Any, event: dict[str, Any], pipeline: ztmw.Pipeline) -> None:
    assert response.status == 401
    assert response.headers.getall("WWW-Authenticate") == [
        f'Bearer realm="api", error="invalid_token", error_description="{DESCRIPTION}", '
        f'resource_metadata="{pipeline.config.metadata_url}"'
    ]
    assert (event["status"], event["reason"]) == (401, "unknown_subject")


# -- end to end ---------------------------------------------------------------------------------------------

async def test_bcp_08_unknown_subject_is_refused_when_required(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, known_subjects(issuer), clock)
    stranger = issuer.mint("mallory", scope="items:read")
    for path in ("/items", "/users/mallory/items"):  # the token itself is valid: only the subject is unknown
        response, event = await get(client, stranger, path)
        assert_unknown_subject(response, event, pipeline)


async def test_a_linked_subject_is_accepted_when_required(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await protected(aiohttp_client, known_subjects(issuer), clock)
    status, body = await call(client, issuer.mint(ALICE_LOGIN, scope="items:read"), f"/users/{ALICE}/items")
    assert (status, body["sub"]) == (200, ALICE)


async def test_the_same_sub_at_another_issuer_is_not_known(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """The pair is what is known, not the bare `sub`: alice's login id minted by another issuer is refused."""
    async with DevIssuer(audience=AUDIENCE, clock=clock) as other:
        config = known_subjects(issuer)
        config["issuers"].append(other.issuer_config(audiences=[AUDIENCE]))
        client, pipeline = await protected(aiohttp_client, config, clock)
        response, event = await get(client, other.mint(ALICE_LOGIN, scope="items:read"))
        assert_unknown_subject(response, event, pipeline)


async def test_switch_off_keeps_an_unlinked_subject_as_its_raw_sub(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = known_subjects(issuer, require_known_subject=False)
    client, _ = await protected(aiohttp_client, config, clock)
    status, body = await call(client, issuer.mint("mallory", scope="items:read"))
    assert (status, body["sub"]) == (200, "mallory")
    assert not ztmw.load_config(base_config(issuer)).require_known_subject  # off unless asked for


async def test_a_resolver_raising_unknown_subject_is_a_401_invalid_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the switch off too: a resolver that knows its subjects may refuse one by itself. What it put in
    the exception (another reason, challenge parameters) never reaches the client."""
    client, pipeline = await protected(aiohttp_client, known_subjects(issuer, require_known_subject=False), clock)

    async def refuse(issuer: str, subject: str) -> str | None:
        raise UnknownSubject("made_up_reason", params={"scope": "leak"})

    monkeypatch.setattr(identity_resolver(pipeline), "resolve", refuse)
    response, event = await get(client, issuer.mint(ALICE_LOGIN, scope="items:read"))
    assert_unknown_subject(response, event, pipeline)


@pytest.mark.parametrize("error", [RuntimeError("store is down"), InvalidToken("invalid_token")],
                         ids=["RuntimeError", "InvalidToken"])
async def test_any_other_resolver_exception_is_still_a_503(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Only `UnknownSubject` is a refusal; anything else a resolver raises is an outage: fail closed, 503."""
    client, pipeline = await protected(aiohttp_client, known_subjects(issuer), clock)

    async def broken(issuer: str, subject: str) -> str | None:
        raise error

    monkeypatch.setattr(identity_resolver(pipeline), "resolve", broken)
    response, event = await get(client, issuer.mint(ALICE_LOGIN, scope="items:read"))
    assert response.status == 503
    assert "WWW-Authenticate" not in response.headers
    assert event["reason"] == "identity_unavailable"


async def test_the_audit_event_names_the_reason_and_never_the_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await protected(aiohttp_client, known_subjects(issuer), clock)
    token = issuer.mint("mallory", scope="items:read")
    _, event = await get(client, token)
    assert (event["event"], event["reason"], event["status"]) == ("ztmw.decision", "unknown_subject", 401)
    written = json.dumps(event, default=str)
    assert token not in written
    assert all(part not in written for part in token.split("."))  # not even the signature or the claims
    assert "mallory" not in written  # the subject is hashed by default ([audit] subject = "hash")


# -- the decision memo --------------------------------------------------------------------------------------

async def test_a_refusal_is_never_memoised(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    """The config resolver is memo_safe, so the memo is on; refusals stay out of it however often they come."""
    client, pipeline = await protected(aiohttp_client, known_subjects(issuer), clock)
    stranger = issuer.mint("mallory", scope="items:read")
    for _ in range(3):
        assert (await call(client, stranger))[0] == 401
    assert memo_size(pipeline) == 0


async def test_replays_of_a_linked_subject_stay_correct_with_the_config_resolver(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """Static links cannot change while the process runs, so a replayed allow for a linked pair is still right;
    an unknown subject on the same path is still refused (its Authorization value is another memo key)."""
    client, pipeline = await protected(aiohttp_client, known_subjects(issuer), clock)
    alice = issuer.mint(ALICE_LOGIN, scope="items:read")
    path = f"/users/{ALICE}/items"
    for _ in range(2):  # the second sighting is a verification-cache hit and is remembered
        assert await call(client, alice, path) == (200, {"sub": ALICE, "aal": 0, "rule": "own"})
    assert memo_size(pipeline) == 1
    assert await call(client, alice, path) == (200, {"sub": ALICE, "aal": 0, "rule": "own"})
    stranger = issuer.mint("mallory", scope="items:read")
    assert [(await call(client, stranger, path))[0] for _ in range(3)] == [401] * 3
    assert memo_size(pipeline) == 1


# -- the chain on its own -----------------------------------------------------------------------------------

class Refuses:
    """A resolver that knows its subjects exhaustively and knows none of them."""

    async def resolve(self, issuer: str, subject: str) -> str | None:
        raise UnknownSubject()


class Unreachable:
    async def resolve(self, issuer: str, subject: str) -> str | None:
        raise AssertionError("a refusal ends the chain: later resolvers are not asked")


async def test_a_refusal_ends_the_chain_like_a_link_does() -> None:
    chain = IdentityChain([("refuses", Refuses()), ("later", Unreachable())], logger=None)
    with pytest.raises(UnknownSubject) as info:
        await chain.resolve("https://as.example", "mallory")
    assert info.value.reason == "unknown_subject"


async def test_the_chain_refuses_an_unlinked_pair_only_when_required() -> None:
    links = [IdentityLink("https://as.example", ALICE_LOGIN, ALICE)]
    required = IdentityChain([("config", ConfigIdentityResolver(links))], None, require_known_subject=True)
    assert await required.resolve("https://as.example", ALICE_LOGIN) == ALICE
    with pytest.raises(UnknownSubject):
        await required.resolve("https://as.example", "mallory")
    optional = IdentityChain([("config", ConfigIdentityResolver(links))], None)
    assert await optional.resolve("https://as.example", "mallory") is None


# -- the Redis resolver -------------------------------------------------------------------------------------

@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own, and the links under it removed afterwards."""
    prefix = f"ztmw:test:known-subject:{secrets.token_hex(6)}:"
    yield prefix
    await delete_prefix(redis_url, prefix)


@pytest.mark.redis
@pytest.mark.parametrize("resolvers", [["config", "redis"], ["redis"]], ids=["config-and-redis", "redis-only"])
async def test_only_subjects_linked_in_redis_may_use_the_api(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, redis_prefix: str, resolvers: list[str]
) -> None:
    from ztmw_plugins.redis_identity import link, unlink

    config = base_config(issuer, identity={"resolvers": resolvers, "require_known_subject": True},
                         plugins={"redis": {"url": redis_url, "prefix": redis_prefix}})
    client, pipeline = await protected(aiohttp_client, config, clock)
    assert pipeline.memo is None  # Redis links can change at any time: nothing is replayed
    await link(redis_url, issuer.issuer, ALICE_LOGIN, ALICE, prefix=redis_prefix)
    alice = issuer.mint(ALICE_LOGIN, scope="items:read")
    assert [await call(client, alice) for _ in range(3)] == [(200, {"sub": ALICE, "aal": 0, "rule": "read"})] * 3
    response, event = await get(client, issuer.mint("mallory", scope="items:read"))
    assert_unknown_subject(response, event, pipeline)
    await unlink(redis_url, issuer.issuer, ALICE_LOGIN, prefix=redis_prefix)
    response, event = await get(client, alice)  # the link is gone: refused on the very next request
    assert_unknown_subject(response, event, pipeline)


async def test_an_unreachable_redis_is_a_503_not_an_unknown_subject(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """Needs no Redis: "cannot tell" must never be mistaken for "not known" (nor for "known")."""
    config = base_config(issuer, identity={"resolvers": ["config", "redis"], "require_known_subject": True},
                         plugins={"redis": {"url": f"redis://127.0.0.1:{free_port()}/15", "timeout": 0.5}})
    client, _ = await protected(aiohttp_client, config, clock)
    response, event = await get(client, issuer.mint("mallory", scope="items:read"))
    assert response.status == 503
    assert event["reason"] == "identity_unavailable"
