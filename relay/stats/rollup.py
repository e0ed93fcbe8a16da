"""Daily counters kept up to date on write, so statistics never scan events.

Three tables (migration ``0004_stats_rollup`` in relay/store/engine.py), all keyed by the UTC day
the message was sent (relay/stats/maths.py explains why) and holding the counts of
relay/stats/maths.py:

``stats_daily``        day × sender × tag_name × esp × sender_domain × campaign: sent, opens,
                       unique_opens, clicks, unique_clicks (``''`` for no tag or campaign).
                       ``GetTrackList`` and the native statistics by day, campaign and sender
                       domain read it.
``stats_daily_tags``   day × tag, for every tag a message carries (its Alibaba ``TagName`` and
                       its ``X-Anypost-Tags``), the same counts: a message with two tags counts
                       under both, so this table is never summed across tags.
``stats_daily_links``  day × url: clicks and unique clicks (recipients' first counted click of
                       that link).

Writers: :class:`Rollup`, both a message listener of the SMTP path (relay/smtp/pipeline.py: counts
the accepted copies when the message is recorded) and an events listener (relay/tracking/events.py:
adds each counted event), each in the transaction that writes the rows it counts.
:func:`rebuild` recomputes everything from the raw tables (the benchmark's bulk fill; tests use
it as the oracle for the incremental counters).

An event whose message is not in the store (purged, or sent through another relay) is not
counted: it has no send day, sender or tags to count under.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.stats.maths import add_counts, day_of, esp_of
from relay.store import engine as store
from relay.store.transaction import transaction
from relay.tracking.bots import CLICK, OPEN
from relay.tracking.events import Event

if TYPE_CHECKING:
    from relay.smtp.pipeline import MessageRecord, Outcome

COUNTERS = ("sent", "opens", "unique_opens", "clicks", "unique_clicks")
_ADD = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
_DAILY = f"""INSERT INTO stats_daily VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, sender, tag_name, esp, sender_domain, campaign) DO UPDATE SET {_ADD}"""
_TAGS = f"""INSERT INTO stats_daily_tags VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, tag) DO UPDATE SET {_ADD}"""
_LINKS = """INSERT INTO stats_daily_links VALUES (?, ?, ?, ?)
    ON CONFLICT (day, url) DO UPDATE SET clicks = clicks + excluded.clicks,
    unique_clicks = unique_clicks + excluded.unique_clicks"""
_MESSAGE = ("SELECT created_at, sender, tag_name, sender_domain, campaign, tags FROM messages "
            "WHERE email_id = ?")


@dataclass(frozen=True, slots=True)
class Dims:
    """What a message's counts are filed under."""

    day: str
    sender: str
    tag_name: str
    sender_domain: str
    campaign: str
    tags: tuple[str, ...]  # tag_name and the Anypost tags, without repeats


def dims_of(row: tuple[float, str, str | None, str, str | None, str]) -> Dims:
    created_at, sender, tag_name, sender_domain, campaign, tags = row
    every_tag = tuple(dict.fromkeys(([tag_name] if tag_name else []) + json.loads(tags)))
    return Dims(day_of(created_at), sender.lower(), tag_name or "", sender_domain.lower(),
                campaign or "", every_tag)


def message_dims(conn: sqlite3.Connection, email_id: str) -> Dims | None:
    row = conn.execute(_MESSAGE, (email_id,)).fetchone()
    return None if row is None else dims_of(row)


def add(conn: sqlite3.Connection, dims: Dims, esp: str, counts: tuple[int, ...]) -> None:
    """Add ``counts`` (in :data:`COUNTERS` order) under ``dims`` and each of its tags."""
    conn.execute(_DAILY, (dims.day, dims.sender, dims.tag_name, esp, dims.sender_domain,
                          dims.campaign, *counts))
    conn.executemany(_TAGS, [(dims.day, tag, *counts) for tag in dims.tags])


def count_sent(conn: sqlite3.Connection, email_id: str, recipients: Iterable[str]) -> None:
    """Count the copies of a just-recorded message that the upstream accepted."""
    by_esp = Counter(esp_of(r) for r in recipients)
    dims = message_dims(conn, email_id) if by_esp else None
    if dims is None:
        return
    for esp, sent in by_esp.items():
        add(conn, dims, esp, (sent, 0, 0, 0, 0))


class Rollup:
    """The events listener: counts each counted event under its message's send day.

    Message dimensions never change, so they are cached (bounded LRU) by email id."""

    def __init__(self, cache_size: int = 65536) -> None:
        self.cache_size = cache_size
        self._dims: OrderedDict[str, Dims] = OrderedDict()

    def __call__(self, conn: sqlite3.Connection, event: Event) -> None:
        if not event.counted:
            return
        dims = self._lookup(conn, event.email_id)
        if dims is None:
            return
        first = int(event.first_for_recipient)
        if event.type == OPEN:
            add(conn, dims, esp_of(event.recipient), (0, 1, first, 0, 0))
        elif event.type == CLICK:
            add(conn, dims, esp_of(event.recipient), (0, 0, 0, 1, first))
            conn.execute(_LINKS, (dims.day, event.url, 1, int(event.first_for_link)))

    def batch(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        """The counts of a batch of events, summed: one statement per counter row."""
        daily: dict[tuple[str, ...], list[int]] = {}
        tags: dict[tuple[str, str], list[int]] = {}
        links: dict[tuple[str, str | None], list[int]] = {}
        for event in events:
            if not event.counted:
                continue
            dims = self._lookup(conn, event.email_id)
            if dims is None:
                continue
            first = int(event.first_for_recipient)
            if event.type == OPEN:
                counts = (0, 1, first, 0, 0)
            elif event.type == CLICK:
                counts = (0, 0, 0, 1, first)
                add_counts(links, (dims.day, event.url), (1, int(event.first_for_link)))
            else:
                continue
            add_counts(daily, (dims.day, dims.sender, dims.tag_name, esp_of(event.recipient),
                         dims.sender_domain, dims.campaign), counts)
            for tag in dims.tags:
                add_counts(tags, (dims.day, tag), counts)
        if daily:
            conn.executemany(_DAILY, [(*key, *counts) for key, counts in daily.items()])
            conn.executemany(_TAGS, [(*key, *counts) for key, counts in tags.items()])
            conn.executemany(_LINKS, [(*key, *counts) for key, counts in links.items()])

    def on_message(self, conn: sqlite3.Connection, record: MessageRecord, outcome: Outcome
                   ) -> None:
        """The SMTP path's message listener (relay/smtp/pipeline.py)."""
        count_sent(conn, record.email_id, outcome.sent)

    def _lookup(self, conn: sqlite3.Connection, email_id: str) -> Dims | None:
        dims = self._dims.get(email_id)
        if dims is not None:
            self._dims.move_to_end(email_id)
            return dims
        dims = message_dims(conn, email_id)
        if dims is not None:
            self._dims[email_id] = dims
            if len(self._dims) > self.cache_size:
                self._dims.popitem(last=False)
        return dims


# ---- recomputing from the raw tables ----

_TABLES = ("stats_daily", "stats_daily_tags", "stats_daily_links")
_SUMS = ", ".join(f"sum({c})" for c in COUNTERS)
_DAY = "date(m.created_at, 'unixepoch')"
# Set-based on purpose: an implementation independent of the listener's, so each checks the
# other. First the counts per message and provider, then filed under the message's dimensions.
_REBUILD = (
    "DROP TABLE IF EXISTS temp.rollup_pm",
    """CREATE TEMP TABLE rollup_pm AS
    SELECT email_id, esp, sum(sent) AS sent, sum(opens) AS opens,
           sum(unique_opens) AS unique_opens, sum(clicks) AS clicks,
           sum(unique_clicks) AS unique_clicks
    FROM (SELECT email_id, relay_esp(recipient) AS esp, 1 AS sent, 0 AS opens,
                 0 AS unique_opens, 0 AS clicks, 0 AS unique_clicks
          FROM recipients WHERE status = 'sent'
          UNION ALL
          SELECT email_id, relay_esp(recipient), 0, type = 'open',
                 type = 'open' AND first_for_recipient, type = 'click',
                 type = 'click' AND first_for_recipient
          FROM events WHERE counted)
    GROUP BY email_id, esp""",
    f"""INSERT INTO stats_daily
    SELECT {_DAY}, relay_lower(m.sender), coalesce(m.tag_name, ''), pm.esp,
           relay_lower(m.sender_domain), coalesce(m.campaign, ''), {_SUMS}
    FROM rollup_pm pm JOIN messages m ON m.email_id = pm.email_id
    GROUP BY 1, 2, 3, 4, 5, 6""",
    f"""INSERT INTO stats_daily_tags
    SELECT day, tag, {_SUMS} FROM (
        SELECT DISTINCT pm.rowid, {_DAY} AS day, t.value AS tag, pm.sent, pm.opens,
               pm.unique_opens, pm.clicks, pm.unique_clicks
        FROM rollup_pm pm JOIN messages m ON m.email_id = pm.email_id,
             json_each(json_insert(m.tags, '$[#]', m.tag_name)) t
        WHERE t.value IS NOT NULL)
    GROUP BY day, tag""",
    f"""INSERT INTO stats_daily_links
    SELECT {_DAY}, e.url, count(*), sum(e.first_for_link)
    FROM events e JOIN messages m ON m.email_id = e.email_id
    WHERE e.counted AND e.type = 'click' GROUP BY 1, 2""",
    "DROP TABLE temp.rollup_pm",
)


def rebuild(conn: sqlite3.Connection) -> None:
    """Recompute the three tables from messages, recipients and events, in one transaction.

    The caller must keep other writers out (the relay stopped, or the benchmark's fill)."""
    conn.create_function("relay_esp", 1, esp_of, deterministic=True)
    store.add_lower(conn)
    with transaction(conn):
        for table in _TABLES:
            conn.execute(f"DELETE FROM {table}")
        for statement in _REBUILD:
            conn.execute(statement)
