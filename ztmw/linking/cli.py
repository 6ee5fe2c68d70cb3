"""`ztmw links add|remove|list --config F`: the operator's commands on the configured link store.

Each change prints what it did and is recorded as the ceremony's changes are (`ztmw.identity_linked`,
`ztmw.identity_unlinked`, subjects as `[audit] subject` says, `via="operator"`), as one JSON line on stderr.
`add` refuses to move a login that is linked to another account unless `--replace` is given: moving a login
hands everything the account owns to whoever holds it, which an operator must mean.
Exit status: 0 done (or nothing to do), 1 refused (a move without --replace, removing a login that is not
linked), 2 invalid configuration, 3 store unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timezone
from typing import Any

import structlog

from ..audit import subject_for_audit
from ..config import Config, load_config
from ..errors import ConfigurationError
from .plugin import redis_prefix
from .store import LinkConflict, LinkStore, Login, open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="links_command", required=True)
    add = sub.add_parser("add", help="link a login to an account")
    remove = sub.add_parser("remove", help="unlink a login from its account")
    listing = sub.add_parser("list", help="an account's logins, or the account of one login")
    for command in (add, remove, listing):
        command.add_argument("--config", required=True)
    for command in (add, remove):
        command.add_argument("--issuer", required=True)
        command.add_argument("--subject", required=True)
    add.add_argument("--account", required=True)
    add.add_argument("--replace", action="store_true", help="move the login when it belongs to another account")
    listing.add_argument("--account")
    listing.add_argument("--issuer")
    listing.add_argument("--subject")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigurationError as exc:
        print(f"ztmw: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.links_command == "list" and not (args.account or (args.issuer and args.subject)):
        print("ztmw links list: give --account, or --issuer and --subject", file=sys.stderr)
        return 2
    store = open_store(config.linking.store, redis_prefix=redis_prefix(config))
    try:
        return asyncio.run(_run(args, config, store))
    except ConfigurationError as exc:
        print(f"ztmw: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, config: Config, store: LinkStore) -> int:
    log = structlog.wrap_logger(structlog.PrintLogger(sys.stderr), processors=[
        structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.JSONRenderer()])
    try:
        await store.start()
        command = {"add": _add, "remove": _remove, "list": _list}[args.links_command]
        return await command(args, config, store, log)
    except ConfigurationError:
        raise
    except Exception as exc:
        print(f"ztmw: the link store cannot be reached ({type(exc).__name__})", file=sys.stderr)
        return 3
    finally:
        await store.close()


def _hide(config: Config, value: str) -> str | None:
    return subject_for_audit(value, config.audit.subject)


async def _add(args: argparse.Namespace, config: Config, store: LinkStore, log: Any) -> int:
    login = Login(args.issuer, args.subject)
    try:
        before = await store.assign(login, args.account, replace=args.replace, now=time.time())
    except LinkConflict as conflict:
        print(f"refused: {login.issuer} {login.subject} is linked to account {conflict.current}; "
              "pass --replace to move it", file=sys.stderr)
        return 1
    if before == args.account:
        print(f"unchanged: {login.issuer} {login.subject} is already linked to account {args.account}")
        return 0
    if before is not None:
        log.info("ztmw.identity_unlinked", account=_hide(config, before), issuer=login.issuer,
                 subject=_hide(config, login.subject), via="operator")
    log.info("ztmw.identity_linked", account=_hide(config, args.account), issuer=login.issuer,
             subject=_hide(config, login.subject), via="operator")
    moved = f" (moved from account {before})" if before is not None else ""
    print(f"linked: {login.issuer} {login.subject} to account {args.account}{moved}")
    return 0


async def _remove(args: argparse.Namespace, config: Config, store: LinkStore, log: Any) -> int:
    login = Login(args.issuer, args.subject)
    account = await store.remove(login)
    if account is None:
        print(f"refused: {login.issuer} {login.subject} is not linked", file=sys.stderr)
        return 1
    log.info("ztmw.identity_unlinked", account=_hide(config, account), issuer=login.issuer,
             subject=_hide(config, login.subject), via="operator")
    print(f"unlinked: {login.issuer} {login.subject} from account {account}")
    return 0


async def _list(args: argparse.Namespace, config: Config, store: LinkStore, log: Any) -> int:
    account = args.account
    if account is None:
        account = await store.account_of(Login(args.issuer, args.subject))
        if account is None:
            print(f"{args.issuer} {args.subject} is not linked")
            return 0
    for item in await store.logins(account):
        when = datetime.fromtimestamp(item.linked_at, timezone.utc).isoformat(timespec="seconds")
        print(f"{account}\t{item.issuer}\t{item.subject}\t{when}")
    return 0
