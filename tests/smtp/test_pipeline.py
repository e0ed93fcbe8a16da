"""The pipeline with an upstream that fails in an unforeseen way for one copy: the copies
that went out are recorded, so a retry sends only the failed one."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

import pytest

from relay import config as config_module
from relay.rewrite.splice import RewriteOptions, prepare
from relay.smtp import processes
from relay.smtp.pipeline import LARGE_IN_FLIGHT, TOKENS_PER_STEP, Incoming, MailPipeline
from relay.smtp.upstream import Copy, Reply
from relay.store.engine import Store, open_store
from relay.tracking.keys import load_keyring
from tests.harness import base_settings

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


async def pipeline_of(config: config_module.Config, store: Store, upstream: Any
                      ) -> MailPipeline:
    """A pipeline made as the relay makes it (relay/app.py), on a store of either engine."""
    keyring = await store.write(functools.partial(load_keyring, config.tracking))
    return MailPipeline(config, store, keyring, upstream, me=await store.write(processes.register))


async def test_an_unforeseen_failure_defers_only_its_own_copy(tmp_path):
    config = config_module.parse(base_settings(tmp_path), "test.toml", tmp_path)
    store = await open_store(config.store)
    try:
        upstream = BrokenFor("b@example.org")
        pipeline = await pipeline_of(config, store, upstream)
        incoming = Incoming("news@shop.example", ["a@example.org", "b@example.org"], MESSAGE)
        reply = await pipeline.process(incoming)
        assert reply.startswith("451 ")
        assert "b@example.org: 451 4.3.0 Internal error while forwarding" in reply
        assert upstream.sent == ["a@example.org"]
        upstream.broken = "nobody"
        assert (await pipeline.process(incoming)).startswith("250 ")
        assert upstream.sent == ["a@example.org", "b@example.org"]
    finally:
        await store.close()


def _links_message(links: int) -> bytes:
    html = "".join(f'<a href="https://shop.example/{i}">{i}</a>\r\n' for i in range(links))
    return (b"From: News <news@shop.example>\r\nTo: list@example.org\r\nSubject: Hi\r\n"
            b"Message-ID: <links@shop.example>\r\n"
            b"X-Anypost-Track-Opens: true\r\nX-Anypost-Track-Clicks: true\r\n"
            b"Content-Type: text/html\r\n\r\n<html><body>" + html.encode()
            + b"</body></html>\r\n")


class Recording:
    """An upstream that keeps every copy and notes how many were being sent at once. A copy
    is held until ``together`` copies are being sent (or 5 s passed), so that how many the
    pipeline lets start does not depend on how fast this machine renders the next one."""

    def __init__(self, together: int) -> None:
        self.copies: list[Copy] = []
        self.sending = self.most = 0
        self.together = together
        self.started = asyncio.Condition()

    async def send(self, copy: Copy) -> dict[str, Reply]:
        async with self.started:
            self.sending += 1
            self.most = max(self.most, self.sending)
            self.started.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.started.wait_for(
                    lambda: self.sending >= self.together), 5)
        for _ in range(20):  # a slow upstream: the other copies get every chance to start
            await asyncio.sleep(0)
        self.sending -= 1
        self.copies.append(copy)
        return {r: Reply(250, "2.0.0 OK") for r in copy.recipients}

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(("links", "most"), [(10, 6), (TOKENS_PER_STEP + 1, LARGE_IN_FLIGHT)])
async def test_copies_of_a_large_message_go_out_a_few_at_a_time(tmp_path, links, most):
    """A copy of a message whose copies are costly to render is rendered when its turn comes,
    and only LARGE_IN_FLIGHT are rendered or being sent at once, whatever the recipients; small
    copies all go out at once, as before. Each copy is the rewrite's own rendering."""
    settings = base_settings(tmp_path)
    settings["smtp"]["add_received"] = False  # the copies as the rewrite renders them
    config = config_module.parse(settings, "test.toml", tmp_path)
    store = await open_store(config.store)
    try:
        upstream = Recording(most)
        pipeline = await pipeline_of(config, store, upstream)
        recipients = [f"r{i}@example.org" for i in range(6)]
        message = _links_message(links)
        reply = await pipeline.process(Incoming("news@shop.example", recipients, message))
        assert reply.startswith("250 ")
        assert upstream.most == most
        email_id = reply.split()[-1]
        clean = message.replace(b"X-Anypost-Track-Opens: true\r\n", b"").replace(
            b"X-Anypost-Track-Clicks: true\r\n", b"")
        prepared = prepare(clean, RewriteOptions(opens=True, clicks=True,
                                                 base_url="http://track.test"))
        assert prepared.tokens == links + 1
        assert sorted((c.recipients[0], c.message) for c in upstream.copies) == sorted(
            (r, prepared.render(email_id, r, pipeline.keyring)) for r in recipients)
    finally:
        await store.close()
