"""relay.limits: connection bookkeeping (pure)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from relay.limits import PER_IP, TOTAL, ConnectionLimits, client_key
from relay.smtp.guard import peer_key

ADDRESSES = ["192.0.2.1", "192.0.2.2", "::ffff:192.0.2.1", "2001:db8::1", "10.0.0.1", None]


@given(st.integers(1, 6), st.integers(1, 4),
       st.lists(st.tuples(st.booleans(), st.sampled_from(ADDRESSES)), max_size=80))
def test_limits_hold_whatever_the_order(total: int, per_ip: int,
                                        steps: list[tuple[bool, str | None]]) -> None:
    """Connections come and go in any order: the counts never pass either limit, a refusal
    names the limit that was full, and releasing everything leaves nothing behind."""
    limits = ConnectionLimits(total, per_ip,
                              exempt=(ipaddress.ip_network("10.0.0.0/8"),))
    held: list[str | None] = []
    for connect, ip in steps:
        if not connect and held:
            limits.release(held.pop(0))
            continue
        refused = limits.admit(ip)
        if refused is None:
            held.append(ip)
        elif refused == TOTAL:
            assert len(held) == total
        else:
            assert refused == PER_IP and limits.held(ip) == per_ip
        assert limits.open == len(held) <= total
        for address in ADDRESSES:
            assert limits.held(address) <= per_ip
    for ip in held:
        limits.release(ip)
    assert limits.open == 0 and not any(limits.held(a) for a in ADDRESSES)


def test_a_mapped_address_is_the_ipv4_address() -> None:
    limits = ConnectionLimits(10, 1)
    assert limits.admit("192.0.2.1") is None
    assert limits.admit("::ffff:192.0.2.1") == PER_IP


def test_trusted_proxies_have_no_per_address_limit_but_count_in_total() -> None:
    limits = ConnectionLimits(3, 1, exempt=(ipaddress.ip_network("10.0.0.0/8"),))
    assert [limits.admit("10.1.1.1") for _ in range(3)] == [None, None, None]
    assert limits.admit("10.1.1.1") == TOTAL


def test_an_ipv6_client_is_counted_by_its_64_as_the_smtp_auth_budget_counts_it() -> None:
    """One machine usually holds a whole /64: counted per address, it opened 1000 HTTP
    connections where per_ip allows 200."""
    limits = ConnectionLimits(10000, 200)
    admitted = [limits.admit(f"2001:db8:1:2::{i:x}") for i in range(1, 1001)]
    assert admitted.count(None) == 200 and set(admitted[200:]) == {PER_IP}
    assert limits.admit("2001:db8:1:3::1") is None  # the next /64 is another client
    assert limits.held("2001:db8:1:2:ffff::9") == 200
    assert client_key("2001:db8:1:2:ffff::9") == peer_key(("2001:db8:1:2::1", 25, 0, 0)) \
        == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1") == peer_key(("192.0.2.1", 25)) == "192.0.2.1"
