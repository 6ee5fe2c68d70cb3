"""The shared verification cache (Redis) between replicas: an entry counts only as a replica wrote it.

`until` (when the entry stops being usable) is under the entry's MAC, so write access to Redis can neither
extend it nor slip in a value no replica would write (NaN, -inf, a past time, text, the v1 layout); an entry
of the old namespace is never read, and a genuine entry written again after its `until` is not used. Servers
are real (aiohttp test servers, the development issuer, Redis); time is the FakeClock.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
import redis.asyncio as redis
from structlog.testing import capture_logs

from ztmw.cache import token_key
from ztmw.testing import DevIssuer, FakeClock

from .conftest import base_config, call, decisions, protected

CACHE_SECRET = "shared-cache-test-secret-01234567"


async def _redis_get(url: str, key: bytes, namespace: str = "ztmw:vt2") -> bytes | None:
    conn = redis.from_url(url)
    try:
        value: bytes | None = await conn.get(f"{namespace}:{key.hex()}")
        return value
    finally:
        await conn.aclose()


async def _redis_set(url: str, key: bytes, value: bytes, namespace: str = "ztmw:vt2") -> None:
    conn = redis.from_url(url)
    try:
        await conn.set(f"{namespace}:{key.hex()}", value, ex=60)
    finally:
        await conn.aclose()


def _mac(key: bytes, payload: bytes, version: bytes = b"ztmw-vt-v2") -> bytes:
    """The MAC a replica with the secret computes (so these entries are as genuine as a replica's)."""
    return hmac.new(CACHE_SECRET.encode(), version + b"\0" + key + payload, hashlib.sha256).digest()


async def _two_replicas(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str,
                        monkeypatch: pytest.MonkeyPatch, **cache: Any) -> tuple[Any, Any]:
    monkeypatch.setenv("ZTMW_CACHE_SECRET", CACHE_SECRET)
    config = base_config(issuer, cache={"backend": redis_url, **cache})
    (first, _), (second, _) = (await protected(aiohttp_client, config, clock),
                               await protected(aiohttp_client, config, clock))
    return first, second


async def _second_replica_cache_result(second: Any, token: str) -> tuple[str | None, list[dict[str, Any]]]:
    with capture_logs() as logs:
        assert (await call(second, token))[0] == 200
    [event] = decisions(logs)
    return event.get("cache"), logs


def _rewrite(raw: bytes, key: bytes, what: str) -> bytes:
    mac, payload = raw[:32], raw[32:]
    head, _, body = payload.partition(b"\n")
    later = repr(float(head) + 86400).encode()
    return {
        "genuine": raw,
        "until moved later, old MAC": mac + later + b"\n" + body,
        "until moved later, MAC of another entry": _mac(key, head + b"\n" + body)[:31] + b"\0" + later + b"\n" + body,
        "signed: until nan": _mac(key, b"nan\n" + body) + b"nan\n" + body,
        "signed: until -inf": _mac(key, b"-inf\n" + body) + b"-inf\n" + body,
        "signed: until in the past": _mac(key, b"1.0\n" + body) + b"1.0\n" + body,
        "signed: until not a number": _mac(key, b"soon\n" + body) + b"soon\n" + body,
        "signed: no newline (v1 layout)": _mac(key, body) + body,
        "signed: empty body": _mac(key, head + b"\n") + head + b"\n",
        "v1 entry (v1 MAC, no until)": _mac(key, body, b"ztmw-vt-v1") + body,
        "truncated": raw[:40],
    }[what]


@pytest.mark.redis
@pytest.mark.parametrize("what, expected", [
    ("genuine", "shared"),
    ("until moved later, old MAC", "miss"),
    ("until moved later, MAC of another entry", "miss"),
    ("signed: until nan", "miss"),
    ("signed: until -inf", "miss"),
    ("signed: until in the past", "miss"),
    ("signed: until not a number", "miss"),
    ("signed: no newline (v1 layout)", "miss"),
    ("signed: empty body", "miss"),
    ("v1 entry (v1 MAC, no until)", "miss"),
    ("truncated", "miss"),
])
async def test_a_shared_entry_counts_only_as_written_by_a_replica(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, monkeypatch: pytest.MonkeyPatch,
    what: str, expected: str
) -> None:
    """Redis write access cannot extend `until` (it is under the MAC), and no odd `until` a replica could never
    have written (NaN, -inf, past, text, missing) is used: the token is verified anew, never a 500."""
    first, second = await _two_replicas(aiohttp_client, issuer, clock, redis_url, monkeypatch)
    token = issuer.mint(scope="items:read", lifetime=3600)
    key = token_key(token)
    assert (await call(first, token))[0] == 200
    entry = await _redis_get(redis_url, key)
    assert entry is not None and token.encode() not in entry
    await _redis_set(redis_url, key, _rewrite(entry, key, what))
    cache, logs = await _second_replica_cache_result(second, token)
    assert cache == expected
    if what.startswith("until moved later"):
        assert "ztmw.shared_cache_forged_entry" in [e["event"] for e in logs]


@pytest.mark.redis
async def test_entries_of_the_old_namespace_are_never_read(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await _two_replicas(aiohttp_client, issuer, clock, redis_url, monkeypatch)
    token = issuer.mint(scope="items:read")
    key = token_key(token)
    other = issuer.mint(scope="items:read")
    assert (await call(first, other))[0] == 200
    entry = await _redis_get(redis_url, token_key(other))
    assert entry is not None
    body = entry[32:].partition(b"\n")[2]
    await _redis_set(redis_url, key, _mac(key, body, b"ztmw-vt-v1") + body, namespace="ztmw:vt")  # a v1 replica's
    cache, _ = await _second_replica_cache_result(second, token)
    assert cache == "miss"


@pytest.mark.redis
async def test_a_genuine_entry_written_again_after_its_until_is_not_used(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaying an old genuine entry into Redis (or Redis keeping it past its TTL) cannot stretch its life."""
    first, second = await _two_replicas(aiohttp_client, issuer, clock, redis_url, monkeypatch, max_ttl=60)
    token = issuer.mint(scope="items:read", lifetime=3600)
    key = token_key(token)
    assert (await call(first, token))[0] == 200
    entry = await _redis_get(redis_url, key)
    assert entry is not None
    clock.advance(61)  # past until (verification + max_ttl); the Redis TTL runs on real time, so it is alive
    await _redis_set(redis_url, key, entry)  # and written again, for good measure
    cache, _ = await _second_replica_cache_result(second, token)
    assert cache == "miss"
