"""RFC 9728 protected resource metadata, derived from the configuration so it cannot drift from enforcement.

Every value is computed from what the pipeline enforces; nothing here is configured on its own. Parameters
whose value would be empty or false are omitted (PRM-03: zero-valued parameters are left out; readers apply
the RFC defaults, which are exactly those values).

- `resource`: `resource.identifier`, byte for byte: the same string the well-known URL (`Config.metadata_url`)
  and every challenge's `resource_metadata` are built from (PRM-04, PRM-13).
- `authorization_servers`: the issuers whose tokens are accepted (PRM-05): every `[[issuers]]` entry, plus the
  `issuer` of `[plugins.introspection]` when the `introspection` verifier is enabled (it need not be an
  `[[issuers]]` entry). Configuration order, duplicates removed.
- `scopes_supported`: every scope some rule requires, sorted (PRM-09).
- `bearer_methods_supported`: `["header"]` (PRM-06): the query and form transports are never read.
- `dpop_signing_alg_values_supported`: present when the DPoP verifier is enabled; the very tuple the `DPoP`
  challenges list as `algs` (DPOP-26, PRM-07).
- `dpop_bound_access_tokens_required`: true when DPoP is enabled and every non-public rule (at least one)
  accepts only DPoP-bound tokens: `binding = "dpop"`, or `binding = "required"` while mTLS is off (then DPoP
  is the only binding that can satisfy it). Informational: it states what the rules already enforce (any
  Bearer-scheme token is refused with `invalid_token` on every protected route); public routes (this
  document among them) need no token at all.
- `tls_client_certificate_bound_access_tokens`: true when the mTLS binding verifier is enabled. RFC 9728 §2
  defines it as *support* for RFC 8705 certificate-bound tokens, and support is exactly that: with the
  verifier on, a certificate-bound token is confirmed against the caller's certificate on every route; with
  it off, such a token is refused (`unsupported_binding`). Whether a route *requires* a bound token is per
  rule and not expressible per resource, so it is not what this flag says.
- Left out on purpose: `jwks_uri`, `resource_signing_alg_values_supported` and `signed_metadata` (ztmw signs
  nothing, so no `none` can appear, PRM-09/PRM-10), `resource_name`/`resource_documentation` (no config key
  exists for them), and the `dpop_*` parameters when DPoP is off.
"""

from __future__ import annotations

from typing import Any

from .config import Config


def _authorization_servers(config: Config) -> list[str]:
    servers = [issuer.issuer for issuer in config.issuers]
    if "introspection" in config.verifiers:
        issuer = config.plugins.get("introspection", {}).get("issuer")
        if isinstance(issuer, str) and issuer:
            servers.append(issuer)
    return list(dict.fromkeys(servers))


def _dpop_required(config: Config, *, mtls: bool) -> bool:
    protected = [rule for rule in config.rules if not rule.public]
    return bool(protected) and all(
        rule.binding == "dpop" or (rule.binding == "required" and not mtls) for rule in protected
    )


def resource_metadata(config: Config, *, dpop_algs: tuple[str, ...] | None, mtls: bool) -> dict[str, Any]:
    """The RFC 9728 §2 document for `config`; `dpop_algs` and `mtls` say which binding verifiers are on."""
    # the config already refuses `none`; never advertise it even so (PRM-09)
    algs = [alg for alg in (dpop_algs or ()) if alg.lower() != "none"]
    document: dict[str, Any] = {
        "resource": config.resource.identifier,
        "authorization_servers": _authorization_servers(config),
        "scopes_supported": sorted({scope for rule in config.rules for scope in rule.scopes}),
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": algs,
        "dpop_bound_access_tokens_required": bool(algs) and _dpop_required(config, mtls=mtls),
        "tls_client_certificate_bound_access_tokens": bool(mtls),
    }
    return {name: value for name, value in document.items() if value not in (None, [], False, "")}
