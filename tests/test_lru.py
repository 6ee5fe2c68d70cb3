"""The bounded LRU map every in-process memory uses: the bound holds, reads refresh, the least recent goes."""

from __future__ import annotations

from ztmw.lru import LRU


def test_the_bound_holds_whatever_is_written() -> None:
    lru: LRU[int, str] = LRU(3)
    for i in range(100):
        lru.put(i, str(i))
    assert len(lru) == 3
    assert [lru.get(i) for i in (96, 97, 98, 99)] == [None, "97", "98", "99"]


def test_a_read_makes_an_entry_the_most_recent() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1
    lru.put("c", 3)  # b is now the least recent
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3


def test_iteration_runs_least_recent_first_without_refreshing() -> None:
    lru: LRU[str, int] = LRU(3)
    for key in "abc":
        lru.put(key, 0)
    lru.get("a")
    assert list(lru) == ["b", "c", "a"] and list(lru) == ["b", "c", "a"]


def test_contains_does_not_refresh() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert "a" in lru
    lru.put("c", 3)
    assert "a" not in lru


def test_rewriting_a_key_keeps_one_entry_and_refreshes_it() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 10)
    lru.put("c", 3)
    assert len(lru) == 2 and lru.get("a") == 10 and "b" not in lru


def test_pop_and_clear_forget() -> None:
    lru: LRU[str, int] = LRU(4)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.pop("a")
    lru.pop("never-there")
    assert "a" not in lru and len(lru) == 1
    lru.clear()
    assert len(lru) == 0 and lru.get("b") is None


def test_a_zero_bound_keeps_nothing() -> None:
    lru: LRU[str, int] = LRU(0)
    lru.put("a", 1)
    assert len(lru) == 0 and lru.get("a") is None


def test_removals_count_every_value_that_left_and_nothing_else() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.get("a")
    assert lru.removals == 0  # writes of new keys and reads remove nothing
    lru.put("c", 3)  # b is dropped for the bound
    assert lru.removals == 1
    lru.put("c", 4)  # the value 3 is replaced
    assert lru.removals == 2
    lru.pop("missing")
    assert lru.removals == 2
    lru.pop("a")
    assert lru.removals == 3
    lru.clear()  # c goes
    assert lru.removals == 4 and len(lru) == 0
