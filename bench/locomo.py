"""LoCoMo evidence recall: hybrid vs BM25-only vs dense-only, one command.

    .venv/bin/python bench/locomo.py                 # all 10 conversations, 3 modes
    .venv/bin/python bench/locomo.py --limit 2 --json out.json
    .venv/bin/python bench/locomo.py --in-process    # no daemon: Engine + SearchService

Loads ``../shared/data/locomo/locomo10.json`` (relative to the repository; the
data is never copied in), ingests each conversation into its own cube (one
item per dialog turn: ``"<speaker>: <text>"`` plus the shared image's caption,
the session date as world time ``valid_from_us``, ``dia_id``/``session``/
``speaker`` in metadata, and - unless ``--context none`` - the previous turn
of the session as retrieval context, ``metadata["context"]``, indexed with
the turn but not part of its text), then asks every QA question through
``search`` in each mode and reports turn-level evidence recall@k
(k = 1, 5, 10, 25) per category and overall, plus nDCG@10.

Metric (as in LoCoMo's ``task_eval/evaluation.py``): per question, the
fraction of its evidence turns among the top k, averaged over questions.
Evidence ids are normalised: malformed entries are split on ``;``, commas
and spaces ("D8:6; D9:17"), "D:11:26" becomes "D11:26", leading zeros are
dropped ("D30:05" -> "D30:5"); questions without evidence are skipped and
counted.

``--daemon`` (default): starts a real ``memosd`` subprocess on a temporary
data directory and ipc socket (``MEMOSD_INDEX_EMBEDDER=minilm``, the daemon's
``[index]`` defaults, ``index.wait_timeout_s`` raised so the first search
after ingest can wait for the indexer) and does everything through
``memosd.client.Client``: ``create_cube``, ``add`` from several threads
sharing one client, ``search(cube, question, k=25, mode=...)``; evidence is
matched on ``hit.item.metadata["dia_id"]``.  ``--in-process``: the same
against ``Engine`` + ``SearchService`` directly (no IPC; allows tuning
``--rrf-k``/``--dense-weight``/``--lexical-weight``, which the daemon does
not expose).

``--tiers`` (daemon only): the same ingest with the daemon's scheduler and
the plaintext tier policy on (``--tier-setting name=value`` overrides its
settings per cube); after ingest every cube's background jobs are waited
for, ``tier run CUBE plaintext`` settles what is left, and the search index
catches up with the migrations.  Then the questions are asked (hybrid only
by default) over all tiers.  A long-term fact found by a search stands for
the turns it came from (its provenance parents), so a fact ranked above
its source turns counts for them.  The report adds the short/mid/long item
counts, segments and facts.  Compare with a flat run (``--modes hybrid``
without ``--tiers``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
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


class InProcess:
    """``Engine`` + ``SearchService`` in this process."""

    label = "in-process (Engine + SearchService)"

    def __init__(self, data_dir: Path, settings: Any, embed_dtype: str = "auto") -> None:
        from memosd.embed import MiniLMEmbedder
        from memosd.engine import Engine
        from memosd.index import SearchService

        self.settings = settings
        self.engine = Engine.open(data_dir)
        embedder = MiniLMEmbedder(
            threads=settings.embed_threads, pool_size=settings.embed_workers + 1, dtype=embed_dtype
        )
        self.service = SearchService(self.engine, data_dir, embedder=embedder, settings=settings)
        self.service.start()
        self.service.wait_ready()

    def create_cube(self, name: str) -> None:
        self.engine.create_cube(name, owner="uid:0", config=self.service.cube_config())

    def add(self, cube: str, text: str, **kwargs: Any) -> None:
        self.engine.add(cube, text, source="locomo", **kwargs)

    def wait_indexed(self, cubes: list[str]) -> bool:
        ok: bool = self.service.wait_indexed(self.engine.status()["applied_lsn"], timeout=3600)
        return ok

    def search(self, cube: str, query: str, k: int, mode: str) -> list[str]:
        hits = self.service.search([cube], query, k=k, mode=mode)
        return [str(h.item.metadata["dia_id"]) for h in hits]

    def close(self) -> None:
        self.service.close()
        self.engine.close()


class Daemon:
    """A real ``memosd`` subprocess on ``data_dir`` and a temporary ipc socket."""

    label = "through the daemon (memosd subprocess, ipc socket)"

    def __init__(
        self,
        data_dir: Path,
        fusion: str | None,
        tiers: dict[str, Any] | None = None,
        embed_dtype: str = "auto",
    ) -> None:
        from memosd.client import Client
        from memosd.index import IndexSettings

        self.tiers = tiers
        self.dia: dict[str, dict[str, str]] = defaultdict(dict)  # cube -> item id -> dia_id

        # What memosd.daemon.open_search builds from the [index] section.
        self.settings = IndexSettings() if fusion is None else IndexSettings(fusion=fusion)
        self.run_dir = Path(tempfile.mkdtemp(prefix="locomo-run-", dir="/tmp"))
        self.socket = self.run_dir / "memosd.sock"
        self.log_path = data_dir.parent / f"{data_dir.name}.memosd.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMOSD_", "NOTIFY_"))}
        env.update(
            MEMOSD_INDEX_EMBEDDER="minilm",
            MEMOSD_INDEX_EMBED_DTYPE=embed_dtype,
            MEMOSD_INDEX_WAIT_TIMEOUT_S="3600",
            # The first search waits for MiniLM to index every turn: minutes on a busy box.
            MEMOSD_SERVER_REQUEST_TIMEOUT_S="3600",
            # The flat run: no tier policy (they add segment and fact items, which are
            # not dialog turns); `--tiers` measures tiering.
            MEMOSD_SCHEDULER_ENABLED="0" if tiers is None else "1",
            MEMOSD_INDEX_FUSION=self.settings.fusion,
            MEMOSD_LOG_FORMAT="json",
            MEMOSD_LOG_LEVEL="warning",
        )
        cmd = [sys.executable, "-m", "memosd", "--data-dir", str(data_dir)]
        cmd += ["--socket", str(self.socket)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        # Generous per-call timeout: the first search after ingest waits for the indexer.
        self.client = Client(self.socket, timeout=3600.0)
        try:
            self._wait_ready(300.0)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from memosd.client import Client
        from memosd.errors import MemosError

        deadline = time.monotonic() + timeout
        with Client(self.socket, timeout=1.0) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"memosd exited ({self.proc.returncode}); {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"memosd not ready in {timeout} s; {self.log_tail()}")
                if self.socket.exists():
                    with contextlib.suppress(MemosError):
                        probe.ping()
                        return
                time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return "log tail:\n" + "\n".join(self.log_path.read_text().splitlines()[-20:])
        except OSError:
            return "no log"

    def create_cube(self, name: str) -> None:
        if self.tiers is None:
            self.client.create_cube(name)  # the daemon fills in the embedder's config
            return
        model = self.client.status()["search"]["embedder"]
        config = {
            "embedding_model": model["model"],
            "embedding_dim": model["dim"],
            "tier_policy": {"policies": ["plaintext"], "plaintext": self.tiers},
        }
        self.client.create_cube(name, config=config)

    def add(self, cube: str, text: str, **kwargs: Any) -> None:
        item = self.client.add(cube, text, source="locomo", **kwargs)
        self.dia[cube][item.id] = str(kwargs["metadata"]["dia_id"])

    def wait_indexed(self, cubes: list[str]) -> bool:
        # Read-your-writes: this search waits until all of our adds are indexed.
        self.client.search(cubes[0], "warm-up", k=1, mode="lexical")
        return True

    def settle_tiers(self, cubes: list[str]) -> dict[str, Any]:
        """Wait for the background tier jobs, run the policy once more, let the index catch up."""
        t0 = time.monotonic()
        while self.client.jobs(state="queued", limit=1) or self.client.jobs(
            state="running", limit=1
        ):
            time.sleep(0.5)
        background_s = time.monotonic() - t0
        for cube in cubes:
            self.client.tier_run(cube, "plaintext", timeout=3000)
        while True:  # the migrations are the scheduler's writes, not ours: wait for the index
            search = self.client.status()["search"]
            if search.get("lag") == 0:
                break
            time.sleep(0.5)
        totals: dict[str, Any] = {"short": 0, "mid": 0, "long": 0, "segments": 0, "facts": 0}
        for cube in cubes:
            report = self.client.tier_report(cube)["plaintext"]
            for tier in ("short", "mid", "long"):
                totals[tier] += report[tier]["items"]["active"]
            totals["segments"] += report["mid"].get("segments", 0)
            totals["facts"] += report["long"].get("facts", 0)
        failed = self.client.jobs(state="failed", limit=1000)
        kinds: dict[str, int] = defaultdict(int)
        for job in self.client.jobs(limit=1000):
            kinds[job["kind"]] += 1
        totals.update(
            background_wait_s=round(background_s, 1),
            settle_s=round(time.monotonic() - t0, 1),
            failed_jobs=len(failed),
            jobs_newest_1000=dict(kinds),
        )
        return totals

    def search(self, cube: str, query: str, k: int, mode: str) -> list[str]:
        hits = self.client.search(cube, query, k=k, mode=mode)
        out: list[str] = []
        for hit in hits:
            dia = hit.item.metadata.get("dia_id")
            if dia is not None:
                out.append(str(dia))
            elif hit.item.metadata.get("tier_kind") == "fact":
                # A fact stands for the turns it was consolidated from.
                names = self.dia[cube]
                out += [names[p[0]] for p in hit.item.provenance.parents if p[0] in names]
        return out

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="only the first N conversations")
    parser.add_argument("--modes", default=",".join(MODES))
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--daemon",
        dest="in_process",
        action="store_false",
        help="through a real memosd subprocess (default)",
    )
    where.add_argument(
        "--in-process",
        dest="in_process",
        action="store_true",
        help="against Engine + SearchService in this process",
    )
    parser.set_defaults(in_process=False)
    parser.add_argument("--threads", type=int, default=4, help="client threads (daemon mode)")
    parser.add_argument("--text", choices=("plain", "speaker"), default="speaker")
    parser.add_argument(
        "--context",
        choices=("none", "previous"),
        default="previous",
        help="index each turn with the previous turn of its session as retrieval context",
    )
    parser.add_argument("--fusion", choices=("score", "rrf"), default=None)
    parser.add_argument(
        "--embed-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="MiniLM weights' precision (index.embed_dtype)",
    )
    parser.add_argument("--rrf-k", type=float, default=None, help="--in-process only")
    parser.add_argument("--dense-weight", type=float, default=None, help="--in-process only")
    parser.add_argument("--lexical-weight", type=float, default=None, help="--in-process only")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the store here")
    parser.add_argument(
        "--tiers", action="store_true", help="ingest with the plaintext tier policy on (daemon)"
    )
    parser.add_argument(
        "--tier-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a plaintext policy setting for --tiers (VALUE is JSON, e.g. mid_capacity=20)",
    )
    args = parser.parse_args(argv)
    if args.tiers and args.in_process:
        parser.error("--tiers runs through the daemon (its scheduler); drop --in-process")
    tier_settings: dict[str, Any] = {}
    for pair in args.tier_setting:
        name, _, raw = pair.partition("=")
        try:
            tier_settings[name] = json.loads(raw)
        except json.JSONDecodeError:
            tier_settings[name] = raw
    if args.tiers and args.modes == ",".join(MODES):
        args.modes = "hybrid"
    tuning = (args.rrf_k, args.dense_weight, args.lexical_weight)
    if not args.in_process and any(v is not None for v in tuning):
        parser.error("--rrf-k/--dense-weight/--lexical-weight need --in-process")

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30)  # warnings and up
    )
    from dataclasses import replace

    from memosd.index import IndexSettings

    data = json.loads(args.data.read_text())
    if args.limit:
        data = data[: args.limit]
    modes = [m for m in args.modes.split(",") if m]

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="locomo-")
        data_dir = Path(tmp.name) / "data"
    else:
        data_dir = args.data_dir
    started = time.monotonic()
    backend: InProcess | Daemon
    if args.in_process:
        settings = IndexSettings(snapshot_interval_s=0)
        for name, value in (
            ("rrf_k", args.rrf_k),
            ("dense_weight", args.dense_weight),
            ("lexical_weight", args.lexical_weight),
            ("fusion", args.fusion),
        ):
            if value is not None:
                settings = replace(settings, **{name: value})
        backend = InProcess(data_dir, settings, args.embed_dtype)
    else:
        backend = Daemon(
            data_dir, args.fusion, tier_settings if args.tiers else None, args.embed_dtype
        )
    settings = backend.settings
    tier_counts: dict[str, Any] | None = None
    try:
        # --- ingest -------------------------------------------------------------------
        cubes = [f"locomo-{conv['sample_id']}" for conv in data]
        adds: list[tuple[str, str, dict[str, Any]]] = []
        for cube, conv in zip(cubes, data, strict=True):
            backend.create_cube(cube)
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
                    kwargs = {
                        "session": f"session_{n}",
                        "valid_from_us": when,
                        "metadata": metadata,
                    }
                    adds.append((cube, text, kwargs))
                    previous = text
        turns = len(adds)
        t0 = time.monotonic()
        threads = 1 if args.in_process else max(1, args.threads)
        # Conversations in parallel, each one's turns in order (as a chat app writes
        # them): session order is what neighbour smoothing (index.neighbour_weight) uses.
        per_cube: dict[str, list[tuple[str, str, dict[str, Any]]]] = defaultdict(list)
        for add in adds:
            per_cube[add[0]].append(add)

        def ingest(conversation: list[tuple[str, str, dict[str, Any]]]) -> None:
            for cube, text, kwargs in conversation:
                backend.add(cube, text, **kwargs)

        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(ingest, per_cube.values()):
                pass
        write_s = time.monotonic() - t0
        if not backend.wait_indexed(cubes):
            print("indexing did not finish", file=sys.stderr)
            return 1
        if args.tiers:
            assert isinstance(backend, Daemon)
            tier_counts = backend.settle_tiers(cubes)
        ingest_s = time.monotonic() - t0

        # --- questions ----------------------------------------------------------------
        kmax = max(KS)
        recall: dict[str, dict[str, dict[int, list[float]]]] = {
            m: defaultdict(lambda: defaultdict(list)) for m in modes
        }
        ndcg: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
        skipped = 0
        unknown_ids = 0
        questions: list[tuple[str, str, str, list[str]]] = []
        for cube, conv in zip(cubes, data, strict=True):
            known = {t["dia_id"] for _, _, ts in sessions(conv["conversation"]) for t in ts}
            for qa in conv["qa"]:
                evidence = normalise_evidence(qa.get("evidence") or [])
                if not evidence:
                    skipped += 1
                    continue
                unknown_ids += sum(1 for e in evidence if e not in known)
                category = CATEGORIES.get(int(qa["category"]), str(qa["category"]))
                questions.append((cube, str(qa["question"]), category, evidence))

        search_s: dict[str, float] = defaultdict(float)

        def ask(job: tuple[int, str]) -> tuple[int, str, list[str], float]:
            i, mode = job
            cube, question, _, _ = questions[i]
            q0 = time.monotonic()
            ranked = backend.search(cube, question, kmax, mode)
            return i, mode, ranked, time.monotonic() - q0

        jobs = [(i, mode) for i in range(len(questions)) for mode in modes]
        q_started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            answers = list(pool.map(ask, jobs))
        questions_s = time.monotonic() - q_started
        for i, mode, hit_ids, took in answers:
            _, _, category, evidence = questions[i]
            search_s[mode] += took
            ranked: list[str] = []
            for dia in hit_ids:
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
    finally:
        backend.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()

    # --- report -------------------------------------------------------------------
    n_questions = len(questions)
    rows = [*sorted(c for c in recall[modes[0]] if c != "overall"), "overall"]
    header = "| category | n | mode | " + " | ".join(f"R@{k}" for k in KS) + " | nDCG@10 |"
    print(
        f"LoCoMo turn-level evidence recall, {backend.label}: {len(data)} conversations, "
        f"{turns} turns, {n_questions} questions ({skipped} without evidence skipped, "
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
    if tier_counts is not None:
        print(
            f"\ntiers after ingest (settings {tier_settings or 'defaults'}): "
            f"short {tier_counts['short']}, mid {tier_counts['mid']}, long "
            f"{tier_counts['long']} active items ({tier_counts['facts']} facts), "
            f"{tier_counts['segments']} mid segments; failed jobs {tier_counts['failed_jobs']}; "
            f"jobs (newest 1000) {tier_counts['jobs_newest_1000']}; waited "
            f"{tier_counts['background_wait_s']} s for background jobs, settled in "
            f"{tier_counts['settle_s']} s"
        )
    print(
        f"\nwrite {turns} turns ({threads} thread(s)): {write_s:.1f} s; written + indexed "
        f"(MiniLM): {ingest_s:.1f} s ({turns / ingest_s:.0f} turns/s); "
        f"{len(jobs)} searches in {questions_s:.1f} s; latency per search: "
        + ", ".join(f"{m} {1000 * search_s[m] / max(n_questions, 1):.1f} ms" for m in modes)
        + f"; total {time.monotonic() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {
                        "where": "in-process" if args.in_process else "daemon",
                        "text": args.text,
                        "context": args.context,
                        "embed_dtype": args.embed_dtype,
                        "fusion": settings.fusion,
                        "rrf_k": settings.rrf_k,
                        "dense_weight": settings.dense_weight,
                        "lexical_weight": settings.lexical_weight,
                        "tiers": tier_settings if args.tiers else None,
                    },
                    "tier_counts": tier_counts,
                    "questions": n_questions,
                    "skipped_without_evidence": skipped,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
