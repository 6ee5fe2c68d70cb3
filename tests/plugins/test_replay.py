"""Replay stores: single use within the TTL, bounded, hashed keys, fail closed (DPOP-22, DPOP-23)."""

from __future__ import annotations

import hashlib
import os
import socket
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis
from ztmw_plugins.replay import (
    REDIS_PREFIX,
    MemoryReplayStore,
    RedisReplayStore,
    create_replay_store,
)

from ztmw.errors import UpstreamUnavailable

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisReplayStore]:
    store = RedisReplayStore(redis_url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def unique(label: str) -> str:
    return f"{label}|{os.urandom(12).hex()}"


# -- memory ------------------------------------------------------------------------------------------------


async def test_memory_first_seen_once() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    assert await store.first_seen("jkt|a", 60) is True
    assert await store.first_seen("jkt|a", 60) is False
    assert await store.first_seen("jkt|b", 60) is True


async def test_memory_entry_lives_exactly_its_ttl() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(clock=clock)
    await store.first_seen("k", 60)
    clock.now += 59.9
    assert await store.first_seen("k", 60) is False
    clock.now += 0.1
    assert await store.first_seen("k", 60) is True


async def test_memory_full_of_live_entries_fails_closed_rather_than_forgetting() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(max_entries=2, clock=clock)
    assert await store.first_seen("a", 60) and await store.first_seen("b", 60)
    with pytest.raises(UpstreamUnavailable) as info:
        await store.first_seen("c", 60)
    assert info.value.reason == "replay_store_full"
    assert await store.first_seen("a", 60) is False  # nothing was evicted to make room


async def test_memory_full_store_frees_room_when_entries_expire() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(max_entries=2, clock=clock)
    await store.first_seen("a", 10)
    await store.first_seen("b", 60)
    clock.now += 10
    assert await store.first_seen("c", 60) is True
    assert len(store) == 2


async def test_memory_stores_only_digests() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    await store.first_seen("thumbprint|secret-jti", 60)
    assert store._expiry.keys() == {hashlib.sha256(b"thumbprint|secret-jti").digest()}


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
async def test_memory_rejects_nonsense_ttl(ttl: float) -> None:
    with pytest.raises(ValueError):
        await MemoryReplayStore(clock=FakeClock()).first_seen("k", ttl)


def test_create_replay_store_picks_by_url() -> None:
    assert isinstance(create_replay_store("memory", FakeClock()), MemoryReplayStore)
    assert isinstance(create_replay_store(REDIS_URL, FakeClock()), RedisReplayStore)


# -- redis -------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_first_seen_once(redis_store: RedisReplayStore) -> None:
    key = unique("jkt")
    assert await redis_store.first_seen(key, 60) is True
    assert await redis_store.first_seen(key, 60) is False


@pytest.mark.redis
async def test_redis_key_is_hashed_and_expires(redis_store: RedisReplayStore, redis_url: str) -> None:
    key = unique("jkt")
    await redis_store.first_seen(key, 60)
    client = aioredis.from_url(redis_url)
    try:
        name = REDIS_PREFIX + hashlib.sha256(key.encode()).hexdigest()
        ttl_ms = await client.pttl(name)
        assert 0 < ttl_ms <= 60_000
        assert not await client.keys(f"*{key.split('|')[1]}*")  # the jti never appears in clear
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_two_stores_share_state(redis_url: str) -> None:
    first, second = RedisReplayStore(redis_url), RedisReplayStore(redis_url)
    try:
        key = unique("jkt")
        assert await first.first_seen(key, 60) is True
        assert await second.first_seen(key, 60) is False
    finally:
        await first.close()
        await second.close()


@pytest.mark.redis
async def test_redis_lazy_open_without_start(redis_url: str) -> None:
    store = RedisReplayStore(redis_url)
    try:
        assert await store.first_seen(unique("jkt"), 5) is True
    finally:
        await store.close()


async def test_redis_unreachable_fails_closed(closed_port: int) -> None:
    store = RedisReplayStore(f"redis://127.0.0.1:{closed_port}/0", timeout=0.2)
    await store.start()
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            await store.first_seen(unique("jkt"), 60)
        assert info.value.reason == "replay_store_unavailable"
    finally:
        await store.close()


def test_redis_repr_hides_the_url() -> None:
    assert "hunter2" not in repr(RedisReplayStore("redis://:hunter2@127.0.0.1:6379/0"))
