"""Cyclic-GC pauses and search latency of a daemon holding many memories.

A real memosd (subprocess, hashing embedder: no model load) gets ``--items``
short turns into one cube through ``add_many`` (1,000 per request); the
daemon's own GC counters (``status`` → ``process``, memosd.gcstats) are
printed every quarter of the load, after the search index has caught up,
once the daemon is idle, and after each of two rounds of ``--searches``
hybrid searches (random four-term queries, k = 10).

With tier policies on (the default; ``--no-tiers`` turns them off) the
daemon migrates the short tier to mid segments in the background after such
a load, which is where long pauses and slow searches come from.

Usage: ``python bench/gc_scale.py [--items N] [--searches 3000] [--no-tiers]``;
``--items`` defaults to ``BENCH_GC_ITEMS``, else 100,000 with ``BENCH_FULL=1``
and 20,000 without (``make bench``'s quick size).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memosd.client import Client
from memosd.errors import Unavailable
from memosd.testing import wait_until_ready

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def _terms(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(12000)) for _ in range(n))


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _row(stage: str, process: dict[str, Any], extra: str = "") -> str:
    return (
        f"{stage:<28} {process['rss_mb']:>7.0f} {process['gc_collections'][2]:>6} "
        f"{process['gc_pause_ms_max'][2]:>9.1f} {process['gc_full_pause_ms_last']:>9.1f} "
        f"{process['gc_long_pauses']:>5}  {extra}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    full = os.environ.get("BENCH_FULL") == "1"
    items = int(os.environ.get("BENCH_GC_ITEMS", "100000" if full else "20000"))
    parser.add_argument("--items", type=int, default=items)
    parser.add_argument("--searches", type=int, default=3000)
    parser.add_argument("--no-tiers", action="store_true", help="no tier policies")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="memosd-gc-", dir="/var/tmp"))
    sock = base / "memosd.sock"
    env = dict(os.environ, MEMOSD_INDEX_EMBEDDER="hashing", HF_HUB_OFFLINE="1")
    if args.no_tiers:
        env["MEMOSD_SCHEDULER_DEFAULT_POLICIES"] = ""
    with open(base / "daemon.log", "w") as log:
        cmd = [sys.executable, "-m", "memosd", "--data-dir", str(base / "data")]
        proc = subprocess.Popen(
            [*cmd, "--socket", str(sock)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    rng = random.Random(1)
    print(f"items {args.items:,}, tiers {'off' if args.no_tiers else 'on'}, daemon pid {proc.pid}")
    print(f"{'stage':<28} {'RSS MB':>7} {'full':>6} {'max ms':>9} {'last ms':>9} {'long':>5}")
    try:
        wait_until_ready(sock, proc=proc)
        with Client(sock, timeout=120) as c:
            c.create_cube("big")
            started = time.perf_counter()
            quarter = max(1000, args.items // 4)
            for start in range(0, args.items, 1000):
                end = min(args.items, start + 1000)
                c.add_many("big", [f"memory {i} " + _terms(rng, 20) for i in range(start, end)])
                if end % quarter == 0 or end == args.items:
                    took = time.perf_counter() - started
                    print(_row(f"loaded {end:,}", c.status()["process"], f"{took:.0f} s"))
            started = time.perf_counter()
            while True:  # read-your-writes: waits (bounded) for the index, then retry
                try:
                    c.search("big", "alpha1", k=1)
                    break
                except Unavailable:
                    continue
            took = time.perf_counter() - started
            print(_row("index caught up", c.status()["process"], f"{took:.0f} s later"))
            started, last = time.perf_counter(), _cpu_ticks(proc.pid)
            while True:  # idle: under 0.1 s of CPU in 2 s
                time.sleep(2)
                now = _cpu_ticks(proc.pid)
                if now - last < 10:
                    break
                last = now
            took = time.perf_counter() - started
            print(_row("daemon idle", c.status()["process"], f"{took:.0f} s later"))
            for round_ in (1, 2):
                lat = []
                for _ in range(args.searches):
                    query = _terms(rng, 4)
                    t = time.perf_counter()
                    c.search("big", query, k=10)
                    lat.append(time.perf_counter() - t)
                lat.sort()
                n = len(lat)
                pct = " / ".join(
                    f"{lat[min(n - 1, int(n * q))] * 1e3:.1f}" for q in (0.5, 0.99, 0.999)
                )
                print(
                    _row(
                        f"searches, round {round_}",
                        c.status()["process"],
                        f"p50 / p99 / p99.9 {pct} ms, max {lat[-1] * 1e3:.1f}",
                    )
                )
    finally:
        proc.terminate()
        proc.wait(60)
    logged = (base / "daemon.log").read_text().count("long garbage-collector pause")
    print(f"long-pause warnings in the daemon's log: {logged}")
    print("columns: full = full (gen 2) collections; max / last = longest / last full pause")
    return 0


if __name__ == "__main__":
    sys.exit(main())
