"""Byte-level tests of the WAL record and segment framing (no files involved)."""

from __future__ import annotations

import struct

import crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memosd.errors import WalCorruptionError
from memosd.wal.framing import (
    MAX_PAYLOAD_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    ScanEnd,
    WalRecord,
    encode_record,
    encode_records,
    encode_segment_header,
    parse_segment_name,
    scan_segment,
    segment_name,
)


def build_segment(first_lsn: int, records: list[tuple[int, bytes]]) -> bytes:
    return encode_segment_header(first_lsn) + encode_records(first_lsn, records)


def record_offsets(first_lsn: int, records: list[tuple[int, bytes]]) -> list[int]:
    """Start offset of each record in build_segment(first_lsn, records)."""
    offsets, offset = [], SEGMENT_HEADER_SIZE
    for _rtype, payload in records:
        offsets.append(offset)
        offset += RECORD_HEADER_SIZE + len(payload)
    return offsets


FOUR = [(1, b"alpha"), (2, b"bravo-bravo"), (3, b""), (4, b"delta" * 7)]


def test_record_bytes_are_exactly_the_documented_layout() -> None:
    encoded = encode_record(1, 2, b"hi")
    assert encoded.hex() == "02000000ce25f1400100000000000000026869"
    expected_crc = crc32c.crc32c(struct.pack("<IQB", 2, 1, 2) + b"hi")
    assert encoded == struct.pack("<IIQB", 2, expected_crc, 1, 2) + b"hi"
    assert len(encoded) == RECORD_HEADER_SIZE + 2 == 19


def test_segment_header_bytes_are_exactly_the_documented_layout() -> None:
    header = encode_segment_header(1)
    assert header.hex() == "4d57414c01000000010000000000000078755c4a"
    assert header[16:] == struct.pack("<I", crc32c.crc32c(header[:16]))
    assert len(header) == SEGMENT_HEADER_SIZE == 20


def test_segment_names_sort_in_lsn_order() -> None:
    assert segment_name(1) == "00000000000000000001.wal"
    assert parse_segment_name(segment_name(12345)) == 12345
    assert parse_segment_name("00000000000000000001.wal.tmp") is None
    assert parse_segment_name("cut") is None
    names = [segment_name(n) for n in (9, 10, 100, 2)]
    assert sorted(names) == [segment_name(n) for n in (2, 9, 10, 100)]


@pytest.mark.parametrize(("lsn", "rtype", "size"), [(0, 1, 0), (1, 256, 0), (1, -1, 0)])
def test_encode_rejects_out_of_range_fields(lsn: int, rtype: int, size: int) -> None:
    with pytest.raises(ValueError, match=r"outside|fit"):
        encode_record(lsn, rtype, bytes(size))


records_strategy = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=30)


@given(first_lsn=st.integers(1, 2**40), records=records_strategy)
def test_encode_then_scan_round_trips(first_lsn: int, records: list[tuple[int, bytes]]) -> None:
    data = build_segment(first_lsn, records)
    for is_last in (True, False):
        scan = scan_segment(data, expected_first_lsn=first_lsn, is_last_segment=is_last)
        assert scan.end is ScanEnd.CLEAN
        assert scan.valid_end == len(data)
        assert scan.first_lsn == first_lsn
        assert scan.records == tuple(
            WalRecord(first_lsn + i, rtype, payload) for i, (rtype, payload) in enumerate(records)
        )
        assert scan.last_lsn == first_lsn + len(records) - 1


@given(records=records_strategy.filter(bool), data=st.data())
def test_any_truncation_of_the_last_record_is_a_torn_tail(
    records: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    full = build_segment(1, records)
    last_start = record_offsets(1, records)[-1]
    cut_at = data.draw(st.integers(last_start + 1, len(full) - 1))
    scan = scan_segment(full[:cut_at], expected_first_lsn=1, is_last_segment=True)
    # A prefix that happens to be all zero bytes (an empty payload's length)
    # reads as zero fill; either way the next record goes at the same offset.
    remains_zero = not full[last_start:cut_at].strip(b"\0")
    assert scan.end is (ScanEnd.ZERO_FILL if remains_zero else ScanEnd.TORN_TAIL)
    assert scan.valid_end == last_start
    assert [r.lsn for r in scan.records] == list(range(1, len(records)))


def test_torn_tail_at_every_byte_of_the_last_record() -> None:
    full = build_segment(1, FOUR)
    last_start = record_offsets(1, FOUR)[-1]
    for cut_at in range(last_start + 1, len(full)):
        scan = scan_segment(full[:cut_at], expected_first_lsn=1, is_last_segment=True)
        assert scan.end is ScanEnd.TORN_TAIL, cut_at
        assert scan.valid_end == last_start
        assert scan.records == tuple(WalRecord(i + 1, *r) for i, r in enumerate(FOUR[:-1]))


def test_zero_filled_tail_is_space_for_records_not_damage() -> None:
    full = build_segment(1, FOUR)
    for zeros in (1, RECORD_HEADER_SIZE, 4096, 2**20):
        scan = scan_segment(full + bytes(zeros), expected_first_lsn=1, is_last_segment=True)
        assert scan.end is ScanEnd.ZERO_FILL
        assert scan.valid_end == len(full)
        assert len(scan.records) == 4
    empty = scan_segment(
        encode_segment_header(1) + bytes(4096), expected_first_lsn=1, is_last_segment=True
    )
    assert (empty.end, empty.valid_end, empty.records) == (
        ScanEnd.ZERO_FILL,
        SEGMENT_HEADER_SIZE,
        (),
    )


def test_zero_fill_only_in_the_last_segment() -> None:
    full = build_segment(1, FOUR)
    with pytest.raises(WalCorruptionError, match="zero fill in a segment that is not the last"):
        scan_segment(full + bytes(4096), expected_first_lsn=1, is_last_segment=False)


def test_a_torn_record_inside_the_zero_fill_is_a_torn_tail() -> None:
    # The last batch was written over the fill and torn: garbage, then zeros.
    full = build_segment(1, FOUR)
    last_start = record_offsets(1, FOUR)[-1]
    torn = full[: last_start + 7] + bytes(2**20)
    scan = scan_segment(torn, expected_first_lsn=1, is_last_segment=True)
    assert scan.end is ScanEnd.TORN_TAIL
    assert scan.valid_end == last_start


def test_zeroed_records_inside_the_fill_with_a_valid_record_after_are_corruption() -> None:
    full = build_segment(1, FOUR)
    offsets = record_offsets(1, FOUR)
    hole = full[: offsets[1]] + bytes(offsets[2] - offsets[1]) + full[offsets[2] :]
    with pytest.raises(WalCorruptionError, match="a valid record"):
        scan_segment(hole + bytes(4096), expected_first_lsn=1, is_last_segment=True)


def test_record_overwritten_with_zeros_after_a_partial_write_is_torn() -> None:
    full = build_segment(1, FOUR)
    last_start = record_offsets(1, FOUR)[-1]
    damaged = full[: last_start + 5] + bytes(len(full) - last_start - 5)
    scan = scan_segment(damaged, expected_first_lsn=1, is_last_segment=True)
    assert scan.end is ScanEnd.TORN_TAIL
    assert scan.valid_end == last_start


def test_a_flipped_byte_in_any_earlier_record_is_corruption() -> None:
    full = build_segment(1, FOUR)
    last_start = record_offsets(1, FOUR)[-1]
    for position in range(SEGMENT_HEADER_SIZE, last_start):
        damaged = bytearray(full)
        damaged[position] ^= 0x40
        with pytest.raises(WalCorruptionError) as info:
            scan_segment(bytes(damaged), expected_first_lsn=1, is_last_segment=True, segment="s1")
        assert "s1" in info.value.message
        assert info.value.details["segment"] == "s1"
        assert info.value.details["offset"] <= position


def test_corruption_error_names_segment_offset_and_lsn() -> None:
    full = bytearray(build_segment(7, FOUR))
    second = record_offsets(7, FOUR)[1]
    full[second + RECORD_HEADER_SIZE] ^= 1  # first payload byte of LSN 8
    with pytest.raises(WalCorruptionError) as info:
        scan_segment(bytes(full), expected_first_lsn=7, is_last_segment=True, segment="seg-x")
    err = info.value
    assert err.details["offset"] == second
    assert err.details["lsn"] == 8
    assert f"offset {second}" in err.message
    assert "LSN 8" in err.message
    assert err.reason == "wal_corrupt"


def test_lsn_gap_is_corruption() -> None:
    data = encode_segment_header(1) + encode_record(1, 0, b"a") + encode_record(3, 0, b"c")
    with pytest.raises(WalCorruptionError, match="LSN gap"):
        scan_segment(data, expected_first_lsn=1, is_last_segment=True)


def test_repeated_lsn_is_corruption() -> None:
    data = encode_segment_header(1) + encode_record(1, 0, b"a") + encode_record(1, 0, b"a")
    with pytest.raises(WalCorruptionError, match="non-increasing"):
        scan_segment(data, expected_first_lsn=1, is_last_segment=True)


def test_first_record_must_match_the_header_lsn() -> None:
    data = encode_segment_header(5) + encode_record(6, 0, b"a")
    with pytest.raises(WalCorruptionError, match="LSN gap"):
        scan_segment(data, expected_first_lsn=5, is_last_segment=True)


def test_any_damage_in_a_segment_that_is_not_the_last_is_corruption() -> None:
    full = build_segment(1, FOUR)
    with pytest.raises(WalCorruptionError, match="not the last"):
        scan_segment(full[:-1], expected_first_lsn=1, is_last_segment=False)
    with pytest.raises(WalCorruptionError):
        scan_segment(full + bytes(8), expected_first_lsn=1, is_last_segment=False)
    with pytest.raises(WalCorruptionError):
        scan_segment(full[:10], expected_first_lsn=1, is_last_segment=False)


def test_torn_header_of_the_last_segment_is_a_torn_tail() -> None:
    header = encode_segment_header(9)
    for cut_at in range(len(header)):
        scan = scan_segment(header[:cut_at], expected_first_lsn=9, is_last_segment=True)
        assert scan.end is ScanEnd.TORN_TAIL
        assert not scan.header_valid
        assert scan.valid_end == 0
        assert scan.next_lsn == 9


def test_damaged_header_followed_by_records_is_corruption() -> None:
    data = bytearray(build_segment(1, FOUR))
    data[2] ^= 0xFF
    with pytest.raises(WalCorruptionError, match="header"):
        scan_segment(bytes(data), expected_first_lsn=1, is_last_segment=True)


def test_header_naming_another_first_lsn_is_corruption() -> None:
    with pytest.raises(WalCorruptionError, match="first LSN"):
        scan_segment(build_segment(2, FOUR), expected_first_lsn=1, is_last_segment=True)


def test_huge_length_field_is_rejected_without_allocating() -> None:
    header = struct.pack("<IIQB", MAX_PAYLOAD_BYTES + 1, 0, 1, 0)
    scan = scan_segment(
        encode_segment_header(1) + header + b"x" * 10, expected_first_lsn=1, is_last_segment=True
    )
    assert scan.end is ScanEnd.TORN_TAIL
    assert scan.torn_reason.startswith("payload length")
    with pytest.raises(ValueError, match="exceeds"):
        encode_record(1, 0, bytes(MAX_PAYLOAD_BYTES + 1))


def test_expected_first_lsn_none_takes_the_header_value() -> None:
    scan = scan_segment(build_segment(42, FOUR), expected_first_lsn=None, is_last_segment=False)
    assert scan.first_lsn == 42
    assert [r.lsn for r in scan.records] == [42, 43, 44, 45]
