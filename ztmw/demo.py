"""`ztmw demo`: a development issuer, the sample API behind ztmw over TLS, and a scripted client, all on loopback.

Each scenario states the status it expects; the table shows what happened and why (the audit reason and the
challenge). The demo exits non-zero if any scenario does not behave as expected, so it doubles as a smoke test.
"""

from __future__ import annotations

import json
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .middleware import setup
from .models import AuditEvent
from .sample_app import SAMPLE_RULES, SAMPLE_TRUST, create_app
from .testing.certs import TestCA
from .testing.dpop import DPoPKey
from .testing.issuer import DevIssuer

AUDIENCE = "https://api.example.com"
BANKID = "urn:example:acr:bankid"
SOCIAL = "urn:example:acr:social"
LINKS = "/account/links"


class CapturingSink:
    """Keeps the audit events so the table can say why each request ended as it did."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


@dataclass
class Result:
    name: str
    request: str
    expected: int
    status: int
    reason: str
    challenge: str

    @property
    def ok(self) -> bool:
        return self.status == self.expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _summarise_challenge(response: aiohttp.ClientResponse) -> str:
    values = response.headers.getall("WWW-Authenticate", [])
    parts = []
    for value in values:
        scheme = value.split(" ", 1)[0]
        error = re.search(r'error="([^"]+)"', value)
        extra = [m.group(0) for m in re.finditer(r'(acr_values|max_age|scope)="[^"]*"', value)]
        if error:
            parts.append(" ".join([f"{scheme} {error.group(1)}", *extra]))
    if not parts and values:
        parts.append("bare " + " + ".join(v.split(" ", 1)[0] for v in values))
    if "DPoP-Nonce" in response.headers:
        parts.append("DPoP-Nonce")
    return "; ".join(parts)


async def run_demo(*, verbose: bool = False) -> int:
    ca = TestCA()
    alice_cert, other_cert = ca.client_cert("alice-device"), ca.client_cert("mallory-device")
    sink = CapturingSink()
    async with DevIssuer(audience=AUDIENCE) as issuer:
        links_dir = tempfile.TemporaryDirectory(prefix="ztmw-demo-")
        port = _free_port()
        origin = f"https://127.0.0.1:{port}"
        config = {
            "resource": {"identifier": AUDIENCE, "public_origin": origin, "realm": "demo"},
            "issuers": [issuer.issuer_config(audiences=[AUDIENCE])],
            "verifiers": {"enabled": ["bearer", "dpop", "mtls"]},
            "dpop": {"require_nonce": True},
            "trust": SAMPLE_TRUST,
            # alice's bank-ID login and one social login, linked by the operator; the ceremony adds another
            "identity": {"links": [{"issuer": issuer.issuer, "subject": "alice", "account": "alice"},
                                   {"issuer": issuer.issuer, "subject": "alice-social", "account": "alice"}]},
            "rules": SAMPLE_RULES,
            # the self-service linking ceremony on /account/links, its links in a throw-away SQLite file
            "linking": {"enabled": True, "store": f"sqlite:///{Path(links_dir.name) / 'links.db'}"},
        }
        app = create_app()
        setup(app, config, audit_sink=sink)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ca.server_ssl_context(require_client_cert=False))
        await site.start()
        try:
            results = await _run_scenarios(issuer, ca, alice_cert, other_cert, origin, sink)
        finally:
            await runner.cleanup()
            links_dir.cleanup()
    _print_table(results)
    if verbose:
        for event in sink.events:
            print(event)
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} scenarios behaved as expected")
    return 1 if failed else 0


async def _run_scenarios(
    issuer: DevIssuer, ca: TestCA, alice_cert: Any, other_cert: Any, origin: str, sink: CapturingSink
) -> list[Result]:
    results: list[Result] = []
    now = time.time()
    dpop_key = DPoPKey()
    strong = {"acr": BANKID, "auth_time": now - 30}

    plain = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ca.client_ssl_context()))
    with_alice = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ca.client_ssl_context(alice_cert)))
    with_other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ca.client_ssl_context(other_cert)))

    async def call(name: str, expected: int, method: str, path: str, *, token: str | None = None,
                   scheme: str = "Bearer", proof: str | None = None, session: aiohttp.ClientSession = plain,
                   raw_authorization: str | None = None, json_body: Any = None) -> None:
        headers = {}
        if raw_authorization is not None:
            headers["Authorization"] = raw_authorization
        elif token is not None:
            headers["Authorization"] = f"{scheme} {token}"
        if proof is not None:
            headers["DPoP"] = proof
        before = len(sink.events)
        async with session.request(method, origin + path, headers=headers, json=json_body) as response:
            raw = await response.read()
            if "DPoP-Nonce" in response.headers:  # RFC 9449 §8/§9: use the newest nonce the server gave
                nonce["value"] = response.headers["DPoP-Nonce"]
            reason = sink.events[-1].reason if len(sink.events) > before else "(not audited: no route)"
            if path == LINKS and response.status >= 400:  # the route was allowed; the ceremony refused
                reason = "ceremony: " + str(json.loads(raw).get("error_description", ""))
            results.append(Result(name, f"{method} {path}", expected, response.status, reason,
                                  _summarise_challenge(response)))

    nonce: dict[str, str | None] = {"value": None}

    def dpop_proof(method: str, path: str, token: str) -> str:
        return dpop_key.proof(method, origin + path, access_token=token, nonce=nonce["value"])

    try:
        read = issuer.mint("alice", scope="profile:read transactions:read")
        await call("public health check, no token", 200, "GET", "/health")
        await call("no credentials", 401, "GET", "/profile")
        await call("valid bearer token", 200, "GET", "/profile", token=read)
        await call("missing scope", 403, "GET", "/profile", token=issuer.mint("alice", scope="transactions:read"))
        await call("expired token", 401, "GET", "/profile",
                   token=issuer.mint("alice", scope="profile:read", lifetime=-120))
        await call("token for another API (aud)", 401, "GET", "/profile",
                   token=issuer.mint("alice", scope="profile:read", audience="https://other.example.com"))
        forged = DevIssuer(issuer.issuer, audience=AUDIENCE).mint("alice", scope="profile:read")
        await call("forged signature (unknown key)", 401, "GET", "/profile", token=forged)
        await call("malformed Authorization header", 400, "GET", "/profile",
                   raw_authorization="Bearer two tokens")
        await call("route no rule covers (deny by default)", 403, "GET", "/admin", token=read)
        await call("path the app does not have", 404, "GET", "/nope", token=read)
        await call("ownership: alice reads her data", 200, "GET", "/users/alice/transactions", token=read)
        await call("ownership: alice reads bob's data", 403, "GET", "/users/bob/transactions", token=read)
        linked = issuer.mint("alice-social", scope="transactions:read", acr=SOCIAL)
        await call("linked login: alice via social login", 200, "GET", "/users/alice/transactions", token=linked)
        machine = issuer.mint("reporting-job", client_id="reporting-job", scope="reports:read")
        await call("machine token on a user-only route", 403, "GET", "/reports", token=machine)
        await call("step-up: profile change needs IAL 3", 401, "PUT", "/profile",
                   token=issuer.mint("alice", scope="profile:write", acr=SOCIAL))
        await call("step-up satisfied by bank ID", 200, "PUT", "/profile",
                   token=issuer.mint("alice", scope="profile:write", **strong))  # type: ignore[arg-type]

        pay = "payments:write"
        bearer_pay = issuer.mint("alice", scope=pay, **strong)  # type: ignore[arg-type]
        await call("payment with an unbound bearer token", 401, "POST", "/payments", token=bearer_pay)
        bound = issuer.mint("alice", scope=pay, cnf={"jkt": dpop_key.thumbprint}, **strong)  # type: ignore[arg-type]
        await call("DPoP proof without the server's nonce", 401, "POST", "/payments", token=bound, scheme="DPoP",
                   proof=dpop_proof("POST", "/payments", bound))
        proof = dpop_proof("POST", "/payments", bound)
        await call("DPoP-bound payment, retried with the nonce", 201, "POST", "/payments", token=bound,
                   scheme="DPoP", proof=proof)
        await call("DPoP proof replayed", 401, "POST", "/payments", token=bound, scheme="DPoP", proof=proof)
        await call("stolen DPoP token sent as Bearer", 401, "POST", "/payments", token=bound)
        await call("DPoP proof for another URL", 401, "POST", "/payments", token=bound, scheme="DPoP",
                   proof=dpop_proof("POST", "/profile", bound))
        stale = issuer.mint("alice", scope=pay, cnf={"jkt": dpop_key.thumbprint}, acr=BANKID,
                            auth_time=now - 3600)
        await call("stale login: step-up with max_age", 401, "POST", "/payments", token=stale, scheme="DPoP",
                   proof=dpop_proof("POST", "/payments", stale))
        weak = issuer.mint("alice", scope=pay, cnf={"jkt": dpop_key.thumbprint}, acr=SOCIAL, amr=["pwd"],
                           auth_time=now - 30)
        await call("weak login: step-up with acr_values", 401, "POST", "/payments", token=weak, scheme="DPoP",
                   proof=dpop_proof("POST", "/payments", weak))

        cert_bound = issuer.mint("alice", scope=pay, cnf=alice_cert.cnf, **strong)  # type: ignore[arg-type]
        await call("mTLS-bound payment with its certificate", 201, "POST", "/payments", token=cert_bound,
                   session=with_alice)
        await call("mTLS-bound token with another certificate", 401, "POST", "/payments", token=cert_bound,
                   session=with_other)
        await call("mTLS-bound token without a certificate", 401, "POST", "/payments", token=cert_bound)

        # account linking: the ceremony proves control of both logins; linking grants ownership, not trust
        def social(sub: str) -> str:
            return issuer.mint(sub, scope="transactions:read profile:write", acr=SOCIAL, amr=["pwd"],
                               auth_time=time.time() - 20)

        bank_alice = issuer.mint("alice", scope="transactions:read", **strong)  # type: ignore[arg-type]
        await call("link a social login from a fresh bank-ID login", 201, "POST", LINKS,
                   token=bank_alice, json_body={"link_token": social("alice-github")})
        stale_alice = issuer.mint("alice", acr=BANKID, auth_time=now - 3600)
        await call("the same from a stale bank-ID login: step-up", 401, "POST", LINKS,
                   token=stale_alice, json_body={"link_token": social("alice-github")})
        bank_bob = issuer.mint("bob", **strong)  # type: ignore[arg-type]
        await call("bob links alice's social login: another account's", 409, "POST", LINKS,
                   token=bank_bob, json_body={"link_token": social("alice-github")})
        await call("linked social login reads the account's data", 200, "GET", "/users/alice/transactions",
                   token=social("alice-github"))
        await call("linked social login on a bank-ID route: step-up", 401, "PUT", "/profile",
                   token=social("alice-github"))
    finally:
        for session in (plain, with_alice, with_other):
            await session.close()
    return results


def _print_table(results: list[Result]) -> None:
    headers = ("#", "scenario", "request", "expected", "got", "reason", "challenge", "")
    rows = [(str(i), r.name, r.request, str(r.expected), str(r.status), r.reason, r.challenge,
             "ok" if r.ok else "FAIL") for i, r in enumerate(results, 1)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))

