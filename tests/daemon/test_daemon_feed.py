"""The per-principal change feed over the request socket, and the admin-only PUB socket.

Principals are tokens made by the admin (the tests run as root, an admin):
``alice`` owns the cube ``secret``; ``bob`` has no grant on it unless a test
grants one.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
import zmq

from memosd.client import AsyncClient, Client, Event, Subscription
from memosd.errors import NotFound
from memosd.protocol import decode_response, encode_request
from memosd.testing import DaemonHandle


@pytest.fixture
def people(memosd_daemon: DaemonHandle) -> Iterator[dict[str, Any]]:
    admin = memosd_daemon.client()
    alice = memosd_daemon.client(token=admin.token_create("alice"))
    bob = memosd_daemon.client(token=admin.token_create("bob"))
    alice.create_cube("secret")
    bob.create_cube("bobs")
    yield {"admin": admin, "alice": alice, "bob": bob, "daemon": memosd_daemon}
    for c in (admin, alice, bob):
        c.close()


def wait_live(sub: Subscription, write: Callable[[], Any]) -> Event:
    """Write until the subscription sees the first event (it is registered by then)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        write()
        event = sub.next_event(timeout=0.2)
        if event is not None:
            while sub.next_event(timeout=0.2) is not None:
                pass
            return event
    raise AssertionError("subscription never delivered an event")


def drain(sub: Subscription, timeout: float = 1.0) -> list[Event]:
    out = []
    while (event := sub.next_event(timeout=timeout)) is not None:
        out.append(event)
    return out


def test_ungranted_cube_is_invisible(people: dict[str, Any]) -> None:
    alice: Client = people["alice"]
    bob: Client = people["bob"]
    # Subscribing to a cube without a grant looks exactly like a missing cube.
    with pytest.raises(NotFound) as hidden:
        bob.subscribe("secret")
    with pytest.raises(NotFound) as missing:
        bob.subscribe("no-such-cube")
    assert hidden.value.code == missing.value.code
    assert hidden.value.message.replace("secret", "X") == missing.value.message.replace(
        "no-such-cube", "X"
    )

    with bob.subscribe() as bob_all, alice.subscribe("secret") as alice_secret:
        wait_live(bob_all, lambda: bob.add("bobs", "warm-up"))
        wait_live(alice_secret, lambda: alice.add("secret", "warm-up"))
        drain(bob_all, timeout=0.3)
        item = alice.add("secret", "the plans")
        alice.update("secret", item.id, "new plans")
        mine = bob.add("bobs", "after the secret writes")
        seen_by_alice = drain(alice_secret)
        seen_by_bob = drain(bob_all)
    assert [(e.kind, e.cube, e.item_id) for e in seen_by_alice] == [
        ("item_written", "secret", item.id),
        ("item_written", "secret", item.id),
    ]
    # Bob's feed is live (he sees his own write) but says nothing about "secret".
    assert [(e.kind, e.cube, e.item_id) for e in seen_by_bob] == [("item_written", "bobs", mine.id)]
    assert all(e.cube != "secret" and e.item_id != item.id for e in seen_by_bob)


def test_all_cubes_yields_only_readable_cubes(people: dict[str, Any]) -> None:
    alice: Client = people["alice"]
    bob: Client = people["bob"]
    admin: Client = people["admin"]
    admin.create_cube("public", owner="token:alice")
    alice.grant("public", "token:bob", "read")
    with bob.subscribe(None) as feed, admin.subscribe(None) as firehose:
        wait_live(feed, lambda: alice.add("public", "warm-up"))
        wait_live(firehose, lambda: alice.add("public", "warm-up"))
        drain(feed, timeout=0.3)  # the second warm-up's events
        hidden = alice.add("secret", "hidden")
        shown = alice.add("public", "shown")
        alice.create_cube("later")  # created after subscribing: still filtered
        alice.add("later", "hidden too")
        bob_events = drain(feed)
        admin_events = drain(firehose)
    assert [(e.kind, e.cube, e.item_id) for e in bob_events] == [
        ("item_written", "public", shown.id)
    ]
    # An admin's all-cubes feed has everything (admins act as owner of every cube).
    assert {e.cube for e in admin_events} >= {"secret", "public", "later"}
    assert hidden.id in {e.item_id for e in admin_events}


def test_revoke_ends_the_subscription(people: dict[str, Any]) -> None:
    alice: Client = people["alice"]
    bob: Client = people["bob"]
    alice.grant("secret", "token:bob", "read")
    with bob.subscribe("secret") as sub:
        wait_live(sub, lambda: alice.add("secret", "warm-up"))
        item = alice.add("secret", "while granted")
        first = sub.next_event(timeout=5)
        alice.revoke("secret", "token:bob")
        alice.add("secret", "after the revoke")
        rest = list(sub)  # iteration stops after subscription_ended
    assert first is not None
    assert (first.kind, first.item_id) == ("item_written", item.id)
    assert [(e.kind, e.reason) for e in rest] == [("subscription_ended", "access_revoked")]
    assert sub.ended
    assert sub.next_event(timeout=0.1) is None


def test_dropped_cube_ends_the_subscription(people: dict[str, Any]) -> None:
    alice: Client = people["alice"]
    with alice.subscribe("secret") as sub:
        wait_live(sub, lambda: alice.add("secret", "warm-up"))
        alice.drop_cube("secret")
        events = list(sub)
    assert [(e.kind, e.reason) for e in events] == [
        ("cube_dropped", None),
        ("subscription_ended", "cube_dropped"),
    ]


def test_revoked_token_ends_the_subscription(people: dict[str, Any]) -> None:
    admin: Client = people["admin"]
    alice: Client = people["alice"]
    with alice.subscribe("secret") as sub:
        wait_live(sub, lambda: alice.add("secret", "warm-up"))
        admin.token_revoke("alice")
        events = list(sub)
    assert [(e.kind, e.reason) for e in events] == [("subscription_ended", "access_revoked")]


def test_async_subscription(people: dict[str, Any]) -> None:
    daemon: DaemonHandle = people["daemon"]
    alice: Client = people["alice"]

    async def main() -> list[Event]:
        async with AsyncClient(daemon.socket, token=alice.token, timeout=10) as c:
            sub = await c.subscribe("secret")
            with sub:
                for _ in range(50):
                    await c.add("secret", "warm-up")
                    if await sub.next_event(timeout=0.2) is not None:
                        break
                while await sub.next_event(timeout=0.3) is not None:
                    pass
                item = await c.add("secret", "async")
                got = await sub.next_event(timeout=5)
                assert got is not None
                assert got.item_id == item.id
                with pytest.raises(NotFound):
                    await c.subscribe("bobs")
                return [got]

    assert len(anyio.run(main)) == 1


def test_gap_event_on_overflow(memosd_daemon_factory: Callable[..., DaemonHandle]) -> None:
    daemon = memosd_daemon_factory(
        env={
            "MEMOSD_SERVER_SUBSCRIBER_QUEUE": "4",
            "MEMOSD_SERVER_SNDHWM": "16",
            # Only item events: tier jobs would add job events to the count.
            "MEMOSD_SCHEDULER_ENABLED": "0",
        }
    )
    n = 6000
    with daemon.client() as c:
        c.create_cube("flood")
        with c.subscribe("flood") as sub:
            wait_live(sub, lambda: c.add("flood", "warm-up"))

            async def flood() -> None:
                async with AsyncClient(daemon.socket, timeout=30) as ac:

                    async def worker(k: int) -> None:
                        for i in range(k, n, 8):
                            await ac.add("flood", f"item {i}")

                    async with anyio.create_task_group() as tg:
                        for k in range(8):
                            tg.start_soon(worker, k)

            anyio.run(flood)  # the subscriber reads nothing meanwhile
            events = drain(sub, timeout=2.0)
    gaps = [e for e in events if e.kind == "gap"]
    written = [e for e in events if e.kind == "item_written"]
    assert gaps, "a subscriber that fell behind must be told it missed events"
    assert all(g.missed and g.missed > 0 for g in gaps)
    assert len(written) + sum(g.missed or 0 for g in gaps) == n
    lsns = [e.lsn for e in written]
    assert lsns == sorted(lsns)  # what is delivered stays in order


def test_admin_pub_socket_is_owner_only(people: dict[str, Any]) -> None:
    daemon: DaemonHandle = people["daemon"]
    mode = stat.S_IMODE(os.stat(daemon.events_socket).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    # Only admins are told where the firehose is.
    assert people["admin"].ping()["events"] == f"ipc://{daemon.events_socket}"
    assert people["bob"].ping()["events"] is None


def test_vanished_subscriber_is_removed(people: dict[str, Any]) -> None:
    daemon: DaemonHandle = people["daemon"]
    admin: Client = people["admin"]
    alice: Client = people["alice"]
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{daemon.socket}")
        sock.send_multipart(encode_request(1, "subscribe", {"cube": None}))
        assert sock.poll(10_000)
        assert decode_response(sock.recv_multipart())[1] is True
        assert admin.status()["subscribers"] == 1
        sock.close(linger=0)  # gone without unsubscribing
        deadline = time.monotonic() + 10
        while admin.status()["subscribers"] and time.monotonic() < deadline:
            alice.add("secret", "nobody listens")  # the next send finds the peer gone
            time.sleep(0.05)
        assert admin.status()["subscribers"] == 0
    finally:
        ctx.destroy(linger=0)
