"""One issuer's JSON Web Key Set: loaded once, refreshed before it goes stale, never trusted blindly.

A `KeySet` holds the keys of exactly one issuer (RFC 8725 §3.8: a key is only ever looked up in the set of the
issuer the token names). Keys are imported into joserfc key objects once per fetch, so the hot path is a dict
lookup. Fetching is defensive because the key server is a network peer like any other: no redirects, a size
cap, a key-count cap, a timeout, and every key that is not an unambiguous, canonical, verification-only
asymmetric key is dropped (checklist JWKS-01..13).

Freshness (JWKS-10, DESIGN §4.5): a fetched set is fresh for the response's `Cache-Control: max-age` (minus
`Age`), clamped to [`MIN_LIFETIME`, `MAX_LIFETIME`], `DEFAULT_LIFETIME` without one, `MIN_LIFETIME` with
`no-store`/`no-cache`. A background task refetches at `REFRESH_AT` of the lifetime, so a key the issuer
removed stops being accepted within one lifetime even when no token names an unknown kid. A failed fetch
never throws keys away (stale-if-error), but only for `STALE_MAX` past the end of their lifetime; after that
lookups fail closed with `UpstreamUnavailable` until a fetch succeeds. An unknown `kid` causes at most one
fetch per cooldown, shared by all requests that wait, and a kid a successful fetch proved absent is
remembered (bounded, LRU) so that requests naming it again fail at once instead of waiting on or triggering
a fetch. Every successful fetch that changes the keys bumps `version`; one that removes keys notifies the
`on_change` callbacks, for operators who want to act on removals. The token cache itself does not depend on
them: it asks `publishes(thumbprint)` on every hit, so a withdrawn or replaced key stops vouching at once.

Discovery (JWKS-08/09): with `discovery = "oauth"` or `"openid"` the `jwks_uri` comes from the issuer's metadata
(RFC 8414 / OpenID Connect Discovery), fetched from a URL built from the configured issuer only, never from a
token (BCP-10). The document is used only when its `issuer` is identical to the configured one, and its
`jwks_uri` must pass the same https-except-loopback check as a configured one. It is fetched with the same
defenses as the JWKS (`fetch_json`), kept for its own Cache-Control lifetime and fetched again, as the first
step of a key fetch, once that has passed; a changed `jwks_uri` is followed. A metadata fetch that fails or is
refused fails the whole key fetch: no keys until one succeeds, and a stale `jwks_uri` is never used.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import aiohttp

from ztmw.config import IssuerConfig, https_url
from ztmw.errors import ConfigurationError, InvalidToken, UpstreamUnavailable, ZtmwError
from ztmw.jws import ALGORITHM_KEY_TYPES, MalformedJWS, import_public_jwk, strict_json_object, thumbprint
from ztmw.lru import LRU
from ztmw.typing import PluginDeps

MAX_JWKS_BYTES = 512 * 1024
MAX_KEYS = 100
# Issuer metadata documents of common authorization servers are 2-10 KB; 128 KB leaves room for large ones
# without letting a metadata endpoint make us buffer much.
MAX_METADATA_BYTES = 128 * 1024

# Freshness of a fetched set (seconds). 5 min floor: a key server that says `no-store`, `max-age=0` or garbage
# still costs at most one background fetch per 5 min (per verifier process). 24 h ceiling: an issuer that says
# "cache for a year" still has a removed key dropped within a day. 1 h default: what common AS deployments
# send and what most JWT libraries assume when the key server gives no hint.
MIN_LIFETIME = 300.0
MAX_LIFETIME = 86_400.0
DEFAULT_LIFETIME = 3_600.0
# The background refresh runs when this fraction of the lifetime has passed (54 min of a 1 h lifetime), so a
# removal is normally seen before the lifetime ends and a failed attempt still leaves room for retries.
REFRESH_AT = 0.9
# Stale-if-error bound: after the lifetime ends keys are served for at most this long while every fetch fails,
# then lookups fail closed (503). 24 h rides out a key server outage of a working day without trusting a
# possibly withdrawn key indefinitely; overridable per KeySet (`stale_max=`).
STALE_MAX = 86_400.0
# Negative-kid memory: a kid a successful fetch proved absent fails fast (no fetch, no wait) until the next
# successful fetch or for at most NEGATIVE_TTL, whichever is first; at most UNKNOWN_KIDS_MAX kids, LRU. The
# TTL bounds the harm of a kid the AS published while our fetch was already under way (or behind a lagging
# CDN): such a kid is retried after 5 min at the latest instead of waiting for the next background refresh.
UNKNOWN_KIDS_MAX = 1_000
NEGATIVE_TTL = 300.0
# Longest real-time sleep of the background task between clock checks (a wall-clock jump, such as a suspended
# host, is noticed within this; each check without a fetch is one comparison).
CHECK_INTERVAL = 60.0

_DELTA_SECONDS = re.compile(r"[0-9]+")  # RFC 9111 §1.2.2 delta-seconds
_DELTA_MAX = 2.0**31  # RFC 9111 §1.2.2: a larger delta-seconds counts as 2^31

ChangeCallback = Callable[[str, frozenset[str]], None]

_KEY_TYPES = frozenset(kty for kty, _ in ALGORITHM_KEY_TYPES.values())


class JWKSRejected(ZtmwError, ValueError):
    """A fetched or configured document (a JWK Set, or an issuer's metadata) is not usable; `reason` is a
    stable id for logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An imported verification key and the algorithms it may be used with (one key, one family: BCP-01)."""

    kid: str | None
    key: Any  # joserfc ECKey | RSAKey | OKPKey
    algorithms: frozenset[str]
    thumbprint: str
    """RFC 7638 thumbprint of the key material, computed once at import."""


class KeyIndex:
    """The usable keys of one JWKS document, indexed by `kid` and by algorithm; immutable once built."""

    __slots__ = ("by_kid", "by_alg", "keys", "fingerprints", "identity", "thumbprints")

    def __init__(self, keys: list[PublicKey]) -> None:
        self.keys = tuple(keys)
        self.by_kid = {k.kid: k for k in keys if k.kid is not None}
        # what a key verifies with: RFC 7638 thumbprint of the material plus the algorithms it may be used
        # for; a kid whose fingerprint changes between fetches counts as removed (its old key is gone)
        self.fingerprints = {k.kid: (k.thumbprint, k.algorithms) for k in keys if k.kid is not None}
        self.identity = frozenset((k.kid, k.thumbprint, k.algorithms) for k in keys)
        self.thumbprints = frozenset(k.thumbprint for k in keys)
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


@dataclass(frozen=True, slots=True)
class IssuerMetadata:
    """What ztmw takes from an issuer's metadata document: only where its keys are, and until when to believe it."""

    jwks_uri: str
    expires_at: float
    """Clock time the document goes stale; the next key fetch after it fetches the metadata first."""


def metadata_jwks_uri(document: Mapping[str, Any], issuer: str) -> str:
    """The `jwks_uri` of a metadata document fetched for `issuer`, or `JWKSRejected`.

    JWKS-08 (RFC 8414 §3.3, OIDC Discovery §4.3): `issuer` must be identical (no normalisation) to the issuer
    the metadata URL was built from, else nothing in the document is used: a metadata endpoint answering for
    another issuer (mix-up, a shared host, a misrouted tenant) must not hand us that issuer's keys. JWKS-09:
    the `jwks_uri` must be https (plain http on loopback only), checked by the function that checks a
    configured one.
    """
    if document.get("issuer") != issuer:
        raise JWKSRejected("issuer_mismatch")
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise JWKSRejected("no_jwks_uri")
    try:
        return https_url(jwks_uri, "jwks_uri")
    except ConfigurationError:
        raise JWKSRejected("jwks_uri_not_https") from None


async def fetch_json(http: aiohttp.ClientSession, uri: str, *, timeout: float, max_bytes: int) -> tuple[Any, float]:
    """GET one JSON object from a network peer: the one fetch for JWK Sets and issuer metadata alike.

    Defensive because the peer is a network peer like any other: no redirects at all (so none to another
    origin), a status other than 200 refused, at most `max_bytes` read (checked on the announced length and
    while reading), `timeout` seconds in all, strict JSON that must be an object. Returns the object and its
    freshness lifetime from `Cache-Control`/`Age` (`freshness_lifetime`).
    """
    async with asyncio.timeout(timeout):
        async with http.get(
            uri,
            allow_redirects=False,
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            if response.status != 200:
                raise JWKSRejected(f"http_{response.status}")
            if response.content_length is not None and response.content_length > max_bytes:
                raise JWKSRejected("too_large")
            lifetime = freshness_lifetime(response.headers.getall("Cache-Control", ()),
                                          response.headers.get("Age"))
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > max_bytes:
                    raise JWKSRejected("too_large")
    return strict_json_object(bytes(body)), lifetime


def freshness_lifetime(cache_control: Iterable[str], age: str | None = None) -> float:
    """Seconds a fetched JWKS or issuer metadata document stays fresh, from `Cache-Control` and `Age` (RFC 9111 §4.2).

    `no-store` or `no-cache` -> `MIN_LIFETIME` (refresh as often as we ever do); no `max-age` ->
    `DEFAULT_LIFETIME`; a malformed or conflicting `max-age` counts as stale (RFC 9111 §4.2.1) ->
    `MIN_LIFETIME`; otherwise `max-age - Age`, clamped to [`MIN_LIFETIME`, `MAX_LIFETIME`]. `Expires` and
    `s-maxage` are ignored: the first trusts the AS clock, the second is for shared caches.
    """
    directives: dict[str, list[str | None]] = {}
    for line in cache_control:
        for part in line.split(","):
            name, equals, value = part.partition("=")
            name, value = name.strip().lower(), value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if name:
                directives.setdefault(name, []).append(value if equals else None)
    if "no-store" in directives or "no-cache" in directives:
        return MIN_LIFETIME
    values = directives.get("max-age")
    if not values:
        return DEFAULT_LIFETIME
    if len(set(values)) != 1 or values[0] is None or not _DELTA_SECONDS.fullmatch(values[0]):
        return MIN_LIFETIME
    seconds = min(float(values[0]), _DELTA_MAX)
    if age is not None and _DELTA_SECONDS.fullmatch(age.strip()):
        seconds -= min(float(age.strip()), _DELTA_MAX)
    return min(max(seconds, MIN_LIFETIME), MAX_LIFETIME)


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
    return PublicKey(kid, key, fits, thumbprint(key)) if fits else None


class KeySet:
    """The keys of one issuer, from `jwks_file` (read now) or `jwks_uri` (fetched at start-up, kept fresh), the
    latter configured or found through `discovery` in the issuer's metadata.

    Registers its own start-up and cleanup hooks on `deps`. Start-up fetches once and then starts a background
    task that refreshes the set before its lifetime ends (`refresh_if_due`). A start-up fetch failure does not
    stop start-up: the task retries (with backoff from `retry_initial` to `retry_max` seconds) until a fetch
    succeeds, and meanwhile lookups raise `UpstreamUnavailable`. Every freshness decision reads `deps.clock`;
    the task only sleeps in real time, at most `check_interval` seconds between two looks at the clock.
    """

    def __init__(
        self,
        issuer: IssuerConfig,
        deps: PluginDeps,
        *,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
        stale_max: float = STALE_MAX,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.issuer = issuer.issuer
        self._uri = issuer.jwks_uri
        self._metadata_url = issuer.metadata_url
        self._metadata: IssuerMetadata | None = None
        self._remote = self._uri is not None or self._metadata_url is not None
        self._pins = issuer.kids
        self._timeout = issuer.fetch_timeout
        self._cooldown = issuer.refetch_cooldown
        self._deps = deps
        self._log = deps.logger
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._stale_max = stale_max
        self._check_interval = check_interval
        self._index: KeyIndex | None = None
        self._version = 0
        self._lifetime: float | None = None
        self._refresh_at = math.inf  # clock time of the next background refresh
        self._expires_at = math.inf  # clock time the keys' freshness lifetime ends (stale after it)
        self._usable_until = math.inf  # clock time after which the keys are too stale to use (fail closed)
        self._unknown: LRU[str, float] = LRU(UNKNOWN_KIDS_MAX)  # kid -> when a fetch proved it absent
        self._listeners: list[ChangeCallback] = []
        self._version_listeners: list[Callable[[], None]] = []
        self._last_fetch: float | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        if issuer.jwks_file is not None:
            self._index = _read_file(issuer.jwks_file, self._pins)
            self._version = 1
        if self._remote:
            deps.on_startup(self.start)
            deps.on_cleanup(self.close)

    @property
    def loaded(self) -> bool:
        return self._index is not None

    @property
    def version(self) -> int:
        """0 until keys are loaded; +1 on every successful fetch that changed the usable keys (kid, key
        material or algorithms). Equal versions of one KeySet mean the same keys."""
        return self._version

    @property
    def jwks_uri(self) -> str | None:
        """Where the keys are fetched from: the configured `jwks_uri`, or the one the issuer's metadata named
        last (None before the first metadata fetch succeeded, and for a `jwks_file`)."""
        if self._metadata is not None:
            return self._metadata.jwks_uri
        return self._uri

    @property
    def lifetime(self) -> float | None:
        """Freshness lifetime (seconds) of the last fetched set; None for a `jwks_file` or before a fetch."""
        return self._lifetime

    def publishes(self, thumbprint: str) -> bool:
        """Whether this exact key material is among the issuer's current keys (no fetch): a cached token
        verified by a key that was withdrawn, or replaced under the same kid, is no longer trusted."""
        return self._index is not None and thumbprint in self._index.thumbprints

    def knows(self, kid: str) -> bool:
        """Whether `kid` is one of this issuer's current keys (no fetch); used to flag cross-issuer keys."""
        return self._index is not None and kid in self._index.by_kid

    def on_change(self, callback: ChangeCallback) -> None:
        """Call `callback(issuer, removed_kids)` after each successful fetch that removed keys.

        `removed_kids` holds the kids that left the set and the kids that now name other key material or
        algorithms (their old key is gone either way). Called synchronously, after the new keys are in
        place; an exception is logged and does not affect the fetch or the other callbacks. Keys without
        a `kid` are not reported (compare `version` for those).
        """
        self._listeners.append(callback)

    def on_version(self, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever `version` moves, right after the new keys are in place (it must not raise)."""
        self._version_listeners.append(callback)

    def ready_key(self, kid: str | None, alg: str) -> PublicKey | None:
        """The key `key_for` would return at once (no fetch, no wait), or None when `key_for` must decide.

        The common case of a verification, answered without creating and awaiting a coroutine; on None the
        caller awaits `key_for`, which repeats these steps and then refuses, fetches or waits.
        """
        if self._pins and kid is not None and kid not in self._pins:
            return None  # key_for refuses it
        index = self._index
        if index is None or self._deps.clock() >= self._usable_until:
            return None
        return index.find(kid, alg)

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        """The key to verify a token with, or `InvalidToken("unknown_key")` / `UpstreamUnavailable`.

        The returned key may not fit `alg` (a kid naming a key of another type): the caller decides how to
        refuse that, because it is an attack signal rather than an unknown key.
        """
        if self._pins and kid is not None and kid not in self._pins:
            raise InvalidToken("unknown_key")  # pinned: no fetch could ever make this kid acceptable (AT-14)
        index = self._usable()
        found = index.find(kid, alg) if index is not None else None
        if found is not None:
            return found
        if index is not None and kid is not None and self._known_absent(kid):
            raise InvalidToken("unknown_key")  # proven absent by a recent fetch: no fetch, no wait
        refetch_failed = False
        if self._remote and (self._inflight is not None or self._cooldown_over()):
            fetched = await self._refresh()
            refetch_failed = not fetched
            index = self._usable()
            found = index.find(kid, alg) if index is not None else None
            if found is not None:
                return found
            if fetched and kid is not None and index is not None:
                self._remember_absent(kid)
        if index is None or refetch_failed:
            # the key server could not say whether it knows this kid: 503, so the client keeps its token
            raise UpstreamUnavailable("jwks_unavailable")
        raise InvalidToken("unknown_key")

    async def refresh_if_due(self) -> bool | None:
        """Fetch when no keys are loaded or the set has reached `REFRESH_AT` of its lifetime.

        Returns None when nothing was due (no fetch), else whether the fetch succeeded. Joins a fetch that is
        already under way instead of starting another. The background task calls this; tests can too.
        """
        if not self._remote or (self._index is not None and self._deps.clock() < self._refresh_at):
            return None
        return await self._refresh()

    async def start(self) -> None:
        """Start-up hook: first fetch (a failure does not fail start-up), then the background refresh task."""
        fetched = await self._refresh()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._maintain(failing=not fetched), name=f"jwks {self.issuer}")

    async def close(self) -> None:
        """Cleanup hook: stop the background task and any fetch still running."""
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._inflight = None

    def _usable(self) -> KeyIndex | None:
        """The current keys; None when there are none or they are over `stale_max` past their lifetime."""
        index = self._index
        if index is not None and self._deps.clock() >= self._usable_until:
            return None
        return index

    def _known_absent(self, kid: str) -> bool:
        when = self._unknown.get(kid)
        if when is None:
            return False
        if self._deps.clock() - when >= NEGATIVE_TTL:
            self._unknown.pop(kid)
            return False
        return True

    def _remember_absent(self, kid: str) -> None:
        self._unknown.put(kid, self._deps.clock())

    def _cooldown_over(self) -> bool:
        return self._last_fetch is None or self._deps.clock() - self._last_fetch >= self._cooldown

    async def _refresh(self) -> bool:
        """Fetch once, shared: every caller that arrives while a fetch runs awaits that same fetch."""
        if self._inflight is None:
            self._last_fetch = self._deps.clock()
            self._inflight = asyncio.ensure_future(self._fetch())
        # shield: a cancelled request must not cancel the fetch other requests are waiting for
        return await asyncio.shield(self._inflight)

    async def _maintain(self, failing: bool) -> None:
        """Background task: retry with backoff while fetches fail, else sleep until the refresh is due."""
        delay = self._retry_initial
        while True:
            if failing:
                wait = delay
                delay = min(delay * 2, self._retry_max)
            else:
                delay = self._retry_initial
                # at least a moment between looks, so a clock that stands still cannot make this spin
                wait = min(max(self._refresh_at - self._deps.clock(), 1.0), self._check_interval)
            await asyncio.sleep(wait)
            failing = await self.refresh_if_due() is False

    async def _fetch(self) -> bool:
        started = self._deps.clock()
        stage = "metadata"  # only the metadata fetch can fail before the key fetch starts
        try:
            uri = await self._jwks_location(started)
            stage = "jwks"
            document, lifetime = await fetch_json(self._deps.http(), uri, timeout=self._timeout,
                                                  max_bytes=MAX_JWKS_BYTES)
            index = parse_jwks(document, pins=self._pins)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of a network peer means "unavailable"; old keys stay (JWKS-10)
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self._log.warning("jwks_fetch_failed", issuer=self.issuer, stage=stage, reason=reason,
                              stale=self._index is not None and started >= self._expires_at,
                              fail_closed=self._index is not None and started >= self._usable_until)
            return False
        finally:
            self._inflight = None
        self._install(index, lifetime, started)
        return True

    async def _jwks_location(self, now: float) -> str:
        """The configured `jwks_uri`, or the one in the issuer's metadata, fetched first when it is stale."""
        if self._metadata_url is None:
            assert self._uri is not None
            return self._uri
        if self._metadata is None or now >= self._metadata.expires_at:
            self._metadata = await self._discover(self._metadata_url, now)
        return self._metadata.jwks_uri

    async def _discover(self, url: str, now: float) -> IssuerMetadata:
        """Fetch and check the issuer's metadata (JWKS-08/09); raises on anything unusable."""
        document, lifetime = await fetch_json(self._deps.http(), url, timeout=self._timeout,
                                              max_bytes=MAX_METADATA_BYTES)
        jwks_uri = metadata_jwks_uri(document, self.issuer)
        if self._metadata is None or self._metadata.jwks_uri != jwks_uri:
            self._log.info("jwks_uri_discovered", issuer=self.issuer, jwks_uri=jwks_uri,
                           changed=self._metadata is not None)
        return IssuerMetadata(jwks_uri, now + lifetime)

    def _install(self, index: KeyIndex, lifetime: float, fetched_at: float) -> None:
        """Swap in a successfully fetched set (no await: callers see the old set or the new, never a mix)."""
        old = self._index
        self._index = index
        self._lifetime = lifetime
        # counted from when the fetch started: the document may have been produced at any time after that
        self._refresh_at = fetched_at + lifetime * REFRESH_AT
        self._expires_at = fetched_at + lifetime
        self._usable_until = self._expires_at + self._stale_max
        self._unknown.clear()
        changed = old is None or old.identity != index.identity
        if changed:
            self._version += 1
            for listener in tuple(self._version_listeners):
                listener()
        removed = frozenset(
            kid for kid, fingerprint in old.fingerprints.items() if index.fingerprints.get(kid) != fingerprint
        ) if old is not None else frozenset()
        self._log.info("jwks_fetched", issuer=self.issuer, keys=len(index.keys), version=self._version,
                       changed=changed, removed=sorted(removed), lifetime=lifetime)
        if removed:
            for callback in tuple(self._listeners):
                try:
                    callback(self.issuer, removed)
                except Exception:
                    self._log.exception("jwks_change_callback_failed", issuer=self.issuer)


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
