"""Crash test through the real socket: SIGKILL the daemon while clients add.

Every add a client saw acknowledged must be there, with exactly its text,
after the daemon restarts.  Rounds: ``MEMOSD_KILL_ROUNDS`` (default 5).
Writers are threads in this process and separate client processes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from memosd.errors import MemosError, Unavailable
from memosd.testing import DaemonHandle

ROUNDS = int(os.environ.get("MEMOSD_KILL_ROUNDS", "5"))

WRITER = r"""
import json, os, random, sys, time
from memosd.client import Client
from memosd.errors import MemosError
socket, out, stop, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rng = random.Random(seed)
with Client(socket, timeout=2.0) as c, open(out, "a", encoding="utf-8") as f:
    i = 0
    while not os.path.exists(stop):
        size = rng.randrange(1, 200)
        text = f"p{seed}-{i} " + "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(size))
        i += 1
        try:
            item = c.add("k", text)
        except MemosError:
            time.sleep(0.02)
            continue
        f.write(json.dumps([item.id, text]) + "\n")
        f.flush()
"""


def test_acknowledged_adds_survive_sigkill(memosd_daemon: DaemonHandle, tmp_path: Path) -> None:
    daemon = memosd_daemon
    with daemon.client() as c:
        c.create_cube("k")
    acked: list[tuple[str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    stop_file = tmp_path / "stop"

    def thread_writer(n: int) -> None:
        rng = random.Random(n)
        with daemon.client(timeout=2.0) as client:
            i = 0
            while not stop.is_set():
                text = f"t{n}-{i} " + "x" * rng.randrange(0, 3000)
                i += 1
                try:
                    item = client.add("k", text)
                except (Unavailable, MemosError):
                    time.sleep(0.02)
                    continue
                with lock:
                    acked.append((item.id, text))

    threads = [threading.Thread(target=thread_writer, args=(n,)) for n in range(4)]
    outs = [tmp_path / f"writer{n}.jsonl" for n in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(daemon.socket), str(out), str(stop_file), str(n)]
        )
        for n, out in enumerate(outs)
    ]
    for t in threads:
        t.start()
    try:
        for _ in range(ROUNDS):
            before = len(acked)
            deadline = time.monotonic() + 10
            while len(acked) < before + 50 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(random.uniform(0.0, 0.3))
            daemon.kill()
            daemon.start()
        time.sleep(0.3)
    finally:
        stop.set()
        stop_file.touch()
        for t in threads:
            t.join(timeout=30)
        for p in procs:
            p.wait(timeout=30)

    for out in outs:
        for line in out.read_text(encoding="utf-8").splitlines():
            item_id, text = json.loads(line)
            acked.append((item_id, text))
    assert len(acked) >= ROUNDS * 50
    daemon.kill()
    daemon.start()
    with daemon.client() as c:
        for item_id, text in acked:
            assert c.get("k", item_id).text == text
        assert c.status()["healthy"] is True
