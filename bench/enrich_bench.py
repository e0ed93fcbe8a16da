"""Enrichment cost per hit: user agent parse (cached and not), location lookup, anonymization.

Run by hand (needs ``mmdb-writer``, a test dependency, to build a database)::

    /work/venv/bin/python bench/enrich_bench.py [--hits 200000]

The database has 20,000 city networks (IPv4 and IPv6), about the depth of a real GeoLite2
tree around a hit. Addresses are drawn from those networks so that every lookup finds a
record. Each line is microseconds per call, the best of three runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.tracking.bots import PERSON  # noqa: E402
from relay.tracking.enrich import AgentParser, Enricher, GeoDatabase, anonymize_ip  # noqa: E402

AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.10827; Pro)",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/UD1A.230803.041; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/126.0.6478.71 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.3.1",
)
NETWORKS = 20_000


def build_database(path: Path, rng: random.Random) -> list[str]:
    """Write the database; return one address inside each network."""
    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-City", ipv4_compatible=True)
    addresses = []
    for index in range(NETWORKS):
        if index % 2:
            prefix = f"2001:db8:{index:x}::"
            network, address = f"{prefix}/48", f"{prefix}{rng.randrange(1, 65535):x}"
        else:
            base = f"{(index >> 8) + 1}.{index & 255}.{rng.randrange(256)}"
            network, address = f"{base}.0/24", f"{base}.{rng.randrange(1, 255)}"
        writer.insert_network(IPSet([network]), {
            "country": {"iso_code": "DE", "names": {"en": "Germany"}},
            "subdivisions": [{"iso_code": "BE", "names": {"en": "Berlin"}}],
            "city": {"names": {"en": f"City {index}"}},
        })
        addresses.append(address)
    writer.to_db_file(str(path))
    return addresses


def per_call(name: str, function: Callable[[Any], object], inputs: Sequence[Any]) -> None:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for item in inputs:
            function(item)
        best = min(best, time.perf_counter() - started)
    print(f"{name:<46} {best / len(inputs) * 1e6:8.2f} us")


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--hits", type=int, default=200_000)
    hits = options.parse_args().hits
    rng = random.Random(8)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench-city.mmdb"
        addresses = build_database(path, rng)
        ips = [rng.choice(addresses) for _ in range(hits)]
        agents = [rng.choice(AGENTS) for _ in range(hits)]
        distinct = [f"{rng.choice(AGENTS)} n/{n}" for n in range(hits // 20)]
        parser = AgentParser()
        geo = GeoDatabase(path)
        enricher = Enricher(parser, geo, anonymize=True)
        per_call("user agent, uncached parse (distinct agents)", parser.parse_uncached,
                 distinct)
        per_call("user agent, cached parse", parser.parse, agents)
        per_call("location lookup, uncached", geo.locate_uncached, ips)
        per_call("location lookup, cached (addresses repeat)", geo.locate, ips)
        per_call("anonymize address", anonymize_ip, ips)
        pairs = list(zip(agents, ips, strict=True))
        per_call("describe (cached agent, lookup, anonymize)",
                 lambda pair: enricher.describe(*pair, PERSON), pairs)
        uncached = Enricher(AgentParser(cache_size=0), geo, anonymize=True)
        per_call("describe without the agent cache",
                 lambda pair: uncached.describe(*pair, PERSON), pairs[:hits // 10])
        geo.close()


if __name__ == "__main__":
    main()
