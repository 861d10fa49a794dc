"""The prefix template: how chosen memory texts become the tokens of a KV cache.

A KV cache covers an exact token sequence, so the way memories are turned
into text is part of the cache's identity and must be stable.  The default
template renders::

    <BOS>Memory:\\n            (header; BOS only if the tokenizer has one)
    - <text of item 1>\\n
    - <text of item 2>\\n
    ...
    \\n                         (footer: the prompt follows directly)

**Ordering.**  Items are sorted by ``(created_us, id)``: the time an item was
first written, ties broken by its (sortable) id.  That order does not change
when an item gets a new version, and memories added later go to the *end*,
so appending memories extends the previous prefix and the cached chunks for
it are reused (:mod:`memosd.kv.chunks`).  Pass ``order="given"`` to keep the
caller's order instead.

**Tokenisation per segment.**  The header, each item line and the footer are
tokenised separately and the ids concatenated.  With sub-word tokenizers a
string's tokens may depend on what follows it; per-segment tokenisation makes
the ids of every prefix independent of later items (an exact extension), at
the price of a possibly different split at segment boundaries than tokenising
the whole string at once.  The footer is the last segment, so an extended
prefix differs from the old one in the last segment only.  Continuations must
be tokenised separately too (as :mod:`memosd.integrations.hf` does).

Newlines inside an item's text are kept as they are: the template is not a
security boundary (memory text is trusted input of the model anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from memosd.errors import BadRequest
from memosd.memcube.model import MemoryItem
from memosd.models.backend import ModelBackend

__all__ = ["DEFAULT_TEMPLATE", "TEMPLATE_VERSION", "Prefix", "PrefixTemplate"]

TEMPLATE_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Prefix:
    """A rendered prefix: its text, its token ids and the item versions it contains."""

    text: str
    token_ids: tuple[int, ...]
    sources: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class PrefixTemplate:
    """Header, per-item line format (``{text}`` placeholder) and footer; see the module doc."""

    header: str = "Memory:\n"
    item: str = "- {text}\n"
    footer: str = "\n"
    add_bos: bool = True
    order: Literal["created", "given"] = "created"

    def describe(self) -> dict[str, object]:
        """The template as stored in a KV manifest (msgpack-safe)."""
        return {
            "version": TEMPLATE_VERSION,
            "header": self.header,
            "item": self.item,
            "footer": self.footer,
            "add_bos": self.add_bos,
            "order": self.order,
        }

    def ordered(self, items: Sequence[MemoryItem]) -> list[MemoryItem]:
        """``items`` in template order, refusing duplicates of one item id."""
        seen: set[str] = set()
        for it in items:
            if it.id in seen:
                raise BadRequest(f"item {it.id} given twice", reason="duplicate_item")
            seen.add(it.id)
        if self.order == "given":
            return list(items)
        return sorted(items, key=lambda it: (it.created_us, it.id))

    def render(self, items: Sequence[MemoryItem], backend: ModelBackend) -> Prefix:
        """The prefix for ``items`` with ``backend``'s tokenizer."""
        if "{text}" not in self.item:
            raise BadRequest("the item format must contain {text}")
        ordered = self.ordered(items)
        if not ordered:
            raise BadRequest("a KV cache needs at least one memory item", reason="no_items")
        segments = [self.header]
        segments.extend(self.item.replace("{text}", it.text) for it in ordered)
        segments.append(self.footer)
        ids: list[int] = []
        bos = getattr(backend.tokenizer, "bos_token_id", None)
        if self.add_bos and bos is not None:
            ids.append(int(bos))
        for segment in segments:
            if segment:
                ids.extend(backend.encode(segment))
        return Prefix(
            text="".join(segments),
            token_ids=tuple(ids),
            sources=tuple(it.key for it in ordered),
        )


DEFAULT_TEMPLATE: Final = PrefixTemplate()
