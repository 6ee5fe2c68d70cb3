"""RequestView -> Credential | None: the strict RFC 6750 §2.1 / RFC 9449 §7.1 header grammar.

Only the Authorization header transport is read (HTTP-07); query and body tokens are refused (HTTP-08, RFC 9700
§4.3.2), cookies and Proxy-Authorization are never read (HTTP-12, HTTP-13).
"""

from __future__ import annotations

import hashlib
import re
import string

from .errors import InvalidRequest
from .models import Credential, RequestView

# b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="   (RFC 6750 §2.1; token68 is the same),
# checked on the token's ASCII bytes (half a regex's time, and the SHA-256 of the cache key reuses the bytes):
# with the trailing "=" stripped, something must be left and nothing but these characters
_TOKEN68_CHARS = (string.ascii_letters + string.digits + "-._~+/").encode("ascii")
_SCHEME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")


def extract_credential(
    request: RequestView, *, schemes: frozenset[str], max_bytes: int = 8192
) -> Credential | None:
    """Return the one credential of the request, None when there is none we support.

    `schemes` are the lower-case schemes some enabled verifier serves; another scheme (Basic, say) is
    "no credentials" (RFC 6750 §3.1, RESP-01). Malformed or repeated credentials raise InvalidRequest.
    """
    lines = request.authorization
    if not lines:
        return None
    if len(lines) > 1:  # Authorization is not list-valued (RFC 9110 §11.6.2); RFC 9449 §7.2 answers 400
        attempted = {_scheme_of(line) for line in lines} & schemes
        raise InvalidRequest("multiple_authorization", scheme=_single(attempted))
    value = lines[0]
    if len(value) > max_bytes:
        raise InvalidRequest("credentials_too_large", scheme=_single({_scheme_of(value)} & schemes))
    scheme_text, _, rest = value.strip(" \t").partition(" ")
    scheme = scheme_text.lower()
    if not _SCHEME.fullmatch(scheme_text):
        raise InvalidRequest("malformed_authorization")
    if scheme not in schemes:
        return None
    if request.has_query_token or request.has_body_token:  # two transports in one request (RFC 6750 §2)
        raise InvalidRequest("multiple_authorization", scheme=scheme)
    token = rest.lstrip(" ")  # 1*SP: several spaces are valid, HTAB is not
    digest = _b64token_digest(token)
    if digest is None:
        raise InvalidRequest("malformed_authorization", scheme=scheme)
    return Credential(scheme=scheme, token=token, digest=digest)


def _scheme_of(line: str) -> str:
    return line.strip(" \t").partition(" ")[0].lower()


def _single(values: set[str]) -> str | None:
    return next(iter(values)) if len(values) == 1 else None


def plain_bearer(value: str, *, max_bytes: int = 8192) -> Credential | None:
    """The credential of an Authorization value spelled canonically, `Bearer <b64token>` with one space, or
    None for any other value, which `extract_credential` then decides (and may refuse). What that returns for
    such a value, when it is the request's only credential (the caller knows: no second Authorization header,
    no query or form token); a tenth of its work, for the spelling nearly every request has."""
    if len(value) > max_bytes or not value.startswith("Bearer "):
        return None
    token = value[7:]
    digest = _b64token_digest(token)
    return None if digest is None else Credential("bearer", token, digest)


def _b64token_digest(token: str) -> bytes | None:
    """The SHA-256 of `token` (its cache key, shared with DPoP `ath`) when it is a b64token, else None."""
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        return None
    body = raw.rstrip(b"=")
    if not body or body.translate(None, _TOKEN68_CHARS):
        return None
    return hashlib.sha256(raw).digest()
