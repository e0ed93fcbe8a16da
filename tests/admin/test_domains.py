"""Tracking domains: name rules, the state a check leaves, real DNS lookups against a server
on loopback, and the whole story through SMTP, the CLI, the API and the metrics."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import pytest

from relay.admin import dnscheck
from relay.config import Address, DnsSettings, parse
from relay.errors import ConfigError, InvalidInput
from relay.policy import domains, names
from relay.policy.domains import (
    FAILED,
    MATCH,
    OUTAGE,
    PENDING,
    VERIFIED,
    WRONG,
    Check,
    TrackingDomain,
)
from tests.clients import (
    api_key,
    call,
    cli,
    data_reply,
    decision,
    message,
    tracking_urls,
    write_config,
)

TARGET = "track.test"  # the host of the test relay's http.public_url
HOST = "track.shop.example"


@pytest.mark.parametrize("host", [
    "abc.shop.example", "a-1.shop.example", "TRACK.shop.example", "x" * 63 + ".shop.example",
])
def test_valid_tracking_hosts(host):
    assert names.tracking_host(host, "shop.example") == host.lower()


@pytest.mark.parametrize(("host", "problem"), [
    ("ab.shop.example", "3-63"),
    ("x" * 64 + ".shop.example", "3-63"),
    ("-abc.shop.example", "3-63"),
    ("abc-.shop.example", "3-63"),
    ("a_c.shop.example", "3-63"),
    ("123.shop.example", "all digits"),
    ("track.other.example", "under shop.example"),
    ("track.sub.shop.example", "under shop.example"),  # a child, not a parent
    ("track.example", "domain name"),  # the parent would be a top-level domain
    ("track", "under shop.example"),
])
def test_invalid_tracking_hosts(host, problem):
    with pytest.raises(InvalidInput, match=problem):
        names.tracking_host(host, "shop.example")


def test_parent_of_the_sender_domain_is_allowed():
    assert names.tracking_host("click.shop.example", "mail.shop.example") == "click.shop.example"


def test_config_rejects_a_bad_tracking_host_and_nameserver():
    with pytest.raises(ConfigError, match=r"domains\[0\]\.tracking_host: prefix '12'"):
        parse({"domains": [{"name": "shop.example", "tracking_host": "12.shop.example"}]})
    with pytest.raises(ConfigError, match=r"dns\.nameservers\[0\]"):
        parse({"dns": {"nameservers": ["dns.example"]}})
    cfg = parse({"dns": {"nameservers": ["127.0.0.1:5353", "::1", "[::1]:53"]}})
    assert cfg.dns.nameservers == (Address("127.0.0.1", 5353), Address("::1", 53),
                                   Address("::1", 53))


def test_after_check_states():
    pending = TrackingDomain(HOST, "shop.example")
    verified = domains.after_check(pending, Check(MATCH, "ok"), 1.0)
    assert (verified.state, verified.reason, verified.checked_at) == (VERIFIED, None, 1.0)
    outage = domains.after_check(verified, Check(OUTAGE, "Timeout"), 2.0)
    assert outage.state == VERIFIED and "state kept" in outage.last_check
    failed = domains.after_check(outage, Check(WRONG, "points elsewhere"), 3.0)
    assert (failed.state, failed.reason) == (FAILED, "points elsewhere")
    assert domains.after_check(failed, Check(OUTAGE, "SERVFAIL"), 4.0).reason == "points elsewhere"


def test_branded_url_keeps_scheme_and_port():
    assert domains.branded_url("https://t.example", HOST) == f"https://{HOST}"
    assert domains.branded_url("http://t.example:8080", HOST) == f"http://{HOST}:8080"
    assert domains.cname_target("https://Relay.Example:8443") == "relay.example"


def lookup(server, host, target=TARGET, timeout=2.0):
    settings = DnsSettings((Address("127.0.0.1", server.port),), timeout)
    return asyncio.run(dnscheck.check(host, target, dnscheck.make_resolver(settings)))


def test_dns_check_outcomes(dns_server):
    dns_server.cname(HOST, "TRACK.test.")
    assert lookup(dns_server, HOST).result == MATCH
    dns_server.cname(HOST, "elsewhere.example")
    found = lookup(dns_server, HOST)
    assert found.result == WRONG
    assert "CNAME to elsewhere.example, expected track.test" in found.detail
    dns_server.a(HOST, "192.0.2.1")
    assert "has no CNAME record" in lookup(dns_server, HOST).detail
    dns_server.nxdomain(HOST)
    assert "NXDOMAIN" in lookup(dns_server, HOST).detail
    dns_server.servfail(HOST)
    assert lookup(dns_server, HOST).result == OUTAGE
    dns_server.drop(HOST)
    assert lookup(dns_server, HOST, timeout=0.3).result == OUTAGE
    assert (HOST, "CNAME") in dns_server.queries
    assert "IP address" in lookup(dns_server, HOST, target="127.0.0.1").detail


def relay_with_domain(make_relay, upstream, dns_server, **dns):
    return make_relay({
        "tracking": {"opens": True, "clicks": True},
        "domains": [{"name": "shop.example", "tracking_host": HOST}],
        "dns": {"nameservers": [dns_server.address], "timeout": 0.3, **dns},
    }, upstream=upstream, http=True)


def test_mail_is_untracked_until_the_cname_is_verified_then_uses_the_branded_host(
        make_relay, upstream, dns_server, tmp_path):
    relay = relay_with_domain(make_relay, upstream, dns_server)
    code, reply = data_reply(relay, message())
    assert code == 250
    assert tracking_urls(upstream.received[-1].data) == []
    assert decision(relay, reply) == ("opens and clicks tracked by account default, delivered"
                                      f" untracked: tracking domain {HOST} is pending"
                                      " (not verified yet)")
    config = write_config(relay, tmp_path / "cli.toml")
    missing = cli(config, "domains", "verify", HOST)
    assert missing.returncode == 1 and "NXDOMAIN" in missing.stdout
    dns_server.cname(HOST, TARGET)
    verified = cli(config, "domains", "verify", HOST)
    assert verified.returncode == 0, verified.stderr
    assert f"{HOST}: verified" in verified.stdout
    code, reply = data_reply(relay, message())
    urls = tracking_urls(upstream.received[-1].data)
    assert len(urls) == 3 and all(u.startswith(f"http://{HOST}/") for u in urls)
    assert decision(relay, reply).startswith("opens and clicks tracked by account default")
    pixel = next(u for u in urls if "/o/" in u)
    request = urllib.request.Request(relay.http_url + pixel.removeprefix(f"http://{HOST}"),
                                     headers={"Host": HOST})
    with urllib.request.urlopen(request, timeout=10) as response:  # served under the branded host
        assert (response.status, response.headers["Content-Type"]) == (200, "image/gif")
    listed = cli(config, "domains", "list")
    assert HOST in listed.stdout and VERIFIED in listed.stdout


def test_an_encoded_display_name_does_not_choose_the_sender_domain(make_relay, upstream,
                                                                   dns_server):
    """Decoded first, ``=?utf-8?q?sales=40partner.example?=`` read as the address: mail from
    shop.example, whose tracking domain is not verified, went out tracked as partner.example."""
    relay = relay_with_domain(make_relay, upstream, dns_server)
    spoofed = message().replace(b"From: News <", b"From: =?utf-8?q?sales=40partner.example?= <")
    code, reply = data_reply(relay, spoofed)
    assert code == 250
    assert tracking_urls(upstream.received[-1].data) == []
    assert decision(relay, reply).endswith(f"tracking domain {HOST} is pending (not verified yet)")


def test_wrong_record_fails_and_an_outage_keeps_the_state(make_relay, upstream, dns_server,
                                                        caplog):
    relay = relay_with_domain(make_relay, upstream, dns_server)
    key = api_key(relay)
    dns_server.cname(HOST, TARGET)
    status, body = call(relay, key, "POST", f"/tracking-domains/{HOST}/verify")
    assert status == 200 and body["state"] == VERIFIED
    dns_server.servfail(HOST)
    with caplog.at_level(logging.WARNING, logger="relay.domains"):
        status, body = call(relay, key, "POST", f"/tracking-domains/{HOST}/verify")
    assert body["state"] == VERIFIED and body["check"]["result"] == OUTAGE
    assert any("still verified" in r.getMessage() for r in caplog.records)
    data_reply(relay, message())
    assert len(tracking_urls(upstream.received[-1].data)) == 3
    dns_server.cname(HOST, "old-esp.example")
    status, body = call(relay, key, "POST", f"/tracking-domains/{HOST}/verify")
    assert body["state"] == FAILED and "old-esp.example" in body["reason"]
    code, reply = data_reply(relay, message())
    assert tracking_urls(upstream.received[-1].data) == []
    assert f"tracking domain {HOST} is failed ({HOST} is a CNAME to old-esp.example" in decision(
        relay, reply)
    with urllib.request.urlopen(f"{relay.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'relay_tracking_domains{state="failed"} 1.0' in text
    assert 'relay_tracking_domains{state="verified"} 0.0' in text


def test_tracking_domains_api_add_get_remove(make_relay, upstream, dns_server):
    relay = make_relay({"dns": {"nameservers": [dns_server.address]}}, upstream=upstream,
                       http=True)
    key = api_key(relay)
    status, body = call(relay, key, "POST", "/tracking-domains",
                        {"host": "links.shop.example", "sender_domain": "mail.shop.example"})
    assert status == 201
    assert (body["state"], body["sender_domain"]) == (PENDING, "mail.shop.example")
    assert body["dns_record"] == {"type": "CNAME", "name": "links.shop.example", "value": TARGET}
    status, body = call(relay, key, "POST", "/tracking-domains", {"host": "ab.shop.example"})
    assert status == 400 and "3-63" in body["error"]["message"]
    status, body = call(relay, key, "POST", "/tracking-domains",
                        {"host": "other.shop.example", "sender_domain": "mail.shop.example"})
    assert status == 400 and "remove it first" in body["error"]["message"]
    status, body = call(relay, key, "GET", "/tracking-domains")
    assert [d["host"] for d in body["domains"]] == ["links.shop.example"]
    assert call(relay, key, "DELETE", "/tracking-domains/links.shop.example")[0] == 204
    assert call(relay, key, "GET", "/tracking-domains/links.shop.example")[0] == 404


def test_cli_add_and_remove(make_relay, upstream, tmp_path):
    relay = make_relay(upstream=upstream)
    config = write_config(relay, tmp_path / "cli.toml")
    added = cli(config, "domains", "add", "click.shop.example")
    assert added.returncode == 0, added.stderr
    assert f"click.shop.example. CNAME {TARGET}." in added.stdout
    assert cli(config, "domains", "add", "12345.shop.example").returncode == 1
    # the spelling add accepts (capitals, a trailing dot) names the same domain later
    assert cli(config, "domains", "remove", "Click.Shop.Example.").returncode == 0
    assert cli(config, "domains", "remove", "click.shop.example").returncode == 1


def test_periodic_recheck_round_marks_a_vanished_record_failed(make_relay, upstream,
                                                              dns_server, loops):
    relay = relay_with_domain(make_relay, upstream, dns_server, recheck_interval=0)
    dns_server.cname(HOST, TARGET)
    resolver = dnscheck.make_resolver(relay.config.dns)
    store = relay.services.store
    [(first, _)] = loops.run(dnscheck.recheck_all(store, relay.config, resolver))
    assert first.state == VERIFIED
    dns_server.nxdomain(HOST)
    [(second, result)] = loops.run(dnscheck.recheck_all(store, relay.config, resolver))
    assert (second.state, result.result) == (FAILED, WRONG)


def test_branded_url_keeps_the_path_of_public_url():
    assert domains.branded_url("https://relay.example/t", HOST) == f"https://{HOST}/t"
    assert domains.branded_url("http://relay.example:8080/a/b", HOST) == f"http://{HOST}:8080/a/b"
