"""The `mtls` verifier: certificate-bound access tokens (RFC 8705 §3).

It is a binding check only: the token itself is verified by the bearer (or introspection) verifier, and the
core calls `confirm` on every request whose token carries `cnf["x5t#S256"]`, never from a cache, because the
certificate belongs to the connection, not to the token. Where the certificate comes from (TLS or a trusted
proxy's header) is decided before this runs, by `ztmw.client_cert.certificate_from_request`.
"""

from __future__ import annotations

from typing import Any, Mapping, TypeGuard

from ztmw.client_cert import certificate_thumbprint
from ztmw.config import check_plugin_settings
from ztmw.errors import InvalidToken, TokenBindingMismatch
from ztmw.jws import MalformedJWS, b64url_decode, constant_time_equals
from ztmw.models import Credential, RequestView, VerifiedToken
from ztmw.typing import PluginDeps

CNF_MEMBER = "x5t#S256"
_THUMBPRINT_LENGTH = 43  # unpadded base64url of a 32-byte SHA-256 digest
# The plugin's settings ([plugins.mtls]) have no keys: where the certificate comes from is the [mtls] table,
# read by the adapter. A key nobody reads is a typo or a misplaced [mtls] key and must stop start-up.


class MTLSVerifier:
    """Confirms that the client certificate of this request is the one the token is bound to."""

    name = "mtls"
    cnf_member = CNF_MEMBER
    scheme: str | None = None  # bound tokens travel as Bearer (RFC 8705 §3); no scheme of its own

    async def confirm(self, verified: VerifiedToken, credential: Credential, request: RequestView) -> str:
        """Returns the matched thumbprint; raises InvalidToken / TokenBindingMismatch (401 invalid_token)."""
        expected = verified.cnf.get(CNF_MEMBER)
        if not _is_canonical_thumbprint(expected):
            raise InvalidToken("invalid_claim", scheme=credential.scheme)
        certificate = request.client_certificate
        if certificate is None:
            raise TokenBindingMismatch("certificate_missing", scheme=credential.scheme)
        actual = certificate_thumbprint(certificate.der)
        if not constant_time_equals(actual, expected):
            # A bound token with someone else's certificate is what a stolen token looks like: flag it.
            raise TokenBindingMismatch("certificate_mismatch", scheme=credential.scheme, security=True)
        return actual


def _is_canonical_thumbprint(value: Any) -> TypeGuard[str]:
    """MTLS-03/04: exactly 43 base64url characters that decode to 32 bytes and re-encode to themselves.

    Canonical only, so one certificate has one accepted `x5t#S256` spelling (RFC 8705's own example,
    VEC-8705-1, is not canonical and is refused).
    """
    if not isinstance(value, str) or len(value) != _THUMBPRINT_LENGTH:
        return False
    try:
        return len(b64url_decode(value)) == 32
    except MalformedJWS:
        return False


def create(settings: Mapping[str, Any], deps: PluginDeps) -> MTLSVerifier:
    """Entry point `ztmw.verifiers: mtls`."""
    check_plugin_settings(settings, "mtls", hint="the certificate source is configured in [mtls]")
    return MTLSVerifier()
