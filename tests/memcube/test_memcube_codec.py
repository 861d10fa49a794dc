"""Codec: pinned bytes, round trips, strict decoding of hostile input."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memosd.errors import CodecError
from memosd.memcube import (
    SCHEMA_VERSION,
    CubeConfig,
    MemCube,
    MemoryItem,
    Provenance,
    PurgeRecord,
    Usage,
    decode_any,
    decode_cube,
    decode_item,
    decode_purge,
    encode_cube,
    encode_item,
    encode_purge,
    new_id,
    packb,
    unpackb,
)
from memosd.memcube.codec import decode_item_class, decode_item_keys, pack_raw
from memosd.memcube.model import MAX_METADATA_DEPTH, Operation
from memosd.testing import fuzz_examples

# --- strategies ----------------------------------------------------------------------

MAX_US = (1 << 48) * 1000 - 1
TIME = st.integers(0, (1 << 63) - 1)
IDS = st.builds(
    lambda t, rnd: new_id(t, lambda n: rnd),
    st.integers(0, MAX_US),
    st.binary(min_size=10, max_size=10),
)
CUBE_NAMES = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}", fullmatch=True)
FORMS = st.sampled_from(["plaintext", "activation", "parameter"]) | st.from_regex(
    r"[a-z][a-z0-9_.-]{0,63}", fullmatch=True
)
SHORT_TEXT = st.none() | st.text(max_size=40)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MAPS = st.dictionaries(st.text(max_size=10), VALUES, max_size=5)
TAGS = st.lists(st.text(min_size=1, max_size=128), max_size=64, unique=True).map(
    lambda tags: tuple(sorted(tags))
)


@st.composite
def time_pair(draw: st.DrawFn) -> tuple[int, int]:
    a, b = draw(TIME), draw(TIME)
    return min(a, b), max(a, b)


@st.composite
def validity(draw: st.DrawFn) -> tuple[int | None, int | None]:
    start, end = draw(time_pair())
    return draw(st.sampled_from([start, None])), draw(st.sampled_from([end, None]))


PROVENANCE = st.builds(
    Provenance,
    source=SHORT_TEXT,
    actor=SHORT_TEXT,
    session=SHORT_TEXT,
    parents=st.lists(st.tuples(IDS, st.integers(1, 1 << 40)), max_size=4).map(tuple),
    operation=st.sampled_from([o.value for o in Operation]),
)
USAGE = st.builds(
    Usage,
    hits=st.integers(0, 1 << 40),
    last_hit_us=st.none() | TIME,
    heat=st.floats(allow_nan=False),
)


@st.composite
def items(draw: st.DrawFn) -> MemoryItem:
    created, recorded = draw(time_pair())
    valid_from, valid_to = draw(validity())
    return MemoryItem(
        id=draw(IDS),
        cube=draw(CUBE_NAMES),
        version=draw(st.integers(1, 1 << 40)),
        form=draw(FORMS),
        tier=draw(st.sampled_from(["short", "mid", "long"])),
        status=draw(st.sampled_from(["active", "archived", "deleted"])),
        text=draw(st.text()),
        metadata=draw(MAPS),
        payload=draw(st.none() | MAPS),
        created_us=created,
        recorded_us=recorded,
        valid_from_us=valid_from,
        valid_to_us=valid_to,
        provenance=draw(PROVENANCE),
        usage=draw(USAGE),
        tags=draw(TAGS),
        importance=draw(st.floats(0, 1)),
        ttl_s=draw(st.none() | st.integers(1, 10**12)),
    )


CUBES = st.builds(
    MemCube,
    name=CUBE_NAMES,
    owner=st.text(min_size=1, max_size=40),
    config=st.builds(
        CubeConfig,
        embedding_model=st.text(max_size=40),
        embedding_dim=st.integers(1, 65536),
        tier_policy=MAPS,
        extra=MAPS,
    ),
    schema_version=st.integers(1, 10),
    created_us=TIME,
)
PURGES = st.builds(
    PurgeRecord,
    cube=CUBE_NAMES,
    id=IDS,
    versions=st.integers(0, 1 << 40),
    purged_us=TIME,
    actor=SHORT_TEXT,
    reason=SHORT_TEXT,
)

# --- pinned bytes ------------------------------------------------------------------

ID = new_id(1_700_000_000_000_000, lambda n: bytes(range(n)))
KNOWN_ITEM = MemoryItem(
    id=ID,
    cube="demo",
    version=2,
    form="plaintext",
    tier="mid",
    status="active",
    text="Alice prefers tea.",
    metadata={"lang": "en", "n": [1, -2, 3.5, True, None, b"\x00"]},
    payload={"blob": "sha256:00ff"},
    created_us=1_700_000_000_000_000,
    recorded_us=1_700_000_000_500_000,
    valid_from_us=1_600_000_000_000_000,
    valid_to_us=None,
    provenance=Provenance("chat", "alice", "s-1", ((ID, 1),), "update"),
    usage=Usage(hits=3, last_hit_us=1_700_000_000_400_000, heat=1.25),
    tags=("food", "pref"),
    importance=0.75,
    ttl_s=3600,
)
KNOWN_ITEM_HEX = (
    "de0014a174a46974656da2737601a26964ba303148463759415430303030304734305234304d333045323039"
    "a463756265a464656d6fa376657202a4666f726da9706c61696e74657874a474696572a36d6964a27374a661"
    "6374697665a474657874b2416c6963652070726566657273207465612ea26d6482a46c616e67a2656ea16e96"
    "01fecb400c000000000000c3c0c40100a2706c81a4626c6f62ab7368613235363a30306666a26372cf00060a"
    "24181e4000a3726563cf00060a241825e120a27666cf0005af3107a40000a27674c0a470726f7695a4636861"
    "74a5616c696365a3732d319192ba303148463759415430303030304734305234304d33304532303901a67570"
    "64617465a37573659303cf00060a2418245a80cb3ff4000000000000a47461677392a4666f6f64a470726566"
    "a3696d70cb3fe8000000000000a374746ccd0e10"
)
KNOWN_ITEM_SHA256 = "4a1c51607fb1c4455781cacf890de15738d76a05862e05a59e02a2c84a51c935"
KNOWN_CUBE = MemCube(
    "demo", "alice", CubeConfig(tier_policy={"short_capacity": 10}), 1, 1_700_000_000_000_000
)
KNOWN_CUBE_HEX = (
    "87a174a463756265a2737601a46e616d65a464656d6fa56f776e6572a5616c696365a6736368656d6101a263"
    "72cf00060a24181e4000a363666784a56d6f64656cb0616c6c2d4d696e694c4d2d4c362d7632a364696dcd01"
    "80a5746965727381ae73686f72745f63617061636974790aa5657874726180"
)
KNOWN_PURGE = PurgeRecord("demo", ID, 3, 1_700_000_001_000_000, "admin", "gdpr request")
KNOWN_PURGE_HEX = (
    "88a174a57075726765a2737601a463756265a464656d6fa26964ba303148463759415430303030304734305234"
    "304d333045323039a16e03a26174cf00060a24182d8240a56163746f72a561646d696ea3776879ac67647072"
    "2072657175657374"
)


def test_known_item_bytes() -> None:
    encoded = encode_item(KNOWN_ITEM)
    assert encoded.hex() == KNOWN_ITEM_HEX
    assert hashlib.sha256(encoded).hexdigest() == KNOWN_ITEM_SHA256
    assert decode_item(encoded) == KNOWN_ITEM
    assert decode_item(bytes.fromhex(KNOWN_ITEM_HEX)) == KNOWN_ITEM


def test_known_cube_and_purge_bytes() -> None:
    assert encode_cube(KNOWN_CUBE).hex() == KNOWN_CUBE_HEX
    assert decode_cube(bytes.fromhex(KNOWN_CUBE_HEX)) == KNOWN_CUBE
    assert encode_purge(KNOWN_PURGE).hex() == KNOWN_PURGE_HEX
    assert decode_purge(bytes.fromhex(KNOWN_PURGE_HEX)) == KNOWN_PURGE


def test_record_header() -> None:
    record = msgpack.unpackb(encode_item(KNOWN_ITEM))
    assert record["t"] == "item"
    assert record["sv"] == SCHEMA_VERSION == 1
    assert list(record)[:2] == ["t", "sv"]


def test_buffer_inputs() -> None:
    encoded = encode_item(KNOWN_ITEM)
    assert decode_item(memoryview(encoded)) == KNOWN_ITEM
    assert decode_item(bytearray(encoded)) == KNOWN_ITEM
    assert decode_any(encoded) == KNOWN_ITEM
    assert decode_any(encode_cube(KNOWN_CUBE)) == KNOWN_CUBE
    assert decode_any(encode_purge(KNOWN_PURGE)) == KNOWN_PURGE


# --- round trips ----------------------------------------------------------------------

ROUND_TRIP = settings(max_examples=fuzz_examples(300), suppress_health_check=[HealthCheck.too_slow])


@ROUND_TRIP
@given(items())
def test_item_round_trip(item: MemoryItem) -> None:
    encoded = encode_item(item)
    decoded = decode_item(encoded)
    assert decoded == item
    assert encode_item(decoded) == encoded  # deterministic
    assert decode_any(encoded) == item


@ROUND_TRIP
@given(items())
def test_item_keys_read_the_same_fields_as_the_full_decode(item: MemoryItem) -> None:
    keys = decode_item_keys(encode_item(item))
    assert keys == (
        item.cube,
        item.id,
        item.version,
        item.status,
        item.provenance.operation,
        item.payload,
        item.tier,
        item.form,
    )


def test_nan_heat_is_a_codec_error() -> None:
    # Found by the mutation test: a flipped byte turned heat inf into NaN,
    # which decoded but never equals itself.
    record = msgpack.unpackb(encode_item(KNOWN_ITEM))
    with pytest.raises(CodecError, match="use"):
        decode_item(msgpack.packb({**record, "use": [0, None, float("nan")]}))
    assert decode_item(msgpack.packb({**record, "use": [0, None, float("inf")]})).usage.heat > 1


def test_item_class_reads_three_fields_and_rejects_garbage() -> None:
    good = encode_item(KNOWN_ITEM)
    assert decode_item_class(good) == (KNOWN_ITEM.status, KNOWN_ITEM.tier, KNOWN_ITEM.form)
    for bad in (encode_cube(KNOWN_CUBE), b"\x93\x01\x02\x03", good[:-1], good + b"\x00"):
        with pytest.raises(CodecError):
            decode_item_class(bad)
    record = msgpack.unpackb(good)
    for field in ("st", "tier", "form"):
        with pytest.raises(CodecError, match="st/tier/form"):
            decode_item_class(msgpack.packb({**record, field: 7}))


def test_item_keys_reject_what_is_not_an_item_record() -> None:
    good = encode_item(KNOWN_ITEM)
    for bad in (encode_cube(KNOWN_CUBE), b"\x93\x01\x02\x03", good[:-1], good + b"\x00"):
        with pytest.raises(CodecError):
            decode_item_keys(bad)
    record = msgpack.unpackb(good)
    for field, value in [("ver", 0), ("cube", "bad cube!"), ("st", "zombie"), ("id", "x")]:
        with pytest.raises(CodecError, match=field):
            decode_item_keys(msgpack.packb({**record, field: value}))
    with pytest.raises(CodecError, match="prov"):
        decode_item_keys(msgpack.packb({**record, "prov": [None, None, None, [], "teleport"]}))


@ROUND_TRIP
@given(CUBES)
def test_cube_round_trip(cube: MemCube) -> None:
    encoded = encode_cube(cube)
    assert decode_cube(encoded) == cube
    assert encode_cube(decode_cube(encoded)) == encoded


@ROUND_TRIP
@given(PURGES)
def test_purge_round_trip(purge: PurgeRecord) -> None:
    assert decode_purge(encode_purge(purge)) == purge


# --- hostile input -----------------------------------------------------------------------

DECODERS = [decode_item, decode_cube, decode_purge, decode_any]


def decodes_or_codec_error(data: bytes) -> None:
    for decode in DECODERS:
        try:
            value = decode(data)
        except CodecError:
            continue
        # Whatever decodes must be a valid record: encoding it again must work.
        if isinstance(value, MemoryItem):
            # Compared as bytes: a mutated float may decode to NaN in metadata
            # (allowed there), and NaN never equals itself.
            encoded = encode_item(value)
            assert encode_item(decode_item(encoded)) == encoded
        elif isinstance(value, MemCube):
            encode_cube(value)
        else:
            assert isinstance(value, PurgeRecord)
            encode_purge(value)


@settings(max_examples=fuzz_examples(500))
@given(st.binary(max_size=400))
def test_garbage_is_codec_error(data: bytes) -> None:
    decodes_or_codec_error(data)


@settings(max_examples=fuzz_examples(300))
@given(items(), st.data())
def test_truncated_is_codec_error(item: MemoryItem, data: st.DataObject) -> None:
    encoded = encode_item(item)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(CodecError):
        decode_item(encoded[:cut])
    with pytest.raises(CodecError):
        decode_item(encoded + b"\x00")  # trailing bytes


@settings(max_examples=fuzz_examples(500))
@given(items() | CUBES.map(encode_cube) | PURGES.map(encode_purge), st.data())
def test_mutated_bytes_codec_error_only(value: MemoryItem | bytes, data: st.DataObject) -> None:
    encoded = bytearray(encode_item(value) if isinstance(value, MemoryItem) else value)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] = data.draw(st.integers(0, 255))
    decodes_or_codec_error(bytes(encoded))


@settings(max_examples=fuzz_examples(200))
@given(st.recursive(LEAVES, lambda inner: st.lists(inner) | st.dictionaries(LEAVES, inner)))
def test_arbitrary_msgpack_values_codec_error_only(value: Any) -> None:
    try:
        data = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return  # e.g. unhashable keys: not a msgpack value
    decodes_or_codec_error(data)


def item_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = msgpack.unpackb(encode_item(KNOWN_ITEM))
    record.update(changes)
    return record


@pytest.mark.parametrize("sv", [2, SCHEMA_VERSION + 100, 0, -1])
def test_other_schema_version_rejected(sv: int) -> None:
    for encoded in (encode_item(KNOWN_ITEM), encode_cube(KNOWN_CUBE), encode_purge(KNOWN_PURGE)):
        record = msgpack.unpackb(encoded)
        record["sv"] = sv
        record["new_field_of_the_future"] = 1
        with pytest.raises(CodecError) as info:
            decode_any(packb(record))
        assert info.value.reason == "schema_version"


@pytest.mark.parametrize(
    "changes",
    [
        {"sv": "1"},
        {"sv": True},
        {"t": "cube"},
        {"extra": 1},
        {"id": "not-an-id"},
        {"ver": 0},
        {"ver": 1.0},
        {"tier": "huge"},
        {"st": "gone"},
        {"form": "Bad Form"},
        {"text": b"bytes"},
        {"md": {1: 2}},
        {"md": {b"k": 1}},
        {"md": []},
        {"pl": "x"},
        {"cr": -1},
        {"rec": 1},  # before cr
        {"vf": 10, "vt": 5},
        {"prov": ["s", "a", "x", [], "nope"]},
        {"prov": ["s", "a", "x", [["bad", 1]], "add"]},
        {"prov": ["s", "a", "x", []]},
        {"use": [1, None]},
        {"use": [1, None, 1]},
        {"use": [-1, None, 0.0]},
        {"tags": ["b", "a"]},
        {"tags": ["a", "a"]},
        {"tags": [""]},
        {"tags": ["x" * 129]},
        {"imp": 1.5},
        {"imp": 1},
        {"ttl": 0},
        {"ttl": 1.0},
    ],
)
def test_bad_item_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        decode_item(packb(item_record(**changes)))


def test_missing_field() -> None:
    record = item_record()
    del record["imp"]
    record["zzz"] = 1  # keep the field count
    with pytest.raises(CodecError):
        decode_item(packb(record))


def test_metadata_depth_bounded() -> None:
    deep: Any = 1
    for _ in range(MAX_METADATA_DEPTH):
        deep = [deep]
    with pytest.raises(CodecError):
        decode_item(packb(item_record(md={"k": deep})))
    ok: Any = 1
    for _ in range(MAX_METADATA_DEPTH - 1):
        ok = [ok]
    assert decode_item(packb(item_record(md={"k": ok}))).metadata == {"k": ok}


def test_unpack_limits() -> None:
    with pytest.raises(CodecError) as info:
        unpackb(packb("x" * 100), max_bytes=50)
    assert info.value.reason == "too_large"
    # A header claiming a huge array in a tiny input.
    with pytest.raises(CodecError):
        unpackb(b"\xdd\xff\xff\xff\xff")
    with pytest.raises(CodecError):
        unpackb(b"\xdb\x7f\xff\xff\xff")
    with pytest.raises(CodecError):  # ext types are refused
        unpackb(msgpack.packb(msgpack.ExtType(5, b"xyz")))
    with pytest.raises(CodecError):  # timestamp ext
        unpackb(b"\xd6\xff\x00\x00\x00\x01")
    with pytest.raises(CodecError):  # invalid UTF-8
        unpackb(b"\xa2\xff\xfe")
    with pytest.raises(CodecError):  # non-string map key
        unpackb(b"\x81\x01\x02")
    with pytest.raises(CodecError):
        unpackb(b"\x91" * 100_000)  # nested too deep
    with pytest.raises(CodecError):
        unpackb("text")  # type: ignore[arg-type]
    assert unpackb(packb({"a": [1, b"2"]})) == {"a": [1, b"2"]}


def test_packb_refuses_unencodable() -> None:
    with pytest.raises(CodecError):
        packb({"x": object()})
    with pytest.raises(CodecError):
        packb(1 << 70)


@settings(max_examples=fuzz_examples(200))
@given(st.recursive(LEAVES, lambda inner: st.lists(inner) | st.dictionaries(LEAVES, inner)))
def test_reused_packer_writes_what_msgpack_packb_writes(value: Any) -> None:
    try:
        expected = msgpack.packb(value, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError):
        with pytest.raises((TypeError, ValueError, OverflowError)):
            pack_raw(value)
        return
    assert pack_raw(value) == expected
    assert pack_raw(value) == expected  # the buffer was emptied after the first call


def test_reused_packer_is_clean_after_a_failure_and_after_a_big_record() -> None:
    # A failure half-way through a map must leave nothing behind for the next call.
    with pytest.raises(TypeError):
        pack_raw({"a": "x" * 1000, "b": object()})
    assert pack_raw({"a": 1}) == msgpack.packb({"a": 1})
    big = b"\0" * (2 << 20)  # above the size a thread's packer is kept for
    assert pack_raw(big) == msgpack.packb(big, use_bin_type=True)
    assert pack_raw([1, "two"]) == msgpack.packb([1, "two"], use_bin_type=True)


def test_each_thread_packs_with_its_own_packer() -> None:
    values = [{"i": i, "text": "t" * (i % 97)} for i in range(2000)]
    expected = [msgpack.packb(v, use_bin_type=True) for v in values]

    def pack_all(_: int) -> list[bytes]:
        return [pack_raw(v) for v in values]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(pack_all, range(8)))
    assert all(result == expected for result in results)


@pytest.mark.parametrize(
    "changes",
    [{"importance": 2.0}, {"metadata": {"t": (1,)}}, {"tags": ("b", "a")}, {"recorded_us": 0}],
)
def test_encode_refuses_invalid_item(changes: dict[str, Any]) -> None:
    # What could not be read back must not be written.
    with pytest.raises(CodecError):
        encode_item(dataclasses.replace(KNOWN_ITEM, **changes))


def test_int_importance_and_heat_stored_as_float() -> None:
    fields = {f: getattr(KNOWN_ITEM, f) for f in MemoryItem.__slots__}
    item = MemoryItem(**{**fields, "importance": 1, "usage": Usage(1, None, 2)})
    decoded = decode_item(encode_item(item))
    assert decoded == item
    assert type(decoded.importance) is float
    assert type(decoded.usage.heat) is float


def test_negative_zero_heat_survives() -> None:
    item = dataclasses.replace(KNOWN_ITEM, usage=Usage(0, None, -0.0))
    encoded = encode_item(item)
    assert encode_item(decode_item(encoded)) == encoded
