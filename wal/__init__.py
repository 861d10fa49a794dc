"""The memosd write-ahead log.

Promise: a record whose append returned (it is *acknowledged*) is never
lost, and a crash never leaves a half-written record visible.

On-disk format
==============

A log is one directory holding *segment* files, plus a ``cut/`` folder for
bytes removed by recovery.  Any other file is ignored.

Segment files
-------------
Named ``<first_lsn>.wal`` with the LSN as 20 zero-padded decimal digits
(``00000000000000000001.wal``), so name order is LSN order.  Each starts with
a 20-byte header, little-endian::

    offset  size  field
    0       4     magic      b"MWAL"
    4       2     version    u16, currently 1
    6       2     flags      u16, 0 (reserved)
    8       8     first_lsn  u64, must equal the LSN in the file name
    16      4     crc32c     u32, CRC32C of bytes 0..16

Records follow back to back, nothing between them::

    0       4     payload_length  u32 (at most 64 MiB)
    4       4     crc32c          u32, CRC32C of length|lsn|type|payload
    8       8     lsn             u64
    16      1     record_type     u8
    17      n     payload

The last segment may end in *zero fill*: zero bytes written ahead of the
records, which later records overwrite (see below).  Other segments end
exactly after their last record.

The CRC covers the header fields too, so a damaged length, LSN or type is
detected like a damaged payload byte.  The length cap means a damaged length
can never make recovery allocate or skip gigabytes.  LSNs start at 1 and
increase by exactly 1 across the whole log: the first record of a segment
has the header's ``first_lsn``, and each segment starts right after the last
record of the previous one.

What is fsynced when
--------------------
* An append (a group-commit batch: any number of records from any number of
  threads) is one positional ``write`` at the end of the records, then one
  ``fdatasync`` of the segment.  Callers are released only after that
  fdatasync returned.  Only one batch is in flight at a time, so at any
  moment at most one unsynced write exists.  A caller that has work to do
  before the fdatasync (``append_batch(while_syncing=...)``: the storage
  engine's change log) first starts the write-out of the batch
  (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, a hint that makes nothing
  durable), so the device writes while it works; the fdatasync then only
  waits for the rest.
* Zero fill: when a batch would end past the end of the file, the same
  write carries zeros after it, as many as the segment already holds (64 KiB
  to 1 MiB, never past ``segment_bytes``), synced by the same fdatasync.
  The next batches overwrite those zeros, so their fdatasyncs change no file
  size: the filesystem has no metadata to journal, which on ext4 makes each
  one cheaper and keeps it from also flushing other files' newly allocated
  blocks (the LMDB store's).  About one fdatasync per MiB of log still
  extends the file.
* A new segment (first open, or rotation when the active segment has grown
  past ``segment_bytes``) is created, its header written and fdatasynced,
  and then the *directory* is fsynced, all before any record goes in.  So
  a segment holding records always has a durable name and header.  A batch
  is never split across segments: rotation happens before a batch.
* Removing segments (checkpoint) fsyncs the directory after each removal,
  oldest first, so a crash leaves a prefix of them deleted, never a hole.
* Recovery fsyncs the directory before the log is used, so the names it
  recovered from are durable even if the previous run died before its
  directory fsync.  When open creates the log directory (and any missing
  parents), it fsyncs the parent of each level it created.

Torn tail versus corruption
---------------------------
Recovery scans every segment in order.  At the first byte range that is not a
valid record (too short, length over the cap or past the end, CRC mismatch):

* if every byte from there to the end is zero, in the *last* segment: that
  is **zero fill** (or an interrupted append none of whose bytes reached the
  disk).  Nothing is cut; the next record is written at that offset.  In any
  other segment it is corruption (rotation removes the fill first, below).

Otherwise it searches the rest of the segment for any CRC-valid record with
the next expected LSN or a later one:

* none found, in the *last* segment: a **torn tail**: the remains of the
  one unsynced append that was interrupted.  It was never acknowledged, so
  cutting it loses nothing.  A last segment whose header is torn (rotation
  interrupted before the header sync) is the same case at offset 0.
* found, or in any segment but the last: **corruption** of data that was
  once complete.  :class:`~memosd.errors.WalCorruptionError` is raised with
  segment name, offset and LSN; it is never skipped silently.  A CRC-valid
  record with the wrong LSN (gap, repeat), a header whose valid CRC names
  the wrong first LSN, or a gap between segments are corruption too.

Limitations, both deliberate.  Damage to the very last record of the log
looks exactly like a torn tail and is cut (as in etcd and others): a checksum
cannot tell a flipped bit in a synced record from an unsynced one.  And the
search accepts *any* later valid record (LSN >= expected), not only the next
one: a lost sector spanning several synced records must never be mistaken
for a torn tail and silently cut.  The price is that a power cut which
persisted non-contiguous sectors of the final write (a hole, then valid
records of that same unacknowledged batch) is reported as corruption; the
log then refuses to open rather than guess, and ``verify`` shows where.

Repairing a torn tail
---------------------
First the cut bytes (up to the end of the file, zero fill included) are
copied to ``cut/<segment-name>.<offset>.torn``,
fdatasynced, and ``cut/`` fsynced, so the evidence is durable.  Then the
segment is truncated to ``offset`` and fdatasynced (a torn header is
rewritten instead).  A crash between the two steps just repeats the repair
on the next open (overwriting the same copy; a later torn tail at the very
same segment and offset also overwrites an older copy).  ``recovery``
reports the number of bytes cut and the copy's path.

Failures
--------
If a write or fdatasync fails, the log is poisoned: the failing call and
every later append raise (:class:`~memosd.errors.DiskFullError` for
ENOSPC/EDQUOT, :class:`~memosd.errors.WalFailedError` otherwise, original
errno in ``details``).  An fsync is never retried: after a failed fsync
the kernel may have dropped the dirty pages.  Records of the failed batch
are not acknowledged; the log truncates them away (best effort) so that a
restart without power loss does not resurrect them.

Closing
-------
``close()`` lets records that already have an LSN reach the disk (their
callers are waiting), then refuses new appends and closes the file.

Checkpoints
-----------
Rotation first truncates the old segment's zero fill and fdatasyncs it, so
a segment with a successor never ends in zeros.

``checkpoint(applied_lsn)`` deletes whole segments whose records are all
``<= applied_lsn`` (segment i is all below segment i+1's ``first_lsn``).
The active (last) segment is never deleted; if it is itself entirely
applied and full, the log rotates first so it can go on the next call.
``replay(after_lsn)`` below the oldest retained LSN raises
:class:`~memosd.errors.CorruptionError` (reason ``wal_records_checkpointed``).

Modules: :mod:`.framing` (pure byte layout and scan rules),
:mod:`.fileio` (injectable I/O, fault injection), :mod:`.simdisk`
(in-memory disk with power-loss images), :mod:`.log` (the log).
"""

from __future__ import annotations

from .fileio import CountingFileIO, FaultyFileIO, FileIO, OsFileIO
from .framing import (
    MAX_PAYLOAD_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    ScanEnd,
    SegmentScan,
    WalRecord,
    encode_record,
    encode_segment_header,
    scan_segment,
    segment_name,
)
from .log import (
    DEFAULT_SEGMENT_BYTES,
    RecoveryReport,
    SegmentReport,
    VerifyReport,
    WriteAheadLog,
    verify_directory,
)
from .simdisk import SimulatedDisk

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "MAX_PAYLOAD_BYTES",
    "RECORD_HEADER_SIZE",
    "SEGMENT_HEADER_SIZE",
    "CountingFileIO",
    "FaultyFileIO",
    "FileIO",
    "OsFileIO",
    "RecoveryReport",
    "ScanEnd",
    "SegmentReport",
    "SegmentScan",
    "SimulatedDisk",
    "VerifyReport",
    "WalRecord",
    "WriteAheadLog",
    "encode_record",
    "encode_segment_header",
    "scan_segment",
    "segment_name",
    "verify_directory",
]
