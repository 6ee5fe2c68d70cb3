"""First-party policy conditions (entry points in `ztmw.conditions`): `network` and `time-window`.

A rule lists them by name (`conditions = ["network"]`); each gets its `[plugins.<name>]` table and checks it
strictly at start-up, so a typo stops the app instead of silently allowing or denying. At request time a
condition answers True or False only: anything it cannot read (no peer address, an unparseable one) is
False, which the policy turns into a 403. Conditions apply to public rules too ("from the office network").

    [plugins.network]
    allow = ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]

    [plugins.time-window]
    days = ["mon", "tue", "wed", "thu", "fri"]   # default: every day
    start = "08:00"                              # inclusive, local wall-clock time
    end = "18:00"                                # exclusive; "24:00" is the end of the day
    timezone = "Europe/Oslo"                     # IANA name (zoneinfo); default "UTC"

`network` looks at the address of the TCP peer (`RequestView.peer`), never at `X-Forwarded-For`: behind a
reverse proxy the peer is the proxy, so list the proxy's address only if everything it forwards may pass.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from datetime import time as dtime
from typing import Any, Mapping, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ztmw.config import check_plugin_settings
from ztmw.errors import ConfigurationError
from ztmw.models import Principal, RequestView, TrustAssessment
from ztmw.netaddr import IPNetwork, peer_in
from ztmw.typing import Clock, PluginDeps

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_HHMM = re.compile(r"(?:[01]\d|2[0-3]):[0-5]\d")
MINUTES_PER_DAY = 24 * 60


def _only(settings: Mapping[str, Any], section: str, allowed: Sequence[str]) -> None:
    check_plugin_settings(settings, section, allowed)


def _string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{key}: must be a list of strings")
    if not value:
        raise ConfigurationError(f"{key}: must not be empty")
    return list(value)


# -- network ---------------------------------------------------------------------------------------------

class NetworkCondition:
    """True when the request's peer address lies inside one of the allowed networks.

    An IPv4-mapped IPv6 peer (`::ffff:10.1.2.3`, what a dual-stack socket reports for IPv4 clients) is
    matched as the IPv4 address it carries, as well as against IPv6 networks as written.
    """

    name = "network"

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(networks)

    def allows(self, peer: str | None) -> bool:
        return peer_in(peer, self.networks)

    def check(self, principal: Principal | None, trust: TrustAssessment, request: RequestView) -> bool:
        return self.allows(request.peer)


def parse_networks(value: Any, key: str) -> list[IPNetwork]:
    """CIDRs (or single addresses), strictly: `10.0.0.1/8` has host bits set and is refused as ambiguous."""
    networks: list[IPNetwork] = []
    for cidr in _string_list(value, key):
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=True))
        except ValueError as exc:
            raise ConfigurationError(f"{key}: {cidr!r} is not a network in CIDR notation ({exc})") from None
    return networks


def create_network(settings: Mapping[str, Any], deps: PluginDeps) -> NetworkCondition:
    """Entry point `network` in `ztmw.conditions`."""
    _only(settings, "network", ("allow",))
    if "allow" not in settings:
        raise ConfigurationError("plugins.network.allow: required (a list of CIDRs such as \"10.0.0.0/8\")")
    return NetworkCondition(parse_networks(settings["allow"], "plugins.network.allow"))


# -- time window -----------------------------------------------------------------------------------------

class TimeWindowCondition:
    """True inside a weekly window of local wall-clock time, read from the injected clock.

    `start` is inclusive and `end` exclusive, in minutes since local midnight. When `end` is before `start`
    the window crosses midnight and belongs to the day it starts on: `days = ["fri"]`, 22:00-06:00 covers
    Friday 22:00 to Saturday 06:00 (and not Friday 02:00).
    """

    name = "time-window"

    def __init__(self, *, days: frozenset[int], start: int, end: int, zone: ZoneInfo, clock: Clock) -> None:
        self.days = days
        self.start = start
        self.end = end
        self.zone = zone
        self._clock = clock

    def allows_at(self, timestamp: float) -> bool:
        local = datetime.fromtimestamp(timestamp, self.zone)
        minute = local.hour * 60 + local.minute
        weekday = local.weekday()
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        yesterday = (weekday - 1) % 7
        if weekday in self.days and minute >= self.start:
            return True
        return yesterday in self.days and minute < self.end

    def check(self, principal: Principal | None, trust: TrustAssessment, request: RequestView) -> bool:
        return self.allows_at(self._clock())


def _minutes(value: Any, key: str, *, allow_end_of_day: bool = False) -> int:
    if not isinstance(value, str):
        raise ConfigurationError(f"{key}: must be a string \"HH:MM\"")
    if allow_end_of_day and value == "24:00":
        return MINUTES_PER_DAY
    if not _HHMM.fullmatch(value):
        raise ConfigurationError(f"{key}: {value!r} is not a 24-hour time \"HH:MM\" (00:00 to 23:59)")
    parsed = dtime.fromisoformat(value)
    return parsed.hour * 60 + parsed.minute


def _zone(value: Any, key: str) -> ZoneInfo:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{key}: must be an IANA time zone name such as \"Europe/Oslo\"")
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigurationError(
            f"{key}: unknown time zone {value!r} (use an IANA name such as \"Europe/Oslo\")"
        ) from None


def create_time_window(settings: Mapping[str, Any], deps: PluginDeps) -> TimeWindowCondition:
    """Entry point `time-window` in `ztmw.conditions`."""
    section = "plugins.time-window"
    _only(settings, "time-window", ("days", "start", "end", "timezone"))
    for required in ("start", "end"):
        if required not in settings:
            raise ConfigurationError(f"{section}.{required}: required (a time \"HH:MM\")")
    names = _string_list(settings.get("days", list(DAYS)), f"{section}.days")
    unknown = [d for d in names if d not in DAYS]
    if unknown:
        raise ConfigurationError(f"{section}.days: unknown day {unknown[0]!r} (use {', '.join(DAYS)})")
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{section}.days: a day is listed twice")
    start = _minutes(settings["start"], f"{section}.start")
    end = _minutes(settings["end"], f"{section}.end", allow_end_of_day=True)
    if start == end:
        raise ConfigurationError(f"{section}: start and end are equal; the window would be empty or the "
                                 "whole day (for the whole day use start = \"00:00\", end = \"24:00\")")
    return TimeWindowCondition(
        days=frozenset(DAYS.index(d) for d in names),
        start=start,
        end=end,
        zone=_zone(settings.get("timezone", "UTC"), f"{section}.timezone"),
        clock=deps.clock,
    )
