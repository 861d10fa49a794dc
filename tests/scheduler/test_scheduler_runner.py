"""JobRunner: exactly-once commits, retries with backoff, cancel, crash requeue, events."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from memosd.engine import Engine
from memosd.errors import BadRequest, Conflict, TooLarge
from memosd.scheduler import jobs
from memosd.scheduler.runner import JobContext, JobDeferred, JobEvent, JobRunner
from memosd.store.planner import Planner

from .conftest import FakeClock  # type: ignore[import-not-found]


def make_runner(engine: Engine, clock: FakeClock, handlers: dict[str, Any]) -> JobRunner:
    return JobRunner(engine, handlers, concurrency=2, clock=clock, poll_s=0.05)


@pytest.fixture
def started() -> Iterator[list[JobRunner]]:
    runners: list[JobRunner] = []
    yield runners
    for runner in runners:
        runner.close()


def test_commit_writes_effects_and_success_together(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    def handler(ctx: JobContext) -> dict[str, Any] | None:
        def plan(p: Planner) -> dict[str, Any]:
            item = p.add("c", f"made by {ctx.job.id}", tier="long")
            return {"item": item.id}

        return ctx.commit(plan)

    runner = make_runner(engine, clock, {"test.make": handler})
    started.append(runner)
    runner.start()
    before = engine.status()["last_lsn"]
    job = runner.run_now("test.make", "c", timeout=10)
    assert job.state == "succeeded"
    assert job.result is not None
    item = engine.get("c", job.result["item"])
    assert item.text == f"made by {job.id}"
    # start transition + ONE atomic record for the item and the success
    assert engine.status()["last_lsn"] == before + 3


def test_commit_steps_are_durable_and_leave_the_job_running(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    seen: list[str] = []

    def handler(ctx: JobContext) -> dict[str, Any] | None:
        for n in range(3):
            ctx.commit_step(lambda p, n=n: p.add("c", f"step {n}", tier="long"))
            seen.append(engine.get_job(ctx.job.id).state)
        return ctx.commit(lambda p: {"last": p.add("c", "final", tier="long").id})

    runner = make_runner(engine, clock, {"test.steps": handler})
    started.append(runner)
    runner.start()
    before = engine.status()["last_lsn"]
    job = runner.run_now("test.steps", "c", timeout=10)
    assert job.state == "succeeded"
    assert seen == ["running"] * 3
    assert sorted(i.text for i in engine.list_items("c")) == ["final", "step 0", "step 1", "step 2"]
    # submit, start, one record per step, ONE for the last effects and the success
    assert engine.status()["last_lsn"] == before + 6


def test_cancel_between_steps_keeps_the_steps_written(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    stepped = threading.Event()
    release = threading.Event()
    after_cancel: list[str] = []

    def handler(ctx: JobContext) -> dict[str, Any] | None:
        ctx.commit_step(lambda p: p.add("c", "first step"))
        stepped.set()
        release.wait(10)
        try:
            ctx.commit_step(lambda p: p.add("c", "must not exist"))
        except BaseException as exc:
            after_cancel.append(type(exc).__name__)
            raise
        return {}

    runner = make_runner(engine, clock, {"test.steps": handler})
    started.append(runner)
    runner.start()
    job = runner.submit("test.steps", cube="c")
    assert stepped.wait(10)
    runner.cancel(job.id)
    release.set()
    runner.drain()
    assert engine.get_job(job.id).state == "cancelled"
    assert after_cancel == ["JobCancelled"]
    assert [i.text for i in engine.list_items("c")] == ["first step"]


def test_failures_retry_with_backoff_then_succeed(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    calls: list[int] = []

    def flaky(ctx: JobContext) -> dict[str, Any] | None:
        calls.append(ctx.job.attempts)
        if len(calls) < 3:
            raise RuntimeError(f"boom {len(calls)}")
        return {"ok": True}

    runner = make_runner(engine, clock, {"test.flaky": flaky})
    started.append(runner)
    runner.start()
    job = runner.submit("test.flaky", cube="c", max_attempts=3)
    runner.drain()
    job = engine.get_job(job.id)
    assert job.state == "queued"
    assert job.error == {"code": "internal", "message": "RuntimeError: boom 1"}
    assert job.not_before_us - clock() >= 2_000_000 - 1000  # first backoff: 2 s
    runner.drain()  # not runnable until the clock moves
    assert calls == [1]
    clock.advance(2.5)
    runner.wake()
    runner.drain()
    job = engine.get_job(job.id)
    assert job.state == "queued"
    assert job.not_before_us - clock() >= 4_000_000 - 1000  # second backoff: 4 s
    clock.advance(4.5)
    runner.drain()
    job = engine.get_job(job.id)
    assert (job.state, job.attempts, job.result) == ("succeeded", 3, {"ok": True})
    assert calls == [1, 2, 3]


def test_a_deferred_job_gives_its_worker_back_and_runs_again_later(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    """JobDeferred: queued again for later, the worker free meanwhile, the attempt not counted."""
    order: list[str] = []
    ready = threading.Event()

    def waiting(ctx: JobContext) -> dict[str, Any] | None:
        order.append(f"wait:{ctx.job.attempts}")
        if not ready.is_set():
            ctx.commit_step(lambda p: p.add("c", "before the deferral", tier="long"))
            raise JobDeferred(5.0, "waiting for the thing")
        return {"waited": True}

    def other(ctx: JobContext) -> dict[str, Any] | None:
        order.append("other")
        return None

    events: list[JobEvent] = []
    # One worker: the other job can only run if the deferred one gave it back.
    runner = JobRunner(
        engine, {"test.wait": waiting, "test.other": other}, concurrency=1, clock=clock, poll_s=0.05
    )
    runner.add_listener(events.append)
    started.append(runner)
    runner.start()
    job = runner.submit("test.wait", cube="c", max_attempts=1)
    runner.drain()
    deferred = engine.get_job(job.id)
    assert (deferred.state, deferred.attempts, deferred.message) == (
        "queued",
        0,
        "waiting for the thing",
    )
    assert deferred.not_before_us - clock() >= 5_000_000 - 1000
    assert [i.text for i in engine.list_items("c")] == ["before the deferral"]  # the step stays
    assert runner.run_now("test.other", "c", timeout=10).state == "succeeded"
    assert order == ["wait:1", "other"]
    clock.advance(2)
    runner.wake()
    runner.drain()
    assert order == ["wait:1", "other"]  # not due yet
    ready.set()
    clock.advance(4)
    runner.wake()
    runner.drain()
    done = engine.get_job(job.id)
    # max_attempts=1 and yet it ran twice: a deferral is not a failed attempt.
    assert (done.state, done.attempts, done.result) == ("succeeded", 1, {"waited": True})
    assert order == ["wait:1", "other", "wait:1"]
    assert [e.type for e in events if e.job_id == job.id] == [
        "queued",
        "started",
        "deferred",
        "started",
        "succeeded",
    ]


def test_a_deferred_job_can_be_cancelled_and_a_cancel_wins_over_deferral(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    def defer(ctx: JobContext) -> None:
        raise JobDeferred(60.0)

    runner = make_runner(engine, clock, {"test.defer": defer})
    started.append(runner)
    runner.start()
    job = runner.submit("test.defer", cube="c")
    runner.drain()
    assert engine.get_job(job.id).state == "queued"
    assert runner.cancel(job.id).state == "cancelled"
    # A cancel requested while the job runs: deferring then ends it cancelled.
    fresh = jobs.new_job(id="01M80PSCB9NQEF9VE49P0A27P0", kind="test.defer", now_us=clock())
    running = jobs.start(fresh, clock())
    requested = jobs.cancel(running, clock())
    assert jobs.defer(requested, clock(), 1_000_000).state == "cancelled"


def test_exhausted_attempts_end_failed_and_visible(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    def always(ctx: JobContext) -> dict[str, Any] | None:
        raise Conflict("still broken", reason="test")

    runner = make_runner(engine, clock, {"test.bad": always})
    started.append(runner)
    runner.start()
    job = runner.submit("test.bad", cube="c", max_attempts=2)
    runner.drain()
    clock.advance(60)
    runner.drain()
    job = engine.get_job(job.id)
    assert job.state == "failed"
    assert job.attempts == 2
    assert job.error == {"code": "conflict", "message": "still broken", "reason": "test"}
    assert [s for _, s in job.history] == ["queued", "running", "queued", "running", "failed"]


def test_bad_request_is_permanent(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    def refuse(ctx: JobContext) -> dict[str, Any] | None:
        raise BadRequest("bad args")

    runner = make_runner(engine, clock, {"test.refuse": refuse})
    started.append(runner)
    runner.start()
    job = runner.run_now("test.refuse", "c", timeout=10)
    assert (job.state, job.attempts, job.error["code"]) == ("failed", 1, "bad_request")  # type: ignore[index]


def test_an_oversized_write_is_permanent(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    """A write over the WAL's record limit would be as big on every attempt."""

    def huge(ctx: JobContext) -> dict[str, Any] | None:
        raise TooLarge("WAL payload of 78735777 bytes exceeds 67108864")

    runner = make_runner(engine, clock, {"test.huge": huge})
    started.append(runner)
    runner.start()
    job = runner.submit("test.huge", cube="c", max_attempts=3)
    runner.drain()
    job = engine.get_job(job.id)
    assert (job.state, job.attempts, job.error["code"]) == ("failed", 1, "too_large")  # type: ignore[index]


def test_cancel_queued_job_never_runs(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    ran: list[str] = []
    runner = make_runner(engine, clock, {"test.x": lambda ctx: ran.append(ctx.job.id)})
    started.append(runner)
    runner.start()
    job = runner.submit("test.x", cube="c", not_before_us=clock() + 60_000_000)
    assert runner.cancel(job.id).state == "cancelled"
    clock.advance(120)
    runner.drain()
    assert ran == []
    assert engine.get_job(job.id).state == "cancelled"
    with pytest.raises(Conflict):
        runner.cancel(job.id)


def test_cancel_running_job_stops_it_and_commits_nothing(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    entered = threading.Event()
    release = threading.Event()

    def slow(ctx: JobContext) -> dict[str, Any] | None:
        entered.set()
        release.wait(10)
        return ctx.commit(lambda p: {"item": p.add("c", "must not exist").id})

    runner = make_runner(engine, clock, {"test.slow": slow})
    started.append(runner)
    runner.start()
    job = runner.submit("test.slow", cube="c")
    assert entered.wait(10)
    assert runner.cancel(job.id).cancel_requested
    release.set()
    runner.drain()
    job = engine.get_job(job.id)
    assert job.state == "cancelled"
    assert [i.text for i in engine.list_items("c")] == []


def test_cooperative_cancel_check(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    entered = threading.Event()

    def loop(ctx: JobContext) -> dict[str, Any] | None:
        entered.set()
        for _ in range(1000):
            ctx.check_cancelled()
            threading.Event().wait(0.01)
        return {"finished": True}

    runner = make_runner(engine, clock, {"test.loop": loop})
    started.append(runner)
    runner.start()
    job = runner.submit("test.loop", cube="c")
    assert entered.wait(10)
    runner.cancel(job.id)
    assert runner.wait(job.id, timeout=10).state == "cancelled"


def test_running_job_after_crash_is_requeued_and_runs_once(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    job = engine.submit_job("test.once", cube="c")
    engine.transition_job(job.id, jobs.start)  # a runner died here
    runs: list[int] = []

    def once(ctx: JobContext) -> dict[str, Any] | None:
        runs.append(ctx.job.attempts)
        return ctx.commit(lambda p: {"item": p.add("c", "effect").id})

    runner = make_runner(engine, clock, {"test.once": once})
    started.append(runner)
    runner.start()
    done = runner.wait(job.id, timeout=10)
    assert (done.state, done.attempts, runs) == ("succeeded", 2, [2])
    assert [i.text for i in engine.list_items("c")] == ["effect"]
    assert "restarted after crash" in [h for _, h in done.history] or done.attempts == 2


def test_progress_events_and_persistence(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    events: list[JobEvent] = []

    def steps(ctx: JobContext) -> dict[str, Any] | None:
        for i in range(4):
            ctx.progress(i / 4, f"step {i}")
        return {"steps": 4}

    runner = JobRunner(engine, {"test.steps": steps}, clock=clock, progress_persist_s=0.0)
    started.append(runner)
    runner.add_listener(events.append)
    runner.start()
    job = runner.run_now("test.steps", "c", timeout=10)
    types = [e.type for e in events if e.job_id == job.id]
    assert types == [
        "queued",
        "started",
        "progress",
        "progress",
        "progress",
        "progress",
        "succeeded",
    ]
    assert events[-1].to_wire()["event"] == "job_succeeded"
    assert job.revision == 7  # queued, started, 4 persisted progress reports, succeeded
    assert job.progress == 1.0


def test_exclusive_jobs_of_one_cube_do_not_overlap(
    engine: Engine, clock: FakeClock, started: list[JobRunner]
) -> None:
    engine.create_cube("d", owner="uid:0")
    active: dict[str, int] = {}
    overlap: list[str] = []
    lock = threading.Lock()

    class Exclusive:
        exclusive_per_cube = True

        def __call__(self, ctx: JobContext) -> dict[str, Any] | None:
            cube = ctx.cube or ""
            with lock:
                active[cube] = active.get(cube, 0) + 1
                if active[cube] > 1:
                    overlap.append(cube)
            threading.Event().wait(0.05)
            with lock:
                active[cube] -= 1
            return None

    runner = JobRunner(engine, {"test.excl": Exclusive()}, concurrency=3, clock=clock, poll_s=0.02)
    started.append(runner)
    runner.start()
    ids = [runner.submit("test.excl", cube=c).id for c in ("c", "c", "c", "d")]
    runner.drain()
    assert overlap == []
    assert all(engine.get_job(i).state == "succeeded" for i in ids)


class _FsumInProcess:
    """A process-path handler: prepare in a thread, compute in a process, finish."""

    needs_process = True
    compute = staticmethod(math.fsum)  # picklable by reference

    def prepare(self, ctx: JobContext) -> list[float]:
        return [float(x) for x in ctx.args["values"]]

    def finish(self, ctx: JobContext, output: float) -> dict[str, Any]:
        return {"sum": output}

    def __call__(self, ctx: JobContext) -> dict[str, Any] | None:  # pragma: no cover
        raise AssertionError("the runner uses prepare/compute/finish")


def test_process_handler(engine: Engine, clock: FakeClock, started: list[JobRunner]) -> None:
    runner = make_runner(engine, clock, {"test.fsum": _FsumInProcess()})
    started.append(runner)
    runner.start()
    job = runner.run_now("test.fsum", "c", args={"values": [0.1] * 10}, timeout=60)
    assert job.state == "succeeded"
    assert job.result == {"sum": 1.0}


def test_run_now_unknown_kind(engine: Engine, clock: FakeClock) -> None:
    runner = make_runner(engine, clock, {})
    with pytest.raises(BadRequest):
        runner.run_now("test.none", "c")


def test_close_requeues_a_running_job(engine: Engine, clock: FakeClock) -> None:
    entered = threading.Event()

    def patient(ctx: JobContext) -> dict[str, Any] | None:
        entered.set()
        while True:
            ctx.check_cancelled()
            threading.Event().wait(0.01)

    runner = make_runner(engine, clock, {"test.patient": patient})
    runner.start()
    job = runner.submit("test.patient", cube="c")
    assert entered.wait(10)
    runner.close(timeout=10)
    after = engine.get_job(job.id)
    assert (after.state, after.attempts, after.cancel_requested) == ("queued", 1, False)


def test_job_to_wire_round_trips_through_msgpack(engine: Engine) -> None:
    from memosd.memcube import codec

    job = engine.submit_job("test.wire", cube="c", args={"a": [1, 2]})
    wire = jobs.job_to_wire(job)
    assert codec.unpackb(codec.packb(wire)) == wire
    assert wire["state"] == "queued"
    assert wire["terminal"] is False
    assert wire["args"] == {"a": [1, 2]}
