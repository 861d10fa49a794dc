"""Search through the real daemon with the embedded MiniLM model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from memosd.errors import NotFound
from memosd.testing import DaemonHandle, memosd_daemon_factory

__all__ = ["memosd_daemon_factory"]


def test_semantic_hybrid_search_over_the_daemon(
    memosd_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    daemon = memosd_daemon_factory(env={"MEMOSD_INDEX_EMBEDDER": "minilm"})
    with daemon.client() as c:
        c.create_cube("home")
        c.create_cube("work")
        c.add("home", "I live in Berlin with my two cats")
        c.add("home", "My favourite food is ramen")
        c.add("work", "The quarterly report is due on Friday")
        # Read-your-writes: no explicit wait, the writer sees its own adds.
        hits = c.search("home", "where do I live?", k=2, explain=True)
        assert hits[0].item.text.startswith("I live in Berlin")
        assert set(hits[0].components) >= {"dense"}
        # Several cubes fused into one ranking.
        fused = c.search(["home", "work"], "when is the report deadline", k=3)
        assert fused[0].item.cube == "work"
        assert {h.item.cube for h in fused} == {"home", "work"}
        # The hit was counted (usage statistics, batched without WAL records).
        c.checkpoint()
        assert c.get("home", hits[0].item.id).usage.hits >= 1
        token = c.token_create("guest")
    with daemon.client(token=token) as guest, pytest.raises(NotFound):
        guest.search(["home", "work"], "report")


def test_index_survives_restart_without_reembedding(
    memosd_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    daemon = memosd_daemon_factory()
    with daemon.client() as c:
        c.create_cube("notes")
        first = c.add("notes", "alpha bravo charlie").id
    daemon.restart(kill=False)  # clean stop: the index snapshot is written
    with daemon.client() as c:
        c.add("notes", "delta echo foxtrot")
        assert c.search("notes", "alpha bravo", mode="lexical")[0].item.id == first
        status: dict[str, Any] = c.status()
        search = status["search"]
        # Loaded from the snapshot: only the one new item was embedded.
        assert search["rebuild"] is None
        assert search["texts_embedded"] == 1
        assert search["lag"] == 0
