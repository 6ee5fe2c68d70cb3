"""The validated, frozen configuration (the TOML shape of DESIGN.md §4.2).

Every table is checked for unknown keys, because a typo in a security setting (`scope = ...` for `scopes`)
must stop start-up rather than silently allow. No I/O here beyond reading the file `load_config` is given.
"""

from __future__ import annotations

import importlib
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Literal, Mapping
from urllib.parse import unquote, urlsplit

from .errors import ConfigurationError

ASYMMETRIC_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS256", "RS384", "RS512", "EdDSA", "Ed25519"}
)
BINDINGS = ("any", "required", "dpop", "mtls")


def _default(cls: type, name: str) -> Any:
    """A field's default (slotted dataclasses do not expose defaults as class attributes)."""
    return cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]


RESERVED_RULE_PREFIX = "ztmw-"
"""Rule ids ztmw uses for the rules it adds itself (the metadata route): configured rules may not."""


@dataclass(frozen=True, slots=True)
class ResourceConfig:
    identifier: str
    public_origin: str
    realm: str = "api"


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None = None
    jwks_file: str | None = None
    algorithms: tuple[str, ...] = ("ES256", "ES384", "PS256", "EdDSA", "RS256")
    leeway: float = 30.0
    refetch_cooldown: float = 30.0
    profile: Literal["rfc9068", "jwt", "ztmw-identity"] = "rfc9068"
    kids: tuple[str, ...] = ()
    fetch_timeout: float = 5.0
    discovery: Literal["oauth", "openid"] | None = None
    """Find `jwks_uri` in the issuer's metadata instead of configuring it (JWKS-08/09): "oauth" is RFC 8414
    authorization-server metadata, "openid" OpenID Connect Discovery 1.0."""

    @property
    def metadata_url(self) -> str | None:
        """Where the issuer's metadata lives, built only from the configured issuer (never from a token).

        RFC 8414 §3/§3.1: the well-known string goes between the host and the path, a terminating "/" of the
        path removed first; OIDC Discovery §4: appended to the issuer, a terminating "/" removed first.
        """
        if self.discovery is None:
            return None
        if self.discovery == "openid":
            return f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
        parts = urlsplit(self.issuer)
        return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class DPoPConfig:
    algorithms: tuple[str, ...] = ("ES256", "EdDSA", "PS256")
    max_age: float = 60.0
    clock_skew: float = 5.0
    require_nonce: bool = False
    nonce_secret_env: str = "ZTMW_DPOP_NONCE_SECRET"
    nonce_lifetime: float = 60.0
    replay_store: str = "memory"


@dataclass(frozen=True, slots=True)
class MTLSConfig:
    source: Literal["tls", "header"] = "tls"
    header: str = "Client-Cert"
    header_format: Literal["rfc9440", "xfcc", "pem-urlencoded"] = "rfc9440"
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32",)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    backend: str = "memory"
    max_entries: int = 100_000
    max_ttl: float = 300.0
    negative_ttl: float = 30.0
    secret_env: str = "ZTMW_CACHE_SECRET"
    memo_entries: int = 10_000
    """Bound of the decision memo (replayed bearer decisions, ~0.7 KB each); 0 turns the memo off."""


@dataclass(frozen=True, slots=True)
class Levels:
    aal: int = 0
    ial: int = 0


@dataclass(frozen=True, slots=True)
class TrustConfig:
    acr: Mapping[str, Levels] = field(default_factory=dict)
    amr: Mapping[str, Levels] = field(default_factory=dict)
    evaluators: tuple[str, ...] = ("mapping",)


@dataclass(frozen=True, slots=True)
class IdentityLink:
    issuer: str
    subject: str
    account: str


@dataclass(frozen=True, slots=True)
class LinkingConfig:
    """`[linking]`: the self-service account-linking ceremony and the link store it writes (ztmw/linking/)."""

    enabled: bool = False
    path: str = "/account/links"
    store: str = "sqlite:///ztmw-links.db"
    """`sqlite:///relative.db` (to the working directory), `sqlite:////absolute.db`, or a redis:// URL."""
    min_aal: int = 2
    max_auth_age: int = 300
    max_links: int = 10
    issuers: tuple[str, ...] = ()
    """Issuers whose logins may be linked; empty: every issuer whose tokens this API accepts."""
    same_client: bool = True


@dataclass(frozen=True, slots=True)
class AuditConfig:
    enabled: bool = True
    subject: Literal["hash", "plain", "omit"] = "hash"
    logger: str = "ztmw.audit"
    sinks: tuple[str, ...] = ("structlog",)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_credential_bytes: int = 8192


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[rules]]` entry. First match wins; a route no rule covers is denied."""

    id: str
    path: str
    methods: frozenset[str] | None = None
    public: bool = False
    scopes: tuple[str, ...] = ()
    owner: str | None = None
    binding: Literal["any", "required", "dpop", "mtls"] = "any"
    min_aal: int = 0
    min_ial: int = 0
    max_auth_age: int | None = None
    acr_values: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    subject_type: Literal["any", "user", "client"] = "any"
    allow_delegation: bool = True
    conditions: tuple[str, ...] = ()
    proven_caller: bool = False

    def covers(self, method: str) -> bool:
        if self.methods is None:
            return True
        return method in self.methods or (method == "HEAD" and "GET" in self.methods)


# -- [gateway]: `ztmw gateway` (forward-auth decision service or identity-aware reverse proxy) -----------

GATEWAY_MODES = ("forward-auth", "proxy")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """`[gateway]`. The headers of a forward-auth question are believed only from `trusted_proxies`."""

    mode: Literal["forward-auth", "proxy"]
    upstream: str | None = None
    """proxy mode: scheme://host[:port] of the protected service."""
    method_header: str = "X-Forwarded-Method"
    uri_header: str = "X-Forwarded-Uri"
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    forward_credentials: bool = False
    upstream_timeout: float = 30.0
    signing_key: str | None = None
    """A private JWK file (`ztmw token keygen`): sign an identity assertion for every allowed request."""
    assertion_audience: str | None = None
    assertion_ttl: float = 60.0
    assertion_in_authorization: bool = False
    """proxy mode: also send the assertion as `Authorization: Bearer` (credentials are then never forwarded)."""
    combine_challenges: bool = False
    """forward-auth: every challenge in one WWW-Authenticate line (RFC 9110 §11.6.1), for proxies that copy one
    line only (nginx before 1.23 in `auth_request_set`)."""


@dataclass(frozen=True, slots=True)
class Config:
    resource: ResourceConfig
    issuers: tuple[IssuerConfig, ...] = ()
    verifiers: tuple[str, ...] = ("bearer",)
    dpop: DPoPConfig = DPoPConfig()
    mtls: MTLSConfig = MTLSConfig()
    cache: CacheConfig = CacheConfig()
    trust: TrustConfig = TrustConfig()
    identity_links: tuple[IdentityLink, ...] = ()
    identity_resolvers: tuple[str, ...] = ("config",)
    owner_requires_link: bool = False
    owner_requires_link_why: str = "explicit"
    """Why `owner_requires_link` has its value: "explicit", or the default and the token sources it counted."""
    require_known_subject: bool = False
    """RFC 8725 §3.8: refuse a token whose (iss, sub) no identity resolver links (401 `unknown_subject`)."""
    audit: AuditConfig = AuditConfig()
    metadata_enabled: bool = True
    cors_expose_headers: bool = False
    """RESP-19: add `Access-Control-Expose-Headers: WWW-Authenticate, DPoP-Nonce` to every response."""
    limits: LimitsConfig = LimitsConfig()
    linking: LinkingConfig = LinkingConfig()
    rules: tuple[Rule, ...] = ()
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    gateway: GatewayConfig | None = None
    """`[gateway]`: only `ztmw gateway` reads it; an app protected with `setup()` ignores it."""

    @property
    def metadata_url(self) -> str:
        """RFC 9728 §3.1: the well-known segment goes between the host and the identifier's path."""
        parts = urlsplit(self.resource.identifier)
        path = parts.path if parts.path != "/" else ""
        query = f"?{parts.query}" if parts.query else ""  # RFC 9728 §3.1 keeps the query
        return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{path}{query}"

    @property
    def metadata_path(self) -> str:
        """The path the app serves it at: aiohttp routes take decoded paths, the URL is percent-encoded."""
        return unquote(urlsplit(self.metadata_url).path)


def check_plugin_settings(
    settings: Mapping[str, Any], plugin: str, allowed: Iterable[str] = (), *, hint: str = ""
) -> None:
    """The one "unknown key" check every plugin factory runs on its `[plugins.<name>]` table (typo protection)."""
    allowed = set(allowed)
    unknown = sorted(set(settings) - allowed)
    if unknown:
        what = f"allowed: {', '.join(sorted(allowed))}" if allowed else f"{plugin} takes no settings"
        raise ConfigurationError(f"unknown key plugins.{plugin}.{unknown[0]} ({what}{'; ' + hint if hint else ''})")


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> Config:
    """Read a TOML file (or a dict of the same shape) into a validated, frozen `Config`."""
    if isinstance(source, Mapping):
        data: Mapping[str, Any] = source
        base = Path.cwd()
    else:
        path = Path(source)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: invalid TOML: {exc}") from None
        base = path.parent
    return _Reader(base).config(data)


class _Reader:
    """Walks the raw mapping with the current key path, so every error names the key it is about."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def config(self, data: Mapping[str, Any]) -> Config:
        _only(data, "", {"resource", "issuers", "verifiers", "dpop", "mtls", "cache", "trust", "identity",
                         "audit", "metadata", "limits", "rules", "plugins", "cors", "gateway",
                         "linking"})
        resource = self.resource(_table(data, "resource", required=True))
        issuers = tuple(
            self.issuer(item, f"issuers[{i}]", resource) for i, item in enumerate(_array(data, "issuers"))
        )
        if len({i.issuer for i in issuers}) != len(issuers):
            raise ConfigurationError("issuers: the same issuer is configured twice")
        verifiers_table = _table(data, "verifiers")
        _only(verifiers_table, "verifiers", {"enabled"})
        verifiers = _strings(verifiers_table.get("enabled", ["bearer"]), "verifiers.enabled")
        rules = tuple(self.rule(item, f"rules[{i}]") for i, item in enumerate(_array(data, "rules")))
        if len({r.id for r in rules}) != len(rules):
            raise ConfigurationError("rules: two rules share an id")
        metadata = _table(data, "metadata")
        _only(metadata, "metadata", {"enabled"})
        cors = _table(data, "cors")
        _only(cors, "cors", {"expose_headers"})
        plugins = _table(data, "plugins")
        for name, section in plugins.items():
            if not isinstance(section, Mapping):
                raise ConfigurationError(f"plugins.{name}: must be a table")
        identity = _table(data, "identity")
        identity_links = self.identity(identity)
        identity_resolvers = _strings(identity.get("resolvers", ["config"]), "identity.resolvers")
        linking = self.linking(_table(data, "linking"), _token_issuers(issuers, plugins))
        if linking.enabled and LINKING_RESOLVER not in identity_resolvers:
            identity_resolvers = _with_linking_resolver(identity_resolvers)
        owner_requires_link, owner_requires_link_why = _owner_requires_link(identity, issuers, verifiers, plugins)
        return _require_extras(Config(
            resource=resource,
            issuers=issuers,
            verifiers=verifiers,
            dpop=self.dpop(_table(data, "dpop")),
            mtls=self.mtls(_table(data, "mtls")),
            cache=self.cache(_table(data, "cache")),
            trust=self.trust(_table(data, "trust")),
            identity_links=identity_links,
            identity_resolvers=identity_resolvers,
            owner_requires_link=owner_requires_link,
            owner_requires_link_why=owner_requires_link_why,
            require_known_subject=_require_known_subject(identity, identity_links, identity_resolvers),
            audit=self.audit(_table(data, "audit")),
            metadata_enabled=_bool(metadata.get("enabled", True), "metadata.enabled"),
            cors_expose_headers=_bool(cors.get("expose_headers", False), "cors.expose_headers"),
            limits=self.limits(_table(data, "limits")),
            linking=linking,
            rules=rules,
            plugins={k: dict(v) for k, v in plugins.items()},
            gateway=self.gateway(data["gateway"]) if "gateway" in data else None,
        ))

    def resource(self, t: Mapping[str, Any]) -> ResourceConfig:
        _only(t, "resource", {"identifier", "public_origin", "realm"})
        identifier = _url(t.get("identifier"), "resource.identifier")
        if urlsplit(identifier).fragment or identifier.endswith("#"):
            raise ConfigurationError("resource.identifier: must not contain a fragment (RFC 9728 §1.2)")
        if re.search(r"[{}]|%2[fF]", urlsplit(identifier).path):
            raise ConfigurationError("resource.identifier: the path must not contain '{', '}' or an encoded '/'")
        origin = t.get("public_origin")
        if origin is None:
            parts = urlsplit(identifier)
            origin = f"{parts.scheme}://{parts.netloc}"
        origin = _url(origin, "resource.public_origin")
        parts = urlsplit(origin)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigurationError("resource.public_origin: must be scheme://host[:port] with no path")
        realm = _str(t.get("realm", "api"), "resource.realm")
        if not re.fullmatch(r"[\x20-\x21\x23-\x5b\x5d-\x7e]*", realm):
            raise ConfigurationError("resource.realm: only printable ASCII without quotes or backslashes")
        return ResourceConfig(identifier=identifier, public_origin=origin.rstrip("/"), realm=realm)

    def issuer(self, t: Any, key: str, resource: ResourceConfig) -> IssuerConfig:
        t = _as_table(t, key)
        _only(t, key, {"issuer", "jwks_uri", "jwks_file", "discovery", "algorithms", "audiences", "leeway",
                       "refetch_cooldown", "profile", "kids", "fetch_timeout"})
        issuer = _str(t.get("issuer"), f"{key}.issuer")
        jwks_uri, jwks_file, discovery = t.get("jwks_uri"), t.get("jwks_file"), t.get("discovery")
        if [jwks_uri, jwks_file, discovery].count(None) != 2:
            raise ConfigurationError(f"{key}: set exactly one of jwks_uri, jwks_file and discovery")
        if jwks_uri is not None:
            jwks_uri = https_url(jwks_uri, f"{key}.jwks_uri")
        if jwks_file is not None:
            jwks_file = str((self.base / _str(jwks_file, f"{key}.jwks_file")).resolve())
        if discovery is not None:
            discovery = _choice(discovery, f"{key}.discovery", ("oauth", "openid"))
            _discoverable_issuer(issuer, f"{key}.issuer")
        algorithms = _strings(t.get("algorithms", list(_default(IssuerConfig, "algorithms"))), f"{key}.algorithms")
        bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not algorithms:
            raise ConfigurationError(f"{key}.algorithms: unsupported {bad or 'empty list'}; "
                                     f"allowed: {sorted(ASYMMETRIC_ALGORITHMS)}")
        audiences = _strings(t.get("audiences", [resource.identifier]), f"{key}.audiences")
        if not audiences:
            raise ConfigurationError(f"{key}.audiences: must not be empty")
        profile = _choice(t.get("profile", "rfc9068"), f"{key}.profile", ("rfc9068", "jwt", "ztmw-identity"))
        return IssuerConfig(
            issuer=issuer,
            audiences=audiences,
            jwks_uri=jwks_uri,
            jwks_file=jwks_file,
            algorithms=algorithms,
            leeway=_number(t.get("leeway", 30), f"{key}.leeway", 0, 300),
            refetch_cooldown=_number(t.get("refetch_cooldown", 30), f"{key}.refetch_cooldown", 0, 86400),
            profile=profile,  # type: ignore[arg-type]
            kids=_strings(t.get("kids", []), f"{key}.kids"),
            fetch_timeout=_number(t.get("fetch_timeout", 5), f"{key}.fetch_timeout", 0.1, 60),
            discovery=discovery,
        )

    def dpop(self, t: Mapping[str, Any]) -> DPoPConfig:
        _only(t, "dpop", set(DPoPConfig.__dataclass_fields__))
        algorithms = _strings(t.get("algorithms", list(_default(DPoPConfig, "algorithms"))), "dpop.algorithms")
        if not algorithms or any(a not in ASYMMETRIC_ALGORITHMS for a in algorithms):
            raise ConfigurationError(f"dpop.algorithms: only asymmetric algorithms {sorted(ASYMMETRIC_ALGORITHMS)}")
        store = _replay_store(t.get("replay_store", "memory"))
        return DPoPConfig(
            algorithms=algorithms,
            max_age=_number(t.get("max_age", 60), "dpop.max_age", 1, 3600),
            clock_skew=_number(t.get("clock_skew", 5), "dpop.clock_skew", 0, 300),
            require_nonce=_bool(t.get("require_nonce", False), "dpop.require_nonce"),
            nonce_secret_env=_str(t.get("nonce_secret_env", _default(DPoPConfig, "nonce_secret_env")), "dpop.nonce_secret_env"),
            nonce_lifetime=_number(t.get("nonce_lifetime", 60), "dpop.nonce_lifetime", 1, 86400),
            replay_store=store,
        )

    def mtls(self, t: Mapping[str, Any]) -> MTLSConfig:
        _only(t, "mtls", set(MTLSConfig.__dataclass_fields__))
        proxies = _strings(t.get("trusted_proxies", list(_default(MTLSConfig, "trusted_proxies"))), "mtls.trusted_proxies")
        for cidr in proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigurationError(f"mtls.trusted_proxies: {cidr!r} is not a CIDR") from None
        return MTLSConfig(
            source=_choice(t.get("source", "tls"), "mtls.source", ("tls", "header")),  # type: ignore[arg-type]
            header=_str(t.get("header", "Client-Cert"), "mtls.header"),
            header_format=_choice(  # type: ignore[arg-type]
                t.get("header_format", "rfc9440"), "mtls.header_format", ("rfc9440", "xfcc", "pem-urlencoded")
            ),
            trusted_proxies=proxies,
        )

    def cache(self, t: Mapping[str, Any]) -> CacheConfig:
        _only(t, "cache", set(CacheConfig.__dataclass_fields__))
        backend = _memory_or_redis(t.get("backend", "memory"), "cache.backend")
        return CacheConfig(
            backend=backend,
            max_entries=_integer(t.get("max_entries", 100_000), "cache.max_entries", 0, 100_000_000),
            max_ttl=_number(t.get("max_ttl", 300), "cache.max_ttl", 0, 86400),
            negative_ttl=_number(t.get("negative_ttl", 30), "cache.negative_ttl", 0, 3600),
            memo_entries=_integer(t.get("memo_entries", 10_000), "cache.memo_entries", 0, 10_000_000),
            secret_env=_str(t.get("secret_env", "ZTMW_CACHE_SECRET"), "cache.secret_env"),
        )

    def trust(self, t: Mapping[str, Any]) -> TrustConfig:
        _only(t, "trust", {"acr", "amr", "evaluators"})

        def levels(table: Mapping[str, Any], key: str) -> dict[str, Levels]:
            out = {}
            for name, value in table.items():
                value = _as_table(value, f"{key}.{name}")
                _only(value, f"{key}.{name}", {"aal", "ial"})
                out[name] = Levels(
                    aal=_integer(value.get("aal", 0), f"{key}.{name}.aal", 0, 3),
                    ial=_integer(value.get("ial", 0), f"{key}.{name}.ial", 0, 3),
                )
            return out

        return TrustConfig(
            acr=MappingProxyType(levels(_table(t, "acr", prefix="trust"), "trust.acr")),
            amr=MappingProxyType(levels(_table(t, "amr", prefix="trust"), "trust.amr")),
            evaluators=_strings(t.get("evaluators", ["mapping"]), "trust.evaluators"),
        )

    def identity(self, t: Mapping[str, Any]) -> tuple[IdentityLink, ...]:
        _only(t, "identity", {"links", "resolvers", "owner_requires_link", "require_known_subject"})
        links = []
        for i, item in enumerate(_array(t, "links", prefix="identity")):
            key = f"identity.links[{i}]"
            item = _as_table(item, key)
            _only(item, key, {"issuer", "subject", "account"})
            links.append(IdentityLink(
                issuer=_str(item.get("issuer"), f"{key}.issuer"),
                subject=_str(item.get("subject"), f"{key}.subject"),
                account=_str(item.get("account"), f"{key}.account"),
            ))
        return tuple(links)

    def audit(self, t: Mapping[str, Any]) -> AuditConfig:
        _only(t, "audit", set(AuditConfig.__dataclass_fields__))
        return AuditConfig(
            enabled=_bool(t.get("enabled", True), "audit.enabled"),
            subject=_choice(t.get("subject", "hash"), "audit.subject", ("hash", "plain", "omit")),  # type: ignore
            logger=_str(t.get("logger", "ztmw.audit"), "audit.logger"),
            sinks=_strings(t.get("sinks", ["structlog"]), "audit.sinks"),
        )

    def limits(self, t: Mapping[str, Any]) -> LimitsConfig:
        _only(t, "limits", set(LimitsConfig.__dataclass_fields__))
        return LimitsConfig(
            max_credential_bytes=_integer(t.get("max_credential_bytes", 8192),
                                          "limits.max_credential_bytes", 256, 65536),
        )

    def linking(self, t: Mapping[str, Any], known: set[Any]) -> LinkingConfig:
        _only(t, "linking", set(LinkingConfig.__dataclass_fields__))
        path = _str(t.get("path", _default(LinkingConfig, "path")), "linking.path")
        if not path.startswith("/") or re.search(r"[{}?#]", path):
            raise ConfigurationError("linking.path: a plain path starting with '/' (no '{', '}', '?' or '#')")
        linkable = _strings(t.get("issuers", []), "linking.issuers")
        unknown = [i for i in linkable if i not in known]
        if unknown:
            raise ConfigurationError(f"linking.issuers: {unknown[0]!r} is not a configured issuer")
        return LinkingConfig(
            enabled=_bool(t.get("enabled", False), "linking.enabled"),
            path=path,
            store=_link_store(t.get("store", _default(LinkingConfig, "store")), "linking.store"),
            min_aal=_integer(t.get("min_aal", 2), "linking.min_aal", 0, 3),
            max_auth_age=_integer(t.get("max_auth_age", 300), "linking.max_auth_age", 1, 86400),
            max_links=_integer(t.get("max_links", 10), "linking.max_links", 2, 1000),
            issuers=linkable,
            same_client=_bool(t.get("same_client", True), "linking.same_client"),
        )

    def rule(self, t: Any, key: str) -> Rule:
        t = _as_table(t, key)
        _only(t, key, set(Rule.__dataclass_fields__))
        rule_id = _str(t.get("id"), f"{key}.id")
        if rule_id.startswith(RESERVED_RULE_PREFIX):  # the built-in rules' ids must name only those rules
            raise ConfigurationError(f"{key}.id: ids starting with {RESERVED_RULE_PREFIX!r} are reserved for ztmw")
        key = f"rules[{rule_id!r}]"
        path = _str(t.get("path"), f"{key}.path")
        if not path.startswith("/"):
            raise ConfigurationError(f"{key}.path: an aiohttp route pattern starting with '/'")
        methods = t.get("methods")
        public = _bool(t.get("public", False), f"{key}.public")
        rule = Rule(
            id=rule_id,
            path=path,
            methods=None if methods is None else frozenset(m.upper() for m in _strings(methods, f"{key}.methods")),
            public=public,
            scopes=_strings(t.get("scopes", []), f"{key}.scopes"),
            owner=None if t.get("owner") is None else _str(t["owner"], f"{key}.owner"),
            binding=_choice(t.get("binding", "any"), f"{key}.binding", BINDINGS),  # type: ignore[arg-type]
            min_aal=_integer(t.get("min_aal", 0), f"{key}.min_aal", 0, 3),
            min_ial=_integer(t.get("min_ial", 0), f"{key}.min_ial", 0, 3),
            max_auth_age=None if t.get("max_auth_age") is None
            else _integer(t["max_auth_age"], f"{key}.max_auth_age", 0, 10**9),
            acr_values=_strings(t.get("acr_values", []), f"{key}.acr_values"),
            clients=_strings(t.get("clients", []), f"{key}.clients"),
            subject_type=_choice(t.get("subject_type", "any"), f"{key}.subject_type",  # type: ignore[arg-type]
                                 ("any", "user", "client")),
            allow_delegation=_bool(t.get("allow_delegation", True), f"{key}.allow_delegation"),
            conditions=_strings(t.get("conditions", []), f"{key}.conditions"),
            proven_caller=_bool(t.get("proven_caller", False), f"{key}.proven_caller"),
        )
        if public and (rule.scopes or rule.owner or rule.binding != "any" or rule.min_aal or rule.min_ial
                       or rule.max_auth_age is not None or rule.acr_values or rule.clients
                       or rule.subject_type != "any" or not rule.allow_delegation or rule.proven_caller):
            raise ConfigurationError(f"{key}: a public rule cannot also carry requirements")
        for name, value in (("scopes", rule.scopes), ("acr_values", rule.acr_values)):
            if any(not re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e]+", v) for v in value):
                raise ConfigurationError(f"{key}.{name}: values must be printable ASCII without spaces or quotes")
        return rule

    def gateway(self, t: Any) -> GatewayConfig:
        t = _as_table(t, "gateway")
        _only(t, "gateway", set(GatewayConfig.__dataclass_fields__))
        mode = _choice(t.get("mode"), "gateway.mode", GATEWAY_MODES)
        upstream = t.get("upstream")
        if mode == "proxy":
            upstream = _url(upstream, "gateway.upstream")
            parts = urlsplit(upstream)
            if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
                raise ConfigurationError("gateway.upstream: must be scheme://host[:port] with no path")
            upstream = upstream.rstrip("/")
        elif upstream is not None:
            raise ConfigurationError("gateway.upstream: only in proxy mode (forward-auth has no upstream)")
        proxies = _strings(t.get("trusted_proxies", list(_default(GatewayConfig, "trusted_proxies"))),
                           "gateway.trusted_proxies")
        for cidr in proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigurationError(f"gateway.trusted_proxies: {cidr!r} is not a CIDR") from None
        headers = {}
        for name in ("method_header", "uri_header"):
            value = _str(t.get(name, _default(GatewayConfig, name)), f"gateway.{name}")
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
                raise ConfigurationError(f"gateway.{name}: not an HTTP header name")
            headers[name] = value
        signing_key = t.get("signing_key")
        if signing_key is not None:
            signing_key = str((self.base / _str(signing_key, "gateway.signing_key")).resolve())
        audience = t.get("assertion_audience")
        if audience is not None:
            audience = _str(audience, "gateway.assertion_audience")
        elif signing_key is not None and mode == "forward-auth":
            raise ConfigurationError("gateway.assertion_audience: required with signing_key in forward-auth mode "
                                     "(there is no upstream to default to)")
        elif upstream is not None:
            audience = upstream
        forward_credentials = _bool(t.get("forward_credentials", False), "gateway.forward_credentials")
        in_authorization = _bool(t.get("assertion_in_authorization", False), "gateway.assertion_in_authorization")
        if in_authorization and (mode != "proxy" or signing_key is None or forward_credentials):
            raise ConfigurationError("gateway.assertion_in_authorization: proxy mode only, needs signing_key, "
                                     "and cannot be combined with forward_credentials")
        return GatewayConfig(
            mode=mode,  # type: ignore[arg-type]
            upstream=upstream,
            method_header=headers["method_header"],
            uri_header=headers["uri_header"],
            trusted_proxies=proxies,
            forward_credentials=forward_credentials,
            upstream_timeout=_number(t.get("upstream_timeout", 30), "gateway.upstream_timeout", 0.1, 3600),
            signing_key=signing_key,
            assertion_audience=audience,
            assertion_ttl=_number(t.get("assertion_ttl", 60), "gateway.assertion_ttl", 1, 3600),
            assertion_in_authorization=in_authorization,
            combine_challenges=_bool(t.get("combine_challenges", False), "gateway.combine_challenges"),
        )


def _require_known_subject(
    identity: Mapping[str, Any], links: tuple[IdentityLink, ...], resolvers: tuple[str, ...]
) -> bool:
    """`identity.require_known_subject`, refused where it could admit nobody: when no resolver can link a
    subject (no links for `config`, no other resolver), every token would be refused."""
    required = _bool(identity.get("require_known_subject", False), "identity.require_known_subject")
    if not required:
        return False
    can_link = any(name != "config" for name in resolvers) or (bool(links) and "config" in resolvers)
    if not can_link:
        raise ConfigurationError("identity.require_known_subject: nothing can link a subject (no "
                                 "[[identity.links]] and no other resolver), so every token would be refused")
    return True


LINKING_RESOLVER = "linking"
"""The identity resolver `[linking]` adds: its link store, asked right after the static `config` links."""


def _token_issuers(issuers: tuple[IssuerConfig, ...], plugins: Mapping[str, Any]) -> set[str]:
    """Every issuer whose tokens this API may accept: the `[[issuers]]` and the introspection endpoint's."""
    known = {i.issuer for i in issuers}
    introspected = plugins.get("introspection", {}).get("issuer")
    if isinstance(introspected, str):
        known.add(introspected)
    return known


def _with_linking_resolver(resolvers: tuple[str, ...]) -> tuple[str, ...]:
    if "config" in resolvers:
        at = resolvers.index("config") + 1
        return resolvers[:at] + (LINKING_RESOLVER,) + resolvers[at:]
    return (LINKING_RESOLVER,) + resolvers


def _link_store(value: Any, key: str) -> str:
    """`sqlite:///rel.db` (relative to the working directory) or `sqlite:////abs.db` -> `sqlite:///<absolute>`,
    or a Redis URL."""
    text = _str(value, key)
    if text.startswith("sqlite:///"):
        file = text[len("sqlite:///"):]
        if not file or file.endswith("/"):
            raise ConfigurationError(f"{key}: sqlite:/// needs a file name")
        return "sqlite:///" + str(Path.cwd() / file if not file.startswith("/") else Path(file))
    if text.startswith(("redis://", "rediss://", "unix://")):
        return text  # the `redis` extra is required by _require_extras
    raise ConfigurationError(f"{key}: 'sqlite:///<file>' or a redis:// URL")


# -- small typed readers; each names the key it failed on -------------------------------------------------

def _only(table: Mapping[str, Any], key: str, allowed: Iterable[str]) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigurationError(f"unknown key {where}{unknown[0]} (allowed: {', '.join(sorted(allowed))})")


def _table(data: Mapping[str, Any], name: str, *, required: bool = False, prefix: str = "") -> Mapping[str, Any]:
    key = f"{prefix}.{name}" if prefix else name
    if name not in data:
        if required:
            raise ConfigurationError(f"{key}: required table is missing")
        return {}
    return _as_table(data[name], key)


def _as_table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{key}: must be a table")
    return value


def _array(data: Mapping[str, Any], name: str, prefix: str = "") -> list[Any]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise ConfigurationError(f"{prefix + '.' if prefix else ''}{name}: must be an array of tables")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{key}: must be a non-empty string")
    return value


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(f"{key}: must be a list of non-empty strings")
    return tuple(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{key}: must be true or false")
    return value


def _number(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{key}: must be a number")
    if not low <= value <= high:
        raise ConfigurationError(f"{key}: must be between {low} and {high}")
    return float(value)


def _integer(value: Any, key: str, low: int, high: int) -> int:
    """A whole number: 2.5 for a trust level must not silently become 2."""
    number = _number(value, key, low, high)
    if number != int(number):
        raise ConfigurationError(f"{key}: must be a whole number")
    return int(number)


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigurationError(f"{key}: must be one of {', '.join(choices)}")
    return str(value)


def _url(value: Any, key: str) -> str:
    text = _str(value, key)
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigurationError(f"{key}: must be an absolute http(s) URL")
    return text


_FIRST_PARTY_BINDINGS = {"bearer", "dpop", "mtls"}  # verifiers of the issuers' JWTs: no token source of their own
_EXTRA_MODULES = {"redis": "redis", "metrics": "prometheus_client"}  # pyproject's optional extras -> what they bring


def _require_extras(config: Config) -> Config:
    """A setting that needs an optional extra that is not installed fails at load time, in one line naming the
    setting (never its value: a Redis URL may hold a password) and the install command; found at the first
    request, or as a start-up traceback, it is how a misconfiguration ships."""
    needs = [
        ("dpop.replay_store", "redis", config.dpop.replay_store != "memory"),
        ("cache.backend", "redis", config.cache.backend != "memory"),
        ("identity.resolvers = [\"redis\"]", "redis", "redis" in config.identity_resolvers),
        ("audit.sinks = [\"metrics\"]", "metrics", "metrics" in config.audit.sinks),
        ("linking.store", "redis", not config.linking.store.startswith("sqlite:")),
    ]
    for setting, extra, needed in needs:
        if not needed:
            continue
        try:
            importlib.import_module(_EXTRA_MODULES[extra])
        except ImportError:
            raise ConfigurationError(
                f"{setting} needs the '{extra}' extra, which is not installed: pip install 'ztmw[{extra}]'"
            ) from None
    return config


def _owner_requires_link(identity: Mapping[str, Any], issuers: tuple[IssuerConfig, ...],
                         verifiers: tuple[str, ...], plugins: Mapping[str, Any]) -> tuple[bool, str]:
    """`owner` rules compare the canonical subject with the path; with several token sources, one source's raw
    `sub` can equal another's account id, so only a linked subject may own a resource unless the config says
    otherwise. Introspection counts as its issuer (the same namespace when it is also a JWT issuer); any other
    token verifier (a third-party plugin) counts as a source of its own."""
    if "owner_requires_link" in identity:
        return _bool(identity["owner_requires_link"], "identity.owner_requires_link"), "explicit"
    sources = {i.issuer for i in issuers}
    for name in verifiers:
        if name == "introspection":
            settings = plugins.get("introspection", {})
            sources.add(str(settings.get("issuer", "introspection")))
        elif name not in _FIRST_PARTY_BINDINGS:
            sources.add(f"verifier:{name}")
    return len(sources) > 1, f"default with {len(sources)} token source{'s' if len(sources) != 1 else ''}"


def _memory_or_redis(value: Any, key: str) -> str:
    """Where shared state lives: "memory" (this process) or a Redis URL (every replica)."""
    text = _str(value, key)
    if text != "memory" and not text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(f"{key}: 'memory' or a redis:// URL")
    return text


def https_url(value: Any, key: str) -> str:
    """An absolute https URL, or plain http on loopback only (development and tests): the one check for every
    URL keys or metadata are fetched from, configured or found in an issuer's metadata (JWKS-09)."""
    text = _url(value, key)
    parts = urlsplit(text)
    if parts.scheme != "https" and not is_loopback_host(parts.hostname):
        raise ConfigurationError(f"{key}: must be https (plain http only on loopback)")
    return text


def _discoverable_issuer(issuer: str, key: str) -> None:
    """With `discovery` the metadata URL is built from the issuer, so the issuer must be a URL we may fetch from
    (https; http on loopback for tests) and, as RFC 8414 §2 and OIDC Discovery §3 define an issuer identifier,
    have no query or fragment (an AS could never publish metadata for it, and §3.3 would then never match)."""
    https_url(issuer, key)
    if "?" in issuer or "#" in issuer:
        raise ConfigurationError(f"{key}: must have no query or fragment when discovery is set (RFC 8414 §2)")


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost: where plain http is allowed for development and tests."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


SQLITE_PREFIX = "sqlite://"


def _replay_store(value: Any) -> str:
    """Where DPoP proof ids live: "memory" (this process), "sqlite:///abs/path" (this host), a Redis URL (all).

    The SQLite form is a file URL (everything after `sqlite://` is the path), so the path must be absolute: a
    relative one would depend on each worker's working directory, and workers that disagree share nothing.
    """
    key = "dpop.replay_store"
    text = _str(value, key)
    if text.startswith(SQLITE_PREFIX):
        path = text[len(SQLITE_PREFIX):]
        if not path.startswith("/") or path.endswith("/") or "\x00" in path:
            raise ConfigurationError(f"{key}: a SQLite store is sqlite:///absolute/path/to/file")
        return text
    if text != "memory" and not text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(f"{key}: 'memory', 'sqlite:///absolute/path' or a redis:// URL")
    return text
