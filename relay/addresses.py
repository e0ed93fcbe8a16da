"""Client addresses as every listener and the classifier read them (pure): a configured
network's type and one parser, which unwraps IPv4-mapped IPv6 so that ``::ffff:192.0.2.1``
is compared and counted as ``192.0.2.1`` everywhere."""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, IPv4-mapped IPv6 unwrapped; None for anything that is not one."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
