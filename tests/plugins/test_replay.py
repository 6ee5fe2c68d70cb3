"""Replay stores: single use within the TTL, bounded, hashed keys, fail closed (DPOP-22, DPOP-23)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit

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


# -- redis: coalesced checks -------------------------------------------------------------------------------


class GatedProxy:
    """A TCP proxy in front of the test Redis: commands always go through, replies can be held back."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.replies = asyncio.Event()
        self.replies.set()
        self.connections = 0
        self.tamper: Callable[[bytes], bytes] | None = None  # rewrites the replies on their way back
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "GatedProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, db: str) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        pumps = [asyncio.create_task(self._pump(reader, up_writer, gated=False)),
                 asyncio.create_task(self._pump(up_reader, writer, gated=True))]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, gated: bool) -> None:
        try:
            while data := await source.read(65536):
                if gated:
                    await self.replies.wait()
                    if self.tamper is not None:
                        data = self.tamper(data)
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[GatedProxy]:
    address = urlsplit(redis_url)
    async with GatedProxy((address.hostname or "127.0.0.1", address.port or 6379)) as gated:
        yield gated


def proxied_store(proxy: GatedProxy, redis_url: str, timeout: float) -> RedisReplayStore:
    return RedisReplayStore(proxy.url(redis_url.rsplit("/", 1)[1]), timeout=timeout)


def count_writes(store: RedisReplayStore) -> list[int]:
    """Counts the batches written on the store's connection."""
    writes = [0]
    connection = store._connection
    send = connection.send_packed_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        writes[0] += 1
        return await send(*args, **kwargs)

    connection.send_packed_command = counting
    return writes


async def wait_until_stored(redis_url: str, keys: list[str]) -> None:
    """Until Redis holds every key (the batch carrying them has been written); bounded, not a timing claim."""
    client = aioredis.from_url(redis_url)
    try:
        names = [REDIS_PREFIX + hashlib.sha256(key.encode()).hexdigest() for key in keys]
        for _ in range(1000):
            if await client.exists(*names) == len(names):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the batch never reached Redis")
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_concurrent_checks_each_key_is_first_seen_exactly_once(redis_store: RedisReplayStore) -> None:
    keys = [unique("jkt") for _ in range(100)]
    calls = keys + keys
    random.shuffle(calls)
    results = await asyncio.gather(*(redis_store.first_seen(key, 60) for key in calls))
    assert sum(results) == 100
    assert {key for key, first in zip(calls, results) if first} == set(keys)


@pytest.mark.redis
async def test_redis_checks_of_one_loop_iteration_share_one_write(redis_store: RedisReplayStore) -> None:
    await redis_store.first_seen(unique("warm-up"), 60)
    writes = count_writes(redis_store)
    results = await asyncio.gather(*(redis_store.first_seen(unique("jkt"), 60) for _ in range(200)))
    assert results == [True] * 200
    assert writes == [1]


@pytest.mark.redis
async def test_redis_batch_gives_every_caller_its_own_reply(redis_store: RedisReplayStore) -> None:
    seen = [unique("seen") for _ in range(50)]
    for key in seen:
        assert await redis_store.first_seen(key, 60) is True
    calls = [key for pair in zip(seen, (unique("new") for _ in range(50))) for key in pair]
    results = await asyncio.gather(*(redis_store.first_seen(key, 60) for key in calls))
    assert results == [False, True] * 50


@pytest.mark.redis
async def test_redis_checks_made_while_a_batch_is_in_flight_form_the_next_batch(
    proxy: GatedProxy, redis_url: str
) -> None:
    store = proxied_store(proxy, redis_url, timeout=10)
    try:
        assert await store.first_seen(unique("warm-up"), 60) is True
        writes = count_writes(store)
        proxy.replies.clear()
        first = [unique("first") for _ in range(5)]
        first_calls = [asyncio.create_task(store.first_seen(key, 60)) for key in first]
        await wait_until_stored(redis_url, first)  # written, replies held back
        later = [asyncio.create_task(store.first_seen(key, 60)) for key in first[:2] + [unique("later")]]
        await asyncio.sleep(0)
        proxy.replies.set()
        assert await asyncio.gather(*first_calls) == [True] * 5
        assert await asyncio.gather(*later) == [False, False, True]
        assert writes == [2]
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_caller_cancelled_before_the_write_is_left_out_of_the_batch(
    redis_store: RedisReplayStore,
) -> None:
    keys = [unique("jkt") for _ in range(10)]
    calls = [asyncio.create_task(redis_store.first_seen(key, 60)) for key in keys]
    await asyncio.sleep(0)  # every call has joined the batch; the writer has not run yet
    calls[3].cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert results[:3] + results[4:] == [True] * 9
    assert await redis_store.first_seen(keys[3], 60) is True  # its jti was not burnt


@pytest.mark.redis
async def test_redis_caller_cancelled_in_flight_does_not_disturb_the_others(
    proxy: GatedProxy, redis_url: str
) -> None:
    store = proxied_store(proxy, redis_url, timeout=10)
    try:
        await store.first_seen(unique("warm-up"), 60)
        proxy.replies.clear()
        keys = [unique("jkt") for _ in range(10)]
        calls = [asyncio.create_task(store.first_seen(key, 60)) for key in keys]
        await wait_until_stored(redis_url, keys)
        calls[3].cancel()
        proxy.replies.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert results[:3] + results[4:] == [True] * 9
        assert await store.first_seen(keys[3], 60) is False  # written before the cancel: a replay from now on
        assert await store.first_seen(unique("jkt"), 60) is True
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_stalled_batch_fails_every_member_closed_and_its_late_replies_are_never_read(
    proxy: GatedProxy, redis_url: str
) -> None:
    store = proxied_store(proxy, redis_url, timeout=0.3)
    try:
        await store.first_seen(unique("warm-up"), 60)
        proxy.replies.clear()
        keys = [unique("jkt") for _ in range(5)]
        results = await asyncio.gather(*(store.first_seen(key, 60) for key in keys), return_exceptions=True)
        assert all(isinstance(r, UpstreamUnavailable) and r.reason == "replay_store_unavailable" for r in results)
        proxy.replies.set()  # the held "OK"s go to the dropped connection, never to the next batch
        assert await asyncio.gather(*(store.first_seen(key, 60) for key in keys)) == [False] * 5
        assert proxy.connections == 2
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_error_reply_in_a_batch_fails_every_member_closed_none_is_told_first_seen(
    proxy: GatedProxy, redis_url: str
) -> None:
    store = proxied_store(proxy, redis_url, timeout=10)
    try:
        await store.first_seen(unique("warm-up"), 60)
        oks = [0]

        def second_reply_is_an_error(data: bytes) -> bytes:  # Redis answered OK to all three; we say otherwise
            out = b""
            for part in data.split(b"+OK\r\n")[:-1]:
                oks[0] += 1
                out += part + (b"-ERR injected\r\n" if oks[0] == 2 else b"+OK\r\n")
            return out + data.split(b"+OK\r\n")[-1]

        proxy.tamper = second_reply_is_an_error
        keys = [unique("jkt") for _ in range(3)]
        results = await asyncio.gather(*(store.first_seen(key, 60) for key in keys), return_exceptions=True)
        assert oks[0] >= 2
        assert all(isinstance(r, UpstreamUnavailable) for r in results)  # also the first, answered OK
        proxy.tamper = None
        assert await asyncio.gather(*(store.first_seen(key, 60) for key in keys)) == [False] * 3
        assert await store.first_seen(unique("jkt"), 60) is True
        assert proxy.connections == 2  # the connection that carried the error was dropped
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_close_fails_the_checks_still_waiting(proxy: GatedProxy, redis_url: str) -> None:
    store = proxied_store(proxy, redis_url, timeout=10)
    await store.first_seen(unique("warm-up"), 60)
    proxy.replies.clear()
    keys = [unique("jkt") for _ in range(3)]
    in_flight = [asyncio.create_task(store.first_seen(key, 60)) for key in keys]
    await wait_until_stored(redis_url, keys)
    queued = asyncio.create_task(store.first_seen(unique("queued"), 60))
    await asyncio.sleep(0)
    await store.close()
    results = await asyncio.gather(*in_flight, queued, return_exceptions=True)
    assert all(isinstance(r, UpstreamUnavailable) for r in results)


class PrivateRedis:
    """A throw-away redis-server on its own port, which a test may kill and restart."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(1000):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.process.poll() is None, "redis-server exited"
            time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()  # SIGKILL also ends a SIGSTOPped server
            process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_batch_in_flight_when_redis_dies_fails_every_member_closed(
    private_redis: PrivateRedis,
) -> None:
    store = RedisReplayStore(private_redis.url, timeout=5)
    try:
        assert await store.first_seen(unique("warm-up"), 60) is True
        private_redis.signal(signal.SIGSTOP)  # the batch is written but not answered ...
        calls = [asyncio.create_task(store.first_seen(unique("jkt"), 60)) for _ in range(50)]
        await asyncio.sleep(0.05)
        private_redis.stop()  # ... and then the server is gone
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, UpstreamUnavailable) and r.reason == "replay_store_unavailable" for r in results)
        results = await asyncio.gather(*(store.first_seen(unique("jkt"), 60) for _ in range(50)),
                                       return_exceptions=True)
        assert all(isinstance(r, UpstreamUnavailable) for r in results)  # and while it stays down
        private_redis.start()
        assert await store.first_seen(unique("jkt"), 60) is True
    finally:
        await store.close()


@pytest.mark.parametrize("noticed", [False, True], ids=["before-the-loop-noticed", "after"])
async def test_redis_restarted_while_idle_is_not_a_503(private_redis: PrivateRedis, noticed: bool) -> None:
    store = RedisReplayStore(private_redis.url)
    try:
        assert await store.first_seen(unique("warm-up"), 60) is True
        private_redis.stop()
        private_redis.start()  # the store's connection is now closed by the old server
        if noticed:
            await asyncio.sleep(0.2)  # the event loop has read the old server's end of stream
        key = unique("jkt")
        assert await store.first_seen(key, 60) is True
        assert await store.first_seen(key, 60) is False
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_checks_queued_behind_a_stalled_batch_fail_with_it_not_one_timeout_later(
    proxy: GatedProxy, redis_url: str
) -> None:
    store = proxied_store(proxy, redis_url, timeout=0.3)
    try:
        await store.first_seen(unique("warm-up"), 60)
        writes = count_writes(store)
        proxy.replies.clear()
        stalled = [unique("stalled") for _ in range(3)]
        in_flight = [asyncio.create_task(store.first_seen(key, 60)) for key in stalled]
        await wait_until_stored(redis_url, stalled)
        queued = [unique("queued") for _ in range(3)]
        results = await asyncio.gather(*in_flight, *(store.first_seen(key, 60) for key in queued),
                                       return_exceptions=True)
        assert all(isinstance(r, UpstreamUnavailable) for r in results)
        assert writes == [1]  # the queued checks were never sent: their jti values are not burnt
        proxy.replies.set()
        assert await asyncio.gather(*(store.first_seen(key, 60) for key in queued)) == [True] * 3
    finally:
        await store.close()
