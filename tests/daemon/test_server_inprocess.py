"""The server in-process (engine, service and server in this interpreter).

The end-to-end tests run the daemon as a subprocess; these look at what only
an in-process server shows: which objects a request leaves behind.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
import zmq

from memosd.protocol import encode_request
from memosd.server import Server, _copy_mode, _send_message
from memosd.service import Service, Write
from memosd.settings import ServerSettings
from memosd.testing import memosd_engine

__all__ = ["memosd_engine"]


class _Running:
    def __init__(self, server: Server, endpoint: str) -> None:
        self.server = server
        self.endpoint = endpoint


@pytest.fixture
def running_server(tmp_path: Path, memosd_engine: Any) -> Iterator[_Running]:
    """A Server on a temporary socket, its event loop in a background thread."""
    service = Service(memosd_engine)
    server = Server(
        service,
        ServerSettings(),
        socket_path=tmp_path / "memosd.sock",
        events_path=tmp_path / "events.sock",
    )
    memosd_engine.add_listener(server.publish_threadsafe)
    try:
        with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
            portal.call(server.bind)  # on the loop: bind() takes the running loop
            serving = portal.start_task_soon(server.serve)
            try:
                yield _Running(server, f"ipc://{tmp_path / 'memosd.sock'}")
            finally:
                portal.call(server.stop_accepting)
                serving.result(timeout=10)
    finally:
        service.close()


@contextmanager
def _dealer(endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def _call(sock: zmq.Socket[bytes], rid: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
    sock.send_multipart(encode_request(rid, op, args))
    assert sock.poll(10_000), f"no reply to {op}"
    reply: dict[str, Any] = msgpack.unpackb(sock.recv_multipart()[0])
    return reply


def test_a_finished_write_leaves_no_cyclic_garbage(running_server: _Running) -> None:
    """Replies to writes are freed by reference counting, not by the cyclic GC.

    A cycle per write (future -> done callback -> future) made the GC's full
    collections, which hold the GIL, part of every write's cost.
    """
    with _dealer(running_server.endpoint) as sock:
        assert _call(sock, 1, "create_cube", {"name": "notes"})["ok"]
        gc.collect()
        gc.disable()
        try:
            for rid in range(2, 52):
                sock.send_multipart(encode_request(rid, "add", {"cube": "notes", "text": "x"}))
            for _ in range(50):
                assert sock.poll(10_000)
                assert msgpack.unpackb(sock.recv_multipart()[0])["ok"]
            # The server answers before dropping its last references: make sure
            # the loop has moved on (a round trip through it).
            assert _call(sock, 99, "ping", {})["ok"]
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            leftovers = [o for o in gc.garbage if isinstance(o, Write)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert leftovers == []


def test_small_replies_are_sent_copying_large_ones_zero_copy() -> None:
    frame = zmq.Frame(b"routing-id")
    assert _copy_mode([frame, b"x" * 100]) is True
    assert _copy_mode([frame, b"{}", b"x" * (64 * 1024)]) is False  # a large payload frame
    # KV tensors: zero-copy, through send_multipart
    assert _copy_mode([frame, b"{}", memoryview(b"tensor")]) is None


def test_send_message_delivers_every_kind_of_message_whole() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://send-message")
        b.connect("inproc://send-message")
        big = b"L" * (64 * 1024)
        messages: list[list[Any]] = [
            [b"one"],
            [zmq.Frame(b"env"), b"header"],
            [b"h", big, b"t"],
            [b"h", memoryview(b"tensor"), b""],
        ]
        for message in messages:
            _send_message(a, message)
        for message in messages:
            assert b.poll(5000)
            assert b.recv_multipart() == [bytes(part) for part in message]
        with pytest.raises(TypeError):  # checked before anything is sent
            _send_message(a, [b"h", memoryview(b"ok"), 42])
        _send_message(a, [b"after"])
        assert b.poll(5000)
        assert b.recv_multipart() == [b"after"]
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_an_idle_server_answers_from_its_reader_callback(running_server: _Running) -> None:
    """A lone client's requests are read in the ZMQ_FD callback; if that fails, the
    receive loop takes the request over and answers it all the same."""
    server = running_server.server
    original = server._read_burst
    calls: list[str] = []

    def counting() -> bool:
        calls.append("read")
        return original()

    def failing_once() -> bool:
        server._read_burst = counting  # type: ignore[method-assign]
        calls.append("failed")
        raise RuntimeError("planted")

    server._read_burst = counting  # type: ignore[method-assign]
    with _dealer(running_server.endpoint) as sock:
        for rid in range(1, 21):
            assert _call(sock, rid, "ping", {})["ok"]
            time.sleep(0.002)  # let the loop go idle between requests
        assert calls.count("read") >= 10
        time.sleep(0.05)  # idle again, waiting in the callback's stead
        server._read_burst = failing_once  # type: ignore[method-assign]
        assert _call(sock, 50, "ping", {})["ok"]  # answered by the receive loop
        assert "failed" in calls
        assert _call(sock, 51, "create_cube", {"name": "after"})["ok"]


def test_replies_of_every_size_arrive_whole(running_server: _Running) -> None:
    """A reply with a large frame (zero-copy send) and small ones (copying)."""
    with _dealer(running_server.endpoint) as sock:
        assert _call(sock, 1, "create_cube", {"name": "notes"})["ok"]
        text = "t" * (200 * 1024)
        added = _call(sock, 2, "add", {"cube": "notes", "text": text})
        assert added["ok"]
        got = _call(sock, 3, "get", {"cube": "notes", "id": added["result"]["id"]})
        assert got["result"]["text"] == text


def _wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_events_socket_sends_only_what_someone_subscribed_to(
    running_server: _Running, tmp_path: Path
) -> None:
    server = running_server.server
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    try:
        with _dealer(running_server.endpoint) as sock:
            assert _call(sock, 1, "create_cube", {"name": "notes"})["ok"]
            assert _call(sock, 2, "create_cube", {"name": "other"})["ok"]
            assert server._pub_topics == set()  # nobody listens: nothing is encoded
            sub.connect(f"ipc://{tmp_path / 'events.sock'}")
            sub.setsockopt(zmq.SUBSCRIBE, b"not")  # a prefix of "notes"
            assert _wait_for(lambda: server._pub_topics == {b"not"})
            added = _call(sock, 3, "add", {"cube": "notes", "text": "seen"})["result"]
            assert _call(sock, 4, "add", {"cube": "other", "text": "filtered out"})["ok"]
            assert sub.poll(10_000)
            topic, payload = sub.recv_multipart()
            event = msgpack.unpackb(payload)
            assert (topic, event["kind"]) == (b"notes", "item_written")
            assert event["item_id"] == added["id"]
            assert not sub.poll(200)  # the "other" event matched no subscription
            sub.setsockopt(zmq.UNSUBSCRIBE, b"not")
            assert _wait_for(lambda: server._pub_topics == set())
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            assert _wait_for(lambda: server._pub_topics == {b""})
            sub.close(linger=0)  # a subscriber that vanishes unsubscribes too
            assert _wait_for(lambda: server._pub_topics == set())
            assert _call(sock, 5, "add", {"cube": "notes", "text": "unsent"})["ok"]
    finally:
        sub.close(linger=0)
        ctx.term()
