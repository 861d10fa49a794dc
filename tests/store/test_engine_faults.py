"""Faults: failing fsync/write, a full disk, LMDB map growth, stale readers."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from memosd.engine import Engine, EngineSettings
from memosd.errors import DiskFullError, Unavailable, WalFailedError
from memosd.wal.fileio import FaultyFileIO, OsFileIO


def _fill(engine: Engine, n: int) -> list[str]:
    return [engine.add("c", f"item {i} " + "z" * 200).id for i in range(n)]


# Adds are deferred by default (acknowledged before LMDB applies them) and
# take a path without the WAL's write-out hint; deferred_adds=0 makes every
# add a write applied before its acknowledgement, like every other write.
IMMEDIATE = EngineSettings(deferred_adds=0)


@pytest.mark.parametrize(
    ("op", "err", "exc_type", "deferred"),
    [
        ("fdatasync", errno.EIO, WalFailedError, True),
        ("fdatasync", errno.EIO, WalFailedError, False),
        ("fdatasync", errno.ENOSPC, DiskFullError, True),
        ("fdatasync", errno.ENOSPC, DiskFullError, False),
        ("write", errno.EIO, WalFailedError, True),
        ("write", errno.EIO, WalFailedError, False),
        ("write", errno.ENOSPC, DiskFullError, True),
        ("write", errno.ENOSPC, DiskFullError, False),
        ("start_writeback", errno.EIO, WalFailedError, False),
    ],
)
def test_wal_failure_poisons_engine_and_recovery_keeps_every_ack(
    tmp_path: Path, op: str, err: int, exc_type: type[Exception], deferred: bool
) -> None:
    # Deferred adds wait for nothing but the failure here (no age limit).
    settings = EngineSettings(deferred_add_max_s=3600) if deferred else IMMEDIATE
    with Engine.open(tmp_path) as engine:
        engine.create_cube("c", owner="uid:0")
        baseline = engine.status()
    # Count the calls a fresh open makes, then fail a few writes later.
    faulty = FaultyFileIO(OsFileIO(), fail_op=op, fail_at_call=10**9, errno=err)
    with Engine.open(tmp_path, wal_io=faulty, settings=settings) as probe:
        opened_calls = faulty.calls[op]
        probe.add("c", "probe")
    acked: list[str] = []
    faulty = FaultyFileIO(OsFileIO(), fail_op=op, fail_at_call=opened_calls + 6, errno=err)
    engine = Engine.open(tmp_path, wal_io=faulty, settings=settings)
    try:
        for i in range(5):
            acked.append(engine.add("c", f"write {i}").id)
        last_acked = engine.last_lsn
        # Deferred: the last acknowledged add is in the WAL only.
        assert (engine.status()["lmdb_applied_lsn"] < last_acked) == deferred
        assert engine.applied_lsn == last_acked
        with pytest.raises(exc_type):
            engine.add("c", "write 5")
        assert faulty.failed
        assert not engine.healthy
        assert len(acked) == 5
        # Never retries and carries on: every later write fails fast too.
        with pytest.raises(Unavailable):
            engine.add("c", "after failure")
        with pytest.raises(Unavailable):
            engine.checkpoint()
        # Reads keep working (deferred adds LMDB never applied included).
        assert engine.get("c", acked[0]).text == "write 0"
    finally:
        engine.close()
    with Engine.open(tmp_path) as reopened:
        texts = {i.text for i in reopened.list_items("c", limit=1000)}
        assert {f"write {i}" for i in range(5)} <= texts
        assert "after failure" not in texts
        assert reopened.healthy
        reopened.add("c", "usable again")
    assert baseline["healthy"]


def test_full_disk_refuses_writes_then_recovers_when_space_is_freed(tmp_path: Path) -> None:
    free = {"bytes": 10**12}
    settings = EngineSettings(min_free_bytes=100 * 2**20)
    with Engine.open(tmp_path, settings=settings, free_space=lambda: free["bytes"]) as engine:
        engine.create_cube("c", owner="uid:0")
        kept = engine.add("c", "before").id
        free["bytes"] = 10 * 2**20
        with pytest.raises(DiskFullError):
            engine.add("c", "refused")
        assert engine.healthy  # a full disk is not a broken disk
        free["bytes"] = 10**12
        engine.add("c", "after")
        assert [i.text for i in engine.list_items("c")] == ["before", "after"]
        assert engine.get("c", kept).text == "before"


def test_map_grows_instead_of_failing(tmp_path: Path) -> None:
    settings = EngineSettings(initial_map_size=1 << 20)
    with Engine.open(tmp_path, settings=settings) as engine:
        engine.create_cube("c", owner="uid:0")
        start = engine.status()["lmdb_map_size"]
        ids = _fill(engine, 12_000)  # ~ 5 MB of versions: several doublings
        assert engine.status()["lmdb_map_size"] > start
        assert engine.get("c", ids[0]).text.startswith("item 0 ")
        assert len(engine.list_items("c", limit=10**6)) == 12_000
    with Engine.open(tmp_path, settings=settings) as engine:
        assert engine.get("c", ids[-1]).text.startswith("item 11999 ")


def test_map_growth_waits_for_open_readers_and_holds_new_ones(tmp_path: Path) -> None:
    settings = EngineSettings(initial_map_size=1 << 20)
    with Engine.open(tmp_path, settings=settings) as engine:
        store = engine.store
        size = store.map_size
        grown = threading.Event()
        with store.read() as txn:
            grower = threading.Thread(target=lambda: (store.grow_map(), grown.set()))
            grower.start()
            assert not grown.wait(0.3)  # an open reader holds the resize back
            entries = txn.stat(store.dbs["meta"])["entries"]  # and still reads
        assert grown.wait(10)
        grower.join()
        assert store.map_size == 2 * size
        with store.read() as txn:  # the gate is open again
            assert txn.stat(store.dbs["meta"])["entries"] == entries
        with pytest.raises(RuntimeError), store.read():
            raise RuntimeError("a failing reader leaves the gate")
        store.grow_map()  # would wait forever for a leaked reader
        assert store.map_size == 4 * size


def test_stale_reader_slot_of_a_killed_process_is_cleared(tmp_path: Path) -> None:
    with Engine.open(tmp_path) as engine:
        engine.create_cube("c", owner="uid:0")
        _fill(engine, 10)
    # A process that dies with a read transaction open leaves a reader slot.
    script = textwrap.dedent(
        f"""
        import lmdb, os
        env = lmdb.open({str(tmp_path / "store")!r}, max_dbs=16, readonly=False)
        txn = env.begin()
        print(env.readers(), flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "pid" in out.stdout.lower() or out.stdout.strip()
    with Engine.open(tmp_path) as engine:
        assert engine.store.env.reader_check() == 0  # already cleared at open
        engine.add("c", "still writable")
        assert len(engine.list_items("c")) == 11


def _fail_change_log_once(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[int]:
    """Make the next change-log write (the one beside the WAL's fdatasync) raise ``exc``."""
    import memosd.engine as engine_module

    real = engine_module._record_logged
    calls: list[int] = []

    def flaky(view: object, events: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        real(view, events, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "_record_logged", flaky)
    return calls


def test_a_full_map_while_the_wal_syncs_applies_the_logged_batch_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmdb

    with Engine.open(tmp_path, settings=IMMEDIATE) as engine:
        engine.create_cube("c", owner="uid:0")
        before = engine.last_lsn
        size = engine.status()["lmdb_map_size"]
        calls = _fail_change_log_once(monkeypatch, lmdb.MapFullError("injected"))
        item = engine.add("c", "logged before the map filled")
        assert len(calls) == 2  # re-applied once, after growing the map
        assert engine.status()["lmdb_map_size"] > size
        assert engine.healthy
        assert engine.last_lsn == before + 1  # logged once, not re-planned
        assert engine.applied_lsn == before + 1
        assert [(e.item_id, e.lsn) for e in engine.changes_since(before)] == [(item.id, before + 1)]
        assert engine.get("c", item.id).text == "logged before the map filled"


def test_a_failing_change_log_write_poisons_but_keeps_the_durable_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Engine.open(tmp_path, settings=IMMEDIATE) as engine:
        engine.create_cube("c", owner="uid:0")
        _fail_change_log_once(monkeypatch, RuntimeError("a bug"))
        item = engine.add("c", "durable in the WAL")  # acknowledged: it is durable
        assert not engine.healthy
        with pytest.raises(Unavailable):
            engine.add("c", "refused")
    monkeypatch.undo()
    with Engine.open(tmp_path) as reopened:  # recovery applies it from the WAL
        assert reopened.get("c", item.id).text == "durable in the WAL"
        assert reopened.healthy
