"""Deferred adds: acknowledged once durable in the WAL, applied to LMDB later.

An acknowledged add must read back at once through every read (by id from
the engine's table of deferred adds, scans after having them applied),
must come before any later write that could read it, must reach listeners
once LMDB has it, and must survive a crash before LMDB ever saw it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from memosd.engine import ChangeEvent, Engine, EngineSettings
from memosd.errors import NotFound, StorageError, Unavailable
from memosd.store import view as view_module

# Deferred adds wait until something needs them applied: no age limit.
WAITING = EngineSettings(deferred_add_max_s=3600, checkpoint_interval_s=3600)


def _lmdb_applied(engine: Engine) -> int:
    return int(engine.status()["lmdb_applied_lsn"])


def _deferred(engine: Engine, lsn: int) -> bool:
    """Whether the write at ``lsn`` is acknowledged but not in LMDB yet."""
    return _lmdb_applied(engine) < lsn and engine.applied_lsn >= lsn


def test_by_id_reads_serve_deferred_adds(tmp_path: Path) -> None:
    with Engine.open(tmp_path, settings=WAITING) as engine:
        engine.create_cube("c", owner="uid:0")
        applied = engine.add("c", "in LMDB")
        engine.checkpoint()  # applies it
        before = _lmdb_applied(engine)
        item = engine.add("c", "deferred", tags=("t",), session="s1")
        assert _deferred(engine, engine.last_lsn)
        assert _lmdb_applied(engine) == before
        assert engine.status()["deferred_adds"] == 1
        assert engine.get("c", item.id) == item
        assert engine.get("c", item.id, version=1) == item
        with pytest.raises(NotFound):
            engine.get("c", item.id, version=2)
        assert engine.get("c", item.id, as_of_us=item.created_us) == item
        with pytest.raises(NotFound):
            engine.get("c", item.id, as_of_us=item.created_us - 1)
        assert engine.history("c", item.id) == [item]
        assert engine.get_many("c", [item.id, applied.id, "01J00000000000000000000000"]) == [
            item,
            applied,
            None,
        ]
        assert engine.get_many("other-cube", [item.id]) == [None]
        assert _deferred(engine, engine.last_lsn)  # none of that applied them


def test_scans_apply_deferred_adds_first(tmp_path: Path) -> None:
    with Engine.open(tmp_path, settings=WAITING) as engine:
        engine.create_cube("c", owner="uid:0")
        start = engine.last_lsn
        ids = [engine.add("c", f"m{i}").id for i in range(5)]
        assert _deferred(engine, engine.last_lsn)
        assert [i.id for i in engine.list_items("c")] == ids
        assert _lmdb_applied(engine) == engine.last_lsn
        more = engine.add("c", "counted").id
        assert engine.count_items("c")["active"] == 6
        last = engine.add("c", "exported").id
        exported = engine.export_cube("c")
        assert [versions[0].id for versions in exported.items] == [*ids, more, last]
        engine.add("c", "a change")
        events = engine.changes_since(start)
        assert len(events) == 8
        assert [e.lsn for e in events] == list(range(start + 1, engine.last_lsn + 1))


def test_other_writes_come_after_the_deferred_adds(tmp_path: Path) -> None:
    with Engine.open(tmp_path, settings=WAITING) as engine:
        engine.create_cube("c", owner="uid:0")
        item = engine.add("c", "v1")
        assert _deferred(engine, engine.last_lsn)
        updated = engine.update("c", item.id, text="v2")
        assert updated.version == 2
        assert [v.text for v in engine.history("c", item.id)] == ["v1", "v2"]
        engine.add("c", "one more")
        assert engine.drop_cube("c") == 2  # the deferred add is counted and dropped
        with pytest.raises(NotFound):
            engine.get("c", item.id)


def test_a_checkpoint_and_close_apply_them(tmp_path: Path) -> None:
    with Engine.open(tmp_path, settings=WAITING) as engine:
        engine.create_cube("c", owner="uid:0")
        item = engine.add("c", "checkpointed")
        engine.checkpoint()
        assert _lmdb_applied(engine) == engine.last_lsn
        last = engine.add("c", "closed")
    with Engine.open(tmp_path, settings=WAITING) as engine:
        assert engine.recovery["replayed_records"] == 0  # close applied it
        assert engine.get("c", last.id).text == "closed"
        assert engine.get("c", item.id).text == "checkpointed"


def test_an_add_with_a_payload_is_not_deferred(tmp_path: Path) -> None:
    with Engine.open(tmp_path, settings=WAITING) as engine:
        engine.create_cube("c", owner="uid:0")
        engine.add("c", "plain")
        assert _deferred(engine, engine.last_lsn)
        engine.add("c", "with payload", payload={"k": 1})
        assert _lmdb_applied(engine) == engine.last_lsn


def test_deferred_adds_off(tmp_path: Path) -> None:
    settings = EngineSettings(deferred_adds=0)
    with Engine.open(tmp_path, settings=settings) as engine:
        engine.create_cube("c", owner="uid:0")
        engine.add("c", "applied before its acknowledgement")
        assert _lmdb_applied(engine) == engine.last_lsn


def test_a_full_table_or_an_old_add_is_applied_by_the_writer(tmp_path: Path) -> None:
    settings = EngineSettings(deferred_adds=4, deferred_add_max_s=3600)
    with Engine.open(tmp_path, settings=settings) as engine:
        engine.create_cube("c", owner="uid:0")
        for i in range(3):
            engine.add("c", f"m{i}")
        assert _deferred(engine, engine.last_lsn)
        engine.add("c", "the fourth")
        assert _lmdb_applied(engine) == engine.last_lsn
    settings = EngineSettings(deferred_add_max_s=0)
    with Engine.open(tmp_path, settings=settings) as engine:
        engine.add("c", "old at once")
        assert _lmdb_applied(engine) == engine.last_lsn


def test_listeners_hear_a_deferred_add_when_it_is_acknowledged(tmp_path: Path) -> None:
    with Engine.open(tmp_path, settings=WAITING) as engine:
        engine.create_cube("c", owner="uid:0")
        heard: list[ChangeEvent] = []
        seen: list[tuple[str, int]] = []  # what the listener read back, and when

        def listen(event: ChangeEvent) -> None:
            # Runs in the writer's thread: reads by id and a scan both work.
            heard.append(event)
            assert event.item_id is not None
            text = engine.get("c", event.item_id).text
            listed = [i.id for i in engine.list_items("c")]
            assert event.item_id in listed
            seen.append((text, _lmdb_applied(engine)))

        engine.add_listener(listen)
        first = engine.add("c", "first")
        second = engine.add("c", "second")
        assert [(e.kind, e.item_id, e.version) for e in heard] == [
            ("item_written", first.id, 1),
            ("item_written", second.id, 1),
        ]
        assert [e.lsn for e in heard] == [heard[0].lsn, heard[0].lsn + 1]
        assert [text for text, _ in seen] == ["first", "second"]
        # The listener's scan had them applied (from the writer's own thread).
        assert [applied for _, applied in seen] == [e.lsn for e in heard]


def test_the_housekeeper_applies_adds_nobody_asks_for(tmp_path: Path) -> None:
    settings = EngineSettings(deferred_add_max_s=0.002)
    with Engine.open(tmp_path, settings=settings) as engine:
        engine.create_cube("c", owner="uid:0")
        engine.add("c", "left alone")
        lsn = engine.last_lsn
        # No write, scan or checkpoint follows: only the housekeeper can.
        pause = threading.Event()
        for _ in range(2000):  # 20 s at most
            if _lmdb_applied(engine) >= lsn:
                break
            pause.wait(0.01)
        assert _lmdb_applied(engine) == lsn


def test_reads_never_miss_an_acknowledged_add_while_adds_are_applied(tmp_path: Path) -> None:
    # Small table, no age: applications race the readers all the time.
    settings = EngineSettings(deferred_adds=8, deferred_add_max_s=0.0005)
    count = int(os.environ.get("MEMOSD_DEFERRED_RACE_ADDS", "1500"))
    with Engine.open(tmp_path, settings=settings) as engine:
        engine.create_cube("c", owner="uid:0")
        acked: list[str] = []
        done = threading.Event()
        misses: list[str] = []

        def write() -> None:
            try:
                for i in range(count):
                    acked.append(engine.add("c", f"m{i}").id)
            finally:
                done.set()

        def read() -> None:
            checks = 0
            while not done.is_set() or checks < 50:
                if not acked:
                    continue
                item_id = acked[-1]
                checks += 1
                try:
                    engine.get("c", item_id)
                    engine.history("c", item_id)
                except NotFound:
                    misses.append(item_id)
                if engine.get_many("c", [item_id]) == [None]:
                    misses.append(item_id)
                if checks % 50 == 0:
                    known = set(acked)
                    listed = {i.id for i in engine.list_items("c", limit=count)}
                    if not known <= listed:
                        misses.extend(known - listed)

        threads = [threading.Thread(target=write), threading.Thread(target=read)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert misses == []
        assert len(acked) == count


def test_a_failed_application_poisons_and_recovery_applies_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Engine.open(tmp_path, settings=WAITING) as engine:
        engine.create_cube("c", owner="uid:0")
        item = engine.add("c", "acknowledged")
        real_apply = view_module.StoreView.apply

        def broken(
            self: view_module.StoreView, mutation: object, payload: bytes | None = None
        ) -> None:
            raise StorageError("injected LMDB failure")

        monkeypatch.setattr(view_module.StoreView, "apply", broken)
        with pytest.raises(Unavailable):
            engine.update("c", item.id, text="refused")  # applying the add fails first
        assert not engine.healthy
        assert engine.get("c", item.id).text == "acknowledged"  # still served
        monkeypatch.setattr(view_module.StoreView, "apply", real_apply)
    with Engine.open(tmp_path, settings=WAITING) as engine:
        assert engine.recovery["replayed_records"] == 1
        assert engine.get("c", item.id) == item


_CHILD = """
import sys, structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from memosd.engine import Engine, EngineSettings
engine = Engine.open(sys.argv[1], settings=EngineSettings(deferred_add_max_s=3600))
engine.create_cube("c", owner="uid:0")
for i in range(20):
    item = engine.add("c", f"memory {i}")
    print("ack", item.id, flush=True)
print("deferred", engine.status()["lmdb_applied_lsn"] < engine.last_lsn, flush=True)
sys.stdin.read()  # until killed
"""


def test_deferred_adds_survive_kill_9_and_a_power_loss_image(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image = tmp_path / "image"
    acked = []
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            for line in child.stdout:
                word, value = line.split()
                if word == "deferred":
                    assert value == "True"  # LMDB has not applied the last ones
                    break
                acked.append(value)
            shutil.copytree(data, image)  # LMDB and WAL as they are, mid-deferral
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert len(acked) == 20
    for directory, boot in ((data, None), (image, "after-power-loss")):
        with Engine.open(directory, boot_id=boot) as engine:
            assert engine.recovery["replayed_records"] > 0
            items = engine.get_many("c", acked)
            assert [i.text if i else None for i in items] == [f"memory {i}" for i in range(20)]
            assert all(i is not None and i.version == 1 for i in items)
