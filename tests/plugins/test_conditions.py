"""The `network` and `time-window` conditions: end to end through `ztmw.setup` on real servers and clients.

A rule names its conditions (`conditions = [...]`); each plugin gets its `[plugins.<name>]` table. A condition
that says no is a 403 `condition_failed`, on public rules too and before credentials matter. Time comes from a
FakeClock handed to `ztmw.setup(clock=...)`, so windows are crossed by moving the clock, never by waiting.
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from ztmw_plugins.conditions import create_network

import ztmw
from ztmw.errors import ConfigurationError
from ztmw.models import AuditEvent, RequestView
from ztmw.testing import DevIssuer, FakeClock
from ztmw.typing import PluginDeps

from ..conftest import base_config, items_app

OSLO = ZoneInfo("Europe/Oslo")
OFFICE_HOURS = {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00",
                "timezone": "Europe/Oslo"}
NIGHT_SHIFT = {"days": ["fri"], "start": "22:00", "end": "06:00", "timezone": "Europe/Oslo"}


def oslo(stamp: str) -> float:
    """Seconds since the epoch of a wall-clock time in Oslo, e.g. "2024-06-05 10:00" (a Wednesday)."""
    return datetime.fromisoformat(stamp).replace(tzinfo=OSLO).timestamp()


@pytest.fixture
def clock() -> FakeClock:  # overrides conftest's: a fixed Wednesday morning in Oslo (summer time)
    return FakeClock(oslo("2024-06-05 10:00"))


class Recorder:
    """An audit sink that keeps the events, so a test can tell which check refused a request."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    @property
    def last(self) -> AuditEvent:
        return self.events[-1]


def conditions_config(issuer: DevIssuer, conditions: list[str], plugins: dict[str, Any],
                      **rule: Any) -> dict[str, Any]:
    config = base_config(issuer, plugins=plugins)
    config["rules"] = [*config["rules"], {"id": "admin", "path": "/admin", "methods": ["GET"],
                                          "conditions": conditions, **(rule or {"public": True})}]
    return config


async def start(aiohttp_client: Any, config: dict[str, Any], clock: FakeClock) -> tuple[Any, Recorder]:
    app = items_app()
    recorder = Recorder()
    ztmw.setup(app, config, clock=clock, audit_sink=recorder)
    return await aiohttp_client(app), recorder


async def status_of(client: Any, path: str = "/admin", **headers: str) -> int:
    response = await client.get(path, headers=headers)
    await response.read()
    return int(response.status)


# -- network ---------------------------------------------------------------------------------------------

async def test_network_allows_a_peer_inside_an_allowed_network(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = conditions_config(issuer, ["network"], {"network": {"allow": ["10.0.0.0/8", "127.0.0.1/32"]}})
    client, audit = await start(aiohttp_client, config, clock)
    assert await status_of(client) == 200
    assert (audit.last.reason, audit.last.rule_id) == ("public", "admin")


async def test_network_denies_a_peer_outside_with_403(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = conditions_config(issuer, ["network"], {"network": {"allow": ["10.0.0.0/8"]}})
    client, audit = await start(aiohttp_client, config, clock)
    response = await client.get("/admin")
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers
    assert await response.json() == {"error": "access_denied"}
    assert (audit.last.reason, audit.last.failed_requirement) == ("condition_failed", "condition=network")
    assert await status_of(client, "/health") == 200  # rules without the condition are untouched


async def test_network_applies_before_credentials_on_a_protected_rule(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    token = issuer.mint(scope="admin")
    inside = conditions_config(issuer, ["network"], {"network": {"allow": ["127.0.0.0/8"]}}, scopes=["admin"])
    client, _ = await start(aiohttp_client, inside, clock)
    assert await status_of(client) == 401
    assert await status_of(client, Authorization=f"Bearer {token}") == 200
    outside = conditions_config(issuer, ["network"], {"network": {"allow": ["192.168.0.0/16"]}},
                                scopes=["admin"])
    client, audit = await start(aiohttp_client, outside, clock)
    assert await status_of(client, Authorization=f"Bearer {token}") == 403  # a valid token does not help
    assert audit.last.reason == "condition_failed"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


async def _serve_on(sock: socket.socket, app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("allow, expected", [(["127.0.0.1/32"], 200), (["::ffff:127.0.0.0/104"], 200),
                                             (["10.0.0.0/8"], 403)])
async def test_network_matches_ipv4_mapped_peers_of_a_dual_stack_socket(
    issuer: DevIssuer, clock: FakeClock, allow: list[str], expected: int
) -> None:
    app = items_app()
    ztmw.setup(app, conditions_config(issuer, ["network"], {"network": {"allow": allow}}), clock=clock)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients arrive as ::ffff:a.b.c.d
    sock.bind(("::", 0))
    port = sock.getsockname()[1]

    @web.middleware
    async def peer_header(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["X-Peer"] = str(request.remote)
        return response

    app.middlewares.insert(0, peer_header)
    runner = await _serve_on(sock, app)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/admin") as response:
                await response.read()
                assert response.headers["X-Peer"] == "::ffff:127.0.0.1"  # the case under test really happened
                assert response.status == expected
    finally:
        await runner.cleanup()


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_network_over_ipv6_loopback(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    for allow, expected in ((["::1/128"], 200), (["127.0.0.1/32", "fd00::/8"], 403)):
        app = items_app()
        ztmw.setup(app, conditions_config(issuer, ["network"], {"network": {"allow": allow}}), clock=clock)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
        runner = await _serve_on(sock, app)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://[::1]:{port}/admin") as response:
                    await response.read()
                    assert response.status == expected, allow
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("peer, allowed", [
    ("10.1.2.3", True), ("127.0.0.1", True), ("11.0.0.1", False),
    ("::ffff:10.1.2.3", True), ("::ffff:11.0.0.1", False), ("2001:db8::7", True), ("2001:db9::7", False),
    ("fe80::1%eth0", True), (None, False), ("", False), ("not-an-address", False), ("10.1.2.3:443", False),
    ("/run/app.sock", False),
])
def test_network_peer_forms(issuer_free_deps: PluginDeps, peer: str | None, allowed: bool) -> None:
    condition = create_network({"allow": ["10.0.0.0/8", "127.0.0.1/32", "2001:db8::/32", "fe80::/10"]},
                               issuer_free_deps)
    request = RequestView(method="GET", path="/admin", route=None, peer=peer)
    assert condition.check(None, ztmw.TrustAssessment(), request) is allowed


@pytest.fixture
def issuer_free_deps() -> PluginDeps:
    """The deps a condition factory is handed; `network` uses none of them."""
    issuer = {"issuer": "https://as.example.com", "jwks_uri": "https://as.example.com/jwks"}
    config = ztmw.load_config({"resource": {"identifier": "https://api.example.com"}, "issuers": [issuer]})

    def no_http() -> Any:
        raise RuntimeError("not started")

    return PluginDeps(config=config, clock=FakeClock(0), http=no_http, logger=None)


# -- time window ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("now, expected", [
    ("2024-06-05 10:00", 200),  # Wednesday, inside
    ("2024-06-05 08:00", 200),  # start is inclusive
    ("2024-06-05 07:59", 403),
    ("2024-06-05 17:59", 200),
    ("2024-06-05 18:00", 403),  # end is exclusive
    ("2024-06-08 10:00", 403),  # Saturday
    ("2024-06-09 10:00", 403),  # Sunday
    ("2024-01-10 08:30", 200),  # winter time (UTC+1) as well as summer time (UTC+2): local wall clock
    ("2024-01-10 07:30", 403),
])
async def test_time_window_office_hours(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, now: str, expected: int
) -> None:
    client, audit = await start(aiohttp_client, conditions_config(
        issuer, ["time-window"], {"time-window": OFFICE_HOURS}), clock)
    clock.now = oslo(now)
    assert await status_of(client) == expected
    if expected == 403:
        assert audit.last.reason == "condition_failed"
        assert audit.last.failed_requirement == "condition=time-window"


async def test_time_window_follows_the_clock_of_one_running_app(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await start(aiohttp_client, conditions_config(
        issuer, ["time-window"], {"time-window": OFFICE_HOURS}), clock)
    assert await status_of(client) == 200
    clock.advance(8 * 3600)  # Wednesday 18:00
    assert await status_of(client) == 403
    clock.advance(14 * 3600)  # Thursday 08:00
    assert await status_of(client) == 200


@pytest.mark.parametrize("now, expected", [
    ("2024-06-07 22:00", 200),  # Friday night, the window opens
    ("2024-06-07 23:59", 200),
    ("2024-06-08 00:00", 200),  # past midnight: still Friday's window
    ("2024-06-08 05:59", 200),
    ("2024-06-08 06:00", 403),  # closed
    ("2024-06-07 02:00", 403),  # early Friday belongs to Thursday's window, and Thursday is not listed
    ("2024-06-07 21:59", 403),
    ("2024-06-08 22:30", 403),  # Saturday night is not listed
])
async def test_time_window_crossing_midnight(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, now: str, expected: int
) -> None:
    client, _ = await start(aiohttp_client, conditions_config(
        issuer, ["time-window"], {"time-window": NIGHT_SHIFT}), clock)
    clock.now = oslo(now)
    assert await status_of(client) == expected


async def test_time_window_defaults_to_utc_and_every_day(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await start(aiohttp_client, conditions_config(
        issuer, ["time-window"], {"time-window": {"start": "00:00", "end": "12:00"}}), clock)
    clock.now = datetime.fromisoformat("2024-06-09 11:59+00:00").timestamp()  # a Sunday, 13:59 in Oslo
    assert await status_of(client) == 200
    clock.now = datetime.fromisoformat("2024-06-09 12:00+00:00").timestamp()
    assert await status_of(client) == 403


async def test_whole_day_window_with_24_00(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> None:
    client, _ = await start(aiohttp_client, conditions_config(
        issuer, ["time-window"], {"time-window": {"days": ["wed"], "start": "00:00", "end": "24:00"}}), clock)
    assert await status_of(client) == 200
    clock.now = datetime.fromisoformat("2024-06-05 23:59:59+00:00").timestamp()
    assert await status_of(client) == 200
    clock.now = datetime.fromisoformat("2024-06-06 00:00+00:00").timestamp()
    assert await status_of(client) == 403


async def test_conditions_combine_and_every_one_must_hold(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    plugins = {"network": {"allow": ["127.0.0.1/32"]}, "time-window": OFFICE_HOURS}
    config = conditions_config(issuer, ["network", "time-window"], plugins)
    client, audit = await start(aiohttp_client, config, clock)
    assert await status_of(client) == 200
    clock.now = oslo("2024-06-08 10:00")
    assert await status_of(client) == 403
    assert audit.last.failed_requirement == "condition=time-window"


async def test_a_condition_that_cannot_read_the_clock_fails_closed_with_503(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, audit = await start(aiohttp_client, conditions_config(
        issuer, ["time-window"], {"time-window": OFFICE_HOURS}), clock)
    clock.now = float("inf")
    assert await status_of(client) == 503
    assert audit.last.reason == "plugin_error"


# -- settings are checked at start-up ----------------------------------------------------------------------

@pytest.mark.parametrize("name, settings, fragment", [
    ("network", {}, "plugins.network.allow: required"),
    ("network", {"allow": []}, "plugins.network.allow: must not be empty"),
    ("network", {"allow": "10.0.0.0/8"}, "plugins.network.allow: must be a list"),
    ("network", {"allow": [10]}, "plugins.network.allow: must be a list"),
    ("network", {"allow": ["10.0.0.1/8"]}, "'10.0.0.1/8' is not a network"),  # host bits: ambiguous
    ("network", {"allow": ["10.0.0.0/33"]}, "'10.0.0.0/33' is not a network"),
    ("network", {"allow": ["office"]}, "'office' is not a network"),
    ("network", {"allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"]}, "unknown key plugins.network.deny"),
    ("time-window", {"end": "18:00"}, "plugins.time-window.start: required"),
    ("time-window", {"start": "08:00"}, "plugins.time-window.end: required"),
    ("time-window", {"start": "8:00", "end": "18:00"}, "plugins.time-window.start: '8:00'"),
    ("time-window", {"start": "08:00", "end": "18:60"}, "plugins.time-window.end: '18:60'"),
    ("time-window", {"start": "24:00", "end": "06:00"}, "plugins.time-window.start: '24:00'"),
    ("time-window", {"start": "08:00:00", "end": "18:00"}, "plugins.time-window.start"),
    ("time-window", {"start": 8, "end": "18:00"}, "plugins.time-window.start: must be a string"),
    ("time-window", {"start": "08:00", "end": "08:00"}, "start and end are equal"),
    ("time-window", {"start": "08:00", "end": "18:00", "days": ["monday"]}, "unknown day 'monday'"),
    ("time-window", {"start": "08:00", "end": "18:00", "days": ["Mon"]}, "unknown day 'Mon'"),
    ("time-window", {"start": "08:00", "end": "18:00", "days": []}, "plugins.time-window.days: must not be"),
    ("time-window", {"start": "08:00", "end": "18:00", "days": "mon"}, "plugins.time-window.days: must be"),
    ("time-window", {"start": "08:00", "end": "18:00", "days": ["mon", "mon"]}, "listed twice"),
    ("time-window", {"start": "08:00", "end": "18:00", "timezone": "Mars/Olympus"}, "unknown time zone"),
    ("time-window", {"start": "08:00", "end": "18:00", "timezone": "../etc/passwd"}, "unknown time zone"),
    ("time-window", {"start": "08:00", "end": "18:00", "timezone": ""}, "plugins.time-window.timezone"),
    ("time-window", {"start": "08:00", "end": "18:00", "tz": "UTC"}, "unknown key plugins.time-window.tz"),
])
def test_bad_settings_stop_setup(
    issuer: DevIssuer, clock: FakeClock, name: str, settings: dict[str, Any], fragment: str
) -> None:
    config = conditions_config(issuer, [name], {name: settings})
    with pytest.raises(ConfigurationError) as raised:
        ztmw.setup(web.Application(), config, clock=clock)
    assert fragment in str(raised.value)


def test_unknown_condition_name_stops_setup_naming_it(issuer: DevIssuer, clock: FakeClock) -> None:
    config = conditions_config(issuer, ["office-hours"], {})
    with pytest.raises(ConfigurationError) as raised:
        ztmw.setup(web.Application(), config, clock=clock)
    message = str(raised.value)
    assert "'office-hours'" in message and "ztmw.conditions" in message
    assert "network" in message and "time-window" in message  # what is available instead


def test_settings_of_conditions_no_rule_names_are_not_loaded(issuer: DevIssuer, clock: FakeClock) -> None:
    """Plugins load only by the names rules list: a table for an unused condition is not even checked."""
    config = base_config(issuer, plugins={"time-window": {"start": "bogus"}})
    ztmw.setup(web.Application(), config, clock=clock)
