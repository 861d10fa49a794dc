"""Activation memory through a real daemon: build, fetch over IPC, staleness, purge, crash."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from memosd.cli.main import app
from memosd.client import AsyncClient
from memosd.errors import BadRequest, Conflict, Forbidden, NotFound
from memosd.integrations.hf import generate_with_memory, logits_with_memory
from memosd.models import HFBackend
from memosd.models.testing import build_tiny_llama
from memosd.testing import DaemonHandle

TEXTS = (
    "The cat sleeps on the red sofa every afternoon.",
    "Alice's birthday is on the 3rd of March.",
    "The staging server restarts at 02:00 UTC.",
)


def memctl(*args: str, socket: Path) -> Result:
    environ = {"MEMOSD_SOCKET": str(socket), "MEMOSD_TOKEN": ""}
    return CliRunner().invoke(app, list(args), env=environ, catch_exceptions=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def backend(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    return HFBackend.load(model_dir, fingerprint_cache_dir=tmp_path_factory.mktemp("fp"))


def _wait(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _full_logits(backend: HFBackend, prefix: tuple[int, ...], cont: list[int]) -> torch.Tensor:
    ids = torch.tensor([[*prefix, *cont]], dtype=torch.long)
    with torch.no_grad():
        out = backend.model(input_ids=ids)
    logits: torch.Tensor = out.logits[0, len(prefix) :]
    return logits


def _blob_paths(daemon: DaemonHandle, item: Any) -> list[Path]:
    chunks = item.payload["manifest"]["chunks"]
    return [daemon.data_dir / "blobs" / c["blob"][:2] / c["blob"] for c in chunks]


def _setup(daemon: DaemonHandle) -> tuple[Any, list[str]]:
    client = daemon.client(timeout=60.0)
    client.create_cube("notes")
    ids = [client.add("notes", text, tier="long").id for text in TEXTS]
    return client, ids


def test_build_fetch_inject_matches_full_prefill(
    memosd_daemon_factory: Callable[..., DaemonHandle], model_dir: Path, backend: HFBackend
) -> None:
    daemon = memosd_daemon_factory()
    client, ids = _setup(daemon)
    with client:
        # memctl kv build: a job followed to the end, the cache's info as JSON.
        result = memctl(
            "kv", "build", "notes", "--items", ids[0], "--items", ids[1],
            "--model", str(model_dir), "--name", "facts", "--json", socket=daemon.socket,
        )  # fmt: skip
        assert result.exit_code == 0, (result.stdout, result.stderr)
        built = json.loads(result.stdout)
        assert built["job"]["state"] == "succeeded"
        info = built["info"]
        item = client.get("notes", info["item_id"])
        assert item.form == "activation"
        assert info["name"] == "facts"
        assert info["fingerprint"] == backend.fingerprint
        assert [s[0] for s in info["sources"]] == ids[:2]

        loaded = client.kv_get("notes", item.id, backend)
        assert loaded.num_tokens == info["num_tokens"] > 0
        assert loaded.fingerprint == backend.fingerprint
        for cont_text in (" Question: who sleeps?", " When is the birthday of Alice"):
            cont = backend.encode(cont_text)
            fetched = logits_with_memory(backend, loaded, cont)
            full = _full_logits(backend, loaded.token_ids, cont)
            assert (fetched - full).abs().max().item() < 1e-4

        # Copy-on-read: two generations from one fetched cache agree, tensors untouched.
        before = [k.clone() for k, _ in loaded.layers]
        first = generate_with_memory(backend, None, loaded, " The cat", max_new_tokens=8)
        second = generate_with_memory(backend, None, loaded, " The cat", max_new_tokens=8)
        assert first == second
        assert all(torch.equal(a, k) for a, (k, _) in zip(before, loaded.layers, strict=True))

        # By name, list, show.
        assert client.kv_get("notes", None, backend, name="facts").item_id == item.id
        listed = client.kv_list("notes")
        assert [c["item_id"] for c in listed] == [item.id]
        shown = json.loads(
            memctl("kv", "show", "notes", "--name", "facts", "--json", socket=daemon.socket).stdout
        )
        assert shown["model"] == str(model_dir.resolve())
        table = memctl("kv", "list", "notes", socket=daemon.socket).stdout
        assert item.id in table
        assert "facts" in table

        # The async client fetches the same cache.
        async def fetch_async() -> Any:
            async with AsyncClient(daemon.socket, timeout=60.0) as ac:
                return await ac.kv_get("notes", item.id, backend)

        fetched_async = asyncio.run(fetch_async())
        assert fetched_async.token_ids == loaded.token_ids
        assert all(
            torch.equal(a[0], b[0])
            for a, b in zip(fetched_async.layers, loaded.layers, strict=True)
        )

        # Another model's fingerprint is refused by the daemon.
        with pytest.raises(Conflict) as exc:
            client.kv_get("notes", item.id, "0" * 64)
        assert exc.value.reason == "fingerprint_mismatch"

        # A tier build and a query build also work (a cache is never its own source).
        tier_built = client.kv_build("notes", model=model_dir, tier="long")
        assert {s[0] for s in tier_built["info"]["sources"]} == set(ids)
        # It extends the first cache's prefix: those tokens are reused, not recomputed.
        assert tier_built["job"]["result"]["reused_tokens"] > 0
        query_built = client.kv_build("notes", model=model_dir, query="birthday Alice", top=1)
        assert [s[0] for s in query_built["info"]["sources"]] == [ids[1]]

        # Drop: purged, its own blobs deleted (shared chunks may stay with other caches).
        dropped = memctl(
            "kv", "drop", "notes", query_built["item"].id, "--yes", socket=daemon.socket
        )
        assert dropped.exit_code == 0, dropped.stderr
        with pytest.raises(NotFound):
            client.kv_show("notes", query_built["item"].id)


def test_model_access_bad_requests_and_budget(
    memosd_daemon_factory: Callable[..., DaemonHandle], model_dir: Path, tmp_path: Path
) -> None:
    daemon = memosd_daemon_factory(settings={"kv.budget_bytes": 45_000})
    client, ids = _setup(daemon)
    with client:
        with pytest.raises(NotFound) as nf:
            client.kv_build("notes", model=tmp_path / "nope", items=ids)
        assert nf.value.reason == "no_model"
        not_model = tmp_path / "empty"
        not_model.mkdir()
        with pytest.raises(BadRequest) as bad:
            client.kv_build("notes", model=not_model, items=ids)
        assert bad.value.reason == "not_causal_lm"
        # A non-admin principal (a token) may only use models under models.allowed_dirs.
        secret = client.token_create("bob")
        client.grant("notes", "token:bob", "write")
        with daemon.client(token=secret) as bob, pytest.raises(Forbidden) as forb:
            bob.kv_build("notes", model=model_dir, items=ids)
        assert forb.value.reason == "model_not_allowed"

        # kv.budget_bytes: the least recently used cache is evicted after a build.
        first = client.kv_build("notes", model=model_dir, items=[ids[0]])["info"]
        assert 0 < first["bytes"] < 45_000
        second = client.kv_build("notes", model=model_dir, items=[ids[2]])["info"]
        assert first["bytes"] + second["bytes"] > 45_000
        assert [c["item_id"] for c in client.kv_list("notes")] == [second["item_id"]]
        with pytest.raises(NotFound):
            client.kv_show("notes", first["item_id"])


def test_stale_after_update_rebuilds_and_purge_deletes_blobs(
    memosd_daemon_factory: Callable[..., DaemonHandle], model_dir: Path, backend: HFBackend
) -> None:
    daemon = memosd_daemon_factory()
    client, ids = _setup(daemon)
    with client:
        old = client.kv_build("notes", model=model_dir, items=ids, name="all")["item"]
        old_blobs = _blob_paths(daemon, old)
        assert old_blobs
        assert all(p.exists() for p in old_blobs)

        client.update("notes", ids[0], text="The dog sleeps on the blue sofa.")

        def rebuilt() -> Any:
            caches = client.kv_list("notes")
            fresh = [c for c in caches if c["name"] == "all" and not c["stale"]]
            return fresh[0] if fresh and fresh[0]["item_id"] != old.id else None

        new = _wait(rebuilt, "the automatic kv.rebuild")
        assert [c["item_id"] for c in client.kv_list("notes")] == [new["item_id"]]
        assert dict(map(tuple, new["sources"]))[ids[0]] == 2
        jobs = client.jobs(kind="kv.rebuild")
        assert [j["state"] for j in jobs] == ["succeeded"]
        with pytest.raises(NotFound):
            client.kv_get("notes", old.id, backend)
        # The replaced cache was purged with the rebuild: its tensors (which saw the
        # old text) are gone.
        _wait(lambda: not any(p.exists() for p in old_blobs), "the replaced chunk blobs to go")
        loaded = client.kv_get("notes", new["item_id"], backend)
        assert "dog" in backend.tokenizer.decode(list(loaded.token_ids))
        cont = backend.encode(" Who sleeps?")
        fetched = logits_with_memory(backend, loaded, cont)
        assert (fetched - _full_logits(backend, loaded.token_ids, cont)).abs().max() < 1e-4

        # Purge a source: the cache is purged and no tensor that saw the text survives.
        new_item = client.get("notes", new["item_id"])
        new_blobs = _blob_paths(daemon, new_item)
        client.purge("notes", ids[1])
        _wait(lambda: not any(p.exists() for p in new_blobs), "the old chunk blobs to go")
        with pytest.raises(NotFound):
            client.get("notes", new["item_id"])
        # The placeholder is rebuilt from the remaining sources.
        final = _wait(
            lambda: [c for c in client.kv_list("notes") if not c["stale"]],
            "the rebuild after the purge",
        )[0]
        assert {s[0] for s in final["sources"]} == {ids[0], ids[2]}
        text = backend.tokenizer.decode(
            list(client.kv_get("notes", final["item_id"], backend).token_ids)
        )
        assert "birthday" not in text


def test_sigkill_during_build_completes_once(
    memosd_daemon_factory: Callable[..., DaemonHandle],
    model_dir: Path,
    backend: HFBackend,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    daemon = memosd_daemon_factory(env={"MEMOSD_TEST_KV_PAUSE": str(gate)})
    client, ids = _setup(daemon)
    with client:
        job = client.kv_build("notes", model=model_dir, items=ids, wait=False)["job"]
        reached = Path(str(gate) + ".reached")
        _wait(reached.exists, "the build to reach its commit")
        assert client.kv_list("notes") == []  # chunks written, no item yet
        assert client.job(job["id"])["state"] == "running"
    daemon.kill()
    del daemon.env["MEMOSD_TEST_KV_PAUSE"]
    daemon.start()
    with daemon.client(timeout=60.0) as client:
        ended = client.wait_job(job["id"], timeout=60.0)
        assert ended["state"] == "succeeded"
        assert ended["attempts"] == 2
        caches = client.kv_list("notes")
        assert [c["item_id"] for c in caches] == [ended["result"]["item_id"]]
        loaded = client.kv_get("notes", caches[0]["item_id"], backend)
        cont = backend.encode(" Question")
        fetched = logits_with_memory(backend, loaded, cont)
        assert (fetched - _full_logits(backend, loaded.token_ids, cont)).abs().max() < 1e-4
