"""The `redis` identity resolver alone, against a real Redis (database 15): links, hashed keys, errors."""

from __future__ import annotations

import hashlib
import secrets
import socket
from typing import Any, AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from ztmw_plugins.redis_identity import (
    DEFAULT_PREFIX,
    LinkConflict,
    RedisIdentityResolver,
    create,
    link,
    link_key,
    unlink,
)

from ztmw import load_config
from ztmw.errors import ConfigurationError
from ztmw.registry import load_plugin
from ztmw.testing import FakeClock
from ztmw.typing import IdentityResolver, PluginDeps

BANK = "https://bank-id.example"
SOCIAL = "https://social.example"

pytestmark = pytest.mark.redis


class Hooks:
    def __init__(self) -> None:
        self.startup: list[Any] = []
        self.cleanup: list[Any] = []


def deps(hooks: Hooks | None = None) -> PluginDeps:
    hooks = hooks or Hooks()

    def no_http() -> Any:
        raise AssertionError("the redis resolver never uses the HTTP session")

    return PluginDeps(
        config=load_config({"resource": {"identifier": "https://api.example.com"}}),
        clock=FakeClock(),
        http=no_http,
        logger=structlog.get_logger("test"),
        on_startup=hooks.startup.append,
        on_cleanup=hooks.cleanup.append,
    )


@pytest.fixture
def prefix() -> str:
    """A prefix of its own per test, so tests sharing database 15 never see each other's links."""
    return f"ztmw:test:identity:{secrets.token_hex(6)}:"


@pytest.fixture
async def client(redis_url: str, prefix: str) -> AsyncIterator[Any]:
    redis_client = aioredis.from_url(redis_url)
    try:
        yield redis_client
    finally:
        keys = [key async for key in redis_client.scan_iter(match=prefix + "*")]
        if keys:
            await redis_client.delete(*keys)
        await redis_client.aclose()


@pytest.fixture
async def resolver(redis_url: str, prefix: str) -> AsyncIterator[RedisIdentityResolver]:
    hooks = Hooks()
    instance = create({"url": redis_url, "prefix": prefix}, deps(hooks))
    for hook in hooks.startup:
        await hook()
    try:
        yield instance
    finally:
        for hook in reversed(hooks.cleanup):
            await hook()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- link, resolve, unlink -----------------------------------------------------------------------------------

async def test_every_login_of_one_person_resolves_to_one_account(
    resolver: RedisIdentityResolver, client: Any, prefix: str
) -> None:
    await link(client, BANK, "19800101-1234", "acct-john", prefix=prefix)
    await link(client, SOCIAL, "google|42", "acct-john", prefix=prefix)
    await link(client, SOCIAL, "google|43", "acct-jane", prefix=prefix)
    assert await resolver.resolve(BANK, "19800101-1234") == "acct-john"
    assert await resolver.resolve(SOCIAL, "google|42") == "acct-john"
    assert await resolver.resolve(SOCIAL, "google|43") == "acct-jane"


async def test_unknown_login_resolves_to_none(
    resolver: RedisIdentityResolver, client: Any, prefix: str
) -> None:
    assert await resolver.resolve(SOCIAL, "google|99") is None
    await link(client, SOCIAL, "google|42", "acct-john", prefix=prefix)
    assert await resolver.resolve(SOCIAL, "google|99") is None


async def test_links_are_per_issuer_and_exact(
    resolver: RedisIdentityResolver, client: Any, prefix: str
) -> None:
    await link(client, BANK, "19800101-1234", "acct-john", prefix=prefix)
    assert await resolver.resolve(SOCIAL, "19800101-1234") is None  # same sub, other issuer: another person
    assert await resolver.resolve(BANK + "/", "19800101-1234") is None
    assert await resolver.resolve(BANK.upper(), "19800101-1234") is None
    assert await resolver.resolve(BANK, "19800101-1234 ") is None


async def test_separator_cannot_be_forged(resolver: RedisIdentityResolver, client: Any, prefix: str) -> None:
    # ("iss", "a\0b") and ("iss\0a", "b") would hash the same bytes: issuers with NUL are refused outright
    await link(client, BANK, "a\0b", "acct-john", prefix=prefix)
    assert await resolver.resolve(BANK, "a\0b") == "acct-john"
    with pytest.raises(ValueError):
        await resolver.resolve(BANK + "\0a", "b")
    with pytest.raises(ValueError):
        await link(client, BANK + "\0a", "b", "acct-mallory", prefix=prefix)


async def test_lone_surrogates_are_hashed_as_written(
    resolver: RedisIdentityResolver, client: Any, prefix: str
) -> None:
    await link(client, SOCIAL, "x\ud800", "acct-john", prefix=prefix)
    assert await resolver.resolve(SOCIAL, "x\ud800") == "acct-john"
    assert await resolver.resolve(SOCIAL, "x\ufffd") is None  # not replaced, so not merged with U+FFFD
    assert await resolver.resolve(SOCIAL, "x") is None


async def test_unlink_removes_the_link(resolver: RedisIdentityResolver, client: Any, prefix: str) -> None:
    await link(client, SOCIAL, "google|42", "acct-john", prefix=prefix)
    assert await unlink(client, SOCIAL, "google|42", prefix=prefix) is True
    assert await resolver.resolve(SOCIAL, "google|42") is None
    assert await unlink(client, SOCIAL, "google|42", prefix=prefix) is False


async def test_link_never_silently_moves_a_login_to_another_account(
    resolver: RedisIdentityResolver, client: Any, prefix: str
) -> None:
    await link(client, SOCIAL, "google|42", "acct-john", prefix=prefix)
    await link(client, SOCIAL, "google|42", "acct-john", prefix=prefix)  # same account again: a no-op
    with pytest.raises(LinkConflict):
        await link(client, SOCIAL, "google|42", "acct-mallory", prefix=prefix)
    assert await resolver.resolve(SOCIAL, "google|42") == "acct-john"
    await link(client, SOCIAL, "google|42", "acct-jane", prefix=prefix, replace=True)
    assert await resolver.resolve(SOCIAL, "google|42") == "acct-jane"


async def test_helpers_accept_a_url(resolver: RedisIdentityResolver, redis_url: str, prefix: str,
                                    client: Any) -> None:
    key = await link(redis_url, BANK, "19800101-1234", "acct-john", prefix=prefix)
    assert key == link_key(BANK, "19800101-1234", prefix)
    assert await resolver.resolve(BANK, "19800101-1234") == "acct-john"
    assert await unlink(redis_url, BANK, "19800101-1234", prefix=prefix) is True
    assert await resolver.resolve(BANK, "19800101-1234") is None


async def test_link_refuses_empty_values(client: Any, prefix: str) -> None:
    for issuer, subject, account in ((BANK, "s", ""), (BANK, "", "a"), ("", "s", "a")):
        with pytest.raises(ValueError):
            await link(client, issuer, subject, account, prefix=prefix)
    assert [key async for key in client.scan_iter(match=prefix + "*")] == []


# -- key names are hashes ------------------------------------------------------------------------------------

async def test_key_names_are_sha256_of_issuer_nul_subject(client: Any, prefix: str) -> None:
    subject = "john.doe@example.com"
    await link(client, BANK, subject, "acct-john", prefix=prefix)
    keys = [key.decode() async for key in client.scan_iter(match=prefix + "*")]
    expected = prefix + hashlib.sha256(f"{BANK}\0{subject}".encode()).hexdigest()
    assert keys == [expected]
    assert subject not in keys[0] and "bank-id" not in keys[0] and "john" not in keys[0]
    assert await client.get(expected) == b"acct-john"


def test_link_key_default_prefix() -> None:
    key = link_key(SOCIAL, "google|42")
    assert key.startswith(DEFAULT_PREFIX) and DEFAULT_PREFIX == "ztmw:identity:"
    digest = key[len(DEFAULT_PREFIX):]
    assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
    assert link_key(SOCIAL, "google|42") == key
    assert link_key(SOCIAL, "google|43") != key


# -- fail closed: Redis errors and corrupt data propagate ----------------------------------------------------

async def test_unreachable_redis_raises_never_answers_none() -> None:
    resolver = RedisIdentityResolver(f"redis://127.0.0.1:{closed_port()}/15", timeout=0.5)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await resolver.resolve(SOCIAL, "google|42")
    finally:
        await resolver.close()


async def test_wrong_key_type_raises(resolver: RedisIdentityResolver, client: Any, prefix: str) -> None:
    await client.hset(link_key(SOCIAL, "google|42", prefix), "account", "acct-john")
    with pytest.raises(redis.exceptions.ResponseError):
        await resolver.resolve(SOCIAL, "google|42")


@pytest.mark.parametrize("stored", [b"", b"\xff\xfe"])
async def test_corrupt_value_raises(resolver: RedisIdentityResolver, client: Any, prefix: str,
                                    stored: bytes) -> None:
    await client.set(link_key(SOCIAL, "google|42", prefix), stored)
    with pytest.raises(ValueError):
        await resolver.resolve(SOCIAL, "google|42")


# -- lifetime ------------------------------------------------------------------------------------------------

async def test_factory_registers_lifetime_hooks(redis_url: str, client: Any, prefix: str) -> None:
    hooks = Hooks()
    instance = create({"url": redis_url, "prefix": prefix}, deps(hooks))
    assert len(hooks.startup) == 1 and len(hooks.cleanup) == 1
    await hooks.startup[0]()
    await link(client, SOCIAL, "google|42", "acct-john", prefix=prefix)
    assert await instance.resolve(SOCIAL, "google|42") == "acct-john"
    await hooks.cleanup[0]()
    await hooks.cleanup[0]()  # closing twice is harmless


async def test_resolver_opens_lazily_without_startup(redis_url: str, client: Any, prefix: str) -> None:
    instance = RedisIdentityResolver(redis_url, prefix=prefix)
    try:
        await link(client, SOCIAL, "google|42", "acct-john", prefix=prefix)
        assert await instance.resolve(SOCIAL, "google|42") == "acct-john"
    finally:
        await instance.close()


def test_repr_hides_the_url() -> None:
    instance = create({"url": "redis://:s3cret@127.0.0.1:6379/15"}, deps())
    assert "s3cret" not in repr(instance)


def test_resolver_has_the_identity_resolver_shape() -> None:
    instance: IdentityResolver = create({"url": "redis://127.0.0.1:6379/15"}, deps())
    assert callable(instance.resolve)


def test_loaded_by_entry_point_name() -> None:
    loaded = load_plugin("ztmw.identity_resolvers", "redis", {"url": "redis://127.0.0.1:6379/15"}, deps())
    assert isinstance(loaded.instance, RedisIdentityResolver)
    assert loaded.instance.prefix == DEFAULT_PREFIX
    assert loaded.instance.timeout == 0.5


# -- settings ------------------------------------------------------------------------------------------------

def test_settings_defaults() -> None:
    instance = create({"url": "redis://127.0.0.1:6379/15"}, deps())
    assert (instance.prefix, instance.timeout) == ("ztmw:identity:", 0.5)


@pytest.mark.parametrize("url", ["rediss://127.0.0.1:6380/0", "unix:///run/redis.sock"])
def test_settings_accept_tls_and_unix_urls(url: str) -> None:
    assert isinstance(create({"url": url}, deps()), RedisIdentityResolver)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"url": "redis://127.0.0.1:6379/15", "prefx": "x:"}, "prefx"),
        ({"url": "redis://127.0.0.1:6379/15", "links": []}, "links"),
        ({}, "plugins.redis.url"),
        ({"url": "http://127.0.0.1:6379"}, "plugins.redis.url"),
        ({"url": "127.0.0.1:6379"}, "plugins.redis.url"),
        ({"url": 6379}, "plugins.redis.url"),
        ({"url": "redis://127.0.0.1:6379/15", "prefix": ""}, "plugins.redis.prefix"),
        ({"url": "redis://127.0.0.1:6379/15", "prefix": 1}, "plugins.redis.prefix"),
        ({"url": "redis://127.0.0.1:6379/15", "timeout": 0}, "plugins.redis.timeout"),
        ({"url": "redis://127.0.0.1:6379/15", "timeout": -1}, "plugins.redis.timeout"),
        ({"url": "redis://127.0.0.1:6379/15", "timeout": 31}, "plugins.redis.timeout"),
        ({"url": "redis://127.0.0.1:6379/15", "timeout": True}, "plugins.redis.timeout"),
        ({"url": "redis://127.0.0.1:6379/15", "timeout": "1"}, "plugins.redis.timeout"),
        ({"url": "redis://127.0.0.1:6379/15", "timeout": float("inf")}, "plugins.redis.timeout"),
        ({"url": "redis://127.0.0.1:6379/15", "timeout": float("nan")}, "plugins.redis.timeout"),
    ],
)
def test_settings_are_validated_naming_the_key(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named.replace(".", r"\.")):
        create(settings, deps())


def test_bad_settings_stop_startup_through_the_registry() -> None:
    with pytest.raises(ConfigurationError, match="prefx"):
        load_plugin("ztmw.identity_resolvers", "redis", {"url": "redis://127.0.0.1:6379/15", "prefx": "x"},
                    deps())
