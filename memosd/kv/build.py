"""KvStore: build, store, load, watch and evict activation memory (KV caches).

Theory of operation
===================

**Item.**  A KV cache is an engine item of form ``"activation"`` (tier
``"long"`` by default) whose ``text`` is a one-line description, whose
``payload`` holds the manifest and the blob references
(:mod:`memosd.kv.codec`), whose ``provenance.parents`` are the
``(item id, version)`` pairs it was built from, and whose ``metadata`` is::

    {"kv_name": str | None,          optional stable name (a rebuild keeps it)
     "fingerprint": hex, "num_tokens": n, "bytes": n,
     "stale": bool, "stale_reason": str | None,
     "replaces": old kv item id | None}

**Build** (:meth:`KvStore.build`): render the prefix
(:mod:`memosd.kv.template`), plan chunk reuse against the caches already in
the cube (:func:`memosd.kv.chunks.plan_reuse`), load the reused chunks, run
one no-grad forward pass over the tail only, split the result per chunk,
store each new chunk as a safetensors blob (``engine.blobs.put_bytes``,
fsynced before the item that references it is written), then add the item.
After the commit every referenced blob is checked and re-put if a concurrent
purge deleted it in between (the bytes are at hand).

**Staleness.**  A cache is *stale* when one of its sources has a newer
version whose text or status differs, or was deleted: it gets a new version
with ``metadata.stale = True`` (the same payload, so the same blobs), and
:meth:`KvStore.load` refuses it (``Conflict``, reason ``"stale"``) unless
``allow_stale=True``.  When a source is **purged** the cache (all its
versions) is purged at once - the engine then deletes every chunk blob no
other stored version references, so the tensors that saw the purged text are
gone - and a *placeholder* KV item (no chunks, no blobs, ``stale = True``,
same name, remaining sources) is written so that the rebuild is not lost.

The engine calls :meth:`KvStore.on_change` from its writer thread; it only
queues the event.  :meth:`KvStore.process_changes` (a worker thread or a
scheduler job) applies the queue; :meth:`KvStore.scan` checks every cache
against the current state and is run at start-up, which covers events lost
in a crash.  :meth:`KvStore.rebuild_stale` (a scheduler job) builds a fresh
cache from the sources' current versions as a **new item** carrying the same
``kv_name`` and ``replaces = old id``, then purges the old item, so the old
tensors go away (KV items are derived data; their history has no value and
would pin tensors).

**Budget.**  With ``budget_bytes`` set, after each build the blob bytes of
all live caches (a shared chunk once) are summed and caches are purged in the
policy's eviction order (:mod:`memosd.kv.budget`) until the sum fits; the new
cache is protected.  Loads count as hits (``engine.record_hits``), which the
LRU and heat-aware policies read.

**RAM.**  Assembled caches are kept in an in-process LRU bounded by
``ram_cache_bytes`` (keyed by item id and version, so a new version is never
served from an old entry).  They are immutable and copy-on-read.

**Threads.**  Public methods may be called from any thread; builds and
change processing are serialised by one lock.  :meth:`on_change` never takes
that lock (the writer thread must not wait for a thread that waits for it).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from transformers import DynamicCache

from memosd.errors import BadRequest, CodecError, Conflict, NotFound
from memosd.kv.budget import EvictionPolicy, KvEntry, LRUPolicy
from memosd.kv.cache import LoadedCache, check_fingerprint, dynamic_cache_from, layers_of
from memosd.kv.chunks import CHUNK_TOKENS, ChunkSpan, PartialCandidate, plan_reuse
from memosd.kv.codec import ChunkRef, KvManifest, decode_chunk, encode_chunk
from memosd.kv.frames import cache_to_frames
from memosd.kv.template import DEFAULT_TEMPLATE, PrefixTemplate
from memosd.memcube.model import MemoryItem, PurgeRecord, Status
from memosd.models.backend import ModelBackend, cache_keyword, output_cache
from memosd.models.fingerprint import short_fingerprint

if TYPE_CHECKING:
    from memosd.store.planner import Planner

__all__ = ["ACTIVATION_FORM", "KvInfo", "KvStore", "StalenessReport"]

ACTIVATION_FORM: Final = "activation"
_ITEM_EVENTS: Final = frozenset({"item_written", "item_deleted", "item_purged"})
_PAGE: Final = 500
#: Queued events beyond this are dropped and the next process_changes() scans
#: every cache instead (bounded memory when nobody drains the queue).
MAX_PENDING_EVENTS: Final = 100_000

LayerKV = tuple[torch.Tensor, torch.Tensor]
#: Runs a write plan atomically and returns its result (``engine.atomic``, ``JobContext.commit``).
Committer = Callable[[Callable[["Planner"], MemoryItem]], MemoryItem]


@dataclass(frozen=True, slots=True)
class KvInfo:
    """What ``kv list``/``kv show`` print about one cache."""

    cube: str
    item_id: str
    version: int
    name: str | None
    fingerprint: str
    dtype: str
    quant: str
    num_tokens: int
    nbytes: int
    chunks: int
    sources: tuple[tuple[str, int], ...]
    stale: bool
    stale_reason: str | None
    built_us: int
    last_used_us: int | None
    hits: int

    def to_dict(self) -> dict[str, Any]:
        """msgpack-safe form for the wire and ``--json``."""
        return {
            "cube": self.cube,
            "item_id": self.item_id,
            "version": self.version,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "quant": self.quant,
            "num_tokens": self.num_tokens,
            "bytes": self.nbytes,
            "chunks": self.chunks,
            "sources": [[i, v] for i, v in self.sources],
            "stale": self.stale,
            "stale_reason": self.stale_reason,
            "built_us": self.built_us,
            "last_used_us": self.last_used_us,
            "hits": self.hits,
        }


@dataclass(slots=True)
class StalenessReport:
    """What a :meth:`KvStore.process_changes` / :meth:`KvStore.scan` pass did."""

    marked_stale: list[tuple[str, str]] = field(default_factory=list)
    purged: list[tuple[str, str]] = field(default_factory=list)
    placeholders: list[tuple[str, str]] = field(default_factory=list)
    checked: int = 0


def _kv_meta(item: MemoryItem) -> dict[str, Any]:
    return dict(item.metadata) if isinstance(item.metadata, dict) else {}


class KvStore:
    """Activation memory on top of the storage engine (see the module docstring).

    ``prefill_step`` bounds the tokens per forward call when building (chunked
    prefill: bounded activation memory for long prefixes, same result within
    float noise).  ``data_dir`` is the daemon's data directory, reserved for spill files (not
    used yet: all bytes live in the engine's blob store).  ``listen=False``
    skips registering :meth:`on_change` with the engine (then call
    :meth:`scan` to find stale caches).
    """

    def __init__(
        self,
        engine: Any,
        data_dir: str | Path | None = None,
        *,
        chunk_tokens: int = CHUNK_TOKENS,
        template: PrefixTemplate = DEFAULT_TEMPLATE,
        budget_bytes: int | None = None,
        policy: EvictionPolicy | None = None,
        ram_cache_bytes: int = 256 << 20,
        quant: str = "none",
        prefill_step: int = 2048,
        listen: bool = True,
        clock: Callable[[], int] | None = None,
    ) -> None:
        if chunk_tokens <= 0:
            raise BadRequest("chunk_tokens must be positive")
        self.engine = engine
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.chunk_tokens = chunk_tokens
        self.template = template
        self.budget_bytes = budget_bytes
        self.policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self.ram_cache_bytes = ram_cache_bytes
        self.quant = quant
        if prefill_step <= 0:
            raise BadRequest("prefill_step must be positive")
        self.prefill_step = prefill_step
        self._clock = clock if clock is not None else (lambda: time.time_ns() // 1000)
        self._op_lock = threading.RLock()
        # Guarded by _state_lock, which is never held across an engine call.
        self._state_lock = threading.Lock()
        self._pending: deque[Any] = deque()
        self._overflow = False
        self._indexed: set[str] = set()
        self._watch: dict[tuple[str, str], set[str]] = {}
        self._kv_ids: set[tuple[str, str]] = set()
        self._ram: OrderedDict[tuple[str, str, int], LoadedCache] = OrderedDict()
        self._ram_bytes = 0
        # Last load per cache in this process: the engine flushes hit counts in
        # batches, the budget must see a load that happened a moment ago.
        self._last_used: dict[tuple[str, str], int] = {}
        if listen:
            engine.add_listener(self.on_change)

    # ------------------------------------------------------------------ build

    def build(
        self,
        cube: str,
        items: Sequence[MemoryItem],
        backend: ModelBackend,
        *,
        actor: str | None,
        name: str | None = None,
        tier: str = "long",
        tags: Sequence[str] = (),
        quant: str | None = None,
        replaces: str | None = None,
        purge_replaced: bool = False,
        commit: Committer | None = None,
        progress: Callable[[float, str], None] | None = None,
    ) -> MemoryItem:
        """Build the cache of ``items`` (current versions, in ``cube``) for ``backend``.

        The item is written by one atomic plan that re-checks every source's
        version (``Conflict`` ``stale_source`` if one moved during the forward
        pass) and, with ``purge_replaced``, purges the ``replaces`` item too.
        ``commit(plan)`` runs that plan (default ``engine.atomic``; a job passes
        :meth:`~memosd.scheduler.runner.JobContext.commit` so that the item and
        the job's success are one WAL record).  ``progress(fraction, message)``
        is told about the phases.
        """
        quant = self.quant if quant is None else quant
        report = progress if progress is not None else (lambda fraction, message: None)
        with self._op_lock:
            self._check_sources(cube, items)
            prefix = self.template.render(items, backend)
            fingerprint = backend.fingerprint
            index, partials = self._chunk_index(cube, fingerprint, quant)
            plan = plan_reuse(
                fingerprint,
                prefix.token_ids,
                has_chunk=index.__contains__,
                partials_after=lambda parent: [c for c, _ in partials.get(parent, ())],
                chunk_tokens=self.chunk_tokens,
            )
            reuse_refs = [index[s.key] for s in plan.reused]
            take_last: int | None = None
            if plan.partial is not None:
                reuse_refs.append(
                    next(r for c, r in partials[plan.partial.parent] if c.key == plan.partial.key)
                )
                take_last = plan.partial.length
            blob_bytes: dict[str, bytes] = {}
            layers = self._load_refs(
                reuse_refs, fingerprint, backend, blob_bytes, take_last=take_last
            )
            n = len(prefix.token_ids)
            report(0.1, f"{n} tokens, {plan.compute_from} reused")
            if plan.compute_from < n:
                layers = self._forward(
                    backend, layers, prefix.token_ids[plan.compute_from :], report
                )
            report(0.9, "storing chunks")
            shapes = tuple((int(k.shape[1]), int(k.shape[3])) for k, _ in layers)
            chunks: list[ChunkRef] = []
            for span in plan.spans:
                if span.index < len(plan.reused):
                    chunks.append(index[span.key])
                    continue
                chunks.append(
                    self._store_chunk(
                        span,
                        layers=layers,
                        fingerprint=fingerprint,
                        dtype=backend.dtype,
                        quant=quant,
                        blob_bytes=blob_bytes,
                    )
                )
            manifest = KvManifest(
                fingerprint=fingerprint,
                model=str(backend.path),
                dtype=backend.dtype,
                chunk_tokens=self.chunk_tokens,
                token_ids=prefix.token_ids,
                layers=shapes,
                chunks=tuple(chunks),
                sources=prefix.sources,
                template=self.template.describe(),
                quant=quant,
            )
            item = self._add_item(
                cube,
                manifest,
                actor=actor,
                name=name,
                tier=tier,
                tags=tags,
                replaces=replaces,
                reused_tokens=plan.compute_from,
                commit=commit,
                purge=replaces if purge_replaced else None,
            )
            self._ensure_blobs(manifest, blob_bytes)
            if purge_replaced and replaces is not None:
                self._forget(cube, replaces)
            self._remember(cube, item, manifest)
        if self.budget_bytes is not None:
            self.enforce_budget(actor=actor, protect={(cube, item.id)})
        return item

    def _check_sources(self, cube: str, items: Sequence[MemoryItem]) -> None:
        for it in items:
            if it.cube != cube:
                raise BadRequest(f"item {it.id} is in cube {it.cube!r}, not {cube!r}")
            if it.form == ACTIVATION_FORM:
                raise BadRequest(f"item {it.id} is itself a KV cache", reason="bad_form")
            latest = self.engine.get(cube, it.id)
            if latest.version != it.version or latest.status != Status.ACTIVE:
                raise Conflict(
                    f"item {it.id} is at version {latest.version} ({latest.status}), "
                    f"not {it.version}: build from current versions",
                    reason="stale_source",
                )

    def _forward(
        self,
        backend: ModelBackend,
        prefix_layers: list[LayerKV],
        tail: Sequence[int],
        report: Callable[[float, str], None] | None = None,
    ) -> list[LayerKV]:
        """Run the tail through the model after the loaded prefix, ``prefill_step`` at a time."""
        model = backend.model
        device = torch.device(backend.device)
        cache = (
            dynamic_cache_from([(k.to(device), v.to(device)) for k, v in prefix_layers])
            if prefix_layers
            else DynamicCache()
        )
        ids = list(tail)
        keyword = cache_keyword(model)
        with torch.no_grad():
            for start in range(0, len(ids), self.prefill_step):
                piece = torch.tensor(
                    [ids[start : start + self.prefill_step]], dtype=torch.long, device=device
                )
                cache = output_cache(model(input_ids=piece, **{keyword: cache}, use_cache=True))
                if report is not None:
                    done = min(len(ids), start + self.prefill_step)
                    report(0.1 + 0.8 * done / len(ids), f"prefill {done}/{len(ids)} tokens")
        return [(k.detach(), v.detach()) for k, v in layers_of(cache)]

    def _store_chunk(
        self,
        span: ChunkSpan,
        *,
        layers: list[LayerKV],
        fingerprint: str,
        dtype: str,
        quant: str,
        blob_bytes: dict[str, bytes],
    ) -> ChunkRef:
        parts = [
            (k[0, :, span.start : span.end].cpu(), v[0, :, span.start : span.end].cpu())
            for k, v in layers
        ]
        data = encode_chunk(
            parts,
            fingerprint=fingerprint,
            key=span.key,
            start=span.start,
            dtype=dtype,
            quant=quant,
        )
        sha = str(self.engine.blobs.put_bytes(data))
        blob_bytes[sha] = data
        return ChunkRef(span.key, sha, span.start, span.end, len(data))

    def _add_item(
        self,
        cube: str,
        manifest: KvManifest,
        *,
        actor: str | None,
        name: str | None,
        tier: str,
        tags: Sequence[str],
        replaces: str | None,
        reused_tokens: int = 0,
        stale_reason: str | None = None,
        commit: Committer | None = None,
        purge: str | None = None,
    ) -> MemoryItem:
        what = f"{len(manifest.sources)} memories, {manifest.num_tokens} tokens"
        if stale_reason is not None:
            what = f"awaiting rebuild ({stale_reason}), {len(manifest.sources)} memories"
        text = f"KV cache{' ' + repr(name) if name else ''}: {what}, model " + short_fingerprint(
            manifest.fingerprint
        )
        metadata = {
            "kv_name": name,
            "fingerprint": manifest.fingerprint,
            "num_tokens": manifest.num_tokens,
            "bytes": manifest.nbytes,
            "reused_tokens": reused_tokens,
            "stale": stale_reason is not None,
            "stale_reason": stale_reason,
            "replaces": replaces,
        }
        payload = manifest.to_payload()
        check_sources = stale_reason is None

        def plan(p: Planner) -> MemoryItem:
            if check_sources:
                for sid, version in manifest.sources:
                    latest = p.item(cube, sid)
                    if latest.version != version or latest.status != Status.ACTIVE:
                        raise Conflict(
                            f"item {sid} changed to version {latest.version} "
                            f"({latest.status}) during the build",
                            reason="stale_source",
                        )
            added: MemoryItem = p.add(
                cube,
                text,
                actor=actor,
                form=ACTIVATION_FORM,
                tier=tier,
                tags=tuple(tags),
                source="kv",
                metadata=metadata,
                payload=payload,
                parents=manifest.sources,
            )
            if purge is not None:
                p.purge(cube, purge, actor=actor, reason="kv rebuilt")
            # Watch the sources before the commit's events go out: a change that
            # lands right after the commit must find this cache (a rolled-back
            # plan leaves an entry that the next check forgets).
            self._remember(cube, added, manifest)
            return added

        item: MemoryItem = (commit or self.engine.atomic)(plan)
        return item

    def _ensure_blobs(self, manifest: KvManifest, blob_bytes: dict[str, bytes]) -> None:
        # A purge committed between our put_bytes and our add may have deleted a
        # shared blob; the item now references it, so putting it back is safe.
        for ref in manifest.chunks:
            if not self.engine.blobs.exists(ref.blob):
                data = blob_bytes.get(ref.blob)
                if data is None:
                    raise NotFound(f"KV chunk blob {ref.blob[:12]} vanished during the build")
                self.engine.blobs.put_bytes(data)

    # ------------------------------------------------------------------ load

    def load(
        self,
        cube: str,
        item_id: str,
        backend_or_fingerprint: ModelBackend | str,
        *,
        allow_stale: bool = False,
    ) -> LoadedCache:
        """The cache of KV item ``item_id``, checked against the model's fingerprint."""
        fingerprint = (
            backend_or_fingerprint
            if isinstance(backend_or_fingerprint, str)
            else backend_or_fingerprint.fingerprint
        )
        item = self.engine.get(cube, item_id)
        manifest = self._manifest(item)
        check_fingerprint(manifest.fingerprint, fingerprint, what=f"KV cache {item_id}")
        meta = _kv_meta(item)
        if manifest.is_placeholder:
            raise Conflict(
                f"KV cache {item_id} awaits a rebuild ({meta.get('stale_reason')})",
                reason="stale",
            )
        if meta.get("stale") and not allow_stale:
            raise Conflict(
                f"KV cache {item_id} is stale ({meta.get('stale_reason')}); rebuild it",
                reason="stale",
            )
        now = self._clock()
        self.engine.record_hits(cube, [item_id], now_us=now)
        with self._state_lock:
            self._last_used[(cube, item_id)] = now
        key = (cube, item_id, item.version)
        with self._state_lock:
            hit = self._ram.get(key)
            if hit is not None:
                self._ram.move_to_end(key)
                return hit
        layers = self._load_refs(list(manifest.chunks), fingerprint, manifest, None)
        loaded = LoadedCache(
            layers=tuple(layers),
            token_ids=manifest.token_ids,
            fingerprint=manifest.fingerprint,
            dtype=manifest.dtype,
            item_id=item.id,
            version=item.version,
        )
        self._ram_put(key, loaded)
        return loaded

    def frames(
        self, cube: str, item_id: str, fingerprint: str, *, allow_stale: bool = False
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """``kv_get`` reply: header + raw tensor frames (:mod:`memosd.kv.frames`)."""
        return cache_to_frames(self.load(cube, item_id, fingerprint, allow_stale=allow_stale))

    def _load_refs(
        self,
        refs: Sequence[ChunkRef],
        fingerprint: str,
        shapes_from: ModelBackend | KvManifest,
        blob_bytes: dict[str, bytes] | None,
        *,
        take_last: int | None = None,
    ) -> list[LayerKV]:
        """Per-layer ``[1, H, T, D]`` tensors of consecutive chunks ``refs``.

        ``take_last`` keeps only the first that many tokens of the last chunk.
        """
        if not refs:
            return []
        if isinstance(shapes_from, KvManifest):
            layer_shapes: Sequence[Sequence[int]] = shapes_from.layers
            dtype = shapes_from.dtype
        else:
            layer_shapes = self._layer_shapes(shapes_from)
            dtype = shapes_from.dtype
        per_chunk: list[list[LayerKV]] = []
        for ref in refs:
            data = self.engine.blobs.read(ref.blob)
            if blob_bytes is not None:
                blob_bytes[ref.blob] = data
            per_chunk.append(
                decode_chunk(
                    data,
                    fingerprint=fingerprint,
                    key=ref.key,
                    start=ref.start,
                    length=ref.length,
                    layers=layer_shapes,
                    dtype=dtype,
                )
            )
        if take_last is not None:
            per_chunk[-1] = [(k[:, :take_last], v[:, :take_last]) for k, v in per_chunk[-1]]
        out: list[LayerKV] = []
        for layer in range(len(layer_shapes)):
            k = torch.cat([c[layer][0] for c in per_chunk], dim=1).unsqueeze(0)
            v = torch.cat([c[layer][1] for c in per_chunk], dim=1).unsqueeze(0)
            out.append((k, v))
        return out

    @staticmethod
    def _layer_shapes(backend: ModelBackend) -> list[tuple[int, int]]:
        config = backend.model.config
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return [(heads, head_dim)] * int(config.num_hidden_layers)

    def _ram_put(self, key: tuple[str, str, int], loaded: LoadedCache) -> None:
        size = loaded.nbytes
        if size > self.ram_cache_bytes:
            return
        with self._state_lock:
            if key in self._ram:
                return
            self._ram[key] = loaded
            self._ram_bytes += size
            while self._ram_bytes > self.ram_cache_bytes and self._ram:
                _, old = self._ram.popitem(last=False)
                self._ram_bytes -= old.nbytes

    def _ram_forget(self, cube: str, item_id: str) -> None:
        with self._state_lock:
            for key in [k for k in self._ram if k[0] == cube and k[1] == item_id]:
                self._ram_bytes -= self._ram.pop(key).nbytes

    # ------------------------------------------------------------------ listing

    def _manifest(self, item: MemoryItem) -> KvManifest:
        if item.form != ACTIVATION_FORM:
            raise BadRequest(
                f"item {item.id} is not a KV cache (form {item.form!r})", reason="not_kv"
            )
        return KvManifest.from_payload(item.payload)

    def _iter_kv_items(self, cube: str) -> Iterator[MemoryItem]:
        after: str | None = None
        while True:
            page = self.engine.list_items(
                cube, status=None, form=ACTIVATION_FORM, limit=_PAGE, after=after
            )
            for item in page:
                if item.status != Status.DELETED:
                    yield item
            if len(page) < _PAGE:
                return
            after = page[-1].id

    def info(self, cube: str, item_id: str) -> KvInfo:
        return self._info(self.engine.get(cube, item_id))

    def _info(self, item: MemoryItem) -> KvInfo:
        manifest = self._manifest(item)
        meta = _kv_meta(item)
        return KvInfo(
            cube=item.cube,
            item_id=item.id,
            version=item.version,
            name=meta.get("kv_name"),
            fingerprint=manifest.fingerprint,
            dtype=manifest.dtype,
            quant=manifest.quant,
            num_tokens=manifest.num_tokens,
            nbytes=manifest.nbytes,
            chunks=len(manifest.chunks),
            sources=manifest.sources,
            stale=bool(meta.get("stale")) or manifest.is_placeholder,
            stale_reason=meta.get("stale_reason"),
            built_us=item.recorded_us,
            last_used_us=item.usage.last_hit_us,
            hits=item.usage.hits,
        )

    def list_caches(self, cube: str) -> list[KvInfo]:
        """The KV caches of ``cube`` (oldest id first)."""
        out = []
        for item in self._iter_kv_items(cube):
            try:
                out.append(self._info(item))
            except CodecError:
                continue  # a plugin's activation item with another layout
        return out

    def find(self, cube: str, name: str) -> KvInfo:
        """The newest cache named ``name`` in ``cube`` (:class:`NotFound` if none)."""
        found = [i for i in self.list_caches(cube) if i.name == name]
        if not found:
            raise NotFound(f"no KV cache named {name!r} in cube {cube!r}")
        return max(found, key=lambda i: (i.built_us, i.item_id))

    def drop(
        self, cube: str, item_id: str, *, actor: str | None, reason: str = "kv drop"
    ) -> PurgeRecord:
        """Purge a KV item; blobs no other version references are deleted by the engine."""
        with self._op_lock:
            self._manifest(self.engine.get(cube, item_id))
            record: PurgeRecord = self.engine.purge(cube, item_id, actor=actor, reason=reason)
            self._forget(cube, item_id)
        return record

    # ------------------------------------------------------------------ chunk index

    def _chunk_index(
        self, cube: str, fingerprint: str, quant: str
    ) -> tuple[dict[str, ChunkRef], dict[str, list[tuple[PartialCandidate, ChunkRef]]]]:
        """Stored chunks of ``cube`` for this model: by key, and partial ones by parent."""
        by_key: dict[str, ChunkRef] = {}
        partials: dict[str, list[tuple[PartialCandidate, ChunkRef]]] = {}
        for item in self._iter_kv_items(cube):
            try:
                manifest = KvManifest.from_payload(item.payload)
            except CodecError:
                continue
            if manifest.fingerprint != fingerprint or manifest.quant != quant:
                continue
            if manifest.chunk_tokens != self.chunk_tokens:
                continue
            parent = ""
            for ref in manifest.chunks:
                by_key.setdefault(ref.key, ref)
                tokens = manifest.token_ids[ref.start : ref.end]
                partials.setdefault(parent, []).append((PartialCandidate(ref.key, tokens), ref))
                parent = ref.key
        return by_key, partials

    # ------------------------------------------------------------------ staleness

    def on_change(self, event: Any) -> None:
        """Engine listener: queue events that may make a cache stale (quick, never raises)."""
        try:
            kind = event.kind
            if kind == "cube_dropped":
                self._pending.append(event)  # rare: never dropped
                return
            if kind not in _ITEM_EVENTS or event.cube is None or event.item_id is None:
                return
            key = (event.cube, event.item_id)
            with self._state_lock:
                relevant = event.cube not in self._indexed or key in self._watch
                if key in self._kv_ids:
                    relevant = kind == "item_purged"  # someone purged a cache
            if relevant:
                if len(self._pending) >= MAX_PENDING_EVENTS:
                    self._overflow = True
                else:
                    self._pending.append(event)
        except Exception:
            return

    def pending(self) -> int:
        """Number of queued change events."""
        return len(self._pending)

    def process_changes(self, *, actor: str | None = "memosd:kv") -> StalenessReport:
        """Apply queued events: mark caches stale, purge those built from purged items."""
        if self._overflow:
            self._overflow = False
            self._pending.clear()
            return self.scan(actor=actor)
        report = StalenessReport()
        with self._op_lock:
            affected: dict[tuple[str, str], None] = {}
            while self._pending:
                event = self._pending.popleft()
                if event.kind == "cube_dropped":
                    self._forget_cube(event.cube)
                    continue
                if event.cube not in self._indexed:
                    self._index_cube(event.cube)
                with self._state_lock:
                    kv_key = (event.cube, event.item_id)
                    if kv_key in self._kv_ids:
                        if event.kind == "item_purged":
                            self._kv_ids.discard(kv_key)
                        continue
                    for kv_id in self._watch.get(kv_key, ()):
                        affected[(event.cube, kv_id)] = None
            for cube, kv_id in affected:
                self._check(cube, kv_id, actor, report)
        return report

    def scan(self, cube: str | None = None, *, actor: str | None = "memosd:kv") -> StalenessReport:
        """Check every cache (of ``cube`` or of all cubes) against the current state."""
        report = StalenessReport()
        with self._op_lock:
            cubes = [cube] if cube is not None else [c.name for c in self.engine.list_cubes()]
            for name in cubes:
                for item in list(self._iter_kv_items(name)):
                    self._check(name, item.id, actor, report)
                with self._state_lock:
                    self._indexed.add(name)
        return report

    def _source_problem(self, cube: str, source_id: str, version: int) -> str | None:
        """Why source ``(id, version)`` is no longer what the cache holds, or None."""
        try:
            latest = self.engine.get(cube, source_id)
        except NotFound as exc:
            return "purged" if exc.reason != "deleted" else "deleted"
        if latest.version == version:
            return None
        if latest.status != Status.ACTIVE:
            return str(latest.status)  # archived
        try:
            old = self.engine.get(cube, source_id, version=version)
        except NotFound:
            return "updated"
        return None if old.text == latest.text else "updated"

    def _check(self, cube: str, kv_id: str, actor: str | None, report: StalenessReport) -> None:
        try:
            item = self.engine.get(cube, kv_id)
            manifest = self._manifest(item)
        except (NotFound, BadRequest):
            self._forget(cube, kv_id)
            return
        report.checked += 1
        problems = {
            sid: p
            for sid, ver in manifest.sources
            if (p := self._source_problem(cube, sid, ver)) is not None
        }
        self._remember(cube, item, manifest)
        if not problems:
            return
        meta = _kv_meta(item)
        purged = sorted(sid for sid, p in problems.items() if p == "purged")
        if purged and not manifest.is_placeholder:
            # Erase the tensors now; keep the intent to rebuild in a placeholder.
            remaining = tuple((s, v) for s, v in manifest.sources if s not in purged)
            self.engine.purge(cube, kv_id, actor=actor, reason=f"source purged: {purged[0]}")
            self._forget(cube, kv_id)
            report.purged.append((cube, kv_id))
            if remaining:
                placeholder = KvManifest(
                    fingerprint=manifest.fingerprint,
                    model=manifest.model,
                    dtype=manifest.dtype,
                    chunk_tokens=manifest.chunk_tokens,
                    token_ids=(),
                    layers=manifest.layers,
                    chunks=(),
                    sources=remaining,
                    template=manifest.template,
                    quant=manifest.quant,
                )
                new = self._add_item(
                    cube,
                    placeholder,
                    actor=actor,
                    name=meta.get("kv_name"),
                    tier=item.tier,
                    tags=item.tags,
                    replaces=kv_id,
                    stale_reason="source purged",
                )
                self._remember(cube, new, placeholder)
                report.placeholders.append((cube, new.id))
            return
        if meta.get("stale"):
            return
        reason = ", ".join(f"{sid} {p}" for sid, p in sorted(problems.items()))
        meta.update(stale=True, stale_reason=reason)
        self.engine.update(cube, kv_id, actor=actor, metadata=meta, expected_version=item.version)
        self._ram_forget(cube, kv_id)
        report.marked_stale.append((cube, kv_id))

    def rebuild_stale(
        self,
        backend: ModelBackend,
        *,
        actor: str | None = "memosd:kv",
        cube: str | None = None,
        limit: int | None = None,
    ) -> list[MemoryItem]:
        """Rebuild stale caches of ``backend``'s model from their sources' current versions.

        Each rebuild is a new item (same ``kv_name``, ``replaces`` = old id);
        the old item is purged.  A cache none of whose sources is left is
        purged without a replacement.  Returns the new items.
        """
        self.process_changes(actor=actor)
        built: list[MemoryItem] = []
        cubes = [cube] if cube is not None else [c.name for c in self.engine.list_cubes()]
        for name in cubes:
            for info in self.list_caches(name):
                if limit is not None and len(built) >= limit:
                    return built
                if not info.stale or info.fingerprint != backend.fingerprint:
                    continue
                item = self.engine.get(name, info.item_id)
                sources: list[MemoryItem] = []
                for sid, _ in info.sources:
                    try:
                        current = self.engine.get(name, sid)
                    except NotFound:
                        continue
                    if current.status == Status.ACTIVE:
                        sources.append(current)
                if sources:
                    built.append(
                        self.build(
                            name,
                            sources,
                            backend,
                            actor=actor,
                            name=info.name,
                            tier=item.tier,
                            tags=item.tags,
                            quant=self._manifest(item).quant,
                            replaces=info.item_id,
                        )
                    )
                self.drop(name, info.item_id, actor=actor, reason="kv rebuilt")
        return built

    # ------------------------------------------------------------------ budget

    def usage_bytes(self) -> int:
        """Bytes of chunk blobs referenced by live caches, a shared chunk once."""
        return sum(self._blob_sizes().values())

    def _blob_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for cube in self.engine.list_cubes():
            for item in self._iter_kv_items(cube.name):
                try:
                    for ref in KvManifest.from_payload(item.payload).chunks:
                        sizes[ref.blob] = ref.nbytes
                except CodecError:
                    continue
        return sizes

    def enforce_budget(
        self, *, actor: str | None = "memosd:kv", protect: set[tuple[str, str]] | None = None
    ) -> list[tuple[str, str]]:
        """Purge caches in policy order until the referenced bytes fit the budget."""
        if self.budget_bytes is None:
            return []
        protect = protect or set()
        evicted: list[tuple[str, str]] = []
        with self._op_lock:
            entries: list[KvEntry] = []
            refs: dict[tuple[str, str], list[ChunkRef]] = {}
            for cube in self.engine.list_cubes():
                for item in self._iter_kv_items(cube.name):
                    try:
                        manifest = KvManifest.from_payload(item.payload)
                    except CodecError:
                        continue
                    refs[(cube.name, item.id)] = list(manifest.chunks)
                    last_used = max(
                        item.usage.last_hit_us or 0, self._last_used.get((cube.name, item.id), 0)
                    )
                    entries.append(
                        KvEntry(
                            cube=cube.name,
                            item_id=item.id,
                            nbytes=manifest.nbytes,
                            built_us=item.recorded_us,
                            last_used_us=last_used or None,
                            hits=item.usage.hits,
                            heat=item.usage.heat,
                        )
                    )
            users: dict[str, int] = {}
            sizes: dict[str, int] = {}
            for chunk_refs in refs.values():
                for ref in {r.blob: r for r in chunk_refs}.values():
                    users[ref.blob] = users.get(ref.blob, 0) + 1
                    sizes[ref.blob] = ref.nbytes
            total = sum(sizes.values())
            for entry in self.policy.eviction_order(entries, self._clock()):
                if total <= self.budget_bytes:
                    break
                key = (entry.cube, entry.item_id)
                if key in protect:
                    continue
                self.drop(entry.cube, entry.item_id, actor=actor, reason="kv budget")
                evicted.append(key)
                for blob in {r.blob for r in refs[key]}:
                    users[blob] -= 1
                    if users[blob] == 0:
                        total -= sizes[blob]
        return evicted

    # ------------------------------------------------------------------ indexes

    def _index_cube(self, cube: str) -> None:
        try:
            items = list(self._iter_kv_items(cube))
        except NotFound:
            return
        for item in items:
            try:
                self._remember(cube, item, KvManifest.from_payload(item.payload))
            except CodecError:
                continue
        with self._state_lock:
            self._indexed.add(cube)

    def _remember(self, cube: str, item: MemoryItem, manifest: KvManifest) -> None:
        with self._state_lock:
            self._kv_ids.add((cube, item.id))
            for sid, _ in manifest.sources:
                self._watch.setdefault((cube, sid), set()).add(item.id)

    def _forget(self, cube: str, kv_id: str) -> None:
        self._ram_forget(cube, kv_id)
        with self._state_lock:
            self._kv_ids.discard((cube, kv_id))
            self._last_used.pop((cube, kv_id), None)
            for key in [k for k, ids in self._watch.items() if k[0] == cube and kv_id in ids]:
                self._watch[key].discard(kv_id)
                if not self._watch[key]:
                    del self._watch[key]

    def _forget_cube(self, cube: str) -> None:
        with self._state_lock:
            self._indexed.discard(cube)
            self._kv_ids = {k for k in self._kv_ids if k[0] != cube}
            self._watch = {k: v for k, v in self._watch.items() if k[0] != cube}
            for key in [k for k in self._ram if k[0] == cube]:
                self._ram_bytes -= self._ram.pop(key).nbytes
