"""Two ``relay serve`` processes on different ports sharing one PostgreSQL database (issue 18):
webhook batches delivered once while both nodes run delivery workers, and ``GetTrackList``
answering the same on both. (Mail through one node and its hits at the other, and a retry at
the other node: tests/store/test_postgres.py.)"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from relay.admin import apikeys
from relay.config import StoreSettings
from relay.store import engine
from tests import pg
from tests.clients import message, tracking_urls
from tests.harness import LoopThread, wait_until
from tests.store.test_postgres import fetch, node_config, on_node, relay_process, send
from tests.webhooks.test_outbox import SECRET, Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(LoopThread()).start()
    yield server
    server.stop()
    server.loops.close()


@contextlib.contextmanager
def two_nodes(tmp_path: Path, extra: str = "") -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """Nodes ``a`` and ``b`` (``extra``: config text both get) on a new schema, migrated before
    they start; yields the schema's URL and each node's (SMTP port, HTTP port)."""
    url = pg.schema_url()
    engine.connect_url(StoreSettings(None, url)).close()
    nodes = []
    for name in "ab":
        config, smtp, http = node_config(tmp_path, name, url)
        config.write_text(config.read_text() + extra)
        nodes.append((config, smtp, http))
    with relay_process(*nodes[0]), relay_process(*nodes[1]):
        yield url, [(smtp, http) for _, smtp, http in nodes]


def sent_urls(tmp_path: Path, name: str) -> list[str]:
    """The tracking URLs of every message node ``name`` delivered (into its capture folder)."""
    return [u for eml in sorted((tmp_path / f"outbox-{name}").glob("*.eml"))
            for u in tracking_urls(eml.read_bytes())]


def test_each_webhook_batch_is_delivered_once_while_both_nodes_run_workers(tmp_path, receiver):
    hook = f"""
[[webhooks]]
name = "crm"
url = "{receiver.url}"
secret = "{SECRET}"
allow_private = true
timeout = 5
[webhook_delivery]
poll_seconds = 0.02
batch_size = 3
"""
    with two_nodes(tmp_path, hook) as (url, ports):
        for n in range(12):
            smtp, _ = ports[n % 2]
            assert send(smtp, message())[0] == 250
        for name, (_, http) in zip("ab", ports, strict=True):
            for link in sent_urls(tmp_path, name):  # the hits at the other node
                other = ports[1][1] if http == ports[0][1] else ports[0][1]
                assert fetch(on_node(link, other)) in (200, 302)
        db = pg.connect_rows(url)
        try:
            def stored() -> set[str]:
                return {row[0] for row in db.execute("SELECT id FROM webhook_events")}

            def all_delivered() -> bool:
                [(waiting,)] = db.execute(
                    "SELECT count(*) FROM webhook_batches WHERE state <> 'delivered'").fetchall()
                [(unbatched,)] = db.execute(
                    "SELECT count(*) FROM webhook_outbox WHERE batch_id IS NULL").fetchall()
                return waiting == unbatched == 0 and {
                    e["id"] for e in receiver.delivered()} >= stored()

            wait_until(all_delivered, timeout=60, what="every webhook event delivered")
            events = stored()
            [(batches,)] = db.execute("SELECT count(*) FROM webhook_batches").fetchall()
        finally:
            db.close()
    posted = Counter(json.loads(body)["batch_id"] for body, _, _ in receiver.requests)
    assert len(posted) == batches and set(posted.values()) == {1}, posted
    delivered = Counter(e["id"] for e in receiver.delivered())
    assert set(delivered) == events and set(delivered.values()) == {1}
    kinds = Counter(e["type"] for e in receiver.delivered())
    # 12 sent; per message a click (implying an open), a second click within a second (a
    # scanner: nothing sent) and the pixel
    assert kinds == {"email.sent": 12, "email.clicked": 12, "email.opened": 24}


def test_get_track_list_answers_the_same_on_both_nodes(tmp_path):
    with two_nodes(tmp_path) as (url, ports):
        key = apikeys.create(engine.connect_url(StoreSettings(None, url)), "tests")
        for n in range(6):
            smtp, _ = ports[n % 2]
            assert send(smtp, message())[0] == 250
        # node a's messages opened at b, b's clicked at a, some twice
        for link in [u for u in sent_urls(tmp_path, "a") if "/o/" in u] * 2:
            assert fetch(on_node(link, ports[1][1])) == 200
        for link in [u for u in sent_urls(tmp_path, "b") if "/c/" in u][:4]:
            assert fetch(on_node(link, ports[0][1])) == 302
        today = datetime.now(UTC).date().isoformat()

        def track_list(http: int) -> dict[str, Any]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{http}/api/v1/GetTrackList?StartTime={today}"
                f"&EndTime={today}", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                body = json.loads(response.read())
            body.pop("RequestId")
            return body

        first, second = track_list(ports[0][1]), track_list(ports[1][1])
    assert first == second
    # 6 sent; a's 3 opened twice each; b's first message's two links and the second's first
    # two clicked (the second link within a second of the first: a scanner, not counted),
    # each click implying an open
    [stat] = first["data"]["stat"]
    assert (stat["TotalNumber"], stat["RcptOpenCount"], stat["RcptUniqueOpenCount"],
            stat["RcptClickCount"], stat["RcptUniqueClickCount"]) == ("6", "8", "5", "2", "2")
