"""A bounded least-recently-used map: the one shape every in-process memory of ztmw takes.

Whatever a client can make ztmw remember (a key it imported, a certificate it parsed, a kid it asked for in
vain) must be bounded, or a flood of distinct values grows the process without end. `OrderedDict` already
keeps the order; this adds the bound and the recency bump in one place. Single event loop: no locks.
(The verification and negative caches add an expiry per entry on top of it, in `cache.py`.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
_ABSENT = object()
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `max_entries` entries; a read makes an entry the most recent, a write beyond the bound drops
    the least recent.

    `removals` counts values that left (dropped for the bound, popped, cleared, replaced by a write): a reader
    that saw a value and the same count later knows that value is still held, without looking."""

    __slots__ = ("_entries", "_max_entries", "removals", "touch", "peek")

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._max_entries = max_entries
        self.removals = 0
        self.touch: Callable[[K], None] = self._entries.move_to_end
        """`touch(key)`: make a held key the most recent (KeyError when it is not held); no wrapper call."""
        self.peek: Callable[[K], V | None] = self._entries.get
        """`peek(key)`: the value under `key` without making it more recent (None: not held); no wrapper call."""

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        """The keys, least recent first (without refreshing any)."""
        return iter(self._entries)

    def __contains__(self, key: K) -> bool:
        """Whether `key` is held, without making it more recent."""
        return key in self._entries

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        entries = self._entries
        if key in entries:  # the old value leaves; the key becomes the most recent
            self.removals += 1
            entries[key] = value
            entries.move_to_end(key)
            return
        entries[key] = value  # a new key is the most recent already
        while len(entries) > self._max_entries:
            entries.popitem(last=False)
            self.removals += 1

    def pop(self, key: K) -> None:
        if self._entries.pop(key, _ABSENT) is not _ABSENT:
            self.removals += 1

    def clear(self) -> None:
        self.removals += len(self._entries)
        self._entries.clear()
