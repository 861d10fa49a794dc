"""LoCoMo evidence recall: hybrid vs BM25-only vs dense-only, one command.

    .venv/bin/python bench/locomo.py                 # all 10 conversations, 3 modes
    .venv/bin/python bench/locomo.py --limit 2 --json out.json

Loads ``../shared/data/locomo/locomo10.json`` (relative to the repository; the
data is never copied in), ingests each conversation into its own cube (one
item per dialog turn: ``"<speaker>: <text>"`` plus the shared image's caption,
the session date as world time ``valid_from_us``, ``dia_id``/``session``/
``speaker`` in metadata, and - unless ``--context none`` - the previous turn
of the session as retrieval context, ``metadata["context"]``, indexed with
the turn but not part of its text), then asks every QA question through
``SearchService.search`` in each mode and reports turn-level evidence
recall@k (k = 1, 5, 10, 25) per category and overall, plus nDCG@10.

Metric (as in LoCoMo's ``task_eval/evaluation.py``): per question, the
fraction of its evidence turns among the top k, averaged over questions.
Evidence ids are normalised: malformed entries are split on ``;``, commas
and spaces ("D8:6; D9:17"), "D:11:26" becomes "D11:26", leading zeros are
dropped ("D30:05" -> "D30:5"); questions without evidence are skipped and
counted.

Runs in-process against ``Engine`` + ``SearchService`` (the daemon's search
op is not wired to the index yet).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "locomo" / "locomo10.json"
KS = (1, 5, 10, 25)
MODES = ("hybrid", "lexical", "dense")
CATEGORIES = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}
_ID_RE = re.compile(r"D:?(\d+):0*(\d+)")


def normalise_evidence(evidence: list[str]) -> list[str]:
    """Evidence ids as "D<session>:<turn>", malformed entries split, duplicates dropped."""
    out: list[str] = []
    for raw in evidence:
        for part in re.split(r"[;,\s]+", str(raw)):
            match = _ID_RE.fullmatch(part.strip())
            if match:
                dia = f"D{int(match.group(1))}:{int(match.group(2))}"
                if dia not in out:
                    out.append(dia)
    return out


def parse_session_time(text: str) -> int | None:
    """ "1:56 pm on 8 May, 2023" -> microseconds since the epoch (UTC), None if unparsable."""
    try:
        when = datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(when.timestamp() * 1_000_000)


def turn_text(turn: dict[str, Any], style: str) -> str:
    text = str(turn.get("text", ""))
    caption = turn.get("blip_caption")
    if caption:
        text = f"{text} [shares a photo: {caption}]"
    if style == "plain":
        return text
    return f"{turn['speaker']}: {text}"


def sessions(conversation: dict[str, Any]) -> list[tuple[int, int | None, list[dict[str, Any]]]]:
    out = []
    for key, value in conversation.items():
        match = re.fullmatch(r"session_(\d+)", key)
        if match and isinstance(value, list):
            n = int(match.group(1))
            when = parse_session_time(str(conversation.get(f"session_{n}_date_time", "")))
            out.append((n, when, value))
    return sorted(out, key=lambda s: s[0])


def dcg(relevances: list[int]) -> float:
    return sum(rel / math.log2(i + 2) for i, rel in enumerate(relevances))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="only the first N conversations")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--text", choices=("plain", "speaker"), default="speaker")
    parser.add_argument(
        "--context",
        choices=("none", "previous"),
        default="previous",
        help="index each turn with the previous turn of its session as retrieval context",
    )
    parser.add_argument("--fusion", choices=("score", "rrf"), default=None)
    parser.add_argument("--rrf-k", type=float, default=None)
    parser.add_argument("--dense-weight", type=float, default=None)
    parser.add_argument("--lexical-weight", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the store here")
    args = parser.parse_args(argv)

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30)  # warnings and up
    )
    from dataclasses import replace

    from memosd.engine import Engine
    from memosd.index import IndexSettings, SearchService

    data = json.loads(args.data.read_text())
    if args.limit:
        data = data[: args.limit]
    modes = [m for m in args.modes.split(",") if m]
    settings = IndexSettings(snapshot_interval_s=0)
    for name, value in (
        ("rrf_k", args.rrf_k),
        ("dense_weight", args.dense_weight),
        ("lexical_weight", args.lexical_weight),
        ("fusion", args.fusion),
    ):
        if value is not None:
            settings = replace(settings, **{name: value})

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="locomo-")
        data_dir = Path(tmp.name)
    else:
        data_dir = args.data_dir
    started = time.monotonic()
    engine = Engine.open(data_dir)
    service = SearchService(engine, data_dir, settings=settings)
    service.start()
    service.wait_ready()

    # --- ingest -------------------------------------------------------------------
    dia_of: dict[tuple[str, str], str] = {}
    turns = 0
    t0 = time.monotonic()
    for conv in data:
        cube = f"locomo-{conv['sample_id']}"
        engine.create_cube(cube, owner="uid:0", config=service.cube_config())
        for n, when, session_turns in sessions(conv["conversation"]):
            previous: str | None = None
            for turn in session_turns:
                text = turn_text(turn, args.text)
                metadata: dict[str, Any] = {
                    "dia_id": turn["dia_id"],
                    "speaker": turn["speaker"],
                    "session": n,
                }
                if args.context == "previous" and previous is not None:
                    metadata["context"] = previous
                item = engine.add(
                    cube,
                    text,
                    session=f"session_{n}",
                    source="locomo",
                    valid_from_us=when,
                    metadata=metadata,
                )
                dia_of[(cube, item.id)] = turn["dia_id"]
                previous = text
                turns += 1
    write_s = time.monotonic() - t0
    lsn = engine.status()["applied_lsn"]
    if not service.wait_indexed(lsn, timeout=3600):
        print("indexing did not finish", file=sys.stderr)
        return 1
    ingest_s = time.monotonic() - t0

    # --- questions ----------------------------------------------------------------
    kmax = max(KS)
    recall: dict[str, dict[str, dict[int, list[float]]]] = {
        m: defaultdict(lambda: defaultdict(list)) for m in modes
    }
    ndcg: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
    skipped = 0
    unknown_ids = 0
    search_s: dict[str, float] = defaultdict(float)
    questions = 0
    for conv in data:
        cube = f"locomo-{conv['sample_id']}"
        known = {t["dia_id"] for _, _, ts in sessions(conv["conversation"]) for t in ts}
        for qa in conv["qa"]:
            evidence = normalise_evidence(qa.get("evidence") or [])
            if not evidence:
                skipped += 1
                continue
            unknown_ids += sum(1 for e in evidence if e not in known)
            questions += 1
            category = CATEGORIES.get(int(qa["category"]), str(qa["category"]))
            for mode in modes:
                q0 = time.monotonic()
                hits = service.search([cube], str(qa["question"]), k=kmax, mode=mode)
                search_s[mode] += time.monotonic() - q0
                ranked: list[str] = []
                for hit in hits:
                    dia = dia_of[(cube, hit.item.id)]
                    if dia not in ranked:
                        ranked.append(dia)
                wanted = set(evidence)
                for k in KS:
                    found = len(wanted.intersection(ranked[:k])) / len(wanted)
                    recall[mode][category][k].append(found)
                    recall[mode]["overall"][k].append(found)
                gains = [1 if d in wanted else 0 for d in ranked[:10]]
                ideal = dcg([1] * min(len(wanted), 10))
                value = dcg(gains) / ideal if ideal else 0.0
                ndcg[mode][category].append(value)
                ndcg[mode]["overall"].append(value)

    service.close()
    engine.close()
    if tmp is not None:
        tmp.cleanup()

    # --- report -------------------------------------------------------------------
    rows = [*sorted(c for c in recall[modes[0]] if c != "overall"), "overall"]
    header = "| category | n | mode | " + " | ".join(f"R@{k}" for k in KS) + " | nDCG@10 |"
    print(
        f"LoCoMo turn-level evidence recall: {len(data)} conversations, {turns} turns, "
        f"{questions} questions ({skipped} without evidence skipped, "
        f"{unknown_ids} evidence ids not in their conversation); text {args.text!r}, "
        f"context {args.context!r}, fusion {settings.fusion!r} "
        f"(dense {settings.dense_weight}, lexical {settings.lexical_weight})"
    )
    print(header)
    print("|" + "---|" * (4 + len(KS)))
    results: dict[str, Any] = {}
    for row in rows:
        for mode in modes:
            per_k = {k: sum(v) / len(v) for k, v in recall[mode][row].items()}
            n = len(recall[mode][row][KS[0]])
            nd = sum(ndcg[mode][row]) / len(ndcg[mode][row])
            results.setdefault(row, {})[mode] = {
                "n": n,
                **{f"recall@{k}": round(v, 4) for k, v in per_k.items()},
                "ndcg@10": round(nd, 4),
            }
            cells = " | ".join(f"{per_k[k]:.3f}" for k in KS)
            print(f"| {row} | {n} | {mode} | {cells} | {nd:.3f} |")
    print(
        f"\nwrite {turns} turns: {write_s:.1f} s; written + indexed (MiniLM): {ingest_s:.1f} s "
        f"({turns / ingest_s:.0f} turns/s); search per query: "
        + ", ".join(f"{m} {1000 * search_s[m] / max(questions, 1):.1f} ms" for m in modes)
        + f"; total {time.monotonic() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {
                        "text": args.text,
                        "context": args.context,
                        "fusion": settings.fusion,
                        "rrf_k": settings.rrf_k,
                        "dense_weight": settings.dense_weight,
                        "lexical_weight": settings.lexical_weight,
                    },
                    "questions": questions,
                    "skipped_without_evidence": skipped,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
