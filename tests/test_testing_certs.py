"""ztmw.testing.certs: real, mutually consistent certificates, proxy headers and SSL contexts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

from ztmw.client_cert import certificate_thumbprint, describe_certificate
from ztmw.testing.certs import ClientCert, TestCA  # importing TestCA must not make pytest collect it


@pytest.fixture(scope="module")
def carol(ca: TestCA) -> ClientCert:
    return ca.client_cert("carol@example.com")


def test_thumbprint_is_base64url_sha256_of_der(carol: ClientCert) -> None:
    expected = base64.urlsafe_b64encode(hashlib.sha256(carol.der).digest()).decode().rstrip("=")
    assert carol.thumbprint == expected == certificate_thumbprint(carol.der)
    assert carol.cnf == {"x5t#S256": expected}


def test_der_pem_and_key_belong_together(carol: ClientCert) -> None:
    cert = x509.load_pem_x509_certificate(carol.pem.encode())
    assert cert.public_bytes(Encoding.DER) == carol.der
    assert carol.pem.startswith("-----BEGIN CERTIFICATE-----\n")
    key = load_pem_private_key(carol.key_pem.encode(), password=None)
    spki = PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(Encoding.DER, spki) == cert.public_key().public_bytes(
        Encoding.DER, spki
    )


def test_names_become_subject_and_sans(ca: TestCA, carol: ClientCert) -> None:
    assert describe_certificate(carol.der).emails == ("carol@example.com",)
    service = ca.client_cert("payments.internal.test")
    info = describe_certificate(service.der)
    assert info.dns_names == ("payments.internal.test",)
    assert "CN=payments.internal.test" in info.subject


def test_every_call_issues_a_new_certificate(ca: TestCA) -> None:
    first, second = ca.client_cert("same"), ca.client_cert("same")
    assert (
        first.der != second.der and first.thumbprint != second.thumbprint and first.key_pem != second.key_pem
    )


def test_certificates_are_signed_by_the_ca(ca: TestCA, carol: ClientCert) -> None:
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    x509.load_der_x509_certificate(carol.der).verify_directly_issued_by(issuer)


def test_rfc9440_header_is_a_byte_sequence_of_the_der(carol: ClientCert) -> None:
    value = carol.rfc9440_header()
    assert re.fullmatch(r":[A-Za-z0-9+/]+={0,2}:", value)
    assert base64.b64decode(value[1:-1], validate=True) == carol.der


def test_xfcc_header_has_hash_cert_and_subject(carol: ClientCert) -> None:
    value = carol.xfcc_header(by="spiffe://mesh.test/gw")
    match = re.fullmatch(
        r'By=(?P<by>[^;]+);Hash=(?P<hash>[0-9a-f]{64});Cert="(?P<cert>[^"]+)";Subject="(?P<s>.*)"', value
    )
    assert match is not None
    assert match["by"] == "spiffe://mesh.test/gw"
    assert match["hash"] == hashlib.sha256(carol.der).hexdigest()
    assert unquote(match["cert"]) == carol.pem
    assert "CN=carol@example.com" in match["s"]


def test_nginx_header_is_the_url_encoded_pem(carol: ClientCert) -> None:
    value = carol.nginx_header()
    assert "\n" not in value and " " not in value
    assert unquote(value) == carol.pem


def test_server_context_asks_for_client_certificates(ca: TestCA) -> None:
    assert ca.server_ssl_context().verify_mode == ssl.CERT_OPTIONAL
    assert ca.server_ssl_context(require_client_cert=False).verify_mode == ssl.CERT_OPTIONAL
    assert ca.server_ssl_context(require_client_cert=True).verify_mode == ssl.CERT_REQUIRED


async def _peer_der_seen_by_server(ca: TestCA, client_context: ssl.SSLContext) -> bytes | None:
    seen: list[bytes | None] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ca.server_ssl_context())
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context)
        try:
            assert await reader.read() == b"ok"
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass  # the server closed first; nothing left to flush
    finally:
        server.close()
        await server.wait_closed()
    return seen[0]


async def test_client_context_presents_the_certificate_over_real_tls(ca: TestCA, carol: ClientCert) -> None:
    assert await _peer_der_seen_by_server(ca, ca.client_ssl_context(carol)) == carol.der


async def test_client_context_without_certificate_presents_none(ca: TestCA) -> None:
    assert await _peer_der_seen_by_server(ca, ca.client_ssl_context()) is None


def test_separate_cas_do_not_trust_each_other(ca: TestCA) -> None:
    other = TestCA()
    assert other.cert_pem != ca.cert_pem
    foreign = x509.load_der_x509_certificate(other.client_cert("x").der)
    with pytest.raises(ValueError):
        foreign.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem.encode()))
