"""The self-service linking ceremony: prove control of two logins, and they become one account.

Auth0's account linking is the anchor: the caller presents the primary login's access token as usual and the
secondary login's token in the body; its older form, which linked whatever `user_id` the caller named, was
deprecated because it linked accounts the caller did not control. Here the only way to name the other login
is to present a token the API itself accepts for it, so:

- a stolen *session* token alone cannot link anything: the current login must be strong (`min_aal`) and fresh
  (`max_auth_age`), or the answer is an RFC 9470 step-up;
- a stolen *link* token alone cannot either: it is verified as an access token for this API (issuer,
  signature, audience, expiry, type), must be fresh too, must come from the same client (`same_client`),
  must not be bound to a key the caller cannot prove, and is accepted once;
- a race between two accounts for one login is decided by the store, atomically (one 201, the rest 409).

Framework-neutral: the aiohttp handlers (`ztmw.linking.web`) parse the request and render what this returns
or raises. Assurance is never inherited: linking makes a login *own* the account, nothing more; every trust
requirement is still judged on the token presented (the pipeline never looks at links for trust).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping, NoReturn, TypeGuard

from ..audit import subject_for_audit
from ..config import Config, LinkingConfig
from ..errors import (
    AccessDenied,
    AccountConflict,
    InsufficientUserAuthentication,
    InvalidRequest,
    InvalidToken,
    NotLinked,
    TokenBindingMismatch,
    UnknownSubject,
    UpstreamUnavailable,
)
from ..models import Principal, TrustAssessment, VerifiedToken
from ..typing import Clock
from .store import (
    LinkConflict,
    LinkLimitReached,
    LinkStore,
    LinkTokenReplayed,
    Login,
    SingleUse,
    single_use_key,
)

Verify = Callable[[str], Awaitable[VerifiedToken]]
Resolve = Callable[[str, str], Awaitable["str | None"]]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the ceremony answers when it does not refuse: a status and a JSON body."""

    status: int
    body: Mapping[str, Any]


class LinkingCeremony:
    """POST (link), GET (list) and DELETE (unlink) on the account of the login making the request."""

    def __init__(self, config: Config, store: LinkStore, *, verify: Verify, resolve: Resolve, clock: Clock,
                 logger: Any) -> None:
        self._settings: LinkingConfig = config.linking
        self._store = store
        self._verify = verify
        self._resolve = resolve
        self._clock = clock
        self._log = logger
        self._subject_mode = config.audit.subject
        self._static_accounts = frozenset(link.account for link in config.identity_links)
        self._step_up_acrs = " ".join(acr for acr, levels in config.trust.acr.items()
                                      if levels.aal >= self._settings.min_aal)

    # -- link ----------------------------------------------------------------------------------------------

    async def link(self, current: Principal, trust: TrustAssessment, body: Any) -> Answer:
        token = body.get("link_token") if isinstance(body, Mapping) else None
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise InvalidRequest("malformed_link_request")
        self._require_strong_fresh_login(trust)
        try:
            other = await self._verify(token)
        except InvalidToken as error:
            self._log.info("ztmw.link_token_refused", reason=error.reason)
            raise InvalidToken("invalid_link_token") from None
        self._check_binding(other, current)
        self._check_fresh(other)
        me, login = Login(current.issuer, current.raw_subject), Login(other.issuer, other.subject)
        linkable = self._settings.issuers
        if linkable and (login.issuer not in linkable or me.issuer not in linkable):
            raise AccessDenied("issuer_not_linkable")
        if self._settings.same_client and not _same_client(current.token, other):
            raise AccessDenied("client_mismatch")
        if login == me:
            raise AccountConflict("link_self")
        account = current.subject
        once = self._single_use(other, token)
        try:
            owner = await self._resolve(login.issuer, login.subject)
        except UnknownSubject:
            owner = None
        if owner is not None and owner != account:  # a static link, or the store's: another account's login
            if await self._guarded(self._store.used(once)):  # a replay is a replay, whoever it would hit
                self._replayed(login)
            self._conflict(current, account, login)
        # a login no link names yet founds an account under its own sub; it must never join an existing one
        founding = not current.linked
        if founding and account in self._static_accounts:
            self._conflict(current, account, me, reason="account_exists")
        try:
            created = await self._store.link(account, [me, login], max_links=self._settings.max_links,
                                             once=once, now=self._clock(), founding=founding)
        except LinkTokenReplayed:
            self._replayed(login)
        except LinkConflict as conflict:  # the other login is another account's, or the current login may not
            # found or join this account
            self._conflict(current, account, conflict.login,
                           reason="account_conflict" if conflict.login == login else "account_exists")
        except LinkLimitReached:
            raise AccessDenied("link_limit_reached") from None
        except Exception:
            self._log.exception("ztmw.link_store_error")
            raise UpstreamUnavailable("link_store_unavailable") from None
        if created:
            self._log.info("ztmw.identity_linked", account=self._hide(account), issuer=login.issuer,
                           subject=self._hide(login.subject), by_issuer=me.issuer,
                           by_subject=self._hide(me.subject), via="ceremony")
        return Answer(201 if created else 200,
                      {"account": account, "issuer": login.issuer, "subject": login.subject})

    # -- list and unlink -----------------------------------------------------------------------------------

    async def logins(self, current: Principal) -> Answer:
        account = current.subject
        found = await self._guarded(self._store.logins(account)) if current.linked else []
        return Answer(200, {"account": account, "logins": [
            {"issuer": item.issuer, "subject": item.subject, "linked_at": _rfc3339(item.linked_at)}
            for item in found
        ]})

    async def unlink(self, current: Principal, trust: TrustAssessment, body: Any) -> Answer:
        issuer = body.get("issuer") if isinstance(body, Mapping) else None
        subject = body.get("subject") if isinstance(body, Mapping) else None
        if not _identifier(issuer) or not _identifier(subject):
            raise InvalidRequest("malformed_link_request")
        self._require_strong_fresh_login(trust)
        login, me = Login(issuer, subject), Login(current.issuer, current.raw_subject)
        if login == me:
            raise AccountConflict("unlink_self")
        account = current.subject
        if not current.linked or not await self._guarded(self._store.unlink(account, login)):
            raise NotLinked()
        self._log.info("ztmw.identity_unlinked", account=self._hide(account), issuer=login.issuer,
                       subject=self._hide(login.subject), by_issuer=me.issuer, by_subject=self._hide(me.subject),
                       via="ceremony")
        return Answer(200, {"account": account, "issuer": login.issuer, "subject": login.subject})

    # -- checks --------------------------------------------------------------------------------------------

    def _require_strong_fresh_login(self, trust: TrustAssessment) -> None:
        """RFC 9470: the login making the change must be strong and recent, else a step-up naming what."""
        max_age = str(self._settings.max_auth_age)
        if trust.aal < self._settings.min_aal:
            params = {"max_age": max_age}
            if self._step_up_acrs:
                params["acr_values"] = self._step_up_acrs
            raise InsufficientUserAuthentication("link_login_too_weak", params=params)
        if trust.auth_age is None or trust.auth_age > self._settings.max_auth_age:
            raise InsufficientUserAuthentication("link_login_too_old", params={"max_age": max_age})

    def _check_fresh(self, other: VerifiedToken) -> None:
        if other.auth_time is None or self._clock() - other.auth_time > self._settings.max_auth_age:
            raise InsufficientUserAuthentication("link_token_login_too_old",
                                                 params={"max_age": str(self._settings.max_auth_age)})

    @staticmethod
    def _check_binding(other: VerifiedToken, current: Principal) -> None:
        """A bound link token needs no second proof only when this request proved that very key."""
        proven = {"jkt": current.caller.key_thumbprint if current.binding == "dpop" else None,
                  "x5t#S256": current.caller.certificate_thumbprint}
        for member, value in other.cnf.items():
            held = proven.get(member)
            if not isinstance(value, str) or held is None or not hmac.compare_digest(value.encode(), held.encode()):
                raise TokenBindingMismatch("link_token_bound_elsewhere", security=True)

    def _replayed(self, login: Login) -> NoReturn:
        self._log.warning("ztmw.security", reason="link_token_replayed", issuer=login.issuer,
                          subject=self._hide(login.subject))
        raise InvalidToken("link_token_replayed") from None

    def _conflict(self, current: Principal, account: str, login: Login, *,
                  reason: str = "account_conflict") -> NoReturn:
        self._log.warning("ztmw.security", reason="link_conflict", account=self._hide(account),
                          issuer=login.issuer, subject=self._hide(login.subject), by_issuer=current.issuer,
                          by_subject=self._hide(current.raw_subject))
        raise AccountConflict(reason)

    @staticmethod
    def _single_use(other: VerifiedToken, token: str) -> SingleUse:
        jti = other.claims.get("jti")
        token_id = f"jti:{jti}" if isinstance(jti, str) and jti else \
            "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        return SingleUse(single_use_key(other.issuer, token_id), other.expires_at + other.leeway)

    def _hide(self, value: str) -> str | None:
        return subject_for_audit(value, self._subject_mode)

    async def _guarded(self, pending: Awaitable[Any]) -> Any:
        try:
            return await pending
        except Exception:
            self._log.exception("ztmw.link_store_error")
            raise UpstreamUnavailable("link_store_unavailable") from None


_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}")
"""An access token is visible ASCII (RFC 6750 §2.1 b64token, JWS compact, opaque tokens alike)."""


def _identifier(value: Any) -> TypeGuard[str]:
    """An issuer or subject a store can hold: a non-empty string of UTF-8-encodable text without NUL."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from JSON's \ud800
        return False
    return True


def _same_client(a: VerifiedToken, b: VerifiedToken) -> bool:
    """`client_id` (RFC 9068), or `azp` where the profile took it from there; both must be present."""
    return a.client_id is not None and b.client_id is not None and hmac.compare_digest(
        a.client_id.encode("utf-8", "surrogatepass"), b.client_id.encode("utf-8", "surrogatepass"))


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")
