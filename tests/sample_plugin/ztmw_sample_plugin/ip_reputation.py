"""The `ip-reputation` trust evaluator: a caller on a denied network gets authentication level 0.

    [trust]
    evaluators = ["mapping", "ip-reputation"]   # after "mapping": each evaluator refines the one before

    [plugins.ip-reputation]
    deny = ["203.0.113.0/24", "2001:db8:bad::/48"]

A token says how the user logged in; it does not say the request comes from where the user is. When the peer
address is on the deny list, this evaluator lowers `aal` to 0, so every rule with `min_aal` answers with a
step-up challenge while rules without trust requirements keep working, and it records why in `inputs`, so the
audit trail explains the decision. It never raises `aal`, never touches the other axes, and a peer it cannot
parse is left as it was (with a note): a deny list can only take trust away.

The peer is the TCP peer ztmw saw (`RequestView.peer`), never a forwarded-for header, which anyone can write.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Mapping

from ztmw import ConfigurationError, Principal, RequestView, TrustAssessment
from ztmw.typing import PluginDeps

NAME = "ip-reputation"
_SETTINGS = frozenset({"deny"})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class IpReputationEvaluator:
    """A `ztmw.typing.TrustEvaluator`: pure, synchronous, never raises for any peer string."""

    name = NAME

    def __init__(self, deny: tuple[Network, ...]) -> None:
        self._deny = deny

    def evaluate(
        self, principal: Principal | None, request: RequestView, current: TrustAssessment
    ) -> TrustAssessment:
        if request.peer is None:
            return current
        address = _address(request.peer)
        if address is None:
            return dataclasses.replace(current, inputs=(*current.inputs, "ip_reputation=unparsable_peer"))
        network = next((n for n in self._deny if address.version == n.version and address in n), None)
        if network is None:
            return current
        return dataclasses.replace(current, aal=0, inputs=(*current.inputs, f"ip_reputation=deny:{network}"))


def _address(peer: str) -> Address | None:
    """The peer as an address; an IPv4-mapped IPv6 address counts as the IPv4 address it carries."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])  # drop an IPv6 zone id (fe80::1%eth0)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def create(settings: Mapping[str, Any], deps: PluginDeps) -> IpReputationEvaluator:
    """Entry point `ztmw.trust_evaluators: ip-reputation`; `settings` is `[plugins.ip-reputation]`."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ConfigurationError(f"plugins.{NAME}: unknown key {unknown[0]!r}")
    deny = settings.get("deny")
    if not isinstance(deny, list) or not all(isinstance(cidr, str) for cidr in deny):
        raise ConfigurationError(f"plugins.{NAME}.deny: must be an array of CIDR strings")
    networks: list[Network] = []
    for cidr in deny:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=True))
        except ValueError:
            raise ConfigurationError(f"plugins.{NAME}.deny: {cidr!r} is not a CIDR network") from None
    return IpReputationEvaluator(tuple(networks))
