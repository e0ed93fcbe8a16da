"""Shared fixtures: the upstream SMTP server and the relay, started for a test and stopped
after it (see harness.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from relay import config as config_module
from relay.clock import Clock
from relay.store import engine
from tests import pg
from tests.dnsserver import DnsServer
from tests.harness import LoopThread, Relay, UpstreamServer, base_settings, store_url

# No hypothesis deadline: an example's time says how loaded the machine is, not whether the code
# is right, and a test never fails because the machine was slow (test_limits did, at load 10).
settings.register_profile("relay", deadline=None)
settings.load_profile("relay")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With RELAY_TEST_STORE=postgresql, the tests about SQLite itself do not run."""
    if pg.ENGINE == "postgresql":
        skip = pytest.mark.skip(reason="about the SQLite engine (RELAY_TEST_STORE=postgresql)")
        for item in items:
            if item.get_closest_marker("sqlite_only"):
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def postgresql_database() -> Iterator[None]:
    """The PostgreSQL database the run's stores were made in (tests/pg.py), dropped after it."""
    yield
    pg.drop_database()


@pytest.fixture
def loops() -> Iterator[LoopThread]:
    loops = LoopThread()
    yield loops
    loops.close()


@pytest.fixture
def upstream(loops: LoopThread) -> Iterator[UpstreamServer]:
    server = UpstreamServer(loops)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_relay(loops: LoopThread, tmp_path: Path
               ) -> Iterator[Callable[..., Relay]]:
    """``make_relay(settings_dict, upstream=server)``: a running relay; closed after the test."""
    started: list[Relay] = []

    def make(overrides: dict[str, Any] | None = None, upstream: UpstreamServer | None = None,
             http: bool = False, clock: Clock | None = None) -> Relay:
        settings = base_settings(tmp_path)
        if upstream is not None:
            settings["upstream"] = {"host": "127.0.0.1", "port": upstream.port, "tls": "none",
                                    "timeout": 10}
        for table, values in (overrides or {}).items():
            if isinstance(values, dict):
                settings.setdefault(table, {}).update(values)
            else:
                settings[table] = values
        relay = Relay(loops, config_module.parse(settings, "test.toml", tmp_path), http=http,
                      clock=clock)
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.close()


@pytest.fixture
def store_settings(tmp_path: Path) -> config_module.StoreSettings:
    """A new store of the run's engine: a SQLite file in ``tmp_path``, or with
    RELAY_TEST_STORE=postgresql a schema of its own (tests/pg.py)."""
    return config_module.store_settings(store_url(tmp_path), "test.toml", "store.url", tmp_path)


@pytest.fixture
def store_conn(store_settings: config_module.StoreSettings) -> Iterator[Any]:
    """A migrated connection to the store of ``store_settings``."""
    conn = engine.connect_url(store_settings)
    yield conn
    conn.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A DNS server on a loopback UDP port; point ``[dns] nameservers`` at ``.address``."""
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key (PEM) for the relay's TLS listeners."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
