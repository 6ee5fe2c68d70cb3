"""AuthError -> status and response headers, exactly as the response catalogue (spec-checklist §0) says.

Rendering is kept apart from raising: errors say what went wrong, this module says how RFC 6750 §3,
RFC 9449 §7.1/§7.2 and RFC 9470 §3 put it on the wire. One WWW-Authenticate field line per scheme; only
the scheme the client attempted carries `error` (RFC 9449 §7.2); Bearer always has `realm` (RFC 6750 §3
needs one auth-param); DPoP always has `algs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import (
    AccessDenied,
    AuthError,
    InvalidDPoPProof,
    InvalidRequest,
    UseDPoPNonce,
)


def quote(value: str) -> str:
    """An RFC 9110 §5.6.4 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_EXTRA_PARAMS = ("scope", "acr_values", "max_age")


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ChallengeRenderer:
    """Knows the deployment's realm, the DPoP algorithms (None when DPoP is off) and the RFC 9728 URL."""

    realm: str
    dpop_algs: tuple[str, ...] | None = None
    resource_metadata: str | None = None

    def render(self, error: AuthError) -> ErrorResponse:
        if isinstance(error, AccessDenied):  # a policy "no" (403) or a conflict (409) needs no challenge
            return ErrorResponse(error.status, ())
        proof_error = isinstance(error, (InvalidDPoPProof, UseDPoPNonce))
        attempted = "dpop" if proof_error else error.scheme
        params = self._error_params(error)
        if isinstance(error, InvalidRequest) and attempted is None:
            carriers = {"bearer", "dpop"}  # ambiguous: both MAY carry the error (RESP-15)
        else:
            carriers = {attempted or "bearer"} if params else set()
        # 403 and proof errors concern one scheme only; other 401/400s list every scheme we accept
        offered = carriers if error.status == 403 or proof_error else {"bearer", "dpop"}
        headers: list[tuple[str, str]] = []
        if "bearer" in offered:
            bearer = [("realm", self.realm)] + (params if "bearer" in carriers else [])
            headers.append(("WWW-Authenticate", self._challenge("Bearer", bearer, error.status)))
        if "dpop" in offered and self.dpop_algs is not None:
            dpop = [("algs", " ".join(self.dpop_algs))] + (params if "dpop" in carriers else [])
            headers.append(("WWW-Authenticate", self._challenge("DPoP", dpop, error.status)))
        if isinstance(error, UseDPoPNonce):
            headers.append(("DPoP-Nonce", error.nonce))
            headers.append(("Cache-Control", "no-store"))
        return ErrorResponse(error.status, tuple(headers))

    def _challenge(self, scheme: str, params: list[tuple[str, str]], status: int) -> str:
        if self.resource_metadata and status in (400, 401):
            params = params + [("resource_metadata", self.resource_metadata)]
        return scheme + " " + ", ".join(f"{name}={quote(value)}" for name, value in params)

    @staticmethod
    def _error_params(error: AuthError) -> list[tuple[str, str]]:
        if error.error is None:
            return []
        params = [("error", error.error)]
        if error.description:
            params.append(("error_description", error.description))
        # only the parameters the catalogue defines, so none can repeat realm/error/... (RESP-16)
        params.extend((k, v) for k, v in error.params.items() if k in _EXTRA_PARAMS)
        return params
