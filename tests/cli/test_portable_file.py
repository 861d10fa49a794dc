"""The portable cube file: round trip, tamper detection, garbage → typed errors."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memosd.engine import CubeExport, Engine
from memosd.errors import BadRequest, CodecError, MemosError, TooLarge
from memosd.portable import (
    FORMAT_VERSION,
    MAGIC,
    TRAILER,
    Limits,
    dump_cube,
    load_cube,
    read_portable,
)
from memosd.testing import fuzz_examples

NOW_US = 1_790_000_000_000_000


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CubeExport]:
    engine = Engine.open(tmp_path_factory.mktemp("engine"))
    try:
        engine.create_cube("diary", owner="uid:1000")
        first = engine.add("diary", "I like green tea", tags=("drink",), metadata={"n": 1})
        engine.update("diary", first.id, text="I like black tea")
        engine.rollback("diary", first.id, 1)
        second = engine.add("diary", "meeting on friday", session="s1", source="chat")
        engine.delete("diary", second.id)
        third = engine.add("diary", "my password is hunter2")
        engine.purge("diary", third.id, reason="secret")
        engine.set_grant("diary", "uid:1001", "read")
        engine.set_grant("diary", "token:bot", "write")
        yield engine.export_cube("diary")
    finally:
        engine.close()


def reframe(data: bytes, edit: dict[str, bytes | None]) -> bytes:
    """Rebuild a file with some sections replaced (None drops it), with a valid digest."""
    body = data[: -(len(TRAILER) + 32)]
    (count,) = struct.unpack_from(">I", body, len(MAGIC))
    pos = len(MAGIC) + 4
    sections: list[tuple[str, bytes]] = []
    for _ in range(count):
        (name_len,) = struct.unpack_from(">H", body, pos)
        name = body[pos + 2 : pos + 2 + name_len].decode()
        pos += 2 + name_len
        (size,) = struct.unpack_from(">Q", body, pos)
        pos += 8
        sections.append((name, body[pos : pos + size]))
        pos += size
    out: list[tuple[str, bytes]] = []
    for name, blob in sections:
        replacement = edit.get(name, blob)
        if replacement is not None:
            out.append((name, replacement))
    parts = [MAGIC, struct.pack(">I", len(out))]
    for name, blob in out:
        parts += [struct.pack(">H", len(name)), name.encode(), struct.pack(">Q", len(blob)), blob]
    new_body = b"".join(parts)
    return new_body + TRAILER + hashlib.sha256(new_body).digest()


def with_manifest(data: bytes, change: dict[str, object]) -> bytes:
    manifest = read_portable(data).manifest
    manifest.update(change)
    return reframe(data, {"manifest.json": json.dumps(manifest).encode()})


def test_round_trip_keeps_every_version_purge_and_grant(export: CubeExport) -> None:
    data = dump_cube(export, now_us=NOW_US)
    loaded = read_portable(data)
    assert loaded.export == export
    assert load_cube(data) == export
    versions = {tuple(v.version for v in item) for item in export.items}
    assert (1, 2, 3) in versions  # add, update, rollback
    assert (1, 2) in versions  # add, delete (tombstone)
    assert len(export.purges) == 1
    assert export.grants == {"uid:1001": "read", "token:bot": "write"}
    m = loaded.manifest
    assert m["format"] == "memosd-cube"
    assert m["format_version"] == FORMAT_VERSION
    assert m["cube"] == "diary"
    assert m["created_us"] == NOW_US
    assert m["counts"] == {"items": 2, "versions": 5, "purges": 1, "grants": 2, "blobs": 0}
    # Purged contents are gone from the file, not just hidden.
    assert b"hunter2" not in data


def test_output_is_deterministic(export: CubeExport) -> None:
    assert dump_cube(export, now_us=NOW_US) == dump_cube(export, now_us=NOW_US)


def test_blobs_round_trip_and_are_content_addressed(export: CubeExport) -> None:
    blob = b"\x00tensor bytes" * 100
    digest = hashlib.sha256(blob).hexdigest()
    data = dump_cube(export, blobs={digest: blob}, now_us=NOW_US)
    loaded = read_portable(data)
    assert loaded.blobs == {digest: blob}
    assert loaded.manifest["counts"]["blobs"] == 1
    with pytest.raises(CodecError, match="sha256"):
        dump_cube(export, blobs={"0" * 64: blob})
    # A blob renamed to another hash (manifest updated to match) is still refused.
    other = "f" * 64
    renamed = reframe(data, {f"blobs/{digest}": None})
    manifest = read_portable(data).manifest
    entry = manifest["sections"].pop(f"blobs/{digest}")
    manifest["sections"][f"blobs/{other}"] = entry
    body_only = renamed[: -(len(TRAILER) + 32)]
    extra = (
        struct.pack(">H", len(f"blobs/{other}"))
        + f"blobs/{other}".encode()
        + struct.pack(">Q", len(blob))
        + blob
    )
    (count,) = struct.unpack_from(">I", body_only, len(MAGIC))
    body = MAGIC + struct.pack(">I", count + 1) + body_only[len(MAGIC) + 4 :] + extra
    forged = reframe(
        body + TRAILER + hashlib.sha256(body).digest(),
        {"manifest.json": json.dumps(manifest).encode()},
    )
    with pytest.raises(CodecError, match="not named by its sha256"):
        load_cube(forged)


def test_every_flipped_byte_is_detected(export: CubeExport) -> None:
    data = dump_cube(export, now_us=NOW_US)
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(CodecError):
            load_cube(bytes(damaged))


def test_truncated_or_extended_files_are_rejected(export: CubeExport) -> None:
    data = dump_cube(export, now_us=NOW_US)
    for cut in (0, 1, len(MAGIC), len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError):
            load_cube(data[:cut])
    with pytest.raises(CodecError):
        load_cube(data + b"\x00")


def test_a_section_changed_behind_the_manifest_is_rejected(export: CubeExport) -> None:
    data = dump_cube(export, now_us=NOW_US)
    # The file digest is recomputed, so only the manifest's per-section checksum can tell.
    forged = reframe(data, {"grants.msgpack": b"\x81\xa8uid:6666\xa5write"})
    with pytest.raises(CodecError, match=r"grants\.msgpack does not match its checksum"):
        load_cube(forged)


@pytest.mark.parametrize("section", ["cube.msgpack", "items.msgpack", "purges.msgpack"])
def test_missing_sections_are_rejected(export: CubeExport, section: str) -> None:
    forged = reframe(dump_cube(export, now_us=NOW_US), {section: None})
    with pytest.raises(CodecError, match="unexpected sections"):
        load_cube(forged)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "zip"}, "not a memosd portable cube file"),
        ({"format_version": FORMAT_VERSION + 1}, "newer than this memosd supports"),
        ({"format_version": "1"}, "format_version"),
        ({"counts": {"items": 9, "versions": 5, "purges": 1, "grants": 2, "blobs": 0}}, "counts"),
        ({"cube": "other"}, "manifest names cube 'other'"),
        ({"sections": {}}, "do not match the manifest"),
    ],
)
def test_inconsistent_manifests_are_rejected(
    export: CubeExport, change: dict[str, object], message: str
) -> None:
    forged = with_manifest(dump_cube(export, now_us=NOW_US), change)
    with pytest.raises(CodecError, match=message):
        load_cube(forged)


def test_items_of_another_cube_are_rejected(export: CubeExport) -> None:
    from dataclasses import replace

    stray = [[replace(v, cube="elsewhere") for v in export.items[0]], *export.items[1:]]
    forged = dump_cube(replace(export, items=stray), now_us=NOW_US)
    with pytest.raises(CodecError, match="belongs to cube 'elsewhere'"):
        load_cube(forged)


def test_versions_out_of_order_are_rejected(export: CubeExport) -> None:
    from dataclasses import replace

    shuffled = [list(reversed(export.items[0])), *export.items[1:]]
    with pytest.raises(CodecError, match="not ascending"):
        load_cube(dump_cube(replace(export, items=shuffled), now_us=NOW_US))


def test_size_limits(export: CubeExport) -> None:
    data = dump_cube(export, now_us=NOW_US)
    with pytest.raises(TooLarge):
        load_cube(data, limits=Limits(max_file_bytes=len(data) - 1))
    with pytest.raises(TooLarge):
        load_cube(data, limits=Limits(max_sections=2))
    with pytest.raises(TooLarge):
        load_cube(data, limits=Limits(max_manifest_bytes=10))


def test_a_huge_declared_section_length_does_not_allocate(export: CubeExport) -> None:
    body = MAGIC + struct.pack(">I", 1) + struct.pack(">H", 13) + b"manifest.json"
    body += struct.pack(">Q", 2**62)
    with pytest.raises(CodecError, match="past the end"):
        load_cube(body + TRAILER + hashlib.sha256(body).digest())


def test_a_zip_or_a_pickle_is_not_a_cube_file() -> None:
    import pickle  # only to prove such bytes are refused, never loaded

    with pytest.raises(CodecError, match="not a memosd portable cube file"):
        load_cube(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CodecError, match="not a memosd portable cube file"):
        load_cube(pickle.dumps({"a": 1}))


@settings(
    max_examples=fuzz_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(garbage=st.binary(max_size=4096))
def test_garbage_raises_only_typed_errors(garbage: bytes) -> None:
    for data in (garbage, MAGIC + garbage):
        with pytest.raises(MemosError) as info:
            load_cube(data)
        assert isinstance(info.value, BadRequest | TooLarge)


@settings(
    max_examples=fuzz_examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(payload=st.binary(max_size=2048), count=st.integers(0, 8))
def test_garbage_with_a_valid_digest_raises_only_typed_errors(payload: bytes, count: int) -> None:
    """Past the digest check, the framing and decoders still only raise typed errors."""
    body = MAGIC + struct.pack(">I", count) + payload
    with pytest.raises(MemosError) as info:
        load_cube(body + TRAILER + hashlib.sha256(body).digest())
    assert isinstance(info.value, BadRequest | TooLarge)


@settings(
    max_examples=fuzz_examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    sections=st.dictionaries(
        st.sampled_from(["cube.msgpack", "grants.msgpack", "items.msgpack", "purges.msgpack"]),
        st.binary(max_size=256),
    )
)
def test_garbage_sections_with_valid_checksums_raise_only_typed_errors(
    export: CubeExport, sections: dict[str, bytes]
) -> None:
    data = dump_cube(export, now_us=NOW_US)
    manifest = read_portable(data).manifest
    for name, blob in sections.items():
        manifest["sections"][name] = {
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
        }
    forged = reframe(data, {**sections, "manifest.json": json.dumps(manifest).encode()})
    error: MemosError | None = None
    try:
        load_cube(forged)
    except MemosError as exc:
        error = exc
    # Some garbage may decode (e.g. an empty purge list); anything else is typed.
    assert error is None or isinstance(error, BadRequest | TooLarge)


def test_file_written_by_dump_can_be_inspected_with_memctl(
    export: CubeExport, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from memosd.cli.main import app

    path = tmp_path / "diary.memcube"
    path.write_bytes(dump_cube(export, now_us=NOW_US))
    result = CliRunner().invoke(app, ["cube", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["versions"] == 5
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    result = CliRunner().invoke(app, ["cube", "inspect", str(path)])
    assert result.exit_code == 2
    assert "checksum mismatch" in result.stderr
