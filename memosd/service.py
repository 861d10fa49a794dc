"""Op handlers: typed argument parsing, access checks, engine calls.

:class:`Service` turns one decoded :class:`~memosd.protocol.Request` into a
:class:`~memosd.protocol.Reply` or raises a :class:`MemosError`.  The op
registry (:data:`OPS`) maps op names to handlers; each handler parses its
arguments with :class:`Args` (wrong types and unknown fields are BadRequest
naming the field), checks access through :mod:`memosd.auth`, then calls the
engine.

Ops come in four kinds (:class:`OpSpec`):

* ``inline``: point reads (``get``, ``history``, cube and ACL lookups) run on
  the event loop, because they are LMDB read transactions of a few
  microseconds that never take the writer lock; a thread hop would cost more.
* ``write``: the handler parses its arguments and checks access inline (ACL
  state is cached) and returns a :class:`Write`: a plan for
  ``engine.atomic_nowait`` that runs inside the engine's group-commit batch,
  plus how to turn its result into the reply.  No thread hop: many writes in
  flight, from one client or many, land in the same commit batch.
* ``task``: coroutines for engine calls that may wait for the disk or scan
  (search, list, checkpoints, export/import); they run in a pool of worker
  threads (``thread_limit``).  A task op may also have a ``quick`` handler
  the server tries on the loop first (``search``: a small search estimated
  to be cheaper than the thread hops; see ``Service.try_quick``).
* ``feed``: ``subscribe``/``unsubscribe``; the server keeps the subscription
  (it needs the connection), the service only checks arguments and access.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import re
import resource
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from memosd import __version__
from memosd.auth import (
    Identity,
    Peer,
    access_level,
    hash_token,
    new_token_secret,
    require_admin,
    require_level,
    resolve_identity,
    validate_principal,
)
from memosd.errors import BadRequest, InternalError, NotFound, TooLarge, Unavailable
from memosd.memcube.model import (
    CubeConfig,
    MemoryItem,
    validate_cube_config,
    validate_cube_name,
)
from memosd.plugins.runtime import check_forms, plugins_result, validate_add, validate_update
from memosd.portable import FormBlobs, check_blobs, dump_cube, export_blobs, read_portable
from memosd.protocol import (
    FRAME_KEY,
    PROTOCOL_VERSION,
    Reply,
    Request,
    WireCache,
    item_to_wire,
    to_wire,
)
from memosd.store.group_commit import Submission
from memosd.store.planner import Planner

__all__ = ["OPS", "Args", "Service", "lexical_scan_search"]

T = TypeVar("T")
Handler = Callable[["Service", "Call"], Any]  # returns the result, or an awaitable of it


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op: its handler and its kind (``inline``, ``write``, ``task``, ``feed``).

    Inline handlers are plain functions doing only microsecond LMDB reads;
    the server runs them straight from its receive loop (no task, no
    thread).  Write handlers are plain functions returning a :class:`Write`
    (the server submits it and replies when the commit resolves).  Task
    handlers are coroutines that may wait for worker threads.  Feed handlers
    validate a subscription request and return its filter.
    """

    handler: Handler
    kind: str = "task"
    # Task ops only: a plain function tried on the event loop first; it
    # returns the result, or NOT_QUICK to run ``handler`` in a task instead.
    quick: Handler | None = None

    @property
    def inline(self) -> bool:
        return self.kind == "inline"


@dataclass(slots=True)
class Write:
    """What a write handler returns: run ``plan(planner)`` in a commit batch.

    ``finish`` turns the plan's result into the reply's result (on the event
    loop, after the commit).  ``acl_change``: the write may change cubes,
    grants or tokens, so the ACL cache is dropped before the reply is sent.
    Not frozen: :meth:`Service.start_write` fills in ``principal`` on the
    handler's fresh instance (a copy per write cost more than the rest of
    that method).
    """

    plan: Callable[[Any], Any]
    finish: Callable[[Any], Any]
    acl_change: bool = False
    principal: str | None = None  # filled in by Service.start_write
    # A single add, (cube, text, fields): submitted as ``Engine.add_nowait``
    # (a deferred add when it can be; ``plan`` does the same add).
    add: tuple[str, str, dict[str, Any]] | None = None


OPS: dict[str, OpSpec] = {}
#: What a ``quick`` handler returns when the op must run as a task after all.
NOT_QUICK: Final = object()
_NOT_GIVEN: Final = object()
_CACHE_MAX: Final = 10_000
_ACL_EVENTS: Final = frozenset({"cube_created", "cube_dropped", "acl_changed"})
_SCAN_PAGE: Final = 512
MAX_K: Final = 1000
MAX_LIST_LIMIT: Final = 1000
_TOKEN_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def op(
    name: str,
    *,
    inline: bool = False,
    write: bool = False,
    feed: bool = False,
    quick: Handler | None = None,
) -> Callable[[Handler], Handler]:
    kind = "inline" if inline else "write" if write else "feed" if feed else "task"

    def register(fn: Handler) -> Handler:
        OPS[name] = OpSpec(fn, kind, quick)
        return fn

    return register


# --- argument parsing -----------------------------------------------------------


class Args:
    """Typed access to a request's ``args`` map; every getter names the field on error."""

    __slots__ = ("_op", "_raw", "_seen")

    def __init__(self, op_name: str, raw: dict[str, Any]) -> None:
        self._op = op_name
        self._raw = raw
        self._seen: set[str] = set()

    def _bad(self, name: str, expected: str) -> BadRequest:
        got = type(self._raw.get(name)).__name__
        return BadRequest(
            f"{self._op}: argument {name!r} must be {expected}, got {got}",
            reason="bad_arg",
            field=name,
        )

    def has(self, name: str) -> bool:
        return name in self._raw

    def _get(self, name: str, required: bool) -> Any:
        self._seen.add(name)
        if name not in self._raw:
            if required:
                raise BadRequest(
                    f"{self._op}: missing argument {name!r}", reason="missing_arg", field=name
                )
            return _NOT_GIVEN
        return self._raw[name]

    def req_str(self, name: str) -> str:
        value = self._get(name, True)
        if type(value) is not str:
            raise self._bad(name, "a string")
        return value

    def opt_str(self, name: str) -> str | None:
        value = self._get(name, False)
        if value is _NOT_GIVEN or value is None:
            return None
        if type(value) is not str:
            raise self._bad(name, "a string or nil")
        return value

    def req_int(self, name: str) -> int:
        value = self._get(name, True)
        if type(value) is not int:
            raise self._bad(name, "an integer")
        return value

    def opt_int(self, name: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self._get(name, False)
        if value is _NOT_GIVEN or value is None:
            return None
        if type(value) is not int:
            raise self._bad(name, "an integer or nil")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise BadRequest(
                f"{self._op}: argument {name!r} must be in {lo}..{hi}, got {value}",
                reason="bad_arg",
                field=name,
            )
        return value

    def opt_float(self, name: str) -> float | None:
        value = self._get(name, False)
        if value is _NOT_GIVEN or value is None:
            return None
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self._bad(name, "a finite number")
        return float(value)

    def opt_map(self, name: str) -> dict[str, Any] | None:
        value = self._get(name, False)
        if value is _NOT_GIVEN or value is None:
            return None
        if type(value) is not dict:
            raise self._bad(name, "a map")
        return value

    def opt_str_list(self, name: str) -> list[str] | None:
        value = self._get(name, False)
        if value is _NOT_GIVEN or value is None:
            return None
        if type(value) is not list or any(type(v) is not str for v in value):
            raise self._bad(name, "a list of strings")
        return value

    def req_bytes(self, name: str) -> bytes:
        value = self._get(name, True)
        if type(value) is not bytes:
            raise self._bad(name, "binary (bin or a frame reference)")
        return value

    def raw(self, name: str) -> Any:
        """The value as sent (the engine validates it), or ``_NOT_GIVEN``."""
        return self._get(name, False)

    def present(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The values of those ``names`` that were sent, as sent (optional fields)."""
        raw = self._raw
        self._seen.update(names)
        return {name: raw[name] for name in names if name in raw}

    def all_seen(self) -> bool:
        """Whether every argument sent was read already (no optional one is left)."""
        return self._raw.keys() <= self._seen

    def done(self) -> None:
        if self.all_seen():
            return
        unknown = set(self._raw) - self._seen
        if unknown:
            raise BadRequest(
                f"{self._op}: unknown arguments {sorted(unknown)}",
                reason="unknown_arg",
                fields=sorted(unknown),
            )


@dataclass(slots=True)
class Call:
    request: Request
    identity: Identity
    args: Args


# --- search (placeholder until the hybrid index lands) ---------------------------

_TERM_RE: Final = re.compile(r"\w+")


def lexical_scan_search(
    items: Iterable[Any], query: str, k: int, *, tags: Iterable[str] = ()
) -> list[tuple[Any, float]]:
    """Score items by plain term overlap with ``query``; the best ``k``, best first.

    score = (distinct query terms found / distinct query terms)
            + 0.5 if the whole query occurs as a substring
            + 0.01 * min(total term occurrences, 10)        (a weak tie-break)
    Items matching nothing are left out.  A linear scan: the hybrid
    (dense + BM25) index replaces this function.
    """
    needle = query.casefold().strip()
    terms = set(_TERM_RE.findall(needle))
    want_tags = set(tags)
    if not needle:
        return []
    scored: list[tuple[float, str, Any]] = []
    for item in items:
        if want_tags and not want_tags.issubset(item.tags):
            continue
        hay = item.text.casefold()
        words = _TERM_RE.findall(hay)
        found = terms.intersection(words)
        score = len(found) / len(terms) if terms else 0.0
        if needle in hay:
            score += 0.5
        if score <= 0.0:
            continue
        occurrences = sum(1 for w in words if w in terms)
        score += 0.01 * min(occurrences, 10)
        scored.append((score, item.id, item))
    scored.sort(key=lambda entry: (-entry[0], entry[1]))
    return [(item, round(score, 6)) for score, _, item in scored[:k]]


# --- the service ----------------------------------------------------------------


class Service:
    """Dispatches requests to op handlers over one engine."""

    def __init__(
        self,
        engine: Any,
        *,
        admin_uids: Iterable[int] = (),
        thread_limit: int = 64,
        events_endpoint: str | None = None,
        now: Callable[[], float] = time.time,
        plugins: Any = None,
        search: Any = None,
        scheduler: Any = None,
    ) -> None:
        self.engine = engine
        # Packed wire maps of recently returned items (get and search replies).
        self.wire = WireCache()
        # memosd.scheduling.SchedulerRuntime (job runner + tier scheduler), or None.
        self.scheduler = scheduler
        # memosd.models.cache.ModelCache (loaded model backends), or None; set by the daemon.
        self.models: Any = None
        # memosd.ops_kv.KvRuntime (activation memory), or None; set by the daemon.
        self.kv: Any = None
        # memosd.ops_lora.LoraRuntime (parameter memory), or None; set by the daemon.
        self.lora: Any = None
        # memosd.plugins.manager.PluginManager; None: items are not checked by form.
        self.plugins = plugins
        # memosd.gcstats.GcPauses installed by the daemon, or None.
        self.gc_pauses: Any = None
        # memosd.index.SearchService, or None (index.enabled = false).
        self.search = search
        # principal -> LSN of its newest acknowledged write (read-your-writes).
        self.written_lsn: dict[str, int] = {}
        self.admin_uids = frozenset({0, os.getuid(), *admin_uids})
        # A plain executor: under load it costs half of anyio.to_thread's hop here.
        self.executor = ThreadPoolExecutor(thread_limit, thread_name_prefix="memosd-op")
        self.events_endpoint = events_endpoint
        self.started = now()
        self._now = now
        self.inflight: Callable[[], int] = lambda: 0
        self.subscribers: Callable[[], int] = lambda: 0  # set by the server
        # name -> (cube, grants); token hash -> record.  Filled on reads, cleared
        # whenever ACL state may change (see invalidate_acl).
        self._acl_cache: dict[str, tuple[Any, dict[str, str]]] = {}
        self._token_cache: dict[bytes, Any] = {}
        # (peer, token) -> Identity: resolving costs more than a cached read.
        self._identity_cache: dict[tuple[Peer | None, str | None], Identity] = {}

    def _spec(self, request: Request) -> OpSpec:
        spec = OPS.get(request.op)
        if spec is None:
            raise BadRequest(f"unknown op {request.op!r}", reason="unknown_op", op=request.op)
        return spec

    def _call(self, request: Request, peer: Peer | None) -> Call:
        key = (peer, request.token)
        identity = self._identity_cache.get(key)
        if identity is None:
            identity = resolve_identity(peer, request.token, self, self.admin_uids)
            if len(self._identity_cache) >= _CACHE_MAX:
                self._identity_cache.clear()
            self._identity_cache[key] = identity
        return Call(request, identity, Args(request.op, request.args))

    def kind(self, op_name: str) -> str:
        """How the server runs ``op_name``: inline, write, task or feed."""
        spec = OPS.get(op_name)
        return "inline" if spec is None else spec.kind  # unknown ops fail fast, inline

    def is_inline(self, op_name: str) -> bool:
        return self.kind(op_name) == "inline"

    def handle_inline(self, request: Request, peer: Peer | None) -> Reply:
        """Run an inline op synchronously (the server calls this from its loop)."""
        spec = self._spec(request)
        if not spec.inline:
            raise InternalError(f"{request.op} is not an inline op")
        result = spec.handler(self, self._call(request, peer))
        return result if isinstance(result, Reply) else Reply(result)

    def try_quick(self, request: Request, peer: Peer | None) -> Reply | None:
        """A task op answered on the event loop, or None: run it as a task.

        Only ops with a ``quick`` handler (``search``) are tried; it raises the
        same errors the task would (it parses and checks the same way).
        """
        spec = self._spec(request)
        if spec.quick is None:
            return None
        result = spec.quick(self, self._call(request, peer))
        if result is NOT_QUICK:
            return None
        return result if isinstance(result, Reply) else Reply(result)

    def start_write(self, request: Request, peer: Peer | None) -> Write:
        """Parse and check a write op (event loop thread; never blocks).

        Raises the request's error (bad arguments, access, unhealthy engine);
        nothing is submitted yet: :meth:`submit_write` does that, and
        :meth:`finish_write` turns the outcome into the reply.
        """
        spec = self._spec(request)
        if spec.kind != "write":
            raise InternalError(f"{request.op} is not a write op")
        call = self._call(request, peer)
        planned: Write = spec.handler(self, call)
        planned.principal = call.identity.principal
        return planned

    def submit_write(self, write: Write, on_done: Callable[[Submission[Any]], None]) -> None:
        """Submit a checked write to the engine's group commit; never blocks.

        ``on_done(submission)`` runs in the committing thread once the batch
        is durable or failed.  Raises at once if the engine refuses writes.
        """
        if write.add is not None:
            cube, text, fields = write.add
            self.engine.add_nowait(cube, text, fields, on_done)
        else:
            self.engine.atomic_nowait(write.plan, on_done)

    def finish_write(
        self, write: Write, outcome: Callable[[], Any], *, last_lsn: int | None = None
    ) -> Reply:
        """The reply of a resolved write; ``outcome()`` returns the plan's result
        or raises the write's error (event loop thread).

        ``last_lsn``: the engine's last LSN read after the write resolved (the
        server reads it once for a burst of completions); read here if not given.
        """
        try:
            result = outcome()
        finally:
            if write.acl_change:
                self.invalidate_acl()
        if write.principal is not None:
            # The write is applied, so the engine's last LSN covers it.
            self.written_lsn[write.principal] = (
                self.engine.last_lsn if last_lsn is None else last_lsn
            )
        out = write.finish(result)
        return out if isinstance(out, Reply) else Reply(out)

    def handle_feed(self, request: Request, peer: Peer | None) -> tuple[Identity, Any]:
        """Validate ``subscribe``/``unsubscribe``: the identity and the handler's result."""
        spec = self._spec(request)
        if spec.kind != "feed":
            raise InternalError(f"{request.op} is not a feed op")
        call = self._call(request, peer)
        return call.identity, spec.handler(self, call)

    def identity(self, peer: Peer | None, token: str | None) -> Identity:
        """Resolve a principal again (the feed re-checks subscribers after token changes)."""
        return resolve_identity(peer, token, self, self.admin_uids)

    def can_read(self, identity: Identity, cube: str) -> bool:
        """Whether ``identity`` may read ``cube`` (any level is at least read)."""
        return self.level(identity, cube)[1] is not None

    async def handle(self, request: Request, peer: Peer | None) -> Reply:
        """Run any op to completion (tests and tools; the server dispatches by kind)."""
        spec = self._spec(request)
        if spec.kind == "write":
            write = self.start_write(request, peer)
            future = self.engine.atomic_future(write.plan)
            # shield: a cancelled wait must not cancel the engine's future.
            try:
                await asyncio.shield(asyncio.wrap_future(future))
            except asyncio.CancelledError:
                raise
            except BaseException:
                pass  # finish_write raises the write's own error
            return self.finish_write(write, future.result)
        if spec.kind == "feed":
            raise BadRequest(
                f"{request.op} needs a connection; send it to the daemon's socket",
                reason="bad_op",
            )
        result = spec.handler(self, self._call(request, peer))
        if not spec.inline:
            result = await result
        return result if isinstance(result, Reply) else Reply(result)

    # ACL state, cached: every request checks it, and it changes rarely.

    def invalidate_acl(self) -> None:
        """Forget cached cubes, grants and tokens (after any op that may change them)."""
        self._acl_cache.clear()
        self._token_cache.clear()
        self._identity_cache.clear()

    def on_change(self, kind: str) -> None:
        """Change-feed hook (event loop thread): ACL-relevant events clear the cache."""
        if kind in _ACL_EVENTS:
            self.invalidate_acl()

    def token_by_hash(self, token_hash: bytes) -> Any:
        record = self._token_cache.get(token_hash)
        if record is None:
            record = self.engine.token_by_hash(token_hash)
            if record is not None:
                if len(self._token_cache) >= _CACHE_MAX:
                    self._token_cache.clear()
                self._token_cache[token_hash] = record
        return record

    def cube_acl(self, name: str) -> tuple[Any, dict[str, str]] | None:
        entry = self._acl_cache.get(name)
        if entry is None:
            try:
                cube = self.engine.get_cube(name)
                grants = self.engine.grants(name)
            except NotFound:
                return None
            entry = (cube, dict(grants))
            if len(self._acl_cache) >= _CACHE_MAX:
                self._acl_cache.clear()
            self._acl_cache[name] = entry
        return entry

    # helpers used by handlers

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking engine call in a worker thread (asyncio backend).

        Cancellation (request timeout, drain deadline) abandons the wait, not
        the call: a write that times out may still be applied.
        """
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def close(self) -> None:
        """Stop the worker pool (waits for calls already running)."""
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def run_acl_change(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """:meth:`run` for ops that change cubes, grants or tokens: drop the ACL cache.

        Cleared after the engine call returns (success or not) and before the
        reply is sent, on the event loop thread, where every cache fill happens
        too, so no request served after the reply can see the old state.
        """
        try:
            return await self.run(fn, *args, **kwargs)
        finally:
            self.invalidate_acl()

    def require_writable(self) -> None:
        if not self.engine.healthy:
            raise Unavailable(
                "the storage engine is unhealthy and refuses writes; the daemon is restarting",
                reason="unhealthy",
            )

    def level(self, identity: Identity, cube: str) -> tuple[Any, str | None]:
        entry = self.cube_acl(cube)
        if entry is None:
            return None, None
        info, grants = entry
        return info, access_level(identity, info.owner, grants)

    def require(self, identity: Identity, cube: str, needed: str) -> Any:
        info, level = self.level(identity, cube)
        require_level(level, needed, cube)
        return info


def _cube_wire(cube: Any, access: str | None = None) -> dict[str, Any]:
    wire: dict[str, Any] = to_wire(cube)
    if access is not None:
        wire["access"] = access
    return wire


# --- ops: session ---------------------------------------------------------------


@op("ping", inline=True)
def _ping(svc: Service, call: Call) -> Any:
    call.args.done()
    return {
        "pong": True,
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        # The PUB socket is the operator's firehose (mode 0600): admins only.
        "events": svc.events_endpoint if call.identity.admin else None,
    }


@op("whoami", inline=True)
def _whoami(svc: Service, call: Call) -> Any:
    call.args.done()
    ident = call.identity
    peer = ident.peer
    return {
        "principal": ident.principal,
        "admin": ident.admin,
        "token": ident.token,
        "uid": peer.uid if peer else None,
        "gid": peer.gid if peer else None,
        "pid": peer.pid if peer else None,
    }


@op("status")
async def _status(svc: Service, call: Call) -> Any:
    call.args.done()
    result: dict[str, Any] = {
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "healthy": bool(svc.engine.healthy),
        "uptime_s": round(svc._now() - svc.started, 3),
        "pid": os.getpid(),
    }
    result["plugins"] = plugins_result(svc.plugins)["plugins"]
    if call.identity.admin:
        result["inflight"] = svc.inflight()
        result["subscribers"] = svc.subscribers()
        result["engine"] = to_wire(await svc.run(svc.engine.status))
        if svc.search is not None:
            result["search"] = to_wire(await svc.run(svc.search.status))
        result["process"] = _process_status(svc)
    return result


def _process_status(svc: Service) -> dict[str, Any]:
    """Memory and cyclic-GC pauses of the daemon process (admins only)."""
    out: dict[str, Any] = {}
    try:
        with open("/proc/self/statm", "rb") as fh:
            out["rss_mb"] = round(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        out["rss_mb"] = None
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if svc.gc_pauses is not None:
        out.update(svc.gc_pauses.snapshot())
    return out


@op("plugins", inline=True)
def _plugins(svc: Service, call: Call) -> Any:
    """Every plugin the daemon found (docs/plugins.md, "The plugins op")."""
    call.args.done()
    return plugins_result(svc.plugins)


# --- ops: cubes -----------------------------------------------------------------


def _cube_config(raw: dict[str, Any] | None) -> Any:
    if raw is None:
        return None
    allowed = {"embedding_model", "embedding_dim", "tier_policy", "extra"}
    unknown = set(raw) - allowed
    if unknown:
        raise BadRequest(
            f"create_cube: unknown config fields {sorted(unknown)}",
            reason="bad_arg",
            field="config",
        )
    try:
        return validate_cube_config(CubeConfig(**raw))
    except TypeError as exc:
        raise BadRequest(
            f"create_cube: bad config: {exc}", reason="bad_arg", field="config"
        ) from None


@op("create_cube", write=True)
def _create_cube(svc: Service, call: Call) -> Write:
    a = call.args
    name = a.req_str("name")
    config = _cube_config(a.opt_map("config"))
    owner = a.opt_str("owner")
    a.done()
    if owner is not None:
        owner = validate_principal(owner, "owner")
        if owner != call.identity.principal:
            require_admin(call.identity, "create_cube for another owner")
    svc.require_writable()
    validate_cube_name(name)
    owner = owner or call.identity.principal
    if svc.search is not None:
        # The cube records the daemon's embedding model; a client asking for
        # another one is refused now rather than at its first search.
        if config is None:
            config = svc.search.cube_config()
        else:
            svc.search.check_cube_config(name, config)
    return Write(
        lambda p: p.create_cube(name, owner=owner, config=config),
        _owned_cube_wire,
        acl_change=True,
    )


def _owned_cube_wire(cube: Any) -> dict[str, Any]:
    return _cube_wire(cube, "owner")


@op("list_cubes", inline=True)
def _list_cubes(svc: Service, call: Call) -> Any:
    call.args.done()
    ident = call.identity
    out = []
    for cube in svc.engine.list_cubes():
        if ident.admin or cube.owner == ident.principal:
            level: str | None = "owner"
        else:
            entry = svc.cube_acl(cube.name)
            level = access_level(ident, cube.owner, entry[1]) if entry else None
        if level is not None:
            out.append(_cube_wire(cube, level))
    return out


@op("get_cube", inline=True)
def _get_cube(svc: Service, call: Call) -> Any:
    name = call.args.req_str("name")
    call.args.done()
    info, level = svc.level(call.identity, name)
    require_level(level, "read", name)
    wire = _cube_wire(info, level)
    wire["counts"] = to_wire(svc.engine.count_items(name))
    if level == "owner":
        wire["grants"] = dict(svc.engine.grants(name))
    return wire


@op("drop_cube", write=True)
def _drop_cube(svc: Service, call: Call) -> Write:
    name = call.args.req_str("name")
    call.args.done()
    svc.require(call.identity, name, "owner")
    svc.require_writable()
    return Write(
        lambda p: p.drop_cube(name),
        lambda erased: {"name": name, "erased": erased},
        acl_change=True,
    )


@op("grant", write=True)
def _grant(svc: Service, call: Call) -> Write:
    a = call.args
    cube = a.req_str("cube")
    principal = validate_principal(a.req_str("principal"))
    level = a.req_str("level")
    a.done()
    if level not in ("read", "write"):
        raise BadRequest("grant: level must be 'read' or 'write'", reason="bad_arg", field="level")
    svc.require(call.identity, cube, "owner")
    svc.require_writable()
    return Write(
        lambda p: p.set_grant(cube, principal, level),
        lambda _: {"cube": cube, "principal": principal, "level": level},
        acl_change=True,
    )


@op("revoke", write=True)
def _revoke(svc: Service, call: Call) -> Write:
    a = call.args
    cube = a.req_str("cube")
    principal = validate_principal(a.req_str("principal"))
    a.done()
    svc.require(call.identity, cube, "owner")
    svc.require_writable()
    return Write(
        lambda p: p.set_grant(cube, principal, None),
        lambda _: {"cube": cube, "principal": principal, "level": None},
        acl_change=True,
    )


# --- ops: tokens ----------------------------------------------------------------


@op("token_create", write=True)
def _token_create(svc: Service, call: Call) -> Write:
    a = call.args
    name = a.req_str("name")
    principal = a.opt_str("principal")
    a.done()
    require_admin(call.identity, "token_create")
    if not _TOKEN_NAME_RE.fullmatch(name):
        raise BadRequest(
            "token_create: name must match [A-Za-z0-9][A-Za-z0-9_.-]{0,127}",
            reason="bad_arg",
            field="name",
        )
    principal = validate_principal(principal) if principal is not None else f"token:{name}"
    svc.require_writable()
    secret = new_token_secret()
    token_hash = hash_token(secret)
    as_principal = principal
    return Write(
        lambda p: p.put_token(name, token_hash=token_hash, principal=as_principal),
        lambda _: {"name": name, "principal": as_principal, "token": secret},
        acl_change=True,
    )


@op("token_list")
async def _token_list(svc: Service, call: Call) -> Any:
    call.args.done()
    require_admin(call.identity, "token_list")
    records = await svc.run(svc.engine.tokens)
    return [{"name": r.name, "principal": r.principal, "created_us": r.created_us} for r in records]


@op("token_revoke", write=True)
def _token_revoke(svc: Service, call: Call) -> Write:
    name = call.args.req_str("name")
    call.args.done()
    require_admin(call.identity, "token_revoke")
    svc.require_writable()
    return Write(lambda p: p.delete_token(name), lambda _: {"name": name}, acl_change=True)


# --- ops: items -----------------------------------------------------------------

MAX_ADD_MANY: Final = 1000  # items in one add_many request (one WAL record)

_ITEM_FIELDS: Final = (
    "tags",
    "metadata",
    "payload",
    "tier",
    "importance",
    "ttl_s",
    "valid_from_us",
    "valid_to_us",
)


def _item_fields(a: Args, names: tuple[str, ...]) -> dict[str, Any]:
    """The optional item fields present in ``args`` (the engine validates values)."""
    out = a.present(names)
    if "tags" in out and type(out["tags"]) is not list:
        raise BadRequest(
            "argument 'tags' must be a list of strings", reason="bad_arg", field="tags"
        )
    return out


def _new_item_args(a: Args) -> tuple[str, str | None, dict[str, Any]]:
    """Text, form and keyword fields of one new item (``add``, an ``add_many`` entry)."""
    text = a.req_str("text")
    if a.all_seen():
        # Nothing but the text (and an add's cube): the common add, without
        # looking up each optional field.
        return text, None, {"source": None, "session": None}
    fields = _item_fields(a, _ITEM_FIELDS)
    fields["source"] = a.opt_str("source")
    fields["session"] = a.opt_str("session")
    form = a.opt_str("form")
    a.done()
    return text, form, fields


def _checked_new_item(
    svc: Service, text: str, form: str | None, fields: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """After the access check: the item's form checks (and may rewrite) text and payload."""
    if svc.plugins is not None:
        text = validate_add(svc.plugins, form, text, fields)
    if form is not None:
        fields["form"] = form
    return text, fields


@op("add", write=True)
def _add(svc: Service, call: Call) -> Write:
    a = call.args
    cube = a.req_str("cube")
    text, form, fields = _new_item_args(a)
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    text, fields = _checked_new_item(svc, text, form, fields)
    fields["actor"] = call.identity.principal
    return Write(lambda p: p.add(cube, text, **fields), item_to_wire, add=(cube, text, fields))


@op("add_many", write=True)
def _add_many(svc: Service, call: Call) -> Write:
    """Up to ``MAX_ADD_MANY`` new items in one atomic, durable step (one WAL record)."""
    a = call.args
    cube = a.req_str("cube")
    entries = a.raw("items")
    a.done()
    if type(entries) is not list or not entries:
        raise BadRequest(
            "add_many: argument 'items' must be a non-empty list of maps",
            reason="bad_arg" if entries is not _NOT_GIVEN else "missing_arg",
            field="items",
        )
    if len(entries) > MAX_ADD_MANY:
        raise TooLarge(
            f"add_many: {len(entries)} items in one request; at most {MAX_ADD_MANY}",
            reason="too_many_items",
            limit=MAX_ADD_MANY,
        )
    raw = []
    for i, entry in enumerate(entries):
        if type(entry) is not dict:
            raise BadRequest(
                f"add_many: items[{i}] must be a map, got {type(entry).__name__}",
                reason="bad_arg",
                field="items",
                index=i,
            )
        raw.append(_new_item_args(Args(f"add_many items[{i}]", entry)))
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    parsed = [_checked_new_item(svc, text, form, fields) for text, form, fields in raw]
    actor = call.identity.principal

    def plan(p: Planner) -> list[MemoryItem]:
        return [p.add(cube, text, actor=actor, **fields) for text, fields in parsed]

    return Write(plan, lambda items: [item_to_wire(item) for item in items])


@op("get", inline=True)
def _get(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.req_str("id")
    if a.all_seen():  # the latest version: nothing else to parse
        version = as_of = None
    else:
        version = a.opt_int("version")
        as_of = a.opt_int("as_of_us")
        a.done()
    svc.require(call.identity, cube, "read")
    item = svc.engine.get(cube, item_id, version=version, as_of_us=as_of)
    return Reply(None, packed=svc.wire.item(item))


@op("update", write=True)
def _update(svc: Service, call: Call) -> Write:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.req_str("id")
    expected = a.opt_int("expected_version")
    fields = _item_fields(a, ("text", "status", *_ITEM_FIELDS))
    a.done()
    if "text" in fields and type(fields["text"]) is not str:
        raise BadRequest("update: argument 'text' must be a string", reason="bad_arg", field="text")
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    if svc.plugins is not None and ("text" in fields or "payload" in fields):
        # The form sees the values after the update (docs/plugins.md).
        validate_update(svc.plugins, svc.engine.get(cube, item_id), fields)
    actor = call.identity.principal
    return Write(
        lambda p: p.update(cube, item_id, actor=actor, expected_version=expected, **fields),
        item_to_wire,
    )


@op("history", inline=True)
def _history(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.req_str("id")
    a.done()
    svc.require(call.identity, cube, "read")
    return [item_to_wire(v) for v in svc.engine.history(cube, item_id)]


@op("rollback", write=True)
def _rollback(svc: Service, call: Call) -> Write:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.req_str("id")
    version = a.req_int("version")
    a.done()
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    actor = call.identity.principal
    return Write(lambda p: p.rollback(cube, item_id, version, actor=actor), item_to_wire)


@op("delete", write=True)
def _delete(svc: Service, call: Call) -> Write:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.req_str("id")
    a.done()
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    actor = call.identity.principal
    return Write(lambda p: p.delete(cube, item_id, actor=actor), item_to_wire)


@op("purge", write=True)
def _purge(svc: Service, call: Call) -> Write:
    a = call.args
    cube = a.req_str("cube")
    item_id = a.req_str("id")
    reason = a.opt_str("reason")
    a.done()
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    actor = call.identity.principal
    return Write(lambda p: p.purge(cube, item_id, actor=actor, reason=reason), to_wire)


_STATUSES: Final = ("active", "archived", "deleted", "all")


@op("list_items")
async def _list_items(svc: Service, call: Call) -> Any:
    a = call.args
    cube = a.req_str("cube")
    status = a.opt_str("status") or "active"
    tier = a.opt_str("tier")
    form = a.opt_str("form")
    limit = a.opt_int("limit", lo=1, hi=MAX_LIST_LIMIT) or 100
    after = a.opt_str("after")
    a.done()
    if status not in _STATUSES:
        raise BadRequest(
            f"list_items: status must be one of {list(_STATUSES)}", reason="bad_arg", field="status"
        )
    svc.require(call.identity, cube, "read")
    items = await svc.run(
        svc.engine.list_items,
        cube,
        status=None if status == "all" else status,
        tier=tier,
        form=form,
        limit=limit,
        after=after,
    )
    return [item_to_wire(i) for i in items]


def _scan_active(engine: Any, cube: str, tier: str | None, form: str | None) -> Iterable[Any]:
    items: Iterable[Any] = engine.iter_items(cube, tier=tier, form=form, page=_SCAN_PAGE)
    return items


@dataclass(frozen=True, slots=True)
class _SearchArgs:
    names: list[str]
    query: str
    k: int
    tags: list[str]
    tier: str | None
    form: str | None
    search: dict[str, Any]  # the SearchService.search keywords (None without indexes)


def _search_args(svc: Service, call: Call) -> _SearchArgs:
    """A search request's arguments, parsed and access-checked (shared by both paths)."""
    a = call.args
    cube = a.opt_str("cube")
    cubes = a.opt_str_list("cubes")
    query = a.req_str("query")
    k = a.opt_int("k", lo=1, hi=MAX_K) or 10
    tags = a.opt_str_list("tags") or []
    tier = a.opt_str("tier")
    form = a.opt_str("form")
    session = a.opt_str("session")
    time_from_us = a.opt_int("time_from_us")
    time_to_us = a.opt_int("time_to_us")
    as_of_us = a.opt_int("as_of_us")
    status = a.opt_str("status")
    mode = a.opt_str("mode") or "hybrid"
    explain = a.raw("explain") is True
    wait_raw = a.raw("wait")
    a.done()
    names = ([cube] if cube is not None else []) + list(cubes or [])
    if not names:
        raise BadRequest("search: give `cube` or `cubes`", reason="bad_arg", field="cube")
    for name in names:
        svc.require(call.identity, name, "read")
    keywords: dict[str, Any] = {}
    if svc.search is not None:
        from memosd.index import SearchFilters  # noqa: PLC0415 - heavy, only with indexes

        keywords = {
            "k": k,
            "filters": SearchFilters(
                tiers=(tier,) if tier else None,
                forms=(form,) if form else None,
                tags=tuple(tags),
                sessions=(session,) if session else None,
                time_from_us=time_from_us,
                time_to_us=time_to_us,
                as_of_us=as_of_us,
                status=status or "active",
            ),
            # Read-your-writes: wait until this principal's own writes are indexed.
            "wait_for_lsn": (
                svc.written_lsn.get(call.identity.principal) if wait_raw is not False else None
            ),
            "mode": mode,
            "explain": explain,
        }
    return _SearchArgs(names, query, k, tags, tier, form, keywords)


def _hits_reply(svc: Service, hits: Iterable[Any]) -> Reply:
    """Hits as ``[{"item", "score", "components"}]``, items packed through the wire cache."""
    return Reply(None, packed=svc.wire.hits(hits))


def _search_quick(svc: Service, call: Call) -> Any:
    """The search on the event loop, if the search service finds it cheap enough
    (memosd.index.SearchService.try_search_inline); else NOT_QUICK (worker thread)."""
    args = _search_args(svc, call)
    if svc.search is None:
        return NOT_QUICK
    hits = svc.search.try_search_inline(args.names, args.query, **args.search)
    return NOT_QUICK if hits is None else _hits_reply(svc, hits)


@op("search", quick=_search_quick)
async def _search(svc: Service, call: Call) -> Any:
    """Hybrid search over one cube (``cube``) or several (``cubes``), fused."""
    args = _search_args(svc, call)
    names = args.names
    if svc.search is None:

        def scan() -> list[tuple[Any, float]]:
            return lexical_scan_search(
                (i for n in names for i in _scan_active(svc.engine, n, args.tier, args.form)),
                args.query,
                args.k,
                tags=args.tags,
            )

        scanned = await svc.run(scan)
        return [{"item": item_to_wire(item), "score": score} for item, score in scanned]

    def run() -> list[Any]:
        return list(svc.search.search(names, args.query, **args.search))

    return _hits_reply(svc, await svc.run(run))


# --- ops: the change feed (the server keeps the subscription) --------------------


@op("subscribe", feed=True)
def _subscribe(svc: Service, call: Call) -> Any:
    """The filter: one cube (read access required; NotFound hides it) or all readable."""
    cube = call.args.opt_str("cube")
    call.args.done()
    if cube is not None:
        svc.require(call.identity, cube, "read")
    return {"cube": cube}


@op("unsubscribe", feed=True)
def _unsubscribe(svc: Service, call: Call) -> Any:
    call.args.done()
    return {}


# --- ops: maintenance and portability --------------------------------------------


@op("checkpoint")
async def _checkpoint(svc: Service, call: Call) -> Any:
    call.args.done()
    require_admin(call.identity, "checkpoint")
    svc.require_writable()
    return to_wire(await svc.run(svc.engine.checkpoint))


@op("wal_verify")
async def _wal_verify(svc: Service, call: Call) -> Any:
    call.args.done()
    require_admin(call.identity, "wal_verify")
    return to_wire(await svc.run(svc.engine.verify_wal))


@op("export_cube")
async def _export_cube(svc: Service, call: Call) -> Any:
    name = call.args.req_str("name")
    call.args.done()
    svc.require(call.identity, name, "owner")

    def export() -> bytes:
        export = svc.engine.export_cube(name)
        forms = FormBlobs(svc.plugins.forms if svc.plugins is not None else None)
        blobs = export_blobs(export, svc.engine.blobs.read, forms)
        return bytes(dump_cube(export, blobs=blobs))

    data = await svc.run(export)
    return Reply({"name": name, "bytes": len(data), "data": {FRAME_KEY: 1}}, [data])


@op("import_cube")
async def _import_cube(svc: Service, call: Call) -> Any:
    a = call.args
    data = a.req_bytes("data")
    name = a.opt_str("name")
    owner = a.opt_str("owner")
    a.done()
    if owner is not None:
        owner = validate_principal(owner, "owner")
        if owner != call.identity.principal:
            require_admin(call.identity, "import_cube for another owner")
    svc.require_writable()

    def load_and_import() -> Any:
        portable = read_portable(data)
        export = portable.export
        if svc.plugins is not None:
            check_forms(svc.plugins.forms, export)
        forms = FormBlobs(svc.plugins.forms if svc.plugins is not None else None)
        check_blobs(export, portable.blobs, forms)
        for blob in portable.blobs.values():
            svc.engine.blobs.put_bytes(blob)  # pinned until the import commits
        return svc.engine.import_cube(
            export,
            name=name,
            owner=owner or call.identity.principal,
            actor=call.identity.principal,
        )

    cube = await svc.run_acl_change(load_and_import)
    return _cube_wire(cube, "owner")


from memosd import ops_jobs as _ops_jobs  # noqa: E402,F401 - registers ops
from memosd import ops_kv as _ops_kv  # noqa: E402,F401 - registers ops
from memosd import ops_lora as _ops_lora  # noqa: E402,F401 - registers ops
