"""Training data of a cube's adapter, built from memory items.

Template (``TEMPLATE_ID`` = ``memosd-lora/1``), one sample per item, using the
item's *current* version::

    <bos>Memory: {text}\\n<eos>

``<bos>``/``<eos>`` are the tokenizer's own special tokens when it has them.
The short fixed cue ("Memory: ") gives the adapter a stable context to attach
the facts to without teaching it a chat format; the loss covers every token of
the sample, and the same samples are what the promotion gate measures.

Selection is deterministic: live items with non-empty text are ordered by id,
shuffled with ``random.Random(seed)``, and taken in that order while the
token budget (``max_tokens``, counted after truncation to ``max_seq_len``)
lasts.  Whatever is cut is reported in ``skipped`` so the manifest lists
exactly the ``(item id, version)`` pairs the adapter saw.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from memosd.lora.settings import LoraSettings
from memosd.memcube.model import MemoryItem, Status

__all__ = [
    "TEMPLATE",
    "TEMPLATE_ID",
    "TextTokenizer",
    "TrainingSample",
    "TrainingSet",
    "batches",
    "build_training_set",
    "encode_text",
    "format_memory",
]

TEMPLATE_ID: Final = "memosd-lora/1"
TEMPLATE: Final = "Memory: {text}\n"


class TextTokenizer(Protocol):
    """The part of a Hugging Face tokenizer this package uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, *, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class TrainingSample:
    item_id: str
    version: int
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class TrainingSet:
    samples: tuple[TrainingSample, ...]
    #: ``(item id, version, reason)`` of every offered item left out.
    skipped: tuple[tuple[str, int, str], ...]
    seed: int

    @property
    def pairs(self) -> list[tuple[str, int]]:
        """The ``(item id, version)`` pairs trained on, sorted by id."""
        return sorted((s.item_id, s.version) for s in self.samples)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "template": TEMPLATE_ID,
            "seed": self.seed,
            "items": [list(p) for p in self.pairs],
            "skipped": [list(s) for s in self.skipped],
            "tokens": self.total_tokens,
        }


def format_memory(text: str) -> str:
    """One memory as its training text (without special tokens)."""
    return TEMPLATE.format(text=text.strip())


def encode_text(tokenizer: TextTokenizer, text: str, max_seq_len: int) -> list[int]:
    """Token ids of one sample: bos + text + eos, truncated to ``max_seq_len``."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if tokenizer.bos_token_id is not None:
        ids.insert(0, int(tokenizer.bos_token_id))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids[:max_seq_len]


def build_training_set(
    items: Iterable[MemoryItem], tokenizer: TextTokenizer, settings: LoraSettings
) -> TrainingSet:
    """The samples for ``items`` under ``settings`` (see the module docstring)."""
    skipped: list[tuple[str, int, str]] = []
    candidates: list[MemoryItem] = []
    seen: set[str] = set()
    for item in sorted(items, key=lambda it: (it.id, -it.version)):
        if item.id in seen:
            skipped.append((item.id, item.version, "older_version"))
            continue
        seen.add(item.id)
        if item.status != Status.ACTIVE:
            skipped.append((item.id, item.version, f"status_{item.status}"))
        elif not item.text.strip():
            skipped.append((item.id, item.version, "empty"))
        else:
            candidates.append(item)
    random.Random(settings.seed).shuffle(candidates)
    samples: list[TrainingSample] = []
    budget = settings.max_tokens
    for item in candidates:
        text = format_memory(item.text)
        count = len(encode_text(tokenizer, text, settings.max_seq_len))
        if count > budget:
            skipped.append((item.id, item.version, "token_budget"))
            continue
        budget -= count
        samples.append(TrainingSample(item.id, item.version, text, count))
    return TrainingSet(tuple(samples), tuple(sorted(skipped)), settings.seed)


def batches(
    sequences: Sequence[list[int]], batch_size: int, *, seed: int, epoch: int
) -> list[list[list[int]]]:
    """The epoch's batches: a seeded shuffle of ``sequences``, cut into ``batch_size``."""
    order = list(range(len(sequences)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [
        [sequences[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]
