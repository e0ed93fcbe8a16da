"""Two ``relay serve`` processes on different ports sharing one PostgreSQL database (issue 18):
webhook batches delivered once while both nodes run delivery workers, ``GetTrackList``
answering the same on both, a restart of PostgreSQL (a server of the test's own) while mail and
hits go through both. (Mail through one node and its hits at the other, and a retry at the other
node: tests/store/test_postgres.py.)"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import smtplib
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
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


# --- a PostgreSQL restart under load ----------------------------------------------------------

@pytest.fixture
def cluster() -> Iterator[pg.Cluster]:
    """A PostgreSQL server of this test's own, which it stops and starts (tests/pg.py)."""
    server = pg.Cluster()
    yield server
    server.close()


@dataclass
class Load:
    """SMTP sessions and tracker hits against both nodes from threads of their own, each
    outcome kept, until :meth:`stop` (or a bound on time, so that it always ends)."""

    smtp_ports: list[int]
    http_ports: list[int]
    links: list[str]
    replies: list[tuple[int, int, str]] = field(default_factory=list)  # (node, code, Message-ID)
    answered: list[int] = field(default_factory=list)  # HTTP statuses of the hits answered
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        deadline = time.monotonic() + 240
        self.threads = [threading.Thread(target=self._mail, args=(deadline,)),
                        threading.Thread(target=self._hits, args=(deadline,))]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def _mail(self, deadline: float) -> None:
        for n in itertools.count():
            if self.stopping.is_set() or time.monotonic() > deadline:
                return
            node = n % 2
            msg = message()
            code = smtp_reply(self.smtp_ports[node], msg)
            self.replies.append((node, code, message_id(msg)))

    def _hits(self, deadline: float) -> None:
        for n in itertools.count():
            if self.stopping.is_set() or time.monotonic() > deadline:
                return
            link = self.links[n % len(self.links)]
            with contextlib.suppress(OSError):  # not answered: not counted either way
                self.answered.append(fetch(on_node(link, self.http_ports[n % 2])))

    def codes_since(self, count: int, node: int) -> set[int]:
        return {code for n, code, _ in self.replies[count:] if n == node}


def smtp_reply(port: int, msg: bytes) -> int:
    """The code of the reply that ended the transaction (DATA's, or an earlier refusal)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            for command, arg in (("mail", "news@shop.example"), ("rcpt", "a@example.org")):
                code, _ = getattr(client, command)(arg)
                if code != 250:
                    return code
            return client.data(msg)[0]
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except (OSError, smtplib.SMTPException):
        return 0  # the session broke: not a reply


def message_id(msg: bytes) -> str:
    found = re.search(rb"^Message-ID: (<[^>]+>)", msg, re.MULTILINE | re.IGNORECASE)
    assert found, msg[:200]
    return found.group(1).decode()


def lost_hits(http_ports: list[int]) -> float:
    """relay_tracking_write_errors_total, summed over the nodes."""
    total = 0.0
    for port in http_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("relay_tracking_write_errors_total "):
                    total += float(line.split()[1])
    return total


def test_a_postgresql_restart_under_load_loses_no_mail_and_no_answered_hit(
        tmp_path, cluster, upstream):
    url = cluster.url
    engine.connect_url(StoreSettings(None, url)).close()
    nodes = []
    for name in "ab":
        config, smtp, http = node_config(tmp_path, name, url)
        config.write_text(config.read_text().replace(
            f'capture_dir = "outbox-{name}"',
            f'host = "127.0.0.1"\nport = {upstream.port}\ntls = "none"\ntimeout = 10'))
        nodes.append((config, smtp, http))
    smtp_ports, http_ports = [n[1] for n in nodes], [n[2] for n in nodes]
    with relay_process(*nodes[0]), relay_process(*nodes[1]):
        for port in smtp_ports:
            assert smtp_reply(port, message()) == 250
        links = [u for r in upstream.received for u in tracking_urls(r.data)]
        load = Load(smtp_ports, http_ports, links)
        load.start()
        try:
            wait_until(lambda: len(load.replies) >= 6 and len(load.answered) >= 20,
                       timeout=60, what="mail and hits going through")
            cluster.stop()
            down = len(load.replies)
            wait_until(lambda: 451 in load.codes_since(down, 0) | load.codes_since(down, 1),
                       timeout=60, what="SMTP answering 451 while PostgreSQL is down")
            wait_until(lambda: lost_hits(http_ports) > 0, timeout=60,
                       what="hits answered and counted as lost while PostgreSQL is down")
            cluster.start()
            up = len(load.replies)
            # both nodes connect again by themselves
            wait_until(lambda: all(250 in load.codes_since(up, node) for node in (0, 1)),
                       timeout=90, what="mail accepted by both nodes again")
            answered_after = len(load.answered)
            wait_until(lambda: len(load.answered) >= answered_after + 20, timeout=60,
                       what="hits answered again")
        finally:
            load.stop()
        lost = lost_hits(http_ports)
    accepted = {mid for _, code, mid in load.replies if code == 250}
    delivered = {message_id(r.data) for r in upstream.received}
    assert accepted <= delivered, accepted - delivered
    assert set(load.answered) <= {200, 302}
    db = pg.connect_rows(url)
    try:
        [(stored,)] = db.execute("SELECT count(*) FROM events WHERE implied = 0").fetchall()
        [(half_way,)] = db.execute(
            "SELECT count(*) FROM recipients WHERE status = 'sending'").fetchall()
    finally:
        db.close()
    # every answered hit is stored or counted as lost (a commit whose answer the restart cut
    # off is both: stored, and counted since the node could not know)
    assert stored <= len(load.answered) <= stored + lost, (stored, lost, len(load.answered))
    assert half_way == 0
