"""bench/render.py: docs/benchmarks.md from JSON results (medians over runs) and notes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load("render")


def _run(path: Path, date: str, p50: float, note: str, area: str | None = None) -> None:
    result: dict[str, Any] = {
        "name": path.parent.name,
        "command": f".venv/bin/python bench/{path.parent.name}.py",
        "date": date,
        "machine": {"cores": 2, "ram_gib": 23.4, "load": [3.5, 2.0, 1.0]},
        "tables": [
            {
                "caption": "Search",
                "columns": ["system", "items", "p50 ms", "R@10", "note"],
                "rows": [["memosd", 10000, p50, 0.5, note], ["faiss", 10000, None, 1.0, ""]],
                "formats": {"R@10": "{:.3f}"},
            }
        ],
    }
    if area is not None:
        result["area"] = area
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


def test_numeric_cells_are_medians_over_runs_and_text_is_the_newest(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _run(results / "compare" / "run-1.json", "2026-11-22 01:00 UTC", 9.0, "old")
    _run(results / "compare" / "run-2.json", "2026-11-22 02:00 UTC", 1.0, "older")
    _run(results / "compare" / "run-3.json", "2026-11-22 03:00 UTC", 2.5, "new")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "intro.md").write_text("Intro text.\n")
    (notes / "compare.md").write_text("Why memosd is ahead.\n")
    text = render.render(render.load_results(results), notes)

    assert text.startswith("# Benchmarks\n")
    assert "| memosd | 10,000 | 2.50 | 0.500 | new |" in text  # median of 9.0, 1.0, 2.5
    assert "| faiss | 10,000 | — | 1.000 |  |" in text
    assert "Search (medians of 3 runs):" in text
    assert "`.venv/bin/python bench/compare.py` (2026-11-22 03:00 UTC, 2 cores" in text
    # Order: intro, then the area heading, its table, then its notes.
    assert text.index("Intro text.") < text.index("## Side by side") < text.index("| memosd")
    assert text.index("| memosd") < text.index("Why memosd is ahead.")


def test_runs_of_another_shape_are_not_mixed(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _run(results / "kv" / "run-1.json", "2026-11-22 01:00 UTC", 9.0, "x")
    newest = results / "kv" / "run-2.json"
    _run(newest, "2026-11-22 02:00 UTC", 4.0, "y")
    data = json.loads(newest.read_text())
    data["tables"][0]["rows"].append(["extra", 1, 1.0, 0.1, ""])
    newest.write_text(json.dumps(data))
    text = render.render(render.load_results(results), tmp_path / "no-notes")
    assert "| memosd | 10,000 | 4.00 |" in text
    assert "medians" not in text


def test_notes_only_areas_and_unknown_areas_are_rendered(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _run(results / "newbench" / "run-1.json", "2026-11-22 01:00 UTC", 1.0, "")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "storage.md").write_text("Hand-written storage table.\n")
    text = render.render(render.load_results(results), notes)
    assert "## Storage engine (issue 2)\n\nHand-written storage table." in text
    assert "## newbench" in text
    assert text.index("## Storage engine") < text.index("## newbench")
    assert "## Activation memory" not in text  # neither results nor notes


def test_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(render, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(render, "NOTES", tmp_path / "notes")
    monkeypatch.setattr(render, "load_results", lambda: {})
    out = tmp_path / "benchmarks.md"
    assert render.main(["--output", str(out)]) == 0
    assert render.main(["--output", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert render.main(["--output", str(out), "--check"]) == 1


def test_docs_benchmarks_md_is_rendered_from_results_and_notes() -> None:
    """docs/benchmarks.md is generated: edit docs/bench-notes/*.md, then run bench/render.py."""
    assert render.main(["--check"]) == 0
