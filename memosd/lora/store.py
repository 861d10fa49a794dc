"""Parameter memory: a cube's LoRA adapter as a versioned memory item.

Storage layout
--------------
Each cube has (at most) one *adapter item*: form ``parameter``, tier
``long``, tag ``lora``, ``metadata["lora"]["kind"] == "cube_adapter"``.
Every training writes a new version of it:

* ``payload["blobs"]["adapter"]`` - sha256 of the adapter blob in the
  engine's content-addressed blob store (:mod:`memosd.lora.adapter` format).
  The engine reference-counts blobs over all stored versions.
* ``payload["manifest"]`` - ``memosd-lora-manifest/1``: base model
  fingerprint, path and dtype; the ``(item id, version)`` pairs trained on
  (plus the skipped ones and why); the template, seed and token count; every
  hyperparameter; the (downsampled) loss curve and training throughput; the
  evaluation report; the gate verdict; the blob's sha, size and parameter
  count.
* ``metadata["lora"]`` - the small, listable part: ``gate`` (``passed`` |
  ``rejected``), ``base_fingerprint``, ``items`` (count), lineage markers.
* ``text`` - a one-line human summary.

Which version is served
-----------------------
The *active* adapter is the newest version whose gate passed and which is not
stale.  Nothing is written to "activate" a version, so a crash can never
leave two active versions or none by accident; a rejected adapter is simply a
newer version that is skipped, and the previous active one stays active.
Rollback is the engine's item rollback: it writes a new version equal to an
old one -- including its gate verdict, so rolling back to a rejected
version does not activate it.

Forgetting
----------
A version is *stale* when an item it was trained on has been purged (derived
from the manifest and the cube's purge records, so it needs no write and
survives crashes).  The engine listener only notes purges so that the
scheduler can be told quickly (``on_stale``); stale versions are never served
(unless ``allow_stale=True``) nor rolled back to.

The engine can only erase a whole item, and a blob file goes when its last
referencing version goes.  So :meth:`LoraStore.retrain_stale` (and
:meth:`LoraStore.forget_stale`) *rewrite the lineage*: they train without the
purged items, then write a new adapter item holding copies of the non-stale
versions (same blobs: their counts stay above zero) followed by the new
adapter, and purge the old item -- which takes every stale blob's count to
zero, so the engine deletes those files.  All of it is one atomic engine step
(``Engine.atomic``): a crash leaves either the old lineage or the new one.
The adapter item therefore gets a new id after a forget; version numbers
restart.  Copied versions carry ``lineage_of=<old id>`` and the final one
``replaces=<old id>``; should two adapter items ever coexist (an import, two
concurrent first trainings), the next access resolves them: an item that
``replaces`` another wins, a partial copy (``lineage_of`` without
``replaces``) loses, otherwise the newest wins.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from memosd.engine import ChangeEvent, Engine
from memosd.errors import BadRequest, Conflict, NotFound
from memosd.lora.adapter import (
    attach_adapter,
    check_fingerprint,
    combine_adapters,
    decode_adapter,
)
from memosd.lora.dataset import TrainingSet, build_training_set
from memosd.lora.evaluate import EvaluationReport
from memosd.lora.settings import LoraSettings
from memosd.lora.train import CancelToken, ProgressCallback, TrainingOutput, run_training
from memosd.memcube.model import MemoryItem, Status

__all__ = [
    "ADAPTER_KIND",
    "MANIFEST_FORMAT",
    "AdapterVersion",
    "LineageRewrite",
    "LoraResult",
    "LoraStore",
    "PreparedRetrain",
    "PreparedTraining",
    "StagedAdapter",
]

MANIFEST_FORMAT: Final = "memosd-lora-manifest/1"
ADAPTER_KIND: Final = "cube_adapter"
ADAPTER_TAG: Final = "lora"
_LOSS_POINTS: Final = 256
_PAGE: Final = 500


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One version of a cube's adapter, as ``memctl lora show`` lists it."""

    cube: str
    item_id: str
    version: int
    recorded_us: int
    operation: str
    gate: str
    active: bool
    stale: bool
    purged_items: tuple[str, ...]
    sha256: str
    size: int
    base_fingerprint: str
    trained_on: tuple[tuple[str, int], ...]
    evaluation: dict[str, Any]
    settings: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def passed(self) -> bool:
        return self.gate == "passed"

    def to_dict(self, *, with_manifest: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cube": self.cube,
            "item_id": self.item_id,
            "version": self.version,
            "recorded_us": self.recorded_us,
            "operation": self.operation,
            "gate": self.gate,
            "active": self.active,
            "stale": self.stale,
            "purged_items": list(self.purged_items),
            "sha256": self.sha256,
            "size": self.size,
            "base_fingerprint": self.base_fingerprint,
            "items": len(self.trained_on),
            "evaluation": self.evaluation,
        }
        if with_manifest:
            out["manifest"] = self.manifest
        return out


@dataclass(frozen=True, slots=True)
class PreparedTraining:
    """Stage 1 of a training: the cube, the settings and the selected samples."""

    cube: str
    settings: LoraSettings
    training_set: TrainingSet


@dataclass(frozen=True, slots=True)
class StagedAdapter:
    """Stage 3: a durable blob and the content of the version that will reference it."""

    cube: str
    payload: dict[str, Any]
    metadata: dict[str, Any]
    text: str
    item_id: str | None
    expected_version: int | None


@dataclass(frozen=True, slots=True)
class PreparedRetrain:
    """A retraining without purged items: the old adapter item and what to train on.

    ``training`` is None when no trainable item is left (the stale versions
    are only forgotten).
    """

    cube: str
    old_item_id: str
    purged: frozenset[str]
    training: PreparedTraining | None


@dataclass(frozen=True, slots=True)
class LineageRewrite:
    """What :meth:`LoraStore.write_lineage` did: dropped versions, the old item, the new
    item's last version (None if nothing was kept)."""

    dropped: tuple[int, ...]
    replaced_item: str
    item: MemoryItem | None


@dataclass(frozen=True, slots=True)
class LoraResult:
    """What a training did.  ``outcome``: promoted | rejected | cancelled."""

    cube: str
    outcome: str
    adapter: AdapterVersion | None
    report: EvaluationReport | None
    active_version: int | None
    tokens_per_s: float = 0.0
    steps: int = 0
    #: Versions dropped from the lineage by a forget (``retrain_stale``).
    dropped_versions: tuple[int, ...] = ()
    replaced_item: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cube": self.cube,
            "outcome": self.outcome,
            "adapter": None if self.adapter is None else self.adapter.to_dict(),
            "report": None if self.report is None else self.report.to_dict(),
            "active_version": self.active_version,
            "tokens_per_s": self.tokens_per_s,
            "steps": self.steps,
            "dropped_versions": list(self.dropped_versions),
            "replaced_item": self.replaced_item,
        }


def _lora_meta(item: MemoryItem) -> dict[str, Any]:
    meta = item.metadata.get("lora")
    return meta if isinstance(meta, dict) else {}


def _is_adapter_item(item: MemoryItem) -> bool:
    return item.form == "parameter" and _lora_meta(item).get("kind") == ADAPTER_KIND


def _manifest(item: MemoryItem) -> dict[str, Any]:
    payload = item.payload or {}
    manifest = payload.get("manifest")
    return manifest if isinstance(manifest, dict) else {}


def _trained_pairs(manifest: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple((str(p[0]), int(p[1])) for p in manifest.get("items", ()))


def _downsample(values: Sequence[float], points: int) -> list[float | None]:
    if len(values) > points:
        stride = len(values) / points
        picked = [values[int(i * stride)] for i in range(points - 1)] + [values[-1]]
    else:
        picked = list(values)
    return [v if math.isfinite(v) else None for v in picked]


class LoraStore:
    """Train, version, gate, serve and forget the LoRA adapters of cubes.

    Thread-safe as far as the engine is; callers (the scheduler) run at most
    one training per cube at a time -- two concurrent trainings of one cube
    make the second write fail with :class:`Conflict` (stale version).

    ``on_stale(cube, item_id)`` is called from the engine's writer thread
    after every purge in a cube that has an adapter item *candidate* (it must
    be quick and must not call the engine): the scheduler's cue to run
    :meth:`retrain_stale`.  :meth:`stale_cubes` tells which cubes really have
    stale versions.
    """

    def __init__(
        self, engine: Engine, *, on_stale: Callable[[str, str], None] | None = None
    ) -> None:
        self.engine = engine
        self._on_stale = on_stale
        self._lock = threading.Lock()
        self._purged_cubes: set[str] = set()
        engine.add_listener(self._on_change)

    # ------------------------------------------------------------ listener

    def _on_change(self, event: ChangeEvent) -> None:
        if event.kind != "item_purged" or event.cube is None or event.item_id is None:
            return
        with self._lock:
            self._purged_cubes.add(event.cube)
        if self._on_stale is not None:
            with contextlib.suppress(Exception):
                self._on_stale(event.cube, event.item_id)

    def stale_cubes(self, *, rescan: bool = False) -> set[str]:
        """Cubes whose adapter has stale versions (those noted by purges since the
        last call; every cube with ``rescan=True``, e.g. at start-up)."""
        with self._lock:
            candidates = set(self._purged_cubes)
            self._purged_cubes.clear()
        if rescan:
            candidates |= {c.name for c in self.engine.list_cubes()}
        return {cube for cube in candidates if self._has_stale(cube)}

    def _has_stale(self, cube: str) -> bool:
        try:
            return any(v.stale for v in self.versions(cube))
        except NotFound:
            return False

    # ------------------------------------------------------------ reading

    def adapter_item(self, cube: str) -> MemoryItem | None:
        """Latest version of the cube's adapter item (None if it has none)."""
        found = self._adapter_items(cube)
        live = [it for it in found if it.status != Status.DELETED]
        if not live:
            return None
        if len(live) > 1:
            self._repair_lineage(cube, live)
            return self.adapter_item(cube)
        return live[0]

    def _adapter_items(self, cube: str) -> list[MemoryItem]:
        items = self.engine.iter_items(cube, status=None, form="parameter", page=_PAGE)
        return [it for it in items if _is_adapter_item(it)]

    def _purged_ids(self, cube: str) -> set[str]:
        return {record.id for record in self.engine.purges(cube)}

    def versions(self, cube: str) -> list[AdapterVersion]:
        """Every version of the cube's adapter, oldest first (empty if none)."""
        item = self.adapter_item(cube)
        if item is None:
            return []
        purged = self._purged_ids(cube)
        history = [v for v in self.engine.history(cube, item.id) if v.payload and _manifest(v)]
        described = [self._describe(v, purged, active=False) for v in history]
        active = next((d.version for d in reversed(described) if d.passed and not d.stale), None)
        return [
            self._describe(v, purged, active=v.version == active) if v.version == active else d
            for v, d in zip(history, described, strict=True)
        ]

    def _describe(self, item: MemoryItem, purged: set[str], *, active: bool) -> AdapterVersion:
        manifest = _manifest(item)
        pairs = _trained_pairs(manifest)
        gone = tuple(sorted({i for i, _ in pairs if i in purged}))
        blobs = (item.payload or {}).get("blobs") or {}
        return AdapterVersion(
            cube=item.cube,
            item_id=item.id,
            version=item.version,
            recorded_us=item.recorded_us,
            operation=item.provenance.operation,
            gate=str(_lora_meta(item).get("gate", "rejected")),
            active=active,
            stale=bool(gone),
            purged_items=gone,
            sha256=str(blobs.get("adapter", "")),
            size=int(manifest.get("adapter", {}).get("bytes", 0)),
            base_fingerprint=str(manifest.get("base_fingerprint", "")),
            trained_on=pairs,
            evaluation=dict(manifest.get("evaluation", {})),
            settings=dict(manifest.get("settings", {})),
            manifest=manifest,
        )

    def active(self, cube: str) -> AdapterVersion | None:
        """The version served by default (newest passed, non-stale), or None."""
        return next((v for v in self.versions(cube) if v.active), None)

    def version(self, cube: str, version: int | None = None) -> AdapterVersion:
        """One version (the active one when ``version`` is None); :class:`NotFound`."""
        versions = self.versions(cube)
        if not versions:
            raise NotFound(f"cube {cube!r} has no LoRA adapter", reason="no_adapter")
        if version is None:
            found = next((v for v in versions if v.active), None)
            if found is None:
                raise NotFound(
                    f"cube {cube!r} has no active LoRA adapter (all versions rejected or stale)",
                    reason="no_active_adapter",
                )
            return found
        found = next((v for v in versions if v.version == version), None)
        if found is None:
            raise NotFound(f"cube {cube!r} has no adapter version {version}", reason="version")
        return found

    def adapter_bytes(
        self, cube: str, *, version: int | None = None, allow_stale: bool = False
    ) -> tuple[bytes, AdapterVersion]:
        """The blob bytes of a version (for the client library's frames) and its description."""
        chosen = self.version(cube, version)
        if chosen.stale and not allow_stale:
            raise Conflict(
                f"adapter version {chosen.version} of cube {cube!r} was trained on purged "
                f"items {list(chosen.purged_items)}; it must be retrained",
                reason="stale",
            )
        return self.engine.blobs.read(chosen.sha256), chosen

    # ------------------------------------------------------------ serving

    def load_adapter(
        self,
        cube: str,
        backend: Any,
        *,
        version: int | None = None,
        allow_stale: bool = False,
        into: Any = None,
        adapter_name: str = "default",
    ) -> Any:
        """A peft model of ``backend``'s model with the cube's adapter loaded.

        The backend's own model is never modified: the adapter goes into a deep
        copy, or into ``into`` (a model or ``PeftModel`` the caller owns).
        :class:`Conflict` (reason ``fingerprint_mismatch``) if the adapter was
        trained on another base model, (reason ``stale``) if it was trained on
        purged items.
        """
        chosen = self.version(cube, version)
        check_fingerprint(chosen.base_fingerprint, backend.fingerprint)
        data, _ = self.adapter_bytes(cube, version=chosen.version, allow_stale=allow_stale)
        model = into if into is not None else copy.deepcopy(backend.model)
        return attach_adapter(
            model,
            decode_adapter(data),
            model_fingerprint=backend.fingerprint,
            adapter_name=adapter_name,
        )

    def combine(
        self,
        sources: Sequence[str | tuple[str, int]],
        weights: Sequence[float],
        backend: Any,
        *,
        combination_type: str = "cat",
        adapter_name: str = "combined",
    ) -> Any:
        """One peft model serving a weighted combination of several cubes' adapters.

        ``sources`` are cube names (their active adapter) or ``(cube, version)``.
        ``combination_type="cat"`` (default) is exact: the combined update is
        ``sum(w_i * B_i A_i)`` at rank ``sum(r_i)``; peft's other types
        (``"linear"``, ``"svd"``...) are passed through.
        """
        if len(sources) != len(weights):
            raise BadRequest("combine needs one weight per adapter")
        blobs = []
        for source in sources:
            cube, version = (source, None) if isinstance(source, str) else source
            chosen = self.version(cube, version)
            data, _ = self.adapter_bytes(cube, version=chosen.version)
            blobs.append(decode_adapter(data))
        return combine_adapters(
            blobs,
            weights,
            backend.model,
            model_fingerprint=backend.fingerprint,
            combination_type=combination_type,
            adapter_name=adapter_name,
        )

    # ------------------------------------------------------------ training

    def items_for_training(
        self, cube: str, *, tier: str | None = "long", item_ids: Iterable[str] | None = None
    ) -> list[MemoryItem]:
        """Current versions of the given items, or every active plaintext item of ``tier``."""
        if item_ids is not None:
            return [self.engine.get(cube, item_id) for item_id in item_ids]
        return list(self.engine.iter_items(cube, tier=tier, form="plaintext", page=_PAGE))

    def train(
        self,
        cube: str,
        items: Iterable[MemoryItem],
        backend: Any,
        settings: LoraSettings | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        actor: str | None = None,
        in_process: bool = False,
    ) -> LoraResult:
        """Train an adapter on ``items`` (their versions as given), gate it, store it.

        Training runs in a spawned worker process unless ``in_process``.  The
        result is a new version of the cube's adapter item, promoted (active)
        if the gate passed and kept as ``rejected`` otherwise.  A cancelled
        run writes nothing (``outcome == "cancelled"``).
        """
        prepared = self.prepare(cube, items, backend, settings)
        output = self.run(
            prepared, backend, progress=progress, cancel=cancel, in_process=in_process
        )
        if output.adapter is None or output.report is None:
            return LoraResult(cube, "cancelled", None, None, self._active_version(cube))
        staged = self.stage(prepared, backend, output)
        item = self.write(staged, actor=actor)
        return self._result(cube, item, output)

    # The stages of :meth:`train`, for a job handler that commits the final
    # write together with its own job transition (``JobContext.commit``):
    #   prepared = store.prepare(...)            # reads, cheap
    #   output = store.run(prepared, backend, progress=..., cancel=...)   # worker process
    #   staged = store.stage(prepared, backend, output)   # blob made durable
    #   item = ctx.commit(lambda planner: store.write(staged, writer=planner))
    #   result = store.result(cube, item, output)

    def prepare(
        self,
        cube: str,
        items: Iterable[MemoryItem],
        backend: Any,
        settings: LoraSettings | None = None,
    ) -> PreparedTraining:
        """Select and template the training samples (:class:`BadRequest` if none)."""
        settings = settings or LoraSettings()
        self.engine.get_cube(cube)
        training_set = build_training_set(items, backend.tokenizer, settings)
        if not training_set.samples:
            raise BadRequest(f"no trainable memory items for cube {cube!r}", reason="no_items")
        return PreparedTraining(cube, settings, training_set)

    def run(
        self,
        prepared: PreparedTraining,
        backend: Any,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        in_process: bool = False,
        fingerprint_cache_dir: str | Path | None = None,
    ) -> TrainingOutput:
        """Train and evaluate (worker process unless ``in_process``); writes nothing."""
        return run_training(
            backend,
            [s.text for s in prepared.training_set.samples],
            prepared.settings,
            progress=progress,
            cancel=cancel,
            in_process=in_process,
            fingerprint_cache_dir=fingerprint_cache_dir,
        )

    def stage(
        self, prepared: PreparedTraining, backend: Any, output: TrainingOutput
    ) -> StagedAdapter:
        """Make the adapter blob durable and build the version's content (no WAL write)."""
        payload, metadata, text = self._version_content(
            prepared.cube, backend, prepared.settings, prepared.training_set, output
        )
        current = self.adapter_item(prepared.cube)
        return StagedAdapter(
            cube=prepared.cube,
            payload=payload,
            metadata=metadata,
            text=text,
            item_id=None if current is None else current.id,
            expected_version=None if current is None else current.version,
        )

    def write(
        self, staged: StagedAdapter, *, writer: Any = None, actor: str | None = None
    ) -> MemoryItem:
        """Write the staged version through ``writer`` (the engine, or a job's planner).

        :class:`Conflict` if the adapter item changed since :meth:`stage`.
        """
        target: Any = self.engine if writer is None else writer
        if staged.item_id is None:
            item: MemoryItem = target.add(
                staged.cube,
                staged.text,
                actor=actor,
                form="parameter",
                tier="long",
                tags=(ADAPTER_TAG,),
                source="memosd.lora",
                metadata=staged.metadata,
                payload=staged.payload,
                importance=1.0,
            )
            return item
        updated: MemoryItem = target.update(
            staged.cube,
            staged.item_id,
            actor=actor,
            expected_version=staged.expected_version,
            operation="consolidate",
            text=staged.text,
            metadata=staged.metadata,
            payload=staged.payload,
        )
        return updated

    def result(self, cube: str, item: MemoryItem, output: TrainingOutput) -> LoraResult:
        """The :class:`LoraResult` of a written version."""
        return self._result(cube, item, output)

    def _result(
        self,
        cube: str,
        item: MemoryItem,
        output: TrainingOutput,
        *,
        dropped: tuple[int, ...] = (),
        replaced: str | None = None,
    ) -> LoraResult:
        versions = self.versions(cube)
        mine = next(v for v in versions if v.version == item.version)
        active = next((v.version for v in versions if v.active), None)
        return LoraResult(
            cube=cube,
            outcome="promoted" if mine.passed else "rejected",
            adapter=mine,
            report=output.report,
            active_version=active,
            tokens_per_s=output.tokens_per_s,
            steps=output.steps,
            dropped_versions=dropped,
            replaced_item=replaced,
        )

    def _active_version(self, cube: str) -> int | None:
        active = self.active(cube)
        return None if active is None else active.version

    def _version_content(
        self,
        cube: str,
        backend: Any,
        settings: LoraSettings,
        training_set: TrainingSet,
        output: TrainingOutput,
    ) -> tuple[dict[str, Any], dict[str, Any], str]:
        assert output.adapter is not None
        assert output.report is not None
        adapter = output.adapter
        report = output.report
        blob = decode_adapter(adapter)  # also proves the worker's bytes are well-formed
        sha = self.engine.blobs.put_bytes(adapter)  # durable before the WAL record below
        gate = "passed" if report.passed else "rejected"
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "base_fingerprint": backend.fingerprint,
            "base_model": {"path": str(backend.path), "dtype": str(backend.dtype)},
            **training_set.to_manifest(),
            "settings": settings.to_dict(),
            "training": {
                "steps": output.steps,
                "tokens": output.tokens,
                "seconds": output.train_seconds,
                "tokens_per_s": output.tokens_per_s,
                "diverged": output.diverged,
                "loss_curve": _downsample(output.loss_curve, _LOSS_POINTS),
            },
            "evaluation": report.to_dict(),
            "gate": gate,
            "adapter": {"sha256": sha, "bytes": len(adapter), "parameters": blob.parameters},
        }
        metadata = {
            "lora": {
                "kind": ADAPTER_KIND,
                "gate": gate,
                "base_fingerprint": backend.fingerprint,
                "items": len(training_set.samples),
            }
        }
        text = (
            f"LoRA adapter of cube {cube}: {len(training_set.samples)} memories, gate {gate} "
            f"(memory perplexity {_pct(-report.memory_drop)}, "
            f"control text {_pct(report.control_rise)}), base model {backend.fingerprint[:12]}"
        )
        return {"blobs": {"adapter": sha}, "manifest": manifest}, metadata, text

    # ------------------------------------------------------------ rollback

    def rollback(self, cube: str, version: int, *, actor: str | None = None) -> AdapterVersion:
        """Write a new version equal to ``version`` (its gate verdict included).

        Refused for a stale version (:class:`Conflict`, reason ``stale``):
        rolling back must not bring purged memories back.
        """
        target = self.version(cube, version)
        if target.stale:
            raise Conflict(
                f"adapter version {version} of cube {cube!r} is stale (trained on purged items)",
                reason="stale",
            )
        item = self.engine.rollback(cube, target.item_id, version, actor=actor)
        return next(v for v in self.versions(cube) if v.version == item.version)

    # ------------------------------------------------------------ forgetting

    def retrain_stale(
        self,
        cube: str,
        backend: Any,
        settings: LoraSettings | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        actor: str | None = None,
        in_process: bool = False,
    ) -> LoraResult | None:
        """Retrain the cube's adapter without its purged items, then forget the stale versions.

        None if nothing is stale.  The training set is the newest version's
        items minus the purged ones, each at its current version (items deleted
        since are left out too); the settings default to that version's.  If no
        item is left, the stale versions are forgotten without training
        (outcome ``"forgotten"``).  A cancelled retraining changes nothing.
        """
        retrain = self.prepare_retrain(cube, backend, settings)
        if retrain is None:
            return None
        if retrain.training is None:
            rewrite = self.write_lineage(retrain, None, actor=actor)
            return self.forgotten_result(cube, rewrite.dropped, rewrite.replaced_item)
        output = self.run(
            retrain.training, backend, progress=progress, cancel=cancel, in_process=in_process
        )
        if output.adapter is None or output.report is None:
            return LoraResult(cube, "cancelled", None, None, self._active_version(cube))
        content = self.stage_content(retrain.training, backend, output)
        rewrite = self.write_lineage(retrain, content, actor=actor)
        assert rewrite.item is not None
        return self._result(
            cube, rewrite.item, output, dropped=rewrite.dropped, replaced=rewrite.replaced_item
        )

    def forget_stale(self, cube: str, *, actor: str | None = None) -> tuple[int, ...]:
        """Drop the stale versions now, without retraining; returns their numbers."""
        if not any(v.stale for v in self.versions(cube)):
            return ()
        old = self.adapter_item(cube)
        assert old is not None
        retrain = PreparedRetrain(cube, old.id, frozenset(self._purged_ids(cube)), None)
        return self.write_lineage(retrain, None, actor=actor).dropped

    # The stages of :meth:`retrain_stale`, for a job handler that commits the
    # lineage rewrite together with its own job transition:
    #   retrain = store.prepare_retrain(cube, backend)      # None: nothing stale
    #   output = store.run(retrain.training, backend, ...)   # unless training is None
    #   content = store.stage_content(retrain.training, backend, output)  # blob durable
    #   ctx.commit(lambda planner: store.write_lineage(retrain, content, writer=planner))

    def prepare_retrain(
        self, cube: str, backend: Any, settings: LoraSettings | None = None
    ) -> PreparedRetrain | None:
        """What a retraining without the purged items would train on (None: nothing stale).

        ``training`` is None when no trainable item is left (forget only).
        """
        versions = self.versions(cube)
        if not any(v.stale for v in versions):
            return None
        newest = versions[-1]
        if settings is None:
            settings = LoraSettings.from_mapping(newest.settings)
        purged = frozenset(self._purged_ids(cube))
        items = [self._current(cube, i) for i, _ in newest.trained_on if i not in purged]
        live = [it for it in items if it is not None]
        training: PreparedTraining | None = None
        if live:
            training_set = build_training_set(live, backend.tokenizer, settings)
            if training_set.samples:
                training = PreparedTraining(cube, settings, training_set)
        return PreparedRetrain(cube, newest.item_id, purged, training)

    def stage_content(
        self, prepared: PreparedTraining, backend: Any, output: TrainingOutput
    ) -> tuple[dict[str, Any], dict[str, Any], str]:
        """Make the adapter blob durable; the (payload, metadata, text) of its version."""
        return self._version_content(
            prepared.cube, backend, prepared.settings, prepared.training_set, output
        )

    def forgotten_result(
        self, cube: str, dropped: tuple[int, ...], replaced: str | None
    ) -> LoraResult:
        """The result of a forget without retraining (outcome ``"forgotten"``)."""
        return LoraResult(
            cube, "forgotten", None, None, self._active_version(cube), 0.0, 0, dropped, replaced
        )

    def _current(self, cube: str, item_id: str) -> MemoryItem | None:
        try:
            item = self.engine.get(cube, item_id)
        except NotFound:
            return None
        return item if item.status == Status.ACTIVE else None

    def write_lineage(
        self,
        retrain: PreparedRetrain,
        final: tuple[dict[str, Any], dict[str, Any], str] | None,
        *,
        writer: Any = None,
        actor: str | None = None,
    ) -> LineageRewrite:
        """Copy the non-stale versions (+ ``final``) into a new item, purge the old one.

        One atomic step: through ``writer`` (a planner, e.g. inside a job's
        ``commit``) or its own ``engine.atomic``.  The versions to keep are read
        inside that step, so a version written meanwhile (a rollback) is kept
        too.  :class:`Conflict` (reason ``lineage_changed``) if the old item is
        gone (another forget won).
        """
        cube, old_id, purged = retrain.cube, retrain.old_item_id, retrain.purged

        def rewrite(planner: Any) -> LineageRewrite:
            # Copies first, then the purge: a kept blob's count never touches zero.
            try:
                history = planner.history(cube, old_id)
            except NotFound:
                raise Conflict(
                    f"the adapter item {old_id} of cube {cube!r} is gone", reason="lineage_changed"
                ) from None
            if history[-1].status == Status.DELETED:
                raise Conflict(
                    f"the adapter item {old_id} of cube {cube!r} is deleted",
                    reason="lineage_changed",
                )
            keep: list[tuple[dict[str, Any], dict[str, Any], str]] = []
            dropped: list[int] = []
            for version in history:
                if not version.payload or not _manifest(version):
                    continue  # tombstones carry nothing worth keeping
                if any(i in purged for i, _ in _trained_pairs(_manifest(version))):
                    dropped.append(version.version)
                else:
                    keep.append((version.payload, version.metadata, version.text))
            steps = [*keep, *([final] if final is not None else [])]
            new_id: str | None = None
            item: MemoryItem | None = None
            expected = 0
            for index, (payload, metadata, text) in enumerate(steps):
                lora = dict(metadata.get("lora", {}))
                lora.pop("replaces", None)
                lora["lineage_of"] = old_id
                if index == len(steps) - 1:
                    lora["replaces"] = old_id
                meta = {**metadata, "lora": lora}
                if new_id is None:
                    item = planner.add(
                        cube,
                        text,
                        actor=actor,
                        form="parameter",
                        tier="long",
                        tags=(ADAPTER_TAG,),
                        source="memosd.lora",
                        metadata=meta,
                        payload=payload,
                        importance=1.0,
                    )
                    new_id = item.id
                else:
                    item = planner.update(
                        cube,
                        new_id,
                        actor=actor,
                        expected_version=expected,
                        operation="consolidate",
                        text=text,
                        metadata=meta,
                        payload=payload,
                    )
                expected = item.version
            planner.purge(
                cube, old_id, actor=actor, reason="lora: stale adapter versions forgotten"
            )
            return LineageRewrite(tuple(dropped), old_id, item)

        if writer is not None:
            return rewrite(writer)
        result: LineageRewrite = self.engine.atomic(rewrite)
        return result

    def _repair_lineage(self, cube: str, live: list[MemoryItem]) -> None:
        """Finish or undo a lineage rewrite a crash interrupted (see module docstring)."""
        ids = {it.id for it in live}
        for item in live:
            meta = _lora_meta(item)
            replaces = meta.get("replaces")
            lineage_of = meta.get("lineage_of")
            if isinstance(replaces, str) and replaces in ids:
                self._purge_quietly(cube, replaces, "lora: finish an interrupted lineage rewrite")
            elif isinstance(lineage_of, str) and lineage_of in ids:
                self._purge_quietly(cube, item.id, "lora: undo an interrupted lineage rewrite")
        if len([it for it in self._adapter_items(cube) if it.status != Status.DELETED]) > 1:
            # Not a rewrite of ours (e.g. two concurrent first trainings): keep the newest.
            newest = max(live, key=lambda it: (it.recorded_us, it.id))
            for item in live:
                if item.id != newest.id:
                    self._purge_quietly(cube, item.id, "lora: duplicate adapter item")

    def _purge_quietly(self, cube: str, item_id: str, reason: str) -> None:
        with contextlib.suppress(NotFound):
            self.engine.purge(cube, item_id, reason=reason)


def _pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.0%}"
