"""The link store: which account each login (issuer, subject) belongs to, written by the linking ceremony and
the operator CLI, read by the `linking` identity resolver on every request.

Every write is one atomic step in the store itself (an SQLite transaction, a Redis script or WATCH/MULTI), so
two concurrent attempts to link one login to two accounts leave exactly one link and the other sees
`LinkConflict`; the link token's single use is recorded in the same step, so a refused attempt consumes
nothing and an accepted one cannot be replayed. Nothing is ever inferred from emails or names: a link exists
only because someone who controlled both logins, or an operator, wrote it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class Login:
    """One way of logging in: the issuer and the `sub` it gives the person."""

    issuer: str
    subject: str


@dataclass(frozen=True, slots=True)
class LinkedLogin:
    issuer: str
    subject: str
    account: str
    linked_at: float


@dataclass(frozen=True, slots=True)
class SingleUse:
    """A link token's single-use record: a SHA-256 `key` (never the token or its jti) kept until `expires_at`."""

    key: str
    expires_at: float


class LinkError(Exception):
    """Base of what a link store refuses; the ceremony turns each into its HTTP answer."""


class LinkConflict(LinkError):
    """A login is already linked to another account (and `replace` was not asked for)."""

    def __init__(self, login: Login, current: str | None = None) -> None:
        super().__init__("this login is already linked to another account")
        self.login = login
        self.current = current


class LinkLimitReached(LinkError):
    """The account already has `max_links` logins."""


class LinkTokenReplayed(LinkError):
    """The link token was accepted once already."""


class LinkStore(Protocol):
    """What the ceremony, the resolver and the CLI need of a store. Errors other than `LinkError` mean the
    store cannot answer (503, never a guess)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def account_of(self, login: Login) -> str | None: ...

    async def link(self, account: str, logins: Sequence[Login], *, max_links: int, once: SingleUse | None,
                   now: float, founding: bool = False) -> bool:
        """Link every login to `account` in one step: True when something was written, False when all were
        linked to it already. Raises `LinkTokenReplayed`, `LinkConflict` or `LinkLimitReached`, writing nothing.

        `founding`: the first login is not linked anywhere and names the account by its own `sub`; it may only
        found a new account, never join one that has logins already (another issuer's user with the same
        `sub` would otherwise walk into it): `LinkConflict` for the first login."""

    async def used(self, once: SingleUse) -> bool:
        """Whether a link token was accepted already (to answer a replay as one, before anything else)."""

    async def unlink(self, account: str, login: Login) -> bool:
        """Remove the link of `login` when it belongs to `account`; True when it did."""

    async def logins(self, account: str) -> list[LinkedLogin]: ...

    async def assign(self, login: Login, account: str, *, replace: bool, now: float) -> str | None:
        """The operator's link: returns the account the login was linked to before (None: it was not).
        Raises `LinkConflict` when that was another account and `replace` is false."""

    async def remove(self, login: Login) -> str | None:
        """The operator's unlink, whatever the account: returns the account it belonged to, or None."""


def single_use_key(issuer: str, token_id: str) -> str:
    """The replay key of a link token: its issuer and `jti` (or token hash), hashed."""
    return hashlib.sha256((issuer + "\0" + token_id).encode("utf-8", "surrogatepass")).hexdigest()


def open_store(url: str, *, redis_prefix: str | None = None) -> LinkStore:
    """The store a `linking.store` setting names (already validated by the configuration)."""
    if url.startswith("sqlite:///"):
        from .sqlite_store import SQLiteLinkStore

        return SQLiteLinkStore(url[len("sqlite:///"):])
    from .redis_store import RedisLinkStore

    return RedisLinkStore(url, prefix=redis_prefix)
