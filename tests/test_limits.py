"""relay.limits: connection bookkeeping (pure)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from relay.limits import PER_IP, TOTAL, ConnectionLimits

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
