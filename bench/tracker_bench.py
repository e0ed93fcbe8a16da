"""Tracker throughput: ``relay http`` with durable events beside a bare aiohttp app.

Run by hand (needs ``wrk``, the Debian package)::

    /work/venv/bin/python bench/tracker_bench.py [--duration 10] [--connections 50] [--floor]

Each server runs as its own process, one at a time, on loopback: the bare app, ``relay http``
as relay/app.py wires it (with the event listeners of the webhook outbox and the statistics
rollup), and with ``--tracker-only`` also the tracker alone (relay/tracking/tracker.py's app, no
listeners), which isolates the cost of the tracker's own write path. ``--workers N`` runs
``relay http`` with ``[http] workers = N`` and N copies of the others on one port. wrk cycles
through many signed tokens (every message has its own recipients, each with a few links, and
a browser user agent), so the tracker does its real work per request: verify the token,
classify, commit the event (group commit) and only then answer. The bare app answers the same
paths with the same responses (GIF, 302 with a fixed Location) and does nothing else. After
the runs the events in the SQLite file are counted against the requests wrk completed.

``--postgresql SERVER`` (e.g. ``postgresql://postgres@127.0.0.1:5432``) runs ``relay http`` on
SQLite and on PostgreSQL (a database of its own on SERVER, filled by copying the SQLite store
as ``relay store copy`` does, dropped at the end), each with 1 and 2 worker processes, beside
the bare app with 1 and 2 processes: how PostgreSQL scales with workers on this machine, beside
SQLite. ``--workers`` is not used then.

``--floor`` then measures, in this process and without HTTP, what the durable write alone
costs per click (the tracker's own ``Recorder.write`` and COMMIT in batches, on a fresh store
with the same listeners), what one bare row into a bare table costs and what opening the click's
token costs, beside the bare app's time per request: how much of the gap to the bare app is the
store's, and how much the token's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.app import running  # noqa: E402
from relay.config import Config, StoreSettings, load  # noqa: E402
from relay.ids import new_email_id  # noqa: E402
from relay.store import copy  # noqa: E402
from relay.store.engine import connect, connect_url, migrate  # noqa: E402
from relay.tracking.bots import CLICK  # noqa: E402
from relay.tracking.events import Hit  # noqa: E402
from relay.tracking.tokens import Keyring, RecipientSigner, verify  # noqa: E402
from relay.tracking.tracker import PIXEL, RECORDER, build_app  # noqa: E402

SECRET = "bench-secret-0123456789abcdef-0123456789"
KEYRING = Keyring({"b1": SECRET.encode()}, "b1")
AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"

BARE_APP = """
import sys
from aiohttp import web
PIXEL = {pixel!r}
HEADERS = {{"Content-Type": "image/gif", "Cache-Control": "no-store, private"}}
REDIRECT = {{"Location": "https://shop.example/landing", "Cache-Control": "no-store, private"}}
async def pixel(request):
    return web.Response(body=PIXEL, headers=HEADERS)
async def click(request):
    return web.Response(status=302, headers=REDIRECT)
app = web.Application()
app.router.add_get("/o/{{token}}", pixel)
app.router.add_get("/c/{{token}}", click)
app.router.add_get("/healthz", lambda request: web.json_response({{"status": "ok"}}))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            reuse_port=True)
"""

TRACKER_ONLY = """
import asyncio, sys
from pathlib import Path
from aiohttp import web
sys.path.insert(0, {root!r})
from relay.config import load
from relay.tracking.keys import load_keyring
from relay.store.engine import Store
from relay.tracking.tracker import build_app
async def main():
    config = load(Path(sys.argv[1]))
    store = await Store.open(config.store.path)
    runner = web.AppRunner(build_app(config, store, load_keyring(config.tracking, store.writer)),
                           access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.http.listen.host, config.http.listen.port,
                      reuse_port=True).start()
    await asyncio.Event().wait()
asyncio.run(main())
"""

LUA = """
local paths = {{{paths}}}
local headers = {{["User-Agent"] = "{agent}"}}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1], headers)
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(folder: Path, messages: int, recipients: int, links: int) -> tuple[Path, list[str],
                                                                              list[str]]:
    """A migrated store with the messages sent a day ago, and click and open paths."""
    db = folder / "relay.db"
    conn = connect(db)
    migrate(conn)
    clicks, opens = [], []
    sent = time.time() - 86400
    with conn:
        conn.execute("BEGIN")
        for _ in range(messages):
            email_id = new_email_id()
            conn.execute(
                "INSERT INTO messages (email_id, sender, sender_domain, track_opens, "
                "track_clicks, decision, size, created_at) VALUES (?, ?, ?, 1, 1, ?, 0, ?)",
                (email_id, "news@shop.example", "shop.example", "bench", sent))
            for r in range(recipients):
                signer = RecipientSigner(KEYRING, email_id, f"reader{r}.{len(opens)}@example.net")
                opens.append("/o/" + signer.open())
                clicks.extend("/c/" + signer.click(f"https://shop.example/item/{n}?utm=bench")
                              for n in range(links))
    conn.close()
    return db, clicks, opens


def write_config(folder: Path, db: Path | str, port: int, workers: int = 1,
                 name: str = "relay") -> Path:
    """A config for ``relay http`` on ``db`` (a SQLite file, or a store's URL)."""
    config = folder / f"{name}.toml"
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    config.write_text(
        f'[http]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'workers = {workers}\n'
        f'[store]\nurl = "{url}"\n'
        # wrk is one address with one agent: the flood rule would make every hit past the
        # 300th automation; off, so that the person path is what is measured
        f'[tracking]\ncurrent_key = "b1"\nflood_hits = 0\n[tracking.keys]\nb1 = "{SECRET}"\n'
        f'[logging]\nlevel = "WARNING"\n')
    return config


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def wrk(port: int, script: Path, args: argparse.Namespace, servers: list[int]
        ) -> dict[str, float]:
    """wrk's figures, and the CPU the servers (their worker processes included) and wrk used
    while it ran, in cores."""
    server_before, wrk_before = cpu_seconds(servers), children_cpu_seconds()
    started = time.monotonic()
    out = subprocess.run(
        ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
         "-s", str(script), f"http://127.0.0.1:{port}"],
        check=True, capture_output=True, text=True).stdout
    elapsed = time.monotonic() - started
    result = {"server_cpu": (cpu_seconds(servers) - server_before) / elapsed,
              "wrk_cpu": (children_cpu_seconds() - wrk_before) / elapsed}
    result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["bad"] = float(errors.group(1)) if errors else 0.0
    for pct in (50, 75, 90, 99):  # wrk leaves out a percentile it has no sample for
        result[f"p{pct}"] = float("nan")
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)$", out,
                                       re.M):
        result[f"p{pct}"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0,
                                            "m": 60000.0}[unit]
    return result


def run(command: list[str], copies: int, port: int, script: Path, args: argparse.Namespace
        ) -> dict[str, float]:
    processes = [subprocess.Popen(command, cwd=ROOT) for _ in range(copies)]
    try:
        for process in processes:
            wait_ready(port, process)
        return wrk(port, script, args, [process.pid for process in processes])
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of these processes and their descendants so far."""
    ticks = 0
    for pid in tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree(pids: list[int]) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, ()))
    return found


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def line(name: str, r: dict[str, float]) -> str:
    return (f"  {name:<24} {r['rps']:>9,.0f} req/s   p50 {r['p50']:6.2f} ms   "
            f"p75 {r['p75']:6.2f} ms   p90 {r['p90']:6.2f} ms   p99 {r['p99']:6.2f} ms   "
            f"CPU: server {r['server_cpu']:.2f}, wrk {r['wrk_cpu']:.2f}"
            + (f"   NON-2xx/3xx {r['bad']:.0f}" if r["bad"] else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--recipients", type=int, default=10, help="per message")
    parser.add_argument("--links", type=int, default=5, help="per message")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes per server: relay's [http] workers, copies of the others")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the durable write alone, in process, without HTTP")
    parser.add_argument("--tracker-only", action="store_true",
                        help="also run the tracker without the app's event listeners")
    parser.add_argument("--postgresql", metavar="SERVER",
                        help="also run relay http on PostgreSQL (a database of its own on "
                             "SERVER), 1 and 2 workers each")
    args = parser.parse_args()
    if args.postgresql:
        return engines(args)

    with tempfile.TemporaryDirectory(prefix="tracker-bench-") as tmp:
        folder = Path(tmp)
        db, clicks, opens = prepare(folder, args.messages, args.recipients, args.links)
        random.Random(1).shuffle(clicks)
        scripts = {}
        for name, paths in (("click", clicks), ("open", opens)):
            scripts[name] = folder / f"{name}.lua"
            scripts[name].write_text(LUA.format(paths=", ".join(f'"{p}"' for p in paths),
                                                agent=AGENT))
        bare = folder / "bare.py"
        bare.write_text(BARE_APP.format(pixel=PIXEL))
        alone = folder / "tracker_only.py"
        alone.write_text(TRACKER_ONLY.format(root=str(ROOT)))
        port = free_port()
        config = str(write_config(folder, db, port, args.workers))
        servers = [("bare aiohttp", [sys.executable, str(bare), str(port)], args.workers),
                   ("relay http (durable)", [sys.executable, "-m", "relay", "http",
                                             "--config", config], 1)]
        if args.tracker_only:
            servers.append(("tracker only (durable)", [sys.executable, str(alone), config],
                            args.workers))
        print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
              f"{args.workers} process(es) per server, "
              f"{len(clicks)} click and {len(opens)} open tokens, {os.cpu_count()} CPUs")
        completed = 0.0
        for name in ("click", "open"):
            print(f"/{name[0]}/<token>")
            base: dict[str, float] | None = None
            for label, command, copies in servers:
                result = run(command, copies, port, scripts[name], args)
                print(line(label, result))
                if base is None:
                    base = result
                    if name == "click":
                        bare_click_rps = result["rps"]
                    continue
                completed += result["requests"]
                print(f"  {'':<24} ratio to bare {result['rps'] / base['rps']:.1%}")
        with sqlite3.connect(db) as conn:
            (stored,) = conn.execute("SELECT count(*) FROM events WHERE NOT implied").fetchone()
            (counted,) = conn.execute("SELECT count(*) FROM events WHERE counted").fetchone()
        print(f"events stored {stored:,} (counted {counted:,}) for {completed:,.0f} completed "
              "requests (wrk counts a request cut off at the end too)")
        if args.floor:
            floor(folder / "floor", args, bare_click_rps)
    return 0


def engines(args: argparse.Namespace) -> int:
    """``relay http`` on SQLite and on PostgreSQL with 1 and 2 workers, beside the bare app."""
    import psycopg

    database = f"relay_tracker_bench_{os.getpid()}"
    with psycopg.connect(f"{args.postgresql}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    url = f"{args.postgresql}/{database}"
    try:
        with tempfile.TemporaryDirectory(prefix="tracker-bench-") as tmp:
            folder = Path(tmp)
            db, clicks, opens = prepare(folder, args.messages, args.recipients, args.links)
            random.Random(1).shuffle(clicks)
            source, target = connect(db), connect_url(StoreSettings(None, url))
            copy.copy(source, target)
            target.execute("VACUUM ANALYZE")
            source.close()
            bare = folder / "bare.py"
            bare.write_text(BARE_APP.format(pixel=PIXEL))
            port = free_port()
            servers = [(f"bare aiohttp, {n}", [sys.executable, str(bare), str(port)], n)
                       for n in (1, 2)]
            for store, name in ((db, "SQLite"), (url, "PostgreSQL")):
                for n in (1, 2):
                    config = write_config(folder, store, port, n, f"{name}-{n}")
                    servers.append((f"relay http {name}, {n}",
                                    [sys.executable, "-m", "relay", "http", "--config",
                                     str(config)], 1))
            print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
                  f"{len(clicks)} click and {len(opens)} open tokens, {os.cpu_count()} CPUs; "
                  "N: worker processes")
            for kind, paths in (("click", clicks), ("open", opens)):
                script = folder / f"{kind}.lua"
                script.write_text(LUA.format(paths=", ".join(f'"{p}"' for p in paths),
                                             agent=AGENT))
                print(f"/{kind[0]}/<token>")
                rps = {}
                for label, command, copies in servers:
                    result = run(command, copies, port, script, args)
                    rps[label] = result["rps"]
                    print(line(label, result))
                for name in ("SQLite", "PostgreSQL"):
                    one, two = rps[f"relay http {name}, 1"], rps[f"relay http {name}, 2"]
                    print(f"  {name}: 2 workers {two / one:.2f}x one")
                print(f"  PostgreSQL 1 worker / SQLite 1 worker: "
                      f"{rps['relay http PostgreSQL, 1'] / rps['relay http SQLite, 1']:.2f}")
            (stored,) = target.execute("SELECT count(*) FROM events WHERE implied = 0"
                                       ).fetchone()
            print(f"events stored in PostgreSQL: {stored:,}")
            target.close()
    finally:
        with psycopg.connect(f"{args.postgresql}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return 0


def floor(folder: Path, args: argparse.Namespace, bare_rps: float) -> None:
    """What the durable write alone costs per click, without HTTP, beside the time per request
    of the bare app: the work a click must do that the bare app does not."""
    folder.mkdir()
    db, clicks, _ = prepare(folder, args.messages, args.recipients, args.links)
    random.Random(1).shuffle(clicks)
    config = load(write_config(folder, db, free_port()))
    recorder_us = asyncio.run(recorder_write_cost(config, clicks[:FLOOR_HITS]))
    insert_us = bare_insert_cost(folder / "bare.db")
    verify_us = verify_cost(clicks[:FLOOR_HITS])
    bare_us = 1e6 / bare_rps
    print(f"per click, no HTTP (one CPU): the store write in batches of {FLOOR_BATCH}, the token")
    print(f"  {'Recorder.write + COMMIT':<36} {recorder_us:6.1f} µs  "
          f"(ceiling {1e6 / recorder_us:,.0f} clicks/s with no HTTP at all)")
    print(f"  {'one bare row into a bare table':<36} {insert_us:6.1f} µs")
    print(f"  {'tokens.verify of the click token':<36} {verify_us:6.1f} µs")
    print(f"  {'bare aiohttp, whole request':<36} {bare_us:6.1f} µs  "
          f"(75% of its rate leaves {bare_us / 0.75 - bare_us:.1f} µs per click for our work)")


FLOOR_HITS = 20000
FLOOR_BATCH = 50


async def recorder_write_cost(config: Config, paths: list[str]) -> float:
    """µs per click of Recorder.write (classify, enrich, insert, listeners) plus its COMMIT,
    on the store and listeners ``relay http`` runs with."""
    async with running(config, smtp=False, http=False) as services:
        app = build_app(config, services.store, services.keyring,
                        listeners=services.event_listeners)
        recorder, conn = app[RECORDER], services.store.writer
        targets = [verify(services.keyring, path[3:]) for path in paths]
        started = time.perf_counter()
        for i in range(0, len(targets), FLOOR_BATCH):
            hits = [Hit(CLICK, time.time(), t.email_id, t.recipient, t.url, "10.1.2.3", AGENT)
                    for t in targets[i:i + FLOOR_BATCH]]
            conn.execute("BEGIN IMMEDIATE")
            recorder.write(conn, hits)
            conn.execute("COMMIT")
        return (time.perf_counter() - started) / len(targets) * 1e6


def verify_cost(paths: list[str]) -> float:
    """µs per token of ``tokens.verify`` (decode, authenticate, unpack), best of 5 rounds."""
    tokens = [path[3:] for path in paths]
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for token in tokens:
            verify(KEYRING, token)
        rounds.append((time.perf_counter() - started) / len(tokens) * 1e6)
    return min(rounds)


def bare_insert_cost(db: Path) -> float:
    """µs per row of group-committed inserts of a 300-byte row keyed by a time-ordered id into a
    table with no other index: the least a durable event can cost in SQLite here."""
    conn = connect(db)
    conn.execute("CREATE TABLE hits (id TEXT PRIMARY KEY, data BLOB) WITHOUT ROWID")
    payload = os.urandom(150).hex().encode()
    started = time.perf_counter()
    for batch in range(FLOOR_HITS // FLOOR_BATCH):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO hits VALUES (?, ?)",
                         ((f"{batch:08d}-{i:04d}", payload) for i in range(FLOOR_BATCH)))
        conn.execute("COMMIT")
    conn.close()
    return (time.perf_counter() - started) / FLOOR_HITS * 1e6


if __name__ == "__main__":
    raise SystemExit(main())
