"""`[linking]` in the configuration: defaults, validation, the resolver it adds, the rule and route it mounts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import ztmw
from ztmw import ConfigurationError, load_config
from ztmw.cli import route_table
from ztmw.config import LinkingConfig
from ztmw.testing import DevIssuer

ISSUER = "https://as.example"
ROOT = Path(__file__).resolve().parents[2]
JWKS: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def jwks_file(tmp_path: Path) -> None:
    """A real JWK Set on disk for the issuer (start-up reads it)."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(DevIssuer(ISSUER).jwks()), encoding="utf-8")
    JWKS["path"] = path


def config(linking: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"resource": {"identifier": "https://api.example.com"},
                            "issuers": [{"issuer": ISSUER, "jwks_file": str(JWKS["path"])}]}
    if linking is not None:
        data["linking"] = linking
    data.update(sections)
    return data


def test_linking_is_off_by_default_and_adds_nothing() -> None:
    loaded = load_config(config())
    assert not loaded.linking.enabled and loaded.linking.path == LinkingConfig().path
    assert loaded.identity_resolvers == ("config",)


def test_enabled_linking_has_the_documented_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    linking = load_config(config({"enabled": True})).linking
    assert (linking.path, linking.min_aal, linking.max_auth_age, linking.max_links, linking.issuers,
            linking.same_client) == ("/account/links", 2, 300, 10, (), True)
    assert linking.store == f"sqlite:///{tmp_path / 'ztmw-links.db'}"  # relative to the working directory


def test_the_link_store_is_asked_right_after_the_static_links() -> None:
    assert load_config(config({"enabled": True})).identity_resolvers == ("config", "linking")
    resolvers = load_config(config({"enabled": True}, identity={"resolvers": ["config", "redis"]}))
    assert resolvers.identity_resolvers == ("config", "linking", "redis")
    assert load_config(config({"enabled": True}, identity={"resolvers": ["redis"]})).identity_resolvers == (
        "linking", "redis")


def test_the_link_store_lets_require_known_subject_start() -> None:
    assert load_config(config({"enabled": True}, identity={"require_known_subject": True})).require_known_subject


@pytest.mark.parametrize("linking, message", [
    ({"enable": True}, "unknown key linking.enable"),
    ({"enabled": "yes"}, "linking.enabled"),
    ({"path": "account/links"}, "linking.path"),
    ({"path": "/account/{id}"}, "linking.path"),
    ({"store": "postgres://x"}, "linking.store"),
    ({"store": "sqlite:///"}, "linking.store"),
    ({"min_aal": 4}, "linking.min_aal"),
    ({"max_auth_age": 0}, "linking.max_auth_age"),
    ({"max_links": 1}, "linking.max_links"),
    ({"issuers": ["https://not-configured.example"]}, "linking.issuers"),
    ({"same_client": 1}, "linking.same_client"),
])
def test_bad_linking_settings_are_refused_naming_the_key(linking: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace(".", r"\.")):
        load_config(config(linking))


def test_the_introspection_issuer_may_be_linkable() -> None:
    loaded = load_config(config({"issuers": ["https://opaque.example"]},
                                plugins={"introspection": {"issuer": "https://opaque.example"}}))
    assert loaded.linking.issuers == ("https://opaque.example",)


def test_a_redis_store_without_the_redis_extra_is_a_configuration_error() -> None:
    script = (
        "import sys; sys.modules['redis'] = None\n"
        "from ztmw import load_config, ConfigurationError\n"
        "try:\n"
        "    load_config({'resource': {'identifier': 'https://api.example.com'},"
        " 'linking': {'enabled': True, 'store': 'redis://127.0.0.1:6379/0'}})\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "linking.store needs the 'redis' extra, which is not installed: pip install 'ztmw[redis]'" in \
        result.stdout, result.stderr


def test_the_linking_resolver_without_enabled_linking_stops_start_up() -> None:
    with pytest.raises(ConfigurationError, match="needs \\[linking\\] enabled"):
        ztmw.setup(web.Application(), config(identity={"resolvers": ["config", "linking"]}))


def test_the_ceremony_route_is_mounted_and_covered_by_its_reserved_rule(tmp_path: Path) -> None:
    app = web.Application()
    pipeline = ztmw.setup(app, config({"enabled": True, "store": f"sqlite:///{tmp_path / 'l.db'}"}))
    rows = {(method, pattern): rule for method, pattern, rule in route_table(app, pipeline)}
    assert {k: v for k, v in rows.items() if k[1] == "/account/links"} == {
        ("GET", "/account/links"): "ztmw-linking", ("POST", "/account/links"): "ztmw-linking",
        ("DELETE", "/account/links"): "ztmw-linking"}
    assert pipeline.memo is None  # a link must take effect on the next request: nothing replays an answer
