"""One issuer's JSON Web Key Set: loaded once, refetched sparingly, never trusted blindly.

A `KeySet` holds the keys of exactly one issuer (RFC 8725 §3.8: a key is only ever looked up in the set of the
issuer the token names). Keys are imported into joserfc key objects once per fetch, so the hot path is a dict
lookup. Fetching is defensive because the key server is a network peer like any other: no redirects, a size
cap, a key-count cap, a timeout, and every key that is not an unambiguous, canonical, verification-only
asymmetric key is dropped (checklist JWKS-01..13). A failed fetch never throws keys away (stale-if-error),
and an unknown `kid` can cause at most one fetch per cooldown, shared by all requests that wait (JWKS-10).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import aiohttp

from ztmw.config import IssuerConfig
from ztmw.errors import ConfigurationError, InvalidToken, UpstreamUnavailable
from ztmw.jws import ALGORITHM_KEY_TYPES, MalformedJWS, import_public_jwk, strict_json_object
from ztmw.typing import PluginDeps

MAX_JWKS_BYTES = 512 * 1024
MAX_KEYS = 100
_KEY_TYPES = frozenset(kty for kty, _ in ALGORITHM_KEY_TYPES.values())


class JWKSRejected(ValueError):
    """A fetched or configured document is not a usable JWK Set; `reason` is a stable id for logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An imported verification key and the algorithms it may be used with (one key, one family: BCP-01)."""

    kid: str | None
    key: Any  # joserfc ECKey | RSAKey | OKPKey
    algorithms: frozenset[str]


class KeyIndex:
    """The usable keys of one JWKS document, indexed by `kid` and by algorithm; immutable once built."""

    __slots__ = ("by_kid", "by_alg", "keys")

    def __init__(self, keys: list[PublicKey]) -> None:
        self.keys = tuple(keys)
        self.by_kid = {k.kid: k for k in keys if k.kid is not None}
        by_alg: dict[str, list[PublicKey]] = {}
        for key in keys:
            for alg in key.algorithms:
                by_alg.setdefault(alg, []).append(key)
        self.by_alg = {alg: tuple(found) for alg, found in by_alg.items()}

    def find(self, kid: str | None, alg: str) -> PublicKey | None:
        """The key a token names; without `kid`, only the single key that fits `alg` (JWKS-12)."""
        if kid is not None:
            return self.by_kid.get(kid)
        candidates = self.by_alg.get(alg, ())
        return candidates[0] if len(candidates) == 1 else None


def parse_jwks(document: Any, *, pins: tuple[str, ...] = ()) -> KeyIndex:
    """Build a `KeyIndex` from a parsed JWK Set, dropping every key we would not trust.

    Raises `JWKSRejected` when the document itself is unusable (not an object with a `keys` array, too many
    keys): the caller then keeps its previous keys. Individual bad keys are skipped, never fatal (JWKS-01).
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JWKSRejected("not_a_jwks")
    entries = document["keys"]
    if len(entries) > MAX_KEYS:
        raise JWKSRejected("too_many_keys")
    keys = [key for key in map(_usable_key, entries) if key is not None]
    if pins:
        keys = [key for key in keys if key.kid in pins]
    counts = Counter(key.kid for key in keys if key.kid is not None)
    return KeyIndex([key for key in keys if key.kid is None or counts[key.kid] == 1])  # JWKS-13: fail closed


def _usable_key(entry: Any) -> PublicKey | None:
    """One JWK, or None when it is not an asymmetric verification key in canonical form (JWKS-01..07, 11)."""
    if not isinstance(entry, Mapping) or entry.get("kty") not in _KEY_TYPES:  # unknown kty, `oct` (JWKS-07)
        return None
    if "use" in entry and entry["use"] != "sig":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kid, jwk_alg = entry.get("kid"), entry.get("alg")
    if kid is not None and (not isinstance(kid, str) or not kid):
        return None
    if jwk_alg is not None and jwk_alg not in ALGORITHM_KEY_TYPES:
        return None
    try:
        # only the required members are imported, so x5c/x5u never matter (JWKS-11); RSA < 2048 bits,
        # short EC coordinates, leading zeros and private members all raise here (JWKS-05/06, JOSE-12)
        key = import_public_jwk(entry)
    except MalformedJWS:
        return None
    crv = entry.get("crv")
    fits = frozenset(
        alg for alg, (kty, want_crv) in ALGORITHM_KEY_TYPES.items()
        if kty == entry["kty"] and (want_crv is None or want_crv == crv) and jwk_alg in (None, alg)  # JWKS-04
    )
    return PublicKey(kid, key, fits) if fits else None


class KeySet:
    """The keys of one issuer, from `jwks_file` (read now) or `jwks_uri` (fetched at start-up and on demand).

    Registers its own start-up and cleanup hooks on `deps`. A start-up fetch failure does not stop start-up:
    a background task retries (with backoff from `retry_initial` to `retry_max` seconds) until one succeeds,
    and meanwhile lookups raise `UpstreamUnavailable`.
    """

    def __init__(
        self,
        issuer: IssuerConfig,
        deps: PluginDeps,
        *,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
    ) -> None:
        self.issuer = issuer.issuer
        self._uri = issuer.jwks_uri
        self._pins = issuer.kids
        self._timeout = issuer.fetch_timeout
        self._cooldown = issuer.refetch_cooldown
        self._deps = deps
        self._log = deps.logger
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._index: KeyIndex | None = None
        self._last_fetch: float | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        if issuer.jwks_file is not None:
            self._index = _read_file(issuer.jwks_file, self._pins)
        if self._uri is not None:
            deps.on_startup(self.start)
            deps.on_cleanup(self.close)

    @property
    def loaded(self) -> bool:
        return self._index is not None

    def knows(self, kid: str) -> bool:
        """Whether `kid` is one of this issuer's current keys (no fetch); used to flag cross-issuer keys."""
        return self._index is not None and kid in self._index.by_kid

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        """The key to verify a token with, or `InvalidToken("unknown_key")` / `UpstreamUnavailable`.

        The returned key may not fit `alg` (a kid naming a key of another type): the caller decides how to
        refuse that, because it is an attack signal rather than an unknown key.
        """
        if self._pins and kid is not None and kid not in self._pins:
            raise InvalidToken("unknown_key")  # pinned: no fetch could ever make this kid acceptable (AT-14)
        index = self._index
        found = index.find(kid, alg) if index is not None else None
        if found is None and self._uri is not None and (self._inflight is not None or self._cooldown_over()):
            await self._refresh()
            index = self._index
            found = index.find(kid, alg) if index is not None else None
        if found is not None:
            return found
        if index is None:
            raise UpstreamUnavailable("jwks_unavailable")
        raise InvalidToken("unknown_key")

    async def start(self) -> None:
        """Start-up hook: first fetch; on failure, retry in the background instead of failing start-up."""
        if not await self._refresh():
            self._retry_task = asyncio.create_task(self._retry_until_loaded())

    async def close(self) -> None:
        """Cleanup hook: stop the background retry and any fetch still running."""
        for task in (self._retry_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._retry_task = self._inflight = None

    def _cooldown_over(self) -> bool:
        return self._last_fetch is None or self._deps.clock() - self._last_fetch >= self._cooldown

    async def _refresh(self) -> bool:
        """Fetch once, shared: every caller that arrives while a fetch runs awaits that same fetch."""
        if self._inflight is None:
            self._last_fetch = self._deps.clock()
            self._inflight = asyncio.ensure_future(self._fetch())
        # shield: a cancelled request must not cancel the fetch other requests are waiting for
        return await asyncio.shield(self._inflight)

    async def _retry_until_loaded(self) -> None:
        delay = self._retry_initial
        while self._index is None:
            await asyncio.sleep(delay)
            await self._refresh()
            delay = min(delay * 2, self._retry_max)

    async def _fetch(self) -> bool:
        try:
            self._index = parse_jwks(await self._download(), pins=self._pins)
            self._log.info("jwks_fetched", issuer=self.issuer, keys=len(self._index.keys))
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of a network peer means "unavailable"; old keys stay (JWKS-10)
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self._log.warning("jwks_fetch_failed", issuer=self.issuer, reason=reason)
            return False
        finally:
            self._inflight = None

    async def _download(self) -> Any:
        assert self._uri is not None
        async with asyncio.timeout(self._timeout):
            async with self._deps.http().get(
                self._uri,
                allow_redirects=False,
                headers={"Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                if response.status != 200:
                    raise JWKSRejected(f"http_{response.status}")
                if response.content_length is not None and response.content_length > MAX_JWKS_BYTES:
                    raise JWKSRejected("too_large")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JWKSRejected("too_large")
        return strict_json_object(bytes(body))


def _read_file(path: str, pins: tuple[str, ...]) -> KeyIndex:
    """A configured key file is read once at creation; a broken one stops start-up (it cannot heal itself)."""
    try:
        data = Path(path).read_bytes()
        if len(data) > MAX_JWKS_BYTES:
            raise JWKSRejected("too_large")
        return parse_jwks(strict_json_object(data), pins=pins)
    except OSError as exc:
        raise ConfigurationError(f"jwks_file {path}: cannot read ({exc.strerror})") from None
    except (JWKSRejected, MalformedJWS) as exc:
        raise ConfigurationError(f"jwks_file {path}: not a usable JWK Set ({exc.reason})") from None
