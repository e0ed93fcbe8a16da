"""What every ``relay`` command shares: the config it finds without --config, and output for
people by default, one JSON document with --json."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import pytest

from relay import cli
from relay.admin.commands import CONFIG_ENV
from relay.config import StoreSettings
from relay.store import queue

# Long-running services print logs, not a result.
SERVICES = {"serve", "smtp", "http"}


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
           ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable subcommand, as (its words, its parser)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(leaves(sub, (*path, name)))
    return found or [(path, parser)]


def test_every_command_but_the_services_has_json():
    commands = leaves(cli._parser())
    assert {words[0] for words, _ in commands} >= SERVICES | {"settings", "events"}
    for words, parser in commands:
        options = {o for a in parser._actions for o in a.option_strings}
        assert ("--json" in options) == (words[0] not in SERVICES), words


@pytest.fixture
def config(tmp_path: Path, store_settings: StoreSettings) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(f'[store]\nurl = "{store_settings.url}"\n'
                    '[http]\npublic_url = "http://track.test"\n')
    return str(path)


# Each command with --json, in an order that gives every one something to act on.
QUEUED = "email_01890a5d-ac96-774b-bcce-b302099a8058"
JSON_RUNS = [
    ["check-config"],
    ["hash-password", "--password-stdin"],
    ["api-keys", "create", "ops"], ["api-keys", "list"], ["api-keys", "revoke", "ops"],
    ["settings", "set", "--opens", "on"], ["settings", "set", "--domain", "shop.example",
                                           "--clicks", "off"],
    ["settings", "show"], ["settings", "clear", "--domain", "shop.example"],
    ["domains", "add", "track.shop.example"], ["domains", "list"],
    ["domains", "remove", "track.shop.example"],
    ["tags", "add", "spring"], ["tags", "list"], ["tags", "remove", "spring"],
    ["stats", "--since", "2026-01-01", "--until", "2026-01-02"], ["stats", "--by", "url"],
    ["events", "--since", "2026-01-01"],
    ["webhooks", "add", "hook", "https://hooks.example/in"], ["webhooks", "list"],
    ["webhooks", "enable", "hook"], ["webhooks", "deliveries"],
    ["webhooks", "replay", "--failed"], ["webhooks", "remove", "hook"],
    ["messages", "list"], ["messages", "show", "email_01890a5d-ac96-774b-bcce-b302099a8057"],
    ["purge", "--older-than", "30"], ["erase", "nobody@example.org"],
    ["users", "add", "alice"], ["users", "list"], ["users", "remove", "alice"], ["migrate"],
    ["queue", "list"], ["queue", "show", QUEUED], ["queue", "hold", QUEUED],
    ["queue", "release", QUEUED], ["queue", "retry", QUEUED], ["queue", "retry", "--all"],
    ["queue", "delete", QUEUED],
]


def test_json_output_of_every_command_is_one_json_document(config, store_conn, capsys,
                                                           monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a password\nanother\n"))
    conn = store_conn
    conn.execute("INSERT INTO messages (email_id, sender, sender_domain, track_opens, "
                 "track_clicks, decision, size, created_at) VALUES (?, 'a@shop.example', "
                 "'shop.example', 0, 0, 'tracking off by account default', 10, 0)",
                 ("email_01890a5d-ac96-774b-bcce-b302099a8057",))
    queue.enqueue(conn, queue.NewMessage(QUEUED, "a@shop.example", ["b@example.org"], b"x",
                                         [], "", "", "ESMTP", 0, 1), 10, 1000)
    for words in JSON_RUNS:
        needs_config = words[0] != "hash-password"
        code = cli.main([*words, "--json", *(["--config", config] if needs_config else [])])
        out, err = capsys.readouterr()
        assert code == 0, (words, err)
        assert isinstance(json.loads(out), dict), words
    untried = {words for words, _ in leaves(cli._parser()) if words[0] not in SERVICES
               and not any(tuple(run[:len(words)]) == words for run in JSON_RUNS)}
    # verify needs DNS (test_domains runs it); store copy two stores (test_postgres runs it)
    assert untried == {("domains", "verify"), ("store", "copy")}


def test_human_output_is_sentences_and_tables_not_reprs(config, capsys):
    for words, expected in [
        (["settings", "set", "--opens", "on"], "account: opens=on clicks=off\n"),
        (["settings", "set", "--domain", "Shop.example", "--clicks", "off"],
         "domain shop.example: opens=inherit clicks=off exclude_hosts=-\n"),
        (["tags", "add", "spring"], "added spring\n"),
    ]:
        assert cli.main([*words, "--config", config]) == 0
        assert capsys.readouterr().out == expected
    assert cli.main(["api-keys", "create", "ops", "--config", config]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("rk_") and out.count("\n") == 1  # the key alone, for $(...)
    assert "shown only this once" in err
    assert cli.main(["api-keys", "list", "--config", config]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "NAME", "CREATED", "STATE", "PERMISSIONS"]


def test_config_comes_from_the_environment_then_the_search_path(config, tmp_path, capsys,
                                                               monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    if not os.path.exists("/etc/relay/relay.toml"):
        assert cli.main(["tags", "list"]) == 2
        assert capsys.readouterr().err == (
            "relay: no configuration file: give --config FILE or set RELAY_CONFIG (tried "
            "./relay.toml, /etc/relay/relay.toml)\n")
    monkeypatch.setenv(CONFIG_ENV, config)
    assert cli.main(["check-config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == config
    monkeypatch.delenv(CONFIG_ENV)
    (elsewhere / "relay.toml").write_text(Path(config).read_text())
    assert cli.main(["check-config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == "./relay.toml"
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    assert cli.main(["check-config"]) == 2
    assert capsys.readouterr().err == (f"relay: configuration error: {tmp_path}/missing.toml:"
                                       " -: file not found\n")
