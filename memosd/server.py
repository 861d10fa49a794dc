"""The ZeroMQ edge of the daemon: a ROUTER for requests and feeds, a PUB for admins.

anyio on its asyncio backend.  The sockets are plain (non-blocking) pyzmq
sockets driven from the event loop thread: the receive loop drains every
queued message with ``NOBLOCK`` and only then waits for ZeroMQ's
edge-triggered ``ZMQ_FD`` (a reader registered once on the asyncio loop),
re-checking ``ZMQ_EVENTS`` first, as libzmq requires.  A send can consume
that edge, so after each send the loop is woken if input is pending.  This avoids a future
per message (zmq.asyncio) and keeps a ``get`` close to a bare echo.

Cheap reads (``get``, ``history``, cube lookups, ``ping``) run inline in the
receive loop, and so does a search the search service estimates to be cheap
(a small index, a cached or cheaply embedded query, nothing to wait for: see
``IndexSettings.inline_search_us``); other searches go to a worker thread.
Writes are checked inline and submitted with ``engine.atomic_nowait`` (no
task, no thread, no future): the engine's commit thread calls back for each
write of a group commit, the completions are handed to the loop in one
``call_soon_threadsafe`` per burst, and their replies go out back to back
without an await per message.  Other ops run as tasks that wait
for engine worker threads.  The engine's change listener (called from the
writer thread) hands events to the loop the same way.

Change feed: ``subscribe`` on the request socket registers the connection
with :class:`~memosd.feed.Feed`, which pushes each event the principal may
read (docs/protocol.md, "Change feed").  The events socket (``events.sock``,
mode 0600) is only the operator's unfiltered firehose: an XPUB, so the daemon
knows which topics have subscribers and encodes nothing while none does.

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
import functools
import logging
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
from memosd.feed import Feed, SendStatus
from memosd.protocol import (
    Limits,
    Reply,
    Request,
    decode_request,
    encode_error,
    encode_event,
    encode_response,
)
from memosd.service import Service, Write
from memosd.settings import ServerSettings
from memosd.store.group_commit import Submission

__all__ = ["Server", "ipc_endpoint"]

_log = structlog.get_logger("memosd.server")
_BACKLOG = 1024
_BURST = 64  # messages handled before the receive loop yields to other tasks
SOCKET_FILE_MODE = 0o660
ADMIN_SOCKET_FILE_MODE = 0o600  # the PUB firehose: the daemon's user (and root) only
_FEED_TICK_S = 0.25  # retry of queued feed events
_ZERO_COPY_MIN_BYTES = 64 * 1024  # pyzmq's own copy_threshold
_PEER_CACHE_MAX = 4096  # parsed Peer-Address values kept (one per connection)
# Send flags as plain ints, and pyzmq's C-level send (the Python wrapper in
# zmq.Socket only adds routing_id/group handling, unused on a ROUTER): see
# _send_message.
_DONTWAIT = int(zmq.DONTWAIT)
_DONTWAIT_MORE = int(zmq.DONTWAIT | zmq.SNDMORE)
_send_frame = zmq.backend.Socket.send


# A finished write: envelope, request, its Write, its submission, start time, peer.
_WriteEntry = tuple[list[Any], Request, Write, Submission[Any], float, "Peer | None"]


def ipc_endpoint(path: Path) -> str:
    return f"ipc://{path}"


class Server:
    """Serve ``service`` on a ROUTER socket; push feeds; publish all events on a PUB socket."""

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
        # While idle, the reader callback answers requests itself (see
        # _wake_receiver); the receive loop's task group starts their tasks.
        self._tg: TaskGroup | None = None
        self._reading_inline = False
        self._inflight = 0
        self._bound: list[Path] = []
        self._events: collections.deque[Any] = collections.deque()
        self._events_scheduled = False
        # Topics (cube-name prefixes) someone subscribed to on the events
        # socket, from the XPUB's subscription messages: with none, an event
        # is neither encoded nor sent there (the common case).
        self._pub_topics: set[bytes] = set()
        self._pub_fd: int | None = None
        self._idle = anyio.Event()
        self._idle.set()
        self._accepting = True
        self._receive_scope: anyio.CancelScope | None = None
        self._handlers_scope: anyio.CancelScope | None = None
        self._dropped_replies = 0
        self._peers: dict[str, Peer | None] = {}  # Peer-Address value -> parsed
        # Write completions from the engine's commit thread, drained on the loop.
        self._completions: collections.deque[_WriteEntry] = collections.deque()
        self._completions_scheduled = False
        self.feed = Feed(service, self._send_event, queue_max=settings.subscriber_queue)
        self._feed_scope: anyio.CancelScope | None = None
        service.inflight = lambda: self._inflight
        service.subscribers = lambda: len(self.feed)

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

        # XPUB, not PUB: the same for subscribers, but it tells the daemon which
        # topics have subscribers (first subscription / last unsubscription of
        # each, also when a subscriber disconnects).
        pub: zmq.Socket[bytes] = ctx.socket(zmq.XPUB)
        self._pub = pub
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, s.sndhwm)
        pub.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # subscribers only send subscriptions
        if s.heartbeat_ivl_ms > 0:
            pub.setsockopt(zmq.HEARTBEAT_IVL, s.heartbeat_ivl_ms)
            pub.setsockopt(zmq.HEARTBEAT_TIMEOUT, s.heartbeat_timeout_ms)
        # Only the daemon's user (and root) may connect: the PUB socket cannot
        # filter by principal.  Create it under a 0077 umask so it is never
        # connectable by others, not even between bind and chmod.
        old_umask = os.umask(0o077)
        try:
            pub.bind(ipc_endpoint(self.events_path))
        finally:
            os.umask(old_umask)
        self._bound.append(self.events_path)
        os.chmod(self.events_path, ADMIN_SOCKET_FILE_MODE)
        self._pub_fd = int(pub.getsockopt(zmq.FD))
        self._loop.add_reader(self._pub_fd, self._read_subscriptions)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless :meth:`bind` was called), receive until :meth:`stop_accepting`."""
        if self._router is None:
            self.bind()
        try:
            async with anyio.create_task_group() as tg:
                self._handlers_scope = tg.cancel_scope
                tg.start_soon(self._feed_ticker)
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
        if self._feed_scope is not None:
            self._feed_scope.cancel()
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
        if self._pub_fd is not None and self._loop is not None:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._loop.remove_reader(self._pub_fd)
            self._pub_fd = None
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
        self._tg = tg
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
            if self._read_burst():  # let handlers and the change feed run too
                await anyio.lowlevel.checkpoint()
                continue
            self._input = asyncio.get_running_loop().create_future()
            try:
                await self._input
            finally:
                self._input = None

    def _wake_receiver(self) -> None:
        """ZMQ_FD reader callback: input may be waiting.

        An idle receiver's requests are read and answered right here, in the
        callback: waking the receiving task instead costs another trip
        through the event loop on every request of a lone client (a future's
        callback, then the task's step).  The task resumes only when this
        cannot finish the job: a full burst, no free in-flight slot, or an
        error it must see.
        """
        waiter = self._input
        if waiter is None or waiter.done() or self._reading_inline:
            return
        self._reading_inline = True
        try:
            resume = self._read_burst()
        except Exception:
            _log.exception("reading requests failed; the receive loop takes over")
            resume = True
        finally:
            self._reading_inline = False
        if resume and not waiter.done():
            waiter.set_result(None)

    def _read_burst(self) -> bool:
        """Answer up to a burst of waiting requests (the receive task, and the reader
        callback while that task waits); False once no input is left, True if
        there may be more: a full burst, no free in-flight slot, or not accepting."""
        router, tg = self._router, self._tg
        if router is None or tg is None:
            return True
        for _ in range(_BURST):
            if not self._accepting or self._inflight >= self._max_inflight:
                return True
            try:
                frames = _recv_message(router)
            except zmq.Again:
                # Reading ZMQ_EVENTS re-arms the edge-triggered ZMQ_FD; input
                # that raced in since the last receive is read next round.
                if _pollin(router):
                    continue
                return False
            self._dispatch(frames, tg)
        return True

    def _dispatch(self, frames: list[zmq.Frame], tg: TaskGroup) -> None:
        """Answer inline if possible; otherwise start a task for the request."""
        if len(frames) < 2:
            return  # nothing but a routing id: nothing to answer
        # A REQ peer puts an empty delimiter frame before the message; echo it.
        split = 2 if len(frames) > 2 and len(frames[1].buffer) == 0 else 1
        envelope: list[Any] = frames[:split]  # a new list already
        peer = _peer_of(frames[split] if len(frames) > split else frames[0], self._peers)
        body = (
            [frames[split].bytes] if len(frames) == split + 1 else [f.bytes for f in frames[split:]]
        )
        try:
            request = decode_request(body, self.limits)
        except MemosError as err:
            rid = err.details.get("id")
            _log.debug("bad request", code=err.code, reason=err.reason, pid=peer and peer.pid)
            self._send([*envelope, *encode_error(rid if type(rid) is int else None, err)])
            return
        kind = self.service.kind(request.op)
        if kind == "inline":
            self._send([*envelope, *self._answer_inline(request, peer)])
        elif kind == "write":
            self._start_write(envelope, request, peer)
        elif kind == "feed":
            self._answer_feed(envelope, request, peer)
        else:
            out = self._answer_quick(request, peer)
            if out is not None:
                self._send([*envelope, *out])
                return
            self._begin()
            tg.start_soon(self._handle, envelope, request, peer)

    def _begin(self) -> None:
        self._inflight += 1
        if self._inflight == 1:
            self._idle = anyio.Event()

    def _end(self, n: int = 1) -> None:
        self._inflight -= n
        self._slot_free.set()
        if self._inflight == 0:
            self._idle.set()

    # --- writes: submitted inline, answered from the commit's completions ------------

    def _start_write(self, envelope: list[Any], request: Request, peer: Peer | None) -> None:
        try:
            write = self.service.start_write(request, peer)
            # The callback must not refer to the submission (which refers to
            # the callback): without that cycle a finished write is freed by
            # reference counting, not left to the cyclic GC (whose full
            # collections over the daemon's heap stop every thread holding
            # the GIL).
            self.service.submit_write(
                write,
                functools.partial(
                    self._write_done_threadsafe, envelope, request, write, time.perf_counter(), peer
                ),
            )
        except MemosError as err:
            self._send([*envelope, *encode_error(request.id, err)])
            return
        except Exception:
            self._send([*envelope, *self._internal_error(request)])
            return
        self._begin()

    def _write_done_threadsafe(  # noqa: PLR0917 - a done callback takes positional args
        self,
        envelope: list[Any],
        request: Request,
        write: Write,
        started: float,
        peer: Peer | None,
        submission: Submission[Any],
    ) -> None:
        """Commit thread: queue a finished write; wake the loop once per burst."""
        self._completions.append((envelope, request, write, submission, started, peer))
        if not self._completions_scheduled:
            self._completions_scheduled = True
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # loop closed: shutting down
                    loop.call_soon_threadsafe(self._drain_completions)

    def _drain_completions(self) -> None:
        """Answer every finished write back to back (no await between replies)."""
        self._completions_scheduled = False  # first: a later append schedules a new drain
        done = 0
        completions = self._completions
        debug = _log.bind().is_enabled_for(logging.DEBUG)  # once per burst, not per reply
        # The writes queued now are resolved, so an LSN read after counting
        # them covers each (one read of the WAL's lock per burst, not per
        # reply).  Later ones were not counted: they scheduled the next drain.
        count = len(completions)
        last_lsn = self.service.engine.last_lsn
        finish_write = self.service.finish_write
        for _ in range(count):
            envelope, request, write, submission, started, peer = completions.popleft()
            try:
                reply = finish_write(write, submission.outcome, last_lsn=last_lsn)
                out = encode_response(request.id, reply)
            except MemosError as err:
                out = encode_error(request.id, err)
            except Exception:
                out = self._internal_error(request)
            self._send([*envelope, *out], check_input=False)
            done += 1
            if debug:
                ms = round((time.perf_counter() - started) * 1000, 3)
                _log.debug("request", op=request.op, ms=ms, pid=peer and peer.pid)
        if done:
            self._end(done)
            self._check_input()

    # --- the change feed over the request socket ------------------------------------

    def _answer_feed(self, envelope: list[Any], request: Request, peer: Peer | None) -> None:
        try:
            identity, result = self.service.handle_feed(request, peer)
        except MemosError as err:
            self._send([*envelope, *encode_error(request.id, err)])
            return
        except Exception:
            self._send([*envelope, *self._internal_error(request)])
            return
        routing = [bytes(f.bytes) if isinstance(f, zmq.Frame) else bytes(f) for f in envelope]
        if request.op == "subscribe":
            # The reply goes first: the client starts reading events after it.
            self._send([*envelope, *encode_response(request.id, Reply(result))])
            self.feed.subscribe(routing, identity, peer, request.token, result.get("cube"))
        else:
            found = self.feed.unsubscribe(routing[0])
            self._send([*envelope, *encode_response(request.id, Reply({"unsubscribed": found}))])

    def _send_event(self, frames: list[Any]) -> SendStatus:
        router = self._router
        if router is None:
            return SendStatus.GONE
        try:
            _send_message(router, frames)
        except zmq.Again:
            return SendStatus.FULL
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                _log.debug("feed event not sent", error=str(exc))
            return SendStatus.GONE
        return SendStatus.SENT

    async def _feed_ticker(self) -> None:
        hb = self.settings.heartbeat_ivl_ms
        keepalive_s = hb / 1000 if hb > 0 else 5.0
        last_keepalive = time.monotonic()
        with anyio.CancelScope() as scope:
            self._feed_scope = scope
            if not self._accepting:
                return
            while True:
                await anyio.sleep(_FEED_TICK_S)
                now = time.monotonic()
                keepalive = now - last_keepalive >= keepalive_s
                if keepalive:
                    last_keepalive = now
                if len(self.feed):
                    self.feed.tick(keepalive=keepalive)
                    self._check_input()

    def _answer_inline(self, request: Request, peer: Peer | None) -> list[bytes]:
        try:
            return encode_response(request.id, self.service.handle_inline(request, peer))
        except MemosError as err:
            return encode_error(request.id, err)
        except Exception:
            return self._internal_error(request)

    def _answer_quick(self, request: Request, peer: Peer | None) -> list[bytes] | None:
        """A task op answered right here if its quick path takes it (small
        searches), else None: the op runs as a task."""
        try:
            reply = self.service.try_quick(request, peer)
        except MemosError as err:
            return encode_error(request.id, err)
        except Exception:
            return self._internal_error(request)
        return None if reply is None else encode_response(request.id, reply)

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
            self._end()

    def _check_input(self) -> None:
        router = self._router
        # Sending may have consumed the ZMQ_FD edge that announces new input.
        if router is not None and self._input is not None and _pollin(router):
            self._wake_receiver()

    def _send(self, frames: list[Any], *, check_input: bool = True) -> None:
        router = self._router
        if router is None:
            return
        try:
            _send_message(router, frames)
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
        if check_input:
            self._check_input()

    # --- change feed --------------------------------------------------------------

    def publish_threadsafe(self, event: Any) -> None:
        """Engine listener: queue ``event`` for subscribers and the PUB socket (any thread).

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
        if self._pub_topics:
            # Sending may have consumed the XPUB's edge-triggered ZMQ_FD.
            self._read_subscriptions()
        # Always: an event sent on the ROUTER (e.g. the subscription_ended that
        # also removed the last subscriber) may have consumed the input edge.
        self._check_input()

    def _read_subscriptions(self) -> None:
        """Take the XPUB's (un)subscription messages: ``\x01`` or ``\x00`` + topic.

        A plain XPUB reports a topic's first subscription and its last
        unsubscription (libzmq counts the rest), so a set of topics is enough.
        Anything else a peer sends there is ignored.
        """
        pub = self._pub
        if pub is None:
            return
        while True:
            try:
                message = pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closing
            if message[:1] == b"\x01":
                self._pub_topics.add(message[1:])
            elif message[:1] == b"\x00":
                self._pub_topics.discard(message[1:])

    def _pub_wanted(self, topic: bytes) -> bool:
        """Whether a subscription (a topic prefix) matches ``topic``."""
        return any(topic.startswith(t) for t in self._pub_topics)

    def _publish(self, event: Any) -> None:
        self.service.on_change(getattr(event, "kind", ""))
        try:
            self.feed.publish(event)
        except Exception:
            _log.exception("change feed delivery failed")
        pub = self._pub
        if pub is None or not self._pub_topics:
            return
        try:
            frames = encode_event(event)
            if not self._pub_wanted(frames[0]):
                return
            pub.send_multipart(frames, flags=zmq.DONTWAIT)
        except zmq.ZMQError as exc:
            _log.debug("event dropped", error=str(exc))
        except MemosError:
            _log.exception("event not encodable")


def _pollin(sock: zmq.Socket[bytes]) -> bool:
    """``ZMQ_EVENTS & POLLIN`` (reading it also re-arms the edge-triggered ZMQ_FD)."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _send_message(sock: zmq.Socket[bytes], frames: list[Any]) -> None:
    """``sock.send_multipart(frames, flags=zmq.DONTWAIT)``, at half its CPU cost.

    ``send_multipart`` checks every part, ORs flag enums (a Python-level
    ``Flag.__or__``) and goes through the Python ``send`` wrapper per frame:
    about 6 us more per two-frame reply than sending each frame with int
    flags through the C-level ``send``, measured here.  Messages with other
    parts than ``bytes`` and ``zmq.Frame`` (memoryviews of KV tensors) still
    take ``send_multipart``, which checks every part before sending any, so
    a bad part never leaves half a message queued.
    """
    copy = _copy_mode(frames)
    if copy is None:
        sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False)
        return
    last = len(frames) - 1
    for i in range(last):
        _send_frame(sock, frames[i], _DONTWAIT_MORE, copy)
    _send_frame(sock, frames[last], _DONTWAIT, copy)


def _copy_mode(frames: list[Any]) -> bool | None:
    """How to send ``frames``: copying (True), zero-copy (False), or None: not
    only ``bytes`` and ``zmq.Frame`` parts, so through ``send_multipart`` (zero-copy).

    pyzmq's zero-copy path wraps every ``bytes`` part in a new ``zmq.Frame``
    (and copies small ones anyway): about 20 us more per small reply than a
    plain copying send, measured here.  Large parts (KV tensors, exports)
    still go zero-copy; received ``zmq.Frame`` parts (the routing envelope)
    are sent as frames either way.
    """
    copy = True
    for frame in frames:
        kind = type(frame)
        if kind is bytes:
            if len(frame) >= _ZERO_COPY_MIN_BYTES:
                copy = False
        elif kind is not zmq.Frame:
            return None  # memoryviews and other buffers
    return copy


def _recv_message(router: zmq.Socket[bytes]) -> list[zmq.Frame]:
    """One whole multipart message, without blocking (``zmq.Again`` if none).

    ``recv_multipart`` asks ``ZMQ_RCVMORE`` with a ``getsockopt`` per frame;
    a frame's own ``more`` flag says the same for less.  libzmq delivers a
    multipart message atomically, so once its first frame is here all are.
    """
    recv = router.recv
    frame = recv(zmq.NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = recv(zmq.NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def _peer_of(frame: zmq.Frame, cache: dict[str, Peer | None] | None = None) -> Peer | None:
    """The peer credentials of a received frame (``Peer-Address``), parsed once per value."""
    try:
        value = frame.get("Peer-Address")
    except (zmq.ZMQError, UnicodeDecodeError):
        return None
    if not isinstance(value, str):
        return None
    if cache is None:
        return parse_peer_address(value)
    # The value is the kernel's (SO_PEERCRED) for the connection, so a parse
    # may be reused for every message with the same string.
    try:
        return cache[value]
    except KeyError:
        pass
    peer = parse_peer_address(value)
    if len(cache) >= _PEER_CACHE_MAX:
        cache.clear()
    cache[value] = peer
    return peer
