"""bench/compare.py helpers that need no peer venv: result tables, kill-round bookkeeping."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", REPO / "bench" / "compare.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module
    spec.loader.exec_module(module)
    return module


compare = _load()


def test_tables_have_one_cell_per_column_and_the_faiss_ratio() -> None:
    out = {
        "search": [
            {"system": "bare faiss (IndexFlatIP)", "items": 1000, "p50_ms": 0.5, "p99_ms": 1.0},
            {"system": "memosd dense", "items": 1000, "p50_ms": 1.5, "p99_ms": 3.0, "rss_mb": 300},
        ],
        "durability": [{"system": "memosd", "rounds": 2, "acked": 10, "lost": 0, "note": ""}],
    }
    for row in out["search"]:
        row.setdefault("rss_mb", None)
    tables = compare.tables(out)
    assert len(tables) == 2
    for table in tables:
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    ratio = tables[0]["columns"].index("p50 / faiss")
    assert [row[ratio] for row in tables[0]["rows"]] == [1.0, 3.0]


def test_a_failure_before_the_kill_is_reported_once_per_round() -> None:
    stop = threading.Event()
    acked: list[str] = []
    errors: list[str] = []
    calls = iter(["a", "b"])

    def add(text: str) -> str:
        try:
            return next(calls)
        except StopIteration:
            raise ValueError("Collection not initialized. Call create_col first.") from None

    compare._stream_adds(add, "r0", acked, stop, errors)
    assert acked == ["a", "b"]
    assert errors == ["Collection not initialized. Call create_col first."]
    notes = compare._round_notes({errors[0]: [1, 2, 3]})
    assert notes == [
        "adds failed before the kill in 3 round(s) (1-3): "
        "Collection not initialized. Call create_col first."
    ]


def test_a_failure_after_stop_is_the_kill_itself_and_not_reported() -> None:
    stop = threading.Event()
    errors: list[str] = []

    def add(text: str) -> str:
        stop.set()
        raise ConnectionError("gone")

    compare._stream_adds(add, "r0", [], stop, errors)
    assert errors == []
