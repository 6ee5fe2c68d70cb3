"""ztmw: the zero-trust security layer for aiohttp servers.

Every request is denied unless a rule allows it; tokens are verified by plugins (bearer JWT, DPoP, mTLS);
trust is assessed on separate axes; every decision is one structured audit event.
"""

from .config import Config, Rule, load_config
from .errors import (
    AccessDenied,
    AuthError,
    ConfigurationError,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingCredentials,
    TokenBindingMismatch,
    UnknownSubject,
    UpstreamUnavailable,
    UseDPoPNonce,
    ZtmwError,
)
from .middleware import (
    DECISION,
    PIPELINE,
    PRINCIPAL,
    TRUST,
    audit_middleware,
    authentication_middleware,
    authorization_middleware,
    setup,
    zero_trust_middleware,
)
from .models import (
    AuditEvent,
    Caller,
    ClientCertificate,
    Credential,
    Decision,
    Principal,
    RequestView,
    RouteRef,
    TrustAssessment,
    VerifiedToken,
)
from .parser_rejection import ParserSafeAppRunner, RejectionLogFilter, run_app
from .pipeline import Pipeline

__version__ = "0.1.0"

__all__ = [
    "DECISION",
    "PIPELINE",
    "PRINCIPAL",
    "TRUST",
    "AccessDenied",
    "AuditEvent",
    "AuthError",
    "Caller",
    "ClientCertificate",
    "Config",
    "ConfigurationError",
    "Credential",
    "Decision",
    "InsufficientScope",
    "InsufficientUserAuthentication",
    "InvalidDPoPProof",
    "InvalidRequest",
    "InvalidToken",
    "MissingCredentials",
    "ParserSafeAppRunner",
    "Pipeline",
    "Principal",
    "RejectionLogFilter",
    "RequestView",
    "RouteRef",
    "Rule",
    "TokenBindingMismatch",
    "TrustAssessment",
    "UnknownSubject",
    "UpstreamUnavailable",
    "UseDPoPNonce",
    "VerifiedToken",
    "ZtmwError",
    "__version__",
    "audit_middleware",
    "authentication_middleware",
    "authorization_middleware",
    "load_config",
    "run_app",
    "setup",
    "zero_trust_middleware",
]
