"""plugins.runtime: item validation by form, the plugins op, observers fed by a real engine."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

from memosd.errors import BadRequest
from memosd.plugins import hookimpl
from memosd.plugins.forms import BaseForm
from memosd.plugins.manager import PluginManager
from memosd.plugins.runtime import PluginRuntime, plugins_result, validate_add, validate_update

SHA = "ab" * 32


class TitleForm(BaseForm):
    """Derives its text from the payload, like the facts example."""

    name = "title"

    def validate(self, text: str, payload: Any) -> tuple[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("title"), str):
            raise BadRequest("title: payload.title required")
        return payload["title"].title(), payload


def title_plugin(seen: list[Any] | None = None) -> types.ModuleType:
    module = types.ModuleType("title_plugin")
    module.MEMOSD_PLUGIN_API_VERSIONS = (1,)  # type: ignore[attr-defined]

    def register_memory_forms() -> list[Any]:
        return [TitleForm()]

    module.register_memory_forms = hookimpl(register_memory_forms)  # type: ignore[attr-defined]
    if seen is not None:

        def on_change(event: Any) -> None:
            seen.append(event)

        module.on_change = hookimpl(on_change)  # type: ignore[attr-defined]
    return module


def loaded(plugin: types.ModuleType) -> PluginManager:
    m = PluginManager(entry_points=list).load()
    assert m.register(plugin, "title_plugin").status == "loaded"
    return m


def test_validate_add_by_form() -> None:
    m = loaded(title_plugin())
    fields: dict[str, Any] = {"payload": {"title": "hello world"}}
    assert validate_add(m, "title", "ignored", fields) == "Hello World"
    assert validate_add(m, None, "plain text", {}) == "plain text"
    with pytest.raises(BadRequest, match="unknown memory form"):
        validate_add(m, "nope", "x", {})
    with pytest.raises(BadRequest, match=r"payload.blobs"):
        validate_add(m, "activation", "kv", {"payload": {"manifest": {}}})
    with pytest.raises(BadRequest, match=r"payload.manifest"):
        validate_add(m, "parameter", "lora", {"payload": {"blobs": {"adapter": SHA}}})
    ok: dict[str, Any] = {"payload": {"blobs": {"adapter": SHA}, "manifest": {"format": "x"}}}
    assert validate_add(m, "parameter", "lora", ok) == "lora"
    with pytest.raises(BadRequest, match="must be a map"):
        validate_add(m, "title", "x", {"payload": [1]})


def test_validate_update_sees_values_after_the_update(memosd_engine: Any) -> None:
    m = loaded(title_plugin())
    memosd_engine.create_cube("c", owner="uid:1")
    item = memosd_engine.add("c", "Old Title", form="title", payload={"title": "old title"})
    fields: dict[str, Any] = {"payload": {"title": "new title"}}
    validate_update(m, item, fields)
    assert fields == {"payload": {"title": "new title"}, "text": "New Title"}
    untouched: dict[str, Any] = {"tags": ["x"]}
    validate_update(m, item, untouched)
    assert untouched == {"tags": ["x"]}
    with pytest.raises(BadRequest, match=r"payload.title required"):
        validate_update(m, item, {"payload": {}})


def test_plugins_result_and_observers_on_a_real_engine(
    memosd_engine: Any, memosd_plugins: Callable[..., PluginManager]
) -> None:
    seen: list[Any] = []
    m = loaded(title_plugin(seen))
    result = plugins_result(m)
    assert result["api"] == 1
    assert "title" in result["forms"]
    assert "plaintext" in result["tier_policies"]
    assert {p["name"] for p in result["plugins"]} >= {"title_plugin"}

    runtime = PluginRuntime(m)
    assert runtime.policy_registry().names() == ["plaintext"]
    assert {"tiers.evict", "tiers.consolidate", "tiers.forget"} <= set(runtime.job_handlers())
    runtime.attach(memosd_engine)
    writer = threading.get_ident()
    memosd_engine.create_cube("c", owner="uid:1")
    memosd_engine.add("c", "hello")
    assert runtime.observers is not None
    assert runtime.observers.flush()
    runtime.close()
    assert [e.kind for e in seen] == ["cube_created", "item_written"]
    assert writer == threading.get_ident()

    bare = memosd_plugins()
    assert bare.forms.names() == ["activation", "parameter", "plaintext", "tier-segment"]
    assert plugins_result(None)["plugins"] == []
