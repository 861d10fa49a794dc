"""Output of memctl: stable JSON for scripts, aligned plain-text tables for people.

JSON output is built from the public fields of the client's result objects
(dataclasses become objects, tuples lists, enums their values, bytes base64,
times stay integers in microseconds), so it is exactly the data model and does
not change with the human layout.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "format_time_us",
    "jsonable",
    "preview",
    "print_json",
    "print_kv",
    "print_table",
]


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of ``value``."""
    if isinstance(value, enum.Enum):  # before str/int: StrEnum/IntEnum are both
        return jsonable(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if hasattr(value, "_asdict"):
        return jsonable(value._asdict())
    if hasattr(value, "__dict__"):
        return {k: jsonable(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


def print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(jsonable(value), indent=2, ensure_ascii=False, sort_keys=False))
    out.write("\n")


def format_time_us(value: Any) -> str:
    """``2026-11-22 03:58:23Z`` for microseconds since the epoch; ``-`` for none."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    try:
        moment = dt.datetime.fromtimestamp(value / 1e6, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def preview(text: Any, width: int = 60) -> str:
    """One line of at most ``width`` characters."""
    one_line = " ".join(str(text).split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO, *, empty: str = ""
) -> None:
    """Left-aligned columns separated by two spaces."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        if empty:
            out.write(empty + "\n")
        return
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines: list[Sequence[str]] = [headers, *cells]
    for i, line in enumerate(lines):
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")
        if i == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def _nested(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list | tuple) and any(isinstance(v, dict | list) for v in value)


def print_kv(pairs: Iterable[tuple[str, Any]], out: TextIO) -> None:
    """``key: value`` lines with the values aligned."""
    items = [(k, json.dumps(jsonable(v)) if _nested(v) else _cell(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0)
    for key, value in items:
        out.write(f"{(key + ':').ljust(width + 1)}  {value}\n")
