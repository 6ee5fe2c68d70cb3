"""The verification cache: bounded LRU, never past exp or max_ttl, keyed by SHA-256 (INTRO-06/09, SEC-03)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from ztmw.cache import MemoryVerificationCache, token_key
from ztmw.models import VerifiedToken

from .reachable import reachable

NOW = 1_700_000_000.0
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJqb2huIiwiZXhwIjoxNzAwMDAzNjAwfQ.c2lnbmF0dXJlLXZhbHVl"


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verified(exp: float = NOW + 3600, *, issuer: str = "https://as", key_id: str | None = "k1",
             subject: str = "john") -> VerifiedToken:
    return VerifiedToken(issuer=issuer, subject=subject, audience=("https://api",), expires_at=exp,
                         token_id="jti-1", verifier="bearer", key_id=key_id,
                         claims={"sub": subject, "exp": exp, "scope": "a b"})


def make(
    max_entries: int = 10, max_ttl: float = 300, clock: FakeClock | None = None
) -> MemoryVerificationCache:
    return MemoryVerificationCache(max_entries=max_entries, max_ttl=max_ttl, clock=clock or FakeClock())


class TestTokenKey:
    def test_intro_09_key_is_sha256_of_the_token(self) -> None:
        assert token_key(TOKEN) == hashlib.sha256(TOKEN.encode("ascii")).digest()

    def test_key_does_not_contain_the_token(self) -> None:
        assert TOKEN.encode() not in token_key(TOKEN)
        assert len(token_key(TOKEN)) == 32

    def test_distinct_tokens_have_distinct_keys(self) -> None:
        assert token_key(TOKEN) != token_key(TOKEN + "x")

    @pytest.mark.parametrize("text", ["", "a" * 100_000, "~+/="])
    def test_token_key_of_any_ascii_text(self, text: str) -> None:
        assert len(token_key(text)) == 32

    @pytest.mark.parametrize("text", ["é", "\ud800", "\U0001f600"])
    def test_token_key_never_raises_on_non_ascii_text(self, text: str) -> None:
        assert len(token_key(text)) == 32


class TestExpiry:
    def test_hit_before_expiry(self) -> None:
        cache = make()
        value = verified()
        cache.set(token_key(TOKEN), value)
        assert cache.get(token_key(TOKEN)) is value
        assert (cache.hits, cache.misses) == (1, 0)

    def test_miss_for_an_unknown_key(self) -> None:
        cache = make()
        assert cache.get(token_key(TOKEN)) is None
        assert cache.misses == 1

    def test_intro_06_never_returned_past_the_token_exp(self) -> None:
        clock = FakeClock()
        cache = make(max_ttl=3600, clock=clock)
        cache.set(token_key(TOKEN), verified(exp=NOW + 60))
        clock.now = NOW + 59.999
        assert cache.get(token_key(TOKEN)) is not None
        clock.now = NOW + 60
        assert cache.get(token_key(TOKEN)) is None
        assert len(cache) == 0

    def test_never_returned_past_max_ttl(self) -> None:
        clock = FakeClock()
        cache = make(max_ttl=300, clock=clock)
        cache.set(token_key(TOKEN), verified(exp=NOW + 3600))
        clock.now = NOW + 299
        assert cache.get(token_key(TOKEN)) is not None
        clock.now = NOW + 300
        assert cache.get(token_key(TOKEN)) is None

    def test_expired_token_is_not_stored(self) -> None:
        cache = make()
        cache.set(token_key(TOKEN), verified(exp=NOW))
        cache.set(token_key("other"), verified(exp=NOW - 1))
        assert len(cache) == 0

    def test_max_ttl_zero_stores_nothing(self) -> None:
        cache = make(max_ttl=0)
        cache.set(token_key(TOKEN), verified())
        assert cache.get(token_key(TOKEN)) is None

    def test_a_later_set_cannot_extend_past_exp(self) -> None:
        clock = FakeClock()
        cache = make(max_ttl=300, clock=clock)
        value = verified(exp=NOW + 100)
        cache.set(token_key(TOKEN), value)
        clock.now = NOW + 90
        cache.set(token_key(TOKEN), value)
        clock.now = NOW + 100
        assert cache.get(token_key(TOKEN)) is None


class TestBound:
    def test_max_entries_bounds_the_size(self) -> None:
        cache = make(max_entries=3)
        for i in range(10):
            cache.set(token_key(f"t{i}"), verified())
        assert len(cache) == 3
        assert [cache.get(token_key(f"t{i}")) is not None for i in range(10)] == [False] * 7 + [True] * 3

    def test_least_recently_used_is_evicted_first(self) -> None:
        cache = make(max_entries=3)
        for name in ("a", "b", "c"):
            cache.set(token_key(name), verified())
        assert cache.get(token_key("a")) is not None  # a is now the most recent
        cache.set(token_key("d"), verified())
        assert cache.get(token_key("b")) is None
        assert all(cache.get(token_key(n)) is not None for n in ("a", "c", "d"))

    def test_resetting_an_existing_key_does_not_evict(self) -> None:
        cache = make(max_entries=2)
        cache.set(token_key("a"), verified())
        cache.set(token_key("b"), verified())
        cache.set(token_key("a"), verified())
        assert len(cache) == 2
        assert cache.get(token_key("b")) is not None

    def test_max_entries_zero_disables_the_cache(self) -> None:
        cache = make(max_entries=0)
        cache.set(token_key(TOKEN), verified())
        assert len(cache) == 0
        assert cache.get(token_key(TOKEN)) is None


class TestHolds:
    """The decision memo's check: this very result, still live under its key (not an equal one, not a later one)."""

    def test_holds_the_value_it_stored(self) -> None:
        cache, value = make(), verified()
        cache.set(token_key("a"), value)
        assert cache.holds(token_key("a"), value)
        assert (cache.hits, cache.misses) == (0, 0)  # a memo check is not a verification-cache lookup

    def test_an_equal_but_other_value_is_not_held(self) -> None:
        cache, value = make(), verified()
        cache.set(token_key("a"), value)
        assert not cache.holds(token_key("a"), verified())
        cache.set(token_key("a"), verified())  # replaced: the old result is no longer what stands
        assert not cache.holds(token_key("a"), value)
        assert not cache.holds(token_key("b"), value)

    def test_not_held_past_exp_and_forgotten_then(self) -> None:
        clock = FakeClock()
        cache, value = make(clock=clock), verified(exp=NOW + 60)
        cache.set(token_key("a"), value)
        clock.now = NOW + 60
        assert not cache.holds(token_key("a"), value)
        assert len(cache) == 0

    def test_a_held_entry_becomes_the_most_recent(self) -> None:
        cache, value = make(max_entries=2), verified()
        cache.set(token_key("a"), value)
        cache.set(token_key("b"), verified())
        assert cache.holds(token_key("a"), value)
        cache.set(token_key("c"), verified())  # evicts b, the least recently used
        assert cache.holds(token_key("a"), value) and cache.get(token_key("b")) is None


class TestMaintenance:
    def test_discard_forgets_one_entry(self) -> None:
        cache = make()
        cache.set(token_key("a"), verified(key_id="k1"))
        cache.set(token_key("b"), verified(key_id="k2"))
        cache.discard(token_key("a"))
        cache.discard(token_key("never-there"))
        assert cache.get(token_key("a")) is None
        assert cache.get(token_key("b")) is not None

    def test_clear(self) -> None:
        cache = make()
        cache.set(token_key("a"), verified())
        cache.clear()
        assert len(cache) == 0


def test_sec_03_the_token_never_appears_in_the_cache_state() -> None:
    cache = make()
    cache.set(token_key(TOKEN), verified())
    cache.get(token_key(TOKEN))
    parts = [TOKEN] + TOKEN.split(".")
    found = []
    for item in reachable(vars(cache)):
        if isinstance(item, str) and any(p in item for p in parts):
            found.append(item)
        if isinstance(item, bytes) and any(p.encode() in item for p in parts):
            found.append(item)
    assert found == []


def test_walk_helper_would_find_a_token() -> None:
    # the check above is only worth something if the walker reaches inside slotted dataclasses and dicts
    found = list(reachable({"x": [verified(subject=TOKEN)]}))
    assert TOKEN in found


class TestSharedEntryFormat:
    """What one replica stores in Redis must read back as the same VerifiedToken on another (every field)."""

    def test_round_trip_keeps_every_field(self) -> None:
        from types import MappingProxyType

        from ztmw.cache import dump_verified, load_verified

        value = VerifiedToken(
            issuer="https://as", subject="alice", audience=("a", "b"), expires_at=2000.5, token_id="t",
            verifier="bearer", client_id="c", scopes=frozenset({"x", "y"}), issued_at=1000.0, not_before=999.0,
            auth_time=998.0, acr="urn:acr", amr=("pwd", "otp"), cnf=MappingProxyType({"jkt": "k" * 43}),
            actor=MappingProxyType({}), claims=MappingProxyType({"sub": "alice", "n": 1}), key_id="kid",
            leeway=30.0,
        )
        back = load_verified(dump_verified(value))
        for field in dataclasses.fields(VerifiedToken):
            assert getattr(back, field.name) == getattr(value, field.name), field.name
        assert back.actor is not None  # an empty act claim is still delegation (allow_delegation = false)

    def test_no_actor_stays_none(self) -> None:
        from ztmw.cache import dump_verified, load_verified

        value = VerifiedToken(issuer="i", subject="s", audience=("a",), expires_at=1.0, token_id="t",
                              verifier="bearer")
        assert load_verified(dump_verified(value)).actor is None
