"""Opens and clicks by device, client, OS and country: daily counters kept on write.

``stats_daily_agents`` (migration ``0030_event_details`` in relay/store/engine.py): the UTC day the
message was sent (as every statistic, relay/stats/maths.py) × device × client × country (``''`` when
unknown, relay/tracking/enrich.py), holding opens, unique_opens, clicks and unique_clicks of counted
events; ``stats_daily_os`` (``0063_stats_os``) the same by day × OS, a table of its own so the
other one does not grow by a fourth dimension. A unique open or click is the recipient's first
counted one for the message, filed under the device, client, OS and country of that first
event: "unique opens on mobile" are the recipients whose first open was on a phone. The views
``stats_daily_agents_sent`` and ``stats_daily_os_sent`` add a ``sent`` of 0 (a send has no
device) so the native statistics (relay/stats/queries.py, ``group_by`` device, client, os or
country) sum the same counters as for their other groupings; rates over sends are then null,
the click-to-open rate is not.

Writer: :class:`Breakdown`, an events listener (relay/tracking/events.py) in the transaction that
writes the event. :func:`rebuild` recomputes the table from ``events``, set-based, independent
of the listener: tests use it as the oracle. (The migration counted the events recorded before
it under ``''``: they carry no details.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from relay.stats.maths import add_counts, counter_rows, day_of
from relay.store import counters
from relay.store.messages import StoredMessage
from relay.store.transaction import transaction
from relay.tracking.bots import OPEN
from relay.tracking.events import Event


class Breakdown:
    """The events listener: counts each counted event under its message's send day and the
    event's device, client and country, and under that day and the event's OS."""

    def __call__(self, conn: sqlite3.Connection, events: Sequence[Event],
                 sent: Mapping[str, StoredMessage]) -> None:
        """The counts of a write's events, summed: one statement per counter row. An event
        whose message is not in the store (purged, or sent through another relay) has nothing
        to be filed under."""
        totals: dict[tuple[str, str, str, str], list[int]] = {}
        systems: dict[tuple[str, str], list[int]] = {}
        for event in events:
            if not event.counted:
                continue
            message = sent.get(event.email_id)
            if message is None:
                continue
            first = int(event.first_for_recipient)
            counts = (1, first, 0, 0) if event.type == OPEN else (0, 0, 1, first)
            day = day_of(message.created_at)
            add_counts(totals, (day, event.device or "", event.client or "",
                                event.country or ""), counts)
            add_counts(systems, (day, event.os or ""), counts)
        if totals:
            counters.add_agents(conn, counter_rows(totals))
            counters.add_os(conn, counter_rows(systems))


def rebuild(conn: sqlite3.Connection) -> None:
    """Recompute the table in one transaction; the caller keeps other writers out."""
    with transaction(conn):
        counters.rebuild_agents(conn)
