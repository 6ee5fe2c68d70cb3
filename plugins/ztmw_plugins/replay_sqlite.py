"""The host-shared DPoP replay store: one SQLite file that every worker process of a host opens.

`dpop.replay_store = "sqlite:///absolute/path"` (and what `ztmw serve --workers N` picks by itself when the
configuration says "memory"). Same contract as the other stores (`ztmw.typing.ReplayStore`, RFC 9449 §11.1):
`first_seen(key, ttl)` is True exactly once per key within `ttl` seconds, here across every process that
opens the file.

Atomicity comes from SQLite, not from us: the check and the insert are one statement (an upsert on the
primary key that only overwrites an expired row), and every statement is its own transaction, serialised by
SQLite's file lock. The file holds SHA-256 digests and expiry times only, never a `jti` or a thumbprint, and is
created readable by its owner only.

Checks made in one turn of the event loop are answered together, in one transaction (one lock, one commit:
a commit appends whole pages to the write-ahead log, so committing once per batch is what keeps the store
cheap under load). The transaction runs on the event loop: a batch takes tens of microseconds, and waiting
on another worker's write lock is bounded by `timeout`. A store that cannot answer (lock held too long, disk full, file gone)
raises `UpstreamUnavailable` (503): fail closed, as the other stores do. So does a file that held
`max_entries` unexpired digests at its last sweep (every `PURGE_INTERVAL` seconds, so the bound is soft by what
arrives in between), rather than forgetting one (a forgotten digest is a replay window).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import time

from ztmw.config import SQLITE_PREFIX
from ztmw.errors import ConfigurationError, UpstreamUnavailable
from ztmw.typing import Clock

OPEN_TIMEOUT = 5.0  # seconds start-up may wait for a file another worker is setting up
PURGE_INTERVAL = 5.0
_Check = tuple[bytes, float, "asyncio.Future[bool]"]  # (digest, ttl, the caller's answer)  # seconds between sweeps of expired rows (an expired row already counts as unseen)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dpop_seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS dpop_seen_expires ON dpop_seen (expires)",
)
# inserted, or an expired row taken over: one change; a live row left alone: none
_CLAIM = (
    "INSERT INTO dpop_seen (key, expires) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE dpop_seen.expires <= ?"
)


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///absolute/path` URL (a file URL: the path is everything after `sqlite://`)."""
    path = url[len(SQLITE_PREFIX):] if url.startswith(SQLITE_PREFIX) else ""
    if not path.startswith("/"):
        raise ConfigurationError("dpop.replay_store: a SQLite store is sqlite:///absolute/path/to/file")
    return path


class SQLiteReplayStore:
    """Digests of seen proof ids in one SQLite file shared by the processes of a host (WAL mode)."""

    def __init__(self, url: str, *, max_entries: int, clock: Clock = time.time, timeout: float = 0.5) -> None:
        if max_entries < 1:
            raise ConfigurationError("replay store: max_entries must be at least 1")
        self._path = sqlite_path(url)
        self._max_entries = max_entries
        self._clock = clock
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._next_purge = 0.0
        self._full = False
        self._pending: list[_Check] = []  # checks waiting for the next batch

    def __repr__(self) -> str:
        return f"SQLiteReplayStore({self._path!r})"

    async def start(self) -> None:
        if self._db is None:
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        """Open and set up the file; workers starting together may find it locked for a moment, so retry."""
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                return self._try_open()
            except sqlite3.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ConfigurationError(f"dpop.replay_store: cannot open the SQLite file: {exc}") from None
                time.sleep(0.05)

    def _try_open(self) -> sqlite3.Connection:
        try:
            # created here, owner-only, before SQLite would create it with the umask's permissions; the WAL
            # and shared-memory files SQLite adds next to it copy these permissions
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None,
                                 check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(f"dpop.replay_store: cannot open the SQLite file: {exc}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer; one write lock per file
            # a digest lost to an OS crash could be replayed only within its ttl (about a minute), and the OS
            # crash restarts the server anyway; an fsync per request would cost more than the proof check
            db.execute("PRAGMA synchronous=OFF")
            for statement in _SCHEMA:
                db.execute(statement)
        except sqlite3.OperationalError:
            db.close()
            raise  # busy or locked: `_open` tries again
        except sqlite3.Error as exc:
            db.close()
            raise ConfigurationError(f"dpop.replay_store: cannot use the SQLite file: {exc}") from None
        return db

    async def close(self) -> None:
        pending, self._pending = self._pending, []
        for _, _, future in pending:
            if not future.done():
                future.set_exception(UpstreamUnavailable("replay_store_unavailable"))
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __len__(self) -> int:
        """Rows in the file, expired ones not yet swept included (for tests and operators)."""
        db = self._db if self._db is not None else self._open()
        return int(db.execute("SELECT count(*) FROM dpop_seen").fetchone()[0])

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Sweep expired rows (any worker may do it), then see whether the live ones fill the store."""
        self._next_purge = now + PURGE_INTERVAL
        db.execute("DELETE FROM dpop_seen WHERE expires <= ?", (now,))
        live = db.execute("SELECT count(*) FROM dpop_seen").fetchone()[0]
        self._full = live >= self._max_entries

    async def first_seen(self, key: str, ttl: float) -> bool:
        if not (isinstance(ttl, (int, float)) and 0 < ttl < float("inf")):
            raise ValueError("ttl must be a positive finite number of seconds")
        if self._db is None:
            await self.start()
        hashed = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append((hashed, float(ttl), future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)  # every check made before the loop comes round joins this batch
        return await future

    def _flush(self) -> None:
        """Answer every waiting check in one transaction: one lock and one commit, however many checks."""
        batch, self._pending = self._pending, []
        batch = [check for check in batch if not check[2].done()]  # callers cancelled meanwhile
        if not batch:
            return
        try:
            answers = self._claim_all(batch)
        except sqlite3.Error:
            answers = [UpstreamUnavailable("replay_store_unavailable")] * len(batch)
        for (_, _, future), answer in zip(batch, answers):
            if future.done():
                continue
            if isinstance(answer, UpstreamUnavailable):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    def _claim_all(self, batch: list[_Check]) -> list[bool | UpstreamUnavailable]:
        db = self._db
        if db is None:  # closed while the batch waited
            return [UpstreamUnavailable("replay_store_unavailable")] * len(batch)
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")  # the write lock now, waiting at most `timeout` for another worker's
        try:
            if now >= self._next_purge:
                self._purge(db, now)
            answers = [self._claim(db, hashed, ttl, now) for hashed, ttl, _ in batch]
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return answers

    def _claim(self, db: sqlite3.Connection, hashed: bytes, ttl: float, now: float) -> bool | UpstreamUnavailable:
        if self._full:
            # a replay is still a replay when the store is full: only a new id is refused with a 503
            if db.execute("SELECT 1 FROM dpop_seen WHERE key = ? AND expires > ?", (hashed, now)).fetchone():
                return False
            return UpstreamUnavailable("replay_store_full")
        return bool(db.execute(_CLAIM, (hashed, now + ttl, now)).rowcount == 1)
