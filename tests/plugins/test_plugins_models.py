"""Embedders and model backends: the built-ins register through the hooks, and
the daemon picks the configured ones from what plugins register."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from memosd.daemon import DaemonExitError, model_backend
from memosd.errors import BadRequest
from memosd.models.cache import ModelCache
from memosd.plugins import hookimpl
from memosd.plugins.manager import PluginManager
from memosd.plugins.runtime import PluginRuntime
from memosd.settings import load_settings

BUILTIN = "memosd.plugins.builtin_models"


def _runtime(*plugins: tuple[types.ModuleType, str]) -> PluginRuntime:
    manager = PluginManager(entry_points=list).load()
    for module, name in plugins:
        assert manager.register(module, name).status == "loaded"
    return PluginRuntime(manager)


class FakeBackend:
    fingerprint = "f" * 64

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self.path = path
        self.options = options


def backend_plugin(calls: list[str]) -> types.ModuleType:
    module = types.ModuleType("fake_backend_plugin")
    module.MEMOSD_PLUGIN_API_VERSIONS = (1,)  # type: ignore[attr-defined]

    def load(path: str, **options: Any) -> FakeBackend:
        calls.append(path)
        return FakeBackend(path, options)

    def register_model_backends() -> dict[str, Any]:
        return {"fake": load}

    module.register_model_backends = hookimpl(register_model_backends)  # type: ignore[attr-defined]
    return module


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return d


def test_builtins_register_embedders_and_the_hf_backend_through_the_hooks() -> None:
    manager = _runtime().manager
    assert manager.embedders["minilm"][0] == BUILTIN
    assert manager.embedders["hashing"][0] == BUILTIN
    assert manager.model_backends["hf"][0] == BUILTIN
    hashing = manager.embedders["hashing"][1]()
    assert hashing.dim == 384
    vectors = hashing.embed(["a memory", "another memory"])
    assert vectors.shape == (2, 384)


def test_the_configured_plugin_backend_loads_models(tmp_path: Path) -> None:
    calls: list[str] = []
    runtime = _runtime((backend_plugin(calls), "fake_backend_plugin"))
    settings = load_settings(env={}, overrides={"models.backend": "fake"})
    loader = model_backend(settings, runtime)
    cache = ModelCache.from_settings(settings.models, loader=loader)
    directory = _model_dir(tmp_path)
    backend = cache.get(directory)
    assert isinstance(backend, FakeBackend)
    assert calls == [str(directory.resolve())]
    assert cache.get(directory) is backend  # cached: loaded once
    assert calls == [str(directory.resolve())]


def test_an_unknown_backend_is_a_config_error_naming_the_registered_ones() -> None:
    settings = load_settings(env={}, overrides={"models.backend": "nope"})
    with pytest.raises(DaemonExitError, match="registered: hf"):
        model_backend(settings, _runtime())


def test_a_backend_that_fails_to_load_is_a_typed_error(tmp_path: Path) -> None:
    def broken(path: str, **options: Any) -> Any:
        raise RuntimeError("weights are corrupt")

    cache = ModelCache(loader=broken)
    with pytest.raises(BadRequest, match="weights are corrupt") as info:
        cache.get(_model_dir(tmp_path))
    assert info.value.reason == "bad_model"
