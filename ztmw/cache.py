"""The verification cache: what `verify_token` concluded about a token, keyed by a hash of the token.

Written by hand rather than on aiocache's memory backend because that one is unbounded and costs a timer and a
`wait_for` per operation (STYLE.md §1); a cached token must cost a hash and a dict lookup. Only successes are
stored, never beyond the token's `exp`, and never the token itself (RFC 9700 §4.9.3). Per-request checks
(proofs, certificates, the expiry re-check) are not cached: the caller runs them on every hit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .models import VerifiedToken
from .typing import Clock


def token_key(token: str) -> bytes:
    """The cache key of a token: its SHA-256, so no cache, log or dump ever holds the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class MemoryVerificationCache:
    """A bounded LRU with per-entry expiry. Single event loop, no locks needed."""

    def __init__(self, *, max_entries: int, max_ttl: float, clock: Clock) -> None:
        self._entries: OrderedDict[bytes, tuple[float, VerifiedToken]] = OrderedDict()
        self._max_entries = max_entries
        self._max_ttl = max_ttl
        self._clock = clock
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> VerifiedToken | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def set(self, key: bytes, value: VerifiedToken) -> None:
        if self._max_entries <= 0:
            return
        expires = min(self._clock() + self._max_ttl, value.expires_at)
        if expires <= self._clock():
            return
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def discard_key_id(self, issuer: str, key_id: str | None) -> int:
        """Forget everything a key verified (the issuer removed it from its JWKS). Returns how many."""
        doomed = [k for k, (_, v) in self._entries.items() if v.issuer == issuer and v.key_id == key_id]
        for k in doomed:
            del self._entries[k]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
