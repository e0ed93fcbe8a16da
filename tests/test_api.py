"""The API's frame: API keys from the CLI, 401s, JSON errors, the OpenAPI document."""

from __future__ import annotations

import hashlib

import pytest
from clients import call, cli
from harness import base_settings

from relay import apikeys, store


@pytest.fixture
def api(make_relay):
    relay = make_relay(http=True)
    conn = store.connect(relay.config.store.path)
    key = apikeys.create(conn, "tests")
    return relay, conn, key


def test_api_requires_a_key(api):
    relay, _, key = api
    status, body = call(relay, None, "GET", "/nothing-here")
    assert status == 401
    assert "Authorization: Bearer" in body["error"]["message"]
    status, body = call(relay, "rk_wrong", "GET", "/nothing-here")
    assert status == 401
    assert body["error"]["message"] == "invalid or revoked API key"
    status, body = call(relay, key, "GET", "/nothing-here")
    assert status == 404
    assert body["error"]["status"] == 404


def test_a_key_that_is_not_utf8_is_just_wrong(api):
    relay, _, _ = api
    status, body = call(relay, "rk_\xe9\xff", "GET", "/nothing-here")
    assert status == 401
    assert body["error"]["message"] == "invalid or revoked API key"


def test_a_huge_number_is_bad_input_not_a_crash(api):
    relay, _, key = api
    body = {"name": "hook", "url": "https://hooks.example/in", "timeout": 10**400}
    status, answer = call(relay, key, "POST", "/webhooks", body)
    assert status == 400
    assert answer["error"]["status"] == 400


def test_ill_typed_fields_and_endless_numbers_are_400s(api):
    relay, _, key = api
    body = {"failed": True, "endpoint": {"name": "hook"}}
    status, answer = call(relay, key, "POST", "/webhook-deliveries/replay", body)
    assert status == 400
    assert answer["error"]["message"].startswith("endpoint")
    status, answer = call(relay, key, "GET", "/events?limit=" + "1" * 5000)  # past int()'s limit
    assert status == 400
    assert answer["error"]["parameter"] == "limit"


def test_revoked_key_stops_working(api):
    relay, conn, key = api
    assert apikeys.revoke(conn, "tests")
    status, _ = call(relay, key, "GET", "/nothing-here")
    assert status == 401


def test_openapi_document_is_served_with_a_key(api):
    relay, _, key = api
    assert call(relay, None, "GET", "/openapi.json")[0] == 401
    status, document = call(relay, key, "GET", "/openapi.json")
    assert status == 200
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_api_keys_cli_create_list_revoke(tmp_path):
    settings = base_settings(tmp_path)
    config = tmp_path / "relay.toml"
    config.write_text(f'[store]\nurl = "{settings["store"]["url"]}"\n')
    created = cli(config, "api-keys", "create", "ops")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("rk_") and len(secret) > 40
    conn = store.connect(tmp_path / "relay.db")
    assert apikeys.authenticate(conn, secret) == "ops"
    # (not read_bytes() of the file: closing another descriptor of a live SQLite file drops
    # this process's POSIX locks on it)
    stored = conn.execute("SELECT name, key_hash FROM api_keys").fetchall()
    assert stored == [("ops", hashlib.sha256(secret.encode()).digest())]
    again = cli(config, "api-keys", "create", "ops")
    assert again.returncode == 1
    assert "exists already" in again.stderr
    listed = cli(config, "api-keys", "list")
    assert "ops" in listed.stdout and "active" in listed.stdout
    assert secret not in listed.stdout
    revoked = cli(config, "api-keys", "revoke", "ops")
    assert revoked.returncode == 0, revoked.stderr
    assert apikeys.authenticate(conn, secret) is None
    assert cli(config, "api-keys", "revoke", "ops").returncode == 1
