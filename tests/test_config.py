"""Configuration: defaults, the example file, and errors that name the file and the key."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import AcmeSettings, Address, HttpSettings, load, parse
from relay.errors import ConfigError
from relay.smtp.passwords import hash_password, verify_password
from relay.webhooks.payloads import new_secret

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads_with_capture_upstream():
    cfg = load(ROOT / "config.example.toml")
    assert str(cfg.smtp.listen) == "127.0.0.1:2525"
    assert str(cfg.http.listen) == "127.0.0.1:8080"
    assert cfg.upstream.host is None
    assert cfg.upstream.capture_dir == ROOT / "var" / "outbox"
    assert cfg.store.path == ROOT / "var" / "relay.db"
    assert (cfg.tracking.opens, cfg.tracking.clicks) == (False, False)
    assert cfg.http == HttpSettings()  # the example shows the defaults


_ACME = {"directory": "https://acme.example/dir"}


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
    ({"http": {"max_connections": 0}}, "http.max_connections", "greater than 0"),
    ({"http": {"max_connections_per_ip": 1.5}}, "http.max_connections_per_ip", "expected int"),
    ({"http": {"header_timeout": 0}}, "http.header_timeout", "greater than 0"),
    ({"http": {"keepalive_timeout": "1"}}, "http.keepalive_timeout", "expected a number"),
    ({"http": {"metrics_allowed_networks": ["localhost"]}}, "http.metrics_allowed_networks",
     "not an IP"),
    ({"store": {"url": "mysql://x/db"}}, "store.url", "sqlite:///"),
    ({"store": {"url": "postgresql://relay:pw@x"}}, "store.url", "names no database"),
    ({"store": {"url": "postgresql://x:port/db"}}, "store.url", "not a PostgreSQL URI"),
    ({"tracking": {"opens": "yes"}}, "tracking.opens", "expected bool"),
    ({"tracking": {"keys": {"k1": "short"}}}, "tracking.keys.k1", "32 characters"),
    ({"tracking": {"keys": {"k1": "k" * 32}, "current_key": "k2"}}, "tracking.current_key",
     "no key"),
    ({"smtp": {"listen_on": "x"}}, "smtp.listen_on", "unknown setting"),
    ({"domains": [{"name": "nodot"}]}, "domains[0].name", "domain name"),
    ({"smtp": {"hostname": "relay host"}}, "smtp.hostname", "not a host name"),
    ({"smtp": {"hostname": "192.0.2.25"}}, "smtp.hostname", "is an IP address"),
    ({"smtp": {"hostname": "[192.0.2.25]"}}, "smtp.hostname", "is an IP address"),
    ({"smtp": {"hostname": "[IPv6:2001:db8::25]"}}, "smtp.hostname", "is an IP address"),
    ({"smtp": {"hostname": "2001:db8::25"}}, "smtp.hostname", "is an IP address"),
    ({"smtp": {"add_received": "no"}}, "smtp.add_received", "expected bool"),
    ({"http": {"tls_listen": "0.0.0.0:443"}}, "http.tls_listen", "or [acme]"),
    ({"http": {"tls_listen": "0.0.0.0:0"}, "acme": _ACME}, "http.tls_listen", "fixed port"),
    ({"http": {"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.pem"}},
     "http.tls_cert", "no such file"),
    ({"http": {"tls_key": "/etc/hostname"}}, "http.tls_cert", "go together"),
    ({"acme": {"email": "ops@shop.example"}}, "acme.directory", "required"),
    ({"acme": {"directory": "http://acme.example/dir"}}, "acme.directory", "https://"),
    ({"acme": {**_ACME, "email": "ops"}}, "acme.email", "email address"),
    ({"acme": {**_ACME, "ca_bundle": "/nonexistent.pem"}}, "acme.ca_bundle", "no such file"),
    ({"acme": {**_ACME, "staging": True}}, "acme.staging", "unknown setting"),
    ({"smtp": {"tls_acme": True}}, "smtp.tls_acme", "[acme]"),
    ({"smtp": {"tls_acme": "yes"}}, "smtp.tls_acme", "expected bool"),
])
def test_errors_name_file_and_key(document, key, problem):
    with pytest.raises(ConfigError) as info:
        parse(document, "relay.toml")
    assert info.value.file == "relay.toml"
    assert info.value.key == key
    assert problem in info.value.problem


def test_tls_and_acme_settings_are_read(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    cfg = parse({"http": {"tls_listen": "0.0.0.0:443", "tls_cert": "cert.pem",
                          "tls_key": "cert.pem"},
                 "acme": {**_ACME, "email": "ops@shop.example", "ca_bundle": "cert.pem"},
                 "smtp": {"tls_acme": True}}, "relay.toml", tmp_path)
    assert (cfg.http.tls_listen, cfg.http.tls_cert) == (Address("0.0.0.0", 443), cert)
    assert cfg.acme == AcmeSettings(_ACME["directory"], "ops@shop.example", cert)
    assert cfg.smtp.tls_acme
    assert parse({}).acme is None


def test_the_relay_is_named_after_the_machine_unless_smtp_hostname_says():
    assert parse({}).smtp.server_name == socket.getfqdn()
    smtp = parse({"smtp": {"hostname": "Relay.Shop.Example."}}).smtp
    assert smtp.server_name == "relay.shop.example"
    assert (smtp.add_received, parse({"smtp": {"add_received": False}}).smtp.add_received) == (
        True, False)


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "check-config", "--config", str(path)],
                          capture_output=True, text=True)


def assert_refused(path: Path, message: str) -> None:
    """``relay check-config`` exits 2 with ``message`` and no traceback."""
    result = check_config(path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_command_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nmax_message_size = -1\n')
    assert_refused(bad, f"{bad}: smtp.max_message_size: must be greater than 0")
    good = check_config(ROOT / "config.example.toml")
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout


@pytest.mark.parametrize("key, value", [("smtp.dedupe_hours", "nan"),
                                        ("smtp.timeout", "inf"),
                                        ("smtp.max_data_seconds", "+inf"),
                                        ("webhook_delivery.retry_hours", "-nan"),
                                        ("http.keepalive_timeout", "-inf")])
def test_check_config_refuses_numbers_that_are_not_finite(tmp_path, key, value):
    """nan passed every bound (nan <= 0 is false): dedupe_hours = nan turned dedupe off,
    timeout = inf the idle timeout."""
    table, name = key.split(".")
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[{table}]\n{name} = {value}\n")
    assert_refused(bad, f"{bad}: {key}: expected a finite number, got {float(value)}")


def test_invalid_toml_is_reported_with_the_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def load_toml(tmp_path: Path, text: str):
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return load(path)


def config_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path, text)
    assert info.value.file == str(tmp_path / "relay.toml")
    return info.value


# --- [[domains]] ---------------------------------------------------------------------------

def test_domain_names_and_excluded_hosts_are_normalised(tmp_path):
    cfg = load_toml(tmp_path, '[[domains]]\nname = " Shop.Example. "\n'
                              'exclude_hosts = ["CDN.Example.", "cdn.example", "img.example"]\n')
    assert cfg.domains[0].name == "shop.example"
    assert cfg.domains[0].settings.exclude_hosts == ("cdn.example", "img.example")


@pytest.mark.parametrize(("entry", "key", "problem"), [
    ('name = "shop..example"', "domains[0].name", "not a domain name"),
    ('name = "shop_example.com"', "domains[0].name", "not a domain name"),
    ("name = 5", "domains[0].name", "expected str"),
    ("opens = true", "domains[0].name", "required"),
    ('name = "shop.example"\nexclude_hosts = [1]', "domains[0].exclude_hosts[0]",
     "expected a host name, got int"),
    ('name = "shop.example"\nexclude_hosts = ["https://cdn.example/x"]',
     "domains[0].exclude_hosts[0]", "not a domain name"),
    ('name = "shop.example"\nexclude_hosts = "cdn.example"', "domains[0].exclude_hosts",
     "expected list"),
])
def test_domain_entries_are_validated(tmp_path, entry, key, problem):
    error = config_error(tmp_path, f"[[domains]]\n{entry}\n")
    assert error.key == key
    assert problem in error.problem


def test_the_file_and_the_api_share_one_rule_for_domains_and_webhooks(tmp_path):
    """A [[domains]] table and a [[webhooks]] table are checked as the API checks what it is
    sent (relay/policy/settings.py, relay/webhooks/payloads.py): the file took 101 excluded
    hosts and a 61 s webhook timeout, which the API refused."""
    hosts = ", ".join(f'"h{i}.example"' for i in range(101))
    error = config_error(tmp_path, f'[[domains]]\nname = "shop.example"\n'
                                   f"exclude_hosts = [{hosts}]\n")
    assert (error.key, error.problem) == ("domains[0].exclude_hosts", "at most 100 hosts")
    hook = ('[[webhooks]]\nname = "crm"\nurl = "https://crm.example/hook"\n'
            f'secret = "{new_secret()}"\n')
    assert load_toml(tmp_path, hook + "timeout = 60\n").webhooks[0].timeout == 60
    error = config_error(tmp_path, hook + "timeout = 61\n")
    assert (error.key, error.problem) == ("webhooks[0].timeout",
                                          "seconds, more than 0 and at most 60")
    endpoint = load_toml(tmp_path, hook).webhooks[0]
    assert replace(endpoint, timeout=61.0).problem() == ("timeout", error.problem)  # the API's


def test_a_domain_configured_twice_is_refused(tmp_path):
    error = config_error(tmp_path, '[[domains]]\nname = "shop.example"\n'
                                   '[[domains]]\nname = "SHOP.example."\n')
    assert (error.key, error.problem) == ("domains[1].name",
                                          "another [[domains]] table is named 'shop.example'")


def test_check_config_reports_a_bad_excluded_host_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[domains]]\nname = "shop.example"\nexclude_hosts = [1]\n')
    assert_refused(bad, f"{bad}: domains[0].exclude_hosts[0]: expected a host name")


# --- http.public_url -----------------------------------------------------------------------

@pytest.mark.parametrize(("url", "problem"), [
    ("http://relay.example:99999", "port"),
    ("http://relay.example:0", "port"),
    ("http://relay.example:8o80", "port"),
    ("http://relay.example/?x=1", "query"),
    ("http://relay.example/t?", "query"),
    ("http://relay.example/#top", "fragment"),
    ("http://user:hunter2@relay.example", "user name or password"),
    ("http://relay.example/a b", "http(s)://HOST[:PORT][/PATH]"),
    ("http://relay_example", "http(s)://HOST[:PORT][/PATH]"),
])
def test_public_url_must_be_usable_as_the_tracking_base(tmp_path, url, problem):
    error = config_error(tmp_path, f'[http]\npublic_url = "{url}"\n')
    assert error.key == "http.public_url"
    assert problem in error.problem
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(("url", "stored"), [
    ("https://relay.example/t/", "https://relay.example/t"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("https://relay.example:443", "https://relay.example:443"),
])
def test_public_url_accepted(tmp_path, url, stored):
    assert load_toml(tmp_path, f'[http]\npublic_url = "{url}"\n').http.public_url == stored


# --- credentials that can never work --------------------------------------------------------

@pytest.mark.parametrize("encoded", [
    "scrypt$garbage",
    "scrypt$16384$8$1$c2FsdA==$ZGlnZXN0$x",
    "bcrypt$16384$8$1$c2FsdA==$ZGlnZXN0",
    "scrypt$lots$8$1$c2FsdA==$ZGlnZXN0",
    "scrypt$16000$8$1$c2FsdA==$ZGlnZXN0",  # N must be a power of 2
    "scrypt$16384$0$1$c2FsdA==$ZGlnZXN0",
    "scrypt$16384$8$0$c2FsdA==$ZGlnZXN0",
    "scrypt$16384$8$1$c2Fs!A==$ZGlnZXN0",
    "scrypt$16384$8$1$c2FsdA==$",
    "scrypt$1048576$8$1$c2FsdA==$ZGlnZXN0",  # needs 1 GiB: more than scrypt may use
])
def test_smtp_password_hash_is_parsed(tmp_path, encoded):
    error = config_error(tmp_path, f'[[smtp.users]]\nname = "app"\npassword_hash = "{encoded}"\n')
    assert error.key == "smtp.users[0].password_hash"
    assert "relay hash-password" in error.problem
    assert encoded not in str(error)


def test_a_hash_from_hash_password_loads_and_verifies(tmp_path):
    encoded = hash_password("s3cret")
    cfg = load_toml(tmp_path, f'[[smtp.users]]\nname = "app"\npassword_hash = "{encoded}"\n')
    assert cfg.smtp.users[0].password_hash == encoded
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3creT", encoded)
    assert not verify_password("s3cret", "scrypt$garbage")


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway RSA key in PKCS#8 PEM, as `openssl genpkey` writes it."""
    path = tmp_path_factory.mktemp("dkim") / "key.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024",
                    "-out", str(path)], check=True, capture_output=True)
    return path


def dkim_table(key_file: Path, domain: str = "shop.example", selector: str = "s1") -> str:
    return (f'[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\n'
            f'private_key_file = "{key_file}"\n')


def test_dkim_key_is_loaded_and_its_domain_normalised(tmp_path, rsa_key):
    cfg = load_toml(tmp_path, dkim_table(rsa_key, domain="Shop.Example."))
    assert cfg.dkim_key("shop.example").private_key == rsa_key.read_bytes()


@pytest.mark.parametrize("content", [
    b"relay-host\n",  # /etc/hostname, say
    b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    b"nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=\n",  # raw Ed25519: not signed with
])
def test_dkim_file_that_is_not_a_usable_private_key_is_refused(tmp_path, content):
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(content)
    error = config_error(tmp_path, dkim_table(key_file))
    assert error.key == "dkim[0].private_key_file"
    assert "RSA private key" in error.problem
    assert content.decode().strip() not in str(error)


@pytest.mark.parametrize(("table", "key"), [
    ({"domain": "shop example"}, "dkim[0].domain"),
    ({"selector": "s\u00e9l"}, "dkim[0].selector"),
    ({"selector": "s1.2024"}, None),
])
def test_dkim_domain_and_selector_are_checked(tmp_path, rsa_key, table, key):
    text = dkim_table(rsa_key, **table)
    if key is None:
        assert load_toml(tmp_path, text).dkim[0].selector == table["selector"]
    else:
        assert config_error(tmp_path, text).key == key


# --- secrets never appear in errors ---------------------------------------------------------

@pytest.mark.parametrize(("text", "key", "problem"), [
    ('[upstream]\nhost = "smtp.example"\nusername = "u"\npassword = 31337424242\n',
     "upstream.password", "expected str, got int"),
    ('[[webhooks]]\nname = "crm"\nurl = "https://crm.example/hook"\nsecret = 31337424242\n',
     "webhooks[0].secret", "expected str, got int"),
    ("[tracking]\nkeys = 31337424242\n", "tracking.keys", "expected dict, got int"),
    ("[tracking.keys]\nk1 = 31337424242\n", "tracking.keys.k1", "string of at least 32"),
    ('[[smtp.users]]\nname = "app"\npassword_hash = 31337424242\n',
     "smtp.users[0].password_hash", "expected str, got int"),
])
def test_secrets_are_not_echoed_in_errors(tmp_path, text, key, problem):
    error = config_error(tmp_path, text)
    assert error.key == key
    assert problem in error.problem
    assert "31337424242" not in str(error)


def test_other_wrong_values_are_still_shown(tmp_path):
    error = config_error(tmp_path, '[smtp]\nmax_recipients = "5"\n')
    assert error.problem == "expected int, got str '5'"
