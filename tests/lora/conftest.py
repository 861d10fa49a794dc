"""Fixtures for parameter-memory tests: one tiny Llama per session, one engine per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memosd.engine import Engine
from memosd.lora.testing import build_warm_tiny_llama
from memosd.models.backend import HFBackend
from memosd.models.testing import build_tiny_llama


@pytest.fixture(scope="session")
def model_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep fingerprint sidecars (also the spawned workers') out of the home directory."""
    cache = tmp_path_factory.mktemp("fingerprint-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMOSD_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_backend(tmp_path_factory: pytest.TempPathFactory, model_env: Path) -> HFBackend:
    """A tiny Llama warmed up on 40 steps of English prose (perplexity ~25, not ~257).

    A randomly initialised model predicts bytes almost uniformly whatever its
    weights do, so no adapter could make it forget anything: the
    catastrophic-forgetting guard needs a base model that knows a little.
    """
    return HFBackend.load(build_warm_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def other_backend(tmp_path_factory: pytest.TempPathFactory, model_env: Path) -> HFBackend:
    directory = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)
    return HFBackend.load(directory)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data") as eng:
        eng.create_cube("notes", owner="uid:1000")
        yield eng
