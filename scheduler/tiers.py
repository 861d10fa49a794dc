"""Pure tier decisions for the built-in plaintext policy (no I/O, no clock).

Everything here takes values (items, vectors, settings, ``now_us``) and
returns decisions; :mod:`memosd.scheduler.policies_builtin` reads the store,
calls these functions and commits the result as one atomic write.

* :func:`fifo_evictions` - short tier: per session keep the latest N turns,
  and at most ``short_max_items`` turns in the cube (the oldest go first).
* :func:`assign_segments` - mid tier: an evicted turn joins the segment whose
  centroid (normalised sum of member vectors) is most similar, if the cosine
  is >= theta; otherwise it starts a new segment.
* :func:`segment_heat` - ``alpha*visits + beta*length + gamma*exp(-idle/tau)``.
* :func:`coldest_over_capacity` - the segments to demote when there are more
  than M, or when their turns together exceed ``mid_max_items``.
* :func:`extract_claim` - rule-based (subject, value) extraction used to
  tell restatements from contradictions (see ``docs/scheduler.md`` for what
  it recognises and what it does not).
* :func:`decide_facts` - new fact, reinforce an existing one, or supersede
  (contradiction).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from memosd.memcube.model import MemoryItem
from memosd.scheduler.policy import PolicySetting

__all__ = [
    "SETTINGS",
    "Claim",
    "ExistingFact",
    "FactDecision",
    "SegmentState",
    "ShortTurn",
    "TierSettings",
    "assign_segments",
    "coldest_over_capacity",
    "decide_facts",
    "evictions_due",
    "extract_claim",
    "fifo_evictions",
    "informative_sentences",
    "normalize_text",
    "segment_heat",
    "split_speaker",
]

Vector = npt.NDArray[np.float32]
US_PER_HOUR: Final = 3_600 * 1_000_000
US_PER_DAY: Final = 24 * US_PER_HOUR

SETTINGS: Final[tuple[PolicySetting, ...]] = (
    PolicySetting("short_capacity", 10, int, "Turns per session kept in the short tier (FIFO).", 1),
    PolicySetting(
        "short_max_items",
        200,
        int,
        "At most this many turns in a cube's short tier, over all sessions: past it the "
        "oldest turns move on to mid even if their session is under short_capacity "
        "(0: no cube-wide bound).",
        0,
    ),
    PolicySetting(
        "evict_delay_s",
        1.0,
        float,
        "An eviction queued by a write waits this long, so a burst of writes shares one "
        "job (0: at once).",
        0.0,
    ),
    PolicySetting(
        "evict_batch",
        1000,
        int,
        "Turns moved to mid per committed step of one tiers.evict job: a bulk load is "
        "migrated in bounded writes (each step is one WAL record).",
        1,
    ),
    PolicySetting(
        "index_wait_s",
        30.0,
        float,
        "An eviction first waits up to this long for the search index to catch up, then "
        "takes the turns' vectors from it instead of embedding them again (0: no wait).",
        0.0,
    ),
    PolicySetting(
        "segment_threshold",
        0.6,
        float,
        "Cosine similarity to a segment's centroid needed to join it (theta).",
        -1.0,
    ),
    PolicySetting("mid_capacity", 200, int, "At most this many mid-tier segments (M).", 1),
    PolicySetting(
        "mid_max_items",
        2000,
        int,
        "At most this many turns in a cube's mid tier: past it the coldest segments are "
        "demoted as over mid_capacity (0: no bound on turns).",
        0,
    ),
    PolicySetting("heat_alpha", 1.0, float, "Heat weight of visits (search hits).", 0.0),
    PolicySetting("heat_beta", 1.0, float, "Heat weight of interaction length (turns).", 0.0),
    PolicySetting("heat_gamma", 1.0, float, "Heat weight of recency exp(-idle/tau).", 0.0),
    PolicySetting("heat_tau_hours", 24.0, float, "Recency time constant tau, hours.", 0.001),
    PolicySetting(
        "promote_heat", 5.0, float, "Segments at or above this heat are consolidated.", 0.0
    ),
    PolicySetting(
        "mid_overflow",
        "long",
        str,
        "Where the coldest segment's turns go when over mid_capacity.",
        choices=("long", "archive"),
    ),
    PolicySetting("consolidate_batch", 8, int, "Segments consolidated per job at most.", 1),
    PolicySetting(
        "consolidate_interval_s", 300.0, float, "Periodic consolidation check, seconds.", 0.0
    ),
    PolicySetting(
        "fact_min_words", 4, int, "A sentence needs this many words to become a fact.", 1
    ),
    PolicySetting(
        "fact_max_per_segment", 20, int, "Most informative sentences kept per segment.", 1
    ),
    PolicySetting(
        "fact_duplicate_threshold",
        0.9,
        float,
        "Cosine at or above which two facts are the same (merge / reinforce).",
        -1.0,
    ),
    PolicySetting(
        "long_cold_days",
        180.0,
        float,
        "Long-tier items without hits or writes for this many days are archived (0: never).",
        0.0,
    ),
    PolicySetting("forget_interval_s", 3600.0, float, "Periodic forgetting pass, seconds.", 0.0),
    PolicySetting(
        "consolidator",
        "extractive",
        str,
        "Consolidator by name: 'extractive' (no LLM), 'openai' (needs llm_endpoint), "
        "or one a plugin registers.",
    ),
    PolicySetting(
        "llm_endpoint", "", str, "OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)."
    ),
    PolicySetting("llm_model", "", str, "Model name sent to the OpenAI-compatible endpoint."),
    PolicySetting(
        "llm_api_key_env", "", str, "Environment variable holding the endpoint's API key."
    ),
    PolicySetting("llm_timeout_s", 30.0, float, "Timeout of one LLM request, seconds.", 0.1),
)


@dataclass(frozen=True, slots=True)
class TierSettings:
    """The resolved settings of the plaintext policy (see :data:`SETTINGS`)."""

    short_capacity: int = 10
    short_max_items: int = 200
    evict_delay_s: float = 1.0
    evict_batch: int = 1000
    index_wait_s: float = 30.0
    segment_threshold: float = 0.6
    mid_capacity: int = 200
    mid_max_items: int = 2000
    heat_alpha: float = 1.0
    heat_beta: float = 1.0
    heat_gamma: float = 1.0
    heat_tau_hours: float = 24.0
    promote_heat: float = 5.0
    mid_overflow: str = "long"
    consolidate_batch: int = 8
    consolidate_interval_s: float = 300.0
    fact_min_words: int = 4
    fact_max_per_segment: int = 20
    fact_duplicate_threshold: float = 0.9
    long_cold_days: float = 180.0
    forget_interval_s: float = 3600.0
    consolidator: str = "extractive"
    llm_endpoint: str = ""
    llm_model: str = ""
    llm_api_key_env: str = ""
    llm_timeout_s: float = 30.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TierSettings:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# --- short tier ----------------------------------------------------------------------


class ShortTurn(NamedTuple):
    """What eviction needs of a short turn: atoms only, so the cyclic GC stops
    tracking it (a bulk load's 100k turns as items are millions of objects)."""

    id: str
    version: int
    text: str
    session: str  # "" without one
    created_us: int
    hits: int
    last_hit_us: int

    @classmethod
    def of(cls, item: MemoryItem, session: str | None = None) -> ShortTurn:
        """``item`` as a short turn; ``session`` overrides its own (provenance) one."""
        return cls(
            item.id,
            item.version,
            item.text,
            (item.provenance.session or "") if session is None else session,
            item.created_us,
            item.usage.hits,
            item.usage.last_hit_us or 0,
        )


def _turn_order(turn: ShortTurn) -> tuple[int, str]:
    return (turn.created_us, turn.id)


def evictions_due(sessions: Mapping[str, int], capacity: int, max_items: int = 0) -> bool:
    """Whether :func:`fifo_evictions` would evict anything, from turn counts per session."""
    if any(n > capacity for n in sessions.values()):
        return True
    return max_items > 0 and sum(sessions.values()) > max_items


def fifo_evictions(
    turns: Iterable[ShortTurn], capacity: int, max_items: int = 0
) -> list[ShortTurn]:
    """Turns beyond the latest ``capacity`` of their session, oldest first.

    Turns without a session form one group of their own.  With ``max_items``
    (> 0), the turns left are also cut to the newest ``max_items`` of the
    cube: the short tier is working memory of what is recent, so a cube with
    many sessions does not keep ``capacity`` turns of every old one.
    """
    by_session: dict[str, list[ShortTurn]] = {}
    for turn in turns:
        by_session.setdefault(turn.session, []).append(turn)
    evicted: list[ShortTurn] = []
    kept: list[ShortTurn] = []
    for group in by_session.values():
        group.sort(key=_turn_order)
        cut = max(0, len(group) - capacity)
        evicted.extend(group[:cut])
        kept.extend(group[cut:])
    if max_items > 0 and len(kept) > max_items:
        kept.sort(key=_turn_order)
        evicted.extend(kept[: len(kept) - max_items])
    evicted.sort(key=_turn_order)
    return evicted


# --- mid tier: segments ----------------------------------------------------------------


@dataclass(slots=True)
class SegmentState:
    """A mid-tier segment as the policy works on it (stored in item metadata).

    ``key`` is the segment item's id, or ``"new:<n>"`` for one created by
    the current decision.  ``vector_sum`` is the sum of member vectors; the
    centroid is its normalisation.  ``visits_base``/``length_base`` are
    the visits and length already consolidated (heat counts what is new).
    """

    key: str
    vector_sum: Vector
    turns: list[str] = field(default_factory=list)
    last_active_us: int = 0
    visits_base: int = 0
    length_base: int = 0
    consolidated: list[str] = field(default_factory=list)
    summary: str = ""
    version: int = 0  # stored version this state was read at (0: new)

    @property
    def centroid(self) -> Vector:
        norm = float(np.linalg.norm(self.vector_sum))
        if norm == 0.0:
            return self.vector_sum
        return (self.vector_sum / norm).astype(np.float32)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "v": 1,
            "vector_sum": self.vector_sum.astype("<f4").tobytes(),
            "turns": list(self.turns),
            "last_active_us": self.last_active_us,
            "visits_base": self.visits_base,
            "length_base": self.length_base,
            "consolidated": list(self.consolidated),
            "summary": self.summary,
        }

    @classmethod
    def from_metadata(cls, key: str, meta: Mapping[str, Any], version: int) -> SegmentState:
        vector = np.frombuffer(meta["vector_sum"], dtype="<f4").astype(np.float32)
        return cls(
            key=key,
            vector_sum=vector,
            turns=[str(t) for t in meta.get("turns", [])],
            last_active_us=int(meta.get("last_active_us", 0)),
            visits_base=int(meta.get("visits_base", 0)),
            length_base=int(meta.get("length_base", 0)),
            consolidated=[str(t) for t in meta.get("consolidated", [])],
            summary=str(meta.get("summary", "")),
            version=version,
        )


def assign_segments(
    turns: Sequence[tuple[str, str]],
    vectors: Vector,
    segments: list[SegmentState],
    *,
    threshold: float,
    now_us: int,
) -> dict[str, str]:
    """Assign each ``(turn id, text)`` (with its unit vector) to a segment.

    Mutates ``segments`` (appends new ones, updates sums and members) and
    returns ``{turn id: segment key}``.  Turns are taken in order, so a
    later turn may join a segment an earlier one started.
    """
    assignment: dict[str, str] = {}
    if not turns:
        return assignment
    created = sum(1 for s in segments if s.key.startswith("new:"))
    # One row per segment: its centroid, kept current as turns join, so each
    # turn is scored against every segment in one matrix-vector product
    # (a bulk load's 1,000-turn step against ~1,000 segments: ~50 ms, not
    # seconds of per-pair numpy calls).
    rows = np.zeros((max(16, 2 * len(segments)), vectors.shape[1]), dtype=np.float32)
    for i, segment in enumerate(segments):
        rows[i] = segment.centroid
    for (turn_id, text), vector in zip(turns, vectors, strict=True):
        best: SegmentState | None = None
        at = -1
        if segments:
            scores = rows[: len(segments)] @ vector
            at = int(np.argmax(scores))  # the first of equal maxima, as before
            best = segments[at]
            best_score = float(scores[at])
        if best is None or best_score < threshold or not np.any(vector):
            best = SegmentState(
                key=f"new:{created}",
                vector_sum=np.zeros_like(vector, dtype=np.float32),
                summary=text[:200],
            )
            created += 1
            segments.append(best)
            at = len(segments) - 1
            if at == len(rows):
                rows = np.concatenate([rows, np.zeros_like(rows)])
        best.vector_sum = (best.vector_sum + vector).astype(np.float32)
        best.turns.append(turn_id)
        best.last_active_us = max(best.last_active_us, now_us)
        assignment[turn_id] = best.key
        rows[at] = best.centroid
    return assignment


def segment_heat(*, visits: int, length: int, idle_us: int, settings: TierSettings) -> float:
    """``alpha*visits + beta*length + gamma*exp(-idle/tau)`` (MemoryOS' segment heat)."""
    tau_us = settings.heat_tau_hours * US_PER_HOUR
    recency = math.exp(-max(0, idle_us) / tau_us)
    return (
        settings.heat_alpha * visits + settings.heat_beta * length + settings.heat_gamma * recency
    )


def coldest_over_capacity(
    heats: Mapping[str, tuple[float, int]],
    capacity: int,
    *,
    sizes: Mapping[str, int] | None = None,
    max_items: int = 0,
) -> list[str]:
    """Keys of the segments to demote, coldest first (heat, then least recently active).

    Enough of the coldest go that at most ``capacity`` segments remain and,
    with ``sizes`` (turns per segment) and ``max_items`` > 0, that their
    turns add up to at most ``max_items``.
    """
    order = sorted(heats, key=lambda k: (heats[k][0], heats[k][1], k))
    demote = order[: max(0, len(heats) - capacity)]
    if sizes is not None and max_items > 0:
        total = sum(sizes.get(k, 0) for k in order[len(demote) :])
        for key in order[len(demote) :]:
            if total <= max_items:
                break
            demote.append(key)
            total -= sizes.get(key, 0)
    return demote


# --- facts ----------------------------------------------------------------------------

_SENTENCE_RE: Final = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD_RE: Final = re.compile(r"[A-Za-z0-9']+")
_SPEAKER_RE: Final = re.compile(r"^\s*([A-Z][\w .'-]{0,40}?):\s+")
_STOPWORD_TEXT: Final = """
a an the and or but if so of to in on at for with from by as is are was were be been being am
do does did have has had i me my mine you your we our they them their he she it its his her this
that these those there here what which who whom how when where why not no yes just very really
too also then than can could would should will shall may might must up down out over about into
some any all more most much many such only own same ok okay oh yeah yep hmm um uh lol haha well
sure thanks thank hi hello hey bye
"""
_STOPWORDS: Final = frozenset(_STOPWORD_TEXT.split())
_FILLER_START: Final = (
    "hi",
    "hello",
    "hey",
    "thanks",
    "thank you",
    "ok",
    "okay",
    "sure",
    "lol",
    "haha",
    "wow",
    "bye",
    "good morning",
    "good night",
)
_NEGATION_RE: Final = re.compile(r"\b(not|n't|never|no longer|anymore)\b", re.IGNORECASE)


def split_speaker(text: str) -> tuple[str | None, str]:
    """``"Caroline: I moved."`` -> ``("Caroline", "I moved.")``; no prefix -> ``(None, text)``."""
    match = _SPEAKER_RE.match(text)
    if match is None:
        return None, text.strip()
    return match.group(1).strip(), text[match.end() :].strip()


def normalize_text(text: str) -> str:
    """Lower case words joined by single spaces (exact-duplicate test)."""
    return " ".join(w.lower() for w in _WORD_RE.findall(text))


def _content_words(sentence: str) -> list[str]:
    return [w for w in (x.lower() for x in _WORD_RE.findall(sentence)) if w not in _STOPWORDS]


def informative_sentences(text: str, *, min_words: int) -> list[tuple[str, float]]:
    """The sentences of one turn worth keeping as facts, with a score (content words).

    Kept: at least ``min_words`` words and two content words; not a
    question; not starting with a greeting or filler.  A leading speaker
    prefix (``"Name: "``) is carried onto each kept sentence.
    """
    speaker, body = split_speaker(text)
    out: list[tuple[str, float]] = []
    for raw in _SENTENCE_RE.split(body):
        sentence = raw.strip()
        if not sentence or sentence.endswith("?"):
            continue
        lowered = sentence.lower()
        if any(
            lowered == f or lowered.startswith((f + " ", f + ",", f + "!", f + "."))
            for f in _FILLER_START
        ):
            continue
        words = _WORD_RE.findall(sentence)
        content = _content_words(sentence)
        if len(words) < min_words or len(content) < 2:
            continue
        text_out = f"{speaker}: {sentence}" if speaker else sentence
        out.append((text_out, float(len(content))))
    return out


@dataclass(frozen=True, slots=True)
class Claim:
    """``subject`` (holder and relation, e.g. ``"user|lives_in"``) and its ``value``."""

    subject: str
    value: str


_WHO: Final = r"(?P<who>I|[A-Z][a-z]+)"
_VALUE: Final = r"(?P<value>[^.,;!?]+?)"
_END: Final = r"(?:\s+(?:now|since|for|because|and|but|with)\b.*)?\s*(?:[.,;!?]|$)"
_CLAIM_PATTERNS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = tuple(
    (relation, re.compile(pattern, re.IGNORECASE if relation.startswith("my:") else 0))
    for relation, pattern in (
        (
            "lives_in",
            rf"\b{_WHO}(?:'m| am| is)? (?:now |currently |still )?"
            rf"(?:live|lives|living|reside|resides|residing|based) in {_VALUE}{_END}",
        ),
        ("lives_in", rf"\b{_WHO} (?:just )?(?:moved|relocated) to {_VALUE}{_END}"),
        (
            "works_at",
            rf"\b{_WHO}(?:'m| am| is)? (?:now |currently |still )?"
            rf"(?:work|works|working) (?:at|for) {_VALUE}{_END}",
        ),
        ("works_as", rf"\b{_WHO} (?:now )?(?:work|works) as (?:a |an )?{_VALUE}{_END}"),
        ("age", rf"\b{_WHO}(?:'m| am| is) (?P<value>\d{{1,3}}) years? old"),
        ("name", r"\b(?P<who>[Mm]y) name is (?P<value>[A-Z][\w'-]*(?: [A-Z][\w'-]*)*)"),
        ("my:", rf"\b(?P<who>[Mm]y) (?P<attr>favou?rite \w+|\w+) is {_VALUE}{_END}"),
    )
)


def extract_claim(sentence: str) -> Claim | None:
    """A (subject, value) claim from one sentence, or None.

    Recognised (first person, or a capitalised name as the holder; a
    ``"Name: "`` speaker prefix makes "I"/"my" that speaker): lives in /
    moved to, works at/for, works as, N years old, my name is, my <attr>
    is <value>.  Negated sentences give no claim.  Everything else is
    handled by similarity only.
    """
    speaker, body = split_speaker(sentence)
    if _NEGATION_RE.search(body):
        return None
    for relation, pattern in _CLAIM_PATTERNS:
        match = pattern.search(body)
        if match is None:
            continue
        who = match.group("who")
        holder = (speaker or "user") if who.lower() in {"i", "my"} else who
        rel = relation
        if relation == "my:":
            rel = "my " + normalize_text(match.group("attr")).replace("favourite", "favorite")
        value = normalize_text(match.group("value"))
        value = re.sub(r"^(the|a|an) ", "", value)
        if not value:
            continue
        return Claim(f"{holder.lower()}|{rel}", value)
    return None


@dataclass(slots=True)
class ExistingFact:
    """A long-term fact to compare against; ``ref`` is its item id or ``"new:<n>"``."""

    ref: str
    text: str
    vector: Vector
    claim: Claim | None
    version: int = 0


@dataclass(slots=True)
class FactDecision:
    """``add`` a new fact, ``reinforce`` ``target`` (a restatement), or ``supersede``
    ``target`` (a contradiction: add the new fact, archive the target)."""

    action: str
    text: str
    sources: list[tuple[str, int]]
    claim: Claim | None
    target: str | None = None
    ref: str | None = None  # "new:<n>" for add / supersede


class _FactIndex:
    """The known facts, searchable by claim subject, normalised text and vector."""

    def __init__(self, existing: Sequence[ExistingFact], capacity: int, dim: int) -> None:
        self.facts: list[ExistingFact | None] = []
        self.matrix = np.zeros((len(existing) + capacity, dim), dtype=np.float32)
        self.by_norm: dict[str, int] = {}
        self.by_subject: dict[str, int] = {}
        for fact in existing:
            self.add(fact)

    def add(self, fact: ExistingFact) -> None:
        row = len(self.facts)
        self.facts.append(fact)
        self.matrix[row] = fact.vector
        self.by_norm.setdefault(normalize_text(fact.text), row)
        if fact.claim is not None:
            self.by_subject[fact.claim.subject] = row  # the latest statement wins

    def remove(self, fact: ExistingFact) -> None:
        row = next(r for r, f in enumerate(self.facts) if f is fact)
        self.facts[row] = None
        self.matrix[row] = 0.0
        self.by_norm = {k: r for k, r in self.by_norm.items() if r != row}
        self.by_subject = {k: r for k, r in self.by_subject.items() if r != row}

    def same_subject(self, claim: Claim) -> ExistingFact | None:
        row = self.by_subject.get(claim.subject)
        return None if row is None else self.facts[row]

    def most_similar(self, norm: str, vector: Vector, threshold: float) -> ExistingFact | None:
        """The fact with the same normalised text, else the most similar one >= ``threshold``."""
        row = self.by_norm.get(norm)
        if row is not None:
            return self.facts[row]
        if not self.facts:
            return None
        scores = self.matrix[: len(self.facts)] @ vector
        best = int(np.argmax(scores))
        if float(scores[best]) < threshold:
            return None
        return self.facts[best]


def decide_facts(
    drafts: Sequence[tuple[str, Sequence[tuple[str, int]]]],
    vectors: Vector,
    existing: list[ExistingFact],
    *,
    duplicate_threshold: float,
) -> list[FactDecision]:
    """Compare each draft ``(text, sources)`` with the facts known so far.

    Same claim subject and value, the same normalised text, or cosine >=
    ``duplicate_threshold`` -> reinforce; same subject with another value ->
    supersede (the newest statement wins); else add.  A draft that
    reinforces a fact added earlier in the same batch merges its sources into
    that decision instead.  ``existing`` is updated: superseded facts leave
    it, new facts join it.
    """
    decisions: list[FactDecision] = []
    pending: dict[str, FactDecision] = {}
    counter = sum(1 for f in existing if f.ref.startswith("new:"))
    dim = vectors.shape[1] if vectors.ndim == 2 and len(vectors) else 1
    if existing:
        dim = existing[0].vector.shape[0]
    index = _FactIndex(existing, len(drafts), dim)
    for (text, sources), vector in zip(drafts, vectors, strict=True):
        claim = extract_claim(text)
        norm = normalize_text(text)
        action = "add"
        target = index.same_subject(claim) if claim is not None else None
        if target is not None and target.claim is not None and claim is not None:
            action = "reinforce" if target.claim.value == claim.value else "supersede"
        else:
            target = index.most_similar(norm, vector, duplicate_threshold)
            if target is not None:
                action = "reinforce"
        if action == "reinforce" and target is not None and target.ref in pending:
            merged = pending[target.ref]
            merged.sources.extend(s for s in sources if s not in merged.sources)
            continue
        decision = FactDecision(action, text, list(sources), claim)
        if target is not None:
            decision.target = target.ref
        if action in {"add", "supersede"}:
            decision.ref = f"new:{counter}"
            counter += 1
            pending[decision.ref] = decision
            if action == "supersede" and target is not None:
                existing.remove(target)
                index.remove(target)
            fact = ExistingFact(decision.ref, text, vector, claim)
            existing.append(fact)
            index.add(fact)
        decisions.append(decision)
    return decisions
