"""The `[gateway]` table: defaults, and every refusal naming its key."""

from __future__ import annotations

from typing import Any

import pytest

from ztmw import ConfigurationError, load_config

BASE: dict[str, Any] = {"resource": {"identifier": "https://api.example.com"}}


def gateway(**table: Any) -> Any:
    return load_config({**BASE, "gateway": table}).gateway


def test_defaults() -> None:
    settings = gateway(mode="forward-auth")
    assert (settings.method_header, settings.uri_header) == ("X-Forwarded-Method", "X-Forwarded-Uri")
    assert settings.trusted_proxies == ("127.0.0.1/32", "::1/128")
    assert (settings.forward_credentials, settings.upstream_timeout, settings.assertion_ttl) == (False, 30.0, 60.0)
    assert settings.signing_key is None and settings.assertion_audience is None
    assert load_config(BASE).gateway is None


def test_proxy_audience_defaults_to_the_upstream_origin(tmp_path: Any) -> None:
    settings = gateway(mode="proxy", upstream="http://127.0.0.1:9000/", signing_key=str(tmp_path / "k.json"))
    assert settings.upstream == "http://127.0.0.1:9000"
    assert settings.assertion_audience == "http://127.0.0.1:9000"


@pytest.mark.parametrize("table, key", [
    ({}, "gateway.mode"),
    ({"mode": "sidecar"}, "gateway.mode"),
    ({"mode": "proxy"}, "gateway.upstream"),
    ({"mode": "proxy", "upstream": "http://h:1/api"}, "gateway.upstream"),
    ({"mode": "proxy", "upstream": "ftp://h"}, "gateway.upstream"),
    ({"mode": "forward-auth", "upstream": "http://h:1"}, "gateway.upstream"),
    ({"mode": "forward-auth", "trusted_proxies": ["nope"]}, "gateway.trusted_proxies"),
    ({"mode": "forward-auth", "uri_header": "X Uri"}, "gateway.uri_header"),
    ({"mode": "forward-auth", "signing_key": "k.json"}, "gateway.assertion_audience"),
    ({"mode": "proxy", "upstream": "http://h:1", "upstream_timeout": 0}, "gateway.upstream_timeout"),
    ({"mode": "proxy", "upstream": "http://h:1", "assertion_in_authorization": True},
     "gateway.assertion_in_authorization"),
    ({"mode": "forward-auth", "combine_challenges": "yes"}, "gateway.combine_challenges"),
    ({"mode": "forward-auth", "upsteam": "x"}, "gateway.upsteam"),
])
def test_refusals_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigurationError, match=key.replace(".", "\\.")):
        gateway(**table)


def test_issuer_profile_for_assertions_is_accepted() -> None:
    config = load_config({**BASE, "issuers": [{"issuer": "https://gw", "jwks_file": "k.json",
                                               "profile": "ztmw-identity"}]})
    assert config.issuers[0].profile == "ztmw-identity"
