"""The events listener behind ``stats_daily_machine`` (relay/store/machine.py): each event not
counted (prefetch, scanner, automation) is added under its message's send day, its
classification and its source, summed per batch. Events of messages not in the store are
left out, as every daily counter leaves them out (relay/stats/rollup.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from relay.stats.maths import add_counts, counter_rows, day_of
from relay.store import machine
from relay.store.messages import StoredMessage
from relay.tracking.bots import OPEN
from relay.tracking.events import Event


class MachineTraffic:
    def __call__(self, conn: sqlite3.Connection, events: Sequence[Event],
                 sent: Mapping[str, StoredMessage]) -> None:
        """The events listener (relay/tracking/events.py): a write's events, summed."""
        counts: dict[tuple[str, str, str], list[int]] = {}
        for event in events:
            if event.counted:
                continue
            message = sent.get(event.email_id)
            if message is None:
                continue
            add_counts(counts, (day_of(message.created_at), event.classification,
                                event.bot_source or ""),
                       (1, 0) if event.type == OPEN else (0, 1))
        if counts:
            machine.add(conn, counter_rows(counts))
