"""SearchService over a real engine, with the hashing embedder (fast, lexical vectors)."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memosd.embed import HashingEmbedder
from memosd.engine import Engine
from memosd.errors import BadRequest, NotFound, Unavailable
from memosd.index import Boosts, IndexSettings, SearchFilters, SearchService
from memosd.index.cube import CubeIndex, text_digest
from memosd.index.fusion import score_fusion
from memosd.index.indexer import Indexer
from memosd.memcube.model import CubeConfig
from memosd.plugins.manager import PluginConfig, PluginManager

SETTINGS = IndexSettings(snapshot_interval_s=0, batch_wait_s=0.001)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder(64)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data", clock=FakeClock()) as eng:
        yield eng


def _serving(
    engine: Engine, tmp_path: Path, embedder: HashingEmbedder, settings: IndexSettings
) -> Iterator[SearchService]:
    """A started service with the cube "notes" (the body of the service fixtures)."""
    svc = SearchService(engine, tmp_path / "data", embedder=embedder, settings=settings)
    svc.start()
    assert svc.wait_ready(10)
    engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
    yield svc
    svc.close()


@pytest.fixture
def service(engine: Engine, tmp_path: Path, embedder: HashingEmbedder) -> Iterator[SearchService]:
    yield from _serving(engine, tmp_path, embedder, SETTINGS)


def _texts(hits: list) -> list[str]:  # type: ignore[type-arg]
    return [h.item.text for h in hits]


def test_read_your_writes_and_modes(engine: Engine, service: SearchService) -> None:
    engine.add("notes", "I live in Berlin near the river")
    engine.add("notes", "my favourite food is ramen")
    engine.add("notes", "the cat sleeps on the sofa")
    lsn = engine.applied_lsn
    for mode in ("hybrid", "dense", "lexical"):
        hits = service.search(["notes"], "berlin river", wait_for_lsn=lsn, mode=mode)
        assert _texts(hits)[0] == "I live in Berlin near the river", mode
    hits = service.search(["notes"], "ramen food", k=1, explain=True)
    assert len(hits) == 1
    assert {"fused", "dense", "lexical", "dense_rank", "lexical_rank"} <= set(hits[0].components)
    assert service.search(["notes"], "   ") == []
    with pytest.raises(BadRequest):
        service.search(["notes"], "x", mode="fuzzy")
    with pytest.raises(BadRequest):
        service.search(["notes"], "x", k=0)
    with pytest.raises(NotFound):
        service.search(["nope"], "x")


def test_updates_deletes_and_purges_are_reflected(engine: Engine, service: SearchService) -> None:
    item = engine.add("notes", "I live in Berlin")
    other = engine.add("notes", "secret code is 1234")
    engine.update("notes", item.id, text="I live in Paris")
    engine.delete("notes", other.id)
    lsn = engine.applied_lsn
    hits = service.search(["notes"], "live berlin paris", wait_for_lsn=lsn)
    assert [(h.item.text, h.item.version) for h in hits] == [("I live in Paris", 2)]
    assert service.search(["notes"], "secret code", mode="lexical") == []
    engine.purge("notes", item.id)
    assert service.search(["notes"], "paris", wait_for_lsn=engine.applied_lsn) == []
    archived = engine.add("notes", "old address in Rome")
    engine.update("notes", archived.id, status="archived")
    assert service.search(["notes"], "rome", wait_for_lsn=engine.applied_lsn) == []
    hits = service.search(["notes"], "rome", filters=SearchFilters(status="archived"))
    assert _texts(hits) == ["old address in Rome"]
    status = service.status()
    assert status["cubes"]["notes"]["items"] == 0
    assert status["indexed_lsn"] == engine.applied_lsn
    assert status["lag"] == 0


def test_filters_boosts_and_as_of(engine: Engine, service: SearchService) -> None:
    a = engine.add("notes", "coffee in the morning", tier="long", tags=("habit",), session="s1")
    engine.add("notes", "coffee with Anna", tier="short", tags=("people",), session="s2")
    engine.add("notes", "coffee beans from Kenya", importance=1.0, session="s2")
    lsn = engine.applied_lsn
    hits = service.search(
        ["notes"], "coffee", wait_for_lsn=lsn, filters=SearchFilters(tiers=("long",))
    )
    assert _texts(hits) == ["coffee in the morning"]
    hits = service.search(["notes"], "coffee", filters=SearchFilters(tags=("people",)))
    assert _texts(hits) == ["coffee with Anna"]
    hits = service.search(["notes"], "coffee", filters=SearchFilters(sessions=("s2",)))
    assert set(_texts(hits)) == {"coffee with Anna", "coffee beans from Kenya"}
    boosted = service.search(["notes"], "coffee", boosts=Boosts(importance=10.0))
    assert boosted[0].item.text == "coffee beans from Kenya"
    assert "importance" in boosted[0].components
    # Time travel: the text an item had at a past system time.
    before = a.recorded_us
    engine.update("notes", a.id, text="tea in the morning")
    service.wait_indexed(engine.applied_lsn, 10)
    assert "tea in the morning" in _texts(service.search(["notes"], "morning"))
    past = service.search(["notes"], "coffee morning", filters=SearchFilters(as_of_us=before))
    assert past[0].item.text == "coffee in the morning"
    assert past[0].item.version == 1


def test_search_spans_cubes_and_records_hits(engine: Engine, service: SearchService) -> None:
    engine.create_cube("work", owner="uid:1", config=service.cube_config())
    engine.add("notes", "dentist appointment on friday")
    w = engine.add("work", "friday deadline for the report")
    hits = service.search(["notes", "work"], "friday", wait_for_lsn=engine.applied_lsn)
    assert {h.item.cube for h in hits} == {"notes", "work"}
    engine.checkpoint()  # flushes pending usage
    assert engine.get("work", w.id).usage.hits == 1


def test_embedding_mismatch_is_refused(engine: Engine, service: SearchService) -> None:
    engine.create_cube("other", owner="uid:1", config=CubeConfig("e5-large", 1024))
    engine.add("other", "hello world")
    lsn = engine.applied_lsn
    with pytest.raises(BadRequest) as info:
        service.search(["other"], "hello", wait_for_lsn=lsn)
    assert info.value.reason == "embedding_mismatch"
    assert "e5-large" in info.value.message
    # Lexical search still works on such a cube.
    assert _texts(service.search(["other"], "hello", mode="lexical")) == ["hello world"]
    with pytest.raises(BadRequest):
        service.check_cube_config("other", CubeConfig("e5-large", 1024))
    assert service.status()["cubes"]["other"]["embedding_mismatch"]


def test_restart_catches_up_from_snapshot_without_reembedding(
    engine: Engine, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = HashingEmbedder(64)
    svc = SearchService(engine, data, embedder=first, settings=SETTINGS)
    svc.start()
    engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
    items = [engine.add("notes", f"note number {i} about topic{i % 7}") for i in range(40)]
    svc.wait_indexed(engine.applied_lsn, 10)
    svc.close()  # writes the snapshot
    assert (data / "index" / "MANIFEST").exists()
    # Changes while the index is down: replayed from engine.changes_since.
    engine.update("notes", items[0].id, text="rewritten note about volcanoes")
    engine.delete("notes", items[1].id)
    engine.add("notes", "a brand new note about glaciers")

    second = HashingEmbedder(64)
    svc2 = SearchService(engine, data, embedder=second, settings=SETTINGS)
    svc2.start()
    assert svc2.wait_ready(10)
    assert second.texts_embedded == 2  # the update and the new item, nothing else
    assert svc2.status()["cubes"]["notes"]["items"] == 40
    assert _texts(svc2.search(["notes"], "volcanoes", k=1)) == ["rewritten note about volcanoes"]
    assert _texts(svc2.search(["notes"], "glaciers", k=1)) == ["a brand new note about glaciers"]
    hits = svc2.search(["notes"], "note number 1 about topic1", mode="lexical", k=40)
    assert items[1].id not in {h.item.id for h in hits}
    svc2.close()


def test_corrupt_snapshot_is_rebuilt(engine: Engine, tmp_path: Path) -> None:
    data = tmp_path / "data"
    svc = SearchService(engine, data, embedder=HashingEmbedder(64), settings=SETTINGS)
    svc.start()
    engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
    for i in range(10):
        engine.add("notes", f"fact {i} penguin{i}")
    svc.wait_indexed(engine.applied_lsn, 10)
    svc.close()
    faiss_file = next((data / "index" / "notes").glob("*.faiss"))
    raw = bytearray(faiss_file.read_bytes())
    raw[-5] ^= 0xFF
    faiss_file.write_bytes(bytes(raw))

    again = HashingEmbedder(64)
    svc2 = SearchService(engine, data, embedder=again, settings=SETTINGS)
    svc2.start()
    assert svc2.wait_ready(10)
    assert again.texts_embedded == 10  # that cube was rebuilt from the engine
    assert _texts(svc2.search(["notes"], "penguin3", k=1)) == ["fact 3 penguin3"]
    svc2.close()
    # A damaged manifest means a full rebuild too.
    (data / "index" / "MANIFEST").write_bytes(b"garbage")
    third = HashingEmbedder(64)
    svc3 = SearchService(engine, data, embedder=third, settings=SETTINGS)
    svc3.start()
    assert svc3.wait_ready(10)
    assert third.texts_embedded == 10
    svc3.close()


def test_cube_switches_to_hnsw_inside_the_service(engine: Engine, tmp_path: Path) -> None:
    settings = IndexSettings(snapshot_interval_s=0, hnsw_threshold=50, hnsw_background=False)
    svc = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=settings)
    svc.start()
    engine.create_cube("big", owner="uid:1", config=svc.cube_config())
    for i in range(80):
        engine.add("big", f"entry {i} keyword{i}")
    svc.wait_indexed(engine.applied_lsn, 10)
    assert svc.status()["cubes"]["big"]["dense_kind"] == "hnsw"
    assert _texts(svc.search(["big"], "keyword42", k=1, mode="dense")) == ["entry 42 keyword42"]
    svc.close()


def test_metadata_only_updates_keep_the_vector(engine: Engine, tmp_path: Path) -> None:
    """A tier move or metadata update re-embeds nothing and leaves no HNSW tombstone;
    a changed text (or retrieval context) is re-indexed; snapshots keep the digests."""
    settings = IndexSettings(snapshot_interval_s=0, hnsw_threshold=50, hnsw_background=False)
    emb = HashingEmbedder(64)
    svc = SearchService(engine, tmp_path / "data", embedder=emb, settings=settings)
    svc.start()
    engine.create_cube("big", owner="uid:1", config=svc.cube_config())
    items = [engine.add("big", f"entry {i} keyword{i}", session=f"s{i % 3}") for i in range(80)]
    svc.wait_indexed(engine.applied_lsn, 10)
    assert emb.texts_embedded == 80
    for it in items[:60]:
        engine.update("big", it.id, tier="mid", metadata={"segment": "seg1"})
    svc.wait_indexed(engine.applied_lsn, 10)
    cube = svc.status()["cubes"]["big"]
    assert emb.texts_embedded == 80  # nothing re-embedded
    assert svc.status()["texts_unchanged"] == 60
    assert (cube["dense_kind"], cube["dense_vectors"], cube["dense_tombstones"]) == ("hnsw", 80, 0)
    hits = svc.search(["big"], "keyword7", k=1, mode="dense")
    assert (hits[0].item.text, hits[0].item.version, hits[0].item.tier) == (
        "entry 7 keyword7",
        2,
        "mid",
    )
    # Neighbours still follow the sessions after the moves.
    index = svc.indexer.cubes["big"]
    assert index.neighbours(items[3].id) == (items[0].id, items[6].id)
    assert index.version_of(items[3].id) == 2
    # A new text, or a new retrieval context, is indexed again.
    engine.update("big", items[1].id, text="entry one rewritten about volcanoes")
    engine.update("big", items[2].id, metadata={"context": "glaciers and ice"})
    svc.wait_indexed(engine.applied_lsn, 10)
    assert emb.texts_embedded == 83  # the two, plus the dense query above
    assert _texts(svc.search(["big"], "volcanoes", k=1, mode="lexical")) == [
        "entry one rewritten about volcanoes"
    ]
    assert _texts(svc.search(["big"], "glaciers", k=1, mode="lexical")) == ["entry 2 keyword2"]
    assert not svc.search(["big"], "keyword1", k=5, mode="lexical")  # its old terms are gone
    svc.close()  # writes the snapshot, digests included

    again = HashingEmbedder(64)
    svc2 = SearchService(engine, tmp_path / "data", embedder=again, settings=settings)
    svc2.start()
    assert svc2.wait_ready(10)
    engine.update("big", items[70].id, tier="mid")
    svc2.wait_indexed(engine.applied_lsn, 10)
    assert again.texts_embedded == 0  # the loaded digest matched
    assert svc2.indexer.cubes["big"].version_of(items[70].id) == 2
    svc2.close()
    # A rebuild from the engine places moved items by their history's session.
    shutil.rmtree(tmp_path / "data" / "index")
    svc3 = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=settings)
    svc3.start()
    assert svc3.wait_ready(10)
    assert svc3.indexer.cubes["big"].neighbours(items[3].id) == (items[0].id, items[6].id)
    svc3.close()


def test_known_vectors_are_the_indexed_embeddings_of_exactly_that_text(
    engine: Engine, tmp_path: Path
) -> None:
    emb = HashingEmbedder(64)
    for storage, threshold in (("float32", 10_000), ("float16", 20)):
        settings = IndexSettings(
            snapshot_interval_s=0,
            hnsw_threshold=threshold,
            hnsw_background=False,
            vector_storage=storage,
        )
        cube = f"c{storage}"
        svc = SearchService(engine, tmp_path / cube, embedder=emb, settings=settings)
        svc.start()
        engine.create_cube(cube, owner="uid:1", config=svc.cube_config())
        texts = [f"turn {i} about topic{i % 5}" for i in range(30)]
        items = [engine.add(cube, t) for t in texts]
        with_context = engine.add(cube, "same words", metadata={"context": "a question"})
        svc.wait_indexed(engine.applied_lsn, 10)
        asked = [(it.id, it.text) for it in items[:10]]
        asked += [(items[10].id, "another text"), ("01HF7YAT00GSKMGD7VG863D1CE", "x")]
        asked += [(with_context.id, "same words")]  # indexed with its context: not this text
        known = svc.known_vectors(cube, asked)
        assert sorted(known) == sorted(it.id for it in items[:10])
        want = emb.embed(texts[:10])
        got = np.stack([known[it.id] for it in items[:10]])
        assert np.allclose(got, want, atol=1e-3 if storage == "float16" else 1e-6)
        assert svc.known_vectors("no such cube", asked) == {}
        svc.close()


def test_unknown_digest_is_reindexed() -> None:
    """Entries loaded from a snapshot written before digests existed (0) are re-indexed."""
    cube = CubeIndex("c", dense=None)
    cube.upsert_many([("a", 1, "hello world")], None, ["s"])
    assert cube.advance("a", 2, "hello world", "s")
    assert not cube.advance("a", 3, "hello there", "s")
    assert not cube.advance("missing", 1, "hello world", None)
    label, version, _ = cube.by_item["a"]
    cube.by_item["a"] = (label, version, 0)
    assert not cube.advance("a", 3, "hello world", "s")
    assert text_digest("x") != text_digest("y")
    assert text_digest("") != 0


def test_rrf_fusion_and_retrieval_context(engine: Engine, tmp_path: Path) -> None:
    settings = IndexSettings(snapshot_interval_s=0, fusion="rrf")
    svc = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=settings)
    svc.start()
    engine.create_cube("chat", owner="uid:1", config=svc.cube_config())
    engine.add("chat", "Yes, twice a week!", metadata={"context": "Do you still go climbing?"})
    engine.add("chat", "I had pasta for dinner")
    hits = svc.search(["chat"], "climbing", wait_for_lsn=engine.applied_lsn, explain=True)
    assert hits[0].item.text == "Yes, twice a week!"  # found through its context only
    assert {"rrf", "lexical", "lexical_rank"} <= set(hits[0].components)
    svc.close()


def test_search_before_start_or_after_close_is_unavailable(engine: Engine, tmp_path: Path) -> None:
    svc = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=SETTINGS)
    engine.create_cube("c", owner="uid:1", config=svc.cube_config())
    with pytest.raises(Unavailable):
        svc.search(["c"], "x")
    svc.start()
    assert svc.wait_ready(10)
    assert svc.search(["c"], "x") == []
    svc.close()
    svc.close()  # idempotent
    with pytest.raises(Unavailable) as info:
        svc.search(["c"], "x")
    assert info.value.reason == "index_stopped"


def test_filters_that_skip_many_candidates_return_no_duplicates(
    engine: Engine, service: SearchService
) -> None:
    for i in range(30):
        engine.add("notes", f"apple pie number {i}", tier="long" if i % 3 == 0 else "short")
    lsn = engine.applied_lsn
    hits = service.search(
        ["notes"], "apple pie", k=8, wait_for_lsn=lsn, filters=SearchFilters(tiers=("long",))
    )
    ids = [h.item.id for h in hits]
    assert len(ids) == 8
    assert len(set(ids)) == 8
    assert all(h.item.tier == "long" for h in hits)
    boosted = service.search(
        ["notes"], "nothing matches zzz", mode="lexical", boosts=Boosts(heat=1)
    )
    assert boosted == []


def test_forms_decide_what_is_indexed(
    engine: Engine, tmp_path: Path, embedder: HashingEmbedder
) -> None:
    forms = PluginManager(PluginConfig(), entry_points=list).load().forms
    derived = {"quote": lambda item: f"{item.payload['who']} said {item.text}"}

    def form_text(item: Any) -> str | None:
        if item.form in derived:
            return derived[item.form](item)
        return forms.index_text(item)  # type: ignore[no-any-return]

    svc = SearchService(
        engine, tmp_path / "data", embedder=embedder, settings=SETTINGS, form_text=form_text
    )
    svc.start()
    try:
        engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
        engine.add("notes", "adapter weights of zebra", form="parameter", payload={"blobs": {}})
        engine.add("notes", "hello there", form="quote", payload={"who": "zebra"})
        engine.add("notes", "a plain zebra note")
        lsn = engine.applied_lsn
        for mode in ("hybrid", "lexical", "dense"):
            hits = svc.search(["notes"], "zebra", wait_for_lsn=lsn, mode=mode)
            # The blob-backed item is kept out; the quote is found by its derived text.
            assert sorted(_texts(hits)) == ["a plain zebra note", "hello there"], mode
    finally:
        svc.close()


def test_explained_components_match_the_fusion(engine: Engine, service: SearchService) -> None:
    """Components are built per hit: each must still be what the fusion computed."""
    for text in ("ramen and sushi tonight", "ramen recipe", "sushi bar", "the cat sleeps"):
        engine.add("notes", text)
    lsn = engine.applied_lsn
    dense = service.search(["notes"], "ramen sushi", k=10, mode="dense", wait_for_lsn=lsn)
    lexical = service.search(["notes"], "ramen sushi", k=10, mode="lexical")
    lists = {
        "dense": [(h.item.id, h.components["dense"]) for h in dense],
        "lexical": [(h.item.id, h.components["lexical"]) for h in lexical],
    }
    weights = {"dense": SETTINGS.dense_weight, "lexical": SETTINGS.lexical_weight}
    expected = score_fusion(lists, weights=weights, scaling={"dense": "minmax", "lexical": "max"})
    hits = service.search(["notes"], "ramen sushi", k=10, explain=True)
    assert [h.item.id for h in hits] == [key for key, _, _ in expected]
    dense_at = {key: i for i, (key, _) in enumerate(lists["dense"], start=1)}
    for hit, (key, score, scaled) in zip(hits, expected, strict=True):
        c = hit.components
        assert hit.score == pytest.approx(score)
        assert c["fused"] == pytest.approx(score)
        for name, value in scaled.items():
            assert c[f"{name}_scaled"] == pytest.approx(value)
        assert c["dense"] == pytest.approx(dict(lists["dense"])[key])
        assert c["dense_rank"] == dense_at[key]
        assert ("lexical" in c) == (key in dict(lists["lexical"]))


def _conversation(engine: Engine) -> dict[str, str]:
    """Two sessions; "gamma" appears once in each, once next to an "alpha" turn."""
    ids = {}
    for name, text, session in (
        ("u1", "gamma", "s2"),
        ("t0", "unrelated opener", "s1"),
        ("t1", "alpha", "s1"),
        ("t2", "gamma", "s1"),
        ("u2", "closing words", "s2"),
    ):
        ids[name] = engine.add("notes", text, session=session).id
    return ids


def test_session_neighbours_lift_the_turn_next_to_a_match(engine: Engine, tmp_path: Path) -> None:
    for weight, expected in ((0.0, "u1"), (0.3, "t2")):
        settings = IndexSettings(snapshot_interval_s=0, neighbour_weight=weight)
        svc = SearchService(
            engine, tmp_path / f"data{weight}", embedder=HashingEmbedder(64), settings=settings
        )
        svc.start()
        if not engine.list_cubes():
            engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
            ids = _conversation(engine)
        hits = svc.search(["notes"], "alpha gamma", wait_for_lsn=engine.applied_lsn, mode="lexical")
        by_id = {h.item.id: h for h in hits}
        # Both "gamma" turns score the same on their own; the one next to "alpha" wins
        # only with smoothing, and says why.
        gammas = [h.item.id for h in hits if h.item.text == "gamma"]
        assert gammas[0] == ids[expected], weight
        assert ("neighbour" in by_id[ids["t2"]].components) == (weight > 0)
        cube = svc.indexer.cube("notes")
        assert cube is not None
        assert cube.neighbours(ids["t1"]) == (ids["t0"], ids["t2"])
        assert cube.neighbours(ids["u1"]) == (None, ids["u2"])
        svc.close()


def test_session_order_survives_snapshots_and_deletes(engine: Engine, tmp_path: Path) -> None:
    svc = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=SETTINGS)
    svc.start()
    engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
    ids = _conversation(engine)
    svc.wait_indexed(engine.applied_lsn, 10)
    svc.close()  # snapshot
    engine.delete("notes", ids["t1"])
    svc2 = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=SETTINGS)
    svc2.start()
    assert svc2.wait_ready(10)
    cube = svc2.indexer.cube("notes")
    assert cube is not None
    assert cube.neighbours(ids["t0"]) == (None, ids["t2"])  # t1's gap closed
    assert cube.neighbours(ids["u2"]) == (ids["u1"], None)
    svc2.close()


def test_neighbour_smoothing_equals_its_definition(engine: Engine, tmp_path: Path) -> None:
    """Random candidate lists over two cubes: each candidate gains weight x the best
    positive candidate score among its session neighbours, re-ranked stably."""
    import random

    svc = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=SETTINGS)
    svc.start()
    ids: dict[str, list[str]] = {}
    for name in ("a", "b"):
        engine.create_cube(name, owner="uid:1", config=svc.cube_config())
        ids[name] = [
            engine.add(name, f"turn {i}", session=None if i % 7 == 3 else f"s{i % 3}").id
            for i in range(40)
        ]
    assert svc.wait_indexed(engine.applied_lsn, 10)
    weight = svc.settings.neighbour_weight
    cubes = {name: svc.indexer.cube(name) for name in ids}
    rnd = random.Random(7)
    for _ in range(200):
        names = rnd.choice([["a"], ["b"], ["a", "b"]])
        keys = [(n, i) for n in names for i in rnd.sample(ids[n], rnd.randint(1, 30))]
        rnd.shuffle(keys)
        # Coarse scores make ties; some are negative (cosine), which never lift.
        ranked = [(key, rnd.choice([-0.2, 0.0, 0.1, 0.3, 0.5, 0.5, 0.9]), 0.0) for key in keys]
        ranked.sort(key=lambda entry: -entry[1])  # as the fusion ranks them
        base = {key: score for key, score, _ in ranked}
        expected_bonus: dict[tuple[str, str], float] = {}
        expected = []
        for key, score, fused in ranked:
            cube = cubes[key[0]]
            assert cube is not None
            best = max(
                (base.get((key[0], other), 0.0) for other in cube.neighbours(key[1]) if other),
                default=0.0,
            )
            best = max(best, 0.0)
            if best > 0:
                expected_bonus[key] = weight * best
            expected.append((key, score + weight * best, fused))
        expected.sort(key=lambda entry: -entry[1])
        got, bonus = svc._smooth_by_neighbours(ranked)
        assert got == expected
        assert bonus == expected_bonus
    svc.close()


class ThreadRecordingEmbedder(HashingEmbedder):
    """The hashing embedder, noting which threads embed and holding each call a moment."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.threads: set[str] = set()

    def embed(self, texts: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        time.sleep(0.01)  # long enough that a second worker takes its share meanwhile
        return super().embed(texts)


def _embed_backlog(
    engine: Engine,
    tmp_path: Path,
    embedder: HashingEmbedder,
    texts: list[str],
    *,
    batch_size: int,
    workers: int,
) -> tuple[Indexer, Any]:
    """An indexer over ``embedder`` and its embedding of ``texts``, checked to be
    in the input's order whatever batches and workers it went through."""
    settings = IndexSettings(snapshot_interval_s=0, batch_size=batch_size, embed_workers=workers)
    indexer = Indexer(engine, tmp_path / "index", embedder, settings)
    got = indexer._embed(texts)
    assert (got == HashingEmbedder(embedder.dim).embed(texts)).all()  # the input's order
    return indexer, got


@pytest.mark.parametrize("workers", [1, 2])
def test_a_backlog_is_embedded_by_embed_workers_in_order(
    engine: Engine, tmp_path: Path, workers: int
) -> None:
    embedder = ThreadRecordingEmbedder(64)
    texts = [f"memory number {i} about topic {i % 7}" for i in range(200)]
    indexer, got = _embed_backlog(engine, tmp_path, embedder, texts, batch_size=16, workers=workers)
    assert got.shape == (200, 64)
    assert len(embedder.threads) == workers
    assert indexer.texts_embedded == 200
    assert indexer.embed_calls == 13  # 16-text batches, whichever worker embeds them
    assert indexer._embed(texts[:40]).shape == (40, 64)  # small: not split
    indexer.stop()


class CountingEmbedder(HashingEmbedder):
    """The hashing embedder with a token count (words) and a record of each batch."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.batches: list[list[int]] = []
        self._lock = threading.Lock()

    def token_counts(self, texts: Any) -> list[int]:
        return [len(t.split()) for t in texts]

    def embed(self, texts: Any) -> Any:
        with self._lock:
            self.batches.append(self.token_counts(texts))
        return super().embed(texts)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_backlog_is_cut_into_batches_of_similar_length(
    engine: Engine, tmp_path: Path, workers: int
) -> None:
    embedder = CountingEmbedder(64)
    texts = [" ".join(["word"] * (1 + (i * 37) % 50)) + f" {i}" for i in range(100)]
    indexer, _ = _embed_backlog(engine, tmp_path, embedder, texts, batch_size=10, workers=workers)
    batches = sorted(embedder.batches)
    assert len(batches) == 10
    for shorter, longer in itertools.pairwise(batches):
        assert max(shorter) <= min(longer)  # no batch mixes short and long texts
    indexer.stop()


def test_everything_written_in_one_burst_is_searchable_with_two_workers(
    engine: Engine, tmp_path: Path
) -> None:
    settings = IndexSettings(snapshot_interval_s=0, batch_wait_s=0.001, embed_workers=2)
    svc = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(256), settings=settings)
    svc.start()
    assert svc.wait_ready(10)
    engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    texts = [f"{words[i % 8]} {words[(i // 8) % 8]} {words[(i // 64) % 8]} {i}" for i in range(300)]
    engine.atomic(lambda p: [p.add("notes", t) for t in texts])
    for text in texts[::37]:
        hits = svc.search(["notes"], text, k=1, mode="dense", wait_for_lsn=engine.applied_lsn)
        assert _texts(hits) == [text]
    svc.close()


def _spy_candidates(svc: SearchService, cube_name: str) -> list[tuple[str, int]]:
    """Record how many candidates each search asks the cube's indexes for."""
    cube = svc.indexer.cube(cube_name)
    assert cube is not None
    asked: list[tuple[str, int]] = []
    dense, lexical = cube.search_dense, cube.search_lexical

    def search_dense(query: Any, n: int, *, blocking: bool = True) -> list[tuple[str, float]]:
        asked.append(("dense", n))
        return dense(query, n, blocking=blocking)

    def search_lexical(terms: Any, n: int, *, blocking: bool = True) -> list[tuple[str, float]]:
        asked.append(("lexical", n))
        return lexical(terms, n, blocking=blocking)

    cube.search_dense = search_dense  # type: ignore[method-assign]
    cube.search_lexical = search_lexical  # type: ignore[method-assign]
    return asked


def test_single_mode_searches_without_reranking_ask_for_k_candidates(
    engine: Engine, service: SearchService
) -> None:
    for i in range(40):
        engine.add("notes", f"note {i} about river {'berlin' * (i % 3)} walk {i % 7}", tags=["t"])
    lsn = engine.applied_lsn
    service.search(["notes"], "river", wait_for_lsn=lsn)
    asked = _spy_candidates(service, "notes")
    daemon_filters = SearchFilters(tags=(), status="active")  # what the daemon passes
    top = {
        mode: service.search(["notes"], "berlin river walk 3", k=20, mode=mode)
        for mode in ("dense", "lexical")
    }
    assert asked == [("dense", 20), ("lexical", 20)]
    for mode in ("dense", "lexical"):
        asked.clear()
        hits = service.search(
            ["notes"], "berlin river walk 3", k=3, mode=mode, filters=daemon_filters
        )
        assert [h.item.id for h in hits] == [h.item.id for h in top[mode][:3]]
        assert [h.score for h in hits] == [h.score for h in top[mode][:3]]
        assert asked == [(mode, 3)]
    # Fusion, restrictive filters and boosts still look at `candidates` per list.
    n = SETTINGS.candidates
    for kwargs, expected in (
        ({}, [("dense", n), ("lexical", n)]),
        ({"mode": "dense", "filters": SearchFilters(tags=("t",))}, [("dense", n)]),
        ({"mode": "lexical", "boosts": Boosts(importance=1.0)}, [("lexical", n)]),
    ):
        asked.clear()
        service.search(["notes"], "berlin river", k=3, **kwargs)
        assert asked == expected, kwargs


def test_cubes_with_sessions_keep_all_candidates_for_smoothing(
    engine: Engine, tmp_path: Path
) -> None:
    svc = SearchService(engine, tmp_path / "data", embedder=HashingEmbedder(64), settings=SETTINGS)
    svc.start()
    engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
    _conversation(engine)
    full = svc.search(["notes"], "alpha gamma", wait_for_lsn=engine.applied_lsn, mode="lexical")
    asked = _spy_candidates(svc, "notes")
    hits = svc.search(["notes"], "alpha gamma", k=1, mode="lexical")
    assert asked == [("lexical", SETTINGS.candidates)]
    assert [h.item.id for h in hits] == [full[0].item.id]
    assert "neighbour" in hits[0].components or "neighbour" in full[1].components
    svc.close()


# --- searches on the daemon's event loop (try_search_inline) -----------------------------


def _same(a: list[Any], b: list[Any]) -> None:
    assert [(h.item.id, h.score, h.components) for h in a] == [
        (h.item.id, h.score, h.components) for h in b
    ]


@pytest.fixture
def roomy(engine: Engine, tmp_path: Path, embedder: HashingEmbedder) -> Iterator[SearchService]:
    """A service whose inline budget (0.1 s) no search here exceeds, however loaded the box."""
    settings = IndexSettings(snapshot_interval_s=0, batch_wait_s=0.001, inline_search_us=100_000)
    yield from _serving(engine, tmp_path, embedder, settings)


def test_inline_search_gives_the_threaded_results(engine: Engine, roomy: SearchService) -> None:
    service = roomy
    for i in range(30):
        engine.add("notes", f"note {i} about {'berlin' if i % 3 else 'paris'} and coffee {i % 7}")
    engine.add("notes", "walk", session="s1")
    lsn = engine.applied_lsn
    filters = SearchFilters(tiers=("short", "long"))
    for mode in ("hybrid", "dense", "lexical"):
        for query, kwargs in (("berlin coffee", {}), ("paris", {"k": 3, "filters": filters})):
            # Never inline before a search of this kind was measured.
            assert service.try_search_inline(["notes"], query, mode=mode, **kwargs) is None
            threaded = service.search(["notes"], query, mode=mode, wait_for_lsn=lsn, **kwargs)
            inline = service.try_search_inline(
                ["notes"], query, mode=mode, wait_for_lsn=lsn, **kwargs
            )
            assert inline is not None, (mode, query)
            _same(inline, threaded)
            again = service.search(["notes"], query, mode=mode, **kwargs)
            _same(again, threaded)
    # The same errors as the threaded path.
    with pytest.raises(BadRequest):
        service.try_search_inline(["notes"], "x", mode="fuzzy")
    engine.create_cube("empty", owner="uid:1", config=service.cube_config())
    service.search(["empty"], "berlin")
    engine.drop_cube("empty")
    with pytest.raises(NotFound):
        service.try_search_inline(["empty"], "berlin")


def test_inline_search_is_refused_when_it_would_wait_or_cost_too_much(
    engine: Engine, tmp_path: Path, roomy: SearchService, embedder: HashingEmbedder
) -> None:
    svc = roomy
    engine.add("notes", "berlin coffee")
    lsn = engine.applied_lsn
    svc.search(["notes"], "berlin", wait_for_lsn=lsn, mode="dense")
    assert svc.try_search_inline(["notes"], "berlin", mode="dense") is not None
    # Not indexed yet: the search would wait for the indexer.
    assert svc.try_search_inline(["notes"], "berlin", wait_for_lsn=lsn + 10) is None
    # A history filter scans the cube: always a thread.
    past = SearchFilters(as_of_us=engine.get_cube("notes").created_us)
    assert svc.try_search_inline(["notes"], "berlin", mode="dense", filters=past) is None
    # A held index lock (the indexer applying a batch): never wait for it.
    cube = svc.indexer.cube("notes")
    assert cube is not None
    assert cube.dense is not None
    with cube.dense._lock:
        assert svc.try_search_inline(["notes"], "berlin", mode="dense") is None
    with cube.lock:
        assert svc.try_search_inline(["notes"], "berlin", mode="lexical") is None
    # An uncached query whose embedding is too slow (or not measured) stays off the loop.
    svc.queries.embed_cost_s = None
    assert svc.try_search_inline(["notes"], "a new query", mode="dense") is None
    svc.queries.embed_cost_s = 1.0
    assert svc.try_search_inline(["notes"], "another query", mode="dense") is None
    svc.queries.embed_cost_s = 1e-6
    assert svc.try_search_inline(["notes"], "a cheap query", mode="dense") is not None
    # Estimated over the budget.
    for key in svc._costs:
        svc._costs[key] = 1.0
    assert svc.try_search_inline(["notes"], "berlin", mode="dense") is None
    off = SearchService(
        engine,
        tmp_path / "data2",
        embedder=embedder,
        settings=IndexSettings(snapshot_interval_s=0, inline_search_us=0),
    )
    off.start()
    try:
        assert off.wait_ready(10)
        off.search(["notes"], "berlin", wait_for_lsn=engine.applied_lsn)
        assert off.try_search_inline(["notes"], "berlin") is None
    finally:
        off.close()
    with pytest.raises(BadRequest):
        IndexSettings(inline_search_us=-1)


def test_snapshot_with_the_earlier_bm25_layout_loads_without_rebuilding(
    engine: Engine, tmp_path: Path
) -> None:
    """A snapshot whose BM25 file holds the per-label term counts written before the
    packed layout (2026-12-03) still loads: nothing is re-embedded, lexical search works."""
    import hashlib
    from collections import Counter

    import msgpack

    from memosd.index.bm25 import tokenize

    data = tmp_path / "data"
    svc = SearchService(engine, data, embedder=HashingEmbedder(64), settings=SETTINGS)
    svc.start()
    engine.create_cube("notes", owner="uid:1", config=svc.cube_config())
    texts = [f"note {i} about penguin{i % 5} and glacier{i % 3}" for i in range(30)]
    for text in texts:
        engine.add("notes", text)
    svc.wait_indexed(engine.applied_lsn, 10)
    svc.close()
    root = data / "index"
    body, _ = msgpack.unpackb((root / "MANIFEST").read_bytes(), raw=False)
    manifest = msgpack.unpackb(body, raw=False, strict_map_key=False)
    entry = manifest["cubes"]["notes"]
    gen = entry["gen"]
    cube_dir = root / "notes"
    labels = [int(x) for x in np.load(cube_dir / f"{gen}.labels.npy", allow_pickle=False)]
    ids = msgpack.unpackb((cube_dir / f"{gen}.items.msgpack").read_bytes(), raw=False)["ids"]
    text_of = {item.id: item.text for item in engine.list_items("notes", limit=100)}
    old_state = {
        "k1": 1.2,
        "b": 0.75,
        "labels": labels,
        "terms": [list(Counter(tokenize(text_of[i])).items()) for i in ids],
    }
    bm25_file = cube_dir / f"{gen}.bm25.msgpack"
    bm25_file.write_bytes(msgpack.packb(old_state, use_bin_type=True))
    entry["files"][bm25_file.name] = hashlib.sha256(bm25_file.read_bytes()).hexdigest()
    body = msgpack.packb(manifest, use_bin_type=True)
    (root / "MANIFEST").write_bytes(
        msgpack.packb([body, hashlib.sha256(body).digest()], use_bin_type=True)
    )

    again = HashingEmbedder(64)
    svc2 = SearchService(engine, data, embedder=again, settings=SETTINGS)
    svc2.start()
    assert svc2.wait_ready(10)
    assert again.texts_embedded == 0  # loaded, not rebuilt
    hits = svc2.search(["notes"], "penguin3 glacier0", mode="lexical", k=3)
    assert _texts(hits)[0] == "note 3 about penguin3 and glacier0"
    svc2.close()
