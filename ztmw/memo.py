"""The decision memo: the whole answer for a repeated bearer request, so a cached token costs a hash and a lookup.

The verification cache already spares the signature check, but a hit still runs extraction, the binding and
identity stages, trust, and the rules: tens of microseconds that are the same every time the same bearer token
asks for the same path. When nothing in that chain can depend on the request beyond (route, method, path,
Authorization header) or on the clock beyond the token's expiry, the pipeline remembers the allowed outcome
under a hash of exactly those inputs and replays it.

What keeps it correct:
- only allowed outcomes of a *second* sighting (a verification-cache hit) are remembered, so a flood of distinct
  tokens fills nothing here, and every refusal is decided afresh;
- only plain bearer tokens: no `cnf` (a DPoP proof or certificate must be checked on every request), no
  caller certificate, no rule with conditions;
- a token with `auth_time` is remembered too, but its trust ages: every replay evaluates trust and the rule
  again against the clock (`MemoEntry.ages`), so `max_auth_age` and the published auth age stay exact;
- only when every trust evaluator, identity resolver and response decorator declares `memo_safe = True`
  (its answer for a principal does not depend on the request; see docs/plugins.md), and mTLS is off;
- an entry lives only while the verification cache still holds the very result it was built on (so never
  past `exp` or `cache.max_ttl`, and not past an eviction), and while the verifier still trusts that result
  (its key is still in the issuer's JWKS);
- only the canonical spelling (`Bearer <token>`, a path of at most 1 KiB without percent-encoding, no query
  token) is keyed (the adapter decides that), so one token cannot fill the memo with spellings of itself;
- a replay also needs the match info its decision was made on (the adapter checks it): an app middleware
  before ztmw's may clone a request to another path without resolving it again, and owner rules read it;
- keys hold two keyed hashes of the Authorization value (see `MemoKey`), never the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

from .cache import MemoryVerificationCache
from .config import Rule
from .models import RequestView, VerifiedToken
from .typing import Clock, TrustVersioned

if TYPE_CHECKING:  # pragma: no cover - the pipeline imports this module
    from .pipeline import Outcome

MemoKey = tuple[Hashable, str, str, "int | bytes", int]
"""(route object, method, raw path, and the Authorization value keyed-hashed twice): built by the adapter
(`middleware._plain_request`). The route object because aiohttp resolves Host-based sub-apps to different routes;
the raw path because it fixes the match info an owner rule reads.

The value is held as two 64-bit SipHash outputs (`hash()` of `Bearer <token>` and of ` <token>`; CPython
keys its str hash with a random 128-bit secret per process): no token and no unkeyed hash of one. Two
different values collide in both only by chance, 2^-128 per pair; a client that wants to be taken for
another must match both hashes of a value it does not know, under a key it does not know. SipHash is
about a quarter of SHA-256's cost on a 600-byte header, and a replay is mostly that hash. Where the str
hash is not SipHash (an exotic build) or its key is not random (PYTHONHASHSEED set), the adapter keys on
SHA-256 of the value instead. The verification
cache keeps its SHA-256 key of the token (INTRO-09), shared with DPoP `ath`."""


@dataclass(slots=True)
class MemoEntry:
    """An allowed outcome, the view it was decided on, and the verification-cache entry it stands on.

    Not frozen for `removals` and `trust_version` alone: the stamp the memo moves forward after checking in
    full that the entry still stands, so the replays after that check nothing but the stamp."""

    view: RequestView
    outcome: Outcome
    token: VerifiedToken
    """The verification-cache entry the outcome stands on (found again under `cache_key`)."""
    cache_key: bytes
    record: Callable[[int, float], None] | None
    """Records one replay: `record(status, started)`, `started` the request's `time.perf_counter()`."""
    still_trusted: Callable[[VerifiedToken], bool] | None
    """The verifier's own check that what it concluded still stands (None: it cannot tell)."""
    ages: bool
    """The token has `auth_time`: trust and the rule are decided again on each replay (the age moves)."""
    expires: float
    """When the verification-cache entry under `cache_key` expires (clock time)."""
    versioned: TrustVersioned
    """Whose `trust_version` says whether `still_trusted` may answer otherwise now."""
    removals: int
    """The verification cache's removal count when the entry was last seen to stand."""
    trust_version: int
    """`versioned.trust_version` then."""


class _Unversioned:
    """For a verifier that cannot tell whether a result still stands: nothing to ask, so nothing moves."""

    trust_version = 0


_UNVERSIONED = _Unversioned()
_ASK_EVERY_TIME = -1  # a trust_version no verifier has: `still_trusted` is asked on every replay


def plugins_are_memo_safe(plugins: Iterable[object]) -> bool:
    return all(getattr(plugin, "memo_safe", False) is True for plugin in plugins)


class DecisionMemo:
    """A bounded map of replayable allowed outcomes, each alive only while the verification cache still
    holds the very result it was built on: expiry, `max_ttl`, eviction and rotation all end it there.
    Eviction here is first-in first-out, so a hit costs no reordering.

    A replay checks three numbers: the clock against the cached result's expiry, the verification cache's
    removal count and the verifier's trust version against the values seen when the entry last stood. Only
    when one of the counts moved is the entry looked up in the cache and the verifier asked (and the stamp
    moved on when it still stands)."""

    def __init__(
        self,
        *,
        rules: Iterable[Rule],
        max_entries: int,
        cache: MemoryVerificationCache,
        trust_check: Callable[[VerifiedToken], Callable[[VerifiedToken], bool] | None],
        trust_source: Callable[[VerifiedToken], TrustVersioned | None],
        clock: Clock,
    ) -> None:
        # a rule with conditions (network, time of day...) depends on more than the memo key
        self._rule_ids = frozenset(rule.id for rule in rules if not rule.conditions)
        self._entries: dict[MemoKey, MemoEntry] = {}
        self._max_entries = max_entries
        self._cache = cache
        self._store = cache.store
        self._touch = cache.store.touch
        self._trust_check = trust_check
        self._trust_source = trust_source
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def recall(self, key: MemoKey) -> MemoEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if (entry.removals == self._store.removals and entry.versioned.trust_version == entry.trust_version
                and self._clock() < entry.expires):
            self._touch(entry.cache_key)  # held (nothing left the cache since): keep it recent, as a lookup does
            return entry
        return self._check(key, entry)

    def _check(self, key: MemoKey, entry: MemoEntry) -> MemoEntry | None:
        """The full check, once a count moved (or the entry expired): the very result is still cached and
        the verifier still trusts it. Also refreshes the cache entry's recency, as a lookup does."""
        try:
            removals, version = self._store.removals, entry.versioned.trust_version
            token = entry.token
            if self._cache.holds(entry.cache_key, token) and (entry.still_trusted is None
                                                               or entry.still_trusted(token)):
                if entry.trust_version != _ASK_EVERY_TIME:
                    entry.removals, entry.trust_version = removals, version
                return entry
        except Exception:  # a verifier bug: the full pipeline decides (and denies, SEC-07), never a 500 here
            pass
        self._entries.pop(key, None)
        return None

    def accepts(self, outcome: Outcome) -> bool:
        """Whether replaying `outcome` later is certain to give the same answer (see the module doc)."""
        principal = outcome.principal
        return not (
            outcome.cache != "hit"
            or outcome.cache_key is None
            or outcome.error is not None
            or not outcome.decision.allowed
            or outcome.decision.rule_id not in self._rule_ids
            or principal is None
            or principal.binding is not None
            or principal.caller.certificate is not None
            or principal.token.cnf
        )

    def remember(self, key: MemoKey, view: RequestView, outcome: Outcome,
                 record: Callable[[int, float], None] | None) -> None:
        """Keep `outcome` (which `accepts` must have accepted) and what records the audit of one of its
        replays. Nothing is kept when the result it stands on is no longer cached."""
        assert outcome.principal is not None and outcome.cache_key is not None
        token = outcome.principal.token
        removals = self._store.removals  # read first: a removal after this is seen by the next replay
        expires = self._cache.held_until(outcome.cache_key, token)
        if expires is None:
            return
        still_trusted = self._trust_check(token)
        versioned: TrustVersioned | None = _UNVERSIONED if still_trusted is None else self._trust_source(token)
        if versioned is None:
            versioned, version = _UNVERSIONED, _ASK_EVERY_TIME
        else:
            version = versioned.trust_version
            # the authentication that answered this request asked still_trusted at whatever version stood then
            # (a resolver may have awaited since): the stamp must be of an answer given at this version
            if still_trusted is not None and not still_trusted(token):
                return
        # the view keeps what the audit event reads, not the Authorization value the request carried
        bare = RequestView(method=view.method, path=view.path, route=view.route, match_info=view.match_info)
        ages = token.auth_time is not None
        entries = self._entries
        entries[key] = MemoEntry(bare, outcome, token, outcome.cache_key, None if ages else record, still_trusted,
                                 ages, expires, versioned, removals, version)
        if len(entries) > self._max_entries:
            del entries[next(iter(entries))]
