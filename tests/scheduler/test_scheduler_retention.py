"""Job retention: ended jobs older than the retention are deleted, durably; others stay."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from memosd.engine import Engine
from memosd.errors import Conflict, NotFound
from memosd.scheduler import jobs
from memosd.scheduler.runner import JobContext, JobRunner
from memosd.store.records import JobDelete, RecordType, decode_mutation, encode_mutation

from .conftest import FakeClock  # type: ignore[import-not-found]

DAY = 86400.0


def _ok(ctx: JobContext) -> dict[str, Any]:
    return {"ok": True}


def _boom(ctx: JobContext) -> dict[str, Any]:
    raise ValueError("boom")


def test_sweep_deletes_old_ended_jobs_by_state(engine: Engine, clock: FakeClock) -> None:
    runner = JobRunner(
        engine,
        {"t.ok": _ok, "t.boom": _boom},
        clock=clock,
        poll_s=0.05,
        retention_s=7 * DAY,
        failed_retention_s=30 * DAY,
    )
    runner.start()
    try:
        old_ok = runner.run_now("t.ok", "c", timeout=10)
        old_failed = runner.run_now("t.boom", "c", timeout=10)
        old_cancelled = runner.cancel(runner.submit("t.none", cube="c").id)
        assert (old_ok.state, old_failed.state, old_cancelled.state) == (
            "succeeded",
            "failed",
            "cancelled",
        )
        clock.advance(3 * DAY)
        recent_ok = runner.run_now("t.ok", "c", timeout=10)
        waiting = runner.submit("t.none", cube="c")  # no handler: queued forever
        clock.advance(5 * DAY)  # old ones are 8 days old, recent ones 5

        assert sorted(runner.sweep()) == sorted([old_ok.id, old_cancelled.id])
        left = {j.id for j in engine.list_jobs(limit=100)}
        assert left == {old_failed.id, recent_ok.id, waiting.id}
        assert runner.sweep() == []  # nothing more is due

        clock.advance(23 * DAY)  # the failure is 31 days old now
        assert sorted(runner.sweep()) == sorted([old_failed.id, recent_ok.id])
        assert [j.id for j in engine.list_jobs(limit=100)] == [waiting.id]
        assert engine.get_job(waiting.id).state == "queued"  # never an unfinished job
        with pytest.raises(NotFound):
            engine.get_job(old_ok.id)
    finally:
        runner.close()


def test_delete_job_refuses_unfinished_jobs(engine: Engine) -> None:
    job = engine.submit_job("t.none", cube="c")
    with pytest.raises(Conflict):
        engine.atomic(lambda p: p.delete_job(job.id))
    engine.transition_job(job.id, jobs.cancel)
    engine.atomic(lambda p: p.delete_job(job.id))
    with pytest.raises(NotFound):
        engine.get_job(job.id)


def test_deletions_survive_a_restart_and_the_dispatcher_sweeps_by_itself(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    data = tmp_path / "data"
    with Engine.open(data, clock=clock) as engine:
        engine.create_cube("c", owner="uid:0")
        events: list[str] = []
        engine.add_listener(lambda e: events.append(e.kind))
        runner = JobRunner(
            engine, {"t.ok": _ok}, clock=clock, poll_s=0.02, retention_s=DAY, sweep_every_s=0.02
        )
        runner.start()
        try:
            done = runner.run_now("t.ok", "c", timeout=10)
            clock.advance(2 * DAY)
            deadline = time.monotonic() + 10
            while engine.list_jobs(limit=10) and time.monotonic() < deadline:
                runner.wake()
                time.sleep(0.02)
            assert engine.list_jobs(limit=10) == []
            assert "job_deleted" in events
        finally:
            runner.close()
    with Engine.open(data, clock=clock) as engine, pytest.raises(NotFound):
        engine.get_job(done.id)


@pytest.mark.parametrize("cube", ["c", None])
def test_job_delete_record_round_trips(cube: str | None) -> None:
    mutation = JobDelete("01JOB", cube)
    rtype, payload = encode_mutation(mutation)
    assert rtype == RecordType.JOB_DELETE
    assert decode_mutation(rtype, payload) == mutation
