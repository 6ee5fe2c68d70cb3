"""One peer-in-networks answer for trusted proxies and the network condition."""

from __future__ import annotations

import ipaddress

import pytest

from ztmw.netaddr import peer_address, peer_in

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


@pytest.mark.parametrize("peer, inside", [
    ("10.1.2.3", True),
    ("::ffff:10.1.2.3", True),  # an IPv4 peer on a dual-stack listener
    ("[2001:db8::1]", True),
    ("2001:db8::1%eth0", True),
    ("11.0.0.1", False),
    ("::ffff:11.0.0.1", False),
    ("2001:db9::1", False),
    ("", False),
    (None, False),
    ("/run/app.sock", False),
    ("10.1.2.3.4", False),
])
def test_peer_in(peer: str | None, inside: bool) -> None:
    assert peer_in(peer, NETS) is inside


def test_peer_address_drops_brackets_and_zone() -> None:
    assert str(peer_address("[fe80::1%eth0]")) == "fe80::1"
    assert peer_address("localhost") is None
