"""Replay stores for single-use DPoP proof ids (RFC 9449 §11.1; checklist DPOP-22, DPOP-23).

Contract (`ztmw.typing.ReplayStore`): `await first_seen(key, ttl)` is True exactly once per key within `ttl`
seconds, atomically, across every worker that shares the store. Keys are stored only as SHA-256 digests, so
neither a `jti` nor a key thumbprint is kept in clear and an oversized value cannot grow the store.

Both stores fail closed: a store that cannot answer, or that would have to forget an unexpired entry to make
room, raises `UpstreamUnavailable` (503) instead of letting a proof through twice.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from typing import Any

from ztmw.errors import ConfigurationError, UpstreamUnavailable
from ztmw.typing import Clock

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


class RedisReplayStore:
    """Shared store: `SET key 1 NX PX ttl` is one atomic command, so two replicas cannot both see it first.

    Timeouts are short and retries minimal: a slow Redis must turn into a quick 503, not a stalled request.
    The client is opened by `start()` (or lazily on first use) and must be closed with `close()`.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_REDIS_TIMEOUT) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError("dpop.replay_store: 'memory' or a redis:// URL")
        self._url = url
        self._timeout = timeout
        self._client: Any = None

    def __repr__(self) -> str:  # the URL may carry a password
        return "RedisReplayStore(<url redacted>)"

    def _open(self) -> Any:
        return open_redis_client(self._url, self._timeout, what="dpop.replay_store")

    async def start(self) -> None:
        if self._client is None:
            self._client = self._open()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def first_seen(self, key: str, ttl: float) -> bool:
        ttl = _check_ttl(ttl)
        if self._client is None:
            await self.start()
        try:
            name = REDIS_PREFIX + digest(key)
            stored = await self._client.set(name, b"1", nx=True, px=math.ceil(ttl * 1000))
        except Exception:  # any client, connection or server error: we cannot know, so refuse (fail closed)
            raise UpstreamUnavailable("replay_store_unavailable") from None
        return bool(stored)


def open_redis_client(url: str, timeout: float, *, what: str) -> Any:
    """A redis.asyncio client with short timeouts and one retry: a slow Redis must become a quick 503.

    Shared by every plugin that talks to Redis (the replay store, the identity resolver); `what` names the
    setting in the error when the `redis` extra is missing.
    """
    try:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(f"{what}: needs the 'redis' extra (pip install 'ztmw[redis]')") from None
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),  # one retry covers a pooled connection that Redis has closed
        retry_on_timeout=False,
    )


ReplayStoreImpl = MemoryReplayStore | RedisReplayStore


def create_replay_store(
    url: str,
    clock: Clock = time.time,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    timeout: float = DEFAULT_REDIS_TIMEOUT,
) -> ReplayStoreImpl:
    """The store `dpop.replay_store` names: "memory" for one process, a redis:// URL for several replicas."""
    if url == "memory":
        return MemoryReplayStore(max_entries=max_entries, clock=clock)
    return RedisReplayStore(url, timeout=timeout)
