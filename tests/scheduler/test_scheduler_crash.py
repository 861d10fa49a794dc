"""SIGKILL the process during a consolidation job; after restart it completes exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from memosd.engine import Engine
from memosd.scheduler.tiers import informative_sentences

CHILD = Path(__file__).with_name("crash_tier_child.py")


def _kill_child_at(data: Path, mode: str, marker: str) -> tuple[list[str], str]:
    """Run the child in ``mode``; SIGKILL it once it prints ``marker <job id>``.

    Returns the turn ids it reported and that job id.  No sleeps: the child
    says where it is.
    """
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(data), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    turns: list[str] = []
    job_id = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "turn":
                turns.append(rest)
            elif word == marker:
                job_id = rest
                break
        assert job_id is not None, f"child exited before printing {marker!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return turns, job_id


def _finish(data: Path, job_id: str) -> dict[str, Any]:
    """Restart on the crash image in a child that waits for ``job_id``; its outcome."""
    finish = subprocess.run(
        [sys.executable, str(CHILD), str(data), "finish", job_id],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outcome: dict[str, Any] = json.loads(finish.stdout.strip().splitlines()[-1])
    return outcome


def test_kill_during_consolidation_then_restart_completes_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Killed inside the consolidation job, before its atomic commit.
    turns, job_id = _kill_child_at(data, "block", "blocking")
    assert len(turns) == 20

    # Crash image: the job is "running", none of its effects exist.
    outcome = _finish(data, job_id)
    assert outcome["state"] == "succeeded"
    assert outcome["attempts"] == 2
    assert outcome["history"] == ["queued", "running", "queued", "running", "succeeded"]

    with Engine.open(data) as engine:
        consolidations = engine.list_jobs(kind="tiers.consolidate", limit=100)
        assert [j.id for j in consolidations] == [job_id]
        items = engine.list_items("crash", status=None, limit=1000)
        # No turn lost or duplicated: the same 20 turns, 10 evicted to mid.
        turn_items = [i for i in items if i.id in set(turns)]
        assert sorted(i.id for i in turn_items) == sorted(turns)
        assert Counter(i.tier for i in turn_items) == {"short": 10, "mid": 10}
        # The facts of the two hot segments exist exactly once each.
        facts = [i for i in items if i.tier == "long"]
        texts = Counter(f.text for f in facts)
        assert all(n == 1 for n in texts.values())
        expected = {
            sentence
            for t in turn_items
            if t.tier == "mid"
            for sentence, _ in informative_sentences(t.text, min_words=4)
        }
        assert set(texts) == expected
        assert len(facts) == 12  # 2 topic anchors + 10 distinct facts
        assert outcome["result"]["added"] == 12
        for fact in facts:
            assert fact.provenance.parents
            assert {p for p, _ in fact.provenance.parents} <= set(turns)


def test_kill_between_eviction_steps_then_restart_moves_each_turn_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Killed right after the third committed step, between two durable steps.
    turns, job_id = _kill_child_at(data, "steps", "stepped")
    assert len(turns) == 40

    # Crash image: three steps (15 turns, the oldest) are durable, the job is running.
    with Engine.open(data) as engine:
        tiers = [engine.get("crash", t).tier for t in turns]
        assert tiers == ["mid"] * 15 + ["short"] * 25
    outcome = _finish(data, job_id)
    assert outcome["state"] == "succeeded"
    assert outcome["attempts"] == 2
    assert outcome["result"]["evicted"] == 23  # only what the first attempt left
    with Engine.open(data) as engine:
        assert [engine.get("crash", t).tier for t in turns] == ["mid"] * 38 + ["short"] * 2
        members: Counter[str] = Counter()
        for segment in engine.list_items("crash", form="tier-segment", limit=1000):
            members.update(segment.metadata["segment"]["turns"])
        assert {t: members[t] for t in turns[:38]} == dict.fromkeys(turns[:38], 1)
