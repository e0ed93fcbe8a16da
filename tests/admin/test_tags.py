"""The tag registry: an X-AliDM-Trace TagName must be registered, else a 5xx naming it."""

from __future__ import annotations

import base64
import json

import pytest

from relay.config import parse
from relay.errors import ConfigError
from tests.clients import api_key, call, cli, data_reply, message, write_config


def trace(tag: str) -> str:
    value = json.dumps({"TagName": tag, "OpenTrace": "1", "LinkTrace": "1"}).encode()
    return f"X-AliDM-Trace: {base64.b64encode(value).decode()}\r\n"


def test_unknown_tag_is_refused_naming_it_and_nothing_is_forwarded(make_relay, upstream,
                                                                  tmp_path):
    relay = make_relay({"tracking": {"tags": ["Newsletter"]}}, upstream=upstream)
    code, text = data_reply(relay, message(headers=trace("Promo")))
    assert code == 550
    assert "TagName 'Promo' is not a registered tag" in text
    assert upstream.received == []
    assert data_reply(relay, message(headers=trace("Newsletter")))[0] == 250
    config = write_config(relay, tmp_path / "cli.toml")
    added = cli(config, "tags", "add", "Promo")
    assert added.returncode == 0, added.stderr
    assert data_reply(relay, message(headers=trace("Promo")))[0] == 250
    listed = cli(config, "tags", "list")
    assert "Newsletter" in listed.stdout and "Promo" in listed.stdout
    assert cli(config, "tags", "remove", "Promo").returncode == 0
    assert data_reply(relay, message(headers=trace("Promo")))[0] == 550
    assert cli(config, "tags", "remove", "Promo").returncode == 1
    bad = cli(config, "tags", "add", "no spaces")
    assert bad.returncode == 1 and "1-128" in bad.stderr


def test_tags_api(make_relay, upstream):
    relay = make_relay(upstream=upstream, http=True)
    key = api_key(relay)
    assert call(relay, key, "POST", "/tags", {"name": "Weekly"})[0] == 201
    assert call(relay, key, "POST", "/tags", {"name": "Weekly"})[0] == 200
    assert call(relay, key, "POST", "/tags", {"name": "bad tag"})[0] == 400
    status, body = call(relay, key, "GET", "/tags")
    assert [t["name"] for t in body["tags"]] == ["Weekly"]
    assert data_reply(relay, message(headers=trace("Weekly")))[0] == 250
    assert call(relay, key, "DELETE", "/tags/Weekly")[0] == 204
    code, text = data_reply(relay, message(headers=trace("Weekly")))
    assert code == 550 and "'Weekly'" in text
    assert call(relay, key, "DELETE", "/tags/Weekly")[0] == 404


def test_config_rejects_a_bad_tag():
    with pytest.raises(ConfigError, match=r"tracking\.tags: tag 'a b'"):
        parse({"tracking": {"tags": ["a b"]}})
