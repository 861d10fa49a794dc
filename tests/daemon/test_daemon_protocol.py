"""Sans-IO tests of memosd.protocol: framing, limits, typed errors."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memosd.errors import BadRequest, NotFound, TooLarge, error_from_wire
from memosd.memcube.model import MemoryItem, Provenance, Usage
from memosd.protocol import (
    PROTOCOL_VERSION,
    Limits,
    Reply,
    WireCache,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
    item_to_wire,
    to_wire,
)
from memosd.testing import fuzz_examples

LIMITS = Limits(max_message_bytes=1 << 20, max_str_len=1 << 16, max_bin_len=1 << 16)


def header(**fields: object) -> bytes:
    base: dict[str, object] = {"v": PROTOCOL_VERSION, "id": 7, "op": "ping", "args": {}}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


def test_request_round_trip_with_frames() -> None:
    frames = encode_request(
        42, "import_cube", {"data": {"$frame": 1}, "name": "x"}, token="t", frames=[b"\x00" * 10]
    )
    req = decode_request(frames, LIMITS)
    assert (req.id, req.op, req.token) == (42, "import_cube", "t")
    assert req.args == {"data": b"\x00" * 10, "name": "x"}


def test_exact_header_bytes() -> None:
    # The wire form is part of the protocol: a fixed map, msgpack bin for bytes.
    assert encode_request(1, "ping", {}) == [b"\x84\xa1v\x01\xa2id\x01\xa2op\xa4ping\xa4args\x80"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),  # never-used msgpack byte
        (b"\x84\xa1v", "malformed"),  # truncated
        (msgpack.packb([1, 2]), "malformed"),  # not a map
        (msgpack.packb({1: 2}), "malformed"),  # non-str key
        (header(v=99), "protocol_version"),
        (header(v=...), "protocol_version"),
        (header(id="x"), "bad_header"),
        (header(id=-1), "bad_header"),
        (header(op=3), "bad_header"),
        (header(op=""), "bad_header"),
        (header(args=[1]), "bad_header"),
        (header(token=5), "bad_header"),
        (header(extra=1), "bad_header"),
        (header(args={"a": {"$frame": 1}}), "bad_frame"),
        (msgpack.packb({"v": 1, "t": msgpack.ExtType(5, b"x")}), "malformed"),
        (msgpack.packb({"v": 1, "t": msgpack.Timestamp(1)}), "malformed"),
    ],
)
def test_malformed_headers_are_bad_requests(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request([raw], LIMITS)
    assert info.value.reason == reason


def test_error_carries_request_id_when_readable() -> None:
    with pytest.raises(BadRequest) as info:
        decode_request([header(id=9, op=5)], LIMITS)
    assert info.value.details["id"] == 9


def test_nesting_limit() -> None:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(BadRequest) as info:
        decode_request([header(args={"x": deep})], LIMITS)
    assert info.value.reason == "too_deep"


@pytest.mark.parametrize(
    "args",
    [
        {"s": "x" * (LIMITS.max_str_len + 1)},
        {"b": b"x" * (LIMITS.max_bin_len + 1)},
        {"a": [0] * (LIMITS.max_array_len + 1)},
        {"m": {str(i): 0 for i in range(LIMITS.max_map_len + 1)}},
    ],
)
def test_unpack_limits(args: dict[str, object]) -> None:
    with pytest.raises((BadRequest, TooLarge)):
        decode_request([header(args=args)], LIMITS)


def test_total_size_and_frame_count() -> None:
    small = Limits(max_message_bytes=100, max_frames=3)
    with pytest.raises(TooLarge):
        decode_request([header(), b"x" * 200], small)
    with pytest.raises(TooLarge):
        decode_request([header(), b"", b"", b""], small)


def test_response_round_trip_with_frame_refs() -> None:
    frames = encode_response(3, Reply({"data": {"$frame": 1}, "n": 1}, [b"abc"]))
    assert len(frames) == 2
    assert decode_response(frames) == (3, True, {"data": b"abc", "n": 1})


def test_error_round_trip_preserves_class() -> None:
    frames = encode_error(4, NotFound("gone", reason="deleted", id=4))
    rid, ok, wire = decode_response(frames)
    assert (rid, ok) == (4, False)
    err = error_from_wire(wire)
    assert type(err) is NotFound
    assert err.reason == "deleted"


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_arbitrary_frames_never_escape_untyped(frames: list[bytes]) -> None:
    with contextlib.suppress(BadRequest, TooLarge):
        decode_request(frames, LIMITS)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text()
        | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_arbitrary_msgpack_values_as_header(value: object) -> None:
    # Anything but BadRequest/TooLarge escaping fails the test.
    with contextlib.suppress(BadRequest, TooLarge):
        decode_request([msgpack.packb(value)], LIMITS)


def _item(**changes: Any) -> MemoryItem:
    """An item with every header field set; ``changes`` replace fields."""
    item = MemoryItem(
        id="01M80PSCB9NQEF9VE49P0A27P0",
        cube="c",
        version=2,
        form="plaintext",
        tier="mid",
        status="active",
        text="t",
        metadata={"a": [1]},
        payload=None,
        created_us=1,
        recorded_us=2,
        valid_from_us=None,
        valid_to_us=5,
        provenance=Provenance("src", "uid:1", None, (("01M80PSCB9NQEF9VE49P0A27P0", 1),), "update"),
        usage=Usage(3, 4, 0.5),
        tags=("x", "y"),
        importance=0.25,
        ttl_s=None,
    )
    return dataclasses.replace(item, **changes)


def test_item_to_wire_matches_the_generic_form() -> None:
    item = _item()
    assert item_to_wire(item) == to_wire(item)


@dataclasses.dataclass
class _Hit:
    item: MemoryItem
    score: float
    components: dict[str, float] | None


@pytest.mark.parametrize("n", [0, 1, 15, 16, 300])
def test_packed_replies_are_byte_for_byte_the_plain_ones(n: int) -> None:
    """A reply built from the wire cache's bytes equals the one packed from the maps."""
    cache = WireCache()
    items = [_item(text=f"t{i}", version=i + 1) for i in range(max(n, 1))]
    hits = [_Hit(items[i % 7], 1.0 / (i + 1), {"dense": 0.5} if i % 2 else None) for i in range(n)]
    plain = [
        {"item": item_to_wire(h.item), "score": h.score, "components": h.components} for h in hits
    ]
    assert encode_response(9, Reply(None, packed=cache.hits(hits))) == encode_response(
        9, Reply(plain)
    )
    got = encode_response(None, Reply(None, packed=cache.item(items[0]), frames=[b"f"]))
    assert got == encode_response(None, Reply(item_to_wire(items[0]), frames=[b"f"]))
    rid, ok, result = decode_response(encode_response(3, Reply(None, packed=cache.hits(hits))))
    assert (rid, ok, len(result)) == (3, True, n)


def test_wire_cache_keys_on_the_item_object() -> None:
    cache = WireCache(max_items=2)
    item = _item()
    first = cache.item(item)
    assert cache.item(item) is first  # the same object: packed once
    # An equal but distinct object (a re-decoded version) is packed anew.
    twin = dataclasses.replace(item)
    packed_twin = cache.item(twin)
    assert packed_twin == first
    assert packed_twin is not first
    # New usage is a new object with new bytes, never the stale ones.
    used = dataclasses.replace(item, usage=Usage(9, 10, 1.5))
    assert msgpack.unpackb(cache.item(used))["usage"]["hits"] == 9
    for i in range(5):  # past max_items the cache empties and keeps working
        assert msgpack.unpackb(cache.item(_item(text=str(i))))["text"] == str(i)


def test_the_client_rebuilds_items_exactly() -> None:
    """item_from_wire fills the slots directly: the same item as the constructor's."""
    from dataclasses import replace

    from memosd.client import item_from_wire

    item = _item(
        payload={"p": 1},
        provenance=Provenance("src", "uid:1", "s", (("01M80PSCB9NQEF9VE49P0A27P0", 1),), "update"),
        ttl_s=60,
    )
    wire = msgpack.unpackb(msgpack.packb(item_to_wire(item)))
    back = item_from_wire({**wire, "from_a_newer_daemon": 1})
    assert back == item
    assert repr(back) == repr(item)
    assert replace(back, text="u").text == "u"
    with pytest.raises(AttributeError):
        back.text = "mutated"  # type: ignore[misc]
    # Optional parts default as before: no usage, no tags, no parents.
    bare = {k: v for k, v in wire.items() if k not in ("usage", "tags")}
    bare["provenance"] = {"actor": "uid:1"}
    plain = item_from_wire(bare)
    assert plain.usage == Usage()
    assert plain.tags == ()
    assert plain.provenance == Provenance(None, "uid:1", None, (), "")
    for broken in ({**wire, "provenance": None}, {k: v for k, v in wire.items() if k != "id"}, []):
        with pytest.raises(BadRequest):
            item_from_wire(broken)


def test_search_hits_build_their_items_on_first_access() -> None:
    import copy
    import pickle

    from memosd.client import Hit, _hits, item_from_wire

    item = _item(
        version=1,
        tier="short",
        metadata={},
        recorded_us=1,
        valid_to_us=None,
        provenance=Provenance(None, "uid:1", None, (), "add"),
        usage=Usage(2, 3, 0.5),
        tags=(),
        importance=0.5,
    )
    wire = msgpack.unpackb(
        msgpack.packb([{"item": item_to_wire(item), "score": 1, "components": {"dense": 1}}])
    )

    def hit() -> Hit:
        return _hits(wire)[0]

    plain = Hit(item, 1.0, {"dense": 1.0})
    assert hit() == plain
    assert plain == hit()
    assert repr(hit()) == repr(plain)
    assert isinstance(hit(), Hit)
    lazy = hit()
    assert lazy.item is lazy.item
    assert lazy.item == item_from_wire(wire[0]["item"])
    assert dataclasses.asdict(hit()) == dataclasses.asdict(plain)
    assert dataclasses.replace(hit(), score=2.0) == Hit(item, 2.0, {"dense": 1.0})
    for copied in (pickle.loads(pickle.dumps(hit())), copy.copy(hit()), copy.deepcopy(hit())):
        assert copied == plain
    with pytest.raises(dataclasses.FrozenInstanceError):
        lazy.item = item  # type: ignore[misc]
    # A broken item map: BadRequest when the item is read (its type at once).
    broken = _hits([{"item": {"id": 1}, "score": 1}])[0]
    with pytest.raises(BadRequest):
        _ = broken.item
    with pytest.raises(BadRequest):
        _hits([{"item": [], "score": 1}])


def test_fuzz_example_counts_scale_with_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOSD_FUZZ_SCALE", raising=False)
    assert fuzz_examples(300) == 300
    monkeypatch.setenv("MEMOSD_FUZZ_SCALE", "20")
    assert fuzz_examples(300) == 6000
    monkeypatch.setenv("MEMOSD_FUZZ_SCALE", "0.001")
    assert fuzz_examples(300) == 1  # never zero examples
    for bad in ("lots", "0", "-2"):
        monkeypatch.setenv("MEMOSD_FUZZ_SCALE", bad)
        with pytest.raises(ValueError, match="MEMOSD_FUZZ_SCALE"):
            fuzz_examples(300)
