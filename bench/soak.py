"""Full-size crash and fuzz runs: the CI suite's long tests, made long.

    .venv/bin/python bench/soak.py                  # full size (about an hour here)
    SOAK_SCALE=0.1 .venv/bin/python bench/soak.py   # a tenth of every size
    SOAK_ONLY=powerloss,fuzz .venv/bin/python bench/soak.py

The test suite runs these tests at CI sizes (seconds each).  Their size comes
from environment variables, so this script runs the same test code at full
size, one pytest process per run:

* ``crash`` - SIGKILL an engine writer process at random moments
  (``MEMOSD_CRASH_ROUNDS``, full 200, CI 20; each round re-reads every
  write acknowledged so far, so the cost grows with the square of the rounds);
* ``powerloss`` - simulated power loss after every WAL operation
  (``MEMOSD_POWERLOSS_STATES``, full 200,000, CI 5,000);
* ``kill`` - SIGKILL the real daemon while socket clients add
  (``MEMOSD_KILL_ROUNDS``, full 100, CI 5);
* ``fuzz`` - the files holding the hypothesis tests (codecs, the protocol on
  the real socket, portable cube files, settings, KV chunks) with every
  example count times ``MEMOSD_FUZZ_SCALE`` (full 20, CI 1; see
  ``memosd.testing.fuzz_examples``); their other tests run once, unchanged.

Prints a table (run, size, outcome, seconds) and exits 1 if any run failed,
with the failing run's pytest output above the table.  A failure here is a
bug to fix (a lost acknowledged write, a crash on bad input): the seeds and
hypothesis' falsifying example are in that output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 4 * 3600  # per test; the suite's own limit is sized for CI


@dataclass(frozen=True)
class Run:
    name: str
    knob: str
    full: float
    tests: tuple[str, ...]
    pytest_args: tuple[str, ...] = ()


RUNS = (
    Run("crash", "MEMOSD_CRASH_ROUNDS", 200, ("tests/store/test_engine_crash.py",)),
    Run("powerloss", "MEMOSD_POWERLOSS_STATES", 200_000, ("tests/wal/test_wal_powerloss.py",)),
    Run("kill", "MEMOSD_KILL_ROUNDS", 100, ("tests/daemon/test_daemon_kill.py",)),
    Run(
        "fuzz",
        "MEMOSD_FUZZ_SCALE",
        20,
        (
            "tests/memcube/test_memcube_codec.py",
            "tests/daemon/test_daemon_protocol.py",
            "tests/daemon/test_daemon_badinput.py",
            "tests/cli/test_portable_file.py",
            "tests/settings/test_settings_registry.py",
            "tests/kv/test_kv_chunks.py",
        ),
    ),
)


def size_for(run: Run, scale: float) -> str:
    """The knob's value at ``scale`` of full size (counts are whole, at least 1)."""
    if run.knob == "MEMOSD_FUZZ_SCALE":
        return f"{max(0.05, run.full * scale):g}"
    return str(max(1, round(run.full * scale)))


def main() -> int:
    scale = float(os.environ.get("SOAK_SCALE", "1"))
    if not scale > 0:
        print("SOAK_SCALE must be positive", file=sys.stderr)
        return 2
    only = {s for s in os.environ.get("SOAK_ONLY", "").split(",") if s}
    unknown = only - {r.name for r in RUNS}
    if unknown:
        print(f"SOAK_ONLY: unknown runs {sorted(unknown)}", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str, float]] = []
    failed = False
    for run in RUNS:
        if only and run.name not in only:
            continue
        size = size_for(run, scale)
        env = {**os.environ, run.knob: size, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # --show-capture=no: a failure prints its traceback and assertion,
        # not thousands of captured log lines of the rounds before it.
        # --timeout: the suite's per-test limit (pytest-timeout) is sized for CI.
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--show-capture=no"]
        cmd += ["--timeout", str(TEST_TIMEOUT_S)]
        cmd += [*run.pytest_args, *run.tests]
        print(f"== {run.name}: {run.knob}={size}", flush=True)
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        if proc.returncode != 0:
            failed = True
            start = max(0, proc.stdout.find("= FAILURES ="))
            print(proc.stdout[start : start + 30_000], proc.stderr[-5_000:], sep="\n", flush=True)
        rows.append((run.name, f"{run.knob}={size}", summary, seconds))
        print(f"   {summary} ({seconds:.0f} s)", flush=True)
    print()
    print(f"{'run':<10} {'size':<32} {'seconds':>8}  outcome")
    for name, size, summary, seconds in rows:
        print(f"{name:<10} {size:<32} {seconds:8.0f}  {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
