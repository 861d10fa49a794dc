"""Parameter memory in the daemon: LoRA jobs, ops and automatic retraining.

Ops (registered by the import at the bottom of :mod:`memosd.service`):

* ``lora_train`` - queue a durable ``lora.train`` job (cube, model directory,
  ``from_tier`` or ``items``, hyperparameter overrides); with ``wait``, reply
  when it ended.
* ``lora_show`` - the adapter's versions: status (active, rejected, stale,
  superseded), the items each was trained on, metrics; one version in full.
* ``lora_get`` - one version's adapter blob as an extra frame, its manifest
  in the result; refused with ``Conflict(fingerprint_mismatch)`` when the
  caller's model has another fingerprint, ``Conflict(stale)`` for a stale one.
* ``lora_rollback`` - a new version equal to an older one.
* ``lora_retrain`` - queue a ``lora.retrain`` job: retrain without the purged
  items and forget the stale versions (their blobs are deleted).
* ``lora_forget`` - forget the stale versions now, without retraining.

Jobs run on the scheduler's runner (:class:`LoraRuntime.handlers`).  A job's
worker thread loads the model through the daemon's model cache (tokenizer and
fingerprint), and the training itself runs in a spawned worker process
(:func:`memosd.lora.train.run_training`), so neither the request loop nor the
GIL of the daemon is held by it.  Progress (step, loss, ETA) goes to
``JobContext.progress`` and so to the change feed as ``job_progress``;
``job_cancel`` stops the worker before its next optimiser step.  The adapter
blob is made durable first, then the new version is written in the job's
``commit`` together with its success: a crash at any point leaves either no
version (the job runs again after restart) or the complete one.

Forgetting: the :class:`~memosd.lora.store.LoraStore` engine listener notes
every purge; a watcher thread (not the engine's writer thread) checks which
cubes now have stale adapter versions and queues one ``lora.retrain`` job per
cube (deduplicated), also once at start-up for purges a crash interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import structlog

from memosd.errors import BadRequest, Conflict, NotFound, Unavailable
from memosd.lora.adapter import check_fingerprint
from memosd.lora.settings import LoraSettings
from memosd.lora.store import AdapterVersion, LoraStore, PreparedTraining, StagedAdapter
from memosd.lora.train import TrainingProgress
from memosd.memcube.model import MemoryItem
from memosd.models.backend import resolve_dtype
from memosd.protocol import FRAME_KEY, Reply
from memosd.scheduler import jobs
from memosd.scheduler.runner import JobCancelled, JobContext, JobHandler
from memosd.service import _NOT_GIVEN, Call, Service, op

if TYPE_CHECKING:
    from memosd.settings import LoraSectionSettings

__all__ = [
    "DEFAULT_WAIT_S",
    "RETRAIN",
    "TRAIN",
    "LoraRuntime",
    "progress_message",
    "status_of",
]

_log = structlog.get_logger("memosd.lora")

TRAIN: Final = "lora.train"
RETRAIN: Final = "lora.retrain"
#: ``wait``: how long an op waits for its job by default, and at most.
DEFAULT_WAIT_S: Final = 3600.0
MAX_WAIT_S: Final = 7 * 24 * 3600.0
_MAX_ITEMS: Final = 100_000
_COMMIT_TRIES: Final = 3
#: Job progress fractions of the phases (training gets the room in between).
_LOADING: Final = 0.02
_TRAIN_FROM: Final = 0.05
_TRAIN_TO: Final = 0.9
_EVALUATING: Final = 0.92
_STORING: Final = 0.97


def _retrain_key(cube: str) -> str:
    return f"{RETRAIN}:{cube}"


def status_of(version: AdapterVersion) -> str:
    """``active`` | ``stale`` | ``rejected`` | ``superseded`` (passed, not the newest)."""
    if version.active:
        return "active"
    if version.stale:
        return "stale"
    if not version.passed:
        return "rejected"
    return "superseded"


def progress_message(p: TrainingProgress) -> tuple[float, str]:
    """The job progress fraction and message of one training report."""
    if p.phase == "loading":
        return _LOADING, "loading the model in the training worker"
    if p.phase == "evaluating":
        return _EVALUATING, "evaluating the adapter (promotion gate)"
    if p.phase == "done":
        return _STORING, "storing the adapter"
    fraction = _TRAIN_FROM + (_TRAIN_TO - _TRAIN_FROM) * (p.step / max(p.total_steps, 1))
    parts = [f"step {p.step}/{p.total_steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.eta_s is not None and math.isfinite(p.eta_s):
        parts.append(f"ETA {p.eta_s:.0f}s")
    if p.tokens_per_s is not None and math.isfinite(p.tokens_per_s):
        parts.append(f"{p.tokens_per_s:.0f} tokens/s")
    return fraction, ", ".join(parts)


class _JobCancel:
    """A :class:`~memosd.lora.train.CancelToken` over a job's cancel request."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx

    def is_set(self) -> bool:
        return self._ctx.cancelled()


def _reporter(ctx: JobContext) -> Callable[[TrainingProgress], None]:
    def report(p: TrainingProgress) -> None:
        fraction, message = progress_message(p)
        ctx.progress(fraction, message)

    return report


class _Handler:
    """A job handler the runner runs one at a time per cube (with the tiers jobs)."""

    exclusive_per_cube = True

    def __init__(self, fn: Callable[[JobContext], dict[str, Any] | None]) -> None:
        self._fn = fn

    def __call__(self, ctx: JobContext) -> dict[str, Any] | None:
        return self._fn(ctx)


class LoraRuntime:
    """The daemon's parameter memory: one :class:`LoraStore`, job handlers, auto-retrain.

    Built before the scheduler (its handlers go to ``open_scheduler``), then
    :meth:`attach`\\ ed to the service (model cache, job runner) once both
    exist; :meth:`close` stops the watcher thread.
    """

    def __init__(
        self,
        engine: Any,
        *,
        defaults: LoraSettings | None = None,
        auto_retrain: bool = True,
        models: Any = None,
    ) -> None:
        self.engine = engine
        self.defaults = defaults or LoraSettings()
        self.auto_retrain = auto_retrain
        self.models: Any = models  # memosd.models.cache.ModelCache
        self.runner: Any = None  # memosd.scheduler.runner.JobRunner
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.store = LoraStore(engine, on_stale=self._on_stale)

    @classmethod
    def from_settings(cls, engine: Any, section: LoraSectionSettings) -> LoraRuntime:
        """From the ``[lora]`` settings section (hyperparameter defaults, auto_retrain)."""
        names = {f.name for f in dataclasses.fields(LoraSettings)}
        values = {
            f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names
        }
        return cls(
            engine, defaults=LoraSettings.from_mapping(values), auto_retrain=section.auto_retrain
        )

    def handlers(self) -> dict[str, JobHandler]:
        return {TRAIN: _Handler(self.run_train), RETRAIN: _Handler(self.run_retrain)}

    def attach(self, service: Any) -> None:
        """Use the service's model cache and job runner; start watching for stale adapters."""
        service.lora = self
        self.models = getattr(service, "models", None)
        scheduler = getattr(service, "scheduler", None)
        self.runner = scheduler.runner if scheduler is not None else None
        if self.auto_retrain and self.runner is not None and self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name="memosd-lora-watch", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    # --- automatic retraining -----------------------------------------------------

    def _on_stale(self, cube: str, item_id: str) -> None:
        # The engine's writer thread: only wake the watcher.
        self._wake.set()

    def _watch(self) -> None:
        rescan = True  # at start-up: purges whose retraining a crash may have lost
        while not self._closed:
            try:
                for cube in sorted(self.store.stale_cubes(rescan=rescan)):
                    self.queue_retrain(cube)
                rescan = False
            except Exception:  # never let the watcher die; the next purge retries
                _log.exception("checking for stale LoRA adapters failed")
            self._wake.wait()
            self._wake.clear()

    def queue_retrain(
        self,
        cube: str,
        *,
        args: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> jobs.Job:
        """Queue (or find the unfinished) ``lora.retrain`` job of ``cube``."""
        if self.runner is None:
            raise Unavailable("this daemon runs no scheduler", reason="no_scheduler")
        job: jobs.Job = self.runner.submit(
            RETRAIN,
            cube=cube,
            args=args or {},
            actor=actor,
            dedup_key=_retrain_key(cube),
        )
        _log.info("LoRA retraining queued", cube=cube, job=job.id)
        return job

    # --- job handlers --------------------------------------------------------------

    def backend(self, path: str, dtype: str | None) -> Any:
        """The model backend of a job (access was checked when the job was queued)."""
        if self.models is None:
            raise Unavailable("this daemon has no model cache", reason="no_models")
        return self.models.get(path, admin=True, dtype=dtype)

    def _train(self, prepared: PreparedTraining, backend: Any, ctx: JobContext) -> Any:
        """Train in the worker process, reporting progress, honouring the job's cancel."""
        return self.store.run(
            prepared,
            backend,
            progress=_reporter(ctx),
            cancel=_JobCancel(ctx),
            fingerprint_cache_dir=getattr(self.models, "fingerprint_cache_dir", None),
        )

    def run_train(self, ctx: JobContext) -> dict[str, Any] | None:
        cube = _job_cube(ctx)
        args = ctx.args
        settings = LoraSettings.from_mapping(args.get("settings") or {})
        ctx.progress(0.0, "loading the model")
        backend = self.backend(str(args["model"]), args.get("dtype"))
        ctx.check_cancelled()
        store = self.store
        item_ids = args.get("items")
        if item_ids is None:
            items = store.items_for_training(cube, tier=args.get("from_tier") or "long")
        else:
            # Items deleted or purged since the job was queued are left out.
            items = []
            for item_id in item_ids:
                with contextlib.suppress(NotFound):
                    items.append(self.engine.get(cube, item_id))
        prepared = store.prepare(cube, items, backend, settings)
        output = self._train(prepared, backend, ctx)
        if output.adapter is None or output.report is None:
            raise JobCancelled(ctx.job.id)
        ctx.progress(_STORING, "storing the adapter")
        report = output.report
        previous = store.active(cube)
        actor = ctx.job.actor
        for attempt in range(_COMMIT_TRIES):
            staged = store.stage(prepared, backend, output)  # the blob is durable now

            def write(planner: Any, staged: StagedAdapter = staged) -> MemoryItem:
                return store.write(staged, writer=planner, actor=actor)

            try:
                item = ctx.commit(
                    write,
                    result=lambda item: _train_result(
                        cube,
                        item,
                        passed=report.passed,
                        previous=previous,
                        output=output,
                        prepared=prepared,
                    ),
                )
            except Conflict as exc:
                # A rollback wrote a version meanwhile: stage on top of it and retry.
                if exc.reason != "version_mismatch" or attempt == _COMMIT_TRIES - 1:
                    raise
                continue
            _log.info(
                "LoRA adapter trained",
                cube=cube,
                version=item.version,
                gate="passed" if report.passed else "rejected",
                steps=output.steps,
            )
            return None
        return None  # pragma: no cover - the loop returns or raises

    def run_retrain(self, ctx: JobContext) -> dict[str, Any] | None:
        cube = _job_cube(ctx)
        args = ctx.args
        store = self.store
        versions = store.versions(cube)
        if not any(v.stale for v in versions):
            return {"cube": cube, "outcome": "up_to_date"}
        newest = versions[-1]
        base = newest.manifest.get("base_model") or {}
        model = args.get("model") or base.get("path")
        if not model:
            raise BadRequest(
                f"the adapter of cube {cube!r} names no base model; pass one",
                reason="no_model",
            )
        settings = LoraSettings.from_mapping(
            args.get("settings") or {}, base=LoraSettings.from_mapping(newest.settings)
        )
        ctx.progress(0.0, "loading the model")
        backend = self.backend(str(model), args.get("dtype") or base.get("dtype"))
        ctx.check_cancelled()
        retrain = store.prepare_retrain(cube, backend, settings)
        if retrain is None:
            return {"cube": cube, "outcome": "up_to_date"}
        actor = ctx.job.actor
        if retrain.training is None:
            rewrite = ctx.commit(
                lambda p: store.write_lineage(retrain, None, writer=p, actor=actor),
                result=lambda r: {
                    "cube": cube,
                    "outcome": "forgotten",
                    "dropped_versions": list(r.dropped),
                    "replaced_item": r.replaced_item,
                    "item_id": None if r.item is None else r.item.id,
                    "version": None if r.item is None else r.item.version,
                },
            )
            _log.info("stale LoRA adapter versions forgotten", cube=cube, dropped=rewrite.dropped)
            return None
        training = retrain.training
        output = self._train(training, backend, ctx)
        if output.adapter is None or output.report is None:
            raise JobCancelled(ctx.job.id)
        ctx.progress(_STORING, "storing the adapter")
        content = store.stage_content(training, backend, output)
        passed = output.report.passed

        def result(r: Any) -> dict[str, Any]:
            out = _train_result(
                cube, r.item, passed=passed, previous=None, output=output, prepared=training
            )
            out["dropped_versions"] = list(r.dropped)
            out["replaced_item"] = r.replaced_item
            return out

        rewrite = ctx.commit(
            lambda p: store.write_lineage(retrain, content, writer=p, actor=actor),
            result=result,
        )
        _log.info("LoRA adapter retrained without purged items", cube=cube, dropped=rewrite.dropped)
        return None


def _job_cube(ctx: JobContext) -> str:
    if ctx.cube is None:
        raise BadRequest("a LoRA job needs a cube", reason="no_cube")
    return ctx.cube


def _train_result(
    cube: str,
    item: Any,
    *,
    passed: bool,
    previous: AdapterVersion | None,
    output: Any,
    prepared: Any,
) -> dict[str, Any]:
    if passed:
        active: int | None = item.version
    else:
        active = previous.version if previous is not None else None
    manifest = (item.payload or {}).get("manifest") or {}
    return {
        "cube": cube,
        "outcome": "promoted" if passed else "rejected",
        "item_id": item.id,
        "version": item.version,
        "gate": "passed" if passed else "rejected",
        "active_version": active,
        "items": len(prepared.training_set.samples),
        "steps": output.steps,
        "tokens_per_s": output.tokens_per_s,
        "evaluation": output.report.to_dict() if output.report is not None else None,
        "sha256": (manifest.get("adapter") or {}).get("sha256"),
        "bytes": (manifest.get("adapter") or {}).get("bytes"),
    }


# --- ops -------------------------------------------------------------------------


def _runtime(svc: Service) -> LoraRuntime:
    runtime = getattr(svc, "lora", None)
    if not isinstance(runtime, LoraRuntime):
        raise Unavailable("parameter memory is not enabled in this daemon", reason="no_lora")
    return runtime


def _opt_bool(call: Call, name: str) -> bool | None:
    value = call.args.raw(name)
    if value is _NOT_GIVEN or value is None:
        return None
    if type(value) is not bool:
        raise BadRequest(
            f"{call.request.op}: argument {name!r} must be a boolean", reason="bad_arg", field=name
        )
    return value


def _wait_s(call: Call) -> float:
    timeout = call.args.opt_float("timeout")
    if timeout is None:
        return DEFAULT_WAIT_S
    if not 0 < timeout <= MAX_WAIT_S:
        raise BadRequest(
            f"{call.request.op}: timeout must be in (0, {MAX_WAIT_S:g}] seconds",
            reason="bad_arg",
            field="timeout",
        )
    return timeout


def _settings_overrides(call: Call, base: LoraSettings) -> dict[str, Any]:
    """The request's hyperparameters on top of ``base``, validated; the full dict."""
    raw = call.args.opt_map("settings") or {}
    try:
        return LoraSettings.from_mapping(raw, base=base).to_dict()
    except TypeError as exc:  # e.g. a list where a number belongs
        raise BadRequest(f"bad LoRA settings: {exc}", reason="bad_setting") from None


def _model_arg(svc: Service, call: Call, model: str, dtype: str | None) -> tuple[str, str]:
    """The resolved model directory and dtype a caller may use (checked now, not later)."""
    runtime = _runtime(svc)
    models = runtime.models
    if models is None:
        raise Unavailable("this daemon has no model cache", reason="no_models")
    directory = models.resolve(model, admin=call.identity.admin)
    return str(directory), resolve_dtype(dtype or models.default_dtype, directory)


async def _submit(svc: Service, wait: bool, wait_s: float, submit: Callable[[], jobs.Job]) -> Any:
    scheduler = svc.scheduler
    if scheduler is None:
        raise Unavailable("this daemon runs no scheduler", reason="no_scheduler")
    if wait and not scheduler.enabled:
        raise Unavailable(
            "the scheduler is disabled (scheduler.enabled = false): jobs stay queued; "
            "queue without wait to run it later",
            reason="scheduler_disabled",
        )
    job = await svc.run(submit)
    if wait:
        job = await svc.run(scheduler.runner.wait, job.id, timeout=wait_s)
    return jobs.job_to_wire(job)


@op("lora_train")
async def _lora_train(svc: Service, call: Call) -> Any:
    """Queue a ``lora.train`` job; with ``wait``, the ended job (its result: the adapter)."""
    a = call.args
    cube = a.req_str("cube")
    model = a.req_str("model")
    dtype = a.opt_str("dtype")
    from_tier = a.opt_str("from_tier")
    items = a.opt_str_list("items")
    wait = bool(_opt_bool(call, "wait"))
    wait_s = _wait_s(call)
    runtime = _runtime(svc)
    settings = _settings_overrides(call, runtime.defaults)
    a.done()
    if from_tier is not None and items is not None:
        raise BadRequest(
            "lora_train: give from_tier or items, not both", reason="bad_arg", field="items"
        )
    if items is not None and not 0 < len(items) <= _MAX_ITEMS:
        raise BadRequest(
            f"lora_train: items must list 1..{_MAX_ITEMS} ids", reason="bad_arg", field="items"
        )
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    directory, dtype_name = await svc.run(_model_arg, svc, call, model, dtype)
    if items is not None:
        item_ids = list(dict.fromkeys(items))

        def check_items() -> None:
            for item_id in item_ids:
                svc.engine.get(cube, item_id)  # NotFound names the missing one

        await svc.run(check_items)
    args: dict[str, Any] = {
        "model": directory,
        "dtype": dtype_name,
        "settings": settings,
    }
    if items is not None:
        args["items"] = list(dict.fromkeys(items))
    else:
        args["from_tier"] = from_tier or "long"

    def submit() -> jobs.Job:
        assert svc.scheduler is not None
        job: jobs.Job = svc.scheduler.runner.submit(
            TRAIN, cube=cube, args=args, actor=call.identity.principal
        )
        return job

    return await _submit(svc, wait, wait_s, submit)


@op("lora_retrain")
async def _lora_retrain(svc: Service, call: Call) -> Any:
    """Queue (or find) the ``lora.retrain`` job of a cube: retrain without purged items."""
    a = call.args
    cube = a.req_str("cube")
    model = a.opt_str("model")
    dtype = a.opt_str("dtype")
    overrides = a.opt_map("settings")
    wait = bool(_opt_bool(call, "wait"))
    wait_s = _wait_s(call)
    a.done()
    runtime = _runtime(svc)
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    if overrides:
        try:
            LoraSettings.from_mapping(overrides)
        except TypeError as exc:
            raise BadRequest(f"bad LoRA settings: {exc}", reason="bad_setting") from None
    versions = await svc.run(runtime.store.versions, cube)
    if not versions:
        raise NotFound(f"cube {cube!r} has no LoRA adapter", reason="no_adapter")
    args: dict[str, Any] = {}
    if overrides:
        args["settings"] = dict(overrides)
    if model is not None:
        args["model"], args["dtype"] = await svc.run(_model_arg, svc, call, model, dtype)
    elif dtype is not None:
        raise BadRequest("lora_retrain: dtype needs model", reason="bad_arg", field="dtype")

    def submit() -> jobs.Job:
        return runtime.queue_retrain(cube, args=args, actor=call.identity.principal)

    return await _submit(svc, wait, wait_s, submit)


def _version_wire(v: AdapterVersion, *, full: bool) -> dict[str, Any]:
    wire = v.to_dict(with_manifest=full)
    wire["status"] = status_of(v)
    wire["trained_on"] = [[item_id, version] for item_id, version in v.trained_on]
    wire["settings"] = v.settings
    training = dict(v.manifest.get("training") or {})
    if not full:
        training.pop("loss_curve", None)
    wire["training"] = training
    wire["base_model"] = v.manifest.get("base_model")
    return wire


@op("lora_show")
async def _lora_show(svc: Service, call: Call) -> Any:
    """Every version of a cube's adapter (or one, with its manifest)."""
    a = call.args
    cube = a.req_str("cube")
    version = a.opt_int("version", lo=1)
    a.done()
    runtime = _runtime(svc)
    svc.require(call.identity, cube, "read")
    versions: list[AdapterVersion] = await svc.run(runtime.store.versions, cube)
    if version is not None:
        found = next((v for v in versions if v.version == version), None)
        if found is None:
            raise NotFound(f"cube {cube!r} has no adapter version {version}", reason="version")
        return _version_wire(found, full=True)
    active = next((v.version for v in versions if v.active), None)
    return {
        "cube": cube,
        "item_id": versions[-1].item_id if versions else None,
        "active_version": active,
        "stale": any(v.stale for v in versions),
        "versions": [_version_wire(v, full=False) for v in versions],
    }


@op("lora_get")
async def _lora_get(svc: Service, call: Call) -> Any:
    """One version's adapter (active by default) as frame 1; manifest in the result."""
    a = call.args
    cube = a.req_str("cube")
    version = a.opt_int("version", lo=1)
    fingerprint = a.opt_str("fingerprint")
    a.done()
    runtime = _runtime(svc)
    svc.require(call.identity, cube, "read")

    def read() -> tuple[bytes, AdapterVersion]:
        chosen = runtime.store.version(cube, version)
        if fingerprint is not None:
            check_fingerprint(chosen.base_fingerprint, fingerprint)
        return runtime.store.adapter_bytes(cube, version=chosen.version)

    data, chosen = await svc.run(read)
    result = {
        "cube": cube,
        "item_id": chosen.item_id,
        "version": chosen.version,
        "status": status_of(chosen),
        "sha256": chosen.sha256,
        "bytes": len(data),
        "base_fingerprint": chosen.base_fingerprint,
        "manifest": chosen.manifest,
        "adapter": {FRAME_KEY: 1},
    }
    return Reply(result, [data])


@op("lora_rollback")
async def _lora_rollback(svc: Service, call: Call) -> Any:
    """Write a new version equal to ``version`` (gate verdict included; stale refused)."""
    a = call.args
    cube = a.req_str("cube")
    version = a.req_int("version")
    a.done()
    runtime = _runtime(svc)
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    rolled = await svc.run(runtime.store.rollback, cube, version, actor=call.identity.principal)
    return _version_wire(rolled, full=False)


@op("lora_forget")
async def _lora_forget(svc: Service, call: Call) -> Any:
    """Forget the stale versions now (their blobs are deleted), without retraining."""
    a = call.args
    cube = a.req_str("cube")
    a.done()
    runtime = _runtime(svc)
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    dropped = await svc.run(runtime.store.forget_stale, cube, actor=call.identity.principal)
    active = await svc.run(runtime.store.active, cube)
    return {
        "cube": cube,
        "dropped_versions": list(dropped),
        "active_version": None if active is None else active.version,
    }
