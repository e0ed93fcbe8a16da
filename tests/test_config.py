"""Configuration: defaults, the example file, and errors that name the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import load, parse
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads_with_capture_upstream():
    cfg = load(ROOT / "config.example.toml")
    assert str(cfg.smtp.listen) == "127.0.0.1:2525"
    assert str(cfg.http.listen) == "127.0.0.1:8080"
    assert cfg.upstream.host is None
    assert cfg.upstream.capture_dir == ROOT / "var" / "outbox"
    assert cfg.store.path == ROOT / "var" / "relay.db"
    assert (cfg.tracking.opens, cfg.tracking.clicks) == (False, False)


@pytest.mark.parametrize(("document", "key", "problem"), [
    ({"smtp": {"listen": "nowhere"}}, "smtp.listen", "HOST:PORT"),
    ({"smtp": {"allowed_networks": ["10.0.0.0/33"]}}, "smtp.allowed_networks", "not an IP"),
    ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients", "greater than 0"),
    ({"smtp": {"max_recipients": "5"}}, "smtp.max_recipients", "expected int"),
    ({"smtp": {"users": [{"name": "a", "password_hash": "plain"}]}},
     "smtp.users[0].password_hash", "hash-password"),
    ({"upstream": {"host": "x", "capture_dir": "y"}}, "upstream.capture_dir", "not both"),
    ({"upstream": {"tls": "maybe"}}, "upstream.tls", "starttls"),
    ({"http": {"public_url": "ftp://x"}}, "http.public_url", "http(s) URL"),
    ({"store": {"url": "postgres://x"}}, "store.url", "sqlite:///"),
    ({"tracking": {"opens": "yes"}}, "tracking.opens", "expected bool"),
    ({"tracking": {"keys": {"k1": "short"}}}, "tracking.keys.k1", "32 characters"),
    ({"tracking": {"keys": {"k1": "k" * 32}, "current_key": "k2"}}, "tracking.current_key",
     "no key"),
    ({"smtp": {"listen_on": "x"}}, "smtp.listen_on", "unknown setting"),
    ({"domains": [{"name": "nodot"}]}, "domains[0].name", "domain name"),
])
def test_errors_name_file_and_key(document, key, problem):
    with pytest.raises(ConfigError) as info:
        parse(document, "relay.toml")
    assert info.value.file == "relay.toml"
    assert info.value.key == key
    assert problem in info.value.problem


def test_check_config_command_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nmax_message_size = -1\n')
    result = subprocess.run([sys.executable, "-m", "relay", "check-config", "--config", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{bad}: smtp.max_message_size: must be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
    good = subprocess.run([sys.executable, "-m", "relay", "check-config", "--config",
                           str(ROOT / "config.example.toml")], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout


def test_invalid_toml_is_reported_with_the_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
