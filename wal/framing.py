"""Byte layout of WAL records and segment headers, sans-IO.

Everything here takes bytes and returns values: no file access, no clocks, no
logging.  That keeps the rules that decide "torn tail or corruption?" small
enough to test exhaustively (every byte offset, hypothesis round trips).
The format itself is documented in the package docstring (``memosd.wal``).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import crc32c

from memosd.errors import WalCorruptionError

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "RECORD_HEADER_SIZE",
    "SEGMENT_FORMAT_VERSION",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_MAGIC",
    "ScanEnd",
    "SegmentScan",
    "WalRecord",
    "encode_record",
    "encode_records",
    "encode_segment_header",
    "parse_segment_name",
    "scan_segment",
    "segment_name",
]

# [u32 payload_length][u32 crc32c][u64 lsn][u8 record_type], little-endian.
_RECORD_HEADER: Final = struct.Struct("<IIQB")
RECORD_HEADER_SIZE: Final = _RECORD_HEADER.size  # 17
# The CRC covers length|lsn|type|payload, so a damaged header field is caught
# just like a damaged payload byte.
_CRC_FIELDS: Final = struct.Struct("<IQB")

# A damaged length field must not make recovery allocate or skip gigabytes.
MAX_PAYLOAD_BYTES: Final = 64 * 2**20
MAX_RECORD_TYPE: Final = 255
MAX_LSN: Final = 2**64 - 1

SEGMENT_MAGIC: Final = b"MWAL"
SEGMENT_FORMAT_VERSION: Final = 1
# [4s magic][u16 version][u16 flags][u64 first_lsn] then [u32 crc32c of those].
_SEGMENT_FIELDS: Final = struct.Struct("<4sHHQ")
_SEGMENT_CRC: Final = struct.Struct("<I")
SEGMENT_HEADER_SIZE: Final = _SEGMENT_FIELDS.size + _SEGMENT_CRC.size  # 20

_SEGMENT_NAME_RE: Final = re.compile(r"^(\d{20})\.wal$")


@dataclass(frozen=True, slots=True)
class WalRecord:
    """One logical record: its log sequence number, type tag and payload."""

    lsn: int
    rtype: int
    payload: bytes


class ScanEnd(enum.Enum):
    """What follows the last valid record of a segment."""

    CLEAN = "clean"  # the data ends exactly after the last valid record
    ZERO_FILL = "zero_fill"  # only zero bytes follow: space prepared for records
    TORN_TAIL = "torn_tail"  # an interrupted append; safe to cut


@dataclass(frozen=True, slots=True)
class SegmentScan:
    """Result of scanning one segment's bytes.

    ``valid_end`` is the offset just past the last valid record (or past the
    header when there is none; 0 when the header itself is torn).  Bytes from
    ``valid_end`` on are the torn tail when ``end`` is ``TORN_TAIL``, and all
    zero when it is ``ZERO_FILL``.
    """

    first_lsn: int
    records: tuple[WalRecord, ...]
    valid_end: int
    end: ScanEnd
    header_valid: bool
    torn_reason: str = ""

    @property
    def last_lsn(self) -> int:
        """LSN of the last valid record, or ``first_lsn - 1`` when empty."""
        return self.records[-1].lsn if self.records else self.first_lsn - 1

    @property
    def next_lsn(self) -> int:
        return self.last_lsn + 1


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record has ``first_lsn``.

    Zero-padded decimal so that name order is LSN order.
    """
    return f"{first_lsn:020d}.wal"


def parse_segment_name(name: str) -> int | None:
    """The first LSN encoded in a segment file name, or None if not a segment."""
    match = _SEGMENT_NAME_RE.match(name)
    return int(match.group(1)) if match else None


def encode_segment_header(first_lsn: int) -> bytes:
    _check_lsn(first_lsn)
    fields = _SEGMENT_FIELDS.pack(SEGMENT_MAGIC, SEGMENT_FORMAT_VERSION, 0, first_lsn)
    return fields + _SEGMENT_CRC.pack(crc32c.crc32c(fields))


def encode_record(lsn: int, rtype: int, payload: bytes) -> bytes:
    _check_lsn(lsn)
    if not 0 <= rtype <= MAX_RECORD_TYPE:
        raise ValueError(f"record type {rtype} does not fit in a byte")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    length = len(payload)
    crc = crc32c.crc32c(payload, crc32c.crc32c(_CRC_FIELDS.pack(length, lsn, rtype)))
    return _RECORD_HEADER.pack(length, crc, lsn, rtype) + payload


def encode_records(first_lsn: int, records: Sequence[tuple[int, bytes]]) -> bytes:
    """Encode ``records`` (rtype, payload) with consecutive LSNs from ``first_lsn``."""
    return b"".join(
        encode_record(first_lsn + i, rtype, payload) for i, (rtype, payload) in enumerate(records)
    )


def _check_lsn(lsn: int) -> None:
    if not 1 <= lsn <= MAX_LSN:
        raise ValueError(f"LSN {lsn} is outside 1..2**64-1")


def _decode_header(data: bytes, offset: int) -> tuple[int, int, int, int] | str:
    """(length, crc, lsn, rtype) of the record header at ``offset``, or why not."""
    if len(data) - offset < RECORD_HEADER_SIZE:
        return "short record header"
    length, crc, lsn, rtype = _RECORD_HEADER.unpack_from(data, offset)
    if length > MAX_PAYLOAD_BYTES:
        return f"payload length {length} exceeds the maximum"
    if offset + RECORD_HEADER_SIZE + length > len(data):
        return "record runs past the end of the data"
    return length, crc, lsn, rtype


def _decode_record(data: bytes, offset: int) -> WalRecord | str:
    """The CRC-valid record at ``offset``, or a reason it is not one."""
    header = _decode_header(data, offset)
    if isinstance(header, str):
        return header
    length, crc, lsn, rtype = header
    start = offset + RECORD_HEADER_SIZE
    payload = data[start : start + length]
    if crc32c.crc32c(payload, crc32c.crc32c(_CRC_FIELDS.pack(length, lsn, rtype))) != crc:
        return "record checksum mismatch"
    return WalRecord(lsn, rtype, payload)


def _later_valid_record(data: bytes, start: int, min_lsn: int) -> tuple[int, int] | None:
    """(offset, lsn) of a CRC-valid record with lsn >= ``min_lsn`` after ``start``.

    This is the test that separates a torn tail from mid-log damage: the WAL
    has at most one unsynced append in flight, and an interrupted append
    leaves nothing decodable *behind* the damage.  A valid later record
    means data that was once complete is now damaged.
    """
    # A valid record's header is never all zeros (its LSN is >= 1), so no
    # record starts inside the trailing run of zeros: the walk stops there.
    nonzero_end = len(data.rstrip(b"\0"))
    if nonzero_end <= start:
        return None
    for offset in range(start + 1, min(nonzero_end, len(data) - RECORD_HEADER_SIZE + 1)):
        header = _decode_header(data, offset)
        if isinstance(header, str) or header[2] < min_lsn:
            continue
        record = _decode_record(data, offset)
        if isinstance(record, WalRecord):
            return offset, record.lsn
    return None


def scan_segment(
    data: bytes,
    *,
    expected_first_lsn: int | None,
    is_last_segment: bool,
    segment: str = "<segment>",
) -> SegmentScan:
    """Decode a whole segment file and classify what follows its valid prefix.

    ``expected_first_lsn`` is the LSN the segment must start at (from its
    name and the previous segment), or None to take it from the header.
    Damage is a torn tail only in the last segment and only when no valid
    record follows it; anything else raises :class:`WalCorruptionError`.
    """

    def corrupt(problem: str, offset: int, lsn: int | None) -> WalCorruptionError:
        return WalCorruptionError(
            f"WAL segment {segment} is corrupt at offset {offset} (LSN {lsn}): {problem}",
            segment=segment,
            offset=offset,
            lsn=lsn,
            problem=problem,
        )

    header_problem = _check_segment_header(data)
    if isinstance(header_problem, str):
        fallback_lsn = expected_first_lsn if expected_first_lsn is not None else 1
        if is_last_segment and _later_valid_record(data, 0, fallback_lsn) is None:
            # A rotation interrupted before the header was synced; records are
            # only ever appended after that sync, so nothing can be lost here.
            return SegmentScan(fallback_lsn, (), 0, ScanEnd.TORN_TAIL, False, header_problem)
        raise corrupt(header_problem, 0, expected_first_lsn)
    first_lsn = header_problem
    # A header with a valid checksum but the wrong contents was never torn.
    if expected_first_lsn is not None and first_lsn != expected_first_lsn:
        raise corrupt(f"segment header says first LSN {first_lsn}", 0, expected_first_lsn)
    if first_lsn < 1:
        raise corrupt("segment header first LSN is 0", 0, None)

    records: list[WalRecord] = []
    offset = SEGMENT_HEADER_SIZE
    expected_lsn = first_lsn
    size = len(data)
    unpack_header, pack_fields, crc = _RECORD_HEADER.unpack_from, _CRC_FIELDS.pack, crc32c.crc32c
    while offset < size:
        # Fast path (recovery reads every record): an intact record with the
        # expected LSN.  Anything else takes the careful path below.
        if size - offset >= RECORD_HEADER_SIZE:
            length, want, lsn, rtype = unpack_header(data, offset)
            start = offset + RECORD_HEADER_SIZE
            end = start + length
            if lsn == expected_lsn and length <= MAX_PAYLOAD_BYTES and end <= size:
                payload = data[start:end]
                if crc(payload, crc(pack_fields(length, lsn, rtype))) == want:
                    records.append(WalRecord(lsn, rtype, payload))
                    offset = end
                    expected_lsn += 1
                    continue
        decoded = _decode_record(data, offset)
        if isinstance(decoded, WalRecord):
            if decoded.lsn != expected_lsn:
                kind = "LSN gap" if decoded.lsn > expected_lsn else "non-increasing LSN"
                raise corrupt(f"{kind}: found {decoded.lsn}, expected", offset, expected_lsn)
            records.append(decoded)
            offset += RECORD_HEADER_SIZE + len(decoded.payload)
            expected_lsn += 1
            continue
        if data.count(0, offset) == size - offset:
            if not is_last_segment:
                # Rotation cuts the fill off before the next segment exists.
                raise corrupt("zero fill in a segment that is not the last", offset, expected_lsn)
            return SegmentScan(first_lsn, tuple(records), offset, ScanEnd.ZERO_FILL, True)
        later = _later_valid_record(data, offset, expected_lsn)
        if later is not None:
            problem = f"{decoded}; a valid record (LSN {later[1]}) follows at offset {later[0]}"
            raise corrupt(problem, offset, expected_lsn)
        if not is_last_segment:
            raise corrupt(f"{decoded} in a segment that is not the last", offset, expected_lsn)
        return SegmentScan(first_lsn, tuple(records), offset, ScanEnd.TORN_TAIL, True, decoded)
    return SegmentScan(first_lsn, tuple(records), offset, ScanEnd.CLEAN, True)


def _check_segment_header(data: bytes) -> int | str:
    """The header's first LSN, or why the header bytes are damaged."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return "short segment header"
    magic, version, _flags, first_lsn = _SEGMENT_FIELDS.unpack_from(data, 0)
    (crc,) = _SEGMENT_CRC.unpack_from(data, _SEGMENT_FIELDS.size)
    if crc32c.crc32c(data[: _SEGMENT_FIELDS.size]) != crc:
        return "segment header checksum mismatch"
    if magic != SEGMENT_MAGIC:
        return f"bad segment magic {magic!r}"
    if version != SEGMENT_FORMAT_VERSION:
        return f"unsupported segment format version {version}"
    return int(first_lsn)
