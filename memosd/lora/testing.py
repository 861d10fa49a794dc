"""A tiny base model that knows a little English, for parameter-memory tests and benches.

A randomly initialised model predicts bytes almost uniformly whatever its
weights do, so no adapter could make it *forget* anything: the promotion
gate's control-text guard needs a base model that learned something.
:func:`build_warm_tiny_llama` builds the tiny Llama of
:mod:`memosd.models.testing` and trains it for a few dozen steps on English
prose that ships with Python (stdlib module docstrings), deterministically;
its perplexity on English falls from ~257 to ~25.
"""

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
from pathlib import Path
from typing import Any

import torch

from memosd.lora.evaluate import pad_batch, token_nll
from memosd.models.testing import build_tiny_llama

__all__ = ["build_warm_tiny_llama", "stdlib_prose"]


def stdlib_prose() -> str:
    """English prose that ships with Python: stdlib module docstrings."""
    modules = (argparse, collections, functools, itertools, json, pathlib, random, textwrap)
    return " ".join(" ".join(inspect.getdoc(m) or "" for m in modules).split())


def build_warm_tiny_llama(directory: str | Path, *, seed: int = 0, steps: int = 40) -> Path:
    """Build the tiny Llama in ``directory`` (a temporary dir is used first), warm it up, save."""
    from memosd.models.backend import HFBackend  # noqa: PLC0415

    out = Path(directory)
    cold_dir = out.with_name(out.name + "-cold")
    cold = HFBackend.load(build_tiny_llama(cold_dir, seed=seed))
    ids = cold.encode(stdlib_prose())
    windows = [ids[i : i + 64] for i in range(0, len(ids) - 64, 64)]
    rng = random.Random(seed)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model: Any = cold.model
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
        for _ in range(steps):
            nll, count = token_nll(model, *pad_batch(rng.sample(windows, 8), pad_id=0))
            optimizer.zero_grad()
            (nll / count).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        model.eval()
    finally:
        torch.random.set_rng_state(state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    cold.tokenizer.save_pretrained(str(out))
    return out
