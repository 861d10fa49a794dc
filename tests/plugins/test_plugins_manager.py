"""PluginManager: discovery, allow/required lists, API versions, unknown hooks, isolation."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from memosd.engine import ChangeEvent
from memosd.errors import BadRequest, PluginError
from memosd.memcube.model import Form
from memosd.plugins import hookimpl
from memosd.plugins.forms import BaseForm
from memosd.plugins.manager import (
    DEFAULT_PLUGINS,
    ObserverDispatcher,
    PluginConfig,
    PluginManager,
    RequiredPluginError,
)


class FakeEntryPoint:
    """Duck-typed importlib.metadata.EntryPoint whose load() returns/raises what we say."""

    def __init__(self, name: str, load: Callable[[], object]) -> None:
        self.name = name
        self.value = f"fake_{name}:plugin"
        self.group = "memosd.plugins"
        self.dist = None
        self._load = load

    def load(self) -> object:
        return self._load()


def plugin(name: str, *, api: Any = (1,), **hooks: Callable[..., Any]) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__version__ = "9.9"  # type: ignore[attr-defined]
    if api is not None:
        module.MEMOSD_PLUGIN_API_VERSIONS = api  # type: ignore[attr-defined]
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(module, hook_name, hookimpl(fn))
    return module


class EchoForm(BaseForm):
    name = "echo"


def manager(*eps: FakeEntryPoint, **config: Any) -> PluginManager:
    return PluginManager(PluginConfig(**config), entry_points=lambda: list(eps)).load()


def status(m: PluginManager, name: str) -> dict[str, Any]:
    return {p["name"]: p for p in m.report()}[name]


def test_builtins_register_through_the_hooks() -> None:
    m = manager()
    assert [p["name"] for p in m.report()] == list(DEFAULT_PLUGINS)
    assert all(p["status"] == "loaded" for p in m.report())
    assert {f.value for f in Form} <= set(m.forms.names())
    assert "plaintext" in m.tier_policies
    assert set(m.consolidators) == {"extractive", "openai"}
    m.pm.check_pending()


def test_segment_form_name_matches_the_scheduler() -> None:
    from memosd.plugins.builtin_policies import SEGMENT_FORM
    from memosd.scheduler.policies_builtin import SEGMENT_FORM as SCHEDULER_SEGMENT_FORM

    assert SEGMENT_FORM == SCHEDULER_SEGMENT_FORM


def test_third_party_plugin_loads_with_version_hooks_and_provides() -> None:
    def forms() -> Iterable[Any]:
        return [EchoForm()]

    ep = FakeEntryPoint("echo", lambda: plugin("echo", register_memory_forms=forms))
    m = manager(ep)
    info = status(m, "echo")
    assert info["status"] == "loaded"
    assert info["version"] == "9.9"
    assert info["hooks"] == ["register_memory_forms"]
    assert info["provides"] == {"memory_forms": ["echo"]}
    assert m.forms.get("echo").plugin == "echo"


def test_broken_import_is_reported_and_skipped() -> None:
    def boom() -> object:
        raise ImportError("No module named 'missing_dependency'")

    good = FakeEntryPoint("good", lambda: plugin("good"))
    m = manager(FakeEntryPoint("broken", boom), good)
    info = status(m, "broken")
    assert info["status"] == "failed"
    assert "import failed" in info["reason"]
    assert "missing_dependency" in info["reason"]
    assert status(m, "good")["status"] == "loaded"


def test_required_plugin_failure_aborts() -> None:
    def boom() -> object:
        raise RuntimeError("kaput")

    with pytest.raises(RequiredPluginError, match=r"required plugin 'must'.*kaput"):
        manager(FakeEntryPoint("must", boom), required=("must",))


def test_required_plugin_missing_aborts() -> None:
    with pytest.raises(RequiredPluginError, match="'nowhere' is not installed"):
        manager(required=("nowhere",))


def test_unknown_hook_name_is_reported_with_a_hint() -> None:
    def register_memory_form() -> list[Any]:  # singular: a typo
        return []

    ep = FakeEntryPoint("typo", lambda: plugin("typo", register_memory_form=register_memory_form))
    m = manager(ep)
    info = status(m, "typo")
    assert info["status"] == "failed"
    assert "unknown hook 'register_memory_form'" in info["reason"]
    assert "did you mean 'register_memory_forms'" in info["reason"]
    assert m.pm.get_plugin("typo") is None
    m.pm.check_pending()  # nothing unverified left behind


def test_hook_with_unknown_argument_is_reported() -> None:
    def on_change(event: Any, extra: Any) -> None:
        pass

    m = manager(FakeEntryPoint("bad-args", lambda: plugin("bad-args", on_change=on_change)))
    info = status(m, "bad-args")
    assert info["status"] == "failed"
    assert "invalid hook implementation" in info["reason"]
    assert not m.has_observers()


@pytest.mark.parametrize(
    ("api", "needle"),
    [((2,), "version mismatch"), (None, "declares no MEMOSD_PLUGIN_API_VERSIONS"), ("1", "tuple")],
)
def test_api_version_mismatch_is_not_loaded(api: Any, needle: str) -> None:
    def on_change(event: Any) -> None:
        pass

    m = manager(FakeEntryPoint("old", lambda: plugin("old", api=api, on_change=on_change)))
    info = status(m, "old")
    assert info["status"] == "failed"
    assert needle in info["reason"]
    assert not m.has_observers()


def test_allow_list_disables_other_plugins() -> None:
    loaded: list[str] = []

    def loader(name: str) -> Callable[[], object]:
        def load() -> object:
            loaded.append(name)
            return plugin(name)

        return load

    m = manager(
        FakeEntryPoint("wanted", loader("wanted")),
        FakeEntryPoint("other", loader("other")),
        allow=("wanted",),
    )
    assert status(m, "wanted")["status"] == "loaded"
    assert status(m, "other")["status"] == "disabled"
    assert loaded == ["wanted"]  # a disabled plugin is never imported


def test_register_hook_that_raises_fails_only_that_plugin() -> None:
    def forms() -> list[Any]:
        raise ValueError("bad registry")

    m = manager(FakeEntryPoint("flaky", lambda: plugin("flaky", register_memory_forms=forms)))
    info = status(m, "flaky")
    assert info["status"] == "failed"
    assert "register_memory_forms raised ValueError: bad registry" in info["reason"]


def test_duplicate_form_fails_the_later_plugin() -> None:
    class Plain(BaseForm):
        name = "plaintext"

    def forms() -> list[Any]:
        return [Plain()]

    m = manager(FakeEntryPoint("dup", lambda: plugin("dup", register_memory_forms=forms)))
    info = status(m, "dup")
    assert info["status"] == "failed"
    assert "already registered by plugin 'memosd.plugins.builtin_forms'" in info["reason"]
    assert m.forms.get("plaintext").plugin == "memosd.plugins.builtin_forms"


def test_raising_form_is_isolated_as_plugin_error() -> None:
    class Crashy(BaseForm):
        name = "crashy"

        def validate(self, text: str, payload: Any) -> tuple[str, Any]:
            raise ZeroDivisionError("oops")

    class Strict(BaseForm):
        name = "strict"

        def validate(self, text: str, payload: Any) -> tuple[str, Any]:
            raise BadRequest("strict: no")

    def forms() -> list[Any]:
        return [Crashy(), Strict()]

    m = manager(FakeEntryPoint("forms", lambda: plugin("forms", register_memory_forms=forms)))
    with pytest.raises(PluginError, match="plugin 'forms': form 'crashy' failed") as info:
        m.forms.validate("crashy", "x", None)
    assert info.value.details["plugin"] == "forms"
    with pytest.raises(BadRequest, match="strict: no"):  # a verdict passes unchanged
        m.forms.validate("strict", "x", None)
    with pytest.raises(BadRequest, match="unknown memory form 'nope'"):
        m.forms.validate("nope", "x", None)


def test_raising_observer_is_isolated_and_others_still_run() -> None:
    seen: list[int] = []

    def bad(event: Any) -> None:
        raise RuntimeError("observer bug")

    def good(event: Any) -> None:
        seen.append(event.lsn)

    m = manager(
        FakeEntryPoint("a-bad", lambda: plugin("a-bad", on_change=bad)),
        FakeEntryPoint("b-good", lambda: plugin("b-good", on_change=good)),
    )
    event = ChangeEvent("item_written", "c", "i", 1, 7, "add")
    errors = m.notify_change(event)
    assert [e.details["plugin"] for e in errors] == ["a-bad"]
    assert seen == [7]
    with pytest.raises(PluginError, match="plugin 'a-bad': hook on_change failed"):
        m.call("on_change", event=event)

    dispatcher = ObserverDispatcher(m)
    dispatcher.start()
    try:
        for lsn in (8, 9):
            dispatcher.listener(ChangeEvent("item_written", "c", "i", 1, lsn, "add"))
        assert dispatcher.flush()
    finally:
        dispatcher.close()
    assert seen == [7, 8, 9]
    assert dispatcher.failures == 2


def test_modules_setting_loads_by_import_name() -> None:
    m = PluginManager(
        PluginConfig(modules=("memosd.plugins.hookspecs",)), entry_points=lambda: []
    ).load()
    info = status(m, "memosd.plugins.hookspecs")
    assert info["status"] == "failed"  # it declares no supported API versions
    assert info["source"] == "module"


def test_plugin_config_from_settings() -> None:
    from memosd.settings import load_settings

    s = load_settings(
        env={"HOME": "/tmp", "MEMOSD_PLUGINS_ALLOW": "facts, other", "MEMOSD_PLUGINS_REQUIRED": ""}
    )
    config = PluginConfig.from_settings(s.plugins)
    assert config.allow == ("facts", "other")
    assert config.required == ()
    assert config.allows("facts")
    assert not config.allows("third")


def test_duplicate_job_kind_fails_the_later_plugin() -> None:
    def handlers() -> dict[str, Any]:
        return {"tiers.evict": lambda ctx: None}

    m = manager(FakeEntryPoint("jobs", lambda: plugin("jobs", register_job_handlers=handlers)))
    info = status(m, "jobs")
    assert info["status"] == "failed"
    assert "job kind 'tiers.evict' is already handled by tier policy 'plaintext'" in info["reason"]
    assert "tiers.evict" in m.all_job_handlers()
    assert m.plugin_report() == m.report()


def test_same_name_twice_keeps_the_first_report() -> None:
    m = manager()
    first = plugin("twice")
    assert m.register(first, "twice").status == "loaded"
    again = m.register(plugin("twice"), "twice")
    assert again.status == "failed"
    assert "already loaded" in (again.reason or "")
    assert [p["status"] for p in m.report() if p["name"] == "twice"] == ["loaded", "failed"]


def test_a_broken_builtin_stops_start_up() -> None:
    broken = PluginManager(entry_points=list, defaults=("memosd.plugins.no_such_builtin",))
    with pytest.raises(RequiredPluginError, match="no_such_builtin"):
        broken.load()
