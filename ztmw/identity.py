"""Identity resolvers: one person, one subject.

A user who logs in with a bank ID and with a social account has two (iss, sub) pairs; ownership rules must hold
whichever one they used. Links are explicit data, never inferred from matching emails (an account-takeover path).

RFC 8725 §3.8 asks the application to check that `sub` is a valid subject, or issuer-subject pair, *here*, and to
reject the JWT otherwise. A resolver that knows its subjects exhaustively says so by raising `UnknownSubject`;
`identity.require_known_subject` makes the chain itself refuse every pair that no resolver links.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from .config import IdentityLink, check_plugin_settings
from .errors import UnknownSubject, UpstreamUnavailable
from .typing import IdentityResolver, PluginDeps


class ConfigIdentityResolver:
    """Links listed under `[[identity.links]]` in the configuration."""

    name = "config"
    memo_safe = True  # the links are fixed for the process lifetime, so a linked pair stays linked

    def __init__(self, links: Iterable[IdentityLink]) -> None:
        self._accounts = {(link.issuer, link.subject): link.account for link in links}

    async def resolve(self, issuer: str, subject: str) -> str | None:
        return self._accounts.get((issuer, subject))


def create_config_resolver(settings: Mapping[str, Any], deps: PluginDeps) -> ConfigIdentityResolver:
    """Entry point `config` in `ztmw.identity_resolvers`: the `[[identity.links]]` of the configuration."""
    check_plugin_settings(settings, "config", hint="use [[identity.links]]")
    return ConfigIdentityResolver(deps.config.identity_links)


class IdentityChain:
    """Asks the configured resolvers in order; the first link found wins, none keeps `sub` unchanged.

    A resolver that cannot answer (its store is down) denies with 503: guessing "no link" could hand one
    person's data to another account, or lock the owner out, depending on which login they used. A resolver
    that answers "no such subject here" (`UnknownSubject`) refuses the token with 401 `invalid_token`, and so
    does the chain itself when no resolver links the pair and `identity.require_known_subject` is on.
    """

    def __init__(
        self, resolvers: Sequence[tuple[str, IdentityResolver]], logger: Any, *, require_known_subject: bool = False
    ) -> None:
        self._resolvers = tuple(resolvers)
        self._log = logger
        self._require_known_subject = require_known_subject

    async def resolve(self, issuer: str, subject: str) -> str | None:
        for name, resolver in self._resolvers:
            try:
                account = await resolver.resolve(issuer, subject)
            except UnknownSubject:
                # a fresh refusal: the reason id and the client-facing text stay the fixed ones, whatever the
                # resolver put in its exception (no resolver-supplied challenge parameters reach the client)
                raise UnknownSubject() from None
            except Exception:
                self._log.exception("ztmw.plugin_error", plugin=name, group="ztmw.identity_resolvers")
                raise UpstreamUnavailable("identity_unavailable") from None
            if account is not None:
                return account
        if self._require_known_subject:
            raise UnknownSubject()
        return None
