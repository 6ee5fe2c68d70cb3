"""Identity resolvers: one person, one subject.

A user who logs in with a bank ID and with a social account has two (iss, sub) pairs; ownership rules must hold
whichever one they used. Links are explicit data, never inferred from matching emails (an account-takeover path).
"""

from __future__ import annotations

from typing import Iterable

from .config import IdentityLink


class ConfigIdentityResolver:
    """Links listed under `[[identity.links]]` in the configuration."""

    name = "config"

    def __init__(self, links: Iterable[IdentityLink]) -> None:
        self._accounts = {(link.issuer, link.subject): link.account for link in links}

    async def resolve(self, issuer: str, subject: str) -> str | None:
        return self._accounts.get((issuer, subject))
