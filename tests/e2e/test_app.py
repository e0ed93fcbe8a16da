"""The relay as users run it: the ``relay`` command in a subprocess, stopped by a signal."""

from __future__ import annotations

import multiprocessing
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from relay import config as config_module
from relay.app import _stop_workers, http_port
from relay.ids import new_email_id
from relay.tracking.tokens import sign_open
from tests.harness import Relay, base_settings, free_port, store_url, wait_until


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"relay exited: {process.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)  # polling a port that is not open yet; not a synchronisation sleep
    raise AssertionError(f"port {port} never opened")


def write_config(tmp_path: Path, smtp_port: int, http_port: int, workers: int = 1,
                 store: str | None = None) -> Path:
    """``store``: the run's engine unless given (tests/harness.py store_url)."""
    config = tmp_path / "relay.toml"
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
workers = {workers}
[upstream]
capture_dir = "outbox"
[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
[store]
url = "{store or store_url(tmp_path)}"
""")
    return config


def start(command: str, config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relay", command, "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


MESSAGE = (b"From: a@shop.example\r\nTo: b@example.org\r\nSubject: hi\r\n"
           b"X-Anypost-Track-Opens: true\r\nContent-Type: text/html\r\n\r\n"
           b"<html><body>hello</body></html>\r\n")


def test_serve_relays_tracks_and_stops_on_sigterm(tmp_path):
    smtp_port, http_port = free_port(), free_port()
    process = start("serve", write_config(tmp_path, smtp_port, http_port))
    try:
        wait_for_port(smtp_port, process)
        wait_for_port(http_port, process)
        with smtplib.SMTP("127.0.0.1", smtp_port) as client:
            client.sendmail("a@shop.example", ["b@example.org"], MESSAGE)
        [eml] = (tmp_path / "outbox").glob("*.eml")
        pixel = f"http://127.0.0.1:{http_port}/o/".encode()
        assert pixel in eml.read_bytes().replace(b"=\r\n", b"")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz") as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, process.stderr.read()


def workers_of(pid: int) -> list[int]:
    """Child processes started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in command:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_smtp_workers_share_the_port_and_a_dead_worker_stops_the_relay(tmp_path):
    smtp_port = free_port()
    process = start("smtp", write_config(tmp_path, smtp_port, free_port(), workers=2))
    try:
        wait_for_port(smtp_port, process)
        deadline = time.monotonic() + 20
        while not workers_of(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the worker process to appear
        [worker] = workers_of(process.pid)[:1]
        for n in range(6):  # six messages (a retry of one would be delivered once)
            with smtplib.SMTP("127.0.0.1", smtp_port) as client:
                client.sendmail("a@shop.example", ["b@example.org"],
                                f"Message-ID: <{n}@shop.example>\r\n".encode() + MESSAGE)
        assert len(list((tmp_path / "outbox").glob("*.eml"))) == 6
        os.kill(worker, signal.SIGKILL)
        assert process.wait(20) == 1
        assert "died" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()



def _stay(ready: Event) -> None:
    ready.set()
    while True:
        time.sleep(60)  # a worker that runs until a signal ends it


def _ignore_sigterm(ready: Event) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stay(ready)


def test_stopping_workers_kills_only_the_one_that_ignores_sigterm_at_the_deadline():
    context = multiprocessing.get_context("spawn")
    workers = []
    for target in (_stay, _ignore_sigterm):
        ready = context.Event()
        worker = context.Process(target=target, args=(ready,), daemon=True)
        worker.start()
        assert ready.wait(20)
        workers.append(worker)
    _stop_workers(workers, timeout=0.5)
    assert [worker.exitcode for worker in workers] == [-signal.SIGTERM, -signal.SIGKILL]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.sqlite_only  # a request held in progress by SQLite's write lock
def test_a_stop_closes_both_listeners_before_draining(loops, tmp_path):
    """SMTP went on taking mail while HTTP requests in progress finished (up to 60 s), and the
    two drains added up past systemd's stop timeout."""
    settings = base_settings(tmp_path)
    settings["upstream"] = {"capture_dir": str(tmp_path / "outbox")}
    relay = Relay(loops, config_module.parse(settings, "test.toml", tmp_path), http=True)
    smtp_port, web_port = relay.smtp_port, http_port(relay.services.http)
    token = sign_open(relay.services.keyring, new_email_id(), "a@example.org")
    lock = sqlite3.connect(relay.config.store.path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the hit below waits for the write lock: a request in progress
    with ThreadPoolExecutor(2) as pool:
        hit = pool.submit(urllib.request.urlopen, f"{relay.http_url}/o/{token}", timeout=30)
        wait_until(lambda: relay.services.store._pending, what="the hit waiting for the lock")
        stopping = pool.submit(relay.close)
        wait_until(lambda: refused(web_port), what="HTTP to stop listening")
        assert refused(smtp_port)
        lock.execute("COMMIT")
        stopping.result(30)
        assert hit.result(30).status == 200
    lock.close()


def run_relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          timeout=60)


def test_a_port_in_use_or_a_bad_store_is_one_line_not_a_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, free_port(), taken.getsockname()[1],
                              store="sqlite:///relay.db")  # a bad SQLite file follows
        done = run_relay("serve", "--config", str(config))
    last = done.stderr.splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last.startswith("relay: ") and last.endswith("address already in use")
    (tmp_path / "relay.db").write_bytes(b"not a database, just bytes " * 100)
    done = run_relay("tags", "list", "--config", str(config))
    assert (done.returncode, done.stderr) == (
        1, f"relay: store {tmp_path / 'relay.db'}: file is not a database\n")
    (tmp_path / "blocked").write_text("")  # a file where the store's directory should be
    config.write_text(config.read_text().replace('"sqlite:///relay.db"',
                                                 '"sqlite:///blocked/relay.db"'))
    done = run_relay("serve", "--config", str(config))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"relay: store {tmp_path / 'blocked' / 'relay.db'}: ")
