"""Where the caller's client certificate comes from, and what it says.

Two sources (DESIGN.md §4.2 `[mtls]`): the TLS layer of this process, or a header written by a TLS-terminating
proxy that the configuration trusts (RFC 8705 §6.5 leaves conveying the certificate to RFC 9440). Everything
here works on plain values (DER bytes, header strings, the peer address) so the aiohttp adapter stays the only
module that touches a request, and so every rule can be tested without a socket.

X.509 is parsed with `cryptography` only (RFC 8705 §7.5, checklist MTLS-14); the thumbprint is the RFC 8705
§3.1 `x5t#S256`: unpadded base64url of SHA-256 over the leaf certificate's DER, exactly as presented.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .config import MTLSConfig
from .errors import InvalidRequest
from .jws import b64url_encode
from .lru import LRU
from .models import ClientCertificate
from .netaddr import IPNetwork, peer_in

__all__ = [
    "MAX_HEADER_BYTES",
    "MALFORMED",
    "CertificateInfo",
    "CertificateResult",
    "certificate_from_request",
    "certificate_thumbprint",
    "describe_certificate",
    "parse_certificate_header",
]

MAX_HEADER_BYTES = 16 * 1024
"""Cap on the raw header value, checked before any decoding: a certificate chain rarely needs more, and
decoding cost must not be the client's to choose."""

MALFORMED = "malformed_client_cert"
"""One reason id for every unusable certificate header: the client cannot fix it, the proxy operator can."""


# RFC 8941 §3.3.5 sf-binary with standard, padded, base64 and no parameters. Written by hand because the one
# form RFC 9440 §2.2 allows is this single regex, not worth a structured-field parser dependency.
_SF_BINARY = re.compile(r":((?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?):")
_PEM_FRAME = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?")


@dataclass(frozen=True, slots=True)
class CertificateResult:
    """What the adapter gets back for one request.

    `ignored_untrusted_header` is True when a certificate header arrived from a peer outside
    `trusted_proxies`: the header was dropped (RFC 9440 §4, MTLS-12) and the adapter should emit a security
    audit event, because only a client trying to impersonate a proxy sends one.
    """

    certificate: ClientCertificate | None
    ignored_untrusted_header: bool = False


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """The caller's certificate as a principal can carry it, even when the token is not bound to it.

    `not_after` is seconds since the epoch, the same clock as `VerifiedToken.expires_at`. Nothing here is
    validated against a CA: with a header source the proxy did that, with TLS the listener did.
    """

    subject: str
    thumbprint: str
    not_after: float
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()

    @property
    def san(self) -> tuple[str, ...]:
        """All subject alternative names in OpenSSL's `TYPE:value` spelling, so a policy matches one list."""
        return (
            tuple(f"DNS:{v}" for v in self.dns_names)
            + tuple(f"URI:{v}" for v in self.uris)
            + tuple(f"email:{v}" for v in self.emails)
        )


def certificate_thumbprint(der: bytes) -> str:
    """RFC 8705 §3.1 `x5t#S256` of a DER certificate: 43 characters of unpadded base64url."""
    return b64url_encode(hashlib.sha256(der).digest())


_DESCRIBED: LRU[bytes, CertificateInfo] = LRU(1024)


def describe_certificate(der: bytes) -> CertificateInfo:
    """Subject, SANs, thumbprint and expiry of a DER certificate; raises ValueError when it is not X.509.

    A SAN extension that cryptography cannot parse yields no SANs rather than an error: a principal without
    names matches no name-based rule, which fails closed. Results are remembered by the DER's digest (bounded
    LRU): a client presents the same certificate on every request, and X.509 parsing was most of mTLS's cost.
    """
    digest = hashlib.sha256(der).digest()
    known = _DESCRIBED.get(digest)
    if known is not None:
        return known
    info = _describe(der)
    _DESCRIBED.put(digest, info)
    return info


def _describe(der: bytes) -> CertificateInfo:
    cert = x509.load_der_x509_certificate(der)
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        pass
    else:
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        emails = tuple(san.get_values_for_type(x509.RFC822Name))
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        thumbprint=certificate_thumbprint(der),
        not_after=cert.not_valid_after_utc.timestamp(),
        dns_names=dns,
        uris=uris,
        emails=emails,
    )


def certificate_from_request(
    *,
    tls_der: bytes | None,
    header_values: Sequence[str],
    peer: str | None,
    config: MTLSConfig,
) -> CertificateResult:
    """The client certificate of one request, from the one source the configuration names.

    With `source = "tls"` headers are never read: a deployment that did not opt in must not be talked into
    trusting a header (MTLS-10). With `source = "header"` the TLS certificate is never used, because the
    connection then comes from the proxy and its certificate (if any) is the proxy's, not the client's.
    Raises `InvalidRequest("malformed_client_cert")` for a header from a trusted proxy that cannot be used.
    """
    if config.source == "tls":
        return CertificateResult(ClientCertificate(der=tls_der, source="tls") if tls_der else None)
    if not header_values:
        return CertificateResult(None)
    if not _peer_is_trusted(peer, config.trusted_proxies):
        return CertificateResult(None, ignored_untrusted_header=True)
    if len(header_values) != 1:  # RFC 9440 §2.2 singleton; two lines mean an unsanitised copy got through
        raise InvalidRequest(MALFORMED)
    der = parse_certificate_header(header_values[0], config.header_format)
    return CertificateResult(ClientCertificate(der=der, source="header"))


def parse_certificate_header(value: str, header_format: str) -> bytes:
    """The leaf certificate's DER from one header value in the given format, or InvalidRequest."""
    if len(value) > MAX_HEADER_BYTES or len(value.encode("utf-8", "surrogatepass")) > MAX_HEADER_BYTES:
        raise InvalidRequest(MALFORMED)
    value = value.strip(" \t")
    if header_format == "rfc9440":
        der = _from_rfc9440(value)
    elif header_format == "xfcc":
        der = _from_xfcc(value)
    elif header_format == "pem-urlencoded":
        der = _from_pem(_url_decode(value))
    else:  # config.py validates the choice; this guards direct callers
        raise ValueError(f"unknown header_format {header_format!r}")
    return _checked_der(der)


def _from_rfc9440(value: str) -> bytes:
    """RFC 9440 §2.2: exactly one sf-binary; a list, parameters or an inner list fail the regex.

    Strict base64 (padding and zero pad bits required), although RFC 8941 §4.2.7 says parsers SHOULD NOT fail
    on those: the value comes from a proxy we configured, so a lenient spelling means something is wrong.
    """
    match = _SF_BINARY.fullmatch(value)
    if not match or not match.group(1):
        raise InvalidRequest(MALFORMED)
    try:
        der = base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(MALFORMED) from None
    if base64.b64encode(der).decode("ascii") != match.group(1):
        raise InvalidRequest(MALFORMED)  # non-zero pad bits: two spellings of one certificate
    return der


def _from_xfcc(value: str) -> bytes:
    """Envoy `X-Forwarded-Client-Cert`: the `Cert` (URL-encoded PEM) of the LAST element.

    Last, because each proxy in an APPEND_FORWARD chain appends its own element, so the last one is the only
    element written by the trusted peer itself; earlier ones came from hops we cannot authenticate.
    `Hash` alone is refused (we need the DER to compute `x5t#S256`); when present it must match `Cert`.
    """
    elements = _split_quoted(value, ",")
    if not elements or not elements[-1].strip():
        raise InvalidRequest(MALFORMED)
    pairs: dict[str, str] = {}
    for part in _split_quoted(elements[-1], ";"):
        key, eq, raw = part.strip().partition("=")
        key = key.strip().lower()
        if not eq or not key or key in pairs:
            raise InvalidRequest(MALFORMED)
        pairs[key] = _unquote_xfcc(raw.strip())
    if "cert" not in pairs:
        raise InvalidRequest(MALFORMED)
    der = _from_pem(_url_decode(pairs["cert"]))
    expected = hashlib.sha256(der).hexdigest().encode("ascii")
    if "hash" in pairs and not hmac.compare_digest(pairs["hash"].lower().encode("utf-8", "replace"), expected):
        raise InvalidRequest(MALFORMED)
    return der


def _split_quoted(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes (XFCC `Subject="CN=a,O=b"` contains both separators)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted or escaped:
        raise InvalidRequest(MALFORMED)
    parts.append("".join(current))
    return parts


def _unquote_xfcc(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    if '"' in raw:
        raise InvalidRequest(MALFORMED)
    return raw


def _url_decode(text: str) -> str:
    """Percent-decoding that refuses bytes which are not UTF-8 (a PEM is ASCII; anything else is garbage)."""
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(MALFORMED) from None


def _from_pem(text: str) -> bytes:
    """Exactly one PEM certificate and nothing around it (cryptography alone would skip surrounding text)."""
    text = text.strip(" \t\r\n")
    if not _PEM_FRAME.fullmatch(text):
        raise InvalidRequest(MALFORMED)
    try:
        certs = x509.load_pem_x509_certificates(text.encode("ascii"))
    except ValueError:
        raise InvalidRequest(MALFORMED) from None
    if len(certs) != 1:
        raise InvalidRequest(MALFORMED)
    return certs[0].public_bytes(Encoding.DER)


def _checked_der(der: bytes) -> bytes:
    """The DER must be one X.509 certificate with parseable extensions (the thumbprint covers these bytes)."""
    try:
        with warnings.catch_warnings():  # cryptography warns (and will raise) on e.g. a negative serial
            warnings.simplefilter("error")
            cert = x509.load_der_x509_certificate(der)
            cert.extensions  # noqa: B018 - parsed lazily; a malformed extension must fail here, not later
            cert.serial_number  # noqa: B018 - the same for a non-positive serial
    except (ValueError, Warning):
        raise InvalidRequest(MALFORMED) from None
    return der


def _peer_is_trusted(peer: str | None, trusted: tuple[str, ...]) -> bool:
    """Whether the TCP peer lies in a trusted-proxy CIDR; an unparseable peer (a Unix socket) is untrusted."""
    return peer_in(peer, _networks(trusted))


@lru_cache(maxsize=32)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)
