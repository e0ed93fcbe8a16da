"""The certificate manager against a real store of the run's engine: a certificate that runs
out (its renewals failed for 30 days) takes its host off https for new links in every
process."""

from __future__ import annotations

from relay.certs.contexts import CertificateSet
from relay.certs.manager import CertificateManager
from relay.certs.plan import FAILED, Certificate, expiry
from relay.config import StoreSettings, parse
from relay.store import certificates
from relay.store.engine import open_store
from relay.store.rules import RulesCache
from tests.clock import ManualClock

HOST = "t.example"


def test_an_expired_certificate_sends_new_links_back_to_http(store_settings: StoreSettings,
                                                             loops, certificate) -> None:
    cert_file, key_file = certificate
    chain, key = cert_file.read_text(), key_file.read_text()
    not_after = expiry(chain)
    clock = ManualClock(not_after - 60)
    config = parse({"http": {"tls_listen": "127.0.0.1:8443"},
                    "acme": {"directory": "https://ca.invalid/dir", "email": "ops@example.org"}})
    async def scenario() -> None:
        store = await open_store(store_settings)
        try:
            failing = Certificate(HOST, FAILED, chain, key, not_after, "timeout", 9,
                                  not_after + 600)
            await store.write(lambda conn: certificates.put(conn, failing))
            manager = CertificateManager(store, config, CertificateSet(), order=False,
                                         clock=clock.time)
            rules = RulesCache(store, clock.time)
            await manager.refresh()
            assert (await rules.current()).secure_hosts == {HOST}

            clock.now = not_after + 1
            await manager.refresh()
            assert (await rules.current()).secure_hosts == frozenset()
            first_seen = (await rules.current()).generation
            await manager.refresh()  # seen once: no bump on every tick
            assert (await rules.current()).generation == first_seen
        finally:
            await store.close()

    loops.run(scenario())
