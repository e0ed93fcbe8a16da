"""When certificates are ordered (relay/certs/plan.py): renewal 30 days before the end,
failed orders retried after a growing wait, the hosts that get one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.certs import plan
from relay.certs.plan import DAY, FAILED, RETRY_SECONDS, VALID, Certificate

NOW = 1_800_000_000.0


@given(days_left=st.floats(min_value=-400, max_value=400, allow_nan=False))
def test_a_valid_certificate_is_due_30_days_before_its_end(days_left: float) -> None:
    cert = Certificate("t.example", VALID, "pem", "key", NOW + days_left * DAY)
    assert plan.due(cert, NOW) == (days_left <= 30)


def test_no_certificate_yet_is_due_at_once() -> None:
    assert plan.due(None, NOW)


@given(failures=st.integers(min_value=0, max_value=20))
def test_a_failed_order_waits_longer_each_time_up_to_the_last_step(failures: int) -> None:
    before = Certificate("t.example", FAILED, failures=failures)
    after = plan.failed(before, "t.example", "refused", NOW)
    wait = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
    assert (after.failures, after.next_try, after.reason) == (failures + 1, NOW + wait, "refused")
    assert not plan.due(after, NOW + wait - 1)
    assert plan.due(after, NOW + wait)


def test_a_failed_renewal_keeps_the_certificate_it_had() -> None:
    valid = Certificate("t.example", VALID, "pem", "key", NOW + 10 * DAY)
    after = plan.failed(valid, "t.example", "timeout", NOW)
    assert (after.state, after.cert_pem, after.key_pem) == (FAILED, "pem", "key")
    assert after.usable(NOW) and not after.usable(NOW + 11 * DAY)


def test_wanted_hosts_are_dns_names_each_once() -> None:
    assert plan.wanted(["Track.Example.", None, "127.0.0.1", "[::1]", "track.example",
                        "t.shop.example"]) == ["track.example", "t.shop.example"]


def test_names_no_ca_can_reach_get_no_certificate() -> None:
    assert plan.wanted(["localhost", "LOCALHOST.", "relay", "a.localhost", "t.example"]) == [
        "t.example"]
