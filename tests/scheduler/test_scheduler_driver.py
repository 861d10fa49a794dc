"""TierScheduler: background thread, policy isolation, third-party policy through the protocol."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memosd.embed import HashingEmbedder
from memosd.engine import ChangeEvent, Engine
from memosd.memcube.model import CubeConfig
from memosd.scheduler.driver import TierScheduler
from memosd.scheduler.policies_builtin import builtin_policies
from memosd.scheduler.policy import JobRequest, PolicyContext, PolicyRegistry, PolicySetting
from memosd.scheduler.runner import JobContext, JobHandler, JobRunner


class TaggingPolicy:
    """A minimal third-party policy: tags every new item, via a durable job."""

    name = "tagger"
    settings: Sequence[PolicySetting] = (PolicySetting("tag", "seen", str, "Tag to add."),)

    def __init__(self) -> None:
        self.done = threading.Event()

    def on_write(
        self, event: ChangeEvent, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        if event.kind != "item_written" or event.version != 1 or event.cube is None:
            return []
        args = {"item": event.item_id, "tag": settings["tag"]}
        return [JobRequest("tagger.tag", event.cube, args, dedup_key=f"tag:{event.item_id}")]

    def periodic(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        return []

    def on_demand(self, cube: str, settings: Mapping[str, Any]) -> list[JobRequest]:
        return []

    def _tag(self, ctx: JobContext) -> dict[str, Any] | None:
        cube, item_id = ctx.cube or "", ctx.args["item"]
        result = ctx.commit(lambda p: p.update(cube, item_id, tags=[ctx.args["tag"]]).version)
        self.done.set()
        return {"version": result}

    def handlers(self) -> Mapping[str, JobHandler]:
        return {"tagger.tag": self._tag}

    def report(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> dict[str, Any]:
        return {"tagged": True}


class BrokenPolicy(TaggingPolicy):
    name = "broken"

    def on_write(
        self, event: ChangeEvent, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        raise RuntimeError("plugin bug")

    def handlers(self) -> Mapping[str, JobHandler]:
        return {}


def test_background_thread_runs_a_third_party_policy_and_isolates_a_broken_one(
    tmp_path: Path,
) -> None:
    with Engine.open(tmp_path / "data") as engine:
        tagger = TaggingPolicy()
        registry = PolicyRegistry(
            [*builtin_policies(embedder=HashingEmbedder(64)), tagger, BrokenPolicy()]
        )
        runner = JobRunner(engine, registry.handlers(), poll_s=0.05)
        scheduler = TierScheduler(
            engine, registry, runner, default_policies=("broken", "tagger", "nope"), tick_s=3600
        )
        config = CubeConfig(tier_policy={"tagger": {"tag": "fresh"}})
        engine.create_cube("c", owner="uid:0", config=config)
        runner.start()
        scheduler.start()
        try:
            item = engine.add("c", "hello world")
            assert tagger.done.wait(10)
            runner.drain()
            assert engine.get("c", item.id).tags == ("fresh",)
            assert scheduler.report("c") == {"tagger": {"tagged": True}, "broken": {"tagged": True}}
            described = scheduler.describe()
            assert [p["name"] for p in described["policies"]] == ["plaintext", "tagger", "broken"]
        finally:
            scheduler.close()
            runner.close()


def test_builtin_policies_load_through_the_plugin_hooks() -> None:
    from memosd.plugins.manager import PluginManager
    from memosd.scheduler.driver import build_registry
    from memosd.scheduler.policies_builtin import SEGMENT_FORM, PlaintextTierPolicy

    manager = PluginManager().load()
    embedder = HashingEmbedder(64)
    registry = build_registry(
        manager.policies(),
        embedder=embedder,
        consolidators={name: f for name, (_, f) in manager.consolidators.items()},
    )
    assert "plaintext" in registry.names()
    policy = registry.get("plaintext")
    assert isinstance(policy, PlaintextTierPolicy)
    assert policy.embedder is embedder
    assert {"tiers.evict", "tiers.consolidate", "tiers.forget"} <= set(registry.handlers())
    assert manager.forms.get(SEGMENT_FORM).name == SEGMENT_FORM


def test_plaintext_tiers_run_by_themselves_in_the_background(tmp_path: Path) -> None:
    """Real clock, real threads: adding turns is all it takes for eviction to happen."""
    with Engine.open(tmp_path / "data") as engine:
        registry = PolicyRegistry(builtin_policies(embedder=HashingEmbedder(256)))
        runner = JobRunner(engine, registry.handlers())
        scheduler = TierScheduler(engine, registry, runner)
        config = CubeConfig(tier_policy={"plaintext": {"short_capacity": 3}})
        engine.create_cube("bg", owner="uid:0", config=config)
        finished = threading.Event()
        runner.add_listener(
            lambda e: finished.set() if e.kind == "tiers.evict" and e.type == "succeeded" else None
        )
        runner.start()
        scheduler.start()
        try:
            for i in range(5):
                engine.add("bg", f"turn {i} about gardening and tomatoes", session="s")
            deadline = threading.Event()
            for _ in range(200):  # bounded wait for the evictions to land
                short = engine.list_items("bg", tier="short")
                if len(short) == 3 and finished.is_set():
                    break
                deadline.wait(0.05)
            assert [i.text for i in engine.list_items("bg", tier="short")] == [
                f"turn {i} about gardening and tomatoes" for i in (2, 3, 4)
            ]
            assert len(engine.list_items("bg", tier="mid", form="plaintext")) == 2
        finally:
            scheduler.close()
            runner.close()


class CountingPolicy(TaggingPolicy):
    """Counts the item events it sees (no jobs)."""

    name = "counter"

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def on_write(
        self, event: ChangeEvent, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        if event.kind == "item_written" and event.item_id is not None:
            with self._lock:
                self.seen.append(event.item_id)
                if len(self.seen) >= self.expected:
                    self.done.set()
        return []

    def handlers(self) -> Mapping[str, JobHandler]:
        return {}


def test_every_event_of_concurrent_bursts_reaches_the_policy_thread(tmp_path: Path) -> None:
    # The policy thread is woken once per burst, not once per event; no event
    # may be left behind in the queue when a burst ends while it drains.
    writers, per_writer = 8, 150
    with Engine.open(tmp_path / "data") as engine:
        counter = CountingPolicy(writers * per_writer)
        registry = PolicyRegistry([counter])
        runner = JobRunner(engine, registry.handlers(), poll_s=0.05)
        scheduler = TierScheduler(engine, registry, runner, default_policies=("counter",))
        engine.create_cube("c", owner="uid:0")
        scheduler.start()
        written: list[str] = []
        lock = threading.Lock()

        def write(n: int) -> None:
            for i in range(per_writer):
                item = engine.add("c", f"writer {n} item {i}")
                with lock:
                    written.append(item.id)

        try:
            threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert counter.done.wait(30), f"{len(counter.seen)} of {len(written)} events seen"
            assert sorted(counter.seen) == sorted(written)
        finally:
            scheduler.close()
            runner.close()
