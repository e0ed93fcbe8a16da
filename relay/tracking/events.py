"""Open and click events: recording one hit durably, with the flags reports need.

The ``events`` table (migration ``0002_events`` in relay/store/engine.py), one row per event:

===================  ======================================================================
id                   ``evt_<uuid7>``: public, stable, time-ordered
type                 ``open`` or ``click``
at                   Unix seconds (REAL) when the request arrived
email_id             the relay's ``email_<uuid7>`` of the message
recipient            the recipient the token was signed for
url                  clicks: the destination; opens: NULL
ip, user_agent       the client (``X-Forwarded-For`` only through trusted proxies)
method               ``GET`` or ``HEAD``
classification       person, proxy, prefetch, scanner, automation (relay/tracking/bots.py)
bot_source, reason   who the machine is (``google``, ``barracuda``, ``curl`` ...) and why
counted              1 for person and proxy: in statistics and webhooks; 0 kept for audit
implied              1 for an open recorded because a counted click arrived for a recipient
                     with no counted open (a click proves the open)
first_for_recipient  1 on the recipient's first counted event of this type for the message
                     (unique opens; unique clickers)
first_for_link       clicks: 1 on the recipient's first counted click of this URL
device, client, os   from the user agent (relay/tracking/enrich.py): ``mobile``, ``Apple Mail``,
                     ``iOS 17.5``; NULL when it does not tell
country, region,     from ``[geo] database`` (ISO country code, English names); NULL without
city                 a database or for an address it does not know
===================  ======================================================================

``ip`` is stored anonymized with ``[privacy] anonymize_ip``; the bot rules and the location
lookup use the full address. Enrichment runs once per hit inside the write, from a cached
parse of the user agent (relay/tracking/enrich.py).

``events`` is clustered by its time-ordered id (appends only) and indexed by ``at``: a hit
writes no random B-tree page there. What a hit must look up lives in ``engagement``, one row
per (email_id, recipient, target) where target is ``''`` for the open pixel and the URL for a
link: ``counted`` (0 until a counted event of that target was stored, then at least 1),
``hits`` (how often the row was written) and ``last_at`` (when it was last written). Reading a
recipient's rows (a few: the pixel and the links they used) answers "opened?", "clicked?" and
"clicked this link?", however often one link is hammered. The per-link click counts of the
statistics are the daily counters (``stats_daily_links``, relay/stats/rollup.py), not this table.
Per-message event listings use ``events (email_id)``. Retention and erasure must delete from
both tables.

The engagement cache: :class:`Recorder` keeps the rows of recently seen recipients in a
bounded LRU and writes a row only when it changes something a later decision needs: a new
target, the first counted event of a target, or (so retention's ``last_at`` stays close to the
truth) a row last written more than :data:`ENGAGEMENT_REFRESH_SECONDS` before. A hammered link
therefore writes no engagement page. Counted-first flags stay exact across processes: each
write reads the rows of all its recipients inside the write transaction (SQLite's write lock,
PostgreSQL's SERIALIZABLE), in one statement rather than one per hit (on PostgreSQL every
statement is a round trip to the server), and merges them into the cache before deciding. The
time of each target's last hit, for the "another link
clicked within one second" signal, is kept in memory only: with several worker processes that
signal sees the hits of its own process. A write that fails (or a batch whose COMMIT fails)
drops the recipients it touched (all of them, for a failed COMMIT) from the cache, so they are
read again from what was committed.

Listener hook: modules that must write alongside an event (the daily counters, the webhook
outbox) pass ``listeners`` to :class:`Recorder` (``build_app(..., listeners=[...])``). Each is
called once per write as ``listener(conn, events, messages)``: the write's events in order,
counted or not (filter on ``event.counted``), and the stored rows of their messages by email id
(a message not in the store is missing), read once per hit for the classifier and shared by
every listener. It runs after the event rows are inserted, inside the same savepoint and
transaction. A listener that raises rolls back the whole group of hits written with it: events
and outbox rows are stored together or not at all (the tracker still answers, and logs and
counts the failure).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from time import perf_counter
from typing import Any, NamedTuple

from relay import metrics
from relay.ids import uuid7
from relay.store import events as events_table
from relay.store import messages
from relay.store.engine import Store, pipelined
from relay.store.events import EVENT_PREFIX
from relay.store.messages import StoredMessage
from relay.tracking.bots import BURST_SECONDS, CLICK, OPEN, PROXY, Classifier, Signals, Verdict
from relay.tracking.enrich import Details, Enricher, Place


class Hit(NamedTuple):
    """One request for a valid tracking token, as the tracker saw it."""

    type: str  # OPEN or CLICK
    at: float
    email_id: str
    recipient: str
    url: str | None
    ip: str | None
    user_agent: str
    method: str = "GET"


class Event(NamedTuple):
    """One row of ``events``, in column order (a NamedTuple: it is its own row)."""

    id: str
    type: str
    at: float
    email_id: str
    recipient: str
    url: str | None
    ip: str | None
    user_agent: str
    method: str
    classification: str
    bot_source: str | None
    reason: str | None
    counted: bool
    implied: bool
    first_for_recipient: bool
    first_for_link: bool
    device: str | None = None
    client: str | None = None
    os: str | None = None
    country: str | None = None
    region: str | None = None
    city: str | None = None

    @property
    def details(self) -> dict[str, Any]:
        """The webhook's and the API's ``device``, ``client``, ``os`` and ``geo``."""
        return {"device": self.device, "client": self.client, "os": self.os,
                "geo": Place(self.country, self.region, self.city).as_dict()}

    @property
    def bot(self) -> dict[str, str] | None:
        """The webhook's ``tracking.bot``: set for mailbox proxies, the only counted bots."""
        if self.classification == PROXY and self.bot_source:
            return {"source": self.bot_source, "kind": PROXY}
        return None


# listener(conn, events, messages): see the module's docstring.
Listener = Callable[[sqlite3.Connection, Sequence[Event], Mapping[str, StoredMessage]], None]
assert Event._fields == events_table.COLUMNS  # Event is the row relay/store/events.py inserts

PIXEL_TARGET = ""
# An engagement row is written again when it was last written this long before a hit.
ENGAGEMENT_REFRESH_SECONDS = 3600.0


# A recipient's engagement: target -> [counted (bool), last hit (this process), last written].
_State = dict[str, list[Any]]


def _merge(state: _State, rows: Sequence[tuple[str, int, float]]) -> _State:
    """Add stored rows to ``state``: what is counted stays counted, the latest times win."""
    for target, counted, last_at in rows:
        entry = state.get(target)
        if entry is None:
            state[target] = [counted > 0, last_at, last_at]
        else:
            entry[0] = entry[0] or counted > 0
            entry[1] = max(entry[1], last_at)
            entry[2] = max(entry[2], last_at)
    return state


def _seen(state: _State, hit: Hit) -> tuple[bool, bool, bool, bool]:
    """Before this hit: a counted open? a counted click? a counted click of this link?
    another link clicked (any classification) within the burst window?"""
    since = hit.at - BURST_SECONDS
    opened = clicked = clicked_link = recently = False
    for target, (counted, last_at, _) in state.items():
        if target == PIXEL_TARGET:
            opened = counted
            continue
        clicked = clicked or counted
        if target == hit.url:
            clicked_link = counted
        elif last_at >= since:
            recently = True
    return opened, clicked, clicked_link, recently


class MessageCache:
    """Bounded LRU of stored message rows by email id (they never change); unknown ids are
    looked up again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: OrderedDict[str, StoredMessage] = OrderedDict()

    def get(self, conn: sqlite3.Connection, email_id: str) -> StoredMessage | None:
        cached = self._cache.get(email_id)
        if cached is not None:
            self._cache.move_to_end(email_id)
            return cached
        row = messages.stored(conn, email_id)
        if row is None:
            return None
        self._cache[email_id] = row
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return row


class Recorder:
    """Records hits. The hits of one loop turn share one store write (one savepoint, one
    ``executemany`` per table) and one future, resolved after the group commit."""

    def __init__(self, store: Store, classifier: Classifier, *,
                 listeners: Sequence[Listener] = (), cache_size: int = 65536,
                 enricher: Enricher | None = None) -> None:
        self.store = store
        self.classifier = classifier
        self.listeners = tuple(listeners)
        self.enricher = enricher or Enricher()
        self.messages = MessageCache(cache_size)
        self.cache_size = cache_size
        self._states: OrderedDict[tuple[str, str], _State] = OrderedDict()
        self._queue: list[Hit] = []  # the hits of the batch still open to newcomers
        self._batch: asyncio.Future[list[list[Event]]] | None = None
        # The batch closes on the loop when its group commit starts (the write may run in
        # PostgreSQL's writer thread), and a transaction run again forgets what it read.
        if store is not None:  # None: a test calling write() itself
            store.on_flush(self._close_open_batch)
            store.on_rollback(self._states.clear)

    async def record(self, hit: Hit) -> list[Event]:
        """The hit's events (the click and any implied open), once they are committed."""
        if not self._queue:
            self._open_batch()
        batch = self._batch
        assert batch is not None
        index = len(self._queue)
        self._queue.append(hit)
        # Shielded: the hits of a batch share its future, and a cancelled request must not
        # cancel it for the others.
        return (await asyncio.shield(batch))[index]

    def _open_batch(self) -> None:
        hits: list[Hit] = []
        self._queue = hits
        self._batch = self.store.write(partial(self._write_queued, hits))
        self._batch.add_done_callback(partial(_count_batch, perf_counter()))
        self._batch.add_done_callback(partial(self._batch_done, hits))

    def _write_queued(self, hits: list[Hit], conn: sqlite3.Connection) -> list[list[Event]]:
        return self.write(conn, hits)

    def _close_open_batch(self) -> None:
        self._queue = []

    def _close(self, hits: list[Hit]) -> None:
        """Hits recorded from now on go to a new batch."""
        if self._queue is hits:
            self._queue = []

    def write(self, conn: sqlite3.Connection, hits: Sequence[Hit]) -> list[list[Event]]:
        """Classify the hits in order and insert their events; one list of events per hit."""
        changes: list[tuple[str, str, str, bool, float]] = []
        sent: dict[str, StoredMessage] = {}  # the hits' messages, read once per hit
        results = []
        try:
            local = self._states_of(conn, hits)  # this batch's, even if the LRU drops them
            for hit in hits:
                message = self.messages.get(conn, hit.email_id)
                if message is not None:
                    sent[hit.email_id] = message
                results.append(self._events(hit, message, local[(hit.email_id, hit.recipient)],
                                            changes))
            events = [event for group in results for event in group]
            with pipelined(conn):  # on PostgreSQL: one round trip for all the writes
                events_table.insert(conn, events)
                events_table.engage(conn, changes)
                for listener in self.listeners:
                    listener(conn, events, sent)
        except BaseException:  # rolled back: read these recipients again from the store
            for hit in hits:
                self._states.pop((hit.email_id, hit.recipient), None)
            raise
        return results

    def _states_of(self, conn: sqlite3.Connection, hits: Sequence[Hit]
                   ) -> dict[tuple[str, str], _State]:
        """The engagement of each recipient of ``hits``, read from the store in this
        transaction (another process may have stored a first open or click since this one
        last read it) in one statement, not one per hit: on PostgreSQL each is a round trip.
        Merged into the cached state, which keeps this process's own last hit times."""
        keys = list(dict.fromkeys((hit.email_id, hit.recipient) for hit in hits))
        stored = events_table.engagements(conn, keys)
        local = {}
        for key in keys:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = {}
            else:
                self._states.move_to_end(key)
            local[key] = _merge(state, stored.get(key, ()))
        while len(self._states) > self.cache_size:
            self._states.popitem(last=False)
        return local

    def _batch_done(self, hits: list[Hit], batch: asyncio.Future[list[list[Event]]]) -> None:
        """A batch that failed before it was written (the write lock never came) must not keep
        taking hits; one whose COMMIT failed rolled back what the cache holds: start over."""
        self._close(hits)
        if batch.cancelled() or batch.exception() is not None:
            self._states.clear()

    def _events(self, hit: Hit, message: StoredMessage | None, state: _State,
                changes: list[tuple[str, str, str, bool, float]]) -> list[Event]:
        opened, clicked, clicked_link, recently = _seen(state, hit)
        verdict = self.classifier.classify(Signals(
            hit.type, hit.method, hit.user_agent, hit.ip,
            None if message is None else hit.at - message.created_at, recently, hit.at))
        details = self.enricher.describe(hit.user_agent, hit.ip, verdict.classification)
        counted = verdict.counted
        if hit.type == CLICK:
            events = []
            if counted and not opened:
                events.append(_event(hit, verdict, details, OPEN, implied=True, first=True,
                                     first_link=False))
            events.append(_event(hit, verdict, details, CLICK, implied=False,
                                 first=counted and not clicked,
                                 first_link=counted and not clicked_link))
        else:
            events = [_event(hit, verdict, details, OPEN, implied=False,
                             first=counted and not opened, first_link=False)]
        for event in events:
            target = event.url or PIXEL_TARGET
            entry = state.get(target)
            if entry is None:
                entry = state[target] = [False, event.at, event.at]
            elif (event.counted and not entry[0]) or (
                    event.at - entry[2] >= ENGAGEMENT_REFRESH_SECONDS):
                entry[2] = event.at
            else:
                entry[0] = entry[0] or event.counted
                entry[1] = event.at
                continue
            entry[0] = entry[0] or event.counted
            entry[1] = event.at
            changes.append((event.email_id, event.recipient, target, event.counted, event.at))
        return events


_EVENT_COUNTERS: dict[tuple[str, str], Any] = {}


def _count_batch(queued: float, batch: asyncio.Future[list[list[Event]]]) -> None:
    """Metrics of a committed batch: its write latency, its events by type and class."""
    if batch.cancelled() or batch.exception() is not None:
        return
    metrics.TRACKING_WRITE_SECONDS.observe(perf_counter() - queued)
    kinds = Counter((e.type, e.classification) for events in batch.result() for e in events)
    for key, n in kinds.items():
        counter = _EVENT_COUNTERS.get(key)
        if counter is None:
            counter = _EVENT_COUNTERS[key] = metrics.TRACKING_EVENTS.labels(*key)
        counter.inc(n)


def _event(hit: Hit, verdict: Verdict, details: Details, kind: str, *, implied: bool,
           first: bool, first_link: bool) -> Event:
    """The stored address is the enricher's (anonymized when configured), never ``hit.ip``."""
    return Event(event_id(hit.at), kind, hit.at, hit.email_id, hit.recipient,
                 hit.url if kind == CLICK else None, details.ip, hit.user_agent, hit.method,
                 verdict.classification, verdict.source, verdict.reason, verdict.counted,
                 implied, first, first_link, details.device, details.client, details.os,
                 details.country, details.region, details.city)


# Event ids need uniqueness and time order, not secrecy: a per-process generator seeded from
# the OS saves a system call (os.urandom) per event.
_random_bits = random.Random(os.urandom(32)).getrandbits


def event_id(at: float) -> str:
    """``evt_<uuid7>`` for an event at ``at`` (Unix seconds)."""
    return EVENT_PREFIX + uuid7(int(at * 1000), _random_bits(74))
