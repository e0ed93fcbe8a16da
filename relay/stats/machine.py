"""The events listener behind ``stats_daily_machine`` (relay/store/machine.py): each event not
counted (prefetch, scanner, automation) is added under its message's send day, its
classification and its source, summed per batch. Events of messages not in the store are
left out, as every daily counter leaves them out (relay/stats/rollup.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relay.stats.maths import add_counts, day_of
from relay.store import machine
from relay.tracking.bots import OPEN
from relay.tracking.events import Event, SentTimes


class MachineTraffic:
    def __init__(self, cache_size: int = 65536) -> None:
        self.sent_times = SentTimes(cache_size)

    def __call__(self, conn: sqlite3.Connection, event: Event) -> None:
        self.batch(conn, [event])

    def batch(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        counts: dict[tuple[str, str, str], list[int]] = {}
        for event in events:
            if event.counted:
                continue
            sent = self.sent_times.get(conn, event.email_id)
            if sent is None:
                continue
            add_counts(counts, (day_of(sent), event.classification, event.bot_source or ""),
                       (1, 0) if event.type == OPEN else (0, 1))
        if counts:
            machine.add(conn, ((*key, *values) for key, values in counts.items()))
