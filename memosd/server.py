"""The ZeroMQ edge of the daemon: a ROUTER for requests, a PUB for the change feed.

anyio on its asyncio backend.  The sockets are plain (non-blocking) pyzmq
sockets driven from the event loop thread: the receive loop drains every
queued message with ``NOBLOCK`` and only then waits for ZeroMQ's
edge-triggered ``ZMQ_FD`` (a reader registered once on the asyncio loop),
re-checking ``ZMQ_EVENTS`` first, as libzmq requires.  A send can consume
that edge, so after each send the loop is woken if input is pending.  This avoids a future
per message (zmq.asyncio) and keeps a ``get`` close to a bare echo.

Cheap reads (``get``, ``history``, cube lookups, ``ping``) run inline in the
receive loop; other ops run as tasks that wait for engine worker threads.
The engine's change listener (called from the writer thread) hands events to
the loop with ``loop.call_soon_threadsafe``.

Edge behaviour (docs/protocol.md, "Limits"):

* ``ZMQ_MAXMSGSIZE``: a frame larger than ``server.max_message_bytes`` makes
  libzmq drop the message *and disconnect the peer*; the client sees its
  request time out (the daemon never sees the message at all).  The total
  size of a multipart message is checked again after receipt (TooLarge).
* ``ZMQ_ROUTER_MANDATORY``: a reply to a peer that has gone raises
  EHOSTUNREACH, which is logged at debug level and dropped.
* Replies are sent with ``DONTWAIT``: when a peer's send queue holds
  ``server.sndhwm`` unread replies, further replies to that peer are dropped
  (logged) rather than blocking the loop for everybody.
* At most ``server.max_inflight`` requests run at once; beyond that the
  server stops reading, requests queue in the socket (``server.rcvhwm``
  messages), then in the peers' own send queues (their sends block/time out).
* ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``/``TIMEOUT``) disconnect dead peers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import structlog
import zmq
from anyio.abc import TaskGroup, TaskStatus

from memosd.auth import Peer, parse_peer_address
from memosd.errors import InternalError, MemosError, Unavailable
from memosd.protocol import (
    Limits,
    Request,
    decode_request,
    encode_error,
    encode_event,
    encode_response,
)
from memosd.service import Service
from memosd.settings import ServerSettings

__all__ = ["Server", "ipc_endpoint"]

_log = structlog.get_logger("memosd.server")
_BACKLOG = 1024
_BURST = 64  # messages handled before the receive loop yields to other tasks
SOCKET_FILE_MODE = 0o660


def ipc_endpoint(path: Path) -> str:
    return f"ipc://{path}"


class Server:
    """Serve ``service`` on a ROUTER socket; publish change events on a PUB socket."""

    def __init__(
        self,
        service: Service,
        settings: ServerSettings,
        *,
        socket_path: Path,
        events_path: Path,
        limits: Limits | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.socket_path = socket_path
        self.events_path = events_path
        self.limits = limits or Limits(max_message_bytes=settings.max_message_bytes)
        self._ctx: zmq.Context[Any] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_inflight = settings.max_inflight
        self._slot_free = anyio.Event()
        # Set by the ZMQ_FD reader callback; a bare asyncio future is the
        # cheapest wake-up (this is on every request's path when idle).
        self._input: asyncio.Future[None] | None = None
        self._inflight = 0
        self._bound: list[Path] = []
        self._events: collections.deque[Any] = collections.deque()
        self._events_scheduled = False
        self._idle = anyio.Event()
        self._idle.set()
        self._accepting = True
        self._receive_scope: anyio.CancelScope | None = None
        self._handlers_scope: anyio.CancelScope | None = None
        self._dropped_replies = 0
        service.inflight = lambda: self._inflight

    # --- lifecycle ------------------------------------------------------------

    def bind(self) -> None:
        """Create and bind both sockets (socket files get mode 0660)."""
        self._loop = asyncio.get_running_loop()
        ctx: zmq.Context[Any] = zmq.Context()
        self._ctx = ctx
        s = self.settings
        router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self._router = router  # owned from here on, so close() can release it
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)
        router.setsockopt(zmq.RCVHWM, s.rcvhwm)
        router.setsockopt(zmq.SNDHWM, s.sndhwm)
        router.setsockopt(zmq.BACKLOG, _BACKLOG)
        if s.heartbeat_ivl_ms > 0:
            router.setsockopt(zmq.HEARTBEAT_IVL, s.heartbeat_ivl_ms)
            router.setsockopt(zmq.HEARTBEAT_TIMEOUT, s.heartbeat_timeout_ms)
            router.setsockopt(zmq.HEARTBEAT_TTL, s.heartbeat_timeout_ms)
        router.bind(ipc_endpoint(self.socket_path))
        self._bound.append(self.socket_path)
        os.chmod(self.socket_path, SOCKET_FILE_MODE)

        pub: zmq.Socket[bytes] = ctx.socket(zmq.PUB)
        self._pub = pub
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, s.sndhwm)
        pub.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # subscribers only send subscriptions
        if s.heartbeat_ivl_ms > 0:
            pub.setsockopt(zmq.HEARTBEAT_IVL, s.heartbeat_ivl_ms)
            pub.setsockopt(zmq.HEARTBEAT_TIMEOUT, s.heartbeat_timeout_ms)
        pub.bind(ipc_endpoint(self.events_path))
        self._bound.append(self.events_path)
        os.chmod(self.events_path, SOCKET_FILE_MODE)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless :meth:`bind` was called), receive until :meth:`stop_accepting`."""
        if self._router is None:
            self.bind()
        try:
            async with anyio.create_task_group() as tg:
                self._handlers_scope = tg.cancel_scope
                task_status.started()
                with anyio.CancelScope() as scope:
                    self._receive_scope = scope
                    if self._accepting:
                        await self._receive_loop(tg)
                # Not accepting any more: the task group waits for in-flight handlers.
        finally:
            self.close()

    def stop_accepting(self) -> None:
        """Stop reading new requests; in-flight ones finish and are answered."""
        self._accepting = False
        if self._receive_scope is not None:
            self._receive_scope.cancel()
        self._wake_receiver()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (at most ``timeout_s``); True if drained."""
        with anyio.move_on_after(timeout_s):
            await self._idle.wait()
            return True
        return self._inflight == 0

    def cancel_inflight(self) -> None:
        """Give up on requests still running after the drain deadline."""
        if self._handlers_scope is not None:
            self._handlers_scope.cancel()

    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self) -> None:
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        for path in self._bound:  # only files this server created
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._bound.clear()

    # --- requests ---------------------------------------------------------------

    async def _receive_loop(self, tg: TaskGroup) -> None:
        router = self._router
        assert router is not None
        loop = asyncio.get_running_loop()
        fd = int(router.getsockopt(zmq.FD))
        loop.add_reader(fd, self._wake_receiver)
        try:
            await self._receive(router, tg, lambda: loop.remove_reader(fd))
        finally:
            loop.remove_reader(fd)

    async def _receive(
        self, router: zmq.Socket[bytes], tg: TaskGroup, pause_reader: Callable[[], object]
    ) -> None:
        burst = 0
        while self._accepting:
            if self._inflight >= self._max_inflight:
                # Full: stop watching the (level-triggered) fd, or the loop spins.
                pause_reader()
                self._slot_free = anyio.Event()
                await self._slot_free.wait()
                asyncio.get_running_loop().add_reader(
                    int(router.getsockopt(zmq.FD)), self._wake_receiver
                )
                continue
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if _pollin(router):
                    continue
                burst = 0
                self._input = asyncio.get_running_loop().create_future()
                try:
                    await self._input
                finally:
                    self._input = None
                continue
            self._dispatch(frames, tg)
            burst += 1
            if burst >= _BURST:  # let handlers and the change feed run too
                burst = 0
                await anyio.lowlevel.checkpoint()

    def _wake_receiver(self) -> None:
        waiter = self._input
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _dispatch(self, frames: list[zmq.Frame], tg: TaskGroup) -> None:
        """Answer inline if possible; otherwise start a task for the request."""
        if len(frames) < 2:
            return  # nothing but a routing id: nothing to answer
        # A REQ peer puts an empty delimiter frame before the message; echo it.
        split = 2 if len(frames) > 2 and len(frames[1].buffer) == 0 else 1
        envelope: list[Any] = list(frames[:split])
        peer = _peer_of(frames[split] if len(frames) > split else frames[0])
        try:
            request = decode_request([f.bytes for f in frames[split:]], self.limits)
        except MemosError as err:
            rid = err.details.get("id")
            _log.debug("bad request", code=err.code, reason=err.reason, pid=peer and peer.pid)
            self._send([*envelope, *encode_error(rid if type(rid) is int else None, err)])
            return
        if self.service.is_inline(request.op):
            self._send([*envelope, *self._answer_inline(request, peer)])
            return
        self._inflight += 1
        if self._inflight == 1:
            self._idle = anyio.Event()
        tg.start_soon(self._handle, envelope, request, peer)

    def _answer_inline(self, request: Request, peer: Peer | None) -> list[bytes]:
        try:
            return encode_response(request.id, self.service.handle_inline(request, peer))
        except MemosError as err:
            return encode_error(request.id, err)
        except Exception:
            return self._internal_error(request)

    def _internal_error(self, request: Request) -> list[bytes]:
        _log.exception("op failed", op=request.op)
        err = InternalError(f"internal error in {request.op}; see the daemon log")
        return encode_error(request.id, err)

    async def _handle(self, envelope: list[Any], request: Request, peer: Peer | None) -> None:
        started = time.perf_counter()
        try:
            try:
                with anyio.fail_after(self.settings.request_timeout_s):
                    result = await self.service.handle(request, peer)
                out = encode_response(request.id, result)
            except TimeoutError:
                err = Unavailable(
                    f"{request.op} took longer than the request timeout", reason="timeout"
                )
                out = encode_error(request.id, err)
            except MemosError as err:
                out = encode_error(request.id, err)
            except Exception:
                out = self._internal_error(request)
            self._send([*envelope, *out])
            _log.debug(
                "request",
                op=request.op,
                ms=round((time.perf_counter() - started) * 1000, 3),
                pid=peer and peer.pid,
            )
        finally:
            self._inflight -= 1
            self._slot_free.set()
            if self._inflight == 0:
                self._idle.set()

    def _send(self, frames: list[Any]) -> None:
        router = self._router
        if router is None:
            return
        try:
            router.send_multipart(frames, flags=zmq.DONTWAIT, copy=False)
        except zmq.Again:
            self._dropped_replies += 1
            _log.warning("reply dropped: the peer's queue is full (it is not reading)")
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                _log.debug("reply dropped: the peer disconnected")
            elif exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                pass  # closing
            else:
                _log.warning("reply dropped", error=str(exc))
        # Sending may have consumed the ZMQ_FD edge that announces new input.
        if self._input is not None and _pollin(router):
            self._wake_receiver()

    # --- change feed --------------------------------------------------------------

    def publish_threadsafe(self, event: Any) -> None:
        """Engine listener: queue ``event`` for the PUB socket (any thread; never raises).

        Called in the engine's writer thread, so it only appends to a deque and
        wakes the loop once per burst of events, not once per event.
        """
        loop = self._loop
        if loop is None:
            return
        self._events.append(event)
        if not self._events_scheduled:
            self._events_scheduled = True
            with contextlib.suppress(RuntimeError):  # loop closed: shutting down
                loop.call_soon_threadsafe(self._drain_events)

    def _drain_events(self) -> None:
        self._events_scheduled = False  # first: a later append schedules a new drain
        while self._events:
            self._publish(self._events.popleft())

    def _publish(self, event: Any) -> None:
        self.service.on_change(getattr(event, "kind", ""))
        pub = self._pub
        if pub is None:
            return
        try:
            pub.send_multipart(encode_event(event), flags=zmq.DONTWAIT)
        except zmq.ZMQError as exc:
            _log.debug("event dropped", error=str(exc))
        except MemosError:
            _log.exception("event not encodable")


def _pollin(sock: zmq.Socket[bytes]) -> bool:
    """``ZMQ_EVENTS & POLLIN`` (reading it also re-arms the edge-triggered ZMQ_FD)."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _peer_of(frame: zmq.Frame) -> Peer | None:
    try:
        value = frame.get("Peer-Address")
    except (zmq.ZMQError, UnicodeDecodeError):
        return None
    return parse_peer_address(value if isinstance(value, str) else None)
