"""Write a benchmark's result as JSON for bench/render.py (helper, not a benchmark).

Also the machine facts benchmarks share (:func:`machine`, :func:`process_cpu_s`).

    from _result import write_result   # bench/ is on sys.path when a bench runs
    write_result("kv", "Activation memory", tables=[{"columns": [...], "rows": [...]}])

The file goes to ``$BENCH_OUT`` (scripts/bench.sh sets it per run) or
``bench/results/<name>/run-1.json``.  Table format: see bench/render.py.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """Cores, RAM (from /proc/meminfo), load average, Python version."""
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "load": [round(x, 1) for x in os.getloadavg()],
        "python": sys.version.split()[0],
    }


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command_line(script: str, prefixes: tuple[str, ...] = ("BENCH_",)) -> str:
    """The command that reproduces this run: its size variables, then the script."""
    env = sorted(
        f"{k}={v}"
        for k, v in os.environ.items()
        if k.startswith(prefixes)
        and k not in ("BENCH_OUT", "BENCH_RUNS", "BENCH_ONLY", "BENCH_TMP")
    )
    return " ".join([*env, f".venv/bin/python {script}"])


def write_result(
    name: str,
    title: str,
    *,
    tables: list[dict[str, Any]],
    command: str | None = None,
    area: str | None = None,
    raw: Any = None,
) -> Path:
    out = Path(os.environ.get("BENCH_OUT") or REPO / "bench" / "results" / name / "run-1.json")
    result: dict[str, Any] = {
        "name": name,
        "title": title,
        "command": command or command_line(f"bench/{name}.py"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "tables": tables,
    }
    if area is not None:
        result["area"] = area
    if raw is not None:
        result["raw"] = raw
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out
