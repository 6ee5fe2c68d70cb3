"""The embedded link store: one SQLite file, for a single host (the default: nothing to install).

The standard library's `sqlite3` runs on one dedicated thread per store (its calls block; a lookup takes
microseconds, so a thread is cheaper than a dependency such as aiosqlite, which does the same underneath).
Several processes on the host (`ztmw serve --workers N`) may share the file: WAL mode lets readers go on
while one writes, and every write is a `BEGIN IMMEDIATE` transaction, so writers queue on the file lock and a
check-then-insert cannot interleave with another's. The primary key on (issuer, subject) is the last line of
defence: one login, one row, one account.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from .store import LinkConflict, LinkedLogin, LinkLimitReached, LinkTokenReplayed, Login, SingleUse

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS links (
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    account TEXT NOT NULL,
    linked_at REAL NOT NULL,
    PRIMARY KEY (issuer, subject)
);
CREATE INDEX IF NOT EXISTS links_by_account ON links (account);
CREATE TABLE IF NOT EXISTS used_link_tokens (
    key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
"""
_BUSY_TIMEOUT_MS = 5000


class SQLiteLinkStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteLinkStore({self.path!r})"

    async def start(self) -> None:
        """Open (and create) the file now: a path that cannot be used stops start-up, not the first request."""
        await self._run(lambda conn: None)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        await asyncio.get_running_loop().run_in_executor(executor, shut)
        executor.shutdown(wait=True)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztmw-links")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, work)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return work(self._conn)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, body: Callable[[], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: no other writer between our read and write
        try:
            result = body()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # -- reads ---------------------------------------------------------------------------------------------

    async def account_of(self, login: Login) -> str | None:
        def read(conn: sqlite3.Connection) -> str | None:
            return _account(conn, login)

        return await self._run(read)

    async def logins(self, account: str) -> list[LinkedLogin]:
        def read(conn: sqlite3.Connection) -> list[LinkedLogin]:
            rows = conn.execute("SELECT issuer, subject, account, linked_at FROM links WHERE account = ? "
                                "ORDER BY linked_at, issuer, subject", (account,)).fetchall()
            return [LinkedLogin(*row) for row in rows]

        return await self._run(read)

    async def used(self, once: SingleUse) -> bool:
        def read(conn: sqlite3.Connection) -> bool:
            return conn.execute("SELECT 1 FROM used_link_tokens WHERE key = ?", (once.key,)).fetchone() is not None

        return await self._run(read)

    # -- writes --------------------------------------------------------------------------------------------

    async def link(self, account: str, logins: Sequence[Login], *, max_links: int, once: SingleUse | None,
                   now: float, founding: bool = False) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            def body() -> bool:
                if once is not None:
                    conn.execute("DELETE FROM used_link_tokens WHERE expires_at < ?", (now,))
                    try:
                        conn.execute("INSERT INTO used_link_tokens (key, expires_at) VALUES (?, ?)",
                                     (once.key, once.expires_at))
                    except sqlite3.IntegrityError:
                        raise LinkTokenReplayed() from None
                if founding and _account(conn, logins[0]) != account and conn.execute(
                        "SELECT 1 FROM links WHERE account = ? LIMIT 1", (account,)).fetchone() is not None:
                    raise LinkConflict(logins[0], account)
                new = []
                for login in logins:
                    current = _account(conn, login)
                    if current is None:
                        new.append(login)
                    elif current != account:
                        raise LinkConflict(login, current)
                if not new:
                    return False
                (count,) = conn.execute("SELECT COUNT(*) FROM links WHERE account = ?", (account,)).fetchone()
                if count + len(new) > max_links:
                    raise LinkLimitReached()
                conn.executemany("INSERT INTO links (issuer, subject, account, linked_at) VALUES (?, ?, ?, ?)",
                                 [(login.issuer, login.subject, account, now) for login in new])
                return True

            return self._transaction(conn, body)

        return await self._run(write)

    async def unlink(self, account: str, login: Login) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM links WHERE issuer = ? AND subject = ? AND account = ?",
                                  (login.issuer, login.subject, account))
            return cursor.rowcount > 0

        return await self._run(write)

    async def assign(self, login: Login, account: str, *, replace: bool, now: float) -> str | None:
        def write(conn: sqlite3.Connection) -> str | None:
            def body() -> str | None:
                current = _account(conn, login)
                if current == account:
                    return current
                if current is not None and not replace:
                    raise LinkConflict(login, current)
                conn.execute("INSERT INTO links (issuer, subject, account, linked_at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (issuer, subject) DO UPDATE SET account = excluded.account, "
                             "linked_at = excluded.linked_at", (login.issuer, login.subject, account, now))
                return current

            return self._transaction(conn, body)

        return await self._run(write)

    async def remove(self, login: Login) -> str | None:
        def write(conn: sqlite3.Connection) -> str | None:
            row: Any = conn.execute("DELETE FROM links WHERE issuer = ? AND subject = ? RETURNING account",
                                    (login.issuer, login.subject)).fetchone()
            return None if row is None else str(row[0])

        return await self._run(write)


def _account(conn: sqlite3.Connection, login: Login) -> str | None:
    row = conn.execute("SELECT account FROM links WHERE issuer = ? AND subject = ?",
                       (login.issuer, login.subject)).fetchone()
    return None if row is None else str(row[0])
