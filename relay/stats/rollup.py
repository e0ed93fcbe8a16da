"""Daily counters kept up to date on write, so statistics never scan events.

Five tables (migrations in relay/store/engine.py), all keyed by the UTC day
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
``stats_daily_links_by``  day × sender_domain × campaign × url, and ``stats_daily_tag_links``
                       day × tag × url (``0064_link_counters``): the same, so clicks per link
                       take the filters of the other statistics.

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
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.stats.maths import (
    ESP_BY_DOMAIN,
    OTHERS,
    add_counts,
    counter_rows,
    day_of,
    domain_of,
    esp_of,
)
from relay.store import counters, messages
from relay.store import engine as store
from relay.store.messages import StoredMessage
from relay.store.transaction import transaction
from relay.tracking.bots import CLICK, OPEN
from relay.tracking.events import Event

if TYPE_CHECKING:
    from relay.smtp.pipeline import MessageRecord, Outcome

@dataclass(frozen=True, slots=True)
class Dims:
    """What a message's counts are filed under."""

    day: str
    sender: str
    tag_name: str
    sender_domain: str
    campaign: str
    tags: tuple[str, ...]  # tag_name and the Anypost tags, without repeats


def dims_of(message: StoredMessage) -> Dims:
    tag_name = message.tag_name
    every_tag = tuple(dict.fromkeys(([tag_name] if tag_name else []) + json.loads(message.tags)))
    return Dims(day_of(message.created_at), message.sender.lower(), tag_name or "",
                message.sender_domain.lower(), message.campaign or "", every_tag)


def count_sent(conn: sqlite3.Connection, email_id: str, recipients: Iterable[str]) -> None:
    """Count the copies of a just-recorded message that the upstream accepted."""
    by_esp = Counter(esp_of(r) for r in recipients)
    message = messages.stored(conn, email_id) if by_esp else None
    if message is None:
        return
    dims = dims_of(message)
    counters.add_daily(conn, [(dims.day, dims.sender, dims.tag_name, esp, dims.sender_domain,
                               dims.campaign, sent, 0, 0, 0, 0)
                              for esp, sent in by_esp.items()])
    counters.add_tags(conn, [(dims.day, tag, sent, 0, 0, 0, 0)
                             for sent in by_esp.values() for tag in dims.tags])


class Rollup:
    """The listener of both paths: counts each counted event under its message's send day
    (relay/tracking/events.py), and a message's accepted copies when it is recorded
    (:meth:`on_message`, relay/smtp/pipeline.py)."""

    def __call__(self, conn: sqlite3.Connection, events: Sequence[Event],
                 sent: Mapping[str, StoredMessage]) -> None:
        """The counts of a write's events, summed: one statement per counter row."""
        daily: dict[tuple[str, ...], list[int]] = {}
        tags: dict[tuple[str, str], list[int]] = {}
        links: dict[tuple[str, str | None], list[int]] = {}
        links_by: dict[tuple[str, str, str, str | None], list[int]] = {}
        tag_links: dict[tuple[str, str, str | None], list[int]] = {}
        dims_by_id: dict[str, Dims] = {}
        for event in events:
            if not event.counted:
                continue
            dims = dims_by_id.get(event.email_id)
            if dims is None:
                message = sent.get(event.email_id)
                if message is None:
                    continue
                dims = dims_by_id[event.email_id] = dims_of(message)
            first = int(event.first_for_recipient)
            if event.type == OPEN:
                counts = (0, 1, first, 0, 0)
            elif event.type == CLICK:
                counts = (0, 0, 0, 1, first)
                link = (1, int(event.first_for_link))
                add_counts(links, (dims.day, event.url), link)
                add_counts(links_by, (dims.day, dims.sender_domain, dims.campaign, event.url),
                           link)
                for tag in dims.tags:
                    add_counts(tag_links, (dims.day, tag, event.url), link)
            else:
                continue
            add_counts(daily, (dims.day, dims.sender, dims.tag_name, esp_of(event.recipient),
                         dims.sender_domain, dims.campaign), counts)
            for tag in dims.tags:
                add_counts(tags, (dims.day, tag), counts)
        if daily:
            counters.add_daily(conn, counter_rows(daily))
            counters.add_tags(conn, counter_rows(tags))
            counters.add_links(conn, counter_rows(links))
            counters.add_links_by(conn, counter_rows(links_by))
            counters.add_tag_links(conn, counter_rows(tag_links))

    def on_message(self, conn: sqlite3.Connection, record: MessageRecord, outcome: Outcome
                   ) -> None:
        """The SMTP path's message listener (relay/smtp/pipeline.py)."""
        count_sent(conn, record.email_id, outcome.sent)


def rebuild(conn: sqlite3.Connection) -> None:
    """Recompute the tables from messages, recipients and events, in one transaction.

    The caller must keep other writers out (the relay stopped, or the benchmark's fill)."""
    conn.create_function("relay_domain", 1, domain_of, deterministic=True)
    store.add_lower(conn)
    with transaction(conn):
        counters.rebuild_rollup(conn, ESP_BY_DOMAIN, OTHERS)
