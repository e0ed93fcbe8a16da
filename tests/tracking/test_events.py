"""relay.tracking.events: flags, implied opens, time rules and the listener hook, against the
run's store (a SQLite file, or PostgreSQL with RELAY_TEST_STORE=postgresql) through its group
commit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from relay.config import StoreSettings
from relay.ids import new_email_id
from relay.store.engine import Store, open_store
from relay.tracking.bots import CLICK, OPEN, Classifier
from relay.tracking.events import Event, Hit, Recorder

SENT = 1_800_000_000.0
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
A, B = "https://shop.example/a", "https://shop.example/b"


@pytest.fixture
async def store(store_settings: StoreSettings) -> AsyncIterator[Store]:
    store = await open_store(store_settings)
    yield store  # type: ignore[misc]  # a PgStore on PostgreSQL: the same interface
    await store.close()


async def add_message(store: Store, created_at: float = SENT) -> str:
    email_id = new_email_id()
    await store.write(lambda conn: conn.execute(
        "INSERT INTO messages (email_id, sender, sender_domain, track_opens, track_clicks, "
        "decision, size, created_at) VALUES (?, 'news@shop.example', 'shop.example', 1, 1, "
        "'test', 0, ?)", (email_id, created_at)))
    return email_id


async def rows(store: Store, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
    return [tuple(row) for row in await store.fetchall(sql, params)]


def hit(email_id: str, kind: str, at: float, url: str | None = None, agent: str = FIREFOX,
        recipient: str = "ann@example.net") -> Hit:
    return Hit(kind, at, email_id, recipient, url, "203.0.113.7", agent)


def recorder(store: Store, window: float = 10.0, **kwargs: object) -> Recorder:
    return Recorder(store, Classifier(scanner_window_seconds=window), **kwargs)  # type: ignore


def flags(event: Event) -> tuple[str, bool, bool, bool, bool]:
    return (event.type, event.counted, event.implied, event.first_for_recipient,
            event.first_for_link)


async def test_click_without_open_implies_the_open(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store)
    events = await rec.record(hit(email_id, CLICK, SENT + 3600, A))
    assert [flags(e) for e in events] == [(OPEN, True, True, True, False),
                                          (CLICK, True, False, True, True)]
    assert events[0].url is None and events[1].url == A
    # the open that follows is not the first any more; a second click of A is not first
    later = await rec.record(hit(email_id, OPEN, SENT + 3700))
    again = await rec.record(hit(email_id, CLICK, SENT + 3800, A))
    other = await rec.record(hit(email_id, CLICK, SENT + 3900, B))
    assert [flags(e) for e in later + again + other] == [
        (OPEN, True, False, False, False),
        (CLICK, True, False, False, False),
        (CLICK, True, False, False, True),
    ]


async def test_first_flags_ignore_uncounted_events(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store)
    prefetch = await rec.record(hit(email_id, OPEN, SENT + 5, agent="Mozilla/5.0"))
    person = await rec.record(hit(email_id, OPEN, SENT + 600))
    assert [(e.classification, e.counted, e.first_for_recipient) for e in prefetch + person] == [
        ("prefetch", False, False), ("person", True, True)]


async def test_scanner_click_implies_nothing(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store)
    events = await rec.record(hit(email_id, CLICK, SENT + 3600, A, agent="curl/8.5.0"))
    assert [flags(e) for e in events] == [(CLICK, False, False, False, False)]
    person = await rec.record(hit(email_id, CLICK, SENT + 3700, A))
    assert [flags(e) for e in person] == [(OPEN, True, True, True, False),
                                          (CLICK, True, False, True, True)]


async def test_scanner_window_from_created_at(store: Store) -> None:
    email_id = await add_message(store, created_at=SENT)
    rec = recorder(store, window=30)
    early = await rec.record(hit(email_id, CLICK, SENT + 29.5, A))
    late = await rec.record(hit(email_id, CLICK, SENT + 31, A, recipient="bob@example.net"))
    assert early[-1].classification == "scanner" and not early[-1].counted
    assert "after sending" in (early[-1].reason or "")
    assert late[-1].classification == "person"


async def test_scanner_window_zero_is_off(store: Store) -> None:
    email_id = await add_message(store, created_at=SENT)
    events = await recorder(store, window=0).record(hit(email_id, CLICK, SENT + 0.2, A))
    assert events[-1].classification == "person"


async def test_unknown_message_still_recorded(store: Store) -> None:
    """Links never expire (seed 003): a purged message's clicks are still stored."""
    events = await recorder(store).record(hit(new_email_id(), CLICK, SENT, A))
    assert events[-1].counted


async def test_every_link_at_once(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store)
    first = await rec.record(hit(email_id, CLICK, SENT + 3600.0, A))
    second = await rec.record(hit(email_id, CLICK, SENT + 3600.4, B))
    same_link = await rec.record(hit(email_id, CLICK, SENT + 3600.5, A))
    much_later = await rec.record(hit(email_id, CLICK, SENT + 3700, B))
    assert first[-1].classification == "person"
    assert second[-1].classification == "scanner"
    assert "another link" in (second[-1].reason or "")
    # A again, 0.1 s after B was clicked: another link within the second
    assert same_link[-1].classification == "scanner"
    assert much_later[-1].classification == "person"
    assert much_later[-1].first_for_link  # B's click in the burst was not counted


async def test_hits_of_one_turn_share_a_commit_and_see_each_other(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store)
    commits = store.batches
    results = await asyncio.gather(
        rec.record(hit(email_id, CLICK, SENT + 3600, A)),
        rec.record(hit(email_id, CLICK, SENT + 3610, A)),
        rec.record(hit(email_id, OPEN, SENT + 3620)),
    )
    assert store.batches == commits + 1
    assert [[flags(e) for e in r] for r in results] == [
        [(OPEN, True, True, True, False), (CLICK, True, False, True, True)],
        [(CLICK, True, False, False, False)],
        [(OPEN, True, False, False, False)],
    ]


async def test_rows_are_stored(store: Store) -> None:
    email_id = await add_message(store)
    events = await recorder(store).record(hit(email_id, CLICK, SENT + 3600, A))
    stored = await rows(store, "SELECT * FROM events WHERE email_id = ? ORDER BY type",
                        (email_id,))
    assert stored == [tuple(e) for e in sorted(events, key=lambda e: e.type)]
    assert events[0].id.startswith("evt_") and events[0].id != events[1].id
    assert await rows(store, "SELECT target, hits, counted FROM engagement ORDER BY target") == [
        ("", 1, 1), (A, 1, 1)]


async def test_listener_writes_in_the_same_transaction(store: Store) -> None:
    await store.write(lambda conn: conn.execute("CREATE TABLE outbox (event_id TEXT)"))
    seen: list[Event] = []

    def listener(conn: sqlite3.Connection, events: Sequence[Event], sent: object) -> None:
        for event in events:
            seen.append(event)
            if event.counted:
                conn.execute("INSERT INTO outbox VALUES (?)", (event.id,))

    email_id = await add_message(store)
    rec = recorder(store, listeners=[listener])
    events = await rec.record(hit(email_id, CLICK, SENT + 3600, A))
    await rec.record(hit(email_id, OPEN, SENT + 3600, agent="curl/8"))
    assert len(seen) == 3
    outbox = [r[0] for r in await rows(store, "SELECT event_id FROM outbox")]
    assert outbox == [e.id for e in events]


async def test_failing_listener_rolls_back_its_events(store: Store) -> None:
    def listener(conn: sqlite3.Connection, events: Sequence[Event], sent: object) -> None:
        raise RuntimeError("outbox unavailable")

    rec = recorder(store, listeners=[listener])
    with pytest.raises(RuntimeError):
        await rec.record(hit(await add_message(store), OPEN, SENT + 60))
    assert await rows(store, "SELECT count(*) FROM events") == [(0,)]
    assert await rows(store, "SELECT count(*) FROM engagement") == [(0,)]


def test_bot_property() -> None:
    base = Event("evt_x", OPEN, SENT, "email_x", "r", None, None, "ua", "GET", "proxy",
                 "google", "user agent", True, False, True, False)
    assert base.bot == {"source": "google", "kind": "proxy"}
    assert base._replace(classification="person", bot_source=None).bot is None


@pytest.mark.sqlite_only  # SQLite's WAL and its checkpoint thread
async def test_wal_is_copied_back_by_the_checkpoint_thread(store: Store, tmp_path: Path
                                                            ) -> None:
    """The writer's own automatic checkpoint is only a backstop (far beyond these few pages):
    the rows reach the database file itself through the checkpoint thread."""
    rec = recorder(store)
    email_id = await add_message(store)
    for n in range(20):
        await rec.record(hit(email_id, CLICK, SENT + 3600 + n, f"{A}/{n}"))
    stored = 0
    for n in range(100):
        await asyncio.sleep(0.05)
        stored = _rows_in_main_file(tmp_path / "relay.db", tmp_path / f"copy{n}.db")
        if stored == 21:
            break
    assert stored == 21  # 20 clicks and the open the first one implied


def _rows_in_main_file(db: Path, copy: Path) -> int:
    """Events in the database file alone, without its WAL."""
    copy.write_bytes(db.read_bytes())
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema copied back yet
        return 0
    finally:
        conn.close()


async def test_repeated_hits_write_no_engagement_rows(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store)
    for n in range(5):
        await rec.record(hit(email_id, CLICK, SENT + 3600 + 10 * n, A))
    assert await rows(store, "SELECT target, hits, counted FROM engagement ORDER BY target") == [
        ("", 1, 1), (A, 1, 1)]
    # a row last written long ago is written again (retention reads last_at)
    await rec.record(hit(email_id, CLICK, SENT + 3 * 3600, A))
    assert await rows(store, "SELECT hits, last_at FROM engagement WHERE target = ?",
                      (A,)) == [(2, SENT + 3 * 3600)]


async def test_firsts_stay_exact_with_two_processes(store: Store) -> None:
    email_id = await add_message(store)
    one, two = recorder(store), recorder(store)
    await one.record(hit(email_id, OPEN, SENT + 3600))
    await two.record(hit(email_id, OPEN, SENT + 3610))  # two caches the open, no click yet
    first = await one.record(hit(email_id, CLICK, SENT + 3620, A))
    again = await two.record(hit(email_id, CLICK, SENT + 3630, A))
    assert [flags(e) for e in first] == [(CLICK, True, False, True, True)]
    assert [flags(e) for e in again] == [(CLICK, True, False, False, False)]


@pytest.mark.sqlite_only  # counts the statements with sqlite3's trace callback
async def test_a_batch_reads_its_recipients_in_one_statement(store: Store) -> None:
    """On PostgreSQL each statement is a round trip: a batch of hits for many recipients,
    cached or not, reads their engagement once."""
    email_id = await add_message(store)
    rec = recorder(store)
    people = [f"r{n}@example.net" for n in range(30)]
    await asyncio.gather(*(rec.record(hit(email_id, OPEN, SENT + 3600, recipient=r))
                           for r in people[:10]))  # ten of them cached, with their opens
    reads: list[str] = []
    store.writer.set_trace_callback(
        lambda sql: reads.append(sql) if "FROM engagement" in sql else None)
    results = await asyncio.gather(*(rec.record(hit(email_id, CLICK, SENT + 3700, A, recipient=r))
                                     for r in people))
    store.writer.set_trace_callback(None)
    assert len(reads) == 1
    assert [len(events) for events in results] == [1] * 10 + [2] * 20  # 20 opens implied


async def test_a_failed_write_forgets_what_it_cached(store: Store) -> None:
    fail = [True]

    def listener(conn: sqlite3.Connection, events: Sequence[Event], sent: object) -> None:
        if fail[0]:
            raise RuntimeError("outbox unavailable")

    email_id = await add_message(store)
    rec = recorder(store, listeners=[listener])
    with pytest.raises(RuntimeError):
        await rec.record(hit(email_id, OPEN, SENT + 60))
    fail[0] = False
    events = await rec.record(hit(email_id, OPEN, SENT + 70))
    assert [flags(e) for e in events] == [(OPEN, True, False, True, False)]


async def test_a_tiny_cache_keeps_a_batch_exact(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store, cache_size=1)
    results = await asyncio.gather(
        rec.record(hit(email_id, CLICK, SENT + 3600, A)),
        rec.record(hit(email_id, OPEN, SENT + 3601, recipient="bob@example.net")),
        rec.record(hit(email_id, CLICK, SENT + 3610, A)),
    )
    assert [[flags(e) for e in r] for r in results] == [
        [(OPEN, True, True, True, False), (CLICK, True, False, True, True)],
        [(OPEN, True, False, True, False)],
        [(CLICK, True, False, False, False)],
    ]


@pytest.mark.sqlite_only  # SQLite's write lock, held by another connection
async def test_hits_after_a_lock_timeout_are_recorded(store: Store) -> None:
    """A batch that never got the write lock failed without taking its hits: the hits that
    followed joined it and failed too, until the process was restarted."""
    email_id = await add_message(store)
    rec = recorder(store)
    store.lock_timeout = 0.05
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await rec.record(hit(email_id, OPEN, SENT + 60, recipient="during@example.net"))
    other.execute("COMMIT")
    other.close()
    events = await rec.record(hit(email_id, OPEN, SENT + 61, recipient="after@example.net"))
    assert [e.recipient for e in events] == ["after@example.net"]
    stored = store.writer.execute("SELECT recipient FROM events").fetchall()
    assert stored == [("after@example.net",)]


async def test_a_cancelled_hit_does_not_cancel_the_others_of_its_batch(store: Store) -> None:
    email_id = await add_message(store)
    rec = recorder(store)
    first = asyncio.ensure_future(rec.record(hit(email_id, OPEN, SENT + 60, recipient="a@x.net")))
    second = asyncio.ensure_future(rec.record(hit(email_id, OPEN, SENT + 60, recipient="b@x.net")))
    await asyncio.sleep(0)  # both are queued in one batch
    first.cancel()
    assert [e.recipient for e in await second] == ["b@x.net"]
    assert first.cancelled()
