"""A linking deployment for end-to-end tests: three development issuers and `ztmw serve` replicas of
`tests.factories:create_accounts_app` with `[linking]` on, the link store SQLite or Redis.

Issuers: `bank` (acr bankid: AAL 2, IAL 3), `social` (acr social: AAL 1) and `other` (configured, but not
linkable). Rules: `/accounts/{account}/data` (owner) and `/accounts/{account}/payments` (owner, bank ID, fresh).
`identity.owner_requires_link` is on, as it is by default with several issuers: only linked logins own.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from ztmw.testing import DevIssuer, DPoPKey

from .conftest import delete_prefix
from .replica_config import Replica, serving

AUDIENCE = "https://api.example.com"
ORIGIN = "https://api.example.com"  # public_origin: DPoP proofs name it
LINKS = "/account/links"
BANKID = "urn:example:acr:bankid"
SOCIAL = "urn:example:acr:social"
FACTORY = "tests.factories:create_accounts_app"


def _s(value: str) -> str:
    return json.dumps(value)


def write_config(path: Path, issuers: list[DevIssuer], store: str, *, linkable: list[str], max_links: int = 3,
                 prefix: str | None = None) -> Path:
    issuer_tables = "".join(f"""
[[issuers]]
issuer = {_s(i.issuer)}
jwks_uri = {_s(i.jwks_uri)}
algorithms = ["ES256"]
""" for i in issuers)
    redis = f"\n[plugins.redis]\nprefix = {_s(prefix)}\n" if prefix else ""
    path.write_text(f"""
[resource]
identifier = {_s(AUDIENCE)}
public_origin = {_s(ORIGIN)}
{issuer_tables}
[verifiers]
enabled = ["bearer", "dpop"]

[trust.acr.{_s(BANKID)}]
aal = 2
ial = 3
[trust.acr.{_s(SOCIAL)}]
aal = 1
ial = 1

[identity]
owner_requires_link = true

[linking]
enabled = true
store = {_s(store)}
issuers = {json.dumps(linkable)}
max_links = {max_links}
{redis}
[[rules]]
id = "data"
path = "/accounts/{{account}}/data"
methods = ["GET"]
owner = "account"

[[rules]]
id = "payments"
path = "/accounts/{{account}}/payments"
methods = ["POST"]
owner = "account"
min_aal = 2
acr_values = [{_s(BANKID)}]
max_auth_age = 300
""", encoding="utf-8")
    return path


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass
class Deployment:
    replicas: list[Replica]
    bank: DevIssuer
    social: DevIssuer
    other: DevIssuer
    session: aiohttp.ClientSession
    kind: str
    prefix: str | None = None
    store: str = ""
    calls: list[Any] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.replicas[0].base

    def bank_login(self, sub: str, *, age: float = 30, **kwargs: Any) -> str:
        return self.bank.mint(sub, acr=BANKID, auth_time=time.time() - age, **kwargs)

    def social_login(self, sub: str, *, age: float = 30, **kwargs: Any) -> str:
        return self.social.mint(sub, acr=SOCIAL, amr=["pwd"], auth_time=time.time() - age, **kwargs)

    async def request(self, method: str, path: str, token: str | None, *, body: Any = None,
                      raw: bytes | None = None, content_type: str = "application/json",
                      dpop: DPoPKey | None = None, replica: int = 0) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers: dict[str, str] = {}
        if token is not None:
            headers["Authorization"] = f"{'DPoP' if dpop else 'Bearer'} {token}"
        if dpop is not None:
            headers["DPoP"] = dpop.proof(method, ORIGIN + path, access_token=token)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = content_type
        async with self.session.request(method, self.replicas[replica].base + path, data=data,
                                        headers=headers) as response:
            text = await response.text()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return response.status, parsed, response.headers

    async def link(self, current: str, link_token: str, **kwargs: Any) -> tuple[int, Any, Any]:
        return await self.request("POST", LINKS, current, body={"link_token": link_token}, **kwargs)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for r in self.replicas for e in r.events() if e.get("event") == name]

    def log_text(self) -> str:
        return "".join(r.log_text() for r in self.replicas)


@contextlib.asynccontextmanager
async def deployment(kind: str, workdir: Path, *, redis_url: str | None = None, replicas: int = 1,
                     max_links: int = 3, store: str | None = None) -> AsyncIterator[Deployment]:
    """`kind` "sqlite" (a file in `workdir`) or "redis" (`redis_url`, keys under a fresh prefix, deleted after)."""
    prefix = f"ztmw-linking-test:{uuid.uuid4().hex}:" if kind == "redis" else None
    if store is None:
        store = f"sqlite:///{workdir / 'links.db'}" if kind == "sqlite" else str(redis_url)
    async with DevIssuer(audience=AUDIENCE) as bank, DevIssuer(audience=AUDIENCE) as social, \
            DevIssuer(audience=AUDIENCE) as other, aiohttp.ClientSession() as session:
        config = write_config(workdir / "ztmw.toml", [bank, social, other], store,
                              linkable=[bank.issuer, social.issuer], max_links=max_links, prefix=prefix)
        async with contextlib.AsyncExitStack() as stack:
            running = [await stack.enter_async_context(serving(f"replica{i}", config, workdir, {}, factory=FACTORY))
                       for i in range(replicas)]
            try:
                yield Deployment(running, bank, social, other, session, kind, prefix, store)
            finally:
                if prefix is not None and redis_url is not None:
                    await delete_prefix(redis_url, prefix)
