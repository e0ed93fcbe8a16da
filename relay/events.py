"""Open and click events: recording one hit durably, with the flags reports need.

The ``events`` table (migration ``0002_events`` in relay/store.py), one row per event:

===================  ======================================================================
id                   ``evt_<uuid7>``: public, stable, time-ordered
type                 ``open`` or ``click``
at                   Unix seconds (REAL) when the request arrived
email_id             the relay's ``email_<uuid7>`` of the message
recipient            the recipient the token was signed for
url                  clicks: the destination; opens: NULL
ip, user_agent       the client (``X-Forwarded-For`` only through trusted proxies)
method               ``GET`` or ``HEAD``
classification       person, proxy, prefetch, scanner, automation (relay/bots.py)
bot_source, reason   who the machine is (``google``, ``barracuda``, ``curl`` ...) and why
counted              1 for person and proxy: in statistics and webhooks; 0 kept for audit
implied              1 for an open recorded because a counted click arrived for a recipient
                     with no counted open (a click proves the open)
first_for_recipient  1 on the recipient's first counted event of this type for the message
                     (unique opens; unique clickers)
first_for_link       clicks: 1 on the recipient's first counted click of this URL
device, client, os   from the user agent (relay/enrich.py): ``mobile``, ``Apple Mail``,
                     ``iOS 17.5``; NULL when it does not tell
country, region,     from ``[geo] database`` (ISO country code, English names); NULL without
city                 a database or for an address it does not know
===================  ======================================================================

``ip`` is stored anonymized with ``[privacy] anonymize_ip``; the bot rules and the location
lookup use the full address. Enrichment runs once per hit inside the write, from a cached
parse of the user agent (relay/enrich.py).

``events`` is clustered by its time-ordered id (appends only) and indexed by ``at``: a hit
writes no random B-tree page there. What a hit must look up lives in ``engagement``, one row
per (email_id, recipient, target) where target is ``''`` for the open pixel and the URL for a
link: ``hits`` (events, implied opens included), ``counted`` (the counted ones) and
``last_at``. Reading a recipient's rows (a few: the pixel and the links they used) answers
"opened?", "clicked?", "clicked this link?" and "another link clicked in the last second?",
however often one link is hammered; it is also the per-link click count. Per-message event
listings need an index on ``events (email_id)`` that this write path does not pay for (add it
with the module that lists them). Retention and erasure must delete from both tables.

Writing: :meth:`Recorder.record` hands :meth:`Recorder.write` to the store's group commit and
resolves after COMMIT, so an answered request means a stored event. ``write`` runs on the
writer connection inside the batch's transaction, in request order: the flags and the
"another link in the same second" signal are read from what is already committed or earlier
in the same transaction, and are exact for one writer process.

Listener hook: modules that must write alongside an event (the webhook outbox) pass
``listeners`` to :class:`Recorder` (``build_app(..., listeners=[...])``). Each is called as
``listener(conn, event)`` for every event, counted or not (filter on ``event.counted``), after
the event rows are inserted, inside the same savepoint and transaction. A listener that raises
rolls back the whole group of hits written with it: events and outbox rows are stored together
or not at all (the tracker still answers, and logs and counts the failure).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from time import perf_counter
from typing import Any, NamedTuple

from relay import metrics
from relay.bots import BURST_SECONDS, CLICK, OPEN, PROXY, Classifier, Signals, Verdict
from relay.enrich import Details, Enricher, Place
from relay.store import Store

EVENT_PREFIX = "evt_"


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


Listener = Callable[[sqlite3.Connection, Event], None]

_INSERT = f"INSERT INTO events VALUES ({', '.join('?' * len(Event._fields))})"
COLUMNS = ", ".join(Event._fields)

_ENGAGEMENT = ("SELECT target, counted, last_at FROM engagement "
               "WHERE email_id = ? AND recipient = ?")
_ENGAGE = """INSERT INTO engagement VALUES (?, ?, ?, 1, ?, ?)
    ON CONFLICT (email_id, recipient, target) DO UPDATE SET hits = hits + 1,
    counted = counted + excluded.counted, last_at = excluded.last_at"""
PIXEL_TARGET = ""


# A recipient's engagement rows while a batch is written: target -> [counted, last_at].
_State = dict[str, list[Any]]


def _seen(state: _State, hit: Hit) -> tuple[bool, bool, bool, bool]:
    """Before this hit: a counted open? a counted click? a counted click of this link?
    another link clicked (any classification) within the burst window?"""
    since = hit.at - BURST_SECONDS
    opened = clicked = clicked_link = recently = False
    for target, (counted, last_at) in state.items():
        if target == PIXEL_TARGET:
            opened = counted > 0
            continue
        clicked = clicked or counted > 0
        if target == hit.url:
            clicked_link = counted > 0
        elif last_at >= since:
            recently = True
    return opened, clicked, clicked_link, recently


class SentTimes:
    """Bounded LRU of ``messages.created_at`` by email id; unknown ids are looked up again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: OrderedDict[str, float] = OrderedDict()

    def get(self, conn: sqlite3.Connection, email_id: str) -> float | None:
        cached = self._cache.get(email_id)
        if cached is not None:
            self._cache.move_to_end(email_id)
            return cached
        row = conn.execute("SELECT created_at FROM messages WHERE email_id = ?",
                           (email_id,)).fetchone()
        if row is None:
            return None
        self._cache[email_id] = row[0]
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return float(row[0])


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
        self.sent_times = SentTimes(cache_size)
        self._queue: list[Hit] = []
        self._batch: asyncio.Future[list[list[Event]]] | None = None

    async def record(self, hit: Hit) -> list[Event]:
        """The hit's events (the click and any implied open), once they are committed."""
        if not self._queue:
            self._batch = self.store.write(self._write_queued)
            self._batch.add_done_callback(partial(_count_batch, perf_counter()))
        batch = self._batch
        assert batch is not None
        index = len(self._queue)
        self._queue.append(hit)
        return (await batch)[index]

    def _write_queued(self, conn: sqlite3.Connection) -> list[list[Event]]:
        hits, self._queue = self._queue, []
        return self.write(conn, hits)

    def write(self, conn: sqlite3.Connection, hits: Sequence[Hit]) -> list[list[Event]]:
        """Classify the hits in order and insert their events; one list of events per hit."""
        states: dict[tuple[str, str], _State] = {}
        results = []
        for hit in hits:
            key = (hit.email_id, hit.recipient)
            state = states.get(key)
            if state is None:
                state = states[key] = {target: [counted, last_at] for target, counted, last_at
                                       in conn.execute(_ENGAGEMENT, key)}
            results.append(self._events(conn, hit, state))
        events = [event for group in results for event in group]
        conn.executemany(_INSERT, events)
        conn.executemany(_ENGAGE, [
            (e.email_id, e.recipient, e.url or PIXEL_TARGET, e.counted, e.at) for e in events])
        for event in events:
            for listener in self.listeners:
                listener(conn, event)
        return results

    def _events(self, conn: sqlite3.Connection, hit: Hit, state: _State) -> list[Event]:
        sent = self.sent_times.get(conn, hit.email_id)
        opened, clicked, clicked_link, recently = _seen(state, hit)
        verdict = self.classifier.classify(Signals(
            hit.type, hit.method, hit.user_agent, hit.ip,
            None if sent is None else hit.at - sent, recently))
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
            entry = state.setdefault(event.url or PIXEL_TARGET, [0, 0.0])
            entry[0] += event.counted
            entry[1] = event.at
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
# the OS saves a system call (os.urandom) and a uuid.UUID object per event.
_random_bits = random.Random(os.urandom(32)).getrandbits
_UUID7 = 0x7 << 76 | 0b10 << 62  # version 7, RFC 9562 variant
_RAND_B = (1 << 62) - 1


def event_id(at: float) -> str:
    """``evt_<uuid7>`` for an event at ``at`` (Unix seconds): 48 bits of milliseconds, the
    version and variant, 74 random bits; the same layout as relay.ids.uuid7."""
    bits = _random_bits(74)
    value = int(at * 1000) << 80 | _UUID7 | (bits >> 62) << 64 | bits & _RAND_B
    h = f"{value:032x}"
    return f"{EVENT_PREFIX}{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
