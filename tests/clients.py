"""Clients the settings, domains and tags tests share: SMTP (DATA reply and what arrived),
the JSON API with a key, the ``relay`` CLI in another process, and a config file for it."""

from __future__ import annotations

import itertools
import json
import re
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from relay.admin import apikeys
from relay.store import engine as store
from tests.harness import Relay

_SENT = itertools.count()


def message(sender: str = "news@shop.example", headers: str = "") -> bytes:
    """A new message at each call (its own Message-ID), as an application sends them."""
    return (f"From: News <{sender}>\r\nTo: a@example.org\r\nSubject: News\r\n{headers}"
            f"Message-ID: <{next(_SENT)}.{time.time_ns()}@shop.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            '<html><body><a href="https://shop.example/sale">Sale</a>'
            '<a href="https://pay.example/now">Pay</a></body></html>\r\n').encode()


def data_reply(relay: Relay, msg: bytes, sender: str = "news@shop.example") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        assert client.rcpt("a@example.org")[0] == 250
        code, text = client.data(msg)
    return code, text.decode()


def decoded(data: bytes) -> str:
    """A forwarded copy with quoted-printable undone, well enough to find URLs."""
    return re.sub(rb"=([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                  data.replace(b"=\r\n", b"")).decode()


def tracking_urls(data: bytes) -> list[str]:
    return re.findall(r"https?://[a-z0-9.:-]+/[oc]/[A-Za-z0-9_-]+", decoded(data))


def decision(relay: Relay, reply: str) -> str:
    email_id = re.search(r"email_[0-9a-f-]{36}", reply).group()
    with relay.db() as db:
        return db.execute("SELECT decision FROM messages WHERE email_id = ?",
                          (email_id,)).fetchone()[0]


def api_key(relay: Relay) -> str:
    return apikeys.create(store.connect_url(relay.config.store), "tests")


def call(relay: Relay, key: str | None, method: str, path: str, body: Any = None
         ) -> tuple[int, Any]:
    """An API request (without an Authorization header when ``key`` is None)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    request = urllib.request.Request(f"{relay.http_url}/api/v1{path}", data=data,
                                     method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def write_config(relay: Relay, path: Path) -> Path:
    """A config file naming the running relay's store, tracking host and nameservers."""
    cfg = relay.config
    servers = ", ".join(f'"{a}"' for a in cfg.dns.nameservers)
    path.write_text(f'[store]\nurl = "{cfg.store.url}"\n'
                    f'[http]\npublic_url = "{cfg.http.public_url}"\n'
                    f"[dns]\nnameservers = [{servers}]\ntimeout = {cfg.dns.timeout}\n")
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
