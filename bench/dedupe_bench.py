"""What recognising retries costs the mail path: the pipeline with ``smtp.dedupe_hours`` on
(content digest, a claim per message and recipient taken in the store before sending, settled
in the record's transaction) beside the same pipeline with it off (the reference), same run.

Run: /work/venv/bin/python bench/dedupe_bench.py [--messages N] [--concurrency C]

The newsletter of ../shared/bench (opens and clicks on, one recipient each, a distinct
Message-ID per message, as an application sends them) goes through ``MailPipeline.process``
with a real SQLite store; the upstream takes every copy at once without a network (so the
figures are the relay's own work, not SMTP's). Rounds alternate off/on; best of them each.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import tempfile
import time
from pathlib import Path

from relay import config as config_module
from relay.smtp import processes
from relay.smtp.pipeline import Incoming, MailPipeline
from relay.smtp.upstream import Copy, Reply
from relay.store.engine import open_store
from relay.tracking.keys import load_keyring

SHARED = Path(__file__).resolve().parents[2] / "shared"
ACCEPTED = Reply(250, "2.0.0 Ok")


class TakesEverything:
    """An upstream with no network: every copy accepted at once."""

    async def send(self, copy: Copy) -> dict[str, Reply]:
        return {r: ACCEPTED for r in copy.recipients}

    async def close(self) -> None:
        return None


async def round_(dedupe_hours: float, messages: list[bytes], concurrency: int
                 ) -> tuple[float, float]:
    """(messages per second, CPU microseconds per message) through the pipeline,
    ``concurrency`` at a time. The CPU time (this process's, threads included) is what to
    compare on a loaded machine: wall time there depends on the other processes."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = {
            "smtp": {"dedupe_hours": dedupe_hours, "hostname": "relay.bench"},
            "http": {"public_url": "https://track.shop.example"},
            "store": {"url": f"sqlite:///{tmp}/relay.db"},
            "tracking": {"keys": {"k1": "k" * 32}, "current_key": "k1"},
        }
        config = config_module.parse(settings, "bench.toml", Path(tmp))
        store = await open_store(config.store)
        try:
            # as the relay makes it (relay/app.py): through store.write, on either engine
            keyring = await store.write(functools.partial(load_keyring, config.tracking))
            pipeline = MailPipeline(config, store, keyring, TakesEverything(),
                                    me=await store.write(processes.register))
            queue = list(reversed(messages))

            async def client() -> None:
                while queue:
                    incoming = Incoming("news@shop.example", ["reader@example.org"],
                                        queue.pop(), peer="127.0.0.1")
                    reply = await pipeline.process(incoming)
                    assert reply.startswith("250 "), reply

            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            return len(messages) / wall, cpu / len(messages) * 1e6
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    newsletter = (SHARED / "bench" / "newsletter.eml").read_bytes()
    newsletter = newsletter.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    messages = [newsletter.replace(b"<bench-1@", f"<bench-{i}@".encode())
                for i in range(args.messages)]
    rate = {0.0: 0.0, 72.0: 0.0}
    cpu = {0.0: float("inf"), 72.0: float("inf")}
    for _ in range(args.rounds):
        for hours in rate:
            r, c = asyncio.run(round_(hours, messages, args.concurrency))
            rate[hours], cpu[hours] = max(rate[hours], r), min(cpu[hours], c)
    print(f"{args.messages} messages, {args.concurrency} at a time, best of {args.rounds} "
          f"rounds (shared, loaded machine: compare within a run only, CPU time first)")
    for label, hours in (("dedupe off (reference)", 0.0), ("dedupe on", 72.0)):
        print(f"{label:24s}{cpu[hours]:7.0f} us CPU/msg {rate[hours]:8.0f} msg/s wall")
    print(f"{'on - off':24s}{cpu[72.0] - cpu[0.0]:+7.0f} us CPU/msg "
          f"{rate[72.0] / rate[0.0]:8.2f}x wall")


if __name__ == "__main__":
    main()
