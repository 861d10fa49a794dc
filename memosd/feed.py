"""The per-principal change feed, delivered over the request connection.

A client sends ``subscribe`` (``{"cube": name}`` or ``{"cube": nil}`` for
every cube it can read) on a DEALER connection; the server answers it like
any request and from then on pushes event messages to that connection
(ROUTER routing id).  Each event is checked against the subscriber's read
access before it is queued, so a principal never learns of a cube it has no
grant on.  docs/protocol.md ("Change feed") is the reference.

Access is cached per subscriber (cube -> readable) and recomputed for a cube
on ``cube_created`` / ``acl_changed`` (all cubes after a token change).  A
subscription to one cube ends with a final ``subscription_ended`` event when
read access to it is lost (``access_revoked``) or the cube is dropped
(``cube_dropped``); an all-cubes subscription just stops seeing that cube.

Flow control: events go out with ``DONTWAIT``.  When the peer's ZeroMQ queue
is full, events wait in a per-subscriber queue of ``server.subscriber_queue``
events; beyond that they are dropped and counted, and once there is room the
subscriber gets one ``gap`` event ``{"kind": "gap", "missed": n}`` in their
place.  A subscriber that has gone (EHOSTUNREACH under ROUTER_MANDATORY, after
a disconnect or a missed ZMTP heartbeat) is removed at the next send; idle
subscribers are sent a ``keepalive`` event every keepalive interval so dead
ones are found even when nothing changes.

Everything here runs on the event loop thread.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from memosd.auth import Identity, Peer
from memosd.errors import MemosError
from memosd.protocol import encode_event_message, to_wire
from memosd.service import Service

__all__ = ["Feed", "SendStatus", "Subscriber"]

_ACL_KINDS: Final = frozenset({"cube_created", "acl_changed"})


class SendStatus(enum.Enum):
    SENT = "sent"
    FULL = "full"  # the peer's ZeroMQ queue is at its high-water mark
    GONE = "gone"  # the peer disconnected (or the socket is closing)


Send = Callable[[list[Any]], SendStatus]


@dataclass(eq=False, slots=True)
class Subscriber:
    envelope: list[bytes]
    identity: Identity
    peer: Peer | None
    token: str | None
    cube: str | None  # None: every cube the principal can read
    readable: dict[str, bool] = field(default_factory=dict)
    queue: collections.deque[bytes] = field(default_factory=collections.deque)
    missed: int = 0
    ended: bool = False
    active: bool = False  # something was sent since the last keepalive tick


class Feed:
    """Subscriptions by routing id; :meth:`publish` fans one engine event out."""

    def __init__(self, service: Service, send: Send, *, queue_max: int) -> None:
        self.service = service
        self._send = send
        self.queue_max = queue_max
        self._subs: dict[bytes, Subscriber] = {}
        self.dropped = 0  # events dropped on overflow, all subscribers

    def __len__(self) -> int:
        return len(self._subs)

    # --- subscriptions ----------------------------------------------------------

    def subscribe(
        self,
        envelope: list[bytes],
        identity: Identity,
        peer: Peer | None,
        token: str | None,
        cube: str | None,
    ) -> None:
        """Register (or replace) the subscription of the connection ``envelope[0]``.

        The caller has checked read access to ``cube`` and sent the reply.
        """
        sub = Subscriber(envelope, identity, peer, token, cube)
        if cube is not None:
            sub.readable[cube] = True
        else:
            # Know every cube up front, so that a later cube_dropped can still be
            # told to those who could read the cube (the ACL is gone by then).
            for info in self.service.engine.list_cubes():
                sub.readable[info.name] = self.service.can_read(identity, info.name)
        self._subs[envelope[0]] = sub

    def unsubscribe(self, routing_id: bytes) -> bool:
        return self._subs.pop(routing_id, None) is not None

    # --- events -----------------------------------------------------------------

    def publish(self, event: Any) -> None:
        """Deliver one engine :class:`ChangeEvent` (the service cache is already updated)."""
        if not self._subs:
            return
        kind: str = getattr(event, "kind", "")
        cube: str | None = getattr(event, "cube", None)
        message: bytes | None = None

        def encoded() -> bytes:
            nonlocal message
            if message is None:
                message = encode_event_message(to_wire(event))
            return message

        for sub in list(self._subs.values()):
            if sub.ended:
                continue
            if cube is None:
                if kind == "acl_changed" and not self._recheck_identity(sub):
                    continue  # a token was revoked: this subscription ended
                if sub.cube is None and sub.identity.admin:
                    self._offer(sub, encoded())
                continue
            if sub.cube is not None and sub.cube != cube:
                continue
            if kind == "cube_dropped":
                could_read = sub.readable.pop(cube, False)
                if could_read:
                    self._offer(sub, encoded())
                if sub.cube is not None:
                    self.end(sub, "cube_dropped")
                continue
            if kind in _ACL_KINDS:
                sub.readable[cube] = self.service.can_read(sub.identity, cube)
            if self._readable(sub, cube):
                self._offer(sub, encoded())
            elif sub.cube is not None:
                self.end(sub, "access_revoked")

    def _readable(self, sub: Subscriber, cube: str) -> bool:
        known = sub.readable.get(cube)
        if known is None:
            known = self.service.can_read(sub.identity, cube)
            sub.readable[cube] = known
        return known

    def _recheck_identity(self, sub: Subscriber) -> bool:
        """After a token change: False if the subscription ended."""
        if sub.token is None:
            return True
        try:
            identity = self.service.identity(sub.peer, sub.token)
        except MemosError:
            self.end(sub, "access_revoked")
            return False
        if identity != sub.identity:
            sub.identity = identity
            for name in list(sub.readable):
                sub.readable[name] = self.service.can_read(identity, name)
            if sub.cube is not None and not sub.readable.get(sub.cube, False):
                self.end(sub, "access_revoked")
                return False
        return True

    def end(self, sub: Subscriber, reason: str) -> None:
        """Send the final ``subscription_ended`` event (past the queue bound) and stop."""
        if sub.ended:
            return
        sub.ended = True
        wire = {"kind": "subscription_ended", "reason": reason, "cube": sub.cube}
        if sub.missed:
            sub.queue.append(encode_event_message({"kind": "gap", "missed": sub.missed}))
            sub.missed = 0
        sub.queue.append(encode_event_message(wire))
        self._flush(sub)

    # --- queueing -----------------------------------------------------------------

    def _offer(self, sub: Subscriber, message: bytes) -> None:
        if not sub.queue and not sub.missed:
            status = self._send([*sub.envelope, message])
            if status is SendStatus.SENT:
                sub.active = True
                return
            if status is SendStatus.GONE:
                self._remove(sub)
                return
        if sub.queue:
            self._flush(sub)
        if len(sub.queue) >= self.queue_max:
            sub.missed += 1
            self.dropped += 1
            return
        if sub.missed:
            sub.queue.append(encode_event_message({"kind": "gap", "missed": sub.missed}))
            sub.missed = 0
        sub.queue.append(message)
        self._flush(sub)

    def _flush(self, sub: Subscriber) -> None:
        queue = sub.queue
        while queue:
            status = self._send([*sub.envelope, queue[0]])
            if status is SendStatus.FULL:
                return
            if status is SendStatus.GONE:
                self._remove(sub)
                return
            queue.popleft()
            sub.active = True
        if sub.ended:
            self._remove(sub)

    def _remove(self, sub: Subscriber) -> None:
        if self._subs.get(sub.envelope[0]) is sub:
            del self._subs[sub.envelope[0]]

    def tick(self, *, keepalive: bool) -> None:
        """Retry queued events; with ``keepalive``, probe subscribers that were idle."""
        for sub in list(self._subs.values()):
            if sub.queue or sub.missed:
                if not sub.queue and sub.missed:
                    sub.queue.append(encode_event_message({"kind": "gap", "missed": sub.missed}))
                    sub.missed = 0
                self._flush(sub)
            elif keepalive:
                if not sub.active:
                    status = self._send([*sub.envelope, _KEEPALIVE])
                    if status is SendStatus.GONE:
                        self._remove(sub)
                sub.active = False

    def subscribers(self) -> Iterable[Subscriber]:
        return list(self._subs.values())


_KEEPALIVE: Final = encode_event_message({"kind": "keepalive"})
