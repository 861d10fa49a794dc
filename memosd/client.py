"""Client library: :class:`Client` (sync, thread-safe) and :class:`AsyncClient` (anyio).

Both speak docs/protocol.md over the daemon's ipc socket and expose the same
methods.  Errors come back as the class the daemon raised (the one error tree
of :mod:`memosd.errors`); a request that gets no answer within ``timeout``
raises ``Unavailable(reason="timeout")``, and a daemon that is not running
``Unavailable(reason="not_running")``.

Threads and processes:

* :class:`Client` keeps one DEALER socket per thread (ZeroMQ sockets are not
  thread-safe), created on first use in each thread; replies are matched to
  requests by id, so a late reply to a timed-out request is discarded.  Many
  threads may share one ``Client``.
* After ``fork()`` a ``Client`` notices the new pid and opens fresh sockets
  in the child (a ZeroMQ context must not cross a fork).  Each process may
  just as well open its own.
* :class:`AsyncClient` owns one DEALER and a reader task; many tasks may
  pipeline requests on it concurrently.  Use it as ``async with`` on anyio's
  asyncio backend (pyzmq has no trio support).

Change feed: ``subscribe(cube=None)`` opens a DEALER connection of its own,
sends the ``subscribe`` op (authenticated like any request) and yields the
events the daemon pushes on it: only events of cubes the principal can read,
plus ``gap`` (events were dropped because the reader fell behind) and a final
``subscription_ended``.  The daemon's PUB socket is for its operator only.

Items are :class:`memosd.memcube.model.MemoryItem` values (the same type the
engine and plugins use); ``Item`` is an alias.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import zmq
import zmq.asyncio

from memosd.errors import BadRequest, Unavailable, error_from_wire
from memosd.memcube.model import MemoryItem, Provenance, PurgeRecord, Usage
from memosd.protocol import decode_event, decode_response, encode_request
from memosd.settings import default_socket_path

if TYPE_CHECKING:
    from memosd.kv.cache import LoadedCache

__all__ = [
    "AsyncClient",
    "AsyncSubscription",
    "Client",
    "CubeInfo",
    "Event",
    "Hit",
    "Item",
    "LoraAdapter",
    "Subscription",
    "combine_lora",
    "item_from_wire",
    "load_lora",
    "save_lora",
]

T = TypeVar("T")
Item = MemoryItem
_CUBE_FIELDS: Final = ("name", "owner", "config", "schema_version", "created_us")


@dataclass(frozen=True, slots=True)
class Hit:
    item: Item
    score: float
    # Per-signal scores ("dense", "lexical", boosts...) when the search asked
    # for ``explain``; empty otherwise.
    components: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CubeInfo:
    name: str
    owner: str
    config: dict[str, Any]
    schema_version: int
    created_us: int
    access: str | None = None  # your level: "read" | "write" | "owner"
    counts: dict[str, int] | None = None  # items by status (get_cube only)
    grants: dict[str, str] | None = None  # principal -> level (owner/admin, get_cube only)


@dataclass(frozen=True, slots=True)
class Event:
    """One change-feed message (ids only, never contents).

    Besides the engine's kinds (``item_written``, ``job_changed``, ...) a
    subscription yields ``gap`` (``missed`` events were dropped because this
    subscriber fell behind) and, last, ``subscription_ended`` (``reason``:
    ``access_revoked`` or ``cube_dropped``).
    """

    kind: str
    cube: str | None
    item_id: str | None
    version: int | None
    lsn: int
    operation: str | None = None
    reason: str | None = None
    missed: int | None = None
    # Job events (``job_queued``, ``job_progress``, ``job_succeeded``...): the
    # job's id ("job"), kind, state, attempts, progress, message, error, result.
    job: dict[str, Any] | None = None


# --- decoding ---------------------------------------------------------------------------


def _bad(what: str) -> BadRequest:
    return BadRequest(f"unexpected response shape for {what}", reason="bad_response")


#: MemoryItem's fields in declaration order (item_from_wire fills them in this order).
_ITEM_ORDER: Final = (
    "id",
    "cube",
    "version",
    "form",
    "tier",
    "status",
    "text",
    "metadata",
    "payload",
    "created_us",
    "recorded_us",
    "valid_from_us",
    "valid_to_us",
    "provenance",
    "usage",
    "tags",
    "importance",
    "ttl_s",
)
if tuple(MemoryItem.__dataclass_fields__) != _ITEM_ORDER:  # pragma: no cover - a model change
    raise ImportError("memosd.client: MemoryItem's fields changed; update _ITEM_ORDER")
# The slots' own setters: a frozen dataclass's __init__ goes through
# object.__setattr__ once per field, which makes building an item cost more
# than unpacking it (a search decodes k of them).
_ITEM_SETTERS: Final = tuple(MemoryItem.__dict__[name].__set__ for name in _ITEM_ORDER)
_NEW: Final = object.__new__
_NO_USAGE: Final[dict[str, Any]] = {}


def item_from_wire(wire: Any) -> Item:
    """Rebuild a MemoryItem from its wire map (unknown keys from newer daemons ignored).

    The same item as ``MemoryItem(**fields)``, built without the frozen
    dataclass's ``__init__`` (the fields are filled through their slots).
    """
    if type(wire) is not dict:
        raise _bad("item")
    try:
        prov = wire["provenance"]
        parents = prov.get("parents")
        usage = wire.get("usage") or _NO_USAGE
        tags = wire.get("tags")
        values = (
            wire["id"],
            wire["cube"],
            wire["version"],
            wire["form"],
            wire["tier"],
            wire["status"],
            wire["text"],
            wire["metadata"],
            wire["payload"],
            wire["created_us"],
            wire["recorded_us"],
            wire["valid_from_us"],
            wire["valid_to_us"],
            Provenance(
                prov.get("source"),
                prov.get("actor"),
                prov.get("session"),
                tuple((str(p[0]), int(p[1])) for p in parents) if parents else (),
                prov.get("operation", ""),
            ),
            Usage(usage.get("hits", 0), usage.get("last_hit_us"), usage.get("heat", 0.0)),
            tuple(tags) if tags else (),
            wire["importance"],
            wire["ttl_s"],
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise _bad("item") from None
    item: Item = _NEW(MemoryItem)
    for set_field, value in zip(_ITEM_SETTERS, values, strict=True):
        set_field(item, value)
    return item


def _cube_from_wire(wire: Any) -> CubeInfo:
    if type(wire) is not dict:
        raise _bad("cube")
    try:
        return CubeInfo(
            **{k: wire[k] for k in _CUBE_FIELDS},
            access=wire.get("access"),
            counts=wire.get("counts"),
            grants=wire.get("grants"),
        )
    except (KeyError, TypeError):
        raise _bad("cube") from None


def _event_from_wire(wire: Any) -> Event:
    if type(wire) is not dict:
        raise _bad("event")
    try:
        return Event(
            kind=str(wire.get("kind")),
            cube=wire.get("cube"),
            item_id=wire.get("item_id"),
            version=wire.get("version"),
            lsn=int(wire.get("lsn") or 0),
            operation=wire.get("operation"),
            reason=wire.get("reason"),
            missed=wire.get("missed"),
            job=wire["job"] if type(wire.get("job")) is dict else None,
        )
    except (TypeError, ValueError):
        raise _bad("event") from None


_KEEPALIVE: Final = "keepalive"
_ENDED: Final = "subscription_ended"


def _items(wire: Any) -> list[Item]:
    if type(wire) is not list:
        raise _bad("item list")
    return [item_from_wire(w) for w in wire]


_HIT_ITEM: Final = Hit.__dict__["item"]  # the slot (member descriptor) behind Hit.item
_HIT_SET_SCORE: Final = Hit.__dict__["score"].__set__
_HIT_SET_COMPONENTS: Final = Hit.__dict__["components"].__set__


class _LazyHit(Hit):
    """A :class:`Hit` whose item is built from its wire map on first access.

    A search decodes k items; building each costs more than unpacking it,
    and a caller often reads a few hits or only the scores.  Otherwise a
    plain Hit: equal to one with the same item, same repr and fields (they
    read ``item``, which builds it), frozen, picklable.  A malformed item map
    raises BadRequest when ``item`` is first read.
    """

    __slots__ = ("_wire",)

    @property  # stands for the frozen dataclass field
    def item(self) -> Item:
        try:
            item: Item = _HIT_ITEM.__get__(self, Hit)
        except AttributeError:  # not built yet
            item = item_from_wire(_LAZY_WIRE.__get__(self, _LazyHit))
            _HIT_ITEM.__set__(self, item)
            _LAZY_WIRE.__delete__(self)
        return item

    @item.setter
    def item(self, value: Item) -> None:  # __init__ (dataclasses.replace); users get Frozen...
        _HIT_ITEM.__set__(self, value)

    def _plain(self) -> Hit:
        return Hit(self.item, self.score, self.components)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Hit):
            return (self.item, self.score, self.components) == (
                other.item,
                other.score,
                other.components,
            )
        return NotImplemented

    __hash__ = Hit.__hash__

    def __repr__(self) -> str:
        return repr(self._plain())

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and copy as a plain Hit
        return (Hit, (self.item, self.score, self.components))


_LAZY_WIRE: Final = _LazyHit.__dict__["_wire"]
_NEW_HIT: Final = object.__new__


def _hits(wire: Any) -> list[Hit]:
    if type(wire) is not list:
        raise _bad("search")
    hits: list[Hit] = []
    try:
        for h in wire:
            item = h["item"]
            if type(item) is not dict:
                raise _bad("item")
            hit: Hit = _NEW_HIT(_LazyHit)
            _LAZY_WIRE.__set__(hit, item)
            _HIT_SET_SCORE(hit, float(h["score"]))
            _HIT_SET_COMPONENTS(
                hit, {str(k): float(v) for k, v in (h.get("components") or {}).items()}
            )
            hits.append(hit)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _bad("search") from None
    return hits


def _cubes(wire: Any) -> list[CubeInfo]:
    if type(wire) is not list:
        raise _bad("cube list")
    return [_cube_from_wire(w) for w in wire]


def _purge(wire: Any) -> PurgeRecord:
    try:
        return PurgeRecord(**wire)
    except TypeError:
        raise _bad("purge") from None


def _same(wire: Any) -> Any:
    return wire


def _none(wire: Any) -> None:
    return None


def _time_us(value: int | float | datetime | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("as_of must be an int of microseconds or a datetime")
    return value


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


# A request before it is sent: op, args, frames, how to decode the result.
@dataclass(slots=True)
class _Req:
    op: str
    args: dict[str, Any]
    decode: Callable[[Any], Any] = _same
    frames: list[bytes] = field(default_factory=list)


class _Requests:
    """Builds the request of each public method once, for both clients."""

    @staticmethod
    def add(
        cube: str,
        text: str,
        *,
        tags: Iterable[str] = (),
        source: str | None = None,
        session: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        tier: str | None = None,
        form: str | None = None,
        importance: float | None = None,
        ttl_s: int | None = None,
        valid_from_us: int | None = None,
        valid_to_us: int | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> _Req:
        args = _drop_none(
            cube=cube,
            text=text,
            source=source,
            session=session,
            metadata=dict(metadata) if metadata is not None else None,
            tier=tier,
            form=form,
            importance=importance,
            ttl_s=ttl_s,
            valid_from_us=valid_from_us,
            valid_to_us=valid_to_us,
            payload=dict(payload) if payload is not None else None,
        )
        tag_list = list(tags)
        if tag_list:
            args["tags"] = tag_list
        return _Req("add", args, item_from_wire)

    @staticmethod
    def add_many(cube: str, items: Iterable[str | Mapping[str, Any]]) -> _Req:
        entries: list[dict[str, Any]] = []
        for entry in items:
            if isinstance(entry, str):
                entries.append({"text": entry})
                continue
            wire = {k: v for k, v in entry.items() if v is not None}
            if "tags" in wire:
                wire["tags"] = list(wire["tags"])
            for key in ("metadata", "payload"):
                if key in wire:
                    wire[key] = dict(wire[key])
            entries.append(wire)
        return _Req("add_many", {"cube": cube, "items": entries}, _items)

    @staticmethod
    def update(cube: str, id: str, text: str | None, changes: Mapping[str, Any]) -> _Req:
        args: dict[str, Any] = {"cube": cube, "id": id}
        if text is not None:
            args["text"] = text
        for key, value in changes.items():
            if value is not None:
                args[key] = list(value) if key == "tags" else value
        return _Req("update", args, item_from_wire)

    @staticmethod
    def get(cube: str, id: str, version: int | None, as_of: int | float | datetime | None) -> _Req:
        args = _drop_none(cube=cube, id=id, version=version, as_of_us=_time_us(as_of))
        return _Req("get", args, item_from_wire)

    @staticmethod
    def search(cube: str | Sequence[str], query: str, *, k: int, **filters: Any) -> _Req:
        tags = list(filters.pop("tags", ()) or ())
        if isinstance(cube, str):
            args = _drop_none(cube=cube, query=query, k=k, **filters)
        else:
            args = _drop_none(cubes=list(cube), query=query, k=k, **filters)
        if tags:
            args["tags"] = tags
        return _Req("search", args, _hits)

    # --- jobs and tiers ---
    @staticmethod
    def jobs(state: str | None, cube: str | None, kind: str | None, limit: int | None) -> _Req:
        return _Req("job_list", _drop_none(state=state, cube=cube, kind=kind, limit=limit))

    @staticmethod
    def tier_run(cube: str, policy: str, wait: bool, timeout: float | None) -> _Req:
        return _Req(
            "tier_run", _drop_none(cube=cube, policy=policy, wait=wait, timeout=timeout), _dicts
        )


def _dicts(wire: Any) -> list[dict[str, Any]]:
    if type(wire) is not list or any(type(w) is not dict for w in wire):
        raise _bad("job list")
    return wire


def _dict(wire: Any) -> dict[str, Any]:
    if type(wire) is not dict:
        raise _bad("job")
    return wire


#: How long ``wait_job`` sleeps between polls (grows to the second value).
_WAIT_POLL_S: Final = (0.02, 0.5)


def _wait_timeout(job_id: str, timeout: float) -> Unavailable:
    return Unavailable(f"job {job_id} did not end within {timeout:g}s", reason="timeout")


def _tier_run_timeout(timeout: float | None, wait: bool, base: float) -> float:
    """The request timeout of ``tier_run``: the run's own (daemon default 300 s) + a margin."""
    if not wait:
        return base
    return max(base, (timeout if timeout is not None else 300.0) + 10.0)


def _export_bytes(wire: Any) -> bytes:
    data = wire.get("data") if type(wire) is dict else None
    if type(data) is not bytes:
        raise _bad("export_cube")
    return data


# --- activation memory (KV caches) -------------------------------------------------------

#: ``kv_build``/``kv_rebuild`` with ``wait``: the daemon's default wait (s).
_KV_WAIT_S: Final = 300.0


def _kv_ref(id: str | None, name: str | None) -> dict[str, Any]:
    if (id is None) == (name is None):
        raise BadRequest("give exactly one of `id` and `name`", reason="bad_arg")
    return _drop_none(id=id, name=name)


def _kv_build_args(
    cube: str,
    model: str | os.PathLike[str],
    *,
    items: Sequence[str] | None,
    tier: str | None,
    query: str | None,
    top: int | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    return _drop_none(
        cube=cube,
        model=str(Path(model).expanduser().absolute()),
        items=list(items) if items is not None else None,
        tier=tier,
        query=query,
        top=top,
        **options,
    )


def _kv_wait_timeout(base: float, wait: bool, timeout: float | None) -> float:
    return max(base, (timeout if timeout is not None else _KV_WAIT_S) + 10.0) if wait else base


def _kv_build_result(wire: Any) -> dict[str, Any]:
    out = _dict(wire)
    if "item" in out:
        out["item"] = item_from_wire(out["item"])
    return out


def _kv_fingerprint(backend: Any) -> str:
    fingerprint = backend if isinstance(backend, str) else getattr(backend, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise BadRequest("kv_get needs a model backend (or its fingerprint)", reason="bad_arg")
    return fingerprint


def _kv_loaded(wire: Any, fingerprint: str) -> LoadedCache:
    """The ``kv_get`` reply as a LoadedCache (tensors alias the received frames)."""
    from memosd.kv.cache import check_fingerprint  # noqa: PLC0415 - torch: only for KV
    from memosd.kv.frames import frames_to_cache  # noqa: PLC0415

    if type(wire) is not dict or type(wire.get("tensors")) is not list:
        raise _bad("kv_get")
    header = dict(wire)
    loaded = frames_to_cache(header, header.pop("tensors"))
    check_fingerprint(loaded.fingerprint, fingerprint)
    return loaded


# --- parameter memory (LoRA adapters) ------------------------------------------------------

#: ``lora_train``/``lora_retrain`` with ``wait``: the daemon's default wait (s).
_LORA_WAIT_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """One version of a cube's LoRA adapter as ``lora_get`` returns it.

    ``data`` is the safetensors blob (peft's adapter state dict, the base
    model's fingerprint and the LoRA config in its header); ``manifest`` is
    what it was trained on and how (docs/parameter-memory.md).
    """

    cube: str
    version: int
    item_id: str
    status: str
    sha256: str
    base_fingerprint: str
    manifest: dict[str, Any]
    data: bytes = field(repr=False)

    def load(self, backend: Any, *, into: Any = None, adapter_name: str = "default") -> Any:
        """A peft model: ``backend``'s model (deep-copied) or ``into`` with this adapter.

        ``Conflict(reason="fingerprint_mismatch")`` if the backend is another model.
        """
        return load_lora(self, backend, into=into, adapter_name=adapter_name)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write a peft adapter directory (``PeftModel.from_pretrained`` reads it)."""
        return save_lora(self, directory)


def _lora_adapter(wire: Any) -> LoraAdapter:
    if type(wire) is not dict or type(wire.get("adapter")) is not bytes:
        raise _bad("lora_get")
    try:
        return LoraAdapter(
            cube=str(wire["cube"]),
            version=int(wire["version"]),
            item_id=str(wire["item_id"]),
            status=str(wire.get("status", "")),
            sha256=str(wire["sha256"]),
            base_fingerprint=str(wire["base_fingerprint"]),
            manifest=dict(wire.get("manifest") or {}),
            data=wire["adapter"],
        )
    except (KeyError, TypeError, ValueError):
        raise _bad("lora_get") from None


def _lora_fingerprint(backend: Any) -> str | None:
    if backend is None:
        return None
    fingerprint = backend if isinstance(backend, str) else getattr(backend, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise BadRequest("expected a model backend (or its fingerprint)", reason="bad_arg")
    return fingerprint


def _lora_wait_timeout(base: float, wait: bool, timeout: float | None) -> float:
    return max(base, (timeout if timeout is not None else _LORA_WAIT_S) + 10.0) if wait else base


def _lora_train_args(
    cube: str,
    model: str | os.PathLike[str],
    *,
    from_tier: str | None,
    items: Sequence[str] | None,
    settings: Mapping[str, Any] | None,
    dtype: str | None,
    wait: bool,
    timeout: float | None,
) -> dict[str, Any]:
    return _drop_none(
        cube=cube,
        model=str(Path(model).expanduser().absolute()),
        from_tier=from_tier,
        items=list(items) if items is not None else None,
        settings=dict(settings) if settings else None,
        dtype=dtype,
        wait=wait or None,
        timeout=timeout,
    )


def _lora_retrain_args(
    cube: str,
    model: str | os.PathLike[str] | None,
    *,
    settings: Mapping[str, Any] | None,
    dtype: str | None,
    wait: bool,
    timeout: float | None,
) -> dict[str, Any]:
    return _drop_none(
        cube=cube,
        model=str(Path(model).expanduser().absolute()) if model is not None else None,
        settings=dict(settings) if settings else None,
        dtype=dtype,
        wait=wait or None,
        timeout=timeout,
    )


def load_lora(
    adapter: LoraAdapter, backend: Any, *, into: Any = None, adapter_name: str = "default"
) -> Any:
    """A peft model with ``adapter`` loaded (see :meth:`LoraAdapter.load`); imports torch."""
    import copy  # noqa: PLC0415

    from memosd.lora.adapter import attach_adapter, decode_adapter  # noqa: PLC0415 - torch

    model = into if into is not None else copy.deepcopy(backend.model)
    return attach_adapter(
        model,
        decode_adapter(adapter.data),
        model_fingerprint=str(backend.fingerprint),
        adapter_name=adapter_name,
    )


def combine_lora(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    backend: Any,
    *,
    combination_type: str = "cat",
) -> Any:
    """One peft model serving ``sum(w_i * adapter_i)`` over a copy of ``backend``'s model.

    ``combination_type="cat"`` (default) is exact; peft's others (``"linear"``,
    ``"svd"``...) are passed through to ``add_weighted_adapter``.  Every
    adapter's fingerprint is checked against the backend's.
    """
    from memosd.lora.adapter import combine_adapters, decode_adapter  # noqa: PLC0415 - torch

    return combine_adapters(
        [decode_adapter(a.data) for a in adapters],
        weights,
        backend.model,
        model_fingerprint=str(backend.fingerprint),
        combination_type=combination_type,
    )


def save_lora(adapter: LoraAdapter, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as a peft adapter directory; returns it.

    ``adapter_model.safetensors`` (the blob as is), ``adapter_config.json``
    (peft's ``LoraConfig``, ``base_model_name_or_path`` = the base model's
    directory on the daemon's host) and ``memosd_manifest.json``.
    """
    import json  # noqa: PLC0415

    from memosd.lora.adapter import decode_adapter, lora_config  # noqa: PLC0415 - torch

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    blob = decode_adapter(adapter.data)
    config = lora_config(blob.config)
    base = adapter.manifest.get("base_model") or {}
    config.base_model_name_or_path = base.get("path")
    config.save_pretrained(str(target))
    (target / "adapter_model.safetensors").write_bytes(adapter.data)
    manifest = {
        **adapter.manifest,
        "cube": adapter.cube,
        "version": adapter.version,
        "item_id": adapter.item_id,
    }
    (target / "memosd_manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    return target


# --- the sync client ---------------------------------------------------------------------


class _Base:
    def __init__(
        self, socket: str | os.PathLike[str] | None, token: str | None, timeout: float
    ) -> None:
        self.socket_path = Path(socket) if socket is not None else default_socket_path()
        self.endpoint = f"ipc://{self.socket_path}"
        self.token = token if token is not None else os.environ.get("MEMOSD_TOKEN") or None
        self.timeout = timeout
        self._ids = itertools.count(1)

    def _not_running(self) -> Unavailable:
        return Unavailable(
            f"memosd is not running (no socket at {self.socket_path}); start it with `memosd` "
            "or point MEMOSD_SOCKET at the daemon's socket",
            reason="not_running",
        )

    def _timeout_error(self, op: str, timeout: float) -> Unavailable:
        if not self.socket_path.exists():
            return self._not_running()
        return Unavailable(
            f"no answer from memosd at {self.socket_path} to {op!r} within {timeout:g}s",
            reason="timeout",
        )

    def _result(self, ok: bool, payload: Any) -> Any:
        if ok:
            return payload
        raise error_from_wire(payload)


def _dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.connect(endpoint)
    return sock


class Client(_Base):
    """Synchronous client; safe to share between threads (one socket per thread)."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(socket, token, timeout)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket[Any]] = []
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's socket; the client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
            if os.getpid() == self._pid:
                for sock in sockets:
                    sock.close(linger=0)
                # destroy, not term: term would wait for open subscriptions.
                self._ctx.destroy(linger=0)

    def _socket(self) -> zmq.Socket[Any]:
        if self._closed:
            raise Unavailable("this client is closed", reason="closed")
        if os.getpid() != self._pid:
            self._after_fork()
        sock: zmq.Socket[Any] | None = getattr(self._local, "sock", None)
        if sock is None:
            if not self.socket_path.exists():
                raise self._not_running()
            with self._lock:
                sock = _dealer(self._ctx, self.endpoint)
                self._sockets.append(sock)
            self._local.sock = sock
            self._local.rcvtimeo = -1
        return sock

    def _after_fork(self) -> None:
        with self._lock:
            if os.getpid() != self._pid:
                self._pid = os.getpid()
                self._ctx = zmq.Context()  # the parent's context is unusable here
                self._sockets = []
                self._local = threading.local()

    def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        frames: Iterable[bytes] = (),
        timeout: float | None = None,
        copy: bool = True,
    ) -> Any:
        """Send one request and wait for its result (raw wire form).

        ``copy=False`` receives the reply's extra frames as ``zmq.Frame``
        objects (zero-copy buffers, e.g. ``kv_get``'s tensors) instead of bytes.
        """
        sock = self._socket()
        rid = next(self._ids)
        wait_s = self.timeout if timeout is None else timeout
        message = encode_request(rid, op, args or {}, token=self.token, frames=list(frames))
        try:
            sock.send_multipart(message, flags=zmq.DONTWAIT)
        except zmq.Again:
            raise self._timeout_error(op, wait_s) from None
        deadline = time.monotonic() + wait_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise self._timeout_error(op, wait_s)
            if self._local.rcvtimeo != remaining_ms:
                sock.setsockopt(zmq.RCVTIMEO, remaining_ms)
                self._local.rcvtimeo = remaining_ms
            try:
                reply: list[Any] = list(sock.recv_multipart(0, copy=copy))
            except zmq.Again:
                raise self._timeout_error(op, wait_s) from None
            if not copy and reply:
                reply[0] = reply[0].bytes
            got, ok, payload = decode_response(reply)
            if got == rid:
                return self._result(ok, payload)
            if got is None and not ok:  # the daemon could not read our id at all
                return self._result(ok, payload)
            # else: a late reply to an earlier, timed-out request: drop it

    def _do(self, req: _Req) -> Any:
        return req.decode(self.call(req.op, req.args, frames=req.frames))

    # --- session ---
    def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("ping")
        return result

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("whoami")
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    # --- cubes ---
    def create_cube(
        self, name: str, *, config: Mapping[str, Any] | None = None, owner: str | None = None
    ) -> CubeInfo:
        args = _drop_none(name=name, config=dict(config) if config else None, owner=owner)
        return _cube_from_wire(self.call("create_cube", args))

    def list_cubes(self) -> list[CubeInfo]:
        return _cubes(self.call("list_cubes"))

    def get_cube(self, name: str) -> CubeInfo:
        return _cube_from_wire(self.call("get_cube", {"name": name}))

    def drop_cube(self, name: str) -> int:
        return int(self.call("drop_cube", {"name": name})["erased"])

    def grant(self, cube: str, principal: str, level: str) -> None:
        self.call("grant", {"cube": cube, "principal": principal, "level": level})

    def revoke(self, cube: str, principal: str) -> None:
        self.call("revoke", {"cube": cube, "principal": principal})

    # --- tokens ---
    def token_create(self, name: str, *, principal: str | None = None) -> str:
        """Create a token (admin); returns the secret, shown only this once."""
        return str(self.call("token_create", _drop_none(name=name, principal=principal))["token"])

    def token_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("token_list")
        return result

    def token_revoke(self, name: str) -> None:
        self.call("token_revoke", {"name": name})

    # --- items ---
    def add(
        self,
        cube: str,
        text: str,
        *,
        tags: Iterable[str] = (),
        source: str | None = None,
        session: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        tier: str | None = None,
        form: str | None = None,
        importance: float | None = None,
        ttl_s: int | None = None,
        valid_from_us: int | None = None,
        valid_to_us: int | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> Item:
        item: Item = self._do(
            _Requests.add(
                cube,
                text,
                tags=tags,
                source=source,
                session=session,
                metadata=metadata,
                tier=tier,
                form=form,
                importance=importance,
                ttl_s=ttl_s,
                valid_from_us=valid_from_us,
                valid_to_us=valid_to_us,
                payload=payload,
            )
        )
        return item

    def add_many(self, cube: str, items: Iterable[str | Mapping[str, Any]]) -> list[Item]:
        """Add several items in one request and one atomic, durable step: all or none.

        Each entry is a text or a map of :meth:`add`'s arguments (``text`` plus
        any of ``tags``, ``source``, ``session``, ``metadata``, ``tier``,
        ``form``, ``importance``, ``ttl_s``, ``valid_from_us``,
        ``valid_to_us``, ``payload``); at most 1,000 per call.  Returns the
        items in the order given.
        """
        result: list[Item] = self._do(_Requests.add_many(cube, items))
        return result

    def get(
        self,
        cube: str,
        id: str,
        *,
        version: int | None = None,
        as_of: int | datetime | None = None,
    ) -> Item:
        item: Item = self._do(_Requests.get(cube, id, version, as_of))
        return item

    def update(
        self,
        cube: str,
        id: str,
        text: str | None = None,
        *,
        expected_version: int | None = None,
        tags: Iterable[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        tier: str | None = None,
        status: str | None = None,
        importance: float | None = None,
        ttl_s: int | None = None,
        valid_from_us: int | None = None,
        valid_to_us: int | None = None,
    ) -> Item:
        changes = {
            "expected_version": expected_version,
            "tags": tags,
            "metadata": dict(metadata) if metadata is not None else None,
            "tier": tier,
            "status": status,
            "importance": importance,
            "ttl_s": ttl_s,
            "valid_from_us": valid_from_us,
            "valid_to_us": valid_to_us,
        }
        item: Item = self._do(_Requests.update(cube, id, text, changes))
        return item

    def history(self, cube: str, id: str) -> list[Item]:
        return _items(self.call("history", {"cube": cube, "id": id}))

    def rollback(self, cube: str, id: str, version: int) -> Item:
        return item_from_wire(self.call("rollback", {"cube": cube, "id": id, "version": version}))

    def delete(self, cube: str, id: str) -> Item:
        return item_from_wire(self.call("delete", {"cube": cube, "id": id}))

    def purge(self, cube: str, id: str, *, reason: str | None = None) -> PurgeRecord:
        return _purge(self.call("purge", _drop_none(cube=cube, id=id, reason=reason)))

    def list_items(
        self,
        cube: str,
        *,
        status: str | None = "active",
        tier: str | None = None,
        form: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Item]:
        args = _drop_none(
            cube=cube, status=status or "all", tier=tier, form=form, limit=limit, after=after
        )
        return _items(self.call("list_items", args))

    def search(
        self,
        cube: str | Sequence[str],
        query: str,
        *,
        k: int = 10,
        tags: Iterable[str] = (),
        tier: str | None = None,
        form: str | None = None,
        session: str | None = None,
        time_from_us: int | None = None,
        time_to_us: int | None = None,
        as_of_us: int | None = None,
        status: str | None = None,
        mode: str | None = None,
        explain: bool = False,
        wait: bool = True,
    ) -> list[Hit]:
        """Hybrid search over one cube or several (results fused across them).

        ``wait`` (default): first wait until this principal's own writes are
        searchable (read-your-writes).  ``mode``: "hybrid", "dense" or
        "lexical".  ``explain``: fill :attr:`Hit.components`.  Each hit's
        item is built from the reply when :attr:`Hit.item` is first read.
        """
        hits: list[Hit] = self._do(
            _Requests.search(
                cube,
                query,
                k=k,
                tags=tags,
                tier=tier,
                form=form,
                session=session,
                time_from_us=time_from_us,
                time_to_us=time_to_us,
                as_of_us=as_of_us,
                status=status,
                mode=mode,
                explain=explain or None,
                wait=None if wait else False,
            )
        )
        return hits

    # --- operations ---
    def checkpoint(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("checkpoint")
        return result

    def wal_verify(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("wal_verify")
        return result

    def export_cube(self, name: str) -> bytes:
        return _export_bytes(self.call("export_cube", {"name": name}))

    def import_cube(
        self, data: bytes, *, name: str | None = None, owner: str | None = None
    ) -> CubeInfo:
        args = _drop_none(data={"$frame": 1}, name=name, owner=owner)
        return _cube_from_wire(self.call("import_cube", args, frames=[bytes(data)]))

    # --- change feed ---
    def subscribe(self, cube: str | None = None) -> Subscription:
        """Change events of ``cube`` (every cube you can read when None); iterate the result.

        The subscription has its own connection; ``NotFound`` if ``cube`` does
        not exist or you have no access to it.
        """
        if self._closed:
            raise Unavailable("this client is closed", reason="closed")
        if os.getpid() != self._pid:
            self._after_fork()
        if not self.socket_path.exists():
            raise self._not_running()
        with self._lock:
            sock = _dealer(self._ctx, self.endpoint)
        sub = Subscription(self, sock, cube)
        try:
            sub._start()
        except BaseException:
            sub.close()
            raise
        return sub

    # --- jobs and tiers ---
    def jobs(
        self,
        *,
        state: str | None = None,
        cube: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Background jobs you may see, newest first (``job_list``)."""
        return _dicts(self._do(_Requests.jobs(state, cube, kind, limit)))

    def job(self, id: str) -> dict[str, Any]:
        """One job: state, attempts, progress, message, result, error, history."""
        return _dict(self.call("job_get", {"id": id}))

    def cancel_job(self, id: str) -> dict[str, Any]:
        """Cancel a queued job; ask a running one to stop (``cancel_requested``)."""
        return _dict(self.call("job_cancel", {"id": id}))

    def wait_job(self, id: str, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job ends; Unavailable(reason="timeout") after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _WAIT_POLL_S[0]
        while True:
            job = self.job(id)
            if job.get("terminal"):
                return job
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _wait_timeout(id, timeout or 0.0)
                pause = min(pause, left)
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_POLL_S[1])

    def tier_run(
        self, cube: str, policy: str, *, wait: bool = True, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Queue ``policy``'s on-demand jobs on ``cube``; with ``wait``, run them in turn.

        ``timeout``: seconds the whole run may take when waiting (daemon default 300).
        """
        req = _Requests.tier_run(cube, policy, wait, timeout)
        wire = self.call(req.op, req.args, timeout=_tier_run_timeout(timeout, wait, self.timeout))
        return _dicts(wire)

    def tier_report(self, cube: str) -> dict[str, Any]:
        """Per enabled policy and tier: item counts, bytes, heat histogram."""
        return _dict(self.call("tier_report", {"cube": cube}))

    def tier_policies(self) -> dict[str, Any]:
        """Registered tier policies (settings, job kinds), defaults, every job kind."""
        return _dict(self.call("tier_policies"))

    # --- activation memory (KV caches) ---
    def kv_build(
        self,
        cube: str,
        *,
        model: str | os.PathLike[str],
        items: Sequence[str] | None = None,
        tier: str | None = None,
        query: str | None = None,
        top: int | None = None,
        dtype: str | None = None,
        name: str | None = None,
        quant: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Build a KV cache of ``items`` / a ``tier`` / the ``top`` hits of ``query``.

        Queues a ``kv.build`` job; with ``wait`` returns ``{"job", "item", "info"}``
        when it is done (the job's error is raised), else ``{"job"}``.
        """
        options = _drop_none(dtype=dtype, name=name, quant=quant, wait=wait, timeout=timeout)
        args = _kv_build_args(
            cube, model, items=items, tier=tier, query=query, top=top, options=options
        )
        wire = self.call("kv_build", args, timeout=_kv_wait_timeout(self.timeout, wait, timeout))
        return _kv_build_result(wire)

    def kv_get(
        self,
        cube: str,
        id: str | None = None,
        backend: Any = None,
        *,
        name: str | None = None,
        allow_stale: bool = False,
    ) -> LoadedCache:
        """The KV cache ``id`` (or ``name``) for ``backend``'s model, ready to inject.

        ``backend`` is a :class:`memosd.models.ModelBackend` (or its fingerprint);
        a cache of another model raises ``Conflict(fingerprint_mismatch)``.
        Pass ``loaded.cache`` (a fresh copy each time) as ``past_key_values``.
        """
        fingerprint = _kv_fingerprint(backend)
        args = {"cube": cube, "fingerprint": fingerprint, **_kv_ref(id, name)}
        if allow_stale:
            args["allow_stale"] = True
        return _kv_loaded(self.call("kv_get", args, copy=False), fingerprint)

    def kv_list(self, cube: str) -> list[dict[str, Any]]:
        """The KV caches of ``cube`` (``KvInfo`` dicts)."""
        return _dicts(self.call("kv_list", {"cube": cube}))

    def kv_show(
        self, cube: str, id: str | None = None, *, name: str | None = None
    ) -> dict[str, Any]:
        return _dict(self.call("kv_show", {"cube": cube, **_kv_ref(id, name)}))

    def kv_drop(self, cube: str, id: str | None = None, *, name: str | None = None) -> PurgeRecord:
        """Purge a KV cache; its tensors go unless another cache shares them."""
        return _purge(self.call("kv_drop", {"cube": cube, **_kv_ref(id, name)}))

    def kv_rebuild(
        self,
        cube: str,
        id: str | None = None,
        *,
        name: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Queue rebuilds: of one cache (even if fresh), or of every stale cache of ``cube``."""
        args: dict[str, Any] = {"cube": cube, **_drop_none(id=id, name=name)}
        args.update(_drop_none(wait=wait, timeout=timeout))
        wire = self.call("kv_rebuild", args, timeout=_kv_wait_timeout(self.timeout, wait, timeout))
        return _dicts(_dict(wire).get("jobs"))

    # --- parameter memory (LoRA) ---
    def lora_train(
        self,
        cube: str,
        model: str | os.PathLike[str],
        *,
        from_tier: str | None = None,
        items: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Queue a ``lora.train`` job (the model directory is on the daemon's host).

        ``from_tier`` (default ``long``) or ``items``; ``settings`` overrides
        hyperparameters (``memosd.lora.LoraSettings`` fields).  Returns the job;
        with ``wait``, once it ended (its ``result`` describes the adapter).
        """
        args = _lora_train_args(
            cube,
            model,
            from_tier=from_tier,
            items=items,
            settings=settings,
            dtype=dtype,
            wait=wait,
            timeout=timeout,
        )
        wire = self.call(
            "lora_train", args, timeout=_lora_wait_timeout(self.timeout, wait, timeout)
        )
        return _dict(wire)

    def lora_show(self, cube: str, version: int | None = None) -> dict[str, Any]:
        """The adapter's versions (status, items, metrics), or one version with its manifest."""
        return _dict(self.call("lora_show", _drop_none(cube=cube, version=version)))

    def lora_get(
        self, cube: str, version: int | None = None, *, backend: Any = None
    ) -> LoraAdapter:
        """One version (the active one by default) with its bytes and manifest.

        With ``backend`` (or its fingerprint), an adapter of another base model
        is refused before it is sent (``Conflict``, ``fingerprint_mismatch``).
        """
        fingerprint = _lora_fingerprint(backend)
        args = _drop_none(cube=cube, version=version, fingerprint=fingerprint)
        return _lora_adapter(self.call("lora_get", args))

    def lora_model(self, cube: str, backend: Any, *, version: int | None = None) -> Any:
        """Fetch a cube's adapter and load it over a copy of ``backend``'s model (peft)."""
        return self.lora_get(cube, version, backend=backend).load(backend)

    def lora_combine(
        self,
        sources: Sequence[str | tuple[str, int]],
        weights: Sequence[float],
        backend: Any,
        *,
        combination_type: str = "cat",
    ) -> Any:
        """One peft model mixing several cubes' adapters (``(cube, version)`` or a cube)."""
        adapters = [
            self.lora_get(s, backend=backend)
            if isinstance(s, str)
            else self.lora_get(s[0], s[1], backend=backend)
            for s in sources
        ]
        return combine_lora(adapters, weights, backend, combination_type=combination_type)

    def lora_rollback(self, cube: str, version: int) -> dict[str, Any]:
        """A new adapter version equal to ``version`` (stale versions are refused)."""
        return _dict(self.call("lora_rollback", {"cube": cube, "version": version}))

    def lora_retrain(
        self,
        cube: str,
        *,
        model: str | os.PathLike[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Queue (or find) the ``lora.retrain`` job: retrain without purged items."""
        args = _lora_retrain_args(
            cube, model, settings=settings, dtype=dtype, wait=wait, timeout=timeout
        )
        wire = self.call(
            "lora_retrain", args, timeout=_lora_wait_timeout(self.timeout, wait, timeout)
        )
        return _dict(wire)

    def lora_forget(self, cube: str) -> dict[str, Any]:
        """Forget the stale adapter versions now (blobs deleted), without retraining."""
        return _dict(self.call("lora_forget", {"cube": cube}))


class Subscription:
    """Iterator of :class:`Event`; ``next_event(timeout)`` for bounded waits.

    Iteration stops after the final ``subscription_ended`` event.  Not
    thread-safe: one thread reads a subscription.
    """

    def __init__(self, client: Client, sock: zmq.Socket[Any], cube: str | None) -> None:
        self.cube = cube
        self.ended = False
        self._client = client
        self._sock = sock
        self._rid = next(client._ids)

    def _start(self) -> None:
        client = self._client
        message = encode_request(self._rid, "subscribe", {"cube": self.cube}, token=client.token)
        self._sock.send_multipart(message)
        deadline = time.monotonic() + client.timeout
        while True:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms <= 0 or not self._sock.poll(wait_ms, zmq.POLLIN):
                raise client._timeout_error("subscribe", client.timeout)
            reply = self._sock.recv_multipart()
            if decode_event(reply) is not None:
                continue
            got, ok, payload = decode_response(reply)
            if got == self._rid or got is None:
                client._result(ok, payload)
                return

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none came within ``timeout`` seconds (or it ended)."""
        if self.ended:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(wait_ms, zmq.POLLIN):
                return None
            wire = decode_event(self._sock.recv_multipart())
            if wire is None or wire.get("kind") == _KEEPALIVE:
                continue  # a late response, or the daemon checking we are alive
            event = _event_from_wire(wire)
            if event.kind == _ENDED:
                self.ended = True
            return event

    def __iter__(self) -> Iterator[Event]:
        while not self.ended:
            event = self.next_event()
            if event is not None:
                yield event

    def close(self) -> None:
        """Stop the subscription (the daemon forgets it when the connection goes)."""
        if not self._sock.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(
                    encode_request(next(self._client._ids), "unsubscribe", {}),
                    flags=zmq.DONTWAIT,
                )
            self._sock.close(linger=0)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the async client ---------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    ok: bool = False
    payload: Any = None


class AsyncClient(_Base):
    """anyio client (asyncio backend); use ``async with AsyncClient() as c``.

    Requests from many tasks are pipelined on one socket; a reader task
    routes each reply to its waiter by request id.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(socket, token, timeout)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[int, _Pending] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> AsyncClient:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.connect(self.endpoint)
        self._sock = sock
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(exc_type, exc, tb)

    async def aclose(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(exc_type, exc, tb)
            self._tg = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # also closes subscriptions left open
            self._ctx = None

    async def _reader(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            reply = await sock.recv_multipart()
            try:
                rid, ok, payload = decode_response(reply)
            except BadRequest:
                continue
            waiter = self._pending.get(rid) if rid is not None else None
            if waiter is not None:
                waiter.ok, waiter.payload = ok, payload
                waiter.done.set()

    async def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        frames: Iterable[bytes] = (),
        timeout: float | None = None,
    ) -> Any:
        sock = self._sock
        if sock is None:
            raise Unavailable("use `async with AsyncClient(...)`", reason="closed")
        if not self.socket_path.exists():
            raise self._not_running()
        rid = next(self._ids)
        waiter = _Pending()
        self._pending[rid] = waiter
        wait_s = self.timeout if timeout is None else timeout
        try:
            message = encode_request(rid, op, args or {}, token=self.token, frames=list(frames))
            with anyio.move_on_after(wait_s):
                await sock.send_multipart(message)
                await waiter.done.wait()
            if not waiter.done.is_set():
                raise self._timeout_error(op, wait_s)
        finally:
            self._pending.pop(rid, None)
        return self._result(waiter.ok, waiter.payload)

    async def _do(self, req: _Req) -> Any:
        return req.decode(await self.call(req.op, req.args, frames=req.frames))

    async def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("ping")
        return result

    async def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("whoami")
        return result

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("status")
        return result

    async def create_cube(
        self, name: str, *, config: Mapping[str, Any] | None = None, owner: str | None = None
    ) -> CubeInfo:
        args = _drop_none(name=name, config=dict(config) if config else None, owner=owner)
        return _cube_from_wire(await self.call("create_cube", args))

    async def list_cubes(self) -> list[CubeInfo]:
        return _cubes(await self.call("list_cubes"))

    async def get_cube(self, name: str) -> CubeInfo:
        return _cube_from_wire(await self.call("get_cube", {"name": name}))

    async def drop_cube(self, name: str) -> int:
        return int((await self.call("drop_cube", {"name": name}))["erased"])

    async def grant(self, cube: str, principal: str, level: str) -> None:
        await self.call("grant", {"cube": cube, "principal": principal, "level": level})

    async def revoke(self, cube: str, principal: str) -> None:
        await self.call("revoke", {"cube": cube, "principal": principal})

    async def token_create(self, name: str, *, principal: str | None = None) -> str:
        result = await self.call("token_create", _drop_none(name=name, principal=principal))
        return str(result["token"])

    async def token_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call("token_list")
        return result

    async def token_revoke(self, name: str) -> None:
        await self.call("token_revoke", {"name": name})

    async def add(
        self,
        cube: str,
        text: str,
        *,
        tags: Iterable[str] = (),
        source: str | None = None,
        session: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        tier: str | None = None,
        form: str | None = None,
        importance: float | None = None,
        ttl_s: int | None = None,
        valid_from_us: int | None = None,
        valid_to_us: int | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> Item:
        item: Item = await self._do(
            _Requests.add(
                cube,
                text,
                tags=tags,
                source=source,
                session=session,
                metadata=metadata,
                tier=tier,
                form=form,
                importance=importance,
                ttl_s=ttl_s,
                valid_from_us=valid_from_us,
                valid_to_us=valid_to_us,
                payload=payload,
            )
        )
        return item

    async def add_many(self, cube: str, items: Iterable[str | Mapping[str, Any]]) -> list[Item]:
        """Add several items in one request and one atomic, durable step: all or none.

        Each entry is a text or a map of :meth:`add`'s arguments (``text`` plus
        any of ``tags``, ``source``, ``session``, ``metadata``, ``tier``,
        ``form``, ``importance``, ``ttl_s``, ``valid_from_us``,
        ``valid_to_us``, ``payload``); at most 1,000 per call.  Returns the
        items in the order given.
        """
        result: list[Item] = await self._do(_Requests.add_many(cube, items))
        return result

    async def get(
        self,
        cube: str,
        id: str,
        *,
        version: int | None = None,
        as_of: int | datetime | None = None,
    ) -> Item:
        item: Item = await self._do(_Requests.get(cube, id, version, as_of))
        return item

    async def update(
        self,
        cube: str,
        id: str,
        text: str | None = None,
        *,
        expected_version: int | None = None,
        tags: Iterable[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        tier: str | None = None,
        status: str | None = None,
        importance: float | None = None,
        ttl_s: int | None = None,
        valid_from_us: int | None = None,
        valid_to_us: int | None = None,
    ) -> Item:
        changes = {
            "expected_version": expected_version,
            "tags": tags,
            "metadata": dict(metadata) if metadata is not None else None,
            "tier": tier,
            "status": status,
            "importance": importance,
            "ttl_s": ttl_s,
            "valid_from_us": valid_from_us,
            "valid_to_us": valid_to_us,
        }
        item: Item = await self._do(_Requests.update(cube, id, text, changes))
        return item

    async def history(self, cube: str, id: str) -> list[Item]:
        return _items(await self.call("history", {"cube": cube, "id": id}))

    async def rollback(self, cube: str, id: str, version: int) -> Item:
        args = {"cube": cube, "id": id, "version": version}
        return item_from_wire(await self.call("rollback", args))

    async def delete(self, cube: str, id: str) -> Item:
        return item_from_wire(await self.call("delete", {"cube": cube, "id": id}))

    async def purge(self, cube: str, id: str, *, reason: str | None = None) -> PurgeRecord:
        return _purge(await self.call("purge", _drop_none(cube=cube, id=id, reason=reason)))

    async def list_items(
        self,
        cube: str,
        *,
        status: str | None = "active",
        tier: str | None = None,
        form: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Item]:
        args = _drop_none(
            cube=cube, status=status or "all", tier=tier, form=form, limit=limit, after=after
        )
        return _items(await self.call("list_items", args))

    async def search(
        self,
        cube: str | Sequence[str],
        query: str,
        *,
        k: int = 10,
        tags: Iterable[str] = (),
        tier: str | None = None,
        form: str | None = None,
        session: str | None = None,
        time_from_us: int | None = None,
        time_to_us: int | None = None,
        as_of_us: int | None = None,
        status: str | None = None,
        mode: str | None = None,
        explain: bool = False,
        wait: bool = True,
    ) -> list[Hit]:
        """Hybrid search over one cube or several (results fused across them).

        ``wait`` (default): first wait until this principal's own writes are
        searchable (read-your-writes).  ``mode``: "hybrid", "dense" or
        "lexical".  ``explain``: fill :attr:`Hit.components`.  Each hit's
        item is built from the reply when :attr:`Hit.item` is first read.
        """
        hits: list[Hit] = await self._do(
            _Requests.search(
                cube,
                query,
                k=k,
                tags=tags,
                tier=tier,
                form=form,
                session=session,
                time_from_us=time_from_us,
                time_to_us=time_to_us,
                as_of_us=as_of_us,
                status=status,
                mode=mode,
                explain=explain or None,
                wait=None if wait else False,
            )
        )
        return hits

    async def checkpoint(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("checkpoint")
        return result

    async def wal_verify(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("wal_verify")
        return result

    async def export_cube(self, name: str) -> bytes:
        return _export_bytes(await self.call("export_cube", {"name": name}))

    async def import_cube(
        self, data: bytes, *, name: str | None = None, owner: str | None = None
    ) -> CubeInfo:
        args = _drop_none(data={"$frame": 1}, name=name, owner=owner)
        return _cube_from_wire(await self.call("import_cube", args, frames=[bytes(data)]))

    async def subscribe(self, cube: str | None = None) -> AsyncSubscription:
        """Change events of ``cube`` (every cube you can read when None), on its own connection."""
        if self._ctx is None:
            raise Unavailable("use `async with AsyncClient(...)`", reason="closed")
        if not self.socket_path.exists():
            raise self._not_running()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.connect(self.endpoint)
        sub = AsyncSubscription(self, sock, cube)
        try:
            await sub._start()
        except BaseException:
            sub.close()
            raise
        return sub

    # --- jobs and tiers ---
    async def jobs(
        self,
        *,
        state: str | None = None,
        cube: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        return _dicts(await self._do(_Requests.jobs(state, cube, kind, limit)))

    async def job(self, id: str) -> dict[str, Any]:
        return _dict(await self.call("job_get", {"id": id}))

    async def cancel_job(self, id: str) -> dict[str, Any]:
        return _dict(await self.call("job_cancel", {"id": id}))

    async def wait_job(self, id: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _WAIT_POLL_S[0]
        while True:
            job = await self.job(id)
            if job.get("terminal"):
                return job
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _wait_timeout(id, timeout or 0.0)
                pause = min(pause, left)
            await anyio.sleep(pause)
            pause = min(pause * 2, _WAIT_POLL_S[1])

    async def tier_run(
        self, cube: str, policy: str, *, wait: bool = True, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        req = _Requests.tier_run(cube, policy, wait, timeout)
        wire = await self.call(
            req.op, req.args, timeout=_tier_run_timeout(timeout, wait, self.timeout)
        )
        return _dicts(wire)

    async def tier_report(self, cube: str) -> dict[str, Any]:
        return _dict(await self.call("tier_report", {"cube": cube}))

    async def tier_policies(self) -> dict[str, Any]:
        return _dict(await self.call("tier_policies"))

    # --- activation memory (KV caches) ---
    async def kv_build(
        self,
        cube: str,
        *,
        model: str | os.PathLike[str],
        items: Sequence[str] | None = None,
        tier: str | None = None,
        query: str | None = None,
        top: int | None = None,
        dtype: str | None = None,
        name: str | None = None,
        quant: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Build a KV cache of ``items`` / a ``tier`` / the ``top`` hits of ``query``.

        Queues a ``kv.build`` job; with ``wait`` returns ``{"job", "item", "info"}``
        when it is done (the job's error is raised), else ``{"job"}``.
        """
        options = _drop_none(dtype=dtype, name=name, quant=quant, wait=wait, timeout=timeout)
        args = _kv_build_args(
            cube, model, items=items, tier=tier, query=query, top=top, options=options
        )
        wire = await self.call(
            "kv_build", args, timeout=_kv_wait_timeout(self.timeout, wait, timeout)
        )
        return _kv_build_result(wire)

    async def kv_get(
        self,
        cube: str,
        id: str | None = None,
        backend: Any = None,
        *,
        name: str | None = None,
        allow_stale: bool = False,
    ) -> LoadedCache:
        """The KV cache ``id`` (or ``name``) for ``backend``'s model, ready to inject.

        ``backend`` is a :class:`memosd.models.ModelBackend` (or its fingerprint);
        a cache of another model raises ``Conflict(fingerprint_mismatch)``.
        Pass ``loaded.cache`` (a fresh copy each time) as ``past_key_values``.
        """
        fingerprint = _kv_fingerprint(backend)
        args = {"cube": cube, "fingerprint": fingerprint, **_kv_ref(id, name)}
        if allow_stale:
            args["allow_stale"] = True
        return _kv_loaded(await self.call("kv_get", args), fingerprint)

    async def kv_list(self, cube: str) -> list[dict[str, Any]]:
        """The KV caches of ``cube`` (``KvInfo`` dicts)."""
        return _dicts(await self.call("kv_list", {"cube": cube}))

    async def kv_show(
        self, cube: str, id: str | None = None, *, name: str | None = None
    ) -> dict[str, Any]:
        return _dict(await self.call("kv_show", {"cube": cube, **_kv_ref(id, name)}))

    async def kv_drop(
        self, cube: str, id: str | None = None, *, name: str | None = None
    ) -> PurgeRecord:
        """Purge a KV cache; its tensors go unless another cache shares them."""
        return _purge(await self.call("kv_drop", {"cube": cube, **_kv_ref(id, name)}))

    async def kv_rebuild(
        self,
        cube: str,
        id: str | None = None,
        *,
        name: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Queue rebuilds: of one cache (even if fresh), or of every stale cache of ``cube``."""
        args: dict[str, Any] = {"cube": cube, **_drop_none(id=id, name=name)}
        args.update(_drop_none(wait=wait, timeout=timeout))
        wire = await self.call(
            "kv_rebuild", args, timeout=_kv_wait_timeout(self.timeout, wait, timeout)
        )
        return _dicts(_dict(wire).get("jobs"))

    # --- parameter memory (LoRA) ---
    async def lora_train(
        self,
        cube: str,
        model: str | os.PathLike[str],
        *,
        from_tier: str | None = None,
        items: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Queue a ``lora.train`` job (the model directory is on the daemon's host).

        ``from_tier`` (default ``long``) or ``items``; ``settings`` overrides
        hyperparameters (``memosd.lora.LoraSettings`` fields).  Returns the job;
        with ``wait``, once it ended (its ``result`` describes the adapter).
        """
        args = _lora_train_args(
            cube,
            model,
            from_tier=from_tier,
            items=items,
            settings=settings,
            dtype=dtype,
            wait=wait,
            timeout=timeout,
        )
        wire = await self.call(
            "lora_train", args, timeout=_lora_wait_timeout(self.timeout, wait, timeout)
        )
        return _dict(wire)

    async def lora_show(self, cube: str, version: int | None = None) -> dict[str, Any]:
        """The adapter's versions (status, items, metrics), or one version with its manifest."""
        return _dict(await self.call("lora_show", _drop_none(cube=cube, version=version)))

    async def lora_get(
        self, cube: str, version: int | None = None, *, backend: Any = None
    ) -> LoraAdapter:
        """One version (the active one by default) with its bytes and manifest.

        With ``backend`` (or its fingerprint), an adapter of another base model
        is refused before it is sent (``Conflict``, ``fingerprint_mismatch``).
        """
        fingerprint = _lora_fingerprint(backend)
        args = _drop_none(cube=cube, version=version, fingerprint=fingerprint)
        return _lora_adapter(await self.call("lora_get", args))

    async def lora_model(self, cube: str, backend: Any, *, version: int | None = None) -> Any:
        """Fetch a cube's adapter and load it over a copy of ``backend``'s model (peft)."""
        adapter = await self.lora_get(cube, version, backend=backend)
        return await anyio.to_thread.run_sync(adapter.load, backend)

    async def lora_combine(
        self,
        sources: Sequence[str | tuple[str, int]],
        weights: Sequence[float],
        backend: Any,
        *,
        combination_type: str = "cat",
    ) -> Any:
        """One peft model mixing several cubes' adapters (``(cube, version)`` or a cube)."""
        adapters = [
            await self.lora_get(s, backend=backend)
            if isinstance(s, str)
            else await self.lora_get(s[0], s[1], backend=backend)
            for s in sources
        ]

        def combine() -> Any:
            return combine_lora(adapters, weights, backend, combination_type=combination_type)

        return await anyio.to_thread.run_sync(combine)

    async def lora_rollback(self, cube: str, version: int) -> dict[str, Any]:
        """A new adapter version equal to ``version`` (stale versions are refused)."""
        return _dict(await self.call("lora_rollback", {"cube": cube, "version": version}))

    async def lora_retrain(
        self,
        cube: str,
        *,
        model: str | os.PathLike[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Queue (or find) the ``lora.retrain`` job: retrain without purged items."""
        args = _lora_retrain_args(
            cube, model, settings=settings, dtype=dtype, wait=wait, timeout=timeout
        )
        wire = await self.call(
            "lora_retrain", args, timeout=_lora_wait_timeout(self.timeout, wait, timeout)
        )
        return _dict(wire)

    async def lora_forget(self, cube: str) -> dict[str, Any]:
        """Forget the stale adapter versions now (blobs deleted), without retraining."""
        return _dict(await self.call("lora_forget", {"cube": cube}))


class AsyncSubscription:
    """Async iterator of :class:`Event` (stops after ``subscription_ended``)."""

    def __init__(self, client: AsyncClient, sock: zmq.asyncio.Socket, cube: str | None) -> None:
        self.cube = cube
        self.ended = False
        self._client = client
        self._sock = sock
        self._rid = next(client._ids)

    async def _start(self) -> None:
        client = self._client
        message = encode_request(self._rid, "subscribe", {"cube": self.cube}, token=client.token)
        with anyio.move_on_after(client.timeout):
            await self._sock.send_multipart(message)
            while True:
                reply = await self._sock.recv_multipart()
                if decode_event(reply) is not None:
                    continue
                got, ok, payload = decode_response(reply)
                if got == self._rid or got is None:
                    client._result(ok, payload)
                    return
        raise client._timeout_error("subscribe", client.timeout)

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none came within ``timeout`` seconds (or it ended)."""
        if self.ended:
            return None
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                wire = decode_event(await self._sock.recv_multipart())
                if wire is None or wire.get("kind") == _KEEPALIVE:
                    continue
                event = _event_from_wire(wire)
                if event.kind == _ENDED:
                    self.ended = True
                return event
        return None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while not self.ended:
            event = await self.next_event()
            if event is not None:
                yield event

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> AsyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
