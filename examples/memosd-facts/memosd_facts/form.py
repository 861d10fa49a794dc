"""The ``fact`` memory form: one (subject, predicate, object) triple with validity.

Payload (a map, nothing else allowed)::

    {"subject": str, "predicate": str, "object": str | int | float | bool,
     "valid_from_us": int, "valid_to_us": int}      # both optional, world time

The item's text is derived: ``"subject predicate object"``, which is also what
search indexes, so ``memctl search CUBE "alice acme"`` finds the fact.
"""

from __future__ import annotations

from typing import Any, Final

from memosd.errors import BadRequest
from memosd.memcube.model import MemoryItem
from memosd.plugins.forms import BaseForm

__all__ = ["FACT_FORM", "FactForm", "fact_text"]

FACT_FORM: Final = "fact"
MAX_PART: Final = 256
_PARTS: Final = ("subject", "predicate", "object")
_TIMES: Final = ("valid_from_us", "valid_to_us")


def _bad(message: str) -> BadRequest:
    return BadRequest(f"fact: {message}", reason="bad_fact")


def fact_text(payload: dict[str, Any]) -> str:
    """The search text of a fact payload: ``"subject predicate object"``."""
    return " ".join(str(payload[part]) for part in _PARTS)


class FactForm(BaseForm):
    name = FACT_FORM
    description = "Structured facts: subject, predicate, object, valid from/to."

    def validate(self, text: str, payload: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        if not isinstance(payload, dict):
            raise _bad("a payload {subject, predicate, object} is required")
        unknown = set(payload) - {*_PARTS, *_TIMES}
        if unknown:
            raise _bad(f"unknown payload fields {sorted(unknown)}")
        clean: dict[str, Any] = {}
        for part in _PARTS:
            value = payload.get(part)
            if part == "object" and type(value) in (int, float, bool):
                clean[part] = value
                continue
            if not isinstance(value, str) or not value.strip():
                raise _bad(f"{part} must be a non-empty string, got {value!r}")
            if len(value) > MAX_PART:
                raise _bad(f"{part} is longer than {MAX_PART} characters")
            clean[part] = value.strip()
        for key in _TIMES:
            value = payload.get(key)
            if value is None:
                continue
            if type(value) is not int or value < 0:
                raise _bad(f"{key} must be a non-negative int of microseconds, got {value!r}")
            clean[key] = value
        start, end = clean.get("valid_from_us"), clean.get("valid_to_us")
        if start is not None and end is not None and start > end:
            raise _bad(f"valid_from_us ({start}) is after valid_to_us ({end})")
        # The form owns its text: whatever the client sent, the stored text is the triple.
        return fact_text(clean), clean

    def index_text(self, item: MemoryItem) -> str | None:
        if not item.payload:
            return None
        return fact_text(item.payload)
