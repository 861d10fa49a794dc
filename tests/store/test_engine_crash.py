"""SIGKILL a writing process at random moments; nothing acknowledged is lost.

Rounds: ``MEMOSD_CRASH_ROUNDS`` (default 20).  Each round starts a child that
writes from several threads and reports every acknowledged write, kills it
after a random number of acknowledgements, reopens the store and checks:

* every acknowledged (id, version) is present with exactly that content;
* every item in the store is whole: versions 1..n contiguous, each decodes;
* the store keeps working (the next round writes on top of it).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from memosd.engine import Engine

WRITER = Path(__file__).with_name("crash_writer.py")
ROUNDS = int(os.environ.get("MEMOSD_CRASH_ROUNDS", "20"))


def _run_round(data_dir: Path, seed: int, rng: random.Random) -> dict[tuple[str, int], str]:
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(data_dir), "crash", "4", str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acked: dict[tuple[str, int], str] = {}
    try:
        assert proc.stdout.readline().strip() == "ready"
        target = rng.randrange(1, 400)
        while len(acked) < target:
            line = proc.stdout.readline()
            assert line, "writer exited before it was killed"
            _, item_id, version, digest = line.split()
            acked[(item_id, int(version))] = digest
        proc.send_signal(signal.SIGKILL)
        # Acks printed before the kill landed are acknowledged too.
        for line in proc.stdout:
            if line.startswith("ack "):
                _, item_id, version, digest = line.split()
                acked[(item_id, int(version))] = digest
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(1234)
    all_acked: dict[tuple[str, int], str] = {}
    for round_no in range(ROUNDS):
        all_acked.update(_run_round(tmp_path, round_no, rng))
        with Engine.open(tmp_path) as engine:
            for (item_id, version), digest in all_acked.items():
                item = engine.get("crash", item_id, version=version)
                assert hashlib.sha256(item.text.encode()).hexdigest() == digest
            for item in engine.list_items("crash", status=None, limit=10**9):
                history = engine.history("crash", item.id)
                assert [v.version for v in history] == list(range(1, len(history) + 1))
                assert history[-1] == item
    assert len(all_acked) >= ROUNDS
