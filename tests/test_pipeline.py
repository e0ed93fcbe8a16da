"""The pipeline with an upstream that fails in an unforeseen way for one copy: the copies
that went out are recorded, so a retry sends only the failed one."""

from __future__ import annotations

from harness import base_settings

from relay import config as config_module
from relay.keys import load_keyring
from relay.pipeline import Incoming, MailPipeline
from relay.smtp_out import Copy, Reply, stuff
from relay.store import Store

MESSAGE = (b"From: News <news@shop.example>\r\nTo: list@example.org\r\nSubject: Hi\r\n"
           b"Message-ID: <once@shop.example>\r\nX-Anypost-Track-Opens: true\r\n"
           b"Content-Type: text/html\r\n\r\n<html><body>Hi</body></html>\r\n")


class BrokenFor:
    """An upstream that accepts every copy but raises a bug-like error for one recipient."""

    def __init__(self, broken: str) -> None:
        self.broken = broken
        self.sent: list[str] = []

    async def send(self, copy: Copy) -> dict[str, Reply]:
        if self.broken in copy.recipients:
            raise ValueError("a bug in the upstream client")
        self.sent.extend(copy.recipients)
        return {r: Reply(250, "2.0.0 OK") for r in copy.recipients}

    async def close(self) -> None:
        return None


async def test_an_unforeseen_failure_defers_only_its_own_copy(tmp_path):
    config = config_module.parse(base_settings(tmp_path), "test.toml", tmp_path)
    store = await Store.open(config.store.path)
    try:
        upstream = BrokenFor("b@example.org")
        pipeline = MailPipeline(config, store, load_keyring(config.tracking, store.writer),
                                upstream)
        incoming = Incoming("news@shop.example", ["a@example.org", "b@example.org"],
                            stuff(MESSAGE))
        reply = await pipeline.process(incoming)
        assert reply.startswith("451 ")
        assert "b@example.org: 451 4.3.0 Internal error while forwarding" in reply
        assert upstream.sent == ["a@example.org"]
        upstream.broken = "nobody"
        assert (await pipeline.process(incoming)).startswith("250 ")
        assert upstream.sent == ["a@example.org", "b@example.org"]
    finally:
        await store.close()
