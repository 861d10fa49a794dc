"""Blob files with reference counts, and the change log for derived indexes."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memosd.engine import Engine, EngineSettings
from memosd.errors import BadRequest, Conflict, NotFound


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data") as eng:
        eng.create_cube("c", owner="uid:0")
        yield eng


def test_blob_put_is_content_addressed_and_idempotent(engine: Engine) -> None:
    sha = engine.blobs.put_bytes(b"tensor bytes")
    assert engine.blobs.put_bytes(b"tensor bytes") == sha
    assert engine.blobs.read(sha) == b"tensor bytes"
    assert engine.blobs.path(sha).name == sha
    with pytest.raises(NotFound):
        engine.blobs.path("0" * 64)
    with pytest.raises(BadRequest):
        engine.blobs.path("../etc/passwd")


def test_purge_deletes_blobs_only_when_no_version_references_them(engine: Engine) -> None:
    a = engine.blobs.put_bytes(b"adapter v1")
    b = engine.blobs.put_bytes(b"adapter v2")
    item = engine.add("c", "adapter", form="parameter", payload={"blobs": {"weights": a}})
    engine.update("c", item.id, payload={"blobs": {"weights": b}})
    # An older version still references a: it must survive.
    engine.checkpoint()
    assert engine.blobs.exists(a)
    assert engine.blobs.exists(b)
    engine.purge("c", item.id)
    assert not engine.blobs.exists(a)
    assert not engine.blobs.exists(b)


def test_shared_blob_survives_until_last_reference(engine: Engine) -> None:
    shared = engine.blobs.put_bytes(b"shared chunk")
    one = engine.add("c", "kv 1", form="activation", payload={"blobs": [shared]})
    two = engine.add("c", "kv 2", form="activation", payload={"blobs": [shared]})
    engine.purge("c", one.id)
    assert engine.blobs.exists(shared)
    engine.purge("c", two.id)
    assert not engine.blobs.exists(shared)


def test_drop_cube_deletes_its_blobs(engine: Engine) -> None:
    sha = engine.blobs.put_bytes(b"cube blob")
    engine.add("c", "x", payload={"blobs": {"w": sha}})
    engine.drop_cube("c")
    assert not engine.blobs.exists(sha)


def test_unreferenced_blobs_are_collected_at_start(tmp_path: Path) -> None:
    with Engine.open(tmp_path) as eng:
        eng.create_cube("c", owner="uid:0")
        kept = eng.blobs.put_bytes(b"referenced")
        eng.add("c", "x", payload={"blobs": {"w": kept}})
        orphan = eng.blobs.put_bytes(b"writer died before its WAL record")
        assert eng.blobs.exists(orphan)
    with Engine.open(tmp_path) as eng:
        assert eng.blobs.exists(kept)
        assert not eng.blobs.exists(orphan)


def test_change_log_lists_acknowledged_changes_in_lsn_order(engine: Engine) -> None:
    start = engine.applied_lsn
    item = engine.add("c", "one")
    engine.update("c", item.id, text="two")
    engine.delete("c", item.id)
    changes = engine.changes_since(start)
    assert [(c.kind, c.item_id, c.version) for c in changes] == [
        ("item_written", item.id, 1),
        ("item_written", item.id, 2),
        ("item_deleted", item.id, 3),
    ]
    assert [c.lsn for c in changes] == sorted(c.lsn for c in changes)
    assert engine.changes_since(changes[-1].lsn) == []
    assert engine.changes_since(start, limit=1) == changes[:1]


def test_change_log_is_pruned_below_the_slowest_consumer(engine: Engine) -> None:
    first = engine.add("c", "a")
    engine.add("c", "b")
    lsn_a = engine.changes_since(0)[-2].lsn
    engine.set_consumer_lsn("index", lsn_a)
    engine.checkpoint()
    remaining = engine.changes_since(lsn_a)
    assert [c.item_id for c in remaining][-1] != first.id
    with pytest.raises(Conflict) as info:
        engine.changes_since(0)
    assert info.value.reason == "changes_pruned"


def test_change_log_survives_restart(tmp_path: Path) -> None:
    with Engine.open(tmp_path) as eng:
        eng.create_cube("c", owner="uid:0")
        eng.set_consumer_lsn("index", 0)
        item = eng.add("c", "persist")
    with Engine.open(tmp_path) as eng:
        assert [c.item_id for c in eng.changes_since(0) if c.item_id] == [item.id]


def test_purge_does_not_delete_a_blob_another_writer_just_stored(engine: Engine) -> None:
    sha = engine.blobs.put_bytes(b"shared tensor")
    old = engine.add("c", "old cache", payload={"blobs": [sha]})
    # Another writer stores the same content and is about to reference it...
    assert engine.blobs.put_bytes(b"shared tensor") == sha
    engine.purge("c", old.id)  # ...while the only committed reference goes away.
    new = engine.add("c", "new cache", payload={"blobs": [sha]})
    assert engine.blobs.read(sha) == b"shared tensor"
    engine.purge("c", new.id)


def power_loss_image(tmp_path: Path, write: Callable[[Engine], None], *, consumer: bool) -> Path:
    """A data dir as after a power loss: LMDB at its last checkpoint, the WAL whole."""
    data = tmp_path / "data"
    with Engine.open(data, boot_id="A") as eng:
        eng.create_cube("c", owner="uid:0")
        if consumer:
            eng.set_consumer_lsn("index", eng.last_lsn)
        eng.checkpoint()
        snapshot = (data / "store" / "data.mdb").read_bytes()
        write(eng)
        image = tmp_path / "image"
        shutil.copytree(data, image)
    (image / "store" / "data.mdb").write_bytes(snapshot)
    return image


def test_power_loss_replay_restores_versions_blob_refs_and_needed_changes(
    tmp_path: Path,
) -> None:
    written: dict[str, Any] = {}

    def write(eng: Engine) -> None:
        start = eng.last_lsn
        sha = eng.blobs.put_bytes(b"kv tensor")
        cached = eng.add("c", "cached", form="activation", payload={"blobs": {"kv": sha}})
        doomed = eng.add("c", "doomed")
        eng.update("c", doomed.id, text="doomed v2")
        eng.delete("c", doomed.id)
        written.update(
            start=start,
            sha=sha,
            cached=cached,
            history=eng.history("c", doomed.id),
            changes=eng.changes_since(start),
        )

    image = power_loss_image(tmp_path, write, consumer=True)
    with Engine.open(image, boot_id="B") as eng:
        assert eng.recovery["replayed_records"] == 4
        assert eng.get("c", written["cached"].id) == written["cached"]
        assert eng.history("c", written["history"][0].id) == written["history"]
        assert [c.kind for c in written["changes"]] == ["item_written"] * 3 + ["item_deleted"]
        # The consumer still needs every change: replay logged them again.
        assert eng.changes_since(written["start"]) == written["changes"]
        # The replayed version counts its blob reference: purge releases it.
        assert eng.blobs.exists(written["sha"])
        eng.purge("c", written["cached"].id)
        eng.checkpoint()
        assert not eng.blobs.exists(written["sha"])


def test_power_loss_replay_without_consumers_logs_no_changes(tmp_path: Path) -> None:
    def write(eng: Engine) -> None:
        for i in range(3):
            eng.add("c", f"t{i}")

    image = power_loss_image(tmp_path, write, consumer=False)
    with Engine.open(image, boot_id="B") as eng:
        assert eng.recovery["replayed_records"] == 3
        assert [i.text for i in eng.list_items("c")] == ["t0", "t1", "t2"]
        with pytest.raises(Conflict) as info:
            eng.changes_since(0)
        assert info.value.reason == "changes_pruned"
        assert eng.changes_since(eng.last_lsn) == []


def test_change_log_prune_is_bounded_and_keeps_records_whole(tmp_path: Path) -> None:
    """A checkpoint prunes at most ~prune_batch entries (the writer's transaction holds
    writes up meanwhile), never splits an ATOMIC record's entries, and later
    checkpoints finish the job; the horizon says exactly how far it got."""
    settings = EngineSettings(prune_batch=2)
    with Engine.open(tmp_path, settings=settings) as eng:
        eng.create_cube("c", owner="uid:0")
        eng.set_consumer_lsn("index", 0)
        eng.add("c", "a")
        eng.atomic(lambda p: [p.add("c", t) for t in ("b1", "b2", "b3")])  # one LSN, 3 entries
        eng.add("c", "d")
        log = eng.changes_since(0)
        lsns = sorted({c.lsn for c in log})
        eng.set_consumer_lsn("index", eng.last_lsn)
        seen = []
        for _ in range(10):
            eng.checkpoint()
            try:
                remaining = eng.changes_since(0)
            except Conflict as exc:
                horizon = exc.details["horizon"]
                seen.append(horizon)
                remaining = eng.changes_since(horizon)
                # Whole records only: every entry of an LSN above the horizon is still there.
                assert [c for c in log if c.lsn > horizon] == remaining
            if seen and seen[-1] == eng.last_lsn:
                break
        assert seen[-1] == eng.last_lsn  # finished over several checkpoints
        assert len(set(seen)) >= 2  # ...not in one
        assert all(h in [*lsns, eng.last_lsn] for h in seen)
