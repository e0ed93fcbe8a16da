"""The statistics benchmark still runs against the current schema (it inserts rows with SQL of
its own, which a migration can leave behind). Tiny sizes; nothing about speed is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "stats_bench.py"


def test_stats_bench_fills_and_queries_a_small_store(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--events", "2000", "--repeat", "2",
                           "--db", str(tmp_path / "bench.db")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "store: 2,000 events" in done.stdout
    assert "GetTrackList, one week, all senders: median" in done.stdout


def test_dedupe_bench_runs_the_pipeline_both_ways():
    bench = BENCH.with_name("dedupe_bench.py")
    done = subprocess.run([sys.executable, str(bench), "--messages", "20", "--rounds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dedupe on " in done.stdout and "on - off" in done.stdout


def test_messages_bench_fills_and_searches_a_small_store(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH.with_name("messages_bench.py")),
                           "--messages", "2000", "--repeat", "2", "--reference-repeat", "1",
                           "--db", str(tmp_path / "bench.db")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "store: 2,000 messages, 4,000 recipients" in done.stdout
    assert "status=failed: 80 messages, median" in done.stdout  # 1 in 50 of 4,000


def test_dashboard_bench_signs_in_and_times_every_page(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH.with_name("dashboard_bench.py")),
                           "--events", "2000", "--repeat", "2", "--db", str(tmp_path / "b.db")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "one message with its events" in done.stdout
    assert "slowest page median" in done.stdout and "reference" in done.stdout


def test_send_api_bench_sends_over_both_paths():
    done = subprocess.run([sys.executable, str(BENCH.with_name("send_api_bench.py")),
                           "--messages", "20", "--concurrency", "4", "--rounds", "1"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "(80 of 80 messages tracked)" in done.stdout  # 2 x (20 + 20 warm-up)
    assert "POST /v1/email" in done.stdout and "API / SMTP" in done.stdout
