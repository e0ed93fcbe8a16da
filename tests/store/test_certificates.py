"""The ACME tables (relay/store/certificates.py) on the run's engine (a SQLite file, or
PostgreSQL), two connections as two nodes: one lease holder at a time, certificates and
challenge answers kept."""

from __future__ import annotations

from relay.certs.plan import VALID, Certificate
from relay.config import StoreSettings
from relay.store import certificates
from relay.store.engine import connect_url


def nodes(settings: StoreSettings):
    return connect_url(settings), connect_url(settings)


def test_one_node_holds_the_lease_until_it_drops_it_or_it_runs_out(
        store_settings: StoreSettings) -> None:
    a, b = nodes(store_settings)
    assert certificates.take_lease(a, "acme", "a", 100.0, 60)
    assert not certificates.take_lease(b, "acme", "b", 101.0, 60)
    assert certificates.take_lease(a, "acme", "a", 150.0, 60)  # extended: to 210
    assert not certificates.take_lease(b, "acme", "b", 209.0, 60)
    assert certificates.take_lease(b, "acme", "b", 210.0, 60)  # ran out: taken over
    assert not certificates.take_lease(a, "acme", "a", 211.0, 60)
    certificates.drop_lease(a, "acme", "a")  # not a's any more: no effect
    assert not certificates.take_lease(a, "acme", "a", 212.0, 60)
    certificates.drop_lease(b, "acme", "b")
    assert certificates.take_lease(a, "acme", "a", 213.0, 60)


def test_certificates_and_answers_are_shared(store_settings: StoreSettings) -> None:
    a, b = nodes(store_settings)
    cert = Certificate("t.example", VALID, "chain", "key", 5.0, updated_at=1.0)
    certificates.put(a, cert)
    certificates.put(a, Certificate("u.example"))
    assert certificates.get(b, "t.example") == cert
    assert certificates.secure_hosts(b, 4.0) == frozenset({"t.example"})
    assert certificates.secure_hosts(b, 5.0) == frozenset()  # ran out: no new https links
    certificates.add_challenges(a, [("tok", "tok.thumb")], 1.0)
    assert certificates.challenge(b, "tok") == "tok.thumb"
    certificates.remove_challenges(a, ["tok"])
    assert certificates.challenge(b, "tok") is None
    certificates.save_account(a, "https://ca/dir", "pem", None, 1.0)
    certificates.save_account(a, "https://ca/dir", "pem", "https://ca/acct/1", 2.0)
    assert certificates.account(b, "https://ca/dir") == ("pem", "https://ca/acct/1")
