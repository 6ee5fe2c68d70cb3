"""RFC 9728 protected resource metadata, derived from the configuration so it cannot drift from enforcement."""

from __future__ import annotations

from typing import Any

from .config import Config


def resource_metadata(config: Config, *, dpop_algs: tuple[str, ...] | None, mtls: bool) -> dict[str, Any]:
    scopes = sorted({scope for rule in config.rules for scope in rule.scopes})
    document: dict[str, Any] = {
        "resource": config.resource.identifier,
        "authorization_servers": [issuer.issuer for issuer in config.issuers],
        "bearer_methods_supported": ["header"],
    }
    if scopes:
        document["scopes_supported"] = scopes
    if dpop_algs:
        document["dpop_signing_alg_values_supported"] = list(dpop_algs)
    if mtls:
        document["tls_client_certificate_bound_access_tokens"] = True
    return {k: v for k, v in document.items() if v not in (None, [], False)}
