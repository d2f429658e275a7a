"""Client addresses as the edge reasons about them (pure, no I/O).

A dual-stack listener (``[::]:443``, the default) reports IPv4
peers as IPv4-mapped IPv6 addresses, ``::ffff:203.0.113.9`` (RFC 4291 section
2.5.5.2). Everything that compares, limits, forwards or stores a client address
(``proxy.trusted_hops``, the rate limits, ``X-Forwarded-For``,
``privacy.ip_retention``, the logs) must see ``203.0.113.9``: the same visitor
whether it came through a dual-stack or an IPv4 socket, an IPv4 CIDR in
``trusted_hops`` that matches, and a /24 truncation instead of an IPv6 /48 one.
"""

from __future__ import annotations

import ipaddress

__all__ = ["normalize_ip"]


def normalize_ip(address: str) -> str:
    """``::ffff:a.b.c.d`` -> ``a.b.c.d``; anything else unchanged (not an IP included)."""
    if ":" not in address or "." not in address:
        # Fast path, every request: an IPv4-mapped address is the only form with both
        # (plain IPv4 has no ":", plain IPv6 no "."); ipaddress parsing costs ~3 us.
        return address
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address
