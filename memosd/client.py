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
from typing import Any, Final, TypeVar

import anyio
import zmq
import zmq.asyncio

from memosd.errors import BadRequest, Unavailable, error_from_wire
from memosd.memcube.model import MemoryItem, Provenance, PurgeRecord, Usage
from memosd.protocol import decode_event, decode_response, encode_request
from memosd.settings import default_socket_path

__all__ = [
    "AsyncClient",
    "AsyncSubscription",
    "Client",
    "CubeInfo",
    "Event",
    "Hit",
    "Item",
    "Subscription",
    "item_from_wire",
]

T = TypeVar("T")
Item = MemoryItem
_ITEM_FIELDS: Final = frozenset(MemoryItem.__dataclass_fields__)
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


# --- decoding ---------------------------------------------------------------------------


def _bad(what: str) -> BadRequest:
    return BadRequest(f"unexpected response shape for {what}", reason="bad_response")


def item_from_wire(wire: Any) -> Item:
    """Rebuild a MemoryItem from its wire map (unknown keys from newer daemons ignored)."""
    if type(wire) is not dict:
        raise _bad("item")
    try:
        values = {k: v for k, v in wire.items() if k in _ITEM_FIELDS}
        prov = values["provenance"]
        values["provenance"] = Provenance(
            source=prov.get("source"),
            actor=prov.get("actor"),
            session=prov.get("session"),
            parents=tuple((str(p[0]), int(p[1])) for p in prov.get("parents", ())),
            operation=prov.get("operation", ""),
        )
        usage = values.get("usage") or {}
        values["usage"] = Usage(
            hits=usage.get("hits", 0),
            last_hit_us=usage.get("last_hit_us"),
            heat=usage.get("heat", 0.0),
        )
        values["tags"] = tuple(values.get("tags", ()))
        return MemoryItem(**values)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise _bad("item") from None


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
        )
    except (TypeError, ValueError):
        raise _bad("event") from None


_KEEPALIVE: Final = "keepalive"
_ENDED: Final = "subscription_ended"


def _items(wire: Any) -> list[Item]:
    if type(wire) is not list:
        raise _bad("item list")
    return [item_from_wire(w) for w in wire]


def _hits(wire: Any) -> list[Hit]:
    if type(wire) is not list:
        raise _bad("search")
    return [
        Hit(
            item_from_wire(h["item"]),
            float(h["score"]),
            {str(k): float(v) for k, v in (h.get("components") or {}).items()},
        )
        for h in wire
    ]


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


def _export_bytes(wire: Any) -> bytes:
    data = wire.get("data") if type(wire) is dict else None
    if type(data) is not bytes:
        raise _bad("export_cube")
    return data


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
    ) -> Any:
        """Send one request and wait for its result (raw wire form)."""
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
                reply = sock.recv_multipart()
            except zmq.Again:
                raise self._timeout_error(op, wait_s) from None
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
        "lexical".  ``explain``: fill :attr:`Hit.components`.
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
        "lexical".  ``explain``: fill :attr:`Hit.components`.
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
