"""Certificate-bound tokens end to end (RFC 8705, RFC 9440): real TLS, real clients, a real `ztmw serve`.

Three ways a deployment gets the caller's certificate, each exercised as it runs in production:
1. `ztmw.setup()` on an aiohttp TLS listener that asks for (but does not require) a client certificate;
2. `mtls.source = "header"` behind a TLS-terminating proxy, in the three header spellings, trusted or not;
3. `ztmw serve` with its `--tls-*` options, in its own process, with keys and tokens from `ztmw token`.
Nothing is mocked; nothing depends on timing.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from multidict import CIMultiDict
from structlog.testing import capture_logs

import ztmw
from ztmw.jws import parse_compact
from ztmw.testing import ClientCert, DevIssuer, DPoPKey, FakeClock, TestCA
from ztmw.testing.http import challenges, free_port

from .conftest import (
    AUDIENCE,
    DEFAULT_ALGS,
    METADATA_URL,
    NONCE_LIFETIME,
    NONCE_SECRET_ENV,
    base_config,
    dpop_headers,
    items_app,
    reasons,
)

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -----------------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    def challenges(self) -> list[str]:
        return self.headers.getall("WWW-Authenticate", [])

    def bearer_error(self) -> str | None:
        """The `error` of the Bearer challenge (None when the challenge has none); fails without one."""
        bearer = [c for c in self.challenges() if c.startswith("Bearer ")]
        assert len(bearer) == 1, self.challenges()
        assert 'realm="api"' in bearer[0], bearer[0]  # RESP-02: Bearer always has an auth-param
        match = re.search(r'(?:^Bearer |, )error="([^"]*)"', bearer[0])
        return match.group(1) if match else None

    def vary(self) -> list[str]:
        return [v.strip().lower() for line in self.headers.getall("Vary", []) for v in line.split(",")]


async def fetch(
    url: str,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    headers: Mapping[str, str] | CIMultiDict[str] | None = None,
) -> Reply:
    """One request on a fresh connection (a fresh TLS handshake, so the certificate is the one given)."""
    sent: CIMultiDict[str] = CIMultiDict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, headers=sent) as response:
            return Reply(response.status, CIMultiDict(response.headers), await response.text())


@asynccontextmanager
async def serving(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """`app` on a real loopback listener (TLS when a context is given); yields the base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        port = runner.addresses[0][1]
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def whoami(request: web.Request) -> web.Response:
    """What a handler can learn about the caller from ztmw."""
    principal = request[ztmw.PRINCIPAL]
    assert principal is not None
    certificate = principal.caller.certificate
    return web.json_response({
        "subject": principal.subject,
        "binding": principal.binding,
        "certificate_thumbprint": principal.caller.certificate_thumbprint,
        "certificate": None if certificate is None else {
            "subject": certificate.subject,
            "thumbprint": certificate.thumbprint,
            "dns_names": list(certificate.dns_names),
            "emails": list(certificate.emails),
            "san": list(certificate.san),
        },
    })


def mtls_app() -> web.Application:
    app = items_app()
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/bound", whoami)
    return app


MTLS_RULES = [
    {"id": "whoami", "path": "/whoami", "methods": ["GET"], "scopes": ["items:read"]},
    {"id": "bound", "path": "/bound", "methods": ["GET"], "scopes": ["items:read"], "binding": "mtls"},
]


def mtls_config(issuer: DevIssuer, **mtls: Any) -> dict[str, Any]:
    config = base_config(issuer, verifiers={"enabled": ["bearer", "mtls"]})
    config["rules"] = config["rules"] + MTLS_RULES
    if mtls:
        config["mtls"] = mtls
    return config


def subject_of(cert: ClientCert) -> str:
    """The subject as an independent parser spells it (RFC 4514), to compare with the principal's."""
    return x509.load_der_x509_certificate(cert.der).subject.rfc4514_string()


@pytest.fixture(scope="module")
def alice_cert(ca: TestCA) -> ClientCert:
    return ca.client_cert("alice.client.test")


@pytest.fixture(scope="module")
def mallory_cert(ca: TestCA) -> ClientCert:
    return ca.client_cert("mallory@client.test")


# --- 1. ztmw.setup() on a real TLS listener ----------------------------------------------------------------

@pytest.fixture
async def tls_base(issuer: DevIssuer, clock: FakeClock, ca: TestCA) -> AsyncIterator[str]:
    app = mtls_app()
    ztmw.setup(app, mtls_config(issuer), clock=clock)
    async with serving(app, ca.server_ssl_context()) as base:
        yield base


async def test_mtls_01_bound_token_with_its_certificate_is_allowed_and_the_handler_sees_the_certificate(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    with capture_logs() as events:
        reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["subject"] == "alice"
    assert seen["binding"] == "mtls"
    assert seen["certificate_thumbprint"] == alice_cert.thumbprint
    assert seen["certificate"]["thumbprint"] == alice_cert.thumbprint
    assert seen["certificate"]["subject"] == subject_of(alice_cert)
    assert "CN=alice.client.test" in seen["certificate"]["subject"].split(",")
    assert seen["certificate"]["dns_names"] == ["alice.client.test"]
    assert "DNS:alice.client.test" in seen["certificate"]["san"]
    decisions = [e for e in events if e["event"] == "ztmw.decision"]
    assert len(decisions) == 1 and decisions[0]["decision"] == "allow" and decisions[0]["binding"] == "mtls"
    assert token not in json.dumps(events, default=str)


async def test_email_san_of_the_certificate_reaches_the_handler(
    tls_base: str, issuer: DevIssuer, ca: TestCA, mallory_cert: ClientCert
) -> None:
    token = issuer.mint("mallory", scope="items:read", cnf=mallory_cert.cnf)
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(mallory_cert))
    assert reply.status == 200, reply.body
    certificate = reply.json()["certificate"]
    assert certificate["subject"] == subject_of(mallory_cert)
    assert certificate["emails"] == ["mallory@client.test"]
    assert "email:mallory@client.test" in certificate["san"]


async def test_mtls_01_mtls_02_bound_token_with_another_certificate_is_invalid_token(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert, mallory_cert: ClientCert
) -> None:
    """RESP-11 / MTLS-02: a stolen bound token used from another certificate; flagged as a security event."""
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    with capture_logs() as events:
        reply = await fetch(tls_base + "/whoami", token=token,
                            ssl_context=ca.client_ssl_context(mallory_cert))
    assert reply.status == 401
    assert reply.bearer_error() == "invalid_token"
    assert reply.json()["error"] == "invalid_token"
    denials = [e for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]
    assert len(denials) == 1 and denials[0]["decision"] == "deny"
    assert denials[0]["event"] == "ztmw.security" and denials[0]["reason"] == "certificate_mismatch"


async def test_a_new_certificate_with_the_same_name_does_not_satisfy_the_binding(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    """MTLS-08: the binding is the certificate's hash, not its name; a re-issued certificate breaks it."""
    reissued = ca.client_cert("alice.client.test")
    assert subject_of(reissued).split(",")[0] == subject_of(alice_cert).split(",")[0]
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(reissued))
    assert reply.status == 401 and reply.bearer_error() == "invalid_token"


async def test_bound_token_without_a_certificate_is_invalid_token_not_a_handshake_failure(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    with capture_logs() as events:
        reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context())
    assert reply.status == 401
    assert reply.bearer_error() == "invalid_token"
    assert [e["reason"] for e in events if e["event"] in ("ztmw.decision", "ztmw.security")] == [
        "certificate_missing"]


async def test_no_credentials_over_tls_get_a_bare_challenge(
    tls_base: str, ca: TestCA, alice_cert: ClientCert
) -> None:
    """A certificate alone is not a credential: RESP-01 bare challenge, with or without one."""
    for context in (ca.client_ssl_context(alice_cert), ca.client_ssl_context()):
        reply = await fetch(tls_base + "/whoami", ssl_context=context)
        assert reply.status == 401
        assert reply.bearer_error() is None


async def test_unbound_token_with_a_certificate_still_carries_the_certificate(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    token = issuer.mint("alice", scope="items:read")
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["binding"] is None
    assert seen["certificate_thumbprint"] == alice_cert.thumbprint
    assert seen["certificate"]["thumbprint"] == alice_cert.thumbprint
    assert seen["certificate"]["subject"] == subject_of(alice_cert)

    bare = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context())
    assert bare.status == 200, bare.body
    assert bare.json()["certificate"] is None and bare.json()["certificate_thumbprint"] is None


async def test_rule_binding_mtls_refuses_an_unbound_token_and_accepts_a_bound_one(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    context = ca.client_ssl_context(alice_cert)
    unbound = issuer.mint("alice", scope="items:read")
    with capture_logs() as events:
        refused = await fetch(tls_base + "/bound", token=unbound, ssl_context=context)
    assert refused.status == 401, refused.body
    assert refused.bearer_error() == "invalid_token"
    reasons = [e["reason"] for e in events if e["event"] in ("ztmw.decision", "ztmw.security")]
    assert reasons == ["binding_required"]
    # DPoP is not enabled, so no DPoP challenge is offered as a way to satisfy the route
    assert not any(c.startswith("DPoP") for c in refused.challenges())

    bound = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    allowed = await fetch(tls_base + "/bound", token=bound, ssl_context=context)
    assert allowed.status == 200 and allowed.json()["binding"] == "mtls"


async def test_cnf_with_jkt_and_x5t_when_only_mtls_is_enabled_is_invalid_token(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    """MTLS-15: both members must be satisfied; nothing here can confirm `jkt`, so the token is refused."""
    cnf = {"jkt": DPoPKey().thumbprint, "x5t#S256": alice_cert.thumbprint}
    token = issuer.mint("alice", scope="items:read", cnf=cnf)
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401, reply.body
    assert reply.bearer_error() == "invalid_token"


@pytest.mark.parametrize("extra", [
    {"x5t": "abc"},
    {"jwk": {"kty": "EC"}},
    {"X5T#S256": "abc"},
])
async def test_cnf_with_an_unknown_member_is_invalid_token(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert, extra: dict[str, Any]
) -> None:
    """MTLS-15: an unrecognised confirmation member fails closed even when the certificate matches."""
    token = issuer.mint("alice", scope="items:read", cnf={**alice_cert.cnf, **extra})
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401, reply.body
    assert reply.bearer_error() == "invalid_token"


@pytest.mark.parametrize("cnf", [
    {"x5t#S256": "not-a-thumbprint"},
    {"x5t#S256": ""},
    {"x5t#S256": 42},
    {"x5t#S256": None},
    "x5t#S256",
    ["x5t#S256"],
])
async def test_malformed_cnf_is_invalid_token_never_500(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert, cnf: Any
) -> None:
    token = issuer.mint("alice", scope="items:read", claims={"cnf": cnf})
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401, reply.body
    assert reply.bearer_error() == "invalid_token"


async def test_non_canonical_thumbprint_spelling_is_refused(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    """MTLS-04: padded base64url of the right hash is a second spelling, and only one is accepted."""
    token = issuer.mint("alice", scope="items:read", cnf={"x5t#S256": alice_cert.thumbprint + "="})
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401 and reply.bearer_error() == "invalid_token"


async def test_tls_source_ignores_a_forged_certificate_header(
    tls_base: str, issuer: DevIssuer, ca: TestCA, alice_cert: ClientCert
) -> None:
    """MTLS-10: with `source = "tls"` (the default) a Client-Cert header is never read, even from loopback."""
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    reply = await fetch(tls_base + "/whoami", token=token, ssl_context=ca.client_ssl_context(),
                        headers={"Client-Cert": alice_cert.rfc9440_header()})
    assert reply.status == 401 and reply.bearer_error() == "invalid_token"
    assert "client-cert" not in reply.vary()


# --- 2. a certificate forwarded by a TLS-terminating proxy ------------------------------------------------

@dataclass(frozen=True)
class HeaderFormat:
    format: str
    header: str

    def value(self, cert: ClientCert) -> str:
        return {"rfc9440": cert.rfc9440_header, "xfcc": cert.xfcc_header,
                "pem-urlencoded": cert.nginx_header}[self.format]()


FORMATS = [
    HeaderFormat("rfc9440", "Client-Cert"),
    HeaderFormat("xfcc", "X-Forwarded-Client-Cert"),
    HeaderFormat("pem-urlencoded", "X-SSL-Client-Cert"),
]


@asynccontextmanager
async def header_server(
    issuer: DevIssuer, clock: FakeClock, fmt: HeaderFormat, trusted: list[str]
) -> AsyncIterator[str]:
    app = mtls_app()
    config = mtls_config(issuer, source="header", header=fmt.header, header_format=fmt.format,
                         trusted_proxies=trusted)
    ztmw.setup(app, config, clock=clock)
    async with serving(app) as base:  # plain HTTP: the proxy terminated TLS
        yield base


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.format)
async def test_header_from_a_trusted_proxy_binds_the_token(
    issuer: DevIssuer, clock: FakeClock, alice_cert: ClientCert, mallory_cert: ClientCert, fmt: HeaderFormat
) -> None:
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    async with header_server(issuer, clock, fmt, ["127.0.0.1/32"]) as base:
        ok = await fetch(base + "/bound", token=token, headers={fmt.header: fmt.value(alice_cert)})
        other = await fetch(base + "/bound", token=token, headers={fmt.header: fmt.value(mallory_cert)})
        missing = await fetch(base + "/bound", token=token)
        health = await fetch(base + "/health")
    assert ok.status == 200, ok.body
    seen = ok.json()
    assert seen["binding"] == "mtls"
    assert seen["certificate"]["thumbprint"] == alice_cert.thumbprint
    assert seen["certificate"]["subject"] == subject_of(alice_cert)
    assert "DNS:alice.client.test" in seen["certificate"]["san"]
    assert other.status == 401 and other.bearer_error() == "invalid_token"
    assert missing.status == 401 and missing.bearer_error() == "invalid_token"
    assert health.status == 200
    # MTLS-13 (RFC 9440 §2.4): every response may depend on the forwarded certificate
    for reply in (ok, other, missing, health):
        assert fmt.header.lower() in reply.vary(), (reply.status, reply.headers)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.format)
async def test_header_from_an_untrusted_peer_is_ignored_and_logged(
    issuer: DevIssuer, clock: FakeClock, alice_cert: ClientCert, fmt: HeaderFormat
) -> None:
    """MTLS-10/12: 127.0.0.1 is outside 10.0.0.0/8, so its header is a forgery attempt, never believed."""
    bound = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    unbound = issuer.mint("alice", scope="items:read")
    async with header_server(issuer, clock, fmt, ["10.0.0.0/8"]) as base:
        with capture_logs() as events:
            refused = await fetch(base + "/whoami", token=bound, headers={fmt.header: fmt.value(alice_cert)})
        allowed = await fetch(base + "/whoami", token=unbound, headers={fmt.header: fmt.value(alice_cert)})
        garbage = await fetch(base + "/whoami", token=unbound, headers={fmt.header: "garbage"})
    assert refused.status == 401 and refused.bearer_error() == "invalid_token"
    warnings = [e for e in events if e.get("reason") == "untrusted_client_cert_header"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "ztmw.security" and warnings[0]["log_level"] == "warning"
    assert warnings[0]["peer"] == "127.0.0.1"
    # the ignored header does not leak into the principal either
    assert allowed.status == 200, allowed.body
    assert allowed.json()["certificate"] is None and allowed.json()["binding"] is None
    # an untrusted peer's header is not even parsed: garbage from it is ignored, not a 400
    assert garbage.status == 200, garbage.body


def malformed_values(fmt: HeaderFormat, cert: ClientCert) -> list[str]:
    """Unusable values of the header; never the well-formed value itself (a mutation may be a no-op)."""
    good = fmt.value(cert)
    # (aiohttp itself refuses header lines over 8190 bytes, so the longest value ztmw can see is shorter)
    common = ["", "garbage", "::", ":AAAA:", good[: len(good) // 2], "%FF%FE", "a" * 8000]
    if fmt.format == "rfc9440":
        b64 = good.strip(":")
        values = common + [b64, f":{b64}:, :{b64}:", f":{b64}:;a=1", f"({good})", f":{b64.rstrip('=')}:",
                           ":" + b64.replace("+", "-").replace("/", "_") + ":", ":" + "QUFB" * 10 + ":"]
        return [v for v in values if v != good]
    if fmt.format == "xfcc":
        return common + ["By=x", 'Cert="', "Cert=" + cert.nginx_header()[:100],
                         good.replace("Hash=", "Hash=00"), good + ";Cert=x", 'Cert="%ZZ"']
    pem = cert.pem
    return common + [pem.replace("\n", " "), cert.nginx_header() * 2,
                     cert.nginx_header().replace("CERTIFICATE", "KEY"),
                     "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----%0A"]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.format)
async def test_malformed_header_from_a_trusted_proxy_is_400_never_500(
    issuer: DevIssuer, clock: FakeClock, alice_cert: ClientCert, fmt: HeaderFormat
) -> None:
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    async with header_server(issuer, clock, fmt, ["127.0.0.1/32"]) as base:
        replies = []
        for value in malformed_values(fmt, alice_cert):
            replies.append((value, await fetch(base + "/whoami", token=token, headers={fmt.header: value})))
        no_token = await fetch(base + "/whoami", headers={fmt.header: "garbage"})
    for value, reply in replies:
        assert reply.status != 500, value
        if value:  # an empty line is either no header or a malformed one; both are fine, a 500 is not
            assert reply.status == 400, (value, reply.status, reply.body)
            assert reply.bearer_error() == "invalid_request", value
            assert fmt.header.lower() in reply.vary()
        else:
            assert reply.status in (400, 401), (reply.status, reply.body)
    assert no_token.status == 400 and no_token.bearer_error() == "invalid_request"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.format)
async def test_two_header_lines_from_a_trusted_proxy_are_400(
    issuer: DevIssuer, clock: FakeClock, alice_cert: ClientCert, mallory_cert: ClientCert, fmt: HeaderFormat
) -> None:
    """MTLS-11: the field is a singleton; two lines mean the proxy let a client's copy through."""
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    async with header_server(issuer, clock, fmt, ["127.0.0.1/32"]) as base:
        for first, second in [(alice_cert, mallory_cert), (alice_cert, alice_cert)]:
            headers: CIMultiDict[str] = CIMultiDict()
            headers.add(fmt.header, fmt.value(first))
            headers.add(fmt.header, fmt.value(second))
            reply = await fetch(base + "/whoami", token=token, headers=headers)
            assert reply.status == 400, reply.body
            assert reply.bearer_error() == "invalid_request"


# --- 3. `ztmw serve` with TLS, as a user runs it -----------------------------------------------------------

def run_ztmw(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "ztmw", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@dataclass(frozen=True)
class ServeFiles:
    config: Path
    issuer_key: Path
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    alice_pem: Path


@pytest.fixture(scope="module")
def serve_files(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, alice_cert: ClientCert) -> ServeFiles:
    tmp = tmp_path_factory.mktemp("serve")
    issuer_key = tmp / "issuer.json"
    run_ztmw("token", "keygen", "--alg", "ES256", "--out", str(issuer_key))
    jwks = tmp / "jwks.json"
    jwks.write_text(run_ztmw("token", "jwks", "--key", str(issuer_key)), encoding="utf-8")
    server_leaf = ca.ca.issue_cert("127.0.0.1", "localhost")
    files = ServeFiles(config=tmp / "ztmw.toml", issuer_key=issuer_key, tls_cert=tmp / "server.pem",
                       tls_key=tmp / "server-key.pem", client_ca=tmp / "client-ca.pem",
                       alice_pem=tmp / "alice.pem")
    server_leaf.cert_chain_pems[0].write_to_path(str(files.tls_cert))
    server_leaf.private_key_pem.write_to_path(str(files.tls_key))
    ca.ca.cert_pem.write_to_path(str(files.client_ca))
    files.alice_pem.write_text(alice_cert.pem, encoding="utf-8")
    files.config.write_text(f"""
[resource]
identifier = "{AUDIENCE}"

[[issuers]]
issuer = "https://issuer.test"
jwks_file = "{jwks}"
algorithms = ["ES256"]

[verifiers]
enabled = ["bearer", "mtls"]

[[rules]]
id = "hello"
path = "/hello/{{name}}"
methods = ["GET"]
scopes = ["hello:read"]
""", encoding="utf-8")
    return files


def start_serve(files: ServeFiles, *extra: str) -> tuple[str, subprocess.Popen[str]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ztmw", "serve", "tests.factories:create_app", "--config", str(files.config),
         "--port", str(port), "--tls-cert", str(files.tls_cert), "--tls-key", str(files.tls_key),
         "--tls-client-ca", str(files.client_ca), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"https://127.0.0.1:{port}", process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ztmw serve did not start: {stop(process)}") from None
            time.sleep(0.1)


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.terminate()
    return process.communicate(timeout=30)[0]


@pytest.fixture
def served_tls(serve_files: ServeFiles) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    base, process = start_serve(serve_files)
    try:
        yield base, process
    finally:
        stop(process)


@pytest.fixture
def served_tls_required(serve_files: ServeFiles) -> Iterator[str]:
    base, process = start_serve(serve_files, "--tls-require-client-cert")
    try:
        yield base
    finally:
        stop(process)


def mint_with_cert(files: ServeFiles, cert_pem: Path | None = None) -> str:
    extra = ("--cert", str(cert_pem)) if cert_pem is not None else ()
    return run_ztmw("token", "mint", "--key", str(files.issuer_key), "--issuer", "https://issuer.test",
                    "--audience", AUDIENCE, "--scope", "hello:read", *extra).strip()


async def test_serve_with_tls_client_ca_binds_tokens_to_client_certificates(
    served_tls: tuple[str, subprocess.Popen[str]], serve_files: ServeFiles, ca: TestCA,
    alice_cert: ClientCert, mallory_cert: ClientCert,
) -> None:
    base, process = served_tls
    token = mint_with_cert(serve_files, serve_files.alice_pem)
    assert parse_compact(token).claims["cnf"] == alice_cert.cnf  # `--cert` binds to that certificate's hash

    ok = await fetch(base + "/hello/alice", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    other = await fetch(base + "/hello/alice", token=token, ssl_context=ca.client_ssl_context(mallory_cert))
    # no certificate: the listener asks but does not require, so the handshake succeeds and ztmw answers 401
    without = await fetch(base + "/hello/alice", token=token, ssl_context=ca.client_ssl_context())
    unbound = await fetch(base + "/hello/bob", token=mint_with_cert(serve_files),
                          ssl_context=ca.client_ssl_context())

    assert ok.status == 200, ok.body
    assert ok.json() == {"hello": "alice"}
    assert other.status == 401 and other.bearer_error() == "invalid_token"
    assert without.status == 401 and without.bearer_error() == "invalid_token"
    assert unbound.status == 200, unbound.body

    output = stop(process)
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    decisions = [(e["event"], e["decision"], e["reason"], e.get("binding")) for e in events
                 if e.get("event") in ("ztmw.decision", "ztmw.security")]
    assert decisions == [
        ("ztmw.decision", "allow", "allowed", "mtls"),
        ("ztmw.security", "deny", "certificate_mismatch", None),  # what a stolen bound token looks like
        ("ztmw.decision", "deny", "certificate_missing", None),
        ("ztmw.decision", "allow", "allowed", None),
    ]
    assert token not in output and token.split(".")[2] not in output


async def test_serve_with_tls_require_client_cert_refuses_the_handshake_without_one(
    served_tls_required: str, serve_files: ServeFiles, ca: TestCA, alice_cert: ClientCert
) -> None:
    base = served_tls_required
    token = mint_with_cert(serve_files, serve_files.alice_pem)
    ok = await fetch(base + "/hello/alice", token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert ok.status == 200, ok.body
    # TLS 1.3: the client finishes its side of the handshake, then the server's alert closes the connection
    # before any HTTP response exists
    with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)) as failure:
        await fetch(base + "/hello/alice", token=token, ssl_context=ca.client_ssl_context())
    assert not isinstance(failure.value, aiohttp.ClientResponseError)
    # TLS 1.2: the server's verification is part of the handshake, so the connection itself fails
    legacy = ca.client_ssl_context()
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((aiohttp.ClientConnectorError, ssl.SSLError)):
        await fetch(base + "/hello/alice", token=token, ssl_context=legacy)


# -- DPoP and mTLS on one TLS listener (MTLS-15, SEC-06, IMPL-04) -----------------------------------------

async def bound_tls_server(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA,
                           monkeypatch: pytest.MonkeyPatch, **dpop: Any) -> str:
    """bearer + dpop + mtls behind a TLS listener that asks for a client certificate; returns its origin."""
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop", "mtls"]})
    config["resource"]["public_origin"] = origin
    config["rules"] = config["rules"] + MTLS_RULES
    if dpop.get("require_nonce"):
        monkeypatch.setenv(NONCE_SECRET_ENV, "gap-test-secret-of-32-bytes-long!")
        dpop.update(nonce_secret_env=NONCE_SECRET_ENV, nonce_lifetime=NONCE_LIFETIME)
    if dpop:
        config["dpop"] = dpop
    app = mtls_app()
    ztmw.setup(app, config, clock=clock)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server(ssl=ca.server_ssl_context())
    await aiohttp_client(server)  # the fixture owns the server from here on (and closes it)
    return origin


# -- MTLS-15: a cnf with jkt and x5t#S256 must satisfy both; unknown members fail closed ---------------------

async def test_mtls_15_jkt_and_x5t_bound_token_needs_the_proof_and_the_certificate(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA, alice_cert: ClientCert,
    mallory_cert: ClientCert, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = await bound_tls_server(aiohttp_client, issuer, clock, ca, monkeypatch)
    key, thief = DPoPKey(), DPoPKey()
    token = issuer.mint("alice", scope="items:read", cnf={"jkt": key.thumbprint, **alice_cert.cnf})
    url = origin + "/whoami"

    def proof(signer: DPoPKey = key) -> str:
        return signer.proof("GET", url, access_token=token, iat=int(clock()))

    # both satisfied: allowed
    allowed = await fetch(url, headers=dpop_headers(token, proof()), ssl_context=ca.client_ssl_context(alice_cert))
    assert allowed.status == 200, allowed.body
    assert allowed.json()["certificate_thumbprint"] == alice_cert.thumbprint

    # the proof is right, the certificate is not (another one, or none): invalid_token on the DPoP scheme
    for context, reason in ((ca.client_ssl_context(mallory_cert), "certificate_mismatch"),
                            (ca.client_ssl_context(), "certificate_missing")):
        with capture_logs() as events:
            reply = await fetch(url, headers=dpop_headers(token, proof()), ssl_context=context)
        assert reply.status == 401, reply.body
        parsed = challenges(reply)
        assert parsed["DPoP"]["error"] == "invalid_token"
        assert "error" not in parsed["Bearer"]
        assert reasons(events) == [reason]

    # the certificate is right, the proof key is not: RESP-09 key binding failure
    reply = await fetch(url, headers=dpop_headers(token, proof(thief)), ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401
    assert challenges(reply)["DPoP"] == {"algs": DEFAULT_ALGS, "error": "invalid_token",
                                         "error_description": "Invalid DPoP key binding",
                                         "resource_metadata": METADATA_URL}

    # the certificate is right, no proof at all (Bearer scheme): the DPoP downgrade is refused (RESP-10)
    reply = await fetch(url, token=token, ssl_context=ca.client_ssl_context(alice_cert))
    assert reply.status == 401
    parsed = challenges(reply)
    assert parsed["Bearer"]["error"] == "invalid_token"
    assert "error" not in parsed["DPoP"]


# -- SEC-06: ath, jkt, x5t#S256 and the nonce MAC are compared in constant time ------------------------------

async def test_sec_06_binding_values_and_nonce_mac_are_compared_with_compare_digest(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA, alice_cert: ClientCert,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = await bound_tls_server(aiohttp_client, issuer, clock, ca, monkeypatch, require_nonce=True)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append((a.encode() if isinstance(a, str) else bytes(a), b.encode() if isinstance(b, str) else bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    key = DPoPKey()
    token = issuer.mint("alice", scope="items:read", cnf={"jkt": key.thumbprint, **alice_cert.cnf})
    url = origin + "/whoami"
    context = ca.client_ssl_context(alice_cert)
    first = await fetch(url, headers=dpop_headers(token, key.proof("GET", url, access_token=token, iat=int(clock()))),
                        ssl_context=context)
    nonce = first.headers["DPoP-Nonce"]
    compared.clear()
    proof = key.proof("GET", url, access_token=token, iat=int(clock()), nonce=nonce)
    reply = await fetch(url, headers=dpop_headers(token, proof), ssl_context=context)
    assert reply.status == 200, reply.body
    ath = json.loads(_b64(proof.split(".")[1]))["ath"].encode()
    values = {value for pair in compared for value in pair}
    assert ath in values, "ath"
    assert key.thumbprint.encode() in values, "jkt"
    assert alice_cert.thumbprint.encode() in values, "x5t#S256"
    known = {ath, key.thumbprint.encode(), alice_cert.thumbprint.encode()}
    assert any(len(a) == len(b) == 32 and a not in known for a, b in compared), "the nonce MAC"


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# -- IMPL-04: the client certificate is the TLS layer's ----------------------------------------------

async def test_impl_04_client_certificate_is_the_tls_layers_peer_certificate(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, ca: TestCA, alice_cert: ClientCert,
    mallory_cert: ClientCert, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DER of the handshake's certificate is what binds; a Client-Cert header naming another one is noise."""
    origin = await bound_tls_server(aiohttp_client, issuer, clock, ca, monkeypatch)
    token = issuer.mint("alice", scope="items:read", cnf=alice_cert.cnf)
    reply = await fetch(origin + "/bound", token=token, ssl_context=ca.client_ssl_context(alice_cert),
                        headers={"Client-Cert": mallory_cert.rfc9440_header()})
    assert reply.status == 200, reply.body
    assert reply.json()["certificate"]["thumbprint"] == alice_cert.thumbprint
