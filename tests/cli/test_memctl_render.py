"""memctl's output helpers: JSON conversion and plain-text tables."""

from __future__ import annotations

import enum
import io
import json
from dataclasses import dataclass
from pathlib import Path

from memosd.cli.render import format_time_us, jsonable, preview, print_kv, print_table


class Color(enum.StrEnum):
    RED = "red"


@dataclass(frozen=True)
class Inner:
    tags: tuple[str, ...]
    color: Color


@dataclass(frozen=True)
class Outer:
    inner: Inner
    blob: bytes
    path: Path
    extra: dict[int, object]


def test_jsonable_is_plain_json() -> None:
    value = Outer(Inner(("a", "b"), Color.RED), b"\x00\xff", Path("/x"), {1: {2, 3} - {3}})
    converted = jsonable(value)
    assert converted == {
        "inner": {"tags": ["a", "b"], "color": "red"},
        "blob": "AP8=",
        "path": "/x",
        "extra": {"1": [2]},
    }
    json.dumps(converted)  # really serialisable


def test_table_alignment_and_empty_message() -> None:
    out = io.StringIO()
    print_table(["A", "LONGER"], [[1, None], ["wide cell", ["x", "y"]], [True, ""]], out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "A          LONGER"
    assert lines[1] == "---------  ------"
    assert lines[2] == "1          -"
    assert lines[3] == "wide cell  x,y"
    assert lines[4] == "yes"
    out = io.StringIO()
    print_table(["A"], [], out, empty="Nothing.")
    assert out.getvalue() == "Nothing.\n"


def test_kv_nested_values_are_json() -> None:
    out = io.StringIO()
    print_kv([("a", 1), ("nested", {"k": [1]}), ("segments", [{"x": 1}])], out)
    assert out.getvalue().splitlines() == [
        "a:         1",
        'nested:    {"k": [1]}',
        'segments:  [{"x": 1}]',
    ]


def test_time_and_preview() -> None:
    assert format_time_us(1_700_000_000_000_000) == "2023-11-14 22:13:20Z"
    assert format_time_us(None) == "-"
    assert format_time_us(10**30) == str(10**30)
    assert preview("a\nb   c") == "a b c"
    assert preview("x" * 100, 10) == "x" * 9 + "…"
