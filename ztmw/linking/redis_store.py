"""The link store in Redis, for fleets: the same keys the `redis` identity resolver reads, so both agree.

Layout (`prefix` is `[plugins.redis] prefix`, default `ztmw:identity:`):

- `prefix + sha256(issuer NUL subject)` -> account id: one key per login, exactly as
  `ztmw_plugins.redis_identity` writes and resolves them;
- `prefix + "account:" + sha256(account)`: a hash from each of the account's login keys to a JSON record
  (issuer, subject, linked_at), for listing an account's logins;
- `prefix + "used:" + sha256(issuer NUL jti)`: a link token's single use, expiring with the token.

The ceremony's link is one Lua script (Redis runs it atomically: the replay check, the conflict checks, the
`max_links` count and every write, or nothing); the operator's commands use WATCH/MULTI. Links written with
`redis_identity.link()` resolve the same but are not listed (they have no account record). Not for Redis
Cluster: a script touches keys of several slots.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

from .store import LinkConflict, LinkedLogin, LinkLimitReached, LinkTokenReplayed, Login, SingleUse

TIMEOUT = 0.5

# KEYS[1] account hash, KEYS[2] single-use key ("" for none), KEYS[3..] login keys
# ARGV[1] account, ARGV[2] max_links, ARGV[3] single-use lifetime (ms), ARGV[4] founding ("1" or "0"),
# ARGV[5..] login records, as KEYS[3..]
_LINK = """
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return {'replayed'} end
if ARGV[4] == '1' and redis.call('HLEN', KEYS[1]) > 0 and redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return {'conflict', '0'}
end
local new = {}
for i = 3, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if not current then table.insert(new, i)
  elseif current ~= ARGV[1] then return {'conflict', tostring(i - 3)} end
end
if #new > 0 and redis.call('HLEN', KEYS[1]) + #new > tonumber(ARGV[2]) then return {'limit'} end
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
for _, i in ipairs(new) do
  redis.call('SET', KEYS[i], ARGV[1])
  redis.call('HSET', KEYS[1], KEYS[i], ARGV[i + 2])
end
return {'ok', tostring(#new)}
"""

# KEYS[1] login key, KEYS[2] account hash; ARGV[1] account
_UNLINK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], KEYS[1])
  return 1
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisLinkStore:
    def __init__(self, url: str, *, prefix: str | None = None, timeout: float = TIMEOUT) -> None:
        from ztmw_plugins.redis_identity import DEFAULT_PREFIX

        self._url = url
        self.prefix = prefix or DEFAULT_PREFIX
        self.timeout = timeout
        self._client: Any = None

    def __repr__(self) -> str:  # the URL may carry a password
        return f"RedisLinkStore(<url redacted>, prefix={self.prefix!r})"

    async def start(self) -> None:
        if self._client is None:
            from ztmw_plugins.replay import open_redis_client

            self._client = open_redis_client(self._url, self.timeout, what="linking.store")
            self._link = self._client.register_script(_LINK)
            self._unlink = self._client.register_script(_UNLINK)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _redis(self) -> Any:
        if self._client is None:
            await self.start()
        return self._client

    def login_key(self, login: Login) -> str:
        from ztmw_plugins.redis_identity import link_key

        return link_key(login.issuer, login.subject, self.prefix)

    def account_key(self, account: str) -> str:
        return self.prefix + "account:" + hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()

    @staticmethod
    def _record(login: Login, now: float) -> str:
        return json.dumps({"issuer": login.issuer, "subject": login.subject, "linked_at": now})

    async def account_of(self, login: Login) -> str | None:
        value = await (await self._redis()).get(self.login_key(login))
        return None if value is None else _text(value)

    async def logins(self, account: str) -> list[LinkedLogin]:
        records = await (await self._redis()).hgetall(self.account_key(account))
        found = []
        for raw in records.values():
            record = json.loads(_text(raw))
            found.append(LinkedLogin(record["issuer"], record["subject"], account, float(record["linked_at"])))
        return sorted(found, key=lambda item: (item.linked_at, item.issuer, item.subject))

    async def used(self, once: SingleUse) -> bool:
        return bool(await (await self._redis()).exists(self.prefix + "used:" + once.key))

    async def link(self, account: str, logins: Sequence[Login], *, max_links: int, once: SingleUse | None,
                   now: float, founding: bool = False) -> bool:
        await self._redis()
        keys = [self.account_key(account), self.prefix + "used:" + once.key if once else ""]
        keys += [self.login_key(login) for login in logins]
        ttl_ms = max(1, int((once.expires_at - now) * 1000)) if once else 1
        args = [account, max_links, ttl_ms, "1" if founding else "0",
                *(self._record(login, now) for login in logins)]
        answer = [_text(part) for part in await self._link(keys=keys, args=args)]
        if answer[0] == "replayed":
            raise LinkTokenReplayed()
        if answer[0] == "conflict":
            raise LinkConflict(logins[int(answer[1])])
        if answer[0] == "limit":
            raise LinkLimitReached()
        return int(answer[1]) > 0

    async def unlink(self, account: str, login: Login) -> bool:
        await self._redis()
        return bool(await self._unlink(keys=[self.login_key(login), self.account_key(account)], args=[account]))

    async def assign(self, login: Login, account: str, *, replace: bool, now: float) -> str | None:
        def write(pipe: Any, key: str, current: str | None) -> bool:
            if current == account:
                return False
            if current is not None and not replace:
                raise LinkConflict(login, current)
            if current is not None:
                pipe.hdel(self.account_key(current), key)
            pipe.set(key, account)
            pipe.hset(self.account_key(account), key, self._record(login, now))
            return True

        return await self._update(login, write)

    async def remove(self, login: Login) -> str | None:
        def write(pipe: Any, key: str, current: str | None) -> bool:
            if current is None:
                return False
            pipe.delete(key)
            pipe.hdel(self.account_key(current), key)
            return True

        return await self._update(login, write)

    async def _update(self, login: Login, write: Callable[[Any, str, "str | None"], bool]) -> str | None:
        """WATCH the login's key, read its account, let `write` queue the change (False: nothing to change) and
        EXEC it; again from the start when another client changed the key in between. Returns the account the
        login had."""
        client = await self._redis()
        key = self.login_key(login)
        async with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    value = await pipe.get(key)
                    current = None if value is None else _text(value)
                    pipe.multi()
                    if write(pipe, key, current):
                        await pipe.execute()
                    return current
                except _watch_error():
                    continue


def _watch_error() -> type[Exception]:
    from redis.exceptions import WatchError

    return WatchError
