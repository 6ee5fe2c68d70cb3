"""Certificates for testing mTLS-bound tokens, over real TLS or through a proxy header.

A thin layer over trustme: it adds what tests of certificate binding keep rebuilding by hand (the
`x5t#S256` thumbprint, the three proxy header spellings, server and client SSL contexts that ask for and
present client certificates). The thumbprint is computed here with hashlib on purpose, independently of
`ztmw.client_cert`, so a test comparing the two catches a bug in either.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import quote

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["ClientCert", "TestCA"]


@dataclass(frozen=True)
class ClientCert:
    """One client certificate and its key, with the values a test compares against."""

    name: str
    der: bytes
    pem: str
    key_pem: str
    _leaf: trustme.LeafCert = field(repr=False, compare=False)

    @property
    def thumbprint(self) -> str:
        """RFC 8705 §3.1 `x5t#S256`: what a token bound to this certificate carries in `cnf`."""
        return base64.urlsafe_b64encode(hashlib.sha256(self.der).digest()).rstrip(b"=").decode("ascii")

    @property
    def cnf(self) -> dict[str, str]:
        """The `cnf` claim of a token bound to this certificate."""
        return {"x5t#S256": self.thumbprint}

    def rfc9440_header(self) -> str:
        """`Client-Cert` value (RFC 9440 §2.2): a Structured Field Byte Sequence of the DER."""
        return ":" + base64.b64encode(self.der).decode("ascii") + ":"

    def xfcc_header(self, by: str = "spiffe://proxy.test/envoy") -> str:
        """An Envoy `X-Forwarded-Client-Cert` element as a SANITIZE_SET proxy writes it (Cert URL-encoded)."""
        subject = x509.load_der_x509_certificate(self.der).subject.rfc4514_string().replace('"', '\\"')
        digest = hashlib.sha256(self.der).hexdigest()
        return f'By={by};Hash={digest};Cert="{quote(self.pem, safe="")}";Subject="{subject}"'

    def nginx_header(self) -> str:
        """nginx `$ssl_client_escaped_cert`: the URL-encoded PEM."""
        return quote(self.pem, safe="")

    def configure(self, context: ssl.SSLContext) -> None:
        """Make `context` present this certificate."""
        self._leaf.configure_cert(context)


class TestCA:
    """A throw-away certificate authority for a test (or a session): issues client and server certificates.

    Every `client_cert` call issues a new key pair, so two calls with one name give two certificates with
    different thumbprints (which is what a "certificate changed" test needs, RFC 8705 §6.3).
    """

    __test__ = False  # a test-kit class, not a pytest test class, despite the name

    def __init__(self, *, server_names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> None:
        self.ca = trustme.CA()
        self._server = self.ca.issue_cert(*server_names)

    @property
    def cert_pem(self) -> str:
        """The CA certificate, for a listener's `--tls-client-ca` or a client's trust store."""
        return self.ca.cert_pem.bytes().decode("ascii")

    def client_cert(self, name: str) -> ClientCert:
        """A new client certificate with `name` as subject CN and SAN (an email SAN when it contains "@")."""
        leaf = self.ca.issue_cert(name, common_name=name)
        pem = leaf.cert_chain_pems[0].bytes().decode("ascii")
        der = x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(Encoding.DER)
        return ClientCert(
            name=name, der=der, pem=pem, key_pem=leaf.private_key_pem.bytes().decode("ascii"), _leaf=leaf
        )

    def server_ssl_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        """A listener context that asks for a client certificate signed by this CA.

        CERT_OPTIONAL by default, as `ztmw serve --tls-client-ca` does: a client without a certificate still
        completes the handshake and gets an HTTP 401 it can read, rather than a failed handshake (MTLS-06).
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server.configure_cert(context)
        self.ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return context

    def client_ssl_context(self, cert: ClientCert | None = None) -> ssl.SSLContext:
        """A client context trusting this CA's server certificate and presenting `cert` when given."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        if cert is not None:
            cert.configure(context)
        return context
