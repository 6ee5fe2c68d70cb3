"""`ztmw.load_config`: the TOML shape of DESIGN.md §4.2, validated; every mistake names its key."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pytest

import ztmw
from ztmw import ConfigurationError, load_config
from ztmw.config import Config, Levels
from ztmw.testing import DevIssuer

from .conftest import base_config

DESIGN_EXAMPLE = """
[resource]
identifier = "https://api.example.com"
public_origin = "https://api.example.com"
realm = "api"

[[issuers]]
issuer = "https://as.example.com"
jwks_uri = "https://as.example.com/jwks"
algorithms = ["ES256", "PS256", "EdDSA"]
audiences = ["https://api.example.com"]
leeway = 30
refetch_cooldown = 30
profile = "rfc9068"

[verifiers]
enabled = ["bearer", "dpop", "mtls"]

[dpop]
algorithms = ["ES256", "EdDSA", "PS256"]
max_age = 60
clock_skew = 5
require_nonce = false
nonce_secret_env = "ZTMW_DPOP_NONCE_SECRET"
nonce_lifetime = 60
replay_store = "memory"

[mtls]
source = "tls"
header = "Client-Cert"
header_format = "rfc9440"
trusted_proxies = ["127.0.0.1/32"]

[cache]
backend = "memory"
max_entries = 100000
max_ttl = 300

[trust.acr."urn:example:acr:bankid"]
ial = 3
aal = 2
[trust.amr]
pwd = { aal = 1 }
otp = { aal = 2 }
hwk = { aal = 3 }

[audit]
subject = "hash"

[metadata]
enabled = true

[[rules]]
id = "health"
path = "/health"
methods = ["GET"]
public = true

[[rules]]
id = "own-transactions"
path = "/users/{user}/transactions"
methods = ["GET"]
scopes = ["transactions:read"]
owner = "user"

[[rules]]
id = "payments"
path = "/payments"
methods = ["POST"]
scopes = ["payments:write"]
binding = "required"
min_aal = 2
min_ial = 2
max_auth_age = 300
acr_values = ["urn:example:acr:bankid"]
"""

IDENTIFIER = "https://api.example.com"


def minimal(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"resource": {"identifier": IDENTIFIER}}
    data.update(sections)
    return data


def issuer(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"issuer": "https://as.example.com", "jwks_uri": "https://as.example.com/jwks"}
    item.update(overrides)
    return item


def rule(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"id": "r", "path": "/r"}
    item.update(overrides)
    return item


def refuses(data: dict[str, Any], *words: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        load_config(data)
    for word in words:
        assert word in str(info.value), f"{word!r} not named in: {info.value}"
    return info.value


# -- loading ----------------------------------------------------------------------------------------------

class TestLoading:
    def test_design_example_loads_from_a_toml_file(self, tmp_path: Path) -> None:
        path = tmp_path / "ztmw.toml"
        path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
        config = load_config(path)
        assert isinstance(config, Config)
        assert config.resource.identifier == IDENTIFIER
        assert config.resource.realm == "api"
        (iss,) = config.issuers
        assert iss.issuer == "https://as.example.com"
        assert iss.algorithms == ("ES256", "PS256", "EdDSA")
        assert iss.audiences == (IDENTIFIER,)
        assert (iss.leeway, iss.refetch_cooldown, iss.profile) == (30, 30, "rfc9068")
        assert config.verifiers == ("bearer", "dpop", "mtls")
        assert config.dpop.algorithms == ("ES256", "EdDSA", "PS256")
        assert (config.dpop.max_age, config.dpop.clock_skew, config.dpop.require_nonce) == (60, 5, False)
        assert config.mtls.trusted_proxies == ("127.0.0.1/32",)
        assert (config.cache.max_entries, config.cache.max_ttl) == (100_000, 300)
        assert config.trust.acr["urn:example:acr:bankid"] == Levels(aal=2, ial=3)
        assert config.trust.amr["otp"] == Levels(aal=2)
        assert config.audit.subject == "hash"
        assert config.metadata_enabled is True
        assert [r.id for r in config.rules] == ["health", "own-transactions", "payments"]
        health, own, payments = config.rules
        assert health.public and health.methods == frozenset({"GET"})
        assert own.owner == "user" and own.scopes == ("transactions:read",)
        assert payments.binding == "required"
        assert (payments.min_aal, payments.min_ial, payments.max_auth_age) == (2, 2, 300)
        assert payments.acr_values == ("urn:example:acr:bankid",)

    def test_design_example_loads_with_a_loopback_http_jwks_uri(self, tmp_path: Path) -> None:
        path = tmp_path / "ztmw.toml"
        path.write_text(DESIGN_EXAMPLE.replace("https://as.example.com/jwks", "http://127.0.0.1:8081/jwks"))
        assert load_config(str(path)).issuers[0].jwks_uri == "http://127.0.0.1:8081/jwks"

    def test_dict_source_gives_the_same_config_as_the_file(self, tmp_path: Path) -> None:
        import tomllib

        path = tmp_path / "ztmw.toml"
        path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
        assert load_config(tomllib.loads(DESIGN_EXAMPLE)) == load_config(path)

    def test_minimal_config_has_safe_defaults(self) -> None:
        config = load_config(minimal())
        assert config.rules == ()  # no rule: everything denied
        assert config.verifiers == ("bearer",)
        assert config.resource.realm == "api"
        assert config.dpop.require_nonce is False
        assert config.audit.subject == "hash"
        assert config.limits.max_credential_bytes == 8192

    def test_missing_file_is_a_configuration_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="cannot read"):
            load_config(tmp_path / "nope.toml")

    def test_invalid_toml_is_a_configuration_error(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text("[resource\nidentifier = 1")
        with pytest.raises(ConfigurationError, match="invalid TOML"):
            load_config(path)

    def test_resource_table_is_required(self) -> None:
        refuses({}, "resource")

    def test_jwks_file_is_relative_to_the_config_file(self, tmp_path: Path) -> None:
        path = tmp_path / "ztmw.toml"
        path.write_text(f'[resource]\nidentifier = "{IDENTIFIER}"\n'
                        '[[issuers]]\nissuer = "https://as"\njwks_file = "keys.json"\n')
        assert load_config(path).issuers[0].jwks_file == str((tmp_path / "keys.json").resolve())

    def test_config_is_frozen(self) -> None:
        config = load_config(minimal(rules=[rule()]))
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.rules = ()  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.rules[0].public = True  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.resource.realm = "x"  # type: ignore[misc]

    def test_trust_mappings_are_read_only(self) -> None:
        config = load_config(minimal(trust={"acr": {"a": {"aal": 1}}}))
        with pytest.raises(TypeError):
            config.trust.acr["b"] = Levels(aal=3, ial=3)  # type: ignore[index]

    def test_the_source_dict_is_not_kept(self) -> None:
        data = minimal(rules=[rule(scopes=["a"])])
        config = load_config(data)
        data["rules"][0]["scopes"].append("b")
        assert config.rules[0].scopes == ("a",)


# -- unknown keys anywhere --------------------------------------------------------------------------------

UNKNOWN_KEYS: list[tuple[str, dict[str, Any], str]] = [
    ("top level", minimal(rule=[rule()]), "rule"),
    ("resource", {"resource": {"identifier": IDENTIFIER, "realms": "x"}}, "resource.realms"),
    ("issuers", minimal(issuers=[issuer(audience=["x"])]), "issuers[0].audience"),
    ("verifiers", minimal(verifiers={"enable": ["bearer"]}), "verifiers.enable"),
    ("dpop", minimal(dpop={"max_ages": 60}), "dpop.max_ages"),
    ("mtls", minimal(mtls={"trusted_proxy": ["127.0.0.1/32"]}), "mtls.trusted_proxy"),
    ("cache", minimal(cache={"ttl": 1}), "cache.ttl"),
    ("trust", minimal(trust={"acrs": {}}), "trust.acrs"),
    ("trust.acr.X", minimal(trust={"acr": {"urn:x": {"aal": 1, "lal": 2}}}), "trust.acr.urn:x.lal"),
    ("trust.amr.X", minimal(trust={"amr": {"otp": {"strength": 2}}}), "trust.amr.otp.strength"),
    ("identity", minimal(identity={"link": []}), "identity.link"),
    ("identity.links", minimal(identity={"links": [{"issuer": "i", "subject": "s", "account": "a", "x": 1}]}),
     "identity.links[0].x"),
    ("audit", minimal(audit={"subjects": "hash"}), "audit.subjects"),
    ("metadata", minimal(metadata={"enable": True}), "metadata.enable"),
    ("limits", minimal(limits={"max_bytes": 1000}), "limits.max_bytes"),
    ("rules", minimal(rules=[rule(scope=["a"])]), "scope"),
    ("rules second entry", minimal(rules=[rule(), rule(id="s", method=["GET"])]), "method"),
]


@pytest.mark.parametrize(("where", "data", "key"), UNKNOWN_KEYS, ids=[u[0] for u in UNKNOWN_KEYS])
def test_unknown_key_is_refused_naming_the_key(where: str, data: dict[str, Any], key: str) -> None:
    error = refuses(data, key)
    assert "unknown key" in str(error)


def test_unknown_key_in_a_toml_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ztmw.toml"
    path.write_text(DESIGN_EXAMPLE.replace('owner = "user"', 'owner = "user"\nscope = ["typo"]'))
    with pytest.raises(ConfigurationError, match="scope"):
        load_config(path)


def test_plugin_sections_are_free_form_tables() -> None:
    config = load_config(minimal(plugins={"bearer": {"anything": 1}}))
    assert config.plugins["bearer"] == {"anything": 1}
    refuses(minimal(plugins={"bearer": 3}), "plugins.bearer")


# -- wrong types ------------------------------------------------------------------------------------------

WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("resource not a table", {"resource": "https://api"}, "resource"),
    ("identifier not a string", {"resource": {"identifier": 3}}, "resource.identifier"),
    ("identifier not a URL", {"resource": {"identifier": "api.example.com"}}, "resource.identifier"),
    ("identifier ftp", {"resource": {"identifier": "ftp://api.example.com"}}, "resource.identifier"),
    ("realm not a string", {"resource": {"identifier": IDENTIFIER, "realm": 1}}, "resource.realm"),
    ("realm with a quote", {"resource": {"identifier": IDENTIFIER, "realm": 'a"b'}}, "resource.realm"),
    ("public_origin with a path", {"resource": {"identifier": IDENTIFIER, "public_origin": "https://a/b"}},
     "resource.public_origin"),
    ("issuers not an array", minimal(issuers={"issuer": "x"}), "issuers"),
    ("issuer entry not a table", minimal(issuers=["https://as"]), "issuers[0]"),
    ("algorithms a string", minimal(issuers=[issuer(algorithms="ES256")]), "issuers[0].algorithms"),
    ("leeway a string", minimal(issuers=[issuer(leeway="30")]), "issuers[0].leeway"),
    ("leeway a bool", minimal(issuers=[issuer(leeway=True)]), "issuers[0].leeway"),
    ("leeway NaN", minimal(issuers=[issuer(leeway=math.nan)]), "issuers[0].leeway"),
    ("leeway inf", minimal(issuers=[issuer(leeway=math.inf)]), "issuers[0].leeway"),
    ("profile unknown", minimal(issuers=[issuer(profile="oidc")]), "issuers[0].profile"),
    ("audiences empty", minimal(issuers=[issuer(audiences=[])]), "issuers[0].audiences"),
    ("audiences a string", minimal(issuers=[issuer(audiences=IDENTIFIER)]), "issuers[0].audiences"),
    ("both jwks sources", minimal(issuers=[issuer(jwks_file="k.json")]), "jwks"),
    ("no jwks source", minimal(issuers=[{"issuer": "https://as"}]), "jwks"),
    ("verifiers not a list", minimal(verifiers={"enabled": "bearer"}), "verifiers.enabled"),
    ("require_nonce a string", minimal(dpop={"require_nonce": "false"}), "dpop.require_nonce"),
    ("replay_store", minimal(dpop={"replay_store": "memcached://x"}), "dpop.replay_store"),
    ("mtls source", minimal(mtls={"source": "header-ish"}), "mtls.source"),
    ("mtls proxy not a CIDR", minimal(mtls={"trusted_proxies": ["localhost"]}), "mtls.trusted_proxies"),
    ("cache backend", minimal(cache={"backend": "disk"}), "cache.backend"),
    ("trust.acr value not a table", minimal(trust={"acr": {"urn:x": 2}}), "trust.acr.urn:x"),
    ("audit subject", minimal(audit={"subject": "hashed"}), "audit.subject"),
    ("metadata enabled", minimal(metadata={"enabled": 1}), "metadata.enabled"),
    ("rules not an array", minimal(rules={"id": "x"}), "rules"),
    ("rule id missing", minimal(rules=[{"path": "/x"}]), "rules[0].id"),
    ("rule path missing", minimal(rules=[{"id": "x"}]), "path"),
    ("rule path relative", minimal(rules=[rule(path="users")]), "path"),
    ("public a string", minimal(rules=[rule(public="true")]), "public"),
    ("methods a string", minimal(rules=[rule(methods="GET")]), "methods"),
    ("scopes a string", minimal(rules=[rule(scopes="a b")]), "scopes"),
    ("scope with a space", minimal(rules=[rule(scopes=["a b"])]), "scopes"),
    ("scope with a quote", minimal(rules=[rule(scopes=['a"'])]), "scopes"),
    ("acr with a backslash", minimal(rules=[rule(acr_values=["a\\b"])]), "acr_values"),
    ("binding unknown", minimal(rules=[rule(binding="DPoP")]), "binding"),
    ("subject_type unknown", minimal(rules=[rule(subject_type="machine")]), "subject_type"),
    ("allow_delegation a string", minimal(rules=[rule(allow_delegation="no")]), "allow_delegation"),
    ("min_aal a string", minimal(rules=[rule(min_aal="2")]), "min_aal"),
]


@pytest.mark.parametrize(("what", "data", "key"), WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_wrong_type_is_refused_naming_the_key(what: str, data: dict[str, Any], key: str) -> None:
    refuses(data, key)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (minimal(rules=[rule(min_aal=2.5)]), "min_aal"),
        (minimal(rules=[rule(min_ial=1.5)]), "min_ial"),
        (minimal(rules=[rule(max_auth_age=300.9)]), "max_auth_age"),
        (minimal(trust={"amr": {"otp": {"aal": 1.5}}}), "trust.amr.otp.aal"),
        (minimal(cache={"max_entries": 1.5}), "cache.max_entries"),
    ],
)
def test_non_integer_for_an_integer_setting_is_refused(data: dict[str, Any], key: str) -> None:
    refuses(data, key)


# -- out of range -----------------------------------------------------------------------------------------

OUT_OF_RANGE: list[tuple[dict[str, Any], str]] = [
    (minimal(issuers=[issuer(leeway=-1)]), "issuers[0].leeway"),
    (minimal(issuers=[issuer(leeway=301)]), "issuers[0].leeway"),
    (minimal(issuers=[issuer(refetch_cooldown=-5)]), "issuers[0].refetch_cooldown"),
    (minimal(issuers=[issuer(fetch_timeout=0)]), "issuers[0].fetch_timeout"),
    (minimal(dpop={"max_age": 0}), "dpop.max_age"),
    (minimal(dpop={"max_age": 3601}), "dpop.max_age"),
    (minimal(dpop={"clock_skew": -1}), "dpop.clock_skew"),
    (minimal(dpop={"nonce_lifetime": 0}), "dpop.nonce_lifetime"),
    (minimal(cache={"max_entries": -1}), "cache.max_entries"),
    (minimal(cache={"memo_entries": -1}), "cache.memo_entries"),
    (minimal(cache={"max_ttl": -1}), "cache.max_ttl"),
    (minimal(cache={"max_ttl": 86401}), "cache.max_ttl"),
    (minimal(trust={"acr": {"x": {"aal": 4}}}), "trust.acr.x.aal"),
    (minimal(trust={"amr": {"x": {"ial": -1}}}), "trust.amr.x.ial"),
    (minimal(rules=[rule(min_aal=4)]), "min_aal"),
    (minimal(rules=[rule(min_ial=-1)]), "min_ial"),
    (minimal(rules=[rule(max_auth_age=-1)]), "max_auth_age"),
    (minimal(limits={"max_credential_bytes": 100}), "limits.max_credential_bytes"),
    (minimal(limits={"max_credential_bytes": 10**6}), "limits.max_credential_bytes"),
]


@pytest.mark.parametrize(("data", "key"), OUT_OF_RANGE,
                         ids=[o[1] + str(i) for i, o in enumerate(OUT_OF_RANGE)])
def test_out_of_range_number_is_refused_naming_the_key(data: dict[str, Any], key: str) -> None:
    refuses(data, key, "between")


def test_boundary_values_are_accepted() -> None:
    config = load_config(minimal(
        issuers=[issuer(leeway=0, refetch_cooldown=0)],
        dpop={"max_age": 1, "clock_skew": 0},
        cache={"max_entries": 0, "max_ttl": 0, "memo_entries": 0},
        rules=[rule(min_aal=3, min_ial=0, max_auth_age=0)],
    ))
    assert config.cache.max_entries == 0
    assert config.rules[0].max_auth_age == 0


# -- algorithms (JOSE-07, JOSE-08, JOSE-13, BCP-02) --------------------------------------------------------

@pytest.mark.parametrize("alg", ["none", "None", "HS256", "HS384", "HS512", "es256", "ES256K", "RSA1_5", ""])
def test_issuer_algorithm_outside_the_asymmetric_allowlist_is_refused(alg: str) -> None:
    refuses(minimal(issuers=[issuer(algorithms=["ES256", alg])]), "issuers[0].algorithms")


@pytest.mark.parametrize("alg", ["none", "HS256", "es256"])
def test_dpop_algorithm_outside_the_asymmetric_allowlist_is_refused(alg: str) -> None:
    refuses(minimal(dpop={"algorithms": [alg]}), "dpop.algorithms")


def test_empty_algorithm_list_is_refused() -> None:
    refuses(minimal(issuers=[issuer(algorithms=[])]), "issuers[0].algorithms")
    refuses(minimal(dpop={"algorithms": []}), "dpop.algorithms")


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "PS256", "RS256", "EdDSA", "Ed25519"])
def test_asymmetric_algorithms_are_accepted(alg: str) -> None:
    assert load_config(minimal(issuers=[issuer(algorithms=[alg])])).issuers[0].algorithms == (alg,)


# -- jwks_uri transport (JWKS-09) -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "uri",
    [
        "http://as.example.com/jwks",
        "http://10.0.0.1/jwks",
        "http://localhost.evil.example/jwks",
        "http://127.0.0.1.nip.io/jwks",
        "http://127.0.0.1@evil.example/jwks",
        "http://[::2]/jwks",
        "ftp://as.example.com/jwks",
    ],
)
def test_jwks_uri_must_be_https_off_loopback(uri: str) -> None:
    refuses(minimal(issuers=[issuer(jwks_uri=uri)]), "issuers[0].jwks_uri")


@pytest.mark.parametrize(
    "uri",
    [
        "https://as.example.com/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://127.10.20.30/jwks",
        "http://localhost:9000/.well-known/jwks.json",
        "http://[::1]:8080/jwks",
    ],
)
def test_https_or_loopback_http_jwks_uri_is_accepted(uri: str) -> None:
    assert load_config(minimal(issuers=[issuer(jwks_uri=uri)])).issuers[0].jwks_uri == uri


# -- discovery: keys found through the issuer's metadata (JWKS-08/09) ---------------------------------------

def discovering(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"issuer": "https://as.example.com/tenant1", "discovery": "oauth"}
    item.update(overrides)
    return item


@pytest.mark.parametrize("value", ["oauth", "openid"])
def test_discovery_is_a_third_source_of_keys(value: str) -> None:
    loaded = load_config(minimal(issuers=[discovering(discovery=value)])).issuers[0]
    assert loaded.discovery == value and loaded.jwks_uri is None and loaded.jwks_file is None


def test_discovery_defaults_to_off() -> None:
    assert load_config(minimal(issuers=[issuer()])).issuers[0].discovery is None


@pytest.mark.parametrize("extra", [{"jwks_uri": "https://as.example.com/jwks"}, {"jwks_file": "keys.json"},
                                   {"jwks_uri": "https://as.example.com/jwks", "jwks_file": "keys.json"}])
def test_discovery_together_with_jwks_uri_or_jwks_file_is_refused(extra: dict[str, Any]) -> None:
    refuses(minimal(issuers=[discovering(**extra)]), "issuers[0]: set exactly one of jwks_uri, jwks_file and discovery")


def test_an_issuer_without_any_source_of_keys_is_refused() -> None:
    refuses(minimal(issuers=[{"issuer": "https://as.example.com"}]), "issuers[0]: set exactly one of")


@pytest.mark.parametrize("value", ["OAuth", "oidc", "openid-configuration", "", True, ["oauth"]])
def test_unknown_discovery_value_is_refused(value: Any) -> None:
    refuses(minimal(issuers=[discovering(discovery=value)]), "issuers[0].discovery: must be one of oauth, openid")


@pytest.mark.parametrize("issuer_id", [
    "http://as.example.com",
    "http://10.0.0.1/tenant1",
    "http://127.0.0.1.nip.io/tenant1",
    "http://127.0.0.1@evil.example/tenant1",
    "ftp://as.example.com",
    "urn:example:as",
    "as.example.com/tenant1",
])
def test_discovery_issuer_must_be_https_off_loopback(issuer_id: str) -> None:
    refuses(minimal(issuers=[discovering(issuer=issuer_id)]), "issuers[0].issuer: must be")


@pytest.mark.parametrize("issuer_id", [
    "https://as.example.com/tenant1?x=1", "https://as.example.com/tenant1#x", "https://as.example.com/?",
    "https://as.example.com/#",
])
def test_discovery_issuer_with_a_query_or_fragment_is_refused(issuer_id: str) -> None:
    refuses(minimal(issuers=[discovering(issuer=issuer_id)]), "issuers[0].issuer: must have no query or fragment")


@pytest.mark.parametrize("issuer_id", [
    "https://as.example.com", "https://as.example.com/", "http://127.0.0.1:8080/tenant1", "http://localhost/t",
    "http://[::1]:9000/",
])
def test_discovery_issuer_https_or_loopback_http_is_accepted(issuer_id: str) -> None:
    assert load_config(minimal(issuers=[discovering(issuer=issuer_id)])).issuers[0].issuer == issuer_id


def test_without_discovery_the_issuer_need_not_be_a_url() -> None:
    assert load_config(minimal(issuers=[issuer(issuer="urn:example:as")])).issuers[0].issuer == "urn:example:as"


def test_the_same_issuer_twice_is_refused() -> None:
    refuses(minimal(issuers=[issuer(), issuer()]), "issuers")


def test_audiences_default_to_the_resource_identifier() -> None:
    assert load_config(minimal(issuers=[issuer()])).issuers[0].audiences == (IDENTIFIER,)


# -- rules ------------------------------------------------------------------------------------------------

class TestRules:
    def test_duplicate_rule_ids_are_refused(self) -> None:
        refuses(minimal(rules=[rule(id="a", path="/a"), rule(id="a", path="/b")]), "rules", "id")

    @pytest.mark.parametrize("rule_id", ["ztmw-metadata", "ztmw-anything"])
    def test_ids_of_ztmws_own_rules_are_reserved(self, rule_id: str) -> None:
        refuses(minimal(rules=[rule(id=rule_id)]), "rules[0].id", "reserved")

    @pytest.mark.parametrize(
        "requirement",
        [
            {"scopes": ["a"]}, {"owner": "user"}, {"binding": "dpop"}, {"binding": "required"},
            {"min_aal": 1}, {"min_ial": 1}, {"max_auth_age": 60}, {"acr_values": ["urn:a"]},
            {"clients": ["app"]},
        ],
    )
    def test_public_rule_with_a_requirement_is_refused(self, requirement: dict[str, Any]) -> None:
        refuses(minimal(rules=[rule(public=True, **requirement)]), "public")

    @pytest.mark.parametrize("requirement", [{"subject_type": "user"}, {"subject_type": "client"},
                                             {"allow_delegation": False}])
    def test_public_rule_with_a_caller_requirement_is_refused(self, requirement: dict[str, Any]) -> None:
        refuses(minimal(rules=[rule(public=True, **requirement)]), "public")

    def test_methods_are_upper_cased(self) -> None:
        assert load_config(minimal(rules=[rule(methods=["get", "Post"])])).rules[0].methods == frozenset(
            {"GET", "POST"})

    def test_rule_without_methods_covers_every_method(self) -> None:
        loaded = load_config(minimal(rules=[rule()])).rules[0]
        assert loaded.methods is None
        assert loaded.covers("DELETE") and loaded.covers("PATCH")

    def test_get_rule_covers_head(self) -> None:
        loaded = load_config(minimal(rules=[rule(methods=["GET"])])).rules[0]
        assert loaded.covers("HEAD") and not loaded.covers("POST")

    def test_rule_defaults(self) -> None:
        loaded = load_config(minimal(rules=[rule()])).rules[0]
        assert (loaded.public, loaded.binding, loaded.subject_type, loaded.allow_delegation) == (
            False, "any", "any", True)
        assert loaded.scopes == () and loaded.max_auth_age is None


# -- RFC 9728 metadata URL and the public origin ---------------------------------------------------------

@pytest.mark.parametrize(
    ("identifier", "url"),
    [
        ("https://resource.example.com", "https://resource.example.com/.well-known/oauth-protected-resource"),
        ("https://resource.example.com/",
         "https://resource.example.com/.well-known/oauth-protected-resource"),
        ("https://resource.example.com/resource1",
         "https://resource.example.com/.well-known/oauth-protected-resource/resource1"),
        ("https://resource.example.com/a/b/",
         "https://resource.example.com/.well-known/oauth-protected-resource/a/b/"),
        ("https://resource.example.com:8443/api",
         "https://resource.example.com:8443/.well-known/oauth-protected-resource/api"),
    ],
)
def test_prm_01_metadata_url_inserts_the_well_known_segment_before_the_path(
    identifier: str, url: str
) -> None:
    config = load_config({"resource": {"identifier": identifier}})
    assert config.metadata_url == url
    assert config.metadata_path == url.split("example.com", 1)[1].split(":8443", 1)[-1]


def test_prm_01_metadata_url_keeps_the_query() -> None:
    config = load_config({"resource": {"identifier": "https://api.example.com/res?x=1"}})
    assert config.metadata_url == "https://api.example.com/.well-known/oauth-protected-resource/res?x=1"


def test_prm_04_resource_identifier_with_a_fragment_is_refused() -> None:
    refuses({"resource": {"identifier": "https://api.example.com/res#frag"}}, "resource.identifier")


@pytest.mark.parametrize(
    ("identifier", "origin"),
    [
        ("https://api.example.com", "https://api.example.com"),
        ("https://api.example.com/", "https://api.example.com"),
        ("https://api.example.com/v1/things", "https://api.example.com"),
        ("https://api.example.com:8443/v1", "https://api.example.com:8443"),
        ("http://127.0.0.1:8080/api", "http://127.0.0.1:8080"),
    ],
)
def test_public_origin_defaults_to_the_origin_of_the_identifier(identifier: str, origin: str) -> None:
    assert load_config({"resource": {"identifier": identifier}}).resource.public_origin == origin


def test_explicit_public_origin_is_kept_without_a_trailing_slash() -> None:
    config = load_config(
        {"resource": {"identifier": IDENTIFIER, "public_origin": "https://edge.example.com/"}})
    assert config.resource.public_origin == "https://edge.example.com"


@pytest.mark.parametrize("origin", ["https://edge.example.com/api", "https://edge.example.com?x=1",
                                    "https://edge.example.com#f", "edge.example.com"])
def test_public_origin_must_be_scheme_host_port(origin: str) -> None:
    refuses({"resource": {"identifier": IDENTIFIER, "public_origin": origin}}, "resource.public_origin")


# -- identity.require_known_subject (BCP-08, RFC 8725 §3.8) -----------------------------------------------

LINK = {"issuer": "https://as.example.com", "subject": "s", "account": "a"}


@pytest.mark.parametrize(("identity", "required"), [
    pytest.param({}, False, id="default-off"),
    pytest.param({"links": [LINK], "require_known_subject": True}, True, id="config-links"),
    pytest.param({"resolvers": ["config", "redis"], "require_known_subject": True}, True, id="config-and-redis"),
    pytest.param({"resolvers": ["redis", "config"], "require_known_subject": True}, True, id="config-last"),
    pytest.param({"require_known_subject": False}, False, id="explicitly-off"),
])
def test_require_known_subject_is_read(identity: dict[str, Any], required: bool) -> None:
    assert load_config(minimal(identity=identity)).require_known_subject is required


@pytest.mark.parametrize("value", ["true", 1, 0, None, [True], {"on": True}])
def test_require_known_subject_must_be_a_boolean(value: Any) -> None:
    error = refuses(minimal(identity={"links": [LINK], "require_known_subject": value}),
                    "identity.require_known_subject", "must be true or false")
    assert "\n" not in str(error)


@pytest.mark.parametrize("resolvers", [["redis"], ["acme", "config"]])
def test_require_known_subject_works_with_any_resolver_that_can_link(resolvers: list[str]) -> None:
    """The pipeline hands the switch to the identity chain: it needs no particular resolver listed."""
    assert load_config(minimal(identity={"resolvers": resolvers, "require_known_subject": True})).require_known_subject


@pytest.mark.parametrize("identity", [{}, {"resolvers": ["config"]}, {"resolvers": ["config", "config"]},
                                      {"resolvers": [], "links": [LINK]}])
def test_require_known_subject_with_nothing_that_could_link_is_refused(identity: dict[str, Any]) -> None:
    """No links and no other resolver: every token would be refused, and no identity chain would even run."""
    error = refuses(minimal(identity={**identity, "require_known_subject": True}),
                    "identity.require_known_subject", "nothing can link a subject")
    assert "\n" not in str(error)


# -- cors (RESP-19) ---------------------------------------------------------------------------------------------

def test_cors_expose_headers_is_off_unless_asked_for() -> None:
    assert load_config(minimal()).cors_expose_headers is False
    assert load_config(minimal(cors={"expose_headers": True})).cors_expose_headers is True


@pytest.mark.parametrize(("cors", "words"), [
    ({"expose_headers": "yes"}, ("cors.expose_headers", "true or false")),
    ({"allow_origins": ["*"]}, ("cors", "allow_origins")),
])
def test_cors_settings_are_checked(cors: dict[str, Any], words: tuple[str, ...]) -> None:
    refuses(minimal(cors=cors), *words)


# -- optional extras: a setting that needs one fails at load time, naming the setting and the install ------------

@pytest.mark.parametrize(("module", "sections", "named", "extra"), [
    ("redis", {"dpop": {"replay_store": "redis://:pw@127.0.0.1:6379/0"}}, "dpop.replay_store", "redis"),
    ("redis", {"cache": {"backend": "rediss://127.0.0.1:6380/0"}}, "cache.backend", "redis"),
    ("redis", {"identity": {"resolvers": ["config", "redis"]}}, "identity.resolvers", "redis"),
    ("prometheus_client", {"audit": {"sinks": ["metrics"]}}, "audit.sinks", "metrics"),
])
def test_a_setting_needing_a_missing_extra_is_refused_at_load_time(
    monkeypatch: pytest.MonkeyPatch, module: str, sections: dict[str, Any], named: str, extra: str
) -> None:
    assert load_config(minimal(**sections))  # with the extra installed: valid
    monkeypatch.setitem(sys.modules, module, None)  # as on a machine without the extra
    with pytest.raises(ConfigurationError) as caught:
        load_config(minimal(**sections))
    message = str(caught.value)
    assert named in message and f"pip install 'ztmw[{extra}]'" in message and "\n" not in message
    assert ":pw@" not in message


def test_memory_settings_need_no_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    assert load_config(minimal(dpop={"replay_store": "memory"}, cache={"backend": "memory"}))


# -- identity.owner_requires_link: true by default once two token sources could share a `sub` ---------------------

def one_issuer(**sections: Any) -> dict[str, Any]:
    return minimal(issuers=[issuer()], **sections)


def two_issuers(**sections: Any) -> dict[str, Any]:
    return minimal(issuers=[issuer(), issuer(issuer="https://social.example", jwks_uri="https://social.example/j")],
                   **sections)


def test_owner_requires_link_defaults_to_false_with_one_issuer() -> None:
    config = load_config(one_issuer())
    assert len(config.issuers) == 1
    assert (config.owner_requires_link, config.owner_requires_link_why) == (False, "default with 1 token source")


def test_owner_requires_link_defaults_to_true_with_two_issuers() -> None:
    config = load_config(two_issuers())
    assert (config.owner_requires_link, config.owner_requires_link_why) == (True, "default with 2 token sources")


@pytest.mark.parametrize("value", [True, False])
def test_owner_requires_link_explicit_value_wins_either_way(value: bool) -> None:
    for config in (load_config(two_issuers(identity={"owner_requires_link": value})),
                   load_config(one_issuer(identity={"owner_requires_link": value}))):
        assert (config.owner_requires_link, config.owner_requires_link_why) == (value, "explicit")


@pytest.mark.parametrize(("introspection_issuer", "expected"), [
    ("https://as.example.com", False),  # the JWT issuer's own introspection endpoint: one namespace of `sub`
    ("https://other-as.example", True),  # a second authorization server
])
def test_introspection_counts_as_a_token_source_by_its_issuer(introspection_issuer: str, expected: bool) -> None:
    config = load_config(one_issuer(
        verifiers={"enabled": ["bearer", "introspection"]},
        plugins={"introspection": {"issuer": introspection_issuer}}))
    assert config.owner_requires_link is expected


def test_a_third_party_token_verifier_counts_as_a_token_source() -> None:
    config = load_config(one_issuer(verifiers={"enabled": ["bearer", "dpop", "mtls", "api-key"]}))
    assert config.owner_requires_link is True
    assert load_config(one_issuer(verifiers={"enabled": ["bearer", "dpop", "mtls"]})).owner_requires_link is False


# -- ids of ztmw's own rules, through the whole configuration ---------------------------------------------

@pytest.mark.parametrize("rule_id", ["ztmw-metadata", "ztmw-", "ztmw-plugin-metrics-get"])
def test_reserved_rule_ids_are_refused(issuer: DevIssuer, rule_id: str) -> None:
    config = base_config(issuer)
    config["rules"].append({"id": rule_id, "path": "/admin", "methods": ["GET"], "public": True})
    with pytest.raises(ztmw.ConfigurationError, match="reserved"):
        ztmw.load_config(config)
