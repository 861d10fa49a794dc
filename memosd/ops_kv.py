"""Activation memory through the daemon: ``kv_*`` ops, KV jobs and the staleness watcher.

Ops (docs/activation-memory.md, "Daemon and CLI contract"):

* ``kv_build`` (write access): resolves the sources now (``items``, a whole
  ``tier`` or the ``top`` hits of a ``query``), checks the model directory
  (:class:`~memosd.models.cache.ModelCache`: non-admins only under
  ``models.allowed_dirs``) and queues a durable ``kv.build`` job.  The
  forward pass runs in the job runner's worker thread, never on the request
  loop.  With ``wait`` the reply comes when the job ends: the KV item and its
  info (or the job's error).
* ``kv_get`` (read access): the cache as a msgpack header plus ``2 x layers``
  raw tensor frames, sent zero-copy from the daemon's RAM cache.  The client
  sends its model's fingerprint; another model's cache is refused with
  ``Conflict(fingerprint_mismatch)``.
* ``kv_list``, ``kv_show`` (read), ``kv_drop`` (write: purge, the engine
  deletes blobs no other version references), ``kv_rebuild`` (write: queues
  ``kv.rebuild`` jobs for one cache, or for every stale cache of a cube).

Jobs: ``kv.build`` writes the KV item and the job's success in ONE atomic
engine write (:meth:`~memosd.scheduler.runner.JobContext.commit`), so a crash
at any point leaves either no item and a job that runs again, or the item and
a succeeded job.  ``kv.rebuild`` builds the replacement, purges the old item
and marks the job succeeded in one write too.

Staleness: :class:`KvRuntime` owns the daemon's :class:`~memosd.kv.KvStore`
(created lazily: torch and transformers are imported only once activation
memory is used or exists).  Its engine listener wakes a watcher thread on
item changes; the watcher applies them (``KvStore.process_changes``: stale
caches get ``metadata.stale``, caches built from a purged item are purged at
once, leaving a placeholder) and, with ``kv.auto_rebuild``, queues one
``kv.rebuild`` job per affected cache.  At start-up every cache is checked
against the store (covers events lost in a crash) and stale ones are queued.

Registered by the import at the bottom of :mod:`memosd.service`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from memosd.errors import BadRequest, Conflict, NotFound, TooLarge, Unavailable, error_from_wire
from memosd.protocol import FRAME_KEY, Reply, item_to_wire, to_wire
from memosd.scheduler import jobs
from memosd.service import _NOT_GIVEN, Call, Service, _scan_active, lexical_scan_search, op

if TYPE_CHECKING:
    from memosd.kv import KvStore
    from memosd.memcube.model import MemoryItem
    from memosd.models.cache import ModelCache
    from memosd.scheduler.runner import JobContext, JobHandler, JobRunner
    from memosd.settings import Settings

__all__ = ["ACTIVATION_FORM", "KV_BUILD", "KV_REBUILD", "KvRuntime"]

_log = structlog.get_logger("memosd.kv")

KV_BUILD: Final = "kv.build"
KV_REBUILD: Final = "kv.rebuild"
ACTIVATION_FORM: Final = "activation"  # == memosd.kv.ACTIVATION_FORM (no torch import here)
KV_ACTOR: Final = "memosd:kv"
#: Sources of one cache at most (a tier or an item list).
MAX_SOURCES: Final = 10_000
MAX_TOP: Final = 1000
DEFAULT_WAIT_S: Final = 300.0
MAX_WAIT_S: Final = 24 * 3600.0
_WAIT_POLL_S: Final = (0.01, 0.25)
_ITEM_EVENTS: Final = frozenset({"item_written", "item_deleted", "item_purged", "cube_dropped"})
_DTYPES: Final = ("float32", "float16", "bfloat16", "auto")
_QUANTS: Final = ("none", "int8")
#: Test hook (see _test_pause_before_commit); not a setting.
_PAUSE_ENV: Final = "MEMOSD_TEST_KV_PAUSE"


class KvRuntime:
    """The daemon's activation memory: the store, the job handlers and the watcher."""

    def __init__(
        self, engine: Any, settings: Settings, models: ModelCache, *, search: Any = None
    ) -> None:
        self.engine = engine
        self.models = models
        self.search = search
        self.config = settings.kv
        self.data_dir = settings.data_dir
        self._store: KvStore | None = None
        self._store_lock = threading.Lock()
        self._runner: JobRunner | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._new_cubes: deque[str] = deque()
        self._queue_stale = False  # set once the store exists: queue every stale cache
        engine.add_listener(self._on_change)

    # --- lifecycle -------------------------------------------------------------------

    def start(self, runner: JobRunner | None) -> None:
        """Start the watcher (it checks every existing cache once, then follows changes)."""
        self._runner = runner
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="memosd-kv-watch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def handlers(self) -> dict[str, JobHandler]:
        """Job handlers for :func:`memosd.scheduling.open_scheduler`."""
        return {KV_BUILD: self._build_job, KV_REBUILD: self._rebuild_job}

    @property
    def loaded(self) -> bool:
        return self._store is not None

    def store(self) -> KvStore:
        """The KV store, created on first use (imports torch; checks every cache once)."""
        store = self._store
        if store is not None:
            return store
        with self._store_lock:
            if self._store is None:
                from memosd.kv import (  # noqa: PLC0415 - torch: only when used
                    HeatAwarePolicy,
                    KvStore,
                    LRUPolicy,
                )

                created = KvStore(
                    self.engine,
                    self.data_dir,
                    budget_bytes=self.config.budget_bytes or None,
                    policy=HeatAwarePolicy() if self.config.eviction == "heat" else LRUPolicy(),
                    ram_cache_bytes=self.config.ram_cache_bytes,
                    quant=self.config.quant,
                    listen=False,  # fed by _on_change, which then wakes the watcher
                )
                # Published before the scan: changes from now on are queued (a
                # change the scan already saw is checked twice, harmlessly).
                self._store = created
                created.scan(actor=KV_ACTOR)
                self._queue_stale = True
                self._wake.set()  # the watcher queues rebuilds of caches found stale
            return self._store

    # --- staleness watcher -------------------------------------------------------------

    def _on_change(self, event: Any) -> None:
        """Engine listener (writer thread): only wakes the watcher; never raises."""
        try:
            store = self._store
            if store is not None:
                store.on_change(event)  # queues it if it concerns a cache
                if event.kind in _ITEM_EVENTS:
                    self._wake.set()
            elif event.kind == "cube_created" and event.cube is not None:
                self._new_cubes.append(event.cube)  # an import may bring KV items
                self._wake.set()
        except Exception:
            return

    def _has_kv_items(self, cubes: list[str]) -> bool:
        for cube in cubes:
            try:
                if self.engine.list_items(cube, status=None, form=ACTIVATION_FORM, limit=1):
                    return True
            except NotFound:
                continue
        return False

    def _watch(self) -> None:
        first = True
        while not self._stopping.is_set():
            try:
                if first:
                    first = False
                    if self._has_kv_items([c.name for c in self.engine.list_cubes()]):
                        self.store()
                self._step()
            except Exception:
                if self.engine.healthy and not self._stopping.is_set():
                    _log.exception("activation memory watcher failed")
            self._wake.wait()
            self._wake.clear()

    def _step(self) -> None:
        if self._store is None:
            cubes = []
            while self._new_cubes:
                cubes.append(self._new_cubes.popleft())
            if not self._has_kv_items(cubes):
                return
        store = self.store()
        if self._queue_stale:
            self._queue_stale = False
            self._queue_all_stale()
        report = store.process_changes(actor=KV_ACTOR)
        for cube, kv_id in [*report.marked_stale, *report.placeholders]:
            self.queue_rebuild(cube, kv_id)
        if report.marked_stale or report.purged:
            _log.info(
                "KV caches changed by their sources",
                stale=len(report.marked_stale),
                purged=len(report.purged),
            )

    def _queue_all_stale(self) -> None:
        store = self._store
        if store is None:
            return
        for cube in [c.name for c in self.engine.list_cubes()]:
            try:
                infos = store.list_caches(cube)
            except NotFound:
                continue
            for info in infos:
                if info.stale:
                    self.queue_rebuild(cube, info.item_id)

    def queue_rebuild(
        self,
        cube: str,
        kv_id: str,
        *,
        force: bool = False,
        explicit: bool = False,
        actor: str = KV_ACTOR,
    ) -> jobs.Job | None:
        """Queue a ``kv.rebuild`` job (automatic ones only with ``kv.auto_rebuild``)."""
        runner = self._runner
        if runner is None or (not explicit and not self.config.auto_rebuild):
            return None
        job: jobs.Job = runner.submit(
            KV_REBUILD,
            cube=cube,
            args={"item_id": kv_id, "force": force},
            actor=actor,
            dedup_key=f"{KV_REBUILD}:{cube}:{kv_id}" + (":force" if force else ""),
        )
        return job

    # --- job handlers ------------------------------------------------------------------

    def _current_sources(self, cube: str, ids: list[str]) -> list[MemoryItem]:
        out = []
        for item_id in ids:
            try:
                item = self.engine.get(cube, item_id)
            except NotFound:
                continue
            if item.status == "active" and item.form != ACTIVATION_FORM:
                out.append(item)
        return out

    def _build_job(self, ctx: JobContext) -> dict[str, Any] | None:
        """``kv.build``: ``items``, ``model`` (resolved path), ``dtype``, ``name``, ``quant``."""
        args = ctx.args
        cube = ctx.cube
        if cube is None:
            raise BadRequest("kv.build needs a cube")
        ctx.progress(0.0, "loading the model")
        backend = self.models.get(str(args["model"]), admin=True, dtype=args.get("dtype"))
        ctx.check_cancelled()
        sources = self._current_sources(cube, [str(i) for i in args.get("items") or ()])
        if not sources:
            raise BadRequest("none of the chosen items is active any more", reason="no_sources")
        store = self.store()

        def commit(plan: Any) -> Any:
            _test_pause_before_commit()
            return ctx.commit(plan, result=_build_result)

        store.build(
            cube,
            sources,
            backend,
            actor=ctx.job.actor,
            name=args.get("name"),
            quant=args.get("quant"),
            commit=commit,
            progress=_progress(ctx),
        )
        return None

    def _rebuild_job(self, ctx: JobContext) -> dict[str, Any] | None:
        """``kv.rebuild``: args ``item_id``, ``force`` (rebuild even if fresh)."""
        from memosd.kv import KvManifest  # noqa: PLC0415 - torch: only when used

        cube = ctx.cube
        if cube is None:
            raise BadRequest("kv.rebuild needs a cube")
        kv_id = str(ctx.args["item_id"])
        force = bool(ctx.args.get("force"))
        store = self.store()
        store.process_changes(actor=KV_ACTOR)
        try:
            item = self.engine.get(cube, kv_id)
        except NotFound:
            return {"item_id": kv_id, "skipped": "gone"}
        info = store.info(cube, kv_id)
        if not info.stale and not force:
            return {"item_id": kv_id, "skipped": "fresh"}
        manifest = KvManifest.from_payload(item.payload)
        ctx.progress(0.0, "loading the model")
        backend = self.models.get(manifest.model, admin=True, dtype=manifest.dtype)
        if backend.fingerprint != manifest.fingerprint and not force:
            raise BadRequest(
                f"the model at {manifest.model} changed since KV cache {kv_id} was built; "
                "rebuild it explicitly (memctl kv rebuild) to use the new model",
                reason="model_changed",
            )
        sources = self._current_sources(cube, [sid for sid, _ in info.sources])
        if not sources:
            store.drop(cube, kv_id, actor=KV_ACTOR, reason="kv sources gone")
            return {"item_id": kv_id, "purged": True}

        def commit(plan: Any) -> Any:
            return ctx.commit(plan, result=lambda new: {**_build_result(new), "replaces": kv_id})

        store.build(
            cube,
            sources,
            backend,
            actor=KV_ACTOR,
            name=info.name,
            tier=item.tier,
            tags=item.tags,
            quant=manifest.quant,
            replaces=kv_id,
            purge_replaced=True,
            commit=commit,
            progress=_progress(ctx),
        )
        return None


def _progress(ctx: JobContext) -> Any:
    """Report build progress; stop between prefill steps once the job is cancelled."""

    def report(fraction: float, message: str) -> None:
        ctx.progress(fraction, message)
        ctx.check_cancelled()

    return report


def _test_pause_before_commit() -> None:
    """Crash tests: with ``$MEMOSD_TEST_KV_PAUSE`` = a path, create ``<path>.reached``
    and wait (at most 60 s) until ``<path>`` exists before committing a build."""
    gate = os.environ.get(_PAUSE_ENV)
    if not gate:
        return
    Path(gate + ".reached").touch()
    deadline = time.monotonic() + 60.0
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _build_result(item: Any) -> dict[str, Any]:
    meta = item.metadata if isinstance(item.metadata, dict) else {}
    return {
        "item_id": item.id,
        "cube": item.cube,
        "name": meta.get("kv_name"),
        "num_tokens": meta.get("num_tokens"),
        "bytes": meta.get("bytes"),
        "reused_tokens": meta.get("reused_tokens"),
        "fingerprint": meta.get("fingerprint"),
    }


# --- ops ------------------------------------------------------------------------------


def _runtime(svc: Service) -> KvRuntime:
    kv = svc.kv
    if kv is None:
        raise Unavailable("this daemon serves no activation memory", reason="no_kv")
    return kv  # type: ignore[no-any-return]


def _runner(svc: Service) -> JobRunner:
    if svc.scheduler is None:
        raise Unavailable("this daemon runs no scheduler", reason="no_scheduler")
    return svc.scheduler.runner  # type: ignore[no-any-return]


def _wait_arg(call: Call) -> tuple[bool, float]:
    wait = call.args.raw("wait")
    if wait is not _NOT_GIVEN and wait is not None and type(wait) is not bool:
        raise BadRequest("argument 'wait' must be a boolean", reason="bad_arg", field="wait")
    timeout = call.args.opt_float("timeout")
    if timeout is not None and not 0 < timeout <= MAX_WAIT_S:
        raise BadRequest(
            f"argument 'timeout' must be in (0, {MAX_WAIT_S:g}] seconds",
            reason="bad_arg",
            field="timeout",
        )
    return wait is True, timeout if timeout is not None else DEFAULT_WAIT_S


async def _wait_job(svc: Service, job_id: str, timeout: float) -> jobs.Job:
    """Poll the job until it ends (cheap LMDB reads); Unavailable(timeout) after ``timeout``."""
    if svc.scheduler is not None and not svc.scheduler.enabled:
        raise Unavailable(
            f"job {job_id} is queued but background jobs are disabled (scheduler.enabled)",
            reason="scheduler_disabled",
        )
    deadline = time.monotonic() + timeout
    pause = _WAIT_POLL_S[0]
    while True:
        job: jobs.Job = svc.engine.get_job(job_id)
        if job.terminal:
            return job
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(
                f"job {job_id} did not end within {timeout:g}s (it keeps running)",
                reason="timeout",
                job=job_id,
            )
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, _WAIT_POLL_S[1])


def _job_outcome(job: jobs.Job) -> None:
    if job.state == jobs.JobState.SUCCEEDED:
        return
    if job.state == jobs.JobState.CANCELLED:
        raise Conflict(f"job {job.id} was cancelled", reason="cancelled", job=job.id)
    raise error_from_wire(job.error or {"code": "internal", "message": f"job {job.id} failed"})


def _kv_id(svc: Service, store: KvStore, cube: str, item_id: str | None, name: str | None) -> str:
    if (item_id is None) == (name is None):
        raise BadRequest("give exactly one of `id` and `name`", reason="bad_arg", field="id")
    if name is not None:
        return store.find(cube, name).item_id
    return item_id  # type: ignore[return-value]


def _resolve_sources(
    svc: Service,
    call: Call,
    cube: str,
    *,
    items: list[str] | None,
    tier: str | None,
    query: str | None,
    top: int | None,
) -> list[str]:
    """The ids a ``kv_build`` is asked to cache (worker thread)."""
    engine = svc.engine
    if items is not None:
        if not items:
            raise BadRequest("kv_build: `items` is empty", reason="bad_arg", field="items")
        if len(items) > MAX_SOURCES:
            raise TooLarge(f"kv_build: more than {MAX_SOURCES} items", reason="too_many_items")
        seen: dict[str, None] = {}
        for item_id in items:
            item = engine.get(cube, item_id)  # NotFound (deleted/purged) names the item
            if item.form == ACTIVATION_FORM:
                raise BadRequest(f"item {item_id} is itself a KV cache", reason="bad_form")
            if item.status != "active":
                raise BadRequest(f"item {item_id} is {item.status}", reason="not_active")
            seen[item_id] = None
        return list(seen)
    if tier is not None:
        out = []
        for item in _scan_active(engine, cube, tier, None):
            if item.form == ACTIVATION_FORM:
                continue
            out.append(item.id)
            if len(out) > MAX_SOURCES:
                raise TooLarge(
                    f"kv_build: tier {tier!r} has more than {MAX_SOURCES} items",
                    reason="too_many_items",
                )
        if not out:
            raise BadRequest(f"kv_build: no active items in tier {tier!r}", reason="no_sources")
        return out
    assert query is not None
    k = top or 10
    if svc.search is None:
        hits = lexical_scan_search(_scan_active(engine, cube, None, None), query, k + k)
        found = [item for item, _ in hits]
    else:
        from memosd.index import SearchFilters  # noqa: PLC0415 - heavy, only with indexes

        wait_for = svc.written_lsn.get(call.identity.principal)
        found = [
            h.item
            for h in svc.search.search(
                [cube],
                query,
                k=k + k,
                filters=SearchFilters(status="active"),
                wait_for_lsn=wait_for,
            )
        ]
    ids = [i.id for i in found if i.form != ACTIVATION_FORM][:k]
    if not ids:
        raise BadRequest(f"kv_build: no item matches {query!r}", reason="no_sources")
    return ids


@op("kv_build")
async def _kv_build(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    items = a.opt_str_list("items")
    tier = a.opt_str("tier")
    query = a.opt_str("query")
    top = a.opt_int("top", lo=1, hi=MAX_TOP)
    model = a.req_str("model")
    dtype = a.opt_str("dtype")
    name = a.opt_str("name")
    quant = a.opt_str("quant")
    wait, timeout = _wait_arg(call)
    a.done()
    if sum(x is not None for x in (items, tier, query)) != 1:
        raise BadRequest(
            "kv_build: give exactly one of `items`, `tier`, `query`",
            reason="bad_arg",
            field="items",
        )
    if top is not None and query is None:
        raise BadRequest("kv_build: `top` goes with `query`", reason="bad_arg", field="top")
    if dtype is not None and dtype not in _DTYPES:
        raise BadRequest(f"kv_build: dtype must be one of {list(_DTYPES)}", field="dtype")
    if quant is not None and quant not in _QUANTS:
        raise BadRequest(f"kv_build: quant must be one of {list(_QUANTS)}", field="quant")
    if name is not None and not 0 < len(name) <= 200:
        raise BadRequest("kv_build: name must have 1-200 characters", field="name")
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    kv = _runtime(svc)
    runner = _runner(svc)
    directory = await svc.run(kv.models.resolve, model, admin=call.identity.admin)
    ids = await svc.run(
        lambda: _resolve_sources(svc, call, cube, items=items, tier=tier, query=query, top=top)
    )
    job_args = {"items": ids, "model": str(directory), "dtype": dtype, "name": name}
    job_args["quant"] = quant
    job: jobs.Job = await svc.run(
        runner.submit, KV_BUILD, cube=cube, args=job_args, actor=call.identity.principal
    )
    if not wait:
        return {"job": jobs.job_to_wire(job)}
    job = await _wait_job(svc, job.id, timeout)
    _job_outcome(job)
    item_id = str((job.result or {}).get("item_id"))
    store = kv.store()

    def read() -> dict[str, Any]:
        # The job thread enforces the budget just after its commit; doing it here
        # too (idempotent, same lock) means the reply never precedes the eviction.
        store.enforce_budget(actor=KV_ACTOR, protect={(cube, item_id)})
        item = svc.engine.get(cube, item_id)
        return {
            "job": jobs.job_to_wire(job),
            "item": item_to_wire(item),
            "info": store.info(cube, item_id).to_dict(),
        }

    return await svc.run(read)


@op("kv_get")
async def _kv_get(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.opt_str("id")
    name = a.opt_str("name")
    fingerprint = a.req_str("fingerprint")
    allow_stale = a.raw("allow_stale") is True
    a.done()
    svc.require(call.identity, cube, "read")
    kv = _runtime(svc)

    def load() -> tuple[dict[str, Any], list[memoryview]]:
        store = kv.store()
        kv_id = _kv_id(svc, store, cube, item_id, name)
        return store.frames(cube, kv_id, fingerprint, allow_stale=allow_stale)

    header, frames = await svc.run(load)
    header["tensors"] = [{FRAME_KEY: i + 1} for i in range(len(frames))]
    header["bytes"] = sum(f.nbytes for f in frames)
    # memoryviews over the cached tensors: the server sends them with copy=False.
    out: list[Any] = list(frames)
    return Reply(header, out)


@op("kv_list")
async def _kv_list(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    a.done()
    svc.require(call.identity, cube, "read")
    kv = _runtime(svc)
    infos = await svc.run(lambda: kv.store().list_caches(cube))
    return [i.to_dict() for i in infos]


@op("kv_show")
async def _kv_show(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.opt_str("id")
    name = a.opt_str("name")
    a.done()
    svc.require(call.identity, cube, "read")
    kv = _runtime(svc)

    def show() -> dict[str, Any]:
        store = kv.store()
        info = store.info(cube, _kv_id(svc, store, cube, item_id, name)).to_dict()
        item = svc.engine.get(cube, info["item_id"])
        manifest = (item.payload or {}).get("manifest") or {}
        info["model"] = manifest.get("model")
        info["replaces"] = (item.metadata or {}).get("replaces")
        info["reused_tokens"] = (item.metadata or {}).get("reused_tokens")
        return info

    return await svc.run(show)


@op("kv_drop")
async def _kv_drop(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.opt_str("id")
    name = a.opt_str("name")
    a.done()
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    kv = _runtime(svc)
    actor = call.identity.principal

    def drop() -> Any:
        store = kv.store()
        kv_id = _kv_id(svc, store, cube, item_id, name)
        return store.drop(cube, kv_id, actor=actor)

    record = await svc.run(drop)
    svc.written_lsn[actor] = svc.engine.last_lsn
    return to_wire(record)


@op("kv_rebuild")
async def _kv_rebuild(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.opt_str("id")
    name = a.opt_str("name")
    wait, timeout = _wait_arg(call)
    a.done()
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    kv = _runtime(svc)
    _runner(svc)
    actor = call.identity.principal

    def submit() -> list[jobs.Job]:
        store = kv.store()
        if item_id is not None or name is not None:
            kv_id = _kv_id(svc, store, cube, item_id, name)
            store.info(cube, kv_id)  # NotFound / not_kv now, not in the job
            targets = [(kv_id, True)]
        else:
            store.process_changes(actor=KV_ACTOR)
            targets = [(i.item_id, False) for i in store.list_caches(cube) if i.stale]
        out = []
        for kv_id, force in targets:
            job = kv.queue_rebuild(cube, kv_id, force=force, explicit=True, actor=actor)
            if job is not None:
                out.append(job)
        return out

    queued = await svc.run(submit)
    if wait:
        done = []
        for job in queued:
            ended = await _wait_job(svc, job.id, timeout)
            _job_outcome(ended)
            done.append(ended)
        queued = done
    return {"jobs": [jobs.job_to_wire(j) for j in queued]}
