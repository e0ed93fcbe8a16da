"""The queue's SQL (relay/store/queue.py) on a real store (a SQLite file, or PostgreSQL with
RELAY_TEST_STORE=postgresql), two connections standing for two relay processes: a lease is held
by one attempt at a time, and the spool's totals stay exact."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import config
from relay.store import engine, queue
from relay.store.transaction import transaction
from tests.harness import store_url

NOW = 1_800_000_000.0


def message(n: int, size: int = 10) -> queue.NewMessage:
    return queue.NewMessage(f"email_{n:04d}", "a@shop.example", ["b@example.org",
                            "c@example.org"], b"x" * size, [], "", "", "ESMTP", NOW, NOW + 3600)


@pytest.fixture
def two(store_settings):
    first = engine.connect_url(store_settings)
    second = engine.connect_url(store_settings)
    yield first, second
    first.close()
    second.close()


def test_a_lease_is_held_by_one_process_until_it_runs_out(two):
    a, b = two
    with transaction(a):
        for n in range(3):
            queue.enqueue(a, message(n), 10, 1000)
    with transaction(a):
        taken_a = queue.claim(a, 1, NOW, NOW + 600, 2)
    with transaction(b):
        taken_b = queue.claim(b, 2, NOW, NOW + 600, 10)
    assert [m.email_id for m in taken_a] == ["email_0000", "email_0001"]
    assert [m.email_id for m in taken_b] == ["email_0002"]
    assert taken_a[0].recipients == ["b@example.org", "c@example.org"]
    with transaction(b):  # process 1 died: its leases run out, process 2 takes them over
        taken_over = queue.claim(b, 2, NOW + 601, NOW + 1200, 10)
    assert [m.email_id for m in taken_over] == ["email_0000", "email_0001", "email_0002"]
    result = [queue.Result("b@example.org", queue.SENT, 250, "250 ok"),
              queue.Result("c@example.org", queue.SENT, 250, "250 ok")]
    late, current = taken_a[0], taken_over[0]
    with transaction(a):  # the late attempt of process 1 no longer counts
        assert queue.record_attempt(a, "email_0000", late.lease, result, NOW, NOW) is \
            queue.Recorded.LOST
    with transaction(b):
        assert queue.record_attempt(b, "email_0000", current.lease, result, NOW, NOW) is \
            queue.Recorded.DONE
    assert queue.totals(a) == (2, 20)


def test_a_lease_taken_over_by_the_same_process_is_not_the_first_attempts(two):
    """A process whose attempt outlived its lease may claim the message again itself: the
    first attempt's renewal and record do not hold for the second claim's lease."""
    a, _ = two
    with transaction(a):
        queue.enqueue(a, message(1), 10, 1000)
        first = queue.claim(a, 1, NOW, NOW + 600, 10)[0]
    with transaction(a):
        assert queue.renew(a, first.email_id, first.lease, NOW + 300, NOW + 900)
        assert queue.claim(a, 1, NOW + 600, NOW + 1500, 10) == []  # renewed: still held
        assert not queue.renew(a, first.email_id, first.lease, NOW + 901, NOW + 1501)
        second = queue.claim(a, 1, NOW + 901, NOW + 1501, 10)[0]
    retry = [queue.Result(r, queue.QUEUED, 451, "451 busy")
             for r in ("b@example.org", "c@example.org")]
    with transaction(a):
        assert not queue.renew(a, first.email_id, first.lease, NOW + 902, NOW + 1502)
        assert queue.record_attempt(a, first.email_id, first.lease, retry, NOW + 960,
                                    NOW + 902) is queue.Recorded.LOST
        assert not queue.give_back(a, first.email_id, first.lease, NOW + 960)
        assert queue.record_attempt(a, second.email_id, second.lease, retry, NOW + 960,
                                    NOW + 902) is queue.Recorded.KEPT
    assert queue.message(a, first.email_id, NOW + 902)[0]["attempts"] == 1


def test_a_stop_hands_back_its_leases_at_once(two):
    a, b = two
    with transaction(a):
        queue.enqueue(a, message(1), 10, 1000)
        queue.claim(a, 1, NOW, NOW + 600, 10)
    with transaction(b):
        assert queue.claim(b, 2, NOW, NOW + 600, 10) == []
    with transaction(a):
        assert queue.release(a, 1) == 1
    with transaction(b):
        assert len(queue.claim(b, 2, NOW, NOW + 600, 10)) == 1


@settings(max_examples=30)
@given(st.lists(st.tuples(st.sampled_from(["enqueue", "send", "bounce", "retry", "delete"]),
                          st.integers(0, 5), st.integers(1, 50)), max_size=40))
def test_the_totals_match_what_is_queued(tmp_path_factory, steps):
    path = tmp_path_factory.mktemp("q")  # a new store each example
    conn = engine.connect_url(config.store_settings(store_url(path), "t", "store.url", path))
    for action, n, size in steps:
        with transaction(conn):
            email_id = message(n).email_id
            if action == "enqueue":
                # full, or that email id queued already
                with contextlib.suppress(queue.QueueFull, sqlite3.IntegrityError):
                    queue.enqueue(conn, message(n, size), 4, 120)
            elif action == "delete":
                queue.delete(conn, email_id)
            else:
                state = {"send": queue.SENT, "bounce": queue.BOUNCED, "retry": queue.QUEUED}
                for taken in queue.claim(conn, 1, NOW + 10**6, NOW + 2 * 10**6, 10):
                    if taken.email_id == email_id:
                        queue.record_attempt(conn, email_id, taken.lease, [
                            queue.Result(r, state[action], 250, "x")
                            for r in ("b@example.org", "c@example.org")], NOW, NOW)
                queue.release(conn, 1)
    count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM queue_messages"
                               ).fetchone()
    assert queue.totals(conn) == (count, size)
    assert count <= 4 and size <= 120
    conn.close()
