"""Child process of the scheduler crash test.

Usage: python crash_tier_child.py DATA_DIR block|steps|finish [JOB_ID]

``block``: create a cube, add 20 turns, run the eviction job (which queues a
consolidation in its commit), then let the consolidation job compute its
facts and stop right before its atomic commit, printing
``blocking <job id>`` (flushed): the parent SIGKILLs us there.

``steps``: create a cube (``short_capacity`` 2, ``evict_batch`` 5, no
consolidation), add 40 turns, run the eviction job and stop it after its
third committed step, printing ``stepped <job id>``: the parent SIGKILLs us
there, between two durable steps.

``finish``: reopen (crash recovery), start the runner (which requeues the
interrupted job), wait for JOB_ID to end, print one JSON line with the
outcome, close cleanly.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import structlog

from memosd.embed import HashingEmbedder
from memosd.engine import Engine
from memosd.memcube.model import CubeConfig
from memosd.scheduler.policies_builtin import PlaintextTierPolicy
from memosd.scheduler.policy import PolicyRegistry
from memosd.scheduler.runner import JobContext, JobRunner

GARDEN = "Gardening diary: greenhouse seedlings, mulch, pruning shears, trellis and hedges."
TRAVEL = "Travel journal: passports, itineraries, airport lounges, suitcases and visas."
FACTS = [
    "I planted tomatoes near the fence.",
    "My flight to Lisbon leaves in June.",
    "The roses need water every morning.",
    "Hostels near the station were cheap.",
    "Slugs keep eating my lettuce leaves.",
    "The museum pass saved us money.",
    "Compost makes the soil much richer.",
    "Trains across Italy run very late.",
    "Sunflowers grew taller than the shed.",
    "A ferry ride to Crete took hours.",
]


def turn_text(i: int) -> str:
    anchor = GARDEN if i % 2 == 0 else TRAVEL
    return f"Alice: {anchor} {FACTS[i % 10]}" if i < 10 else f"Alice: {anchor} turn {i}."


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    data_dir, mode = sys.argv[1], sys.argv[2]
    engine = Engine.open(data_dir)

    def block_forever(ctx: JobContext) -> None:
        say(f"blocking {ctx.job.id}")
        threading.Event().wait()

    policy = PlaintextTierPolicy(
        HashingEmbedder(512), before_commit=block_forever if mode == "block" else None
    )
    registry = PolicyRegistry([policy])
    runner = JobRunner(engine, registry.handlers(), poll_s=0.05)
    if mode == "block":
        engine.create_cube("crash", owner="uid:0", config=CubeConfig())
        for i in range(20):
            item = engine.add("crash", turn_text(i), session="s")
            say(f"turn {item.id}")
        runner.start()
        evict = runner.run_now("tiers.evict", "crash", timeout=60)
        say(f"evicted {json.dumps(evict.result)}")
        threading.Event().wait()  # the consolidation job blocks; the parent kills us
    if mode == "steps":
        tier_policy = {"plaintext": {"short_capacity": 2, "evict_batch": 5, "promote_heat": 1e9}}
        engine.create_cube("crash", owner="uid:0", config=CubeConfig(tier_policy=tier_policy))
        for i in range(40):
            item = engine.add("crash", turn_text(i), session="s")
            say(f"turn {item.id}")
        real_step = JobContext.commit_step
        steps: list[int] = []

        def step_then_block(ctx: JobContext, fn: Any) -> Any:
            out = real_step(ctx, fn)
            steps.append(1)
            if len(steps) == 3:
                say(f"stepped {ctx.job.id}")
                threading.Event().wait()
            return out

        JobContext.commit_step = step_then_block  # type: ignore[method-assign]
        runner.start()
        runner.submit("tiers.evict", cube="crash")
        threading.Event().wait()  # the parent kills us after the third step
    job_id = sys.argv[3]
    runner.start()
    job = runner.wait(job_id, timeout=60)
    runner.close()
    say(
        json.dumps(
            {
                "state": job.state,
                "attempts": job.attempts,
                "result": job.result,
                "history": [s for _, s in job.history],
            }
        )
    )
    engine.close()


if __name__ == "__main__":
    main()
