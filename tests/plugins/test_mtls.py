"""The `mtls` verifier: certificate-bound tokens (RFC 8705 §3), unit level and over real TLS.

Real certificates (trustme via ztmw.testing.certs), real sockets on 127.0.0.1; no mocks, no timing asserts.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import time
from importlib.metadata import entry_points
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from ztmw_plugins import mtls
from ztmw_plugins.mtls import MTLSVerifier

from tests.vectors import VEC_9440_1, VEC_9440_1_THUMBPRINT
from ztmw.client_cert import certificate_from_request
from ztmw.config import Config, MTLSConfig, ResourceConfig
from ztmw.errors import AuthError, ConfigurationError, InvalidToken, TokenBindingMismatch
from ztmw.models import ClientCertificate, Credential, RequestView, VerifiedToken, frozen_mapping
from ztmw.testing.certs import ClientCert, TestCA
from ztmw.typing import BindingVerifier, PluginDeps

VEC_8705_1 = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"  # non-canonical (checklist §14)
BEARER = Credential(scheme="bearer", token="not-a-real-token")
MTLS_CONFIG = web.AppKey("mtls_config", MTLSConfig)


# --- fixtures and builders ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice(ca: TestCA) -> ClientCert:
    return ca.client_cert("alice.client.test")


@pytest.fixture(scope="module")
def bob(ca: TestCA) -> ClientCert:
    return ca.client_cert("bob.client.test")


@pytest.fixture
def verifier() -> MTLSVerifier:
    return mtls.create({}, deps())


def deps() -> PluginDeps:
    def no_http() -> aiohttp.ClientSession:
        raise AssertionError("the mtls plugin needs no HTTP session")

    config = Config(resource=ResourceConfig(identifier="https://api.test", public_origin="https://api.test"))
    return PluginDeps(config=config, clock=time.time, http=no_http, logger=None)


def bound_token(cnf: dict[str, Any]) -> VerifiedToken:
    """A VerifiedToken as the bearer verifier would return it for an RFC 8705 certificate-bound token."""
    now = time.time()
    return VerifiedToken(
        issuer="https://as.test",
        subject="alice",
        audience=("https://api.test",),
        expires_at=now + 300,
        token_id="jti-1",
        verifier="bearer",
        client_id="client-a",
        issued_at=now,
        cnf=frozen_mapping(cnf),
    )


def view(certificate: ClientCertificate | None) -> RequestView:
    return RequestView(
        method="GET", path="/payments", route=None, peer="127.0.0.1", client_certificate=certificate
    )


def tls_cert(cert: ClientCert) -> ClientCertificate:
    return ClientCertificate(der=cert.der, source="tls")


def non_canonical(value: str) -> str:
    """The same 32 bytes spelled differently: flip an unused low bit of the last base64url character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return value[:-1] + alphabet[alphabet.index(value[-1]) ^ 1]


# --- the plugin's shape -------------------------------------------------------------------------------------


def test_plugin_satisfies_the_binding_contract(verifier: MTLSVerifier) -> None:
    assert isinstance(verifier, BindingVerifier)
    assert (verifier.name, verifier.cnf_member, verifier.scheme) == ("mtls", "x5t#S256", None)


def test_entry_point_resolves_to_create() -> None:
    (entry_point,) = [ep for ep in entry_points(group="ztmw.verifiers") if ep.name == "mtls"]
    assert entry_point.load() is mtls.create


def test_create_rejects_unknown_settings() -> None:
    with pytest.raises(ConfigurationError, match="plugins.mtls.trusted_proxy"):
        mtls.create({"trusted_proxy": ["10.0.0.0/8"]}, deps())


def test_create_points_misplaced_mtls_keys_to_the_mtls_table() -> None:
    with pytest.raises(ConfigurationError, match=r"\[mtls\]"):
        mtls.create({"source": "header"}, deps())


# --- confirm ------------------------------------------------------------------------------------------------


async def test_matching_certificate_confirms_and_returns_the_thumbprint(
    verifier: MTLSVerifier, alice: ClientCert
) -> None:
    matched = await verifier.confirm(bound_token(alice.cnf), BEARER, view(tls_cert(alice)))
    assert matched == alice.thumbprint


async def test_mtls_02_other_certificate_is_a_binding_mismatch(
    verifier: MTLSVerifier, alice: ClientCert, bob: ClientCert
) -> None:
    with pytest.raises(TokenBindingMismatch) as caught:
        await verifier.confirm(bound_token(alice.cnf), BEARER, view(tls_cert(bob)))
    error = caught.value
    assert error.reason == "certificate_mismatch"
    assert (error.status, error.error, error.scheme) == (401, "invalid_token", "bearer")  # RESP-11
    assert error.security


async def test_mtls_02_missing_certificate(verifier: MTLSVerifier, alice: ClientCert) -> None:
    with pytest.raises(TokenBindingMismatch) as caught:
        await verifier.confirm(bound_token(alice.cnf), BEARER, view(None))
    assert caught.value.reason == "certificate_missing"
    assert (caught.value.status, caught.value.error, caught.value.scheme) == (401, "invalid_token", "bearer")


async def test_error_carries_the_scheme_the_client_used(verifier: MTLSVerifier, alice: ClientCert) -> None:
    dpop = Credential(scheme="dpop", token="t")  # a token bound to both a DPoP key and a certificate
    with pytest.raises(TokenBindingMismatch) as caught:
        await verifier.confirm(bound_token({**alice.cnf, "jkt": "x"}), dpop, view(None))
    assert caught.value.scheme == "dpop"


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        ["x"],
        {"x5t#S256": "x"},
        "",
        "padded=",
        "v68ffgcPn6jdYpBfFY2nP4ShE2Yk-6_Mk5PI9yh6aes=",  # padding
        "v68ffgcPn6jdYpBfFY2nP4ShE2Yk+6/Mk5PI9yh6aes",  # standard alphabet
        "v68ffgcPn6jdYpBfFY2nP4ShE2Yk-6_Mk5PI9yh6ae",  # 42 characters
        "v68ffgcPn6jdYpBfFY2nP4ShE2Yk-6_Mk5PI9yh6aesA",  # 44 characters
        " v68ffgcPn6jdYpBfFY2nP4ShE2Yk-6_Mk5PI9yh6ae",  # whitespace
        "v68ffgcPn6jdYpBfFY2nP4ShE2Yk-6_Mk5PI9yh6ae\n",
        hashlib.sha256(b"x").hexdigest(),  # hex, not base64url
        "v68ffgcPn6jdYpBfFY2nP4ShE2Yk-6_Mk5PI9yh6aé",
    ],
)
async def test_mtls_03_x5t_s256_must_be_43_char_base64url(
    verifier: MTLSVerifier, alice: ClientCert, value: Any
) -> None:
    with pytest.raises(InvalidToken) as caught:
        await verifier.confirm(bound_token({"x5t#S256": value}), BEARER, view(tls_cert(alice)))
    assert type(caught.value) is InvalidToken
    assert caught.value.reason == "invalid_claim" and caught.value.scheme == "bearer"


async def test_mtls_03_invalid_claim_wins_over_missing_certificate(verifier: MTLSVerifier) -> None:
    # The token itself is broken whatever the connection: say so rather than ask for a certificate.
    with pytest.raises(InvalidToken) as caught:
        await verifier.confirm(bound_token({"x5t#S256": VEC_8705_1}), BEARER, view(None))
    assert caught.value.reason == "invalid_claim"


async def test_mtls_04_rfc8705_example_value_is_rejected_as_non_canonical(
    verifier: MTLSVerifier, alice: ClientCert
) -> None:
    # VEC-8705-1: 43 characters, but its last character carries non-zero unused bits.
    with pytest.raises(InvalidToken) as caught:
        await verifier.confirm(bound_token({"x5t#S256": VEC_8705_1}), BEARER, view(tls_cert(alice)))
    assert type(caught.value) is InvalidToken and caught.value.reason == "invalid_claim"
    # Its canonical spelling is well-formed, and simply belongs to no certificate we have.
    canonical = VEC_8705_1[:-1] + "0"
    with pytest.raises(TokenBindingMismatch) as mismatch:
        await verifier.confirm(bound_token({"x5t#S256": canonical}), BEARER, view(tls_cert(alice)))
    assert mismatch.value.reason == "certificate_mismatch"


async def test_mtls_04_non_canonical_spelling_of_the_right_digest_is_rejected(
    verifier: MTLSVerifier, alice: ClientCert
) -> None:
    lenient = non_canonical(alice.thumbprint)
    assert lenient != alice.thumbprint
    assert base64.urlsafe_b64decode(lenient + "=") == base64.urlsafe_b64decode(alice.thumbprint + "=")
    with pytest.raises(InvalidToken) as caught:
        await verifier.confirm(bound_token({"x5t#S256": lenient}), BEARER, view(tls_cert(alice)))
    assert caught.value.reason == "invalid_claim"


async def test_mtls_04_vec_9440_1_certificate_from_a_proxy_header(verifier: MTLSVerifier) -> None:
    result = certificate_from_request(
        tls_der=None, header_values=[VEC_9440_1], peer="127.0.0.1", config=MTLSConfig(source="header")
    )
    matched = await verifier.confirm(
        bound_token({"x5t#S256": VEC_9440_1_THUMBPRINT}), BEARER, view(result.certificate)
    )
    assert matched == VEC_9440_1_THUMBPRINT


async def test_mtls_04_binding_is_to_the_leaf_der_not_its_public_key(
    verifier: MTLSVerifier, alice: ClientCert
) -> None:
    spki = (
        x509.load_der_x509_certificate(alice.der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    spki_thumbprint = base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()
    with pytest.raises(TokenBindingMismatch) as caught:
        await verifier.confirm(bound_token({"x5t#S256": spki_thumbprint}), BEARER, view(tls_cert(alice)))
    assert caught.value.reason == "certificate_mismatch"


async def test_mtls_04_binding_is_to_the_leaf_not_its_issuer(
    verifier: MTLSVerifier, ca: TestCA, alice: ClientCert
) -> None:
    ca_der = x509.load_pem_x509_certificate(ca.cert_pem.encode()).public_bytes(Encoding.DER)
    ca_thumbprint = base64.urlsafe_b64encode(hashlib.sha256(ca_der).digest()).rstrip(b"=").decode()
    with pytest.raises(TokenBindingMismatch):
        await verifier.confirm(bound_token({"x5t#S256": ca_thumbprint}), BEARER, view(tls_cert(alice)))


@pytest.mark.parametrize(
    "render", [ClientCert.rfc9440_header, ClientCert.xfcc_header, ClientCert.nginx_header]
)
async def test_mtls_09_certificate_forwarded_by_a_proxy_confirms(
    verifier: MTLSVerifier, alice: ClientCert, render
) -> None:
    header_format = {"rfc9440_header": "rfc9440", "xfcc_header": "xfcc", "nginx_header": "pem-urlencoded"}[
        render.__name__
    ]
    config = MTLSConfig(source="header", header_format=header_format)  # type: ignore[arg-type]
    result = certificate_from_request(
        tls_der=None, header_values=[render(alice)], peer="127.0.0.1", config=config
    )
    assert (
        await verifier.confirm(bound_token(alice.cnf), BEARER, view(result.certificate)) == alice.thumbprint
    )


async def test_mtls_08_a_new_certificate_invalidates_bound_tokens(
    verifier: MTLSVerifier, ca: TestCA, alice: ClientCert
) -> None:
    renewed = ca.client_cert(alice.name)  # same name, new key pair: a different certificate
    assert renewed.thumbprint != alice.thumbprint
    with pytest.raises(TokenBindingMismatch) as caught:
        await verifier.confirm(bound_token(alice.cnf), BEARER, view(tls_cert(renewed)))
    assert caught.value.reason == "certificate_mismatch"


async def test_confirm_holds_no_state_between_requests(
    verifier: MTLSVerifier, alice: ClientCert, bob: ClientCert
) -> None:
    token = bound_token(alice.cnf)
    assert await verifier.confirm(token, BEARER, view(tls_cert(alice))) == alice.thumbprint
    with pytest.raises(TokenBindingMismatch):
        await verifier.confirm(token, BEARER, view(tls_cert(bob)))
    assert await verifier.confirm(token, BEARER, view(tls_cert(alice))) == alice.thumbprint


# --- real TLS -----------------------------------------------------------------------------------------------

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve(alice: ClientCert) -> AsyncIterator[Serve]:
    """Starts servers on 127.0.0.1 whose handler runs certificate_from_request, then confirm (alice's token).

    The handler answers 200 {"confirmed": thumbprint} or the AuthError's status with {"reason": ...}.
    """
    runners: list[web.AppRunner] = []
    verifier = mtls.create({}, deps())

    async def handler(request: web.Request) -> web.Response:
        config: MTLSConfig = request.app[MTLS_CONFIG]
        transport = request.transport
        assert transport is not None
        ssl_object = transport.get_extra_info("ssl_object")
        result = certificate_from_request(
            tls_der=ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None,
            header_values=request.headers.getall(config.header, []),
            peer=transport.get_extra_info("peername")[0],
            config=config,
        )
        request_view = RequestView(
            method=request.method,
            path=request.rel_url.raw_path,
            route=None,
            client_certificate=result.certificate,
        )
        try:
            matched = await verifier.confirm(bound_token(alice.cnf), BEARER, request_view)
        except AuthError as exc:
            return web.json_response(
                {"reason": exc.reason, "ignored_untrusted_header": result.ignored_untrusted_header},
                status=exc.status,
            )
        return web.json_response({"confirmed": matched})

    async def start(ssl_context: ssl.SSLContext | None, config: MTLSConfig | None = None) -> str:
        app = web.Application()
        app[MTLS_CONFIG] = config or MTLSConfig()
        app.router.add_get("/payments", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        port = runner.addresses[0][1]
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}/payments"

    yield start
    for runner in runners:
        await runner.cleanup()


async def fetch(
    url: str, ssl_context: ssl.SSLContext | None = None, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            url, ssl=ssl_context if ssl_context is not None else True, **kwargs
        ) as response:
            return response.status, await response.json()


async def test_tls_right_certificate_is_confirmed(serve: Serve, ca: TestCA, alice: ClientCert) -> None:
    url = await serve(ca.server_ssl_context(require_client_cert=False))
    assert await fetch(url, ca.client_ssl_context(alice)) == (200, {"confirmed": alice.thumbprint})


async def test_tls_other_certificate_is_a_mismatch(serve: Serve, ca: TestCA, bob: ClientCert) -> None:
    url = await serve(ca.server_ssl_context(require_client_cert=False))
    status, body = await fetch(url, ca.client_ssl_context(bob))
    assert (status, body["reason"]) == (401, "certificate_mismatch")


async def test_tls_no_certificate_is_missing(serve: Serve, ca: TestCA) -> None:
    url = await serve(ca.server_ssl_context(require_client_cert=False))
    status, body = await fetch(url, ca.client_ssl_context())
    assert (status, body["reason"]) == (401, "certificate_missing")


async def test_mtls_10_tls_source_ignores_a_forged_certificate_header(
    serve: Serve, ca: TestCA, alice: ClientCert
) -> None:
    # No certificate in the handshake, alice's certificate in a header from a loopback "proxy": not opted in.
    url = await serve(ca.server_ssl_context(require_client_cert=False))
    status, body = await fetch(url, ca.client_ssl_context(), headers={"Client-Cert": alice.rfc9440_header()})
    assert (status, body["reason"]) == (401, "certificate_missing")


async def test_mtls_06_listener_that_does_not_ask_gets_no_certificate(
    serve: Serve, ca: TestCA, alice: ClientCert
) -> None:
    # Under CERT_NONE the server never requests a certificate, so getpeercert(binary_form=True) is None.
    context = ca.server_ssl_context()
    context.verify_mode = ssl.CERT_NONE
    url = await serve(context)
    status, body = await fetch(url, ca.client_ssl_context(alice))
    assert (status, body["reason"]) == (401, "certificate_missing")


async def test_mtls_06_required_client_certificate_over_tls(
    serve: Serve, ca: TestCA, alice: ClientCert
) -> None:
    url = await serve(ca.server_ssl_context(require_client_cert=True))
    assert await fetch(url, ca.client_ssl_context(alice)) == (200, {"confirmed": alice.thumbprint})


async def test_mtls_12_header_from_a_trusted_proxy_over_a_real_connection(
    serve: Serve, alice: ClientCert
) -> None:
    url = await serve(None, MTLSConfig(source="header", trusted_proxies=("127.0.0.0/8",)))
    status, body = await fetch(url, headers={"Client-Cert": alice.rfc9440_header()})
    assert (status, body) == (200, {"confirmed": alice.thumbprint})


async def test_mtls_12_header_from_an_untrusted_peer_over_a_real_connection(
    serve: Serve, alice: ClientCert
) -> None:
    url = await serve(None, MTLSConfig(source="header", trusted_proxies=("10.0.0.0/8",)))
    status, body = await fetch(url, headers={"Client-Cert": alice.rfc9440_header()})
    assert (status, body) == (401, {"reason": "certificate_missing", "ignored_untrusted_header": True})


async def test_mtls_07_required_listener_refuses_a_client_without_certificate(
    serve: Serve, ca: TestCA
) -> None:
    # The token cannot ask for a certificate after the handshake: the listener decides (here: refuse).
    url = await serve(ca.server_ssl_context(require_client_cert=True))
    with pytest.raises(aiohttp.ClientError):
        await fetch(url, ca.client_ssl_context())
