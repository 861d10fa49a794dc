"""Parameter memory through a real daemon: train jobs, serving, the gate, forgetting, crashes.

Every training runs in the daemon's spawned worker process on a tiny Llama
that was warmed up on English prose (so the control-text guard means
something; see memosd.lora.testing).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from typer.testing import CliRunner, Result

from memosd.cli.main import app
from memosd.client import AsyncClient, Client, LoraAdapter
from memosd.engine import Engine
from memosd.errors import Conflict
from memosd.lora import LoraStore
from memosd.lora.dataset import encode_text, format_memory
from memosd.lora.testing import build_warm_tiny_llama
from memosd.models.backend import HFBackend
from memosd.models.testing import build_tiny_llama
from memosd.testing import DaemonHandle

pytestmark = pytest.mark.timeout(600)

MEMORIES = (
    "Alice's favourite colour is teal and she owns two cats named Pixel and Byte.",
    "The deadline for the Orion database migration is the 14th of March.",
    "Bob drinks green tea without sugar every afternoon at four.",
    "The staging database lives on host db-stage-3 in rack twelve.",
    "Carol runs the Tuesday reading group on distributed systems.",
    "The office wifi password rotates on the first Monday of each month.",
)
#: Every linear module of the 64-wide model, a high learning rate, few steps:
#: the adapter moves the logits, the gate only guards the control text.
QUICK: dict[str, Any] = {
    "rank": 16,
    "alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "learning_rate": 2e-2,
    "epochs": 3,
    "batch_size": 6,
    "control_max_tokens": 512,
    "min_memory_ppl_drop": 0.0,
    "torch_threads": 1,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Fingerprint sidecars of this process and of the daemons' workers."""
    cache = tmp_path_factory.mktemp("fingerprints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMOSD_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return build_warm_tiny_llama(tmp_path_factory.mktemp("models") / "warm-tiny")


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> HFBackend:
    return HFBackend.load(model_dir)


@pytest.fixture
def daemon(
    memosd_daemon_factory: Callable[..., DaemonHandle], cache_dir: Path
) -> Callable[..., DaemonHandle]:
    def start(**settings: Any) -> DaemonHandle:
        return memosd_daemon_factory(
            env={"MEMOSD_CACHE_DIR": str(cache_dir)},
            settings={"scheduler.tick_s": 3600, **settings},
        )

    return start


def _add_memories(client: Client, cube: str = "notes") -> list[str]:
    if cube not in {info.name for info in client.list_cubes()}:
        client.create_cube(cube)
    return [client.add(cube, text, tier="long").id for text in MEMORIES]


def _memctl(d: DaemonHandle, *args: str) -> Result:
    return CliRunner().invoke(
        app,
        list(args),
        env={"MEMOSD_SOCKET": str(d.socket), "MEMOSD_TOKEN": ""},
        catch_exceptions=False,
    )


def _json(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _logits(model: Any, backend: HFBackend, text: str = MEMORIES[0]) -> torch.Tensor:
    ids = torch.tensor([encode_text(backend.tokenizer, format_memory(text), 256)])
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def _wait_event(sub: Any, match: Callable[[Any], bool], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = sub.next_event(timeout=max(0.0, deadline - time.monotonic()))
        if event is not None and match(event):
            return event
    raise AssertionError("expected event did not arrive")


def _job_event(job_id: str, kind: str) -> Callable[[Any], bool]:
    return lambda e: e.kind == kind and e.job is not None and e.job.get("job") == job_id


def _wait_training_step(sub: Any, job_id: str) -> Any:
    """The first ``job_progress`` event of an optimiser step (the worker is training)."""
    progress = _job_event(job_id, "job_progress")
    return _wait_event(sub, lambda e: progress(e) and e.job["message"].startswith("step"))


def test_train_serve_gate_and_rollback(
    daemon: Callable[..., DaemonHandle], model_dir: Path, backend: HFBackend, tmp_path: Path
) -> None:
    d = daemon()
    with d.client() as c:
        c.create_cube("notes")
    with d.client(timeout=60.0) as c, c.subscribe("notes") as sub:
        ids = _add_memories(c)
        job = c.lora_train("notes", model_dir, settings={**QUICK, "epochs": 12})
        assert (job["kind"], job["state"], job["cube"]) == ("lora.train", "queued", "notes")
        assert job["args"]["from_tier"] == "long"

        # Progress reaches the feed while the worker trains; the daemon answers at once.
        step = _wait_training_step(sub, job["id"])
        assert "loss" in step.job["message"]
        assert "ETA" in step.job["message"]
        t0 = time.monotonic()
        c.ping()
        assert time.monotonic() - t0 < 1.0

        done = c.wait_job(job["id"], timeout=300)
        assert done["state"] == "succeeded", done
        result = done["result"]
        assert (result["outcome"], result["version"], result["active_version"]) == (
            "promoted",
            1,
            1,
        )
        assert result["evaluation"]["memory_drop"] > 0.0

        shown = c.lora_show("notes")
        assert shown["active_version"] == 1
        (v1,) = shown["versions"]
        assert v1["status"] == "active"
        assert sorted(i for i, _ in v1["trained_on"]) == sorted(ids)
        assert v1["settings"]["learning_rate"] == QUICK["learning_rate"]
        assert v1["base_fingerprint"] == backend.fingerprint

        adapter = c.lora_get("notes", backend=backend)
        assert isinstance(adapter, LoraAdapter)
        assert (adapter.version, adapter.status) == (1, "active")
        fetched = adapter.load(backend)
        adapter.save(tmp_path / "peft")

        # A model with another fingerprint is refused before anything is sent.
        other = HFBackend.load(build_tiny_llama(tmp_path / "other", seed=7))
        with pytest.raises(Conflict) as excinfo:
            c.lora_get("notes", backend=other)
        assert excinfo.value.reason == "fingerprint_mismatch"
        with pytest.raises(Conflict):
            adapter.load(other)

        # The promotion gate: an absurd learning rate wrecks the control text.
        bad = c.lora_train(
            "notes", model_dir, settings={**QUICK, "learning_rate": 10.0}, wait=True, timeout=300
        )
        assert bad["state"] == "succeeded", bad
        assert (bad["result"]["outcome"], bad["result"]["active_version"]) == ("rejected", 1)
        assert any("control" in r for r in bad["result"]["evaluation"]["reasons"])
        statuses = [(v["version"], v["status"]) for v in c.lora_show("notes")["versions"]]
        assert statuses == [(1, "active"), (2, "rejected")]
        assert c.lora_get("notes").version == 1  # the active one is still served

        rolled = c.lora_rollback("notes", 1)
        assert (rolled["version"], rolled["status"]) == (3, "active")
        assert c.lora_get("notes").sha256 == adapter.sha256

        # Several adapters for one request (peft weighted adapters, exact "cat" mix).
        first_only = c.lora_combine([("notes", 1), ("notes", 2)], [1.0, 0.0], backend)
        both = c.lora_combine([("notes", 1), ("notes", 2)], [1.0, 1.0], backend)
        torch.testing.assert_close(_logits(first_only, backend), _logits(fetched, backend))
        assert not torch.allclose(_logits(both, backend), _logits(fetched, backend))
    d.stop()

    # The adapter the client fetched is bit-for-bit the daemon's: same logits as
    # the in-process store on the daemon's data dir, and as peft's own loader.
    with Engine.open(d.data_dir) as engine:
        local = LoraStore(engine).load_adapter("notes", backend, version=1)
        assert torch.equal(_logits(fetched, backend), _logits(local, backend))
        assert not torch.equal(_logits(fetched, backend), _logits(backend.model, backend))
    from peft import PeftModel

    with warnings.catch_warnings():  # peft probes a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(backend.model), str(tmp_path / "peft"))
    assert torch.equal(_logits(reloaded, backend), _logits(fetched, backend))


def test_bad_requests_are_refused_before_queueing(
    daemon: Callable[..., DaemonHandle], model_dir: Path, tmp_path: Path
) -> None:
    from memosd.errors import BadRequest, NotFound

    d = daemon()
    with d.client() as c:
        _add_memories(c)
        with pytest.raises(BadRequest) as excinfo:
            c.lora_train("notes", model_dir, settings={"rnak": 4})
        assert "rank" in excinfo.value.message  # did you mean
        with pytest.raises(BadRequest):
            c.lora_train("notes", model_dir, settings={"learning_rate": -1})
        with pytest.raises(NotFound):
            c.lora_train("notes", tmp_path / "no-such-model")
        with pytest.raises(NotFound):
            c.lora_train("notes", model_dir, items=["nope"])
        with pytest.raises(NotFound):
            c.lora_show("nope")
        with pytest.raises(NotFound):
            c.lora_get("notes")
        with pytest.raises(NotFound):
            c.lora_retrain("notes")
        assert c.jobs(cube="notes", kind="lora.train") == []
        assert c.lora_show("notes")["versions"] == []
        c.ping()


def test_purge_makes_the_adapter_stale_and_a_retrain_forgets_it(
    daemon: Callable[..., DaemonHandle], model_dir: Path, backend: HFBackend, tmp_path: Path
) -> None:
    d = daemon()
    with d.client(timeout=60.0) as c:
        ids = _add_memories(c)
    # memctl follows the job (progress bar on stderr) and prints the ended job.
    first = _json(
        _memctl(
            d,
            "lora",
            "train",
            "notes",
            "--model",
            str(model_dir),
            "--rank",
            "16",
            "--alpha",
            "32",
            "--lr",
            "0.02",
            "--epochs",
            "3",
            "--batch-size",
            "6",
            "--target-modules",
            ",".join(QUICK["target_modules"]),
            "--set",
            "control_max_tokens=512",
            "--set",
            "min_memory_ppl_drop=0.0",
            "--set",
            "torch_threads=1",
            "--json",
        )
    )
    assert first["state"] == "succeeded", first
    assert first["result"]["outcome"] == "promoted", first
    assert first["args"]["settings"]["rank"] == 16
    shown = _memctl(d, "lora", "show", "notes")
    assert shown.exit_code == 0, shown.stdout
    assert "active" in shown.stdout, shown.stdout
    written = _json(_memctl(d, "lora", "get", "notes", "-o", str(tmp_path / "ad"), "--json"))
    assert written["version"] == 1
    assert (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size == written["bytes"]
    assert (tmp_path / "ad" / "adapter_config.json").exists()

    async def fetch() -> tuple[dict[str, Any], Any]:
        async with AsyncClient(d.socket, timeout=60) as ac:
            listed = await ac.lora_show("notes")
            model = await ac.lora_model("notes", backend)
            return listed, model

    listed, model = anyio.run(fetch)
    assert [v["status"] for v in listed["versions"]] == ["active"]
    assert hasattr(model, "peft_config")

    with d.client(timeout=60.0) as c:
        old_sha = first["result"]["sha256"]
        old_item = first["result"]["item_id"]
        assert (d.data_dir / "blobs").exists()

        forgotten = ids[2]
        c.purge("notes", forgotten, reason="user asked")
        # The scheduler queues the retraining by itself.
        deadline = time.monotonic() + 60
        retrains: list[dict[str, Any]] = []
        while not retrains and time.monotonic() < deadline:
            retrains = c.jobs(cube="notes", kind="lora.retrain")
            time.sleep(0.05)
        assert len(retrains) == 1, retrains
        done = c.wait_job(retrains[0]["id"], timeout=300)
        assert done["state"] == "succeeded", done
        result = done["result"]
        assert result["outcome"] == "promoted"
        assert result["dropped_versions"] == [1]
        assert result["replaced_item"] == old_item

        shown = c.lora_show("notes")
        assert not shown["stale"]
        (only,) = shown["versions"]
        assert only["status"] == "active"
        trained = {i for i, _ in only["trained_on"]}
        assert forgotten not in trained
        assert trained == set(ids) - {forgotten}
        assert only["sha256"] != old_sha
        assert c.lora_get("notes").sha256 == only["sha256"]
        # Nothing else is stale: a manual retrain has nothing to do.
        again = c.lora_retrain("notes", wait=True, timeout=120)
        assert again["result"]["outcome"] == "up_to_date"
        assert c.lora_forget("notes")["dropped_versions"] == []
    d.stop()
    with Engine.open(d.data_dir) as engine:
        assert not engine.blobs.exists(old_sha)  # the stale weights are erased
        assert engine.blobs.exists(only["sha256"])


def _adapter_state(c: Client) -> list[tuple[int, str]]:
    """Every visible adapter version must be complete: its blob readable and well-formed."""
    seen = []
    for v in c.lora_show("notes")["versions"]:
        if v["status"] == "stale":
            continue
        adapter = c.lora_get("notes", v["version"])
        assert adapter.sha256 == v["sha256"]
        assert len(adapter.data) == v["size"]
        seen.append((v["version"], v["sha256"]))
    return seen


def test_cancel_and_sigkill_during_training(
    daemon: Callable[..., DaemonHandle], model_dir: Path
) -> None:
    d = daemon()
    with d.client() as c:
        c.create_cube("notes")
    with d.client(timeout=60.0) as c, c.subscribe("notes") as sub:
        _add_memories(c)
        # A cancelled training stops its worker and writes nothing.
        cancelled = c.lora_train("notes", model_dir, settings={**QUICK, "epochs": 200})
        _wait_training_step(sub, cancelled["id"])
        c.cancel_job(cancelled["id"])
        _wait_event(sub, _job_event(cancelled["id"], "job_cancelled"))
        assert c.job(cancelled["id"])["state"] == "cancelled"
        assert _adapter_state(c) == []

        job = c.lora_train("notes", model_dir, settings={**QUICK, "epochs": 200})
        _wait_training_step(sub, job["id"])
        assert _adapter_state(c) == []
    d.restart(kill=True)  # SIGKILL mid-training: the worker stops by itself
    with d.client(timeout=60.0) as c:
        deadline = time.monotonic() + 300
        while True:
            # At no point is an incomplete adapter visible: at most one version, whole.
            assert len(_adapter_state(c)) <= 1
            final = c.job(job["id"])
            if final["terminal"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert final["state"] == "succeeded", final
        # Interrupted once, then run again (a loaded machine may see one more
        # retryable failure, e.g. the killed daemon's worker still exiting).
        assert final["attempts"] >= 2
        versions = _adapter_state(c)
        assert [v for v, _ in versions] == [1]  # exactly one adapter version
        assert versions[0][1] == final["result"]["sha256"]
        assert [j["state"] for j in c.jobs(cube="notes", kind="lora.train")] == [
            "succeeded",
            "cancelled",
        ]
    d.stop()
    with Engine.open(d.data_dir) as engine:
        store = LoraStore(engine)
        for version in store.versions("notes"):
            assert engine.blobs.exists(version.sha256)
