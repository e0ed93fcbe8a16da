"""relay/store/sql.py: the ``IN (...)`` lists the store functions build, empty ones included,
on the run's engine (PostgreSQL takes no ``IN ()``)."""

from __future__ import annotations

from relay.store import deliveries, messages, reports

DIGEST = b"d" * 32


def test_an_empty_list_matches_nothing(store_conn):
    conn = store_conn
    deliveries.remember(conn, DIGEST, ["ann@example.org"], None, "email_1", 1000.0)
    deliveries.claim(conn, DIGEST, ["ann@example.org"], "email_2", 7, 1000.0)
    assert deliveries.delivered(conn, DIGEST, [], 0.0) == {}
    assert deliveries.claim_holders(conn, DIGEST, []) == []
    assert messages.process_rows(conn, []) == []
    assert reports.rows(conn, reports.message_facts_query([])) == []
    assert reports.rows(conn, reports.recipients_query([])) == []


def test_a_list_matches_its_values(store_conn):
    conn = store_conn
    deliveries.remember(conn, DIGEST, ["ann@example.org", "bob@example.org"], None, "email_1",
                        1000.0)
    assert deliveries.delivered(conn, DIGEST, ["bob@example.org", "cy@example.org"], 0.0) == {
        "bob@example.org": "email_1"}
