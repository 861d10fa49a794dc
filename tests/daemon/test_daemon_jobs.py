"""Jobs and tiers through the real daemon: ops, access, follow_job, memctl, a crash.

A test plugin (written to a temporary directory, loaded through
``plugins.modules``) provides a slow on-demand policy (``slowtest``: a job
that reports progress step by step) and a consolidator that blocks once
(``slow-once``), so the crash test can SIGKILL the daemon while a
consolidation job is observably running.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memosd.cli.jobs import follow_job
from memosd.client import Client
from memosd.engine import Engine
from memosd.errors import Conflict, Forbidden, NotFound
from memosd.testing import DaemonHandle

PLUGIN = """
import os
import time
from pathlib import Path

from memosd.plugins import hookimpl
from memosd.scheduler.consolidate import ExtractiveConsolidator
from memosd.scheduler.policy import JobRequest, PolicySetting

MEMOSD_PLUGIN_API_VERSIONS = (1,)


def slow_work(ctx):
    steps = int(ctx.args["steps"])
    for i in range(steps):
        ctx.check_cancelled()
        ctx.progress(i / steps, f"step {i + 1}/{steps}")
        time.sleep(float(ctx.args["step_s"]))
    ctx.check_cancelled()
    return ctx.commit(lambda p: {"steps": steps})


slow_work.exclusive_per_cube = True


class SlowPolicy:
    name = "slowtest"
    settings = (
        PolicySetting("steps", 10, int, "Steps of the job."),
        PolicySetting("step_s", 0.1, float, "Seconds per step."),
    )

    def on_write(self, event, settings, ctx):
        return []

    def periodic(self, cube, now_us, settings, ctx):
        return []

    def on_demand(self, cube, settings):
        args = {"steps": settings["steps"], "step_s": settings["step_s"]}
        return [JobRequest("slowtest.work", cube, args=args)]

    def handlers(self):
        return {"slowtest.work": slow_work}

    def report(self, cube, now_us, settings, ctx):
        return {}


class SlowOnce:
    # Blocks (a minute) in the first consolidation of this data dir, leaving a
    # marker file; the crash test kills the daemon there.
    name = "slow-once"

    def __init__(self, inner):
        self.inner = inner

    def consolidate(self, turns):
        marker = Path(os.environ["JOBS_TEST_MARKER"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(60)
        return self.inner.consolidate(turns)


def make_slow_once(*, embedder, **settings):
    return SlowOnce(
        ExtractiveConsolidator(
            embedder,
            min_words=int(settings.get("fact_min_words", 4)),
            max_facts=int(settings.get("fact_max_per_segment", 20)),
            duplicate_threshold=float(settings.get("fact_duplicate_threshold", 0.9)),
        )
    )


@hookimpl
def register_tier_policies():
    return [SlowPolicy()]


@hookimpl
def register_consolidators():
    return {"slow-once": make_slow_once}
"""

EMBEDDING = {"embedding_model": "hashing-384", "embedding_dim": 384}
GARDEN = "Gardening diary: greenhouse seedlings, mulch, pruning shears, trellis and hedges."
FACTS = [
    "I planted tomatoes near the old fence.",
    "The roses need water every single morning.",
    "Slugs keep eating my young lettuce leaves.",
    "Compost makes the garden soil much richer.",
    "Sunflowers grew taller than the garden shed.",
    "The apple tree finally bloomed this spring.",
    "Rabbits dug under the carrot bed again.",
    "My neighbour gave me rhubarb cuttings yesterday.",
]


def _write_plugin(base: Path) -> Path:
    root = base / "pyplugins"
    root.mkdir()
    (root / "jobs_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    return root


@pytest.fixture
def daemon(memosd_daemon_factory: Callable[..., DaemonHandle], tmp_path: Path) -> DaemonHandle:
    """A daemon of its own (the crash test kills it)."""
    return memosd_daemon_factory(
        plugins=["jobs_test_plugin"],
        pythonpath=[_write_plugin(tmp_path)],
        env={"JOBS_TEST_MARKER": str(tmp_path / "marker")},
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    """One daemon for the tests that only add cubes of their own (start-up costs seconds)."""
    base = tmp_path_factory.mktemp("jobs")
    env = {
        "MEMOSD_PLUGINS_MODULES": "jobs_test_plugin",
        "PYTHONPATH": os.pathsep.join([str(_write_plugin(base)), os.environ.get("PYTHONPATH", "")]),
        "JOBS_TEST_MARKER": str(base / "marker"),
    }
    handle = DaemonHandle(base, env=env)
    try:
        yield handle.start()
    finally:
        handle.cleanup()


def _cube(c: Client, name: str, **plaintext: Any) -> None:
    c.create_cube(name, config={**EMBEDDING, "tier_policy": {"plaintext": plaintext}})


def _until(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


# --- ops and access ---------------------------------------------------------------------


def test_jobs_are_listed_and_access_follows_the_cube(shared: DaemonHandle) -> None:
    daemon = shared
    with daemon.client() as c:
        _cube(c, "mine", short_capacity=2)
        _cube(c, "other")
        for i in range(4):
            c.add("mine", f"Alice: {GARDEN} {FACTS[i]}", session="s1")
        evicts = _until(lambda: c.jobs(cube="mine", kind="tiers.evict", state="succeeded"))
        job = c.job(evicts[0]["id"])
        assert job["cube"] == "mine"
        assert job["terminal"]
        assert job["history"][-1][1] == "succeeded"
        assert all(j["cube"] == "mine" for j in c.jobs(cube="mine"))
        assert c.jobs(cube="other") == []
        listed = c.jobs(limit=1)
        assert len(listed) == 1
        every = c.jobs()
        assert listed[0]["id"] == max(j["id"] for j in every)  # newest first
        with pytest.raises(Conflict):
            c.cancel_job(job["id"])  # already ended
        with pytest.raises(NotFound):
            c.job("01NOSUCHJOB0000000000000000")
        reader = c.token_create("reader")
        stranger = c.token_create("stranger")
        c.grant("mine", "token:reader", "read")
        queued = c.tier_run("mine", "slowtest", wait=False)[0]
    with daemon.client(token=reader) as r:
        assert r.job(job["id"])["id"] == job["id"]
        assert {j["cube"] for j in r.jobs()} == {"mine"}
        with pytest.raises(Forbidden):
            r.cancel_job(queued["id"])
        with pytest.raises(Forbidden):
            r.tier_run("mine", "plaintext")
        assert "plaintext" in r.tier_report("mine")
    with daemon.client(token=stranger) as s:
        assert s.jobs() == []
        with pytest.raises(NotFound):
            s.job(job["id"])
        with pytest.raises(NotFound):
            s.jobs(cube="mine")
        with pytest.raises(NotFound):
            s.tier_report("mine")
    with daemon.client() as c:
        assert c.wait_job(queued["id"], timeout=30)["state"] == "succeeded"


def test_jobs_without_a_cube_are_admin_only(
    memosd_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    daemon = memosd_daemon_factory(start=False)
    engine = Engine.open(daemon.data_dir)
    try:  # a maintenance job nobody handles: it stays queued
        orphan = engine.submit_job("maintenance.nobody", args={"x": 1})
    finally:
        engine.close()
    daemon.start()
    with daemon.client() as admin:
        token = admin.token_create("plain")
        assert admin.job(orphan.id)["state"] == "queued"
        assert orphan.id in {j["id"] for j in admin.jobs()}
    with daemon.client(token=token) as plain:
        assert orphan.id not in {j["id"] for j in plain.jobs()}
        with pytest.raises(Forbidden):
            plain.job(orphan.id)
        with pytest.raises(Forbidden):
            plain.cancel_job(orphan.id)
    with daemon.client() as admin:
        cancelled = admin.cancel_job(orphan.id)
        assert cancelled["state"] == "cancelled"
        assert cancelled["terminal"]


def test_tier_ops_run_report_and_describe(shared: DaemonHandle) -> None:
    daemon = shared
    with daemon.client() as c:
        _cube(c, "notes", short_capacity=3)
        ids = [c.add("notes", f"Alice: {GARDEN} {FACTS[i]}", session="s1").id for i in range(8)]
        done = c.tier_run("notes", "plaintext")
        assert [j["kind"] for j in done] == ["tiers.evict", "tiers.consolidate", "tiers.forget"]
        assert all(j["state"] == "succeeded" for j in done)
        report = c.tier_report("notes")["plaintext"]
        assert report["short"]["items"]["active"] == 3
        assert report["mid"]["items"]["active"] == 5
        assert sum(b["count"] for b in report["short"]["heat_histogram"]) == 3
        # Changing tier never takes a turn out of default search.
        hits = c.search("notes", "tomatoes near the old fence", k=10)
        first = next(h.item for h in hits if h.item.id == ids[0])
        assert first.tier == "mid"
        assert first.provenance.operation == "migrate"
        described = c.tier_policies()
        assert {"plaintext", "slowtest"} <= {p["name"] for p in described["policies"]}
        assert {"tiers.evict", "slowtest.work"} <= set(described["job_kinds"])
        with pytest.raises(NotFound):
            c.tier_run("notes", "no-such-policy")


# --- following and cancelling ---------------------------------------------------------------


def test_follow_job_draws_progress_from_feed_events(shared: DaemonHandle) -> None:
    daemon = shared
    with daemon.client() as c:
        _cube(c, "work")
        job = c.tier_run("work", "slowtest", wait=False)[0]
        err = io.StringIO()
        final = follow_job(c, job["id"], err=err)
        assert final["state"] == "succeeded"
        assert final["result"] == {"steps": 10}
        lines = err.getvalue().splitlines()
        assert lines[-1].startswith("slowtest.work  [")
        assert "100%" in lines[-1]
        middle = [ln for ln in lines if "step " in ln and "100%" not in ln]
        assert middle, lines  # progress seen while it ran, not only the end
        quiet = io.StringIO()
        assert follow_job(c, job["id"], err=quiet, json_out=True)["state"] == "succeeded"
        assert quiet.getvalue() == ""


def test_cancel_a_running_job(shared: DaemonHandle) -> None:
    daemon = shared
    with daemon.client() as c:
        c.create_cube(
            "long-work", config={**EMBEDDING, "tier_policy": {"slowtest": {"steps": 200}}}
        )
        job = c.tier_run("long-work", "slowtest", wait=False)[0]
        with c.subscribe("long-work") as sub:
            if c.job(job["id"])["state"] != "running":
                while True:
                    event = sub.next_event(timeout=20)
                    assert event is not None
                    if event.kind == "job_started" and event.job and event.job["job"] == job["id"]:
                        break
        asked = c.cancel_job(job["id"])
        assert asked["state"] == "running"
        assert asked["cancel_requested"]
        ended = c.wait_job(job["id"], timeout=20)
        assert ended["state"] == "cancelled"
        assert ended["attempts"] == 1


def test_memctl_job_and_tier_commands(shared: DaemonHandle) -> None:
    daemon = shared
    with daemon.client() as c:
        _cube(c, "cli-notes", short_capacity=2)
        for i in range(5):
            c.add("cli-notes", f"Alice: {GARDEN} {FACTS[i]}", session="s1")
    env = {**os.environ, "MEMOSD_SOCKET": str(daemon.socket), "MEMCTL_NO_PLUGINS": "1"}

    def memctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "memosd.cli", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ran = memctl("tier", "run", "cli-notes", "plaintext")
    assert ran.returncode == 0, ran.stderr
    assert "tiers.consolidate" in ran.stdout
    assert "succeeded" in ran.stdout
    assert "tiers.evict  [" in ran.stderr  # the progress bars
    ran_json = memctl("--json", "tier", "run", "cli-notes", "slowtest")
    assert ran_json.returncode == 0
    assert ran_json.stderr == ""
    (slow,) = json.loads(ran_json.stdout)
    assert slow["state"] == "succeeded"
    shown = json.loads(memctl("job", "show", slow["id"], "--json").stdout)
    assert shown["id"] == slow["id"]
    assert shown["result"] == {"steps": 10}
    listed = memctl("jobs", "--cube", "cli-notes", "--kind", "slowtest.work")
    assert slow["id"] in listed.stdout
    tiers = memctl("tiers", "cli-notes")
    assert tiers.returncode == 0
    assert "short" in tiers.stdout
    assert "mid.segments" in tiers.stdout
    policies = json.loads(memctl("tier", "policies", "--json").stdout)
    assert "slowtest" in {p["name"] for p in policies["policies"]}
    cancel = memctl("job", "cancel", slow["id"])
    assert cancel.returncode == 5  # conflict: it already ended
    missing = memctl("job", "show", "01NOSUCHJOB0000000000000000")
    assert missing.returncode == 3


# --- crash ---------------------------------------------------------------------------------


def test_sigkill_during_consolidation_completes_it_exactly_once(
    daemon: DaemonHandle, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    turns = [f"Alice: {GARDEN} {fact}" for fact in FACTS]
    with daemon.client() as c:
        _cube(c, "garden", short_capacity=2, consolidator="slow-once")
        with c.subscribe("garden") as sub:
            ids = [c.add("garden", text, session="s1").id for text in turns]
            started = None
            while started is None:
                event = sub.next_event(timeout=30)
                assert event is not None, "no consolidation job started"
                if event.kind == "job_started" and event.job["kind"] == "tiers.consolidate":
                    started = event.job["job"]
        _until(marker.exists)  # inside the consolidator, before its commit
        assert c.job(started)["state"] == "running"
    daemon.kill()
    daemon.start()
    with daemon.client() as c:
        job = c.wait_job(started, timeout=60)
        assert job["state"] == "succeeded"
        assert job["attempts"] == 2
        assert [s for _, s in job["history"]].count("succeeded") == 1
        c.tier_run("garden", "plaintext")  # settles anything queued meanwhile
        items = c.list_items("garden", limit=1000)
        turns_now = [i for i in items if i.metadata.get("tier_kind") != "fact" and i.text]
        assert sorted(i.id for i in turns_now) == sorted(ids)  # no turn lost or doubled
        facts = [i for i in items if i.metadata.get("tier_kind") == "fact"]
        assert facts, "the consolidation produced no fact"
        assert len({f.text for f in facts}) == len(facts)  # no duplicated fact
        sources = [p[0] for f in facts for p in f.provenance.parents]
        assert set(sources) <= set(ids)
        assert len(facts) == sum(
            j["result"].get("added", 0)
            for j in c.jobs(cube="garden", kind="tiers.consolidate", state="succeeded")
        )
