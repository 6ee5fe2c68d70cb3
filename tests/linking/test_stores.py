"""Both link stores against the same contract: the SQLite file and a real Redis (database 15, own prefix).

The atomicity the ceremony relies on lives here: a refused link writes nothing (not even the link token's
single use), a login has one account, and concurrent attempts on one login leave exactly one link.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import AsyncIterator

import pytest
from ztmw_plugins.redis_identity import RedisIdentityResolver, link_key

from ztmw.linking.store import (
    LinkConflict,
    LinkLimitReached,
    LinkStore,
    LinkTokenReplayed,
    Login,
    SingleUse,
    open_store,
    single_use_key,
)

from ..conftest import delete_prefix

BANK, SOCIAL = "https://bank-id.example", "https://social.example"
JOHN, GOOGLE = Login(BANK, "19800101-1234"), Login(SOCIAL, "google|42")
NOW = 1_800_000_000.0


def once(name: str = "") -> SingleUse:
    return SingleUse(single_use_key(SOCIAL, name or uuid.uuid4().hex), NOW + 300)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LinkStore]:
    prefix = None
    if request.param == "sqlite":
        instance = open_store(f"sqlite:///{tmp_path / 'links.db'}")
    else:
        prefix = f"ztmw-linking-store-test:{uuid.uuid4().hex}:"
        instance = open_store(request.getfixturevalue("redis_url"), redis_prefix=prefix)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()
        if prefix is not None:
            await delete_prefix(request.getfixturevalue("redis_url"), prefix)


async def test_link_writes_every_login_and_reports_a_repeat_as_no_change(store: LinkStore) -> None:
    assert await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW) is True
    assert await store.account_of(GOOGLE) == "acct-john" and await store.account_of(JOHN) == "acct-john"
    assert await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW + 1) is False
    logins = await store.logins("acct-john")
    assert {(x.issuer, x.subject, x.account, x.linked_at) for x in logins} == {
        (BANK, JOHN.subject, "acct-john", NOW), (SOCIAL, GOOGLE.subject, "acct-john", NOW)}


async def test_a_conflicting_link_writes_nothing_not_even_the_single_use(store: LinkStore) -> None:
    await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW)
    jane = Login(BANK, "19900101-5678")
    ticket = once()
    with pytest.raises(LinkConflict) as raised:
        await store.link("acct-jane", [jane, GOOGLE], max_links=10, once=ticket, now=NOW)
    assert raised.value.login == GOOGLE
    assert await store.account_of(jane) is None and await store.logins("acct-jane") == []
    assert await store.used(ticket) is False


async def test_a_founding_login_never_joins_an_existing_account(store: LinkStore) -> None:
    await store.link("john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW, founding=True)
    impostor, theirs = Login(SOCIAL, "john"), Login(SOCIAL, "github|7")  # another issuer's user named "john"
    ticket = once()
    with pytest.raises(LinkConflict) as raised:
        await store.link("john", [impostor, theirs], max_links=10, once=ticket, now=NOW, founding=True)
    assert raised.value.login == impostor
    assert await store.account_of(impostor) is None and await store.account_of(theirs) is None
    assert len(await store.logins("john")) == 2 and await store.used(ticket) is False
    # a member of the account (not founding) adds logins; a founding login already in it is no newcomer
    assert await store.link("john", [JOHN, theirs], max_links=10, once=once(), now=NOW) is True
    assert await store.link("john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW, founding=True) is False


async def test_a_link_token_is_accepted_once(store: LinkStore) -> None:
    ticket = once("jti-1")
    await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=ticket, now=NOW)
    assert await store.used(ticket) is True
    with pytest.raises(LinkTokenReplayed):
        await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=ticket, now=NOW)


async def test_max_links_counts_the_accounts_logins_and_writes_nothing_beyond(store: LinkStore) -> None:
    await store.link("acct-john", [JOHN, GOOGLE], max_links=3, once=once(), now=NOW)
    github, apple = Login(SOCIAL, "github|1"), Login(SOCIAL, "apple|1")
    with pytest.raises(LinkLimitReached):
        await store.link("acct-john", [JOHN, github, apple], max_links=3, once=once(), now=NOW)
    assert await store.account_of(github) is None and await store.account_of(apple) is None


async def test_concurrent_links_of_one_login_leave_exactly_one(store: LinkStore) -> None:
    accounts = [f"acct-{i}" for i in range(16)]
    results = await asyncio.gather(*(
        store.link(account, [Login(BANK, account), GOOGLE], max_links=10, once=once(), now=NOW)
        for account in accounts), return_exceptions=True)
    winners = [a for a, r in zip(accounts, results) if r is True]
    assert len(winners) == 1
    assert all(isinstance(r, LinkConflict) for r in results if r is not True)
    assert await store.account_of(GOOGLE) == winners[0]
    for account in accounts:  # the losers' own logins were not written either
        assert await store.account_of(Login(BANK, account)) == (winners[0] if account == winners[0] else None)


async def test_unlink_removes_only_the_accounts_own_login(store: LinkStore) -> None:
    await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW)
    assert await store.unlink("acct-jane", GOOGLE) is False
    assert await store.account_of(GOOGLE) == "acct-john"
    assert await store.unlink("acct-john", GOOGLE) is True
    assert await store.account_of(GOOGLE) is None
    assert [x.subject for x in await store.logins("acct-john")] == [JOHN.subject]


async def test_operator_assign_refuses_a_move_unless_replace(store: LinkStore) -> None:
    assert await store.assign(GOOGLE, "acct-john", replace=False, now=NOW) is None
    assert await store.assign(GOOGLE, "acct-john", replace=False, now=NOW) == "acct-john"
    with pytest.raises(LinkConflict) as raised:
        await store.assign(GOOGLE, "acct-jane", replace=False, now=NOW)
    assert raised.value.current == "acct-john" and await store.account_of(GOOGLE) == "acct-john"
    assert await store.assign(GOOGLE, "acct-jane", replace=True, now=NOW) == "acct-john"
    assert await store.account_of(GOOGLE) == "acct-jane"
    assert await store.logins("acct-john") == [] and len(await store.logins("acct-jane")) == 1
    assert await store.remove(GOOGLE) == "acct-jane"
    assert await store.remove(GOOGLE) is None and await store.logins("acct-jane") == []


async def test_identifiers_are_compared_exactly(store: LinkStore) -> None:
    await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW)
    assert await store.account_of(Login(SOCIAL + "/", GOOGLE.subject)) is None
    assert await store.account_of(Login(SOCIAL, "GOOGLE|42")) is None
    assert await store.account_of(Login(BANK, GOOGLE.subject)) is None


@pytest.mark.redis
async def test_the_redis_store_writes_the_keys_the_redis_resolver_reads(redis_url: str) -> None:
    prefix = f"ztmw-linking-store-test:{uuid.uuid4().hex}:"
    store = open_store(redis_url, redis_prefix=prefix)
    resolver = RedisIdentityResolver(redis_url, prefix=prefix)
    try:
        await store.link("acct-john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW)
        assert await resolver.resolve(SOCIAL, GOOGLE.subject) == "acct-john"
        client = store._client  # type: ignore[attr-defined]
        assert await client.get(link_key(SOCIAL, GOOGLE.subject, prefix)) == b"acct-john"
        # no user identifier in any key name
        keys = [key.decode() async for key in client.scan_iter(match=prefix + "*")]
        assert keys and not any("google" in key or "acct-john" in key or "19800101" in key for key in keys)
        await store.unlink("acct-john", GOOGLE)
        assert await resolver.resolve(SOCIAL, GOOGLE.subject) is None
    finally:
        await resolver.close()
        await store.close()
        await delete_prefix(redis_url, prefix)


async def test_a_sqlite_file_that_cannot_be_opened_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    store = open_store(f"sqlite:///{tmp_path / 'a-directory.db'}")
    with pytest.raises(Exception):
        await store.start()
    await store.close()


async def test_two_sqlite_stores_on_one_file_agree(tmp_path: Path) -> None:
    """Two processes (workers) on one host: each has its own connection; writes are serialised by the file."""
    first, second = (open_store(f"sqlite:///{tmp_path / 'links.db'}") for _ in range(2))
    await first.start()
    await second.start()
    try:
        await first.link("acct-john", [JOHN, GOOGLE], max_links=10, once=once(), now=NOW)
        assert await second.account_of(GOOGLE) == "acct-john"
        with pytest.raises(LinkConflict):
            await second.link("acct-jane", [Login(BANK, "x"), GOOGLE], max_links=10, once=once(), now=NOW)
    finally:
        await first.close()
        await second.close()
