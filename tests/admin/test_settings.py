"""Tracking settings: the precedence rule (pure), seeding from the config, the rules cache,
and changes through the CLI (another process) and the API reaching the next message."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest

from relay.admin import seeding
from relay.config import parse
from relay.policy.decide import Controls, toggles
from relay.policy.settings import Account, Domain
from relay.store import engine as store
from relay.store import rules, settings, tags
from relay.store.transaction import transaction
from tests.clients import (
    api_key,
    call,
    cli,
    data_reply,
    decision,
    decoded,
    message,
    tracking_urls,
    write_config,
)


@pytest.mark.parametrize(("account", "domain", "controls", "expected"), [
    (Account(False, False), None, Controls(),
     (False, False, "account default", "account default")),
    (Account(True, False), Domain("d.example"), Controls(),
     (True, False, "account default", "account default")),
    (Account(True, False), Domain("d.example", clicks=True), Controls(),
     (True, True, "account default", "domain d.example")),
    (Account(True, True), Domain("d.example", opens=False), Controls(clicks=False),
     (False, False, "domain d.example", "message headers")),
    (Account(False, False), Domain("d.example", opens=True),
     Controls(clicks=True, clicks_header="X-Anypost-Track-Clicks"),
     (True, True, "domain d.example", "message header X-Anypost-Track-Clicks")),
])
def test_precedence_message_then_domain_then_account(account, domain, controls, expected):
    assert toggles(account, domain, controls) == expected


def migrated(tmp_path):
    conn = store.connect(tmp_path / "relay.db")
    store.migrate(conn)
    return conn


def seed(conn, document):
    with transaction(conn):
        seeding.seed(conn, parse(document))


def test_config_seeds_once_and_the_store_wins_afterwards(tmp_path, caplog):
    conn = migrated(tmp_path)
    shop = {"name": "shop.example", "clicks": True, "exclude_hosts": ["Pay.example"]}
    first = {"tracking": {"opens": True, "tags": ["news", "receipts"]}, "domains": [shop]}
    seed(conn, first)
    assert settings.account(conn) == Account(True, False)
    assert settings.domain(conn, "shop.example") == Domain("shop.example", None, True,
                                                           ("pay.example",))
    assert tags.registered(conn) == {"news", "receipts"}
    with transaction(conn):
        settings.set_account(conn, Account(False, False))
        tags.remove(conn, "news")
    changed = {"tracking": {"opens": True, "clicks": True, "tags": ["news", "receipts", "new"]},
               "domains": [shop]}
    with caplog.at_level(logging.WARNING, logger="relay.settings"):
        seed(conn, changed)
    assert settings.account(conn) == Account(False, False)  # the run-time change is kept
    assert tags.registered(conn) == {"receipts", "new"}  # removed stays removed; new is seeded
    assert any("[tracking] opens/clicks" in r.getMessage() for r in caplog.records)


def test_rules_cache_reloads_only_when_another_connection_changed_something(tmp_path, loops):
    conn = migrated(tmp_path)
    db = loops.run(store.Store.open(tmp_path / "relay.db"))
    try:
        cache = rules.RulesCache(db)
        first = loops.run(cache.current())
        assert loops.run(cache.current()) is first
        with transaction(conn):
            settings.put_domain(conn, Domain("shop.example", opens=True))
        second = loops.run(cache.current())
        assert second is not first and second.domains["shop.example"].opens is True
        assert second.generation == settings.generation(conn)
    finally:
        loops.run(db.close())


def test_cli_change_applies_to_the_next_message_without_restart(make_relay, upstream, tmp_path):
    relay = make_relay(upstream=upstream)
    data_reply(relay, message())
    assert tracking_urls(upstream.received[-1].data) == []
    config = write_config(relay, tmp_path / "cli.toml")
    changed = cli(config, "settings", "set", "--opens", "on", "--clicks", "on")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout == "account: opens=on clicks=on\n"  # not a Python repr
    _, reply = data_reply(relay, message())
    assert len(tracking_urls(upstream.received[-1].data)) == 3
    assert decision(relay, reply).startswith("opens and clicks tracked by account default")
    domain = cli(config, "settings", "set", "--domain", "shop.example", "--clicks", "off",
                 "--exclude-hosts", "pay.example")
    assert domain.returncode == 0, domain.stderr
    assert domain.stdout == ("domain shop.example: opens=inherit clicks=off "
                             "exclude_hosts=pay.example\n")
    _, reply = data_reply(relay, message())
    [pixel] = tracking_urls(upstream.received[-1].data)
    assert "/o/" in pixel
    assert decision(relay, reply).startswith(
        "opens tracked by account default, clicks off by domain shop.example")
    _, reply = data_reply(relay, message(headers="X-Anypost-Track-Clicks: yes\r\n"))
    urls = tracking_urls(upstream.received[-1].data)
    assert len(urls) == 2  # the pixel and the shop link; pay.example is never rewritten
    assert 'href="https://pay.example/now"' in decoded(upstream.received[-1].data)
    shown = cli(config, "settings", "show")
    assert "account: opens=on clicks=on" in shown.stdout
    assert "shop.example  inherit  off     pay.example" in shown.stdout
    assert cli(config, "settings", "set", "--opens", "inherit").returncode == 1
    cleared = cli(config, "settings", "clear", "--domain", "Shop.Example.")  # as set takes it
    assert cleared.returncode == 0, cleared.stderr
    data_reply(relay, message())
    assert len(tracking_urls(upstream.received[-1].data)) == 3


def test_api_reads_and_changes_settings(make_relay, upstream):
    relay = make_relay({"tracking": {"opens": True}}, upstream=upstream, http=True)
    key = api_key(relay)
    status, body = call(relay, key, "GET", "/settings")
    assert status == 200
    assert body == {"account": {"opens": True, "clicks": False}, "domains": []}
    status, body = call(relay, key, "PUT", "/settings/domains/shop.example",
                        {"opens": False, "exclude_hosts": ["PAY.example"]})
    assert status == 200
    assert body == {"domain": "shop.example", "opens": False, "clicks": None,
                    "exclude_hosts": ["pay.example"]}
    _, reply = data_reply(relay, message())
    assert tracking_urls(upstream.received[-1].data) == []
    assert decision(relay, reply) == ("opens off by domain shop.example, clicks off by account "
                                      "default")
    assert call(relay, key, "PUT", "/settings/account", {"opens": True, "clicks": True})[0] == 200
    data_reply(relay, message())
    assert len(tracking_urls(upstream.received[-1].data)) == 1  # clicks; pay.example excluded
    assert call(relay, key, "PUT", "/settings/account", {"opens": "yes"})[0] == 400
    assert call(relay, key, "PUT", "/settings/domains/not_a_domain", {})[0] == 400
    assert call(relay, key, "DELETE", "/settings/domains/shop.example")[0] == 204
    assert call(relay, key, "GET", "/settings/domains/shop.example")[0] == 404


def test_api_refuses_a_deeply_nested_json_body_with_400(make_relay):
    relay = make_relay(http=True)
    key = api_key(relay)
    nested = b'{"opens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = urllib.request.Request(f"{relay.http_url}/api/v1/settings/account", data=nested,
                                     method="PUT", headers={"Authorization": f"Bearer {key}"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 400
    assert json.loads(raised.value.read())["error"]["message"] == "the body must be JSON"
