"""Is this TCP peer inside these networks? One answer for trusted proxies and for the `network` condition.

Peers come from the socket as text: IPv4, IPv6 (perhaps with a zone id, perhaps in brackets), or an IPv4 peer
on a dual-stack listener reported as `::ffff:a.b.c.d`; that last one must match the IPv4 networks it is in.
An unparseable peer (a Unix socket, nothing at all) is inside no network: callers fail closed.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def peer_address(peer: str | None) -> IPAddress | None:
    """The peer as an address (zone id dropped), or None when it is not an IP address."""
    if not isinstance(peer, str) or not peer:
        return None
    try:
        address = ipaddress.ip_address(peer.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    return address


def peer_in(peer: str | None, networks: Iterable[IPNetwork]) -> bool:
    """Whether the peer lies in one of `networks` (an IPv4-mapped IPv6 peer also counts as its IPv4 self)."""
    address = peer_address(peer)
    if address is None:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    for network in networks:
        if network.version == address.version and address in network:
            return True
        if mapped is not None and network.version == 4 and mapped in network:
            return True
    return False
