"""Queue mode's pure decisions: the verdict on an attempt, the retry schedule, the rate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.queue import schedule
from relay.queue.rate import TokenBucket

RETRY = (60.0, 300.0, 900.0)
NOW = 1_800_000_000.0
LATER = NOW + 72 * 3600


def test_2xx_is_sent_5xx_is_given_up_at_once():
    assert schedule.judge(250, "ok", 1, NOW, LATER, RETRY) == schedule.Verdict(schedule.SENT)
    assert schedule.judge(550, "5.1.1 no such user", 1, NOW, LATER, RETRY) == \
        schedule.Verdict(schedule.BOUNCED, schedule.PERMANENT)


def test_the_schedule_is_followed_and_its_last_wait_repeats():
    waits = [schedule.judge(451, "busy", n, NOW, LATER, RETRY).next_at - NOW
             for n in range(1, 6)]
    assert waits == [60, 300, 900, 900, 900]


def test_a_wait_the_reply_names_wins_within_bounds():
    assert schedule.hinted_wait("454 Throttling, try again in 30 seconds") == 30
    assert schedule.hinted_wait("421 please retry after 2 minutes") == 120
    assert schedule.hinted_wait("451 Try again in 5 h") == 3600  # at most an hour
    assert schedule.hinted_wait("451 4.3.0 busy") is None
    verdict = schedule.judge(454, "try again in 30 seconds", 4, NOW, LATER, RETRY)
    assert verdict.next_at == NOW + 30


def test_no_retry_is_planned_past_the_expiry_and_a_failure_there_expires():
    expires = NOW + 30
    assert schedule.judge(451, "busy", 1, NOW, expires, RETRY).next_at == expires
    assert schedule.judge(451, "busy", 2, expires, expires, RETRY) == \
        schedule.Verdict(schedule.BOUNCED, schedule.EXPIRED)
    assert schedule.judge(250, "ok", 2, expires + 1, expires, RETRY).state == schedule.SENT


@given(st.integers(100, 599), st.integers(1, 50), st.floats(0, 10**6))
def test_a_verdict_is_always_one_of_three(code, failures, elapsed):
    verdict = schedule.judge(code, "x", failures, NOW + elapsed, LATER, RETRY)
    if verdict.state == schedule.RETRY:
        assert 400 <= code < 500 and NOW + elapsed < verdict.next_at <= LATER
    elif verdict.state == schedule.SENT:
        assert 200 <= code < 300
    else:
        assert verdict.bounce_type in (schedule.PERMANENT, schedule.EXPIRED)


@given(st.floats(0.5, 100), st.lists(st.floats(0, 2), min_size=1, max_size=200))
def test_the_bucket_never_lets_more_than_rate_through(rate, gaps):
    now = [0.0]
    bucket = TokenBucket(rate, lambda: now[0])
    starts = []
    for gap in gaps:
        now[0] += gap
        starts.append(now[0] + bucket.reserve())
    # over any window, at most 1 + rate * its length (the burst of one, then the rate)
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            assert j - i + 1 <= 1 + rate * (starts[j] - first) + 1e-6
