"""ztmw.client_cert: certificate sources (TLS, RFC 9440, Envoy XFCC, nginx), thumbprints and descriptions.

Certificates are real (trustme, or cryptography for names trustme cannot issue); nothing is mocked.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from tests.vectors import VEC_9440_1, VEC_9440_1_THUMBPRINT
from ztmw.client_cert import (
    MAX_HEADER_BYTES,
    CertificateInfo,
    CertificateResult,
    certificate_from_request,
    certificate_thumbprint,
    describe_certificate,
    parse_certificate_header,
)
from ztmw.config import MTLSConfig, load_config
from ztmw.errors import InvalidRequest
from ztmw.testing.certs import ClientCert, TestCA

PROXY = "10.0.0.7"


@pytest.fixture(scope="module")
def alice(ca: TestCA) -> ClientCert:
    return ca.client_cert("alice@example.com")


@pytest.fixture(scope="module")
def mallory(ca: TestCA) -> ClientCert:
    return ca.client_cert("mallory.example.com")


def header_config(header_format: str = "rfc9440", proxies: tuple[str, ...] = ("10.0.0.0/8",)) -> MTLSConfig:
    return MTLSConfig(source="header", header_format=header_format, trusted_proxies=proxies)  # type: ignore[arg-type]


def from_header(
    value: str | list[str], header_format: str = "rfc9440", peer: str | None = PROXY
) -> CertificateResult:
    values = value if isinstance(value, list) else [value]
    return certificate_from_request(
        tls_der=None, header_values=values, peer=peer, config=header_config(header_format)
    )


def assert_malformed(value: str | list[str], header_format: str = "rfc9440") -> None:
    with pytest.raises(InvalidRequest) as caught:
        from_header(value, header_format)
    assert caught.value.reason == "malformed_client_cert"
    assert caught.value.status == 400 and caught.value.error == "invalid_request"


# --- every format, from real certificates -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header_format", "render"),
    [
        ("rfc9440", ClientCert.rfc9440_header),
        ("xfcc", ClientCert.xfcc_header),
        ("pem-urlencoded", ClientCert.nginx_header),
    ],
)
def test_each_header_format_yields_the_leaf_der(alice: ClientCert, header_format: str, render) -> None:
    result = from_header(render(alice), header_format)
    assert result == CertificateResult(result.certificate, ignored_untrusted_header=False)
    assert result.certificate is not None
    assert result.certificate.der == alice.der
    assert result.certificate.source == "header"
    assert certificate_thumbprint(result.certificate.der) == alice.thumbprint


def test_config_file_shape_drives_the_header_source(alice: ClientCert) -> None:
    config = load_config(
        {
            "resource": {"identifier": "https://api.example.com"},
            "mtls": {
                "source": "header",
                "header": "X-Forwarded-Client-Cert",
                "header_format": "xfcc",
                "trusted_proxies": ["10.0.0.0/8"],
            },
        }
    ).mtls
    result = certificate_from_request(
        tls_der=None, header_values=[alice.xfcc_header()], peer=PROXY, config=config
    )
    assert result.certificate is not None and result.certificate.der == alice.der


def test_default_config_reads_no_header(alice: ClientCert) -> None:
    config = load_config({"resource": {"identifier": "https://api.example.com"}}).mtls
    assert config.source == "tls"
    result = certificate_from_request(
        tls_der=None, header_values=[alice.rfc9440_header()], peer="127.0.0.1", config=config
    )
    assert result == CertificateResult(None, False)


# --- VEC-9440-1 ---------------------------------------------------------------------------------------------


def test_vec_9440_1_header_parses_to_the_published_certificate() -> None:
    result = from_header(VEC_9440_1)
    assert result.certificate is not None
    assert len(result.certificate.der) == 428
    assert certificate_thumbprint(result.certificate.der) == VEC_9440_1_THUMBPRINT


def test_vec_9440_1_description() -> None:
    der = base64.b64decode(VEC_9440_1.strip(":"))
    info = describe_certificate(der)
    assert info.subject == "CN=BC"
    assert info.emails == ("bdc@example.com",)
    assert info.dns_names == () and info.uris == ()
    assert info.san == ("email:bdc@example.com",)
    assert info.thumbprint == VEC_9440_1_THUMBPRINT
    assert (
        info.not_after == datetime.datetime(2021, 1, 23, 22, 55, 33, tzinfo=datetime.timezone.utc).timestamp()
    )


# --- checklist §8 at the source level -----------------------------------------------------------------------


def test_mtls_03_thumbprint_is_unpadded_base64url_sha256_of_der(alice: ClientCert) -> None:
    value = certificate_thumbprint(alice.der)
    assert len(value) == 43 and "=" not in value and "+" not in value and "/" not in value
    assert value == alice.thumbprint  # the kit computes it independently with hashlib


def test_mtls_04_thumbprint_covers_the_leaf_der_not_the_public_key(alice: ClientCert) -> None:
    cert = x509.load_der_x509_certificate(alice.der)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert certificate_thumbprint(alice.der) != certificate_thumbprint(spki)


def test_mtls_02_tls_source_uses_the_tls_layer_certificate(alice: ClientCert) -> None:
    result = certificate_from_request(
        tls_der=alice.der, header_values=[], peer="192.0.2.1", config=MTLSConfig()
    )
    assert result.certificate is not None
    assert result.certificate.der == alice.der and result.certificate.source == "tls"


def test_mtls_06_no_tls_certificate_means_none() -> None:
    result = certificate_from_request(tls_der=None, header_values=[], peer="127.0.0.1", config=MTLSConfig())
    assert result == CertificateResult(None, False)


def test_mtls_10_header_is_opt_in_and_ignored_under_the_tls_source(
    alice: ClientCert, mallory: ClientCert
) -> None:
    # A trusted peer and a well-formed header, but the deployment did not opt in: the TLS certificate wins.
    config = MTLSConfig(trusted_proxies=("127.0.0.1/32",))
    result = certificate_from_request(
        tls_der=alice.der, header_values=[mallory.rfc9440_header()], peer="127.0.0.1", config=config
    )
    assert result.certificate is not None and result.certificate.der == alice.der
    assert not result.ignored_untrusted_header
    # ... and a malformed header is not even parsed.
    assert certificate_from_request(tls_der=None, header_values=[":x:"], peer="127.0.0.1", config=config) == (
        CertificateResult(None, False)
    )


def test_mtls_10_header_source_ignores_the_proxy_connection_certificate(
    alice: ClientCert, mallory: ClientCert
) -> None:
    # The connection comes from the proxy; its TLS certificate (if any) is the proxy's own.
    result = certificate_from_request(
        tls_der=mallory.der, header_values=[alice.rfc9440_header()], peer=PROXY, config=header_config()
    )
    assert result.certificate is not None and result.certificate.der == alice.der
    without_header = certificate_from_request(
        tls_der=mallory.der, header_values=[], peer=PROXY, config=header_config()
    )
    assert without_header == CertificateResult(None, False)


@pytest.mark.parametrize("peer", ["192.0.2.1", "10.0.0.7.1", "11.0.0.1", "::1", "/run/app.sock", "", None])
def test_mtls_12_header_from_untrusted_peer_is_ignored_and_flagged(
    alice: ClientCert, peer: str | None
) -> None:
    result = from_header(alice.rfc9440_header(), peer=peer)
    assert result == CertificateResult(None, ignored_untrusted_header=True)


def test_mtls_12_malformed_header_from_untrusted_peer_is_ignored_not_rejected() -> None:
    # Parsing an attacker's header at all would let anyone turn any request into a 400.
    assert from_header([":not a cert:", "second"], peer="192.0.2.1") == CertificateResult(None, True)


@pytest.mark.parametrize(
    ("peer", "proxies"),
    [
        ("::ffff:10.0.0.7", ("10.0.0.0/8",)),  # dual-stack listener reporting an IPv4 proxy
        ("2001:db8::5", ("2001:db8::/32",)),
        ("fe80::1%eth0", ("fe80::/10",)),
        ("127.0.0.1", ("192.0.2.0/24", "127.0.0.1")),  # bare address as a /32
    ],
)
def test_trusted_proxy_matching(alice: ClientCert, peer: str, proxies: tuple[str, ...]) -> None:
    config = header_config(proxies=proxies)
    result = certificate_from_request(
        tls_der=None, header_values=[alice.rfc9440_header()], peer=peer, config=config
    )
    assert result.certificate is not None and result.certificate.der == alice.der


def test_no_header_from_trusted_proxy_is_no_certificate() -> None:
    assert from_header([]) == CertificateResult(None, False)


def test_mtls_11_repeated_header_lines_are_rejected(alice: ClientCert) -> None:
    assert_malformed([alice.rfc9440_header(), alice.rfc9440_header()])
    assert_malformed([alice.xfcc_header(), alice.xfcc_header()], "xfcc")
    assert_malformed([alice.nginx_header(), ""], "pem-urlencoded")


@pytest.mark.parametrize(
    "shape",
    [
        "{v}, {v}",  # a list
        "{v},{v}",
        "{v};a=1",  # parameters
        "{v};a",
        "({v})",  # inner list
        "{v}:",
        ":{v}",
        '"{v}"',  # sf-string, not a byte sequence
        "{v} x",
    ],
)
def test_mtls_11_client_cert_must_be_a_single_byte_sequence(alice: ClientCert, shape: str) -> None:
    assert_malformed(shape.format(v=alice.rfc9440_header()))


def test_mtls_11_surrounding_spaces_are_not_part_of_the_value(alice: ClientCert) -> None:
    result = from_header("  " + alice.rfc9440_header() + " ")
    assert result.certificate is not None and result.certificate.der == alice.der


@pytest.mark.parametrize("value", ["", "::", ":", ": :", "MIIB", "*MIIB*"])
def test_mtls_11_empty_or_unframed_values_are_rejected(value: str) -> None:
    assert_malformed(value)


def test_rfc9440_base64_is_strict(alice: ClientCert) -> None:
    body = base64.b64encode(alice.der).decode()
    padded = VEC_9440_1.strip(":")
    assert padded.endswith("=") and base64.b64decode(padded)  # the random kit DER may need no padding
    assert_malformed(":" + padded.rstrip("=") + ":")  # unpadded
    assert_malformed(":-" + body[1:] + ":")  # the base64url alphabet
    assert_malformed(":_" + body[1:] + ":")
    assert_malformed(":" + body[:40] + "\n" + body[40:] + ":")  # a line break
    assert_malformed(":" + body[:40] + " " + body[40:] + ":")


def test_rfc9440_non_zero_pad_bits_are_rejected() -> None:
    body = VEC_9440_1.strip(":")
    assert body.endswith("hk=")
    assert_malformed(":" + body[:-2] + "l=:")  # 'l' differs from 'k' only in the unused low bits
    assert base64.b64decode(body[:-2] + "l=") == base64.b64decode(body)


def test_mtls_14_bytes_that_are_not_a_certificate_are_rejected(alice: ClientCert) -> None:
    assert_malformed(":" + base64.b64encode(b"definitely not DER").decode() + ":")
    assert_malformed(":" + base64.b64encode(alice.der + b"\x00").decode() + ":")  # trailing data
    assert_malformed(":" + base64.b64encode(alice.der[:-1]).decode() + ":")  # truncated
    key_der = (
        x509.load_der_x509_certificate(alice.der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    assert_malformed(":" + base64.b64encode(key_der).decode() + ":")


def test_header_size_is_capped_before_decoding() -> None:
    huge = ":" + "A" * (MAX_HEADER_BYTES + 4) + ":"
    assert_malformed(huge)
    assert_malformed("%41" * (MAX_HEADER_BYTES // 3 + 1), "pem-urlencoded")
    # The cap counts bytes, not characters.
    assert_malformed("é" * (MAX_HEADER_BYTES // 2 + 1), "pem-urlencoded")


# --- Envoy XFCC ---------------------------------------------------------------------------------------------


def test_xfcc_uses_the_last_element_written_by_the_nearest_proxy(
    alice: ClientCert, mallory: ClientCert
) -> None:
    # A client can send its own XFCC element; an APPEND_FORWARD proxy then appends the real one after it.
    forged_first = mallory.xfcc_header(by="spiffe://forged") + "," + alice.xfcc_header()
    result = from_header(forged_first, "xfcc")
    assert result.certificate is not None and result.certificate.der == alice.der


def test_xfcc_quoted_values_may_hold_separators(alice: ClientCert) -> None:
    value = f'Subject="CN=a,O=b;c, \\"quoted\\"";Cert="{alice.nginx_header()}";URI=spiffe://x/y'
    result = from_header("By=spiffe://earlier," + value, "xfcc")
    assert result.certificate is not None and result.certificate.der == alice.der


def test_xfcc_keys_are_case_insensitive(alice: ClientCert) -> None:
    result = from_header(f'cert="{alice.nginx_header()}"', "xfcc")
    assert result.certificate is not None and result.certificate.der == alice.der


def test_xfcc_hash_alone_is_not_enough(alice: ClientCert) -> None:
    header = alice.xfcc_header()
    hash_only = ";".join(part for part in header.split(";") if not part.startswith("Cert="))
    assert "Hash=" in hash_only
    assert_malformed(hash_only, "xfcc")


def test_xfcc_hash_must_match_cert(alice: ClientCert, mallory: ClientCert) -> None:
    forged = alice.xfcc_header().replace(
        alice.xfcc_header().split(";")[1], mallory.xfcc_header().split(";")[1]
    )
    assert forged != alice.xfcc_header()
    assert_malformed(forged, "xfcc")


@pytest.mark.parametrize(
    "shape",
    [
        "{x},",  # trailing empty element
        '{x};Cert="{c}"',  # duplicate key
        'By=a;Cert="{c}',  # unterminated quote
        "By=a;Cert",  # key without value
        'By=a;Cert="{c}"x"',
        "Cert={c}\\",
        "",
    ],
)
def test_xfcc_malformed(alice: ClientCert, shape: str) -> None:
    assert_malformed(shape.format(x=alice.xfcc_header(), c=alice.nginx_header()), "xfcc")


def test_xfcc_cert_must_be_one_certificate(alice: ClientCert, mallory: ClientCert) -> None:
    assert_malformed(f'Cert="{quote(alice.pem + mallory.pem, safe="")}"', "xfcc")


# --- nginx $ssl_client_escaped_cert -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "junk\n{pem}",
        "{pem}junk",
        "{pem}{pem}",
        "{pem_no_newlines}",
        "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
    ],
)
def test_nginx_value_must_be_exactly_one_pem_certificate(alice: ClientCert, text: str) -> None:
    pem_no_newlines = alice.pem.replace("\n", "")
    assert_malformed(
        quote(text.format(pem=alice.pem, pem_no_newlines=pem_no_newlines), safe=""), "pem-urlencoded"
    )


def test_nginx_percent_decoding_must_give_utf8(alice: ClientCert) -> None:
    assert_malformed(alice.nginx_header() + "%FF", "pem-urlencoded")


def test_nginx_unencoded_pem_body_characters_are_kept(alice: ClientCert) -> None:
    # nginx leaves '+', '/' and '=' unescaped; '+' must stay '+', never become a space.
    lightly_escaped = alice.pem.replace(" ", "%20").replace("\n", "%0A")
    result = from_header(lightly_escaped, "pem-urlencoded")
    assert result.certificate is not None and result.certificate.der == alice.der


def test_parse_certificate_header_refuses_unknown_formats(alice: ClientCert) -> None:
    with pytest.raises(ValueError):
        parse_certificate_header(alice.rfc9440_header(), "json")


# --- describe_certificate -----------------------------------------------------------------------------------


def _self_signed(*names: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "svc"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ex, Inc"),
        ]
    )
    not_after = datetime.datetime(2031, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(not_after)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_describe_certificate_lists_dns_uri_and_email_sans() -> None:
    der = _self_signed(
        x509.DNSName("svc.example.com"),
        x509.UniformResourceIdentifier("spiffe://example.com/ns/prod/sa/payments"),
        x509.RFC822Name("ops@example.com"),
        x509.DNSName("alt.example.com"),
    )
    info = describe_certificate(der)
    assert info == CertificateInfo(
        subject="O=Ex\\, Inc,CN=svc",
        thumbprint=certificate_thumbprint(der),
        not_after=datetime.datetime(2031, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc).timestamp(),
        dns_names=("svc.example.com", "alt.example.com"),
        uris=("spiffe://example.com/ns/prod/sa/payments",),
        emails=("ops@example.com",),
    )
    assert info.san == (
        "DNS:svc.example.com",
        "DNS:alt.example.com",
        "URI:spiffe://example.com/ns/prod/sa/payments",
        "email:ops@example.com",
    )


def test_describe_certificate_without_sans() -> None:
    info = describe_certificate(_self_signed())
    assert info.san == () and info.subject == "O=Ex\\, Inc,CN=svc"


def test_describe_certificate_of_a_kit_certificate(alice: ClientCert) -> None:
    info = describe_certificate(alice.der)
    assert info.emails == ("alice@example.com",)
    assert "CN=alice@example.com" in info.subject
    assert info.thumbprint == alice.thumbprint


def test_describe_certificate_refuses_non_certificates() -> None:
    with pytest.raises(ValueError):
        describe_certificate(b"\x30\x03\x02\x01\x00")


def test_results_are_frozen(alice: ClientCert) -> None:
    result = from_header(alice.rfc9440_header())
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.certificate = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        describe_certificate(alice.der).subject = "x"  # type: ignore[misc]


def test_xfcc_non_ascii_hash_is_malformed_not_an_exception() -> None:
    from ztmw.config import MTLSConfig
    from ztmw.testing import TestCA

    cert = TestCA().client_cert("client-a")
    header = cert.xfcc_header().replace("Hash=", "Hash=é", 1)
    with pytest.raises(InvalidRequest):
        certificate_from_request(tls_der=None, header_values=[header], peer="127.0.0.1",
                                 config=MTLSConfig(source="header", header="X-Forwarded-Client-Cert",
                                                   header_format="xfcc"))
