"""Opens and clicks by device, client and country: daily counters kept on write.

``stats_daily_agents`` (migration ``0030_event_details`` in relay/store/engine.py): the UTC day the
message was sent (as every statistic, relay/stats/maths.py) × device × client × country (``''`` when
unknown, relay/tracking/enrich.py), holding opens, unique_opens, clicks and unique_clicks of counted
events. A unique open or click is the recipient's first counted one for the message, filed
under the device, client and country of that first event: "unique opens on mobile" are the
recipients whose first open was on a phone. The view ``stats_daily_agents_sent`` adds a
``sent`` of 0 (a send has no device) so the native statistics (relay/stats/queries.py, ``group_by``
device, client or country) sum the same counters as for their other groupings; rates over
sends are then null, the click-to-open rate is not.

Writer: :class:`Breakdown`, an events listener (relay/tracking/events.py) in the transaction that
writes the event. :func:`rebuild` recomputes the table from ``events``, set-based, independent
of the listener: tests use it as the oracle. (The migration counted the events recorded before
it under ``''``: they carry no details.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relay.stats.maths import add_counts, day_of
from relay.store.transaction import transaction
from relay.tracking.bots import OPEN
from relay.tracking.events import Event, SentTimes

_ADD = """INSERT INTO stats_daily_agents VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, device, client, country) DO UPDATE SET opens = opens + excluded.opens,
    unique_opens = unique_opens + excluded.unique_opens, clicks = clicks + excluded.clicks,
    unique_clicks = unique_clicks + excluded.unique_clicks"""

REBUILD = """INSERT INTO stats_daily_agents
    SELECT date(m.created_at, 'unixepoch'), coalesce(e.device, ''), coalesce(e.client, ''),
           coalesce(e.country, ''), sum(e.type = 'open'),
           sum(e.type = 'open' AND e.first_for_recipient), sum(e.type = 'click'),
           sum(e.type = 'click' AND e.first_for_recipient)
    FROM events e JOIN messages m ON m.email_id = e.email_id
    WHERE e.counted GROUP BY 1, 2, 3, 4"""


class Breakdown:
    """The events listener: counts each counted event under its message's send day and the
    event's device, client and country. Send times are cached (bounded LRU) by email id."""

    def __init__(self, cache_size: int = 65536) -> None:
        self.sent_times = SentTimes(cache_size)

    def __call__(self, conn: sqlite3.Connection, event: Event) -> None:
        if not event.counted:
            return
        sent = self.sent_times.get(conn, event.email_id)
        if sent is None:  # purged, or sent through another relay: nothing to file it under
            return
        first = int(event.first_for_recipient)
        counts = (1, first, 0, 0) if event.type == OPEN else (0, 0, 1, first)
        conn.execute(_ADD, (day_of(sent), event.device or "", event.client or "",
                            event.country or "", *counts))

    def batch(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        """The counts of a batch of events, summed: one statement per counter row."""
        totals: dict[tuple[str, str, str, str], list[int]] = {}
        for event in events:
            if not event.counted:
                continue
            sent = self.sent_times.get(conn, event.email_id)
            if sent is None:
                continue
            first = int(event.first_for_recipient)
            counts = (1, first, 0, 0) if event.type == OPEN else (0, 0, 1, first)
            key = (day_of(sent), event.device or "", event.client or "", event.country or "")
            add_counts(totals, key, counts)
        if totals:
            conn.executemany(_ADD, [(*key, *counts) for key, counts in totals.items()])


def rebuild(conn: sqlite3.Connection) -> None:
    """Recompute the table in one transaction; the caller keeps other writers out."""
    with transaction(conn):
        conn.execute("DELETE FROM stats_daily_agents")
        conn.execute(REBUILD)
