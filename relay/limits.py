"""Connection limits any listener can use (pure, no I/O): connections in total and per
client (:func:`client_key`: an IPv4 address, an IPv6 one by its /64).

:class:`ConnectionLimits` is the bookkeeping only; each service decides what a refusal looks
like (HTTP: ``503`` with ``Retry-After``, relay/http_site.py). Addresses are the socket's
peer, never a header: a limit a client can talk its way around is no limit. Log refusals
through relay/throttle.py: a flood of them must not become a flood of log lines.
"""

from __future__ import annotations

import ipaddress

from relay.addresses import Network, parse_ip

TOTAL = "total"
PER_IP = "per_ip"


def client_key(ip: str | None) -> str | None:
    """The client a limit is kept for (connections here, failed logins in
    relay/smtp/guard.py): an IPv4 address, IPv4-mapped IPv6 unwrapped; an IPv6 address by its
    /64, which one machine usually holds whole (counted per address, one machine would open a
    limit's worth per address); anything else (a Unix socket) as written."""
    address = parse_ip(ip)
    return ip if address is None else _address_key(address)


def _address_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionLimits:
    """Open connections, counted in total and per client (:func:`client_key`).

    ``admit(ip)`` takes a slot or says which limit refused it (:data:`TOTAL`, :data:`PER_IP`);
    every admitted connection must be released exactly once. Addresses in ``exempt`` (trusted
    reverse proxies, which carry many clients on their connections; the networks allowed to
    relay over SMTP, an application's connection pool) have no per-client limit but count
    towards the total.
    """

    def __init__(self, total: int, per_ip: int, exempt: tuple[Network, ...] = ()) -> None:
        self.total = total
        self.per_ip = per_ip
        self.exempt = exempt
        self.open = 0
        self._by_ip: dict[str, int] = {}

    def admit(self, ip: str | None) -> str | None:
        """None when the connection may stay (its slot is taken), else the limit it hit."""
        if self.open >= self.total:
            return TOTAL
        key = self._key(ip)
        if key is not None:
            held = self._by_ip.get(key, 0)
            if held >= self.per_ip:
                return PER_IP
            self._by_ip[key] = held + 1
        self.open += 1
        return None

    def release(self, ip: str | None) -> None:
        self.open -= 1
        key = self._key(ip)
        if key is not None:
            held = self._by_ip[key] - 1
            if held:
                self._by_ip[key] = held
            else:
                del self._by_ip[key]

    def held(self, ip: str | None) -> int:
        """Connections open from ``ip``'s client (0 for an exempt address)."""
        key = self._key(ip)
        return 0 if key is None else self._by_ip.get(key, 0)

    def _key(self, ip: str | None) -> str | None:
        """The address as counted, or None when it has no per-address limit."""
        address = parse_ip(ip)
        if address is None:
            return ip  # not an IP (a Unix socket): counted as written
        if any(address in net for net in self.exempt):
            return None
        return _address_key(address)
