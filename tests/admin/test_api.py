"""The API's frame: API keys from the CLI, 401s, JSON errors, the OpenAPI document."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import pytest

from relay import config as config_module
from relay.admin import apikeys
from relay.store import engine as store
from tests.clients import call, cli
from tests.harness import base_settings


@pytest.fixture
def api(make_relay):
    relay = make_relay(http=True)
    conn = store.connect_url(relay.config.store)
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


def raw_call(relay, key, method, path, data: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{relay.http_url}/api/v1{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bodies_that_are_not_clean_utf8_json_are_400s(api):
    """An unknown charset in Content-Type made aiohttp raise LookupError (500); a lone
    surrogate reached SQLite, which cannot store it (500)."""
    relay, _, key = api
    account = b'{"opens": true, "clicks": true}'
    status, _ = raw_call(relay, key, "PUT", "/settings/account", account,
                         "application/json; charset=x")  # JSON is UTF-8 whatever it says
    assert status == 200
    for data in (b'{"opens": true, "clicks": "\\ud800"}', b'{"opens": true, "\xff": 1}'):
        status, body = raw_call(relay, key, "PUT", "/settings/account", data, "application/json")
        assert status == 400, (data, body)
        assert body["error"]["status"] == 400
    status, body = raw_call(relay, key, "POST", "/webhook-deliveries/replay",
                            b'{"batch_ids": ["\\ud800"]}', "application/json")
    assert status == 400


def test_what_clients_control_is_bounded(api):
    relay, _, key = api
    long_url = {"name": "hook", "url": "https://hooks.example/" + "a" * 2100}
    status, body = call(relay, key, "POST", "/webhooks", long_url)
    assert status == 400 and "longer than 2048" in body["error"]["message"]
    hosts = [f"h{i}.example" for i in range(101)]
    status, body = call(relay, key, "PUT", "/settings/domains/shop.example",
                        {"exclude_hosts": hosts})
    assert status == 400 and "at most 100" in body["error"]["message"]
    status, _ = call(relay, key, "PUT", "/settings/domains/shop.example",
                     {"exclude_hosts": "cdn.example"})
    assert status == 400


def test_the_openapi_document_lists_the_statuses_the_api_answers(api):
    relay, _, key = api
    document = call(relay, key, "GET", "/openapi.json")[1]

    def documented(method: str, template: str, path: str, body: object = None) -> None:
        status, _ = call(relay, key, method, path, body)
        responses = document["paths"][template][method.lower()]["responses"]
        assert str(status) in responses, (method, path, status, sorted(responses))

    hook = {"name": "hook", "url": "https://hooks.example/in"}
    documented("POST", "/webhooks", "/webhooks", hook)  # 201
    documented("POST", "/webhooks", "/webhooks", hook)  # 409
    documented("DELETE", "/webhooks/{name}", "/webhooks/hook")  # 204
    documented("DELETE", "/webhooks/{name}", "/webhooks/hook")  # 404
    documented("POST", "/tags", "/tags", {"name": "spring"})  # 201
    documented("POST", "/tags", "/tags", {"name": "spring"})  # 200
    documented("DELETE", "/tags/{name}", "/tags/nope")  # 404
    documented("GET", "/settings/domains/{domain}", "/settings/domains/shop.example")  # 404
    documented("GET", "/tracking-domains/{host}", "/tracking-domains/t.shop.example")  # 404


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
    conn = store.connect_url(config_module.load(config).store)
    assert apikeys.authenticate(conn, secret) == ("ops", "full")
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
