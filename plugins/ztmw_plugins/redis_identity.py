"""The `redis` identity resolver: explicit identity links kept in Redis, shared by every replica.

One person, one subject (DESIGN.md §1): John logs in with a bank ID and with a social account and gets two
`(iss, sub)` pairs; a link maps each pair to his one canonical account id, so `owner` rules hold whichever
login he used. Links are data an operator writes explicitly (`link()` below); nothing is ever inferred from
matching emails or names, because that is an account-takeover path.

Configuration (`[identity] resolvers = ["redis"]`, or `["config", "redis"]` to ask the static links first)::

    [plugins.redis]
    url = "redis://127.0.0.1:6379/0"   # required; redis://, rediss:// (TLS) or unix://
    prefix = "ztmw:identity:"          # default
    timeout = 0.5                      # seconds for connect and each command, default 0.5, at most 30

Only linked subjects (RFC 8725 §3.8, BCP-08): a missing key means "no link", and the raw `sub` then stands
as the subject. To let only logins with a link in Redis use the API, turn on the core switch (it needs no
setting here)::

    [identity]
    resolvers = ["redis"]              # or ["config", "redis"] with static [[identity.links]] first
    require_known_subject = true       # a pair no resolver links: 401 invalid_token, reason unknown_subject

`unlink()` then takes a login's access away on its next request (this resolver is not `memo_safe`, so the
decision memo stays off and no allowed answer is replayed). An unreachable Redis is still a 503, never a 401:
"cannot tell" is not "not known".

Storage: one string key per link, ``prefix + sha256(issuer + "\\0" + subject)`` in hex, whose value is the
account id (UTF-8). Hashing keeps user identifiers (national ids, emails) out of Redis key names, `KEYS`
listings and slow logs, and keeps a `:` or `*` in a subject from meaning anything. The separator cannot be
forged: an issuer containing NUL is refused (issuers are configured URLs), so the first NUL always ends the
issuer and distinct pairs hash distinct inputs. Lone surrogates are hashed as written (`surrogatepass`), never
dropped or replaced, so two different subjects never share a key.

Failure: any Redis error (unreachable, timeout, wrong key type, an empty or non-UTF-8 value) propagates as an
exception; the core's `IdentityChain` turns it into 503 (fail closed). Answering "no link" instead would let
the raw `sub` stand in for the account, which could hand one person's data to another account or lock the
owner out, depending on which login they used.

Linking from Python (no CLI; run it where the operator's Redis credentials are)::

    import asyncio
    from ztmw_plugins.redis_identity import link, unlink

    asyncio.run(link("redis://127.0.0.1:6379/0", "https://bank-id.example", "19800101-1234", "acct-john"))
    asyncio.run(link("redis://127.0.0.1:6379/0", "https://social.example", "google|42", "acct-john"))
    asyncio.run(unlink("redis://127.0.0.1:6379/0", "https://social.example", "google|42"))

`link` refuses to move an existing link to another account unless `replace=True` (re-linking a login is an
account change an operator must mean); linking the same pair to the same account again is a no-op. Use the
same `prefix` as the deployment's `[plugins.redis] prefix` when it is not the default.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping

from ztmw.config import check_plugin_settings
from ztmw.errors import ConfigurationError
from ztmw.typing import PluginDeps

from .replay import open_redis_client

DEFAULT_PREFIX = "ztmw:identity:"
DEFAULT_TIMEOUT = 0.5
MAX_TIMEOUT = 30.0
URL_SCHEMES = ("redis://", "rediss://", "unix://")
_SETTINGS = frozenset({"url", "prefix", "timeout"})


class LinkConflict(ValueError):
    """`link()` was asked to move a login that is already linked to another account (use replace=True)."""


def link_key(issuer: str, subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The Redis key of one `(issuer, subject)` link: the prefix and a SHA-256 hex digest, never the ids."""
    if not isinstance(issuer, str) or not issuer or not isinstance(subject, str) or not subject:
        raise ValueError("issuer and subject must be non-empty strings")
    if "\0" in issuer:
        raise ValueError("an issuer containing NUL cannot be linked (the separator must stay unambiguous)")
    material = (issuer + "\0" + subject).encode("utf-8", "surrogatepass")
    return prefix + hashlib.sha256(material).hexdigest()


def _open_client(url: str, timeout: float) -> Any:
    return open_redis_client(url, timeout, what="plugins.redis")


def _decode_account(value: Any) -> str:
    """A stored value is a non-empty UTF-8 account id; anything else is corrupt data and must not pass."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("identity link value is not UTF-8") from None
    if not isinstance(value, str) or not value:
        raise ValueError("identity link value is empty or not a string")
    return value


class RedisIdentityResolver:
    """Resolves `(issuer, subject)` to the linked account id with one `GET`, or None when no link exists."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._url = url
        self.prefix = prefix
        self.timeout = timeout
        self._client: Any = None

    def __repr__(self) -> str:  # the URL may carry a password
        return f"RedisIdentityResolver(<url redacted>, prefix={self.prefix!r})"

    async def start(self) -> None:
        if self._client is None:
            self._client = _open_client(self._url, self.timeout)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def resolve(self, issuer: str, subject: str) -> str | None:
        if self._client is None:  # used without the app lifetime (a script, a test): open lazily
            await self.start()
        value = await self._client.get(link_key(issuer, subject, self.prefix))
        return None if value is None else _decode_account(value)


def create(settings: Mapping[str, Any], deps: PluginDeps) -> RedisIdentityResolver:
    """Entry point `redis` in `ztmw.identity_resolvers`, configured by `[plugins.redis]`."""
    check_plugin_settings(settings, "redis", _SETTINGS)
    url = settings.get("url")
    if not isinstance(url, str) or not url.startswith(URL_SCHEMES):
        raise ConfigurationError("plugins.redis.url: required, a redis://, rediss:// or unix:// URL")
    prefix = settings.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError("plugins.redis.prefix: must be a non-empty string")
    timeout = settings.get("timeout", DEFAULT_TIMEOUT)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout)
            or not 0 < timeout <= MAX_TIMEOUT):
        raise ConfigurationError(f"plugins.redis.timeout: a number of seconds in (0, {MAX_TIMEOUT:g}]")
    resolver = RedisIdentityResolver(url, prefix=prefix, timeout=float(timeout))
    deps.on_startup(resolver.start)
    deps.on_cleanup(resolver.close)
    return resolver


# -- operator helpers ---------------------------------------------------------------------------------------


async def _with_client(redis_client_or_url: Any, timeout: float, action: Any) -> Any:
    if isinstance(redis_client_or_url, str):
        client = _open_client(redis_client_or_url, timeout)
        try:
            return await action(client)
        finally:
            await client.aclose()
    return await action(redis_client_or_url)


async def link(
    redis_client_or_url: Any,
    issuer: str,
    subject: str,
    account: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    replace: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Link the login `(issuer, subject)` to `account`; returns the Redis key written.

    Idempotent for the same account; raises `LinkConflict` when the login is linked to another account and
    `replace` is false. `redis_client_or_url` is a `redis.asyncio.Redis` (left open) or a URL (opened and
    closed here).
    """
    key = link_key(issuer, subject, prefix)
    if not isinstance(account, str) or not account:
        raise ValueError("account must be a non-empty string")
    value = account.encode("utf-8")

    async def write(client: Any) -> str:
        if replace:
            await client.set(key, value)
            return key
        if not await client.set(key, value, nx=True):
            current = await client.get(key)
            if current != value:
                raise LinkConflict("this login is already linked to another account (pass replace=True)")
        return key

    result: str = await _with_client(redis_client_or_url, timeout, write)
    return result


async def unlink(
    redis_client_or_url: Any,
    issuer: str,
    subject: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Remove the link of `(issuer, subject)`; True when one existed. The login then resolves to its `sub`."""
    key = link_key(issuer, subject, prefix)

    async def delete(client: Any) -> bool:
        return bool(await client.delete(key))

    result: bool = await _with_client(redis_client_or_url, timeout, delete)
    return result
