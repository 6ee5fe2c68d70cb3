"""The one exception tree of ztmw.

    ZtmwError
    +- ConfigurationError        start-up: bad config, unknown plugin name            (never at request time)
    +- UpstreamUnavailable       503: key server / replay store / introspection down  (fail closed, no challenge)
    +- AuthError                 request time; carries status, RFC error code, stable reason id
       +- MissingCredentials             401  no error code, bare challenges        RFC 6750 §3.1
       +- InvalidRequest                 400  invalid_request                       RFC 6750 §3.1
       +- InvalidToken                   401  invalid_token                         RFC 6750 §3.1, RFC 9068 §4
       |  +- TokenBindingMismatch        401  invalid_token (downgrade, cnf mismatch) RFC 9449 §7.2, RFC 8705 §3
       |  +- UnknownSubject              401  invalid_token ((iss, sub) not known here) RFC 8725 §3.8
       +- InvalidDPoPProof               401  invalid_dpop_proof                    RFC 9449 §7.1
       +- UseDPoPNonce                   401  use_dpop_nonce + DPoP-Nonce           RFC 9449 §9
       +- InsufficientUserAuthentication 401  insufficient_user_authentication      RFC 9470 §3
       +- InsufficientScope              403  insufficient_scope                    RFC 6750 §3.1
       +- AccessDenied                   403  policy said no; no challenge
          +- AccountConflict             409  account linking: the login is another account's
          +- NotLinked                   404  account linking: no such login in this account

Raising is separate from rendering (`ztmw.challenge`). The human text sent to clients comes from the fixed
`DESCRIPTIONS` table keyed by reason id, never from exception text or token contents (RFC 6750 §3 charset).
"""

from __future__ import annotations

from typing import ClassVar, Mapping


class ZtmwError(Exception):
    """Base of every error ztmw raises on purpose."""

    cache: str | None = None
    """For a refusal after the token itself verified (a binding, expiry or identity check failed): how the
    token check was answered ("hit", "shared", "miss"), set by the authenticator for the audit trail."""


class ConfigurationError(ZtmwError, ValueError):
    """The configuration is invalid; raised at start-up, naming the key and the problem."""


class UpstreamUnavailable(ZtmwError):
    """A dependency needed to decide (JWKS, replay store, introspection) did not answer: fail closed with 503."""

    status: ClassVar[int] = 503

    def __init__(self, reason: str = "upstream_unavailable") -> None:
        super().__init__(reason)
        self.reason = reason


class AuthError(ZtmwError):
    """A request-time refusal. `scheme` is the auth scheme the client attempted ("bearer"/"dpop"), if any."""

    status: ClassVar[int] = 401
    error: ClassVar[str | None] = None
    default_reason: ClassVar[str] = "denied"

    def __init__(
        self,
        reason: str | None = None,
        *,
        scheme: str | None = None,
        params: Mapping[str, str] | None = None,
        security: bool = False,
    ) -> None:
        self.reason = reason or self.default_reason
        super().__init__(self.reason)
        self.scheme = scheme
        self.params = dict(params or {})
        self.security = security

    @property
    def description(self) -> str | None:
        return DESCRIPTIONS.get(self.reason, DESCRIPTIONS.get(self.default_reason))


class MissingCredentials(AuthError):
    status = 401
    error = None
    default_reason = "no_credentials"


class InvalidRequest(AuthError):
    status = 400
    error = "invalid_request"
    default_reason = "malformed_request"


class InvalidToken(AuthError):
    status = 401
    error = "invalid_token"
    default_reason = "invalid_token"


class TokenBindingMismatch(InvalidToken):
    default_reason = "binding_mismatch"


class UnknownSubject(InvalidToken):
    """The token verified, but its (iss, sub) pair is no valid subject here: RFC 8725 §3.8 says reject the JWT.

    Raised by an identity resolver that knows its subjects exhaustively (an account store), or by the identity
    chain under `identity.require_known_subject` when no resolver links the pair. It is a refusal, not an
    outage: the chain lets it through instead of answering 503.
    """

    default_reason = "unknown_subject"


class InvalidDPoPProof(AuthError):
    status = 401
    error = "invalid_dpop_proof"
    default_reason = "invalid_dpop_proof"


class UseDPoPNonce(AuthError):
    status = 401
    error = "use_dpop_nonce"
    default_reason = "dpop_nonce_required"

    def __init__(self, reason: str | None = None, *, nonce: str, **kwargs: object) -> None:
        super().__init__(reason, **kwargs)  # type: ignore[arg-type]
        self.nonce = nonce


class InsufficientUserAuthentication(AuthError):
    status = 401
    error = "insufficient_user_authentication"
    default_reason = "insufficient_user_authentication"


class InsufficientScope(AuthError):
    status = 403
    error = "insufficient_scope"
    default_reason = "insufficient_scope"


class AccessDenied(AuthError):
    status = 403
    error: ClassVar[str | None] = None
    default_reason = "access_denied"


class AccountConflict(AccessDenied):
    """Account linking: the login belongs to another account, or is the caller's own (409, no challenge)."""

    status = 409
    error = "conflict"
    default_reason = "account_conflict"


class NotLinked(AccessDenied):
    """Account linking: the login to unlink is not one of the caller's account (404, no challenge)."""

    status = 404
    error = "not_found"
    default_reason = "not_linked"


# Fixed client-facing texts: RFC 6750 §3 allows only %x20-21 / %x23-5B / %x5D-7E in error_description.
DESCRIPTIONS: dict[str, str] = {
    "malformed_request": "Malformed request",
    "malformed_authorization": "Malformed Authorization header",
    "multiple_authorization": "Multiple methods used to include access token",
    "credentials_too_large": "Credentials exceed the size limit",
    "invalid_token": "Invalid token",
    "malformed_token": "Malformed token",
    "token_expired": "Token expired",
    "token_not_yet_valid": "Token not yet valid",
    "token_issued_in_future": "Token issued in the future",
    "unsupported_algorithm": "Unsupported algorithm",
    "bad_signature": "Invalid token",
    "unknown_issuer": "Invalid token",
    "unknown_key": "Invalid token",
    "audience_mismatch": "Token not meant for this resource",
    "wrong_token_type": "Wrong token type",
    "missing_claim": "Token lacks a required claim",
    "invalid_claim": "Token has an invalid claim",
    "unsupported_crit": "Unsupported critical header",
    "binding_mismatch": "Invalid token binding",
    "unknown_subject": "Token subject is not known here",
    "dpop_bound_token_as_bearer": "DPoP-bound token presented as Bearer",
    "unbound_token_as_dpop": "Token is not DPoP-bound",
    "dpop_key_mismatch": "Invalid DPoP key binding",
    "certificate_mismatch": "Invalid certificate binding",
    "certificate_missing": "Certificate-bound token requires the client certificate",
    "unsupported_binding": "Unsupported token binding",
    "binding_required": "Sender-constrained token required",
    "invalid_dpop_proof": "Invalid DPoP proof",
    "dpop_nonce_required": "Resource server requires nonce in DPoP proof",
    "insufficient_user_authentication": "A different authentication level is required",
    "auth_too_old": "More recent authentication is required",
    "insufficient_scope": "Insufficient scope",
    "no_credentials": "No credentials",
    "access_denied": "Access denied",
    "no_rule": "No rule allows this route",
    "untrusted_peer": "Forward-auth questions are only answered for trusted proxies",
    "not_owner": "Access denied",
    "internal_error": "Invalid token",
    "client_not_allowed": "Access denied",
    "user_required": "Access denied",
    "client_required": "Access denied",
    "delegation_not_allowed": "Access denied",
    "verifier_error": "Invalid token",
    "condition_failed": "Access denied",
    "caller_not_proven": "Access denied",
    "inactive_token": "Invalid token",
    "introspection_unavailable": "Introspection unavailable",
    "malformed_client_cert": "Malformed client certificate header",
    # account linking (ztmw/linking/)
    "malformed_link_request": "Malformed link request",
    "invalid_link_token": "Invalid link token",
    "link_token_replayed": "Link token already used",
    "link_token_bound_elsewhere": "Link token is bound to a key this request does not prove",
    "link_login_too_weak": "The current login needs a stronger authentication",
    "link_login_too_old": "The current login needs a more recent authentication",
    "link_token_login_too_old": "The login to link needs a more recent authentication",
    "issuer_not_linkable": "Logins of this issuer cannot be linked",
    "link_limit_reached": "The account has the most logins allowed",
    "client_mismatch": "Both logins must come from the same client",
    "account_conflict": "The login belongs to another account",
    "account_exists": "An account with this id exists and the current login is not one of its logins",
    "link_self": "The current login cannot be linked to itself",
    "unlink_self": "The current login cannot unlink itself",
    "not_linked": "The login is not linked to this account",
}
