"""Fixtures for parameter-memory tests: one tiny Llama per session, one engine per test."""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import itertools
import json
import pathlib
import random
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from memosd.engine import Engine
from memosd.lora.evaluate import pad_batch, token_nll
from memosd.models.backend import HFBackend
from memosd.models.testing import build_tiny_llama


@pytest.fixture(scope="session")
def model_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep fingerprint sidecars (also the spawned workers') out of the home directory."""
    cache = tmp_path_factory.mktemp("fingerprint-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMOSD_CACHE_DIR", str(cache))
        yield cache


def _prose() -> str:
    """English prose that ships with Python: stdlib module docstrings."""
    modules = (argparse, collections, functools, itertools, json, pathlib, random, textwrap)
    return " ".join(" ".join(inspect.getdoc(m) or "" for m in modules).split())


@pytest.fixture(scope="session")
def tiny_backend(tmp_path_factory: pytest.TempPathFactory, model_env: Path) -> HFBackend:
    """A tiny Llama warmed up on 40 steps of English prose (perplexity ~25, not ~257).

    A randomly initialised model predicts bytes almost uniformly whatever its
    weights do, so no adapter could make it forget anything: the
    catastrophic-forgetting guard needs a base model that knows a little.
    """
    cold = HFBackend.load(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cold"), seed=0))
    ids = cold.encode(_prose())
    windows = [ids[i : i + 64] for i in range(0, len(ids) - 64, 64)]
    rng = random.Random(0)
    torch.manual_seed(0)
    model = cold.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(40):
        nll, count = token_nll(model, *pad_batch(rng.sample(windows, 8), pad_id=0))
        optimizer.zero_grad()
        (nll / count).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    model.eval()
    warm = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(warm))
    cold.tokenizer.save_pretrained(str(warm))
    return HFBackend.load(warm)


@pytest.fixture(scope="session")
def other_backend(tmp_path_factory: pytest.TempPathFactory, model_env: Path) -> HFBackend:
    directory = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)
    return HFBackend.load(directory)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data") as eng:
        eng.create_cube("notes", owner="uid:1000")
        yield eng
