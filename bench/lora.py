"""Parameter-memory benchmark: LoRA training throughput, adapter size, gate numbers.

For each (model, profile) it trains one adapter on ``--memories`` synthetic
memory texts, in-process (the worker process adds a fixed start-up cost --
interpreter, torch/transformers/peft imports, model load -- measured once
separately with ``--worker``), and reports:

* training throughput: tokens/s over the optimiser steps (forward + backward
  + AdamW), torch threads as configured;
* adapter size (safetensors bytes) and LoRA parameter count;
* memory perplexity base → adapted and its drop; control-text perplexity base
  → adapted and its change; the gate verdict.

Models are built from config (``memosd.models.testing``): ``tiny`` (64 wide,
2 layers), ``warm`` (the same tiny model trained for 40 steps on English
prose, :mod:`memosd.lora.testing`: the base model of the test suite, whose
perplexities mean something) and ``100m`` (~104M parameters).  ``tiny`` and
``100m`` are randomly initialised, so their perplexity numbers say little
about a pretrained model; the throughput and size numbers do.

Profiles: ``default`` is :class:`LoraSettings()` (q_proj/v_proj, r=8, lr 2e-3,
4 epochs, batch 8); ``all-linear`` adapts every linear module of the block at
r=16, lr 2e-2 (the test-suite profile).

It also trains once through a real daemon (``lora_train`` job, warm model,
all-linear profile) and measures ``ping`` latency while the worker trains.

Usage: ``python bench/lora.py [--models tiny,warm,100m] [--epochs-100m 2] [--no-worker]
[--no-daemon] [--json]``

Environment (``make bench``): ``BENCH_LORA_MODELS`` (default ``tiny,warm,100m``),
``BENCH_LORA_MEMORIES`` (16), ``BENCH_LORA_EPOCHS_100M`` (2; 4 with
``BENCH_FULL=1``), ``BENCH_LORA_THREADS`` (0: torch's default),
``BENCH_LORA_DAEMON=0`` skips the daemon run.  Results go to
``$BENCH_OUT`` (bench/_result.py) for bench/render.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _result import write_result  # bench/ is on sys.path (the script's directory)

from memosd.lora import LoraSettings, decode_adapter, format_memory, run_training
from memosd.lora.testing import build_warm_tiny_llama
from memosd.models.backend import HFBackend
from memosd.models.testing import build_model_100m, build_tiny_llama

_SUBJECTS = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi")
_FACTS = (
    "keeps the spare keys in the blue drawer next to the printer",
    "moved the weekly planning meeting to Thursday at half past nine",
    "is allergic to peanuts and prefers oat milk in coffee",
    "owns the deployment runbook for the billing service",
    "booked the conference room on the third floor for the offsite",
    "uses the staging cluster in the Frankfurt region for load tests",
)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROFILES = {
    "default": LoraSettings(),
    "all-linear": LoraSettings(
        rank=16,
        alpha=32,
        target_modules=ALL_LINEAR,
        learning_rate=2e-2,
        epochs=40,
        batch_size=8,
    ),
}


def memories(count: int) -> list[str]:
    out = []
    for i in range(count):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        fact = _FACTS[(i * 5 + i // len(_SUBJECTS)) % len(_FACTS)]
        out.append(format_memory(f"{subject} {fact} (note {i})."))
    return out


def bench_one(
    backend: HFBackend, model_name: str, profile: str, settings: LoraSettings, texts: list[str]
) -> dict[str, Any]:
    started = time.perf_counter()
    output = run_training(backend, texts, settings, in_process=True)
    wall = time.perf_counter() - started
    assert output.adapter is not None
    assert output.report is not None
    blob = decode_adapter(output.adapter)
    report = output.report
    return {
        "model": model_name,
        "profile": profile,
        "base_parameters": sum(p.numel() for p in backend.model.parameters()),
        "steps": output.steps,
        "train_tokens": output.tokens,
        "train_s": round(output.train_seconds, 2),
        "tokens_per_s": round(output.tokens_per_s, 1),
        "wall_s": round(wall, 2),
        "adapter_bytes": len(output.adapter),
        "adapter_parameters": blob.parameters,
        "memory_ppl_base": report.memory_ppl_base,
        "memory_ppl_adapted": report.memory_ppl_adapted,
        "memory_drop": report.memory_drop,
        "control_ppl_base": report.control_ppl_base,
        "control_ppl_adapted": report.control_ppl_adapted,
        "control_change": report.control_rise,
        "gate": "passed" if report.passed else "rejected",
    }


def bench_daemon(directory: Path, texts: list[str], base: Path) -> dict[str, Any]:
    """``lora_train`` through a real daemon (all-linear profile, warm tiny model).

    Reports the job's wall time (queue → succeeded, worker start-up included)
    and the latency of ``ping`` requests sent every 20 ms while it trains:
    the request loop must not wait for the training.
    """
    from memosd.testing import DaemonHandle

    settings = PROFILES["all-linear"].to_dict()
    handle = DaemonHandle(
        base / "daemon",
        env={"MEMOSD_CACHE_DIR": os.environ["MEMOSD_CACHE_DIR"], "MEMOSD_SCHEDULER_TICK_S": "3600"},
    )
    (base / "daemon").mkdir(parents=True, exist_ok=True)
    handle.start()
    try:
        with handle.client(timeout=60.0) as client:
            client.create_cube("bench")
            for text in texts:
                client.add("bench", text.removeprefix("Memory: ").strip(), tier="long")
            started = time.perf_counter()
            job = client.lora_train("bench", directory, settings=settings)
            pings: list[float] = []
            while True:
                t0 = time.perf_counter()
                client.ping()
                pings.append(time.perf_counter() - t0)
                current = client.job(job["id"])
                if current["terminal"]:
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - started
    finally:
        handle.stop()
    pings.sort()
    result = current.get("result") or {}
    return {
        "state": current["state"],
        "outcome": result.get("outcome"),
        "job_wall_s": round(wall, 2),
        "steps": result.get("steps"),
        "tokens_per_s": round(result.get("tokens_per_s") or 0.0, 1),
        "pings": len(pings),
        "ping_p50_ms": round(pings[len(pings) // 2] * 1000, 2),
        "ping_p99_ms": round(pings[min(len(pings) - 1, int(len(pings) * 0.99))] * 1000, 2),
        "ping_max_ms": round(pings[-1] * 1000, 2),
        "memory_drop": (result.get("evaluation") or {}).get("memory_drop"),
        "control_change": (result.get("evaluation") or {}).get("control_rise"),
        "gate_reasons": (result.get("evaluation") or {}).get("reasons"),
    }


def bench_worker(backend: HFBackend, texts: list[str]) -> dict[str, Any]:
    """Fixed cost of the worker process: one training of a single step, end to end."""
    settings = LoraSettings(epochs=1, batch_size=len(texts))
    started = time.perf_counter()
    output = run_training(backend, texts, settings)
    total = time.perf_counter() - started
    return {"worker_total_s": round(total, 2), "train_s": round(output.train_seconds, 2)}


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':<6} {'profile':<10} {'steps':>5} {'tok/s':>9} {'adapter':>10} "
        f"{'mem ppl base→adapted':>22} {'drop':>7} {'ctl ppl base→adapted':>22} "
        f"{'change':>7} {'gate':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<6} {r['profile']:<10} {r['steps']:>5} {r['tokens_per_s']:>9.0f} "
            f"{_size(r['adapter_bytes']):>10} "
            f"{r['memory_ppl_base']:>10.1f}→{r['memory_ppl_adapted']:<11.1f} "
            f"{r['memory_drop']:>7.1%} "
            f"{r['control_ppl_base']:>10.1f}→{r['control_ppl_adapted']:<11.1f} "
            f"{r['control_change']:>+7.1%} {r['gate']:>8}"
        )


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


_COLUMNS = [
    "model",
    "profile",
    "steps",
    "tokens/s",
    "adapter",
    "memory ppl base",
    "memory ppl adapted",
    "memory drop",
    "control ppl base",
    "control ppl adapted",
    "control change",
    "gate",
]


def _table_row(r: dict[str, Any]) -> list[Any]:
    return [
        r["model"],
        r["profile"],
        r["steps"],
        round(r["tokens_per_s"]),
        _size(r["adapter_bytes"]),
        round(r["memory_ppl_base"], 1),
        round(r["memory_ppl_adapted"], 1),
        f"{-r['memory_drop']:+.1%}",
        round(r["control_ppl_base"], 1),
        round(r["control_ppl_adapted"], 1),
        f"{r['control_change']:+.1%}",
        r["gate"],
    ]


def main() -> None:
    full = os.environ.get("BENCH_FULL") == "1"
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=os.environ.get("BENCH_LORA_MODELS", "tiny,warm,100m"))
    parser.add_argument("--profiles", default="default,all-linear")
    parser.add_argument("--memories", type=int, default=_env_int("BENCH_LORA_MEMORIES", 16))
    parser.add_argument(
        "--epochs-100m",
        type=int,
        default=_env_int("BENCH_LORA_EPOCHS_100M", 4 if full else 2),
        help="epochs for the 100m model (few steps)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=_env_int("BENCH_LORA_THREADS", 0),
        help="torch threads (0: default)",
    )
    parser.add_argument("--no-worker", action="store_true", help="skip timing the worker process")
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        default=os.environ.get("BENCH_LORA_DAEMON") == "0",
        help="skip the training through a daemon",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = memories(args.memories)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        os.environ.setdefault("MEMOSD_CACHE_DIR", str(Path(tmp) / "cache"))
        for model_name in args.models.split(","):
            directory = Path(tmp) / model_name
            if model_name == "tiny":
                build_tiny_llama(directory)
            elif model_name == "warm":
                build_warm_tiny_llama(directory)
            elif model_name == "100m":
                build_model_100m(directory)
            else:
                raise SystemExit(f"unknown model {model_name!r}")
            backend = HFBackend.load(directory)
            for profile in args.profiles.split(","):
                settings = PROFILES[profile]
                if model_name == "100m":
                    settings = dataclasses.replace(settings, epochs=args.epochs_100m)
                rows.append(bench_one(backend, model_name, profile, settings, texts))
                if not args.json:
                    print_table(rows[-1:])
            if not args.no_worker and model_name in ("tiny", "warm") and "worker" not in extra:
                extra["worker"] = bench_worker(backend, texts)
            if not args.no_daemon and model_name == "warm":
                extra["daemon"] = bench_daemon(directory, texts, Path(tmp))
                if not args.json:
                    print("daemon:", extra["daemon"])
    worker = extra.get("worker") or {}
    tables = [
        {
            "caption": (
                f"{args.memories} synthetic memories, in-process training, "
                f"{extra['torch_threads']} torch threads; 100m: {args.epochs_100m} epochs"
            ),
            "columns": _COLUMNS,
            "rows": [_table_row(r) for r in rows],
        }
    ]
    if worker:
        tables.append(
            {
                "caption": "fixed cost of the spawned training worker (one 1-step training)",
                "columns": ["worker total s", "of which training s"],
                "rows": [[worker["worker_total_s"], worker["train_s"]]],
            }
        )
    daemon = extra.get("daemon") or {}
    if daemon:
        tables.append(
            {
                "caption": (
                    "lora_train through the daemon (warm tiny model, all-linear; ping every "
                    "20 ms while it trains)"
                ),
                "columns": [
                    "outcome",
                    "job wall s",
                    "steps",
                    "tokens/s",
                    "pings",
                    "ping p50 ms",
                    "ping p99 ms",
                    "ping max ms",
                ],
                "rows": [
                    [
                        daemon["outcome"],
                        daemon["job_wall_s"],
                        daemon["steps"],
                        daemon["tokens_per_s"],
                        daemon["pings"],
                        daemon["ping_p50_ms"],
                        daemon["ping_p99_ms"],
                        daemon["ping_max_ms"],
                    ]
                ],
            }
        )
    write_result("lora", "Parameter memory", tables=tables, raw={"rows": rows, **extra})
    if args.json:
        print(json.dumps({"rows": rows, **extra}, indent=2))
    else:
        print()
        print_table(rows)
        print(extra)


if __name__ == "__main__":
    main()
