"""The LMDB store: the applied state of memosd, kept in step with the WAL.

Theory of operation
===================

The write-ahead log (``memosd.wal``) is the source of truth for what has been
acknowledged.  LMDB holds the *applied* state that reads are served from.  The
engine's single writer thread applies every WAL batch to LMDB in one write
transaction that also records the batch's last LSN under ``meta/applied_lsn``;
replay after a crash skips records at or below it, so replay is idempotent.

Files in ``<data_dir>/store/``:

``data.mdb``, ``lock.mdb``
    The LMDB environment.  It is opened with ``sync=False, metasync=False``:
    a commit writes pages to the page cache and nothing is fsynced, because the
    WAL already made the batch durable.  This is what lets one writer run at
    the raw ``fdatasync`` rate instead of half of it (see docs/benchmarks.md).
    The writer keeps the file written with zeros a few MiB past LMDB's last
    page (``LmdbEnv._fill_ahead``), so commits overwrite inside the file
    instead of extending it; LMDB ignores the file's size.

``checkpoint``
    A small msgpack file, replaced atomically (tmp → fsync → rename → fsync
    dir).  It records the last checkpoint: applied LSN, LMDB txn id, the boot
    id of the kernel that wrote it, whether the daemon shut down cleanly, and
    a byte copy of both LMDB meta pages as they were right after the
    checkpoint's ``env.sync()``.

Named databases (keys are bytes; ``\\x00`` separates parts, cube names and
principals cannot contain it, item ids are 26-character ULIDs)::

    meta      b"applied_lsn" -> u64 big-endian
    cubes     cube                       -> codec.encode_cube
    versions  cube \\0 id \\0 u32be(ver)  -> codec.encode_item   (every version)
    latest    cube \\0 id                 -> u32be(latest version)
    purges    cube \\0 id                 -> codec.encode_purge  (no content)
    grants    cube \\0 principal          -> b"read" | b"write"
    tokens    name                       -> msgpack {principal, hash, created_us}
    tokenhash sha256(secret)             -> name
    usage     cube \\0 id                 -> msgpack [hits, last_hit_us, heat]
    blobrefs  sha256 hex                 -> u64 number of stored versions referencing it
    changes   u64be(lsn) u32be(index)    -> msgpack [kind, cube, item_id, version, operation]
    jobs      job id                     -> scheduler.jobs.encode_job (durable job state)
    openjobs  job id                     -> b""  (jobs not ended yet)
    classes   cube \\0 status \\0 tier \\0 form \\0 id -> b""  (each item under its
              latest version's class: tier scans read one class, not the cube)

``meta`` also holds ``consumer:<name>`` (the LSN a derived index has durably
processed, see ``Engine.set_consumer_lsn``), ``changes_horizon`` (the
highest LSN pruned from ``changes``) and the marks that ``openjobs`` and
``classes`` are complete (a store written before them gets them built once,
at open).

Blob files live beside the store in ``<data_dir>/blobs`` (``memosd.store.blobs``).

Why relaxed LMDB sync is safe on power loss
===========================================

After ``kill -9`` the page cache survives, so LMDB is exactly as the dead
process left it.  After a power loss it is not: unsynced pages may be lost or
half written, and LMDB's newest meta page may point at pages that never
reached the disk.  Two rules make that recoverable:

1. **Pinned checkpoint snapshot.**  After each checkpoint (``env.sync()``)
   the engine keeps a read transaction open on that snapshot until the next
   checkpoint is durable.  LMDB never reuses a page that an open reader can
   see, so every page of the checkpointed tree stays byte-identical on disk.
2. **Meta-page rollback.**  At open, if the checkpoint file was written under
   a different boot id and the last shutdown was not clean, the machine went
   down with unsynced LMDB pages.  Both meta pages are overwritten with the
   copies saved at the checkpoint, which makes LMDB open exactly the
   checkpointed (intact) tree; the WAL, which still holds every record after
   the checkpoint LSN, is then replayed on top.

WAL segments are deleted only after the checkpoint file that covers them is
durable, and the old pin is released only after that too.  Periodic
checkpoints capture the snapshot (txn id, meta pages, new pin) between two
commits and run ``env.sync()`` and the file write beside the writer
(``LmdbEnv.begin_checkpoint``): pages written after the capture may or may not
be synced by it, which is fine because the captured meta pages never point at
them.
"""

from __future__ import annotations
