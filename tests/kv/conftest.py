"""Shared fixtures for activation-memory tests: a tiny Llama and an engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memosd.engine import Engine
from memosd.models import HFBackend
from memosd.models.testing import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    return HFBackend.load(tiny_model_dir, fingerprint_cache_dir=tmp_path_factory.mktemp("fp"))


@pytest.fixture(scope="session")
def other_backend(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    """Same architecture, other weights: another fingerprint."""
    d = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-seed1"), seed=1)
    return HFBackend.load(d, fingerprint_cache_dir=tmp_path_factory.mktemp("fp1"))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data") as eng:
        eng.create_cube("notes", owner="uid:1000")
        yield eng
