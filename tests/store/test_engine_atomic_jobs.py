"""Atomic multi-write requests and durable jobs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from memosd.engine import Engine
from memosd.errors import Conflict, NotFound
from memosd.scheduler import jobs
from memosd.store.planner import Planner
from memosd.store.view import StoreView
from memosd.wal import scan_segment


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data") as eng:
        eng.create_cube("c", owner="uid:0")
        yield eng


def test_atomic_request_commits_all_or_nothing(engine: Engine) -> None:
    a = engine.add("c", "turn 1", tier="mid")
    b = engine.add("c", "turn 2", tier="mid")

    def consolidate(p: Planner) -> str:
        fact = p.add("c", "fact from turns", tier="long", parents=[(a.id, 1), (b.id, 1)])
        p.archive("c", a.id)
        p.archive("c", b.id)
        return fact.id

    fact_id = engine.atomic(consolidate)
    assert engine.get("c", fact_id).tier == "long"
    assert engine.get("c", a.id).status == "archived"

    def half_then_fail(p: Planner) -> None:
        p.add("c", "should vanish")
        p.archive("c", "01ARZ3NDEKTSV4RRFFQ69G5FAV")  # NotFound after a write

    before = {i.id for i in engine.list_items("c", status=None, limit=100)}
    with pytest.raises(NotFound):
        engine.atomic(half_then_fail)
    after = {i.id for i in engine.list_items("c", status=None, limit=100)}
    assert after == before


def test_atomic_request_is_one_wal_record(engine: Engine, tmp_path: Path) -> None:
    start = engine.status()["last_lsn"]
    engine.atomic(lambda p: [p.add("c", f"x{i}") for i in range(5)])
    assert engine.status()["last_lsn"] == start + 1
    changes = engine.changes_since(start)
    assert len(changes) == 5
    assert {c.lsn for c in changes} == {start + 1}


def test_torn_atomic_record_leaves_nothing(tmp_path: Path) -> None:
    """Cut the log inside an ATOMIC record: none of its writes may survive."""
    data = tmp_path / "data"
    with Engine.open(data) as eng:
        eng.create_cube("c", owner="uid:0")
        eng.add("c", "kept")
    image = tmp_path / "image"
    # Crash image: LMDB from before the atomic write, WAL with a torn record.
    with Engine.open(data) as eng:
        eng.checkpoint()
        shutil.copytree(data, image)
        eng.atomic(lambda p: [p.add("c", f"part {i}") for i in range(4)])
    wal_dir = data / "wal"
    segment = sorted(wal_dir.glob("*.wal"))[-1]
    data_bytes = segment.read_bytes()
    # The records end where the zero fill kept ahead of them begins.
    records_end = scan_segment(data_bytes, expected_first_lsn=None, is_last_segment=True).valid_end
    torn = data_bytes[: records_end - 10]
    (image / "wal" / segment.name).write_bytes(torn)
    with Engine.open(image) as eng:
        texts = {i.text for i in eng.list_items("c", limit=100)}
    assert texts == {"kept"}


def test_job_lifecycle_is_durable(tmp_path: Path) -> None:
    with Engine.open(tmp_path) as eng:
        eng.create_cube("c", owner="uid:0")
        job = eng.submit_job("tier.consolidate", cube="c", args={"segment": "s1"}, dedup_key="k")
        assert job.state == "queued"
        assert eng.submit_job("tier.consolidate", cube="c", dedup_key="k").id == job.id
        running = eng.transition_job(job.id, jobs.start)
        assert (running.state, running.attempts) == ("running", 1)
        with pytest.raises(Conflict):
            eng.transition_job(job.id, jobs.start)
    # Crash while running: reopen finds it running, the scheduler requeues it.
    with Engine.open(tmp_path) as eng:
        found = eng.get_job(job.id)
        assert found.state == "running"
        requeued = eng.transition_job(job.id, jobs.requeue_interrupted)
        assert requeued.state == "queued"
        again = eng.transition_job(job.id, jobs.start)
        done = eng.atomic(
            lambda p: (
                p.add("c", "effect"),
                p.transition_job(job.id, lambda j, now: jobs.succeed(j, now, {"n": 1})),
            )[1]
        )
        assert done.state == "succeeded"
        assert again.attempts == 2
        assert [j.id for j in eng.list_jobs(state="succeeded")] == [job.id]


def test_failed_attempts_back_off_then_fail_visibly(engine: Engine) -> None:
    job = engine.submit_job("kv.build", max_attempts=2)
    job = engine.transition_job(job.id, jobs.start)
    job = engine.transition_job(job.id, lambda j, now: jobs.fail(j, now, {"message": "boom"}))
    assert job.state == "queued"
    assert job.not_before_us > job.updated_us - 1
    job = engine.transition_job(job.id, jobs.start)
    job = engine.transition_job(job.id, lambda j, now: jobs.fail(j, now, {"message": "boom"}))
    assert job.state == "failed"
    assert job.error == {"message": "boom"}


def test_power_loss_replays_atomic_records(tmp_path: Path) -> None:
    data = tmp_path / "data"
    eng = Engine.open(data, boot_id="A")
    eng.create_cube("c", owner="uid:0")
    eng.checkpoint()
    snapshot = (data / "store" / "data.mdb").read_bytes()
    eng.atomic(lambda p: [p.add("c", f"r{i}") for i in range(3)])
    image = tmp_path / "image"
    shutil.copytree(data, image)
    eng.close()
    # Nothing LMDB wrote after the checkpoint reached the disk.
    (image / "store" / "data.mdb").write_bytes(snapshot)
    with Engine.open(image, boot_id="B") as recovered:
        assert recovered.recovery["replayed_records"] == 1
        assert sorted(i.text for i in recovered.list_items("c")) == ["r0", "r1", "r2"]


def test_atomic_future_resolves_without_blocking_the_caller(engine: Engine) -> None:
    futures = [engine.atomic_future(lambda p, i=i: p.add("c", f"async {i}")) for i in range(20)]
    items = [f.result(timeout=10) for f in futures]
    assert [i.text for i in items] == [f"async {i}" for i in range(20)]
    failing = engine.atomic_future(lambda p: p.add("missing-cube", "x"))
    with pytest.raises(NotFound):
        failing.result(timeout=10)


def test_a_plan_failing_halfway_in_a_shared_batch_leaves_nothing(engine: Engine) -> None:
    """Plans of one batch share a transaction; a half-written failure must vanish alone."""
    import threading

    release = threading.Event()

    def hold_the_leader(p: Planner) -> None:
        release.wait(10)  # later submissions queue up and form the next batch
        p.add("c", "first batch")

    def half_then_bug(p: Planner) -> None:
        p.add("c", "should vanish too")
        raise RuntimeError("a bug after a write")

    def half_then_fail(p: Planner) -> None:
        p.add("c", "should vanish")
        p.archive("c", "01ARZ3NDEKTSV4RRFFQ69G5FAV")  # NotFound after a write

    start = engine.last_lsn
    first = engine.atomic_future(hold_the_leader)
    plans = [
        lambda p: p.add("c", "kept 0"),
        half_then_fail,
        lambda p: p.add("c", "kept 1"),
        lambda p: p.add("missing-cube", "fails before writing"),
        half_then_bug,
        lambda p: p.add("c", "kept 2"),
    ]
    futures = [engine.atomic_future(plan) for plan in plans]
    release.set()
    first.result(timeout=10)
    kept = [futures[i].result(timeout=10).text for i in (0, 2, 5)]
    assert kept == ["kept 0", "kept 1", "kept 2"]
    with pytest.raises(NotFound):
        futures[1].result(timeout=10)
    with pytest.raises(NotFound):
        futures[3].result(timeout=10)
    with pytest.raises(Exception, match="a bug after a write"):
        futures[4].result(timeout=10)
    texts = sorted(i.text for i in engine.list_items("c", status=None, limit=100))
    assert texts == ["first batch", "kept 0", "kept 1", "kept 2"]
    # The three kept writes were one batch: one WAL record each, nothing else logged.
    assert engine.last_lsn == start + 4
    assert len(engine.changes_since(start)) == 4


def _open_ids(engine: Engine) -> list[str]:
    with engine.store.read() as txn:
        return [j.id for j in StoreView(txn, engine.store.dbs).open_jobs()]


def test_unfinished_jobs_are_indexed_and_the_index_is_built_for_old_stores(
    tmp_path: Path,
) -> None:
    with Engine.open(tmp_path / "data") as eng:
        eng.create_cube("c", owner="uid:1")
        queued = eng.submit_job("tier.consolidate", cube="c", dedup_key="a")
        running = eng.transition_job(eng.submit_job("kv.build").id, jobs.start)
        done = eng.transition_job(eng.submit_job("kv.build").id, jobs.start)
        done = eng.transition_job(done.id, lambda j, now: jobs.succeed(j, now, None))
        gone = eng.transition_job(eng.submit_job("kv.build").id, jobs.cancel)
        eng.atomic(lambda p: p.delete_job(gone.id))
        assert _open_ids(eng) == sorted([queued.id, running.id])
        assert [j.id for j in eng.list_jobs(state=jobs.JobState.QUEUED)] == [queued.id]
        assert [j.id for j in eng.list_jobs(state=jobs.JobState.SUCCEEDED)] == [done.id]
        # Dedup reads the index: the queued job absorbs a second request.
        assert eng.submit_job("tier.consolidate", cube="c", dedup_key="a").id == queued.id
    # A store from before the index: no index entries, no "indexed" mark.
    env = lmdb.open(str(tmp_path / "data" / "store"), max_dbs=32, subdir=True)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"openjobs", txn=txn), delete=False)
        txn.delete(b"open_jobs_indexed", db=env.open_db(b"meta", txn=txn))
    env.close()
    with Engine.open(tmp_path / "data") as eng:
        assert _open_ids(eng) == sorted([queued.id, running.id])
        assert [j.id for j in eng.list_jobs(state=jobs.JobState.RUNNING)] == [running.id]
