"""The faiss index: exact while small, HNSW past a size, deletions, persistence."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from memosd.errors import BadRequest
from memosd.index.dense import DenseIndex


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim)).astype(np.float32)
    x = centres[rng.integers(0, 32, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _exact(x: np.ndarray, live: np.ndarray, q: np.ndarray, k: int) -> set[int]:
    sims = x[live] @ q
    return {int(live[i]) for i in np.argsort(-sims)[:k]}


STORAGES = ["float16", "float32"]


def _tol(storage: str) -> float:
    """Similarity tolerance of stored vectors (float16 components: ~1e-3 relative)."""
    return 1e-5 if storage == "float32" else 2e-3


@pytest.mark.parametrize("storage", STORAGES)
def test_flat_to_hnsw_switch_keeps_recall(storage: str) -> None:
    dim, n = 32, 6000
    x = _clustered(n, dim)
    index = DenseIndex(dim, hnsw_threshold=3000, ef_search=192, background=True, storage=storage)
    index.add(range(2000), x[:2000])
    assert index.kind == "flat"
    index.add(range(2000, 4000), x[2000:4000])  # crosses the threshold: background build
    # Writes during the build are logged and replayed onto the new graph.
    index.add(range(4000, n), x[4000:])
    index.remove(range(0, 300))
    assert index.wait_build(timeout=60)
    assert index.kind == "hnsw"
    assert len(index) == n - 300
    # Stored vectors of live labels, read back from the graph; removed ones are left out.
    got = index.vectors([5000, 17, 4000])
    assert sorted(got) == [4000, 5000]
    assert np.allclose(got[5000], x[5000], atol=_tol(storage))
    assert index.vectors([1, 2]) == {}
    live = np.arange(300, n)
    queries = _clustered(100, dim, seed=1)
    recall = []
    for q in queries:
        got = {label for label, _ in index.search(q, 10)}
        assert not got & set(range(300))  # removed labels never come back
        recall.append(len(got & _exact(x, live, q, 10)) / 10)
    assert np.mean(recall) >= 0.95


@pytest.mark.parametrize("storage", STORAGES)
def test_flat_search_is_exact_and_removal_is_real(storage: str) -> None:
    x = _clustered(500, 16)
    index = DenseIndex(16, storage=storage)
    index.add(range(500), x)
    assert index.search(x[7], 1) == [(7, pytest.approx(1.0, abs=_tol(storage)))]
    # Exact over the stored vectors: the same top 10 as brute force.
    assert {label for label, _ in index.search(x[9], 10)} == _exact(x, np.arange(500), x[9], 10)
    index.remove([7])
    assert 7 not in {label for label, _ in index.search(x[7], 5)}
    assert index.tombstones == 0
    index.add([7], x[8:9])  # a label may come back with another vector
    assert index.search(x[8], 2)[0][1] == pytest.approx(1.0, abs=_tol(storage))


def test_dimension_mismatch_is_a_bad_request() -> None:
    index = DenseIndex(16)
    with pytest.raises(BadRequest) as info:
        index.add([1], np.zeros((1, 8), dtype=np.float32))
    assert info.value.reason == "embedding_mismatch"
    with pytest.raises(BadRequest):
        index.search(np.zeros(8, dtype=np.float32), 3)


@pytest.mark.parametrize("storage", STORAGES)
def test_tombstones_trigger_a_fresh_graph(tmp_path: Path, storage: str) -> None:
    x = _clustered(1200, 16)
    index = DenseIndex(
        16, hnsw_threshold=1000, rebuild_ratio=0.2, background=False, storage=storage
    )
    index.add(range(1200), x)
    assert (index.kind, index.builds) == ("hnsw", 1)
    index.remove(range(200))
    assert index.tombstones == 200
    index.remove(range(200, 300))  # 300 > 0.2 * 1200: rebuilt without them
    assert (index.tombstones, index.builds, len(index)) == (0, 2, 900)
    path = str(tmp_path / "d.faiss")
    index.write(path)
    loaded = DenseIndex.load(path, index.live_labels(), hnsw_threshold=1000)
    assert loaded.kind == "hnsw"
    assert loaded.search(x[500], 3) == index.search(x[500], 3)


def test_a_float32_snapshot_loads_into_a_float16_index_and_rebuilds_as_float16(
    tmp_path: Path,
) -> None:
    """Snapshots written before float16 storage (IndexHNSWFlat) still load; the next
    rebuild stores the configured float16."""
    x = _clustered(1200, 16)
    old = DenseIndex(
        16, hnsw_threshold=1000, rebuild_ratio=0.2, background=False, storage="float32"
    )
    old.add(range(1200), x)
    path = str(tmp_path / "old.faiss")
    old.write(path)
    loaded = DenseIndex.load(
        path, old.live_labels(), hnsw_threshold=1000, rebuild_ratio=0.2, background=False
    )
    assert (loaded.kind, loaded.storage) == ("hnsw", "float16")
    assert loaded.search(x[500], 3) == old.search(x[500], 3)
    loaded.remove(range(300))  # past the ratio: a fresh graph, now float16
    assert loaded.builds == 1
    assert "SQ" in type(faiss.downcast_index(loaded._index.index)).__name__
    got = loaded.search(x[500], 1)
    assert got[0][0] == 500
    assert got[0][1] == pytest.approx(1.0, abs=2e-3)


def test_unknown_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="storage"):
        DenseIndex(16, storage="int8")


def test_hnsw_search_with_many_tombstones_still_returns_k_live() -> None:
    """The graph keeps removed labels; a search asks for more until k live ones are found."""
    dim, n = 16, 3000
    x = _clustered(n, dim)
    index = DenseIndex(dim, hnsw_threshold=1000, rebuild_ratio=0.95, background=False)
    index.add(range(n), x)
    assert index.kind == "hnsw"
    # Remove most of the graph around the query: the first fetch is mostly tombstones.
    sims = x @ x[0]
    near = [int(i) for i in np.argsort(-sims)[:2000]]
    index.remove(near)
    assert index.tombstones == 2000
    live = np.array(sorted(set(range(n)) - set(near)))
    got = index.search(x[0], 50)
    assert len(got) == 50
    assert not {label for label, _ in got} & set(near)
    assert len({label for label, _ in got} & _exact(x, live, x[0], 50)) >= 45


def test_writes_during_a_background_build_are_replayed_mostly_outside_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long build collects many adds; replaying them all under the lock would stall
    searches for seconds at 1M items. Big backlogs are replayed before the swap."""
    from memosd.index import dense as dense_module

    dim = 16
    x = _clustered(1600, dim)
    index = DenseIndex(dim, hnsw_threshold=1000, background=True)
    release = threading.Event()
    original_new_hnsw = index._new_hnsw

    def gated_new_hnsw() -> Any:
        assert release.wait(30)  # the build waits until the adds below are logged
        return original_new_hnsw()

    monkeypatch.setattr(index, "_new_hnsw", gated_new_hnsw)
    monkeypatch.setattr(dense_module, "_REPLAY_UNDER_LOCK", 100)
    rounds: list[tuple[int, bool]] = []
    original_replay = dense_module._replay

    def watched_replay(target: Any, pending: list[Any]) -> int:
        rounds.append((len(pending), index._lock.locked()))
        return original_replay(target, pending)

    monkeypatch.setattr(dense_module, "_replay", watched_replay)
    index.add(range(1000), x[:1000])  # crosses the threshold: the build starts, gated
    assert index.building
    for start in range(1000, 1600, 50):  # 600 vectors logged while it builds
        index.add(range(start, start + 50), x[start : start + 50])
    release.set()
    assert index.wait_build(timeout=60)
    assert index.kind == "hnsw"
    assert rounds[0] == (12, False)  # the backlog, replayed without the lock
    assert rounds[-1][1]  # the last (short) round under the lock, with the swap
    for label in (0, 999, 1000, 1599):
        assert index.search(x[label], 1)[0][0] == label


def test_writing_the_index_does_not_hold_up_searches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from memosd.index import dense as dense_module

    x = _clustered(200, 16)
    index = DenseIndex(16)
    index.add(range(200), x)
    inside, release = threading.Event(), threading.Event()
    real_write = faiss.write_index

    def gated_write(target: Any, path: str) -> None:
        inside.set()
        assert release.wait(30)
        real_write(target, path)

    monkeypatch.setattr(dense_module.faiss, "write_index", gated_write)
    path = str(tmp_path / "d.faiss")
    writer = threading.Thread(target=index.write, args=(path,))
    writer.start()
    assert inside.wait(30)
    assert index.search(x[5], 1, blocking=False)[0][0] == 5  # not WouldBlock
    release.set()
    writer.join(30)
    assert DenseIndex.load(path, index.live_labels()).search(x[5], 1)[0][0] == 5
