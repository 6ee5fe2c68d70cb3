"""The verification cache: what `verify_token` concluded about a token, keyed by a hash of the token.

Level 1 is in process and written by hand rather than on aiocache's memory backend because that one is
unbounded and costs a timer and a `wait_for` per operation (STYLE.md §1); a cached token must cost a hash and
a dict lookup. Level 2 (optional, `cache.backend = "redis://..."`) is shared by replicas through aiocache, and
its entries are HMAC-signed: whoever can write to Redis must not be able to mint "verified" tokens.

Only successes are cached, never beyond the token's `exp`, and never the token itself (RFC 9700 §4.9.3);
failures that depend on the token alone are remembered briefly in a separate negative cache, so a flood of one
bad token costs one verification. Per-request checks (proofs, certificates, the expiry re-check) are never
cached: the authenticator runs them on every hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Any, Callable, Generic, TypeVar

from .lru import LRU
from .models import VerifiedToken, frozen_mapping
from .typing import Clock

V = TypeVar("V")


def token_key(token: str) -> bytes:
    """The cache key of a token: its SHA-256, so no cache, log or dump ever holds the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class _ExpiringLRU(Generic[V]):
    """The bounded LRU of `ztmw.lru`, with an expiry on each entry: an expired one is dropped when read."""

    def __init__(self, *, max_entries: int, clock: Clock) -> None:
        self._entries: LRU[bytes, tuple[float, V]] = LRU(max_entries)
        self._clock = clock
        # the map's own lookups, bound once: a request reads the caches once or twice, each a call less
        self._peek = self._entries.peek
        self._touch = self._entries.touch

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> V | None:
        entry = self._peek(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._entries.pop(key)
            return None
        self._touch(key)
        return entry[1]

    def holds(self, key: bytes, value: V) -> bool:
        """Whether this very value is held under `key` and unexpired (made the most recent): `get` and the
        identity check in one call on the decision memo's path; an expired entry is dropped as by `get`."""
        entry = self._peek(key)
        if entry is None or entry[1] is not value:
            return False
        if entry[0] <= self._clock():
            self._entries.pop(key)
            return False
        self._touch(key)
        return True

    def expiry(self, key: bytes, value: V) -> float | None:
        """When this very value under `key` expires (None: it is not held); no recency change."""
        entry = self._entries.peek(key)
        return entry[0] if entry is not None and entry[1] is value else None

    def put(self, key: bytes, value: V, expires: float, now: float | None = None) -> None:
        """`now`: the caller's reading of the clock, when it has just taken one (saves a second reading)."""
        if expires > (self._clock() if now is None else now):
            self._entries.put(key, (expires, value))

    def pop(self, key: bytes) -> None:
        self._entries.pop(key)

    def clear(self) -> None:
        self._entries.clear()


class MemoryVerificationCache:
    """Level 1: verified tokens in process, bounded by `max_entries`, living at most `max_ttl` and until exp."""

    def __init__(self, *, max_entries: int, max_ttl: float, clock: Clock) -> None:
        self._lru: _ExpiringLRU[VerifiedToken] = _ExpiringLRU(max_entries=max_entries, clock=clock)
        self._max_ttl = max_ttl
        self._clock = clock
        # Whether this very result is still cached under the key, unexpired (the decision memo's check on every
        # replay: no hit counted, the entry's recency refreshed as by a lookup). The LRU's own method: one call
        # less on the path of most requests.
        self.holds: Callable[[bytes, VerifiedToken], bool] = self._lru.holds
        # the bounded map itself: while its `removals` count stands still, every value seen in it is still held
        # (the decision memo compares that count instead of looking its entry up on every replay)
        self.store = self._lru._entries
        self._peek = self.store.peek
        self._touch = self.store.touch
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: bytes) -> VerifiedToken | None:
        # _ExpiringLRU.get written out (the map's own lookups): the path of every request the memo does not answer
        entry = self._peek(key)
        if entry is not None:
            if self._clock() < entry[0]:
                self._touch(key)
                self.hits += 1
                return entry[1]
            self.store.pop(key)
        self.misses += 1
        return None

    def set(self, key: bytes, value: VerifiedToken, until: float | None = None) -> None:
        """`until`: an earlier end for a result verified elsewhere (a replica's, through the shared level),
        so `max_ttl` counts from the verification, not from when this process learnt of it."""
        now = self._clock()
        expires = min(now + self._max_ttl, value.expires_at)
        self._lru.put(key, value, expires if until is None else min(expires, until), now)

    def held_until(self, key: bytes, value: VerifiedToken) -> float | None:
        """When this very result under `key` expires (None: it is not held), without counting a hit."""
        return self._lru.expiry(key, value)

    def discard(self, key: bytes) -> None:
        self._lru.pop(key)

    def clear(self) -> None:
        self._lru.clear()


class NegativeCache:
    """Recent token-intrinsic failures (bad signature, malformed, wrong audience...): (reason, security flag)
    by token hash, so a remembered attack is still audited as one.

    Only failures that no later event can turn into a success belong here; an unknown key (the issuer may be
    rotating) or an unreachable key server must never be remembered.
    """

    def __init__(self, *, max_entries: int = 10_000, ttl: float = 30.0, clock: Clock) -> None:
        self._lru: _ExpiringLRU[tuple[str, bool]] = _ExpiringLRU(max_entries=max_entries, clock=clock)
        self._ttl = ttl
        self._clock = clock

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: bytes) -> tuple[str, bool] | None:
        return self._lru.get(key)

    def set(self, key: bytes, reason: str, security: bool = False) -> None:
        self._lru.put(key, (reason, security), self._clock() + self._ttl)


# -- level 2: shared by replicas ---------------------------------------------------------------------------

def dump_verified(value: VerifiedToken) -> bytes:
    data: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if isinstance(item, frozenset):
            item = sorted(item)
        elif isinstance(item, tuple):
            item = list(item)
        elif item is not None and not isinstance(item, (str, int, float, bool, list)):
            item = dict(item)
        data[f.name] = item
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


_DECODE: dict[str, Any] = {
    "audience": tuple,
    "scopes": frozenset,
    "amr": tuple,
    "cnf": frozen_mapping,
    "claims": frozen_mapping,
    "actor": lambda v: frozen_mapping(v) if v is not None else None,  # {} is still an actor, not "none"
}


def load_verified(raw: bytes) -> VerifiedToken:
    """The inverse of `dump_verified`, field by field, so a field added to VerifiedToken cannot be dropped."""
    data = json.loads(raw)
    return VerifiedToken(**{
        f.name: _DECODE.get(f.name, _same)(data[f.name]) for f in dataclasses.fields(VerifiedToken)
    })


def _same(value: Any) -> Any:
    return value


class SharedVerificationCache:
    """Level 2 over aiocache's Redis backend. Any failure reads as a miss: the token is then verified anew.

    Values are `hmac || json`; an entry whose MAC does not verify under our secret is ignored, so write access
    to Redis does not grant the power to declare a token valid.
    """

    def __init__(self, url: str, secret: bytes, *, clock: Clock, timeout: float = 0.25, logger: Any = None) -> None:
        from aiocache import Cache  # type: ignore[import-untyped] # only deployments with a shared cache need it

        self._cache = Cache.from_url(url)
        self._cache.serializer = _RawBytes()
        self._cache.namespace = "ztmw:vt2"  # aiocache joins namespace and key with ":"; v2: entries carry `until`
        self._secret = secret
        self._clock = clock
        self._timeout = timeout
        self._log = logger

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        """The MAC binds the entry to its cache key: a genuine entry copied under another token's key is void."""
        return hmac.new(self._secret, b"ztmw-vt-v2\0" + key + payload, hashlib.sha256).digest()

    async def get(self, key: bytes) -> tuple[VerifiedToken, float] | None:
        """The result another replica stored, and until when it may be used (its verification + `ttl`)."""
        try:
            raw = await self._cache.get(key.hex(), timeout=self._timeout)
        except Exception as exc:
            self._warn("ztmw.shared_cache_unavailable", exc)
            return None
        if not raw or len(raw) < 33:
            return None
        mac, payload = raw[:32], raw[32:]
        if not hmac.compare_digest(mac, self._mac(key, payload)):
            self._warn("ztmw.shared_cache_forged_entry", None)
            return None
        try:
            head, _, body = payload.partition(b"\n")
            until = float(head)
            value = load_verified(body)
        except (ValueError, KeyError, TypeError):
            return None
        now = self._clock()
        return (value, until) if value.expires_at > now and until > now else None

    async def set(self, key: bytes, value: VerifiedToken, ttl: float) -> None:
        if ttl < 1:
            return
        # "until\n" + the result: a reader must not keep it for a fresh max_ttl of its own
        payload = repr(float(self._clock() + ttl)).encode("ascii") + b"\n" + dump_verified(value)
        try:
            await self._cache.set(key.hex(), self._mac(key, payload) + payload, ttl=int(ttl),
                                   timeout=self._timeout)
        except Exception as exc:
            self._warn("ztmw.shared_cache_unavailable", exc)

    async def close(self) -> None:
        await self._cache.close()

    def _warn(self, event: str, exc: Exception | None) -> None:
        if self._log is not None:
            self._log.warning(event, error=type(exc).__name__ if exc else None)


class _RawBytes:
    """aiocache serializer that stores bytes as they are (the default would JSON- or pickle-encode them)."""

    encoding = None

    def dumps(self, value: bytes) -> bytes:
        return value

    def loads(self, value: bytes | None) -> bytes | None:
        return value
