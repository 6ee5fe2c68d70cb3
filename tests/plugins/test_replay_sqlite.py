"""The host-shared SQLite replay store (plugins/ztmw_plugins/replay_sqlite.py): RFC 9449 §11.1 across processes.

Two store objects on one file stand for two workers (each has its own connection, as each process has); one
test uses a real second process. Time comes from a fake clock; SQLite, the file and its locks are real.
"""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ztmw_plugins.replay import create_replay_store
from ztmw_plugins.replay_sqlite import PURGE_INTERVAL, SQLiteReplayStore

from ztmw import load_config
from ztmw.errors import ConfigurationError, UpstreamUnavailable
from ztmw.testing.clock import FakeClock

TTL = 66.0


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/replay.sqlite3"


def store(url: str, clock: FakeClock, max_entries: int = 1000) -> SQLiteReplayStore:
    return SQLiteReplayStore(url, max_entries=max_entries, clock=clock)


async def test_a_proof_id_is_seen_first_exactly_once(url: str) -> None:
    replay = store(url, FakeClock())
    assert await replay.first_seen("jkt|jti-1", TTL) is True
    assert await replay.first_seen("jkt|jti-1", TTL) is False
    assert await replay.first_seen("jkt|jti-2", TTL) is True
    await replay.close()


async def test_a_proof_id_seen_by_one_worker_is_a_replay_for_another(url: str) -> None:
    clock = FakeClock()
    one, other = store(url, clock), store(url, clock)
    assert await one.first_seen("jkt|jti", TTL) is True
    assert await other.first_seen("jkt|jti", TTL) is False
    assert await other.first_seen("jkt|jti-b", TTL) is True
    assert await one.first_seen("jkt|jti-b", TTL) is False
    await one.close()
    await other.close()


async def test_concurrent_checks_of_one_id_let_exactly_one_through(url: str) -> None:
    """Checks made together are answered in one transaction: the same id twice in a batch is still one first."""
    clock = FakeClock()
    one, other = store(url, clock), store(url, clock)
    same = [replay.first_seen("jkt|same", TTL) for replay in (one, other) * 10]
    distinct = [one.first_seen(f"jkt|{n}", TTL) for n in range(10)]
    results = await asyncio.gather(*same, *distinct)
    assert results[:20].count(True) == 1
    assert all(results[20:])
    await one.close()
    await other.close()


async def test_a_proof_id_seen_in_another_process_is_a_replay(url: str) -> None:
    script = (
        "import asyncio, sys\n"
        "from ztmw_plugins.replay_sqlite import SQLiteReplayStore\n"
        "s = SQLiteReplayStore(sys.argv[1], max_entries=10)\n"
        "print(asyncio.run(s.first_seen('jkt|from-elsewhere', 66)))\n"
    )
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script, url], capture_output=True,
                                     text=True, timeout=60, check=True)
    assert result.stdout.strip() == "True"
    replay = SQLiteReplayStore(url, max_entries=10)
    assert await replay.first_seen("jkt|from-elsewhere", TTL) is False
    await replay.close()


async def test_an_expired_entry_no_longer_counts_and_is_swept(url: str) -> None:
    clock = FakeClock()
    one, other = store(url, clock), store(url, clock)
    assert await one.first_seen("jkt|jti", TTL)
    clock.advance(TTL - 1)
    assert await other.first_seen("jkt|jti", TTL) is False
    clock.advance(1)
    assert await other.first_seen("jkt|jti", TTL) is True  # its time is over: a new proof may reuse the id
    assert await one.first_seen("jkt|jti", TTL) is False  # and it counts again from now
    for n in range(5):
        await one.first_seen(f"jkt|old-{n}", 1)
    assert len(one) == 6
    clock.advance(PURGE_INTERVAL + 2)
    assert await one.first_seen("jkt|new", TTL)
    assert len(one) == 2  # the five short-lived ids swept; "jkt|jti" (alive) and "jkt|new" left
    await one.close()
    await other.close()


async def test_a_full_store_refuses_new_ids_but_still_recognises_replays(url: str) -> None:
    clock = FakeClock()
    replay = store(url, clock, max_entries=2)
    assert await replay.first_seen("a", TTL) and await replay.first_seen("b", TTL)
    clock.advance(PURGE_INTERVAL)  # the next check sweeps and counts: two live entries, the bound
    with pytest.raises(UpstreamUnavailable) as caught:
        await replay.first_seen("c", TTL)
    assert caught.value.reason == "replay_store_full"
    assert await replay.first_seen("a", TTL) is False  # a replay is still told apart from a new id
    clock.advance(TTL)
    assert await replay.first_seen("c", TTL) is True  # room again once entries expired
    await replay.close()


async def test_a_locked_store_fails_closed(url: str, tmp_path: Path) -> None:
    replay = SQLiteReplayStore(url, max_entries=10, timeout=0.05)
    await replay.start()
    blocker = sqlite3.connect(str(tmp_path / "replay.sqlite3"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock for too long
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await replay.first_seen("jkt|jti", TTL)
        assert caught.value.reason == "replay_store_unavailable"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await replay.first_seen("jkt|jti", TTL) is True  # the refused check left nothing behind
    await replay.close()


async def test_the_file_holds_digests_only_and_is_private(url: str, tmp_path: Path) -> None:
    replay = store(url, FakeClock())
    secret_jti = "jti-that-must-not-be-stored-in-clear"
    await replay.first_seen(f"thumbprint-in-clear|{secret_jti}", TTL)
    await replay.close()
    path = tmp_path / "replay.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for file in tmp_path.iterdir():
        content = file.read_bytes()
        assert secret_jti.encode() not in content and b"thumbprint-in-clear" not in content


async def test_an_unopenable_file_is_a_start_up_error(tmp_path: Path) -> None:
    replay = SQLiteReplayStore(f"sqlite://{tmp_path}/missing-dir/replay.sqlite3", max_entries=10)
    with pytest.raises(ConfigurationError, match="dpop.replay_store"):
        await replay.start()


def test_the_setting_names_the_store(url: str) -> None:
    assert isinstance(create_replay_store(url), SQLiteReplayStore)


@pytest.mark.parametrize("value", ["sqlite://relative.db", "sqlite:///", "sqlite://", "sqlite:///dir/"])
def test_a_sqlite_store_needs_an_absolute_file_path(value: str) -> None:
    config = {"resource": {"identifier": "https://api.example.com"},
              "issuers": [{"issuer": "https://as.example.com", "jwks_file": "jwks.json"}],
              "dpop": {"replay_store": value}}
    with pytest.raises(ConfigurationError, match="dpop.replay_store"):
        load_config(config)


def test_an_absolute_sqlite_path_is_a_valid_setting(url: str) -> None:
    config = {"resource": {"identifier": "https://api.example.com"},
              "issuers": [{"issuer": "https://as.example.com", "jwks_file": "jwks.json"}],
              "dpop": {"replay_store": url}}
    assert load_config(config).dpop.replay_store == url
