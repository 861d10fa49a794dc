"""Child process of the crash tests: writes until killed.

Usage: python crash_writer.py DATA_DIR CUBE THREADS SEED

Each thread adds items and updates some of them; after every acknowledged
write it prints ``ack <id> <version> <sha256(text)>`` (flushed), so the
parent knows exactly what was acknowledged when it sends SIGKILL.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys
import threading

import structlog

from memosd.engine import Engine, EngineSettings
from memosd.errors import Conflict

_print_lock = threading.Lock()


def report(item_id: str, version: int, text: str) -> None:
    digest = hashlib.sha256(text.encode()).hexdigest()
    with _print_lock:
        sys.stdout.write(f"ack {item_id} {version} {digest}\n")
        sys.stdout.flush()


def writer(engine: Engine, cube: str, seed: int) -> None:
    rng = random.Random(seed)
    mine: list[str] = []
    n = 0
    while True:
        n += 1
        if mine and rng.random() < 0.3:
            item_id = rng.choice(mine)
            text = f"update {seed}-{n} " + "u" * rng.randrange(0, 900)
            item = engine.update(cube, item_id, text=text)
        else:
            text = f"memory {seed}-{n} " + "m" * rng.randrange(0, 900)
            item = engine.add(cube, text, tags=("crash",), session=f"s{seed}")
            mine.append(item.id)
        report(item.id, item.version, item.text)


def main() -> None:
    # stdout carries the acknowledgement protocol; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    data_dir, cube, threads, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    engine = Engine.open(data_dir, settings=EngineSettings(checkpoint_interval_s=0.2))
    with contextlib.suppress(Conflict):  # later rounds reuse the cube
        engine.create_cube(cube, owner="uid:0")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    workers = [
        threading.Thread(target=writer, args=(engine, cube, seed * 100 + i), daemon=True)
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


if __name__ == "__main__":
    main()
