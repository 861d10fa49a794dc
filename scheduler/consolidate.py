"""Consolidators: turn a segment's turns into candidate long-term facts.

* :class:`ExtractiveConsolidator` (default, no LLM): keeps the informative
  sentences of each turn (:func:`memosd.scheduler.tiers.informative_sentences`),
  at most ``max_facts`` per segment by score in conversation order, and
  merges near-duplicates (cosine >= ``duplicate_threshold``, or equal
  normalised text) keeping the first wording and the union of sources.
* :class:`OpenAICompatibleConsolidator`: asks an OpenAI-compatible
  ``/chat/completions`` endpoint for a JSON list of facts, each naming the
  turns it came from.  Only used when configured; any transport or format
  error fails the job attempt (it is retried with backoff), it never falls
  back silently.

Both return :class:`FactDraft` values whose ``sources`` are the
``(item id, version)`` pairs of the turns, which become the long-term
item's provenance parents.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from memosd.embed import Embedder
from memosd.errors import PluginError, Unavailable
from memosd.scheduler.tiers import informative_sentences, normalize_text

__all__ = [
    "Consolidator",
    "ExtractiveConsolidator",
    "FactDraft",
    "OpenAICompatibleConsolidator",
    "SourceTurn",
]


@dataclass(frozen=True, slots=True)
class SourceTurn:
    id: str
    version: int
    text: str


@dataclass(frozen=True, slots=True)
class FactDraft:
    """A candidate fact; ``vector`` is its embedding when the consolidator already has it."""

    text: str
    sources: tuple[tuple[str, int], ...]
    vector: Vector | None = field(default=None, compare=False, repr=False)


class Consolidator(Protocol):
    """Turns of one segment (in conversation order) -> candidate facts."""

    @property
    def name(self) -> str: ...

    def consolidate(self, turns: Sequence[SourceTurn]) -> list[FactDraft]: ...


class ExtractiveConsolidator:
    """Informative sentences, near-duplicates merged.  Deterministic, no model but the embedder."""

    name = "extractive"

    def __init__(
        self,
        embedder: Embedder,
        *,
        min_words: int = 4,
        max_facts: int = 20,
        duplicate_threshold: float = 0.9,
    ) -> None:
        self.embedder = embedder
        self.min_words = min_words
        self.max_facts = max_facts
        self.duplicate_threshold = duplicate_threshold

    def consolidate(self, turns: Sequence[SourceTurn]) -> list[FactDraft]:
        candidates: list[tuple[int, str, float, tuple[str, int]]] = []
        for turn in turns:
            for sentence, score in informative_sentences(turn.text, min_words=self.min_words):
                candidates.append((len(candidates), sentence, score, (turn.id, turn.version)))
        if not candidates:
            return []
        # Best by score, then back in conversation order.
        kept = sorted(candidates, key=lambda c: (-c[2], c[0]))[: self.max_facts]
        kept.sort(key=lambda c: c[0])
        vectors = np.asarray(self.embedder.embed([c[1] for c in kept]), dtype=np.float32)
        similarity = vectors @ vectors.T
        merged: list[tuple[str, list[tuple[str, int]]]] = []  # text, sources
        rows: list[int] = []  # the row of each merged fact
        by_norm: dict[str, int] = {}  # normalised text -> index in merged
        for row, (_, sentence, _, source) in enumerate(kept):
            norm = normalize_text(sentence)
            index = by_norm.get(norm)
            if index is None and rows:
                scores = similarity[row, rows]
                best = int(np.argmax(scores))
                if float(scores[best]) >= self.duplicate_threshold:
                    index = best
            if index is None:
                by_norm[norm] = len(merged)
                merged.append((sentence, [source]))
                rows.append(row)
            elif source not in merged[index][1]:
                merged[index][1].append(source)
        return [
            FactDraft(text, tuple(sources), vectors[row])
            for (text, sources), row in zip(merged, rows, strict=True)
        ]


_SYSTEM_PROMPT: Final = (
    "You consolidate conversation turns into durable long-term memory facts. "
    'Return JSON only: {"facts": [{"text": "...", "sources": [turn numbers]}]}. '
    "Each fact is one short self-contained sentence naming who it is about; keep "
    "preferences, biographical details, plans and events; skip small talk."
)

Vector = npt.NDArray[np.float32]
Transport = Callable[[str, dict[str, str], bytes, float], bytes]


def _urllib_transport(url: str, headers: dict[str, str], body: bytes, timeout: float) -> bytes:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read()
            return data
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise Unavailable(f"consolidation endpoint {url} failed: {exc}", reason="llm") from exc


class OpenAICompatibleConsolidator:
    """Facts from an OpenAI-compatible chat endpoint (``{endpoint}/chat/completions``)."""

    name = "openai"

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str = "",
        timeout_s: float = 30.0,
        transport: Transport | None = None,
    ) -> None:
        if not endpoint:
            raise PluginError("the openai consolidator needs llm_endpoint", reason="config")
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.api_key = (
            api_key
            if api_key is not None
            else (os.environ.get(api_key_env) if api_key_env else None)
        )
        self.timeout_s = timeout_s
        self._transport = transport or _urllib_transport

    def build_request(self, turns: Sequence[SourceTurn]) -> tuple[str, dict[str, str], bytes]:
        """URL, headers and JSON body of the request for these turns."""
        numbered = "\n".join(f"[{i}] {turn.text}" for i, turn in enumerate(turns, 1))
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": _SYSTEM_PROMPT},
                {"role": "user", "content": f"Turns:\n{numbered}"},
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return f"{self.endpoint}/chat/completions", headers, json.dumps(body).encode()

    def parse_response(self, raw: bytes, turns: Sequence[SourceTurn]) -> list[FactDraft]:
        """Facts from the endpoint's answer; PluginError if it is not the asked format."""
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            facts = json.loads(content)["facts"]
            out = []
            for fact in facts:
                text = str(fact["text"]).strip()
                numbers = [int(n) for n in fact.get("sources", [])]
                sources = tuple(
                    (turns[n - 1].id, turns[n - 1].version) for n in numbers if 1 <= n <= len(turns)
                ) or tuple((t.id, t.version) for t in turns)
                if text:
                    out.append(FactDraft(text, sources))
            return out
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PluginError(
                f"consolidation endpoint answered in an unexpected format: {exc}", reason="llm"
            ) from exc

    def consolidate(self, turns: Sequence[SourceTurn]) -> list[FactDraft]:
        if not turns:
            return []
        url, headers, body = self.build_request(turns)
        return self.parse_response(self._transport(url, headers, body, self.timeout_s), turns)
