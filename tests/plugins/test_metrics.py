"""The `metrics` audit sink end to end: `ztmw.setup` on a real server, scraped over HTTP as Prometheus does.

The scrape route is an ordinary protected route (deny by default); the exposition text is parsed with
prometheus_client's own parser, and counts are checked after a known mix of requests. Nothing is mocked;
durations are only counted, never compared with a time.
"""

from __future__ import annotations

import base64
import json
import math
import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ztmw_plugins.metrics import MAX_LABEL_VALUES, MetricsSink

import ztmw
from ztmw.audit import hash_subject
from ztmw.errors import ConfigurationError
from ztmw.models import AuditEvent
from ztmw.testing import DevIssuer, DPoPKey, FakeClock

from ..conftest import base_config, items_app

SUBJECT = "subject-7f3e9c"
CLIENT = "client-9a1b4d"
METRICS_RULE = {"id": "metrics", "path": "/metrics", "methods": ["GET"], "public": True,
                "conditions": ["network"]}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_config(issuer: DevIssuer, *, rule: dict[str, Any] | None = METRICS_RULE,
                   plugins: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    config = base_config(issuer, audit={"sinks": ["structlog", "metrics"]},
                         plugins=plugins if plugins is not None else {"network": {"allow": ["127.0.0.1/32"]}},
                         **sections)
    if rule is not None:
        config["rules"] = [*config["rules"], rule]
    return config


async def protected_client(aiohttp_client: Any, config: dict[str, Any], clock: FakeClock) -> Any:
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    return await aiohttp_client(app)


async def scrape_text(client: Any, path: str = "/metrics", **headers: str) -> str:
    response = await client.get(path, headers=headers)
    body = await response.text()
    assert response.status == 200, body
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return str(body)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def status_of(client: Any, path: str, **headers: str) -> int:
    response = await client.get(path, headers=headers)
    await response.read()
    return int(response.status)


@pytest.fixture
async def client(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> Any:
    return await protected_client(aiohttp_client, metrics_config(issuer), clock)


# -- counts after a known mix ----------------------------------------------------------------------------

async def test_counts_after_a_known_mix_of_requests(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint(SUBJECT, scope="items:read", client_id=CLIENT)
    assert await status_of(client, "/items", Authorization=f"Bearer {token}") == 200  # cache miss
    assert await status_of(client, "/items", Authorization=f"Bearer {token}") == 200  # cache hit
    assert await status_of(client, f"/users/{SUBJECT}/items", Authorization=f"Bearer {token}") == 200  # hit
    assert await status_of(client, "/items") == 401  # no credentials
    other = issuer.mint(SUBJECT, scope="other", client_id=CLIENT)
    assert await status_of(client, "/items", Authorization=f"Bearer {other}") == 403  # miss, then scope
    expired = issuer.mint(SUBJECT, scope="items:read", client_id=CLIENT, lifetime=-600)
    assert await status_of(client, "/items", Authorization=f"Bearer {expired}") == 401
    assert await status_of(client, "/admin") == 403  # no rule
    assert await status_of(client, "/health") == 200  # public
    assert await status_of(client, "/nowhere") == 404  # no such route: not a decision, not counted

    samples = parse(await scrape_text(client))

    decisions = "ztmw_decisions_total"
    assert value(samples, decisions, decision="allow", reason="allowed", rule_id="read", status="200") == 2
    assert value(samples, decisions, decision="allow", reason="allowed", rule_id="own", status="200") == 1
    assert value(samples, decisions, decision="deny", reason="no_credentials", rule_id="read",
                 status="401") == 1
    assert value(samples, decisions, decision="deny", reason="insufficient_scope", rule_id="read",
                 status="403") == 1
    assert value(samples, decisions, decision="deny", reason="token_expired", rule_id="read",
                 status="401") == 1
    assert value(samples, decisions, decision="deny", reason="no_rule", rule_id="", status="403") == 1
    assert value(samples, decisions, decision="allow", reason="public", rule_id="health", status="200") == 1
    assert total(samples, decisions) == 8  # the scrape in progress is counted once it has been answered
    assert total(samples, decisions, decision="allow") == 4

    assert value(samples, "ztmw_decision_seconds_count", decision="allow", rule_id="read") == 2
    assert total(samples, "ztmw_decision_seconds_count") == 8
    assert value(samples, "ztmw_decision_seconds_bucket", decision="deny", rule_id="", le="+Inf") == 1

    assert value(samples, "ztmw_token_cache_total", result="miss") == 2
    assert value(samples, "ztmw_token_cache_total", result="hit") == 2
    assert value(samples, "ztmw_token_cache_total", result="shared") == 0  # no shared cache configured
    assert value(samples, "ztmw_token_binding_total", binding="bearer") == 4  # verified, allowed or not
    assert value(samples, "ztmw_token_binding_total", binding="dpop") == 0
    assert value(samples, "ztmw_dpop_replays_total") == 0
    assert total(samples, "ztmw_security_events_total") == 0


async def test_replayed_decisions_are_counted_like_fresh_ones(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint(SUBJECT, scope="items:read", client_id=CLIENT)
    statuses = [await status_of(client, "/items", Authorization=f"Bearer {token}") for _ in range(5)]
    assert statuses == [200] * 5  # a miss, a hit, then three decision-memo replays (emit_again)
    samples = parse(await scrape_text(client))
    assert value(samples, "ztmw_decisions_total", decision="allow", reason="allowed", rule_id="read",
                 status="200") == 5
    assert value(samples, "ztmw_decision_seconds_count", decision="allow", rule_id="read") == 5
    assert value(samples, "ztmw_token_cache_total", result="hit") == 4
    assert value(samples, "ztmw_token_binding_total", binding="bearer") == 5


async def test_a_scrape_is_itself_a_counted_decision(client: Any) -> None:
    first = parse(await scrape_text(client))
    assert value(first, "ztmw_decisions_total", decision="allow", reason="public", rule_id="metrics",
                 status="200") == 0
    second = parse(await scrape_text(client))
    assert value(second, "ztmw_decisions_total", decision="allow", reason="public", rule_id="metrics",
                 status="200") == 1


async def test_no_token_subject_or_client_id_appears_in_the_scrape(client: Any, issuer: DevIssuer) -> None:
    token = issuer.mint(SUBJECT, scope="items:read", client_id=CLIENT)
    denied = issuer.mint(SUBJECT, scope="other", client_id=CLIENT)
    for credential in (token, token, denied):
        await status_of(client, "/items", Authorization=f"Bearer {credential}")
    await status_of(client, f"/users/{SUBJECT}/items", Authorization=f"Bearer {token}")
    await status_of(client, "/items", Authorization="Bearer not-a-jwt-but-a-secret")
    text = await scrape_text(client)

    jtis = [json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "=="))["jti"] for t in (token, denied)]
    forbidden = [token, denied, *token.split("."), SUBJECT, hash_subject(SUBJECT), CLIENT, *jtis,
                 issuer.issuer, "not-a-jwt-but-a-secret", f"/users/{SUBJECT}/items"]
    for secret in forbidden:
        assert secret not in text, f"{secret!r} leaked into the scrape"
    samples = parse(text)
    assert total(samples, "ztmw_decisions_total", decision="allow", rule_id="own") == 1  # counted, unnamed
    labels = {name for (_, ls) in samples for name, _ in ls}
    assert labels <= {"decision", "reason", "rule_id", "status", "result", "binding", "le"}


async def test_two_apps_in_one_process_keep_separate_counts(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    first = await protected_client(aiohttp_client, metrics_config(issuer), clock)
    second = await protected_client(aiohttp_client, metrics_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    for _ in range(3):
        assert await status_of(first, "/items", Authorization=f"Bearer {token}") == 200
    assert await status_of(second, "/items") == 401

    one, two = parse(await scrape_text(first)), parse(await scrape_text(second))
    assert value(one, "ztmw_decisions_total", decision="allow", reason="allowed", rule_id="read",
                 status="200") == 3
    assert value(two, "ztmw_decisions_total", decision="allow", reason="allowed", rule_id="read",
                 status="200") == 0
    assert value(two, "ztmw_decisions_total", decision="deny", reason="no_credentials", rule_id="read",
                 status="401") == 1
    assert value(one, "ztmw_token_cache_total", result="hit") == 2
    assert value(two, "ztmw_token_cache_total", result="hit") == 0


# -- the scrape route is protected like any other --------------------------------------------------------

async def test_without_a_rule_the_metrics_route_is_403(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client = await protected_client(aiohttp_client, metrics_config(issuer, rule=None), clock)
    token = issuer.mint(scope="items:read metrics:read")
    for headers in ({}, {"Authorization": f"Bearer {token}"}):
        response = await client.get("/metrics", headers=headers)
        body = await response.text()
        assert response.status == 403
        assert "ztmw_decisions_total" not in body


async def test_a_network_condition_outside_the_peer_denies_the_scrape(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = metrics_config(issuer, plugins={"network": {"allow": ["10.0.0.0/8"]}})
    client = await protected_client(aiohttp_client, config, clock)
    response = await client.get("/metrics")
    assert response.status == 403
    assert "ztmw_decisions_total" not in await response.text()


async def test_scope_protected_scrape_on_a_custom_path(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    rule = {"id": "metrics", "path": "/internal/metrics", "methods": ["GET"], "scopes": ["metrics:read"]}
    config = metrics_config(issuer, rule=rule, plugins={"metrics": {"path": "/internal/metrics"}})
    client = await protected_client(aiohttp_client, config, clock)
    assert await status_of(client, "/metrics") == 404
    assert await status_of(client, "/internal/metrics") == 401
    no_scope = issuer.mint(scope="items:read")
    assert await status_of(client, "/internal/metrics", Authorization=f"Bearer {no_scope}") == 403
    reader = issuer.mint("prometheus", scope="metrics:read")
    samples = parse(await scrape_text(client, "/internal/metrics", Authorization=f"Bearer {reader}"))
    assert value(samples, "ztmw_decisions_total", decision="deny", reason="no_credentials", rule_id="metrics",
                 status="401") == 1
    assert value(samples, "ztmw_decisions_total", decision="deny", reason="insufficient_scope",
                 rule_id="metrics", status="403") == 1


# -- DPoP: replays, security events, binding ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_dpop_replay_downgrade_and_binding_are_counted(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    port = _free_port()
    origin = f"http://127.0.0.1:{port}"
    config = metrics_config(issuer, verifiers={"enabled": ["bearer", "dpop"]})
    config["resource"]["public_origin"] = origin
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    key = DPoPKey()
    token = issuer.mint(SUBJECT, scope="items:read", client_id=CLIENT, cnf={"jkt": key.thumbprint})
    proof = key.proof("GET", origin + "/items", access_token=token, iat=int(clock()))
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    assert await status_of(client, "/items", **headers) == 200
    assert await status_of(client, "/items", **headers) == 401  # the same proof again: a replay
    assert await status_of(client, "/items", Authorization=f"Bearer {token}") == 401  # downgrade

    text = await scrape_text(client)
    samples = parse(text)
    assert value(samples, "ztmw_dpop_replays_total") == 1
    assert value(samples, "ztmw_security_events_total", reason="dpop_replay") == 1
    assert value(samples, "ztmw_security_events_total", reason="dpop_bound_token_as_bearer") == 1
    assert value(samples, "ztmw_token_binding_total", binding="dpop") == 1
    assert value(samples, "ztmw_token_binding_total", binding="bearer") == 0
    assert value(samples, "ztmw_decisions_total", decision="deny", reason="dpop_replay", rule_id="read",
                 status="401") == 1
    for secret in (token, proof, key.thumbprint, SUBJECT, CLIENT):
        assert secret not in text


# -- settings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, fragment", [
    ({"paht": "/metrics"}, "plugins.metrics.paht"),
    ({"path": "metrics"}, "plugins.metrics.path"),
    ({"path": "/metrics/{name}"}, "plugins.metrics.path"),
    ({"path": "/metrics?x=1"}, "plugins.metrics.path"),
    ({"path": 9090}, "plugins.metrics.path"),
])
def test_bad_settings_stop_setup(issuer: DevIssuer, settings: dict[str, Any], fragment: str) -> None:
    config = metrics_config(issuer, plugins={"network": {"allow": ["127.0.0.1/32"]}, "metrics": settings})
    with pytest.raises(ConfigurationError, match=fragment.replace(".", r"\.").replace("?", r"\?")):
        ztmw.setup(web.Application(), config)


# -- the sink alone: never raises, bounded labels ---------------------------------------------------------

def _event(**overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {"decision": "deny", "reason": "no_credentials", "status": 401, "method": "GET",
                              "route": "/items", "rule_id": "read"}
    fields.update(overrides)
    return AuditEvent(**fields)


def test_emit_never_raises_on_odd_events() -> None:
    sink = MetricsSink(rule_ids=["read"])
    sink.emit(None)  # type: ignore[arg-type]
    sink.emit(object())  # type: ignore[arg-type]
    sink.emit(_event(status="teapot", duration_ms=math.nan, decision="maybe", cache="warm", binding="carrier",
                     verifier="bearer", reason="Ünïcode reason with spaces", rule_id=None))
    sink.emit(_event(duration_ms=-1.0, security=True, reason="x" * 1000))
    samples = parse(generate_latest(sink.registry).decode())
    assert value(samples, "ztmw_decisions_total", decision="other", reason="other", rule_id="",
                 status="other") == 1
    assert value(samples, "ztmw_token_binding_total", binding="other") == 1
    assert value(samples, "ztmw_security_events_total", reason="other") == 1
    assert total(samples, "ztmw_decision_seconds_count") == 0  # no usable duration: not observed


def test_label_values_are_bounded_whatever_the_events_say() -> None:
    sink = MetricsSink(rule_ids=["read"])
    for i in range(MAX_LABEL_VALUES * 3):
        sink.emit(_event(reason=f"reason_{i}", rule_id=f"rule_{i}", security=True))
    samples = parse(generate_latest(sink.registry).decode())
    reasons = {dict(ls)["reason"] for (n, ls) in samples if n == "ztmw_decisions_total"}
    rule_ids = {dict(ls)["rule_id"] for (n, ls) in samples if n == "ztmw_decisions_total"}
    assert len(reasons) == MAX_LABEL_VALUES + 1 and "other" in reasons
    assert len(rule_ids) == MAX_LABEL_VALUES + 1 and "other" in rule_ids
    assert total(samples, "ztmw_decisions_total") == MAX_LABEL_VALUES * 3
    sink.emit(_event(rule_id="read"))  # configured rule ids and core reasons always keep their own series
    after = parse(generate_latest(sink.registry).decode())
    assert value(after, "ztmw_decisions_total", decision="deny", reason="no_credentials", rule_id="read",
                 status="401") == 1


def test_cache_results_including_the_shared_tier() -> None:
    sink = MetricsSink()
    for cache in ("hit", "shared", "shared", "miss", None, "warm"):
        sink.emit(_event(decision="allow", reason="allowed", status=200, cache=cache, verifier="bearer"))
    samples = parse(generate_latest(sink.registry).decode())
    counts = {r: value(samples, "ztmw_token_cache_total", result=r)
              for r in ("hit", "shared", "miss", "warm")}
    assert counts == {"hit": 1, "shared": 2, "miss": 1, "warm": 0}


def test_each_sink_has_its_own_registry() -> None:
    one, two = MetricsSink(), MetricsSink()
    assert one.registry is not two.registry
    one.emit(_event())
    assert "ztmw_decisions_total{" in generate_latest(one.registry).decode()
    assert "ztmw_decisions_total{" not in generate_latest(two.registry).decode()
