"""The example plugin (examples/memosd-facts), pip-installed: through memctl and in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from memosd.errors import BadRequest
from memosd.testing import DaemonHandle


def memctl(
    daemon: DaemonHandle, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOSD_")}
    env["MEMOSD_SOCKET"] = str(daemon.socket)
    proc = subprocess.run(
        [sys.executable, "-m", "memosd.cli", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"memctl {args} -> {proc.returncode}: {proc.stderr}")
    return proc


def test_fact_form_and_policy_in_process(
    facts_plugin: str, memosd_plugins: Callable[..., Any]
) -> None:
    manager = memosd_plugins("memosd_facts.plugin")
    info = {p["name"]: p for p in manager.report()}["memosd_facts.plugin"]
    assert info["status"] == "loaded"
    assert info["provides"]["memory_forms"] == ["fact"]
    assert info["provides"]["tier_policies"] == ["facts-validity"]
    text, payload = manager.forms.validate(
        "fact", "ignored", {"subject": "alice", "predicate": "works_at", "object": "acme"}
    )
    assert text == "alice works_at acme"
    assert payload == {"subject": "alice", "predicate": "works_at", "object": "acme"}
    for bad in (
        None,
        {"subject": "a", "predicate": "b"},
        {"subject": "a", "predicate": "b", "object": "c", "colour": "red"},
        {"subject": "a", "predicate": "b", "object": "c", "valid_from_us": 5, "valid_to_us": 1},
        {"subject": " ", "predicate": "b", "object": "c"},
    ):
        with pytest.raises(BadRequest, match="fact:"):
            manager.forms.validate("fact", "", bad)

    from memosd.scheduler.policy import PolicyRegistry

    registry = PolicyRegistry(manager.policies())
    assert set(registry.names()) == {"plaintext", "facts-validity"}
    assert "facts.maintain" in registry.handlers()


def test_fact_plugin_through_memctl(
    facts_plugin: str, memosd_daemon_factory: Callable[..., DaemonHandle]
) -> None:
    daemon = memosd_daemon_factory()
    memctl(daemon, "cube", "create", "notes")
    fact_id = memctl(daemon, "facts", "add", "notes", "alice", "works_at", "acme").stdout.strip()
    memctl(
        daemon,
        "add",
        "notes",
        "",
        "--form",
        "fact",
        "--payload",
        json.dumps({"subject": "bob", "predicate": "likes", "object": "tea"}),
    )
    memctl(daemon, "add", "notes", "an unrelated plaintext note")

    hits = json.loads(memctl(daemon, "search", "notes", "alice acme", "--json").stdout)
    assert hits[0]["item"]["id"] == fact_id
    assert hits[0]["item"]["form"] == "fact"
    assert hits[0]["item"]["text"] == "alice works_at acme"
    assert hits[0]["item"]["payload"]["object"] == "acme"

    listed = memctl(daemon, "facts", "list", "notes").stdout
    assert "alice\tworks_at\tacme" in listed
    assert "bob\tlikes\ttea" in listed

    bad = memctl(daemon, "add", "notes", "", "--form", "fact", "--payload", "{}", check=False)
    assert bad.returncode != 0
    assert "fact:" in bad.stderr

    report = json.loads(memctl(daemon, "plugins", "--json").stdout)
    by_name = {p["name"]: p for p in report["plugins"]}
    assert by_name[facts_plugin]["status"] == "loaded"
    assert by_name[facts_plugin]["source"] == "entry point"
    assert by_name[facts_plugin]["version"] == "0.1.0"
    assert "register_commands" in by_name[facts_plugin]["hooks"]
    assert "fact" in report["forms"]
    assert "facts-validity" in report["tier_policies"]
    table = memctl(daemon, "plugins").stdout
    assert "facts" in table
    assert "loaded" in table


def test_allow_list_keeps_the_installed_plugin_out(
    facts_plugin: str, memosd_daemon_factory: Callable[..., DaemonHandle]
) -> None:
    daemon = memosd_daemon_factory(settings={"plugins.allow": ["someone-else"]})
    with daemon.client() as c:
        report = {p["name"]: p for p in c.call("plugins")["plugins"]}
        assert report[facts_plugin]["status"] == "disabled"
        c.create_cube("notes")
        with pytest.raises(BadRequest, match="unknown memory form 'fact'"):
            c.add(
                "notes", "", form="fact", payload={"subject": "a", "predicate": "b", "object": "c"}
            )


def test_facts_validity_policy_moves_and_expires_facts(
    facts_plugin: str, memosd_engine: Any, memosd_plugins: Callable[..., Any]
) -> None:
    from memosd.memcube.model import CubeConfig
    from memosd.plugins.runtime import PluginRuntime, validate_add
    from memosd.scheduler.driver import TierScheduler
    from memosd.scheduler.runner import JobRunner

    manager = memosd_plugins("memosd_facts.plugin")
    runtime = PluginRuntime(manager)
    registry = runtime.policy_registry()
    runner = JobRunner(memosd_engine, runtime.job_handlers(), poll_s=0.05)
    scheduler = TierScheduler(memosd_engine, registry, runner)
    config = CubeConfig(tier_policy={"policies": ["facts-validity"]})
    memosd_engine.create_cube("kb", owner="uid:1", config=config)

    def add_fact(payload: dict[str, Any]) -> Any:
        fields: dict[str, Any] = {"payload": payload}
        text = validate_add(manager, "fact", "", fields)
        return memosd_engine.add("kb", text, form="fact", **fields)

    current = add_fact({"subject": "alice", "predicate": "works_at", "object": "acme"})
    expired = add_fact(
        {"subject": "bob", "predicate": "lives_in", "object": "paris", "valid_to_us": 1}
    )
    runner.start()
    try:
        (job,) = scheduler.run_policy("kb", "facts-validity", timeout=60)
    finally:
        runner.close()
    assert job.state == "succeeded", job.error
    assert job.result == {"moved": 1, "archived": 1}
    assert memosd_engine.get("kb", current.id).tier == "long"
    assert memosd_engine.get("kb", expired.id).status == "archived"
    report = registry.get("facts-validity").report(
        "kb", 10**18, {"grace_s": 0, "interval_s": 1}, scheduler
    )
    assert report == {"facts": 1, "expired_pending": 0}
