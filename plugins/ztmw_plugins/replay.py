"""Replay stores for single-use DPoP proof ids (RFC 9449 §11.1; checklist DPOP-22, DPOP-23).

Contract (`ztmw.typing.ReplayStore`): `await first_seen(key, ttl)` is True exactly once per key within `ttl`
seconds, atomically, across every worker that shares the store. Keys are stored only as SHA-256 digests, so
neither a `jti` nor a key thumbprint is kept in clear and an oversized value cannot grow the store.

Both stores fail closed: a store that cannot answer, or that would have to forget an unexpired entry to make
room, raises `UpstreamUnavailable` (503) instead of letting a proof through twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import math
import time
from typing import Any

from ztmw.config import SQLITE_PREFIX
from ztmw.errors import ConfigurationError, UpstreamUnavailable
from ztmw.typing import Clock

from .replay_sqlite import SQLiteReplayStore

REDIS_PREFIX = "ztmw:dpop:"
DEFAULT_MAX_ENTRIES = 200_000
DEFAULT_REDIS_TIMEOUT = 0.5


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_ttl(ttl: float) -> float:
    if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
        raise ValueError("ttl must be a positive finite number of seconds")
    return float(ttl)


class MemoryReplayStore:
    """One process's store: a dict of digests to expiry times plus a heap to purge them in expiry order.

    Bounded by `max_entries`; when full of unexpired entries it refuses (503) rather than evicting, because
    an evicted entry is a replay window. Check and insert happen without an `await` in between, which makes
    them atomic on one event loop.
    """

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Clock = time.time) -> None:
        if max_entries < 1:
            raise ConfigurationError("replay store: max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires:
                del self._expiry[key]

    async def first_seen(self, key: str, ttl: float) -> bool:
        ttl = _check_ttl(ttl)
        now = self._clock()
        self._purge(now)
        hashed = hashlib.sha256(key.encode("utf-8")).digest()
        if hashed in self._expiry:
            return False
        if len(self._expiry) >= self._max_entries:
            raise UpstreamUnavailable("replay_store_full")
        expires = now + ttl
        self._expiry[hashed] = expires
        heapq.heappush(self._heap, (expires, hashed))
        return True

    async def start(self) -> None:
        """Nothing to open; present so both stores have the same lifetime hooks."""

    async def close(self) -> None:
        self._expiry.clear()
        self._heap.clear()


_Check = tuple[str, int, "asyncio.Future[bool]"]  # (key name, ttl in ms, the caller's answer)
_OK = (b"OK", "OK")


async def _stale(connection: Any) -> bool:
    """An idle connection with something to read, or that cannot even be asked, is one the server closed.

    `can_read()` is redis-py 8's name; `can_read_destructive()` before it may buffer what it finds or raise
    on a closed connection: harmless here, as such a connection is dropped either way.
    """
    can_read = getattr(connection, "can_read", None) or connection.can_read_destructive
    try:
        return bool(await can_read())
    except Exception:
        return True


def _fail(checks: list[_Check]) -> None:
    """Fail closed: every caller still waiting gets its own 503."""
    for _, _, future in checks:
        if not future.done():
            future.set_exception(UpstreamUnavailable("replay_store_unavailable"))


class RedisReplayStore:
    """Shared store: `SET key 1 NX PX ttl` is one atomic command, so two replicas cannot both see it first.

    Concurrent checks are coalesced: the first `first_seen` that finds no batch in flight starts a writer,
    and every check made before the writer runs (the rest of that event-loop iteration), or while its batch
    is in flight, joins the next batch. A batch is written in one go on one dedicated connection and its
    replies are read back in order (Redis answers a connection's commands in the order it received them), so
    each caller gets the reply to its own command. Under load this turns many round trips, each with
    redis-py's pool and command machinery, into one write and one read of many small replies.

    Fail closed, per batch: if anything goes wrong before every reply is read (connect, write, read, the
    batch timeout, a reply that is neither OK nor nil), every caller of that batch, and every caller queued
    behind it, gets `UpstreamUnavailable` and the connection is dropped, so a late reply can never be read as
    the answer to a later command. A caller cancelled before its batch is written is left out of it; one
    cancelled afterwards does not disturb the others. Timeouts are short and retries minimal: a slow Redis
    must turn into a quick 503 (within one timeout), not a stalled request. The client is opened by
    `start()` (or lazily on first use) and must be closed with `close()`.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_REDIS_TIMEOUT) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError("dpop.replay_store: 'memory' or a redis:// URL")
        self._url = url
        self._timeout = timeout
        self._client: Any = None
        self._connection: Any = None  # the dedicated connection, made from the client's pool settings
        self._pending: list[_Check] = []  # checks waiting for the next batch
        self._writer: asyncio.Task[None] | None = None  # drains `_pending`, one batch at a time
        self._connection_error: type[Exception] = OSError  # redis.exceptions.ConnectionError, once started

    def __repr__(self) -> str:  # the URL may carry a password
        return "RedisReplayStore(<url redacted>)"

    def _open(self) -> Any:
        return open_redis_client(self._url, self._timeout, what="dpop.replay_store")

    async def start(self) -> None:
        if self._client is None:
            self._client = self._open()
            self._connection = self._client.connection_pool.make_connection()  # connects on first use
            from redis.exceptions import ConnectionError as connection_error  # the extra is there by now

            self._connection_error = connection_error

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        pending, self._pending = self._pending, []
        _fail(pending)
        client, self._client = self._client, None
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect()
        if client is not None:
            await client.aclose()

    async def first_seen(self, key: str, ttl: float) -> bool:
        ttl = _check_ttl(ttl)
        if self._client is None:
            await self.start()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((REDIS_PREFIX + digest(key), math.ceil(ttl * 1000), future))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                batch = [check for check in batch if not check[2].done()]  # callers cancelled meanwhile
                if batch:
                    await self._run(batch)
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None

    async def _run(self, batch: list[_Check]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._exchange(batch)
        except BaseException as exc:
            _fail(batch)
            if isinstance(exc, asyncio.CancelledError):
                raise
            # the checks that queued behind a failed batch fail with it: sent now they would wait out another
            # full timeout (a stalled Redis), and a caller must get its 503 within one timeout, as before
            queued, self._pending = self._pending, []
            _fail(queued)
            return
        for (_, _, future), reply in zip(batch, replies):
            if not future.done():
                future.set_result(reply)

    async def _exchange(self, batch: list[_Check]) -> list[bool]:
        connection = self._connection
        if connection.is_connected and await _stale(connection):
            # an idle connection with something to read is one the server closed (restart, idle timeout): a
            # fresh one, as redis-py's pool does before it hands out a connection
            await connection.disconnect(nowait=True)
        commands = connection.pack_commands([("SET", name, b"1", "NX", "PX", px) for name, px, _ in batch])
        reused = connection.is_connected
        replies: list[bool] = []
        try:
            await self._send(connection, commands, replies, len(batch))
        except self._connection_error:
            if not reused or replies:
                raise
            # the server closed the connection before it answered anything, and closed it so recently that the
            # check above could not see it yet: once more on a fresh connection, as redis-py's single retry
            # does (should the first write have been executed after all, the retry reports a replay: a denial)
            await self._send(connection, commands, replies, len(batch))
        return replies

    @staticmethod
    async def _send(connection: Any, commands: list[bytes], replies: list[bool], count: int) -> None:
        try:
            await connection.send_packed_command(commands, check_health=False)
            for _ in range(count):
                # no timer per reply (math.inf): the batch timeout in `_run` bounds the whole exchange
                reply = await connection.read_response(timeout=math.inf)
                if reply is None:
                    replies.append(False)  # NX: the key exists
                elif reply in _OK:
                    replies.append(True)
                else:
                    raise UpstreamUnavailable("replay_store_unavailable")
        except BaseException:
            # whatever was not read yet would be taken for the replies to the next batch: never reuse it
            await connection.disconnect(nowait=True)
            raise


def open_redis_client(url: str, timeout: float, *, what: str) -> Any:
    """A redis.asyncio client with short timeouts and one retry: a slow Redis must become a quick 503.

    Shared by every plugin that talks to Redis (the replay store, the identity resolver); `what` names the
    setting in the error when the `redis` extra is missing.
    """
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry  # redis-py 8 warns on (and will refuse) the synchronous one
        from redis.backoff import NoBackoff
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(f"{what}: needs the 'redis' extra (pip install 'ztmw[redis]')") from None
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),  # one retry covers a pooled connection that Redis has closed
        retry_on_timeout=False,
    )


ReplayStoreImpl = MemoryReplayStore | RedisReplayStore | SQLiteReplayStore


def create_replay_store(
    url: str,
    clock: Clock = time.time,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    timeout: float = DEFAULT_REDIS_TIMEOUT,
) -> ReplayStoreImpl:
    """The store `dpop.replay_store` names: "memory" for one process, sqlite:/// for the processes of one host,
    a redis:// URL for several replicas."""
    if url == "memory":
        return MemoryReplayStore(max_entries=max_entries, clock=clock)
    if url.startswith(SQLITE_PREFIX):
        return SQLiteReplayStore(url, max_entries=max_entries, clock=clock, timeout=timeout)
    return RedisReplayStore(url, timeout=timeout)
