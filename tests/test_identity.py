"""Identity linking: one person, one subject (DESIGN.md §1, §4.5 canonical subject)."""

from __future__ import annotations

from ztmw import load_config
from ztmw.config import IdentityLink
from ztmw.identity import ConfigIdentityResolver

BANK = "https://bank-id.example"
SOCIAL = "https://social.example"

LINKS = [
    IdentityLink(issuer=BANK, subject="19800101-1234", account="acct-john"),
    IdentityLink(issuer=SOCIAL, subject="google|42", account="acct-john"),
    IdentityLink(issuer=SOCIAL, subject="google|43", account="acct-jane"),
]


async def test_every_login_of_one_person_resolves_to_one_account() -> None:
    resolver = ConfigIdentityResolver(LINKS)
    assert await resolver.resolve(BANK, "19800101-1234") == "acct-john"
    assert await resolver.resolve(SOCIAL, "google|42") == "acct-john"
    assert await resolver.resolve(SOCIAL, "google|43") == "acct-jane"


async def test_unlinked_subject_resolves_to_none() -> None:
    resolver = ConfigIdentityResolver(LINKS)
    assert await resolver.resolve(SOCIAL, "google|99") is None


async def test_links_are_per_issuer_never_across_issuers() -> None:
    # the same sub at another issuer is another person (BCP-07/BCP-08)
    resolver = ConfigIdentityResolver(LINKS)
    assert await resolver.resolve(BANK, "google|42") is None
    assert await resolver.resolve("https://evil.example", "19800101-1234") is None


async def test_issuer_and_subject_compare_exactly() -> None:
    resolver = ConfigIdentityResolver(LINKS)
    assert await resolver.resolve(BANK + "/", "19800101-1234") is None
    assert await resolver.resolve(SOCIAL, "GOOGLE|42") is None
    assert await resolver.resolve(SOCIAL, "google|42 ") is None


async def test_no_links_resolves_nothing() -> None:
    assert await ConfigIdentityResolver([]).resolve(BANK, "x") is None


async def test_links_from_the_configuration() -> None:
    config = load_config({
        "resource": {"identifier": "https://api.example.com"},
        "identity": {"links": [
            {"issuer": BANK, "subject": "19800101-1234", "account": "acct-john"},
            {"issuer": SOCIAL, "subject": "google|42", "account": "acct-john"},
        ]},
    })
    resolver = ConfigIdentityResolver(config.identity_links)
    assert await resolver.resolve(SOCIAL, "google|42") == "acct-john"
    assert await resolver.resolve(BANK, "19800101-1234") == "acct-john"
