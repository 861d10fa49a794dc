"""Reads and applies over one LMDB transaction (no locking, no threads).

A :class:`StoreView` wraps a read or write transaction.  The engine's writer
uses a write view both to read the current state while planning a change and
to apply the resulting mutations, so a batch sees its own earlier changes.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import lmdb

from memosd.errors import NotFound
from memosd.memcube import codec
from memosd.memcube.model import MemCube, MemoryItem, PurgeRecord, Usage
from memosd.scheduler.jobs import Job, decode_job, encode_job
from memosd.store import keys
from memosd.store.blobs import is_blob_ref
from memosd.store.decoded import DecodedItem, StoreCaches
from memosd.store.records import (
    CubeDrop,
    CubePut,
    GrantSet,
    ItemPurge,
    ItemPut,
    JobDelete,
    JobPut,
    Mutation,
    TokenDelete,
    TokenPut,
    VersionPut,
    encode_mutation,
)

__all__ = ["StoreView", "TokenRecord", "payload_blob_refs"]

_PER_ITEM_DBS = ("versions", "latest", "purges", "usage", "grants", "classes")
_CHANGE_KEY = struct.Struct(">QI")  # keys.pack_u64(lsn) + keys.pack_u32(index)
_OPEN_JOBS_INDEXED = b"open_jobs_indexed"  # meta key: the openjobs index is complete
_CLASSES_INDEXED = b"classes_indexed"  # meta key: the classes index is complete
_VERSION_1: Final = keys.pack_u32(1)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    name: str
    principal: str
    token_hash: bytes
    created_us: int


class HitCounts:
    """Search hits counted since the last usage flush, per cube:
    ``counts[cube][id]`` hits and ``last_us[cube][id]`` the latest one's time.

    Two maps of ints rather than one of ``(hits, last)`` tuples: a tuple per
    counted hit is a new object the cyclic GC tracks (3,050 searches of k=10
    in the daemon: 31-37 generation-0 collections instead of 45).  Not
    thread-safe: the engine holds its usage lock around it.
    """

    __slots__ = ("counts", "last_us")

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.last_us: dict[str, dict[str, int]] = {}

    def __bool__(self) -> bool:
        return bool(self.counts)

    def add(self, cube: str, item_ids: Iterable[str], at_us: int) -> None:
        """Count one hit of each of ``item_ids`` (repeats count again) at ``at_us``."""
        counts = self.counts.get(cube)
        if counts is None:
            counts = self.counts[cube] = {}
            last = self.last_us[cube] = {}
        else:
            last = self.last_us[cube]
        for item_id in item_ids:
            counts[item_id] = counts.get(item_id, 0) + 1
            last[item_id] = at_us


class StoreView:
    def __init__(
        self, txn: lmdb.Transaction, dbs: dict[str, Any], caches: StoreCaches | None = None
    ) -> None:
        self.txn = txn
        self.dbs = dbs
        # Decoded items and cubes by their bytes (memosd.store.decoded).
        self._caches = caches
        # Blobs whose last reference went away in this transaction; the
        # engine deletes their files once the transaction is committed.
        self.released_blobs: set[str] = set()
        # Blobs that gained a reference here (their writers' pins can go).
        self.referenced_blobs_added: set[str] = set()
        # Cubes seen to exist in this transaction (kept up to date by apply):
        # a batch of adds to one cube looks it up once, not once per add.
        self._cubes_present: set[str] = set()

    # -- meta ---------------------------------------------------------------------

    def applied_lsn(self) -> int:
        raw = self._get("meta", b"applied_lsn")
        return 0 if raw is None else keys.unpack_u64(raw)

    def set_applied_lsn(self, lsn: int) -> None:
        self.txn.put(b"applied_lsn", keys.pack_u64(lsn), db=self.dbs["meta"])

    # -- cubes --------------------------------------------------------------------

    def cube(self, name: str) -> MemCube | None:
        key = name.encode()
        raw = self._get("cubes", key)
        if raw is None:
            return None
        if self._caches is None:
            return codec.decode_cube(raw)
        cached = self._caches.cubes.get(key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        cube = codec.decode_cube(raw)
        self._caches.cubes.put(key, (raw, cube))
        return cube

    def require_cube(self, name: str) -> MemCube:
        cube = self.cube(name)
        if cube is None:
            raise NotFound(f"no cube named {name!r}")
        return cube

    def missing_item(self, cube: str, item_id: str) -> NotFound:
        """The error for an item that is not there: purged, or never was."""
        if self.purge_record(cube, item_id) is not None:
            return NotFound(f"item {item_id} was purged", reason="purged")
        return NotFound(f"no item {item_id} in cube {cube!r}")

    def has_cube(self, name: str) -> bool:
        if name in self._cubes_present:
            return True
        if self.txn.get(name.encode(), db=self.dbs["cubes"]) is None:
            return False
        self._cubes_present.add(name)
        return True

    def cubes(self) -> list[MemCube]:
        return [codec.decode_cube(value) for _, value in self._scan("cubes", b"")]

    # -- items --------------------------------------------------------------------

    def latest_version(self, cube: str, item_id: str) -> int | None:
        raw = self._get("latest", keys.item_key(cube, item_id))
        return None if raw is None else keys.unpack_u32(raw)

    def version(self, cube: str, item_id: str, version: int) -> MemoryItem | None:
        vkey = keys.version_key(cube, item_id, version)
        raw = self._get("versions", vkey)
        if raw is None:
            return None
        return self._decode_version(vkey, raw, self._get("usage", keys.item_key(cube, item_id)))

    def _decode_version(self, vkey: bytes, raw: bytes, usage_raw: bytes | None) -> MemoryItem:
        """The item of version record ``raw`` with usage record ``usage_raw`` merged in."""
        caches = self._caches
        entry = None if caches is None else caches.items.get(vkey)
        if entry is not None and entry.record == raw:
            if entry.usage_record == usage_raw:
                return entry.item
            base = entry.base
        else:
            base = codec.decode_item(raw)
        item = base if usage_raw is None else _replace_usage(base, _decode_usage(usage_raw))
        if caches is not None:
            caches.items.put(vkey, DecodedItem(raw, base, usage_raw, item))
        return item

    def latest(self, cube: str, item_id: str) -> MemoryItem | None:
        version = self.latest_version(cube, item_id)
        return None if version is None else self.version(cube, item_id, version)

    def latest_many(self, cube: str, item_ids: Iterable[str]) -> list[MemoryItem | None]:
        """``[self.latest(cube, i) for i in item_ids]`` in one loop (a search's hits).

        The ``latest`` record is the version number packed as in a version
        key, so the version key is the item key plus those bytes (no unpack
        and repack).  About a third less CPU than calling :meth:`latest` per
        id (ten cached items, measured here).
        """
        get = self.txn.get
        latest_db = self.dbs["latest"]
        versions_db = self.dbs["versions"]
        usage_db = self.dbs["usage"]
        prefix = keys.cube_prefix(cube)
        out: list[MemoryItem | None] = []
        for item_id in item_ids:
            ikey = prefix + item_id.encode()
            packed = get(ikey, db=latest_db)
            if packed is None:
                out.append(None)
                continue
            vkey = ikey + keys.SEP + bytes(packed)
            raw = get(vkey, db=versions_db)
            if raw is None:
                out.append(None)
                continue
            usage_raw = get(ikey, db=usage_db)
            usage = None if usage_raw is None else bytes(usage_raw)
            out.append(self._decode_version(vkey, bytes(raw), usage))
        return out

    def history(self, cube: str, item_id: str) -> list[MemoryItem]:
        prefix = keys.version_prefix(cube, item_id)
        usage_raw = self._get("usage", keys.item_key(cube, item_id))
        return [
            self._decode_version(key, value, usage_raw)
            for key, value in self._scan("versions", prefix)
        ]

    def iter_latest(
        self,
        cube: str,
        after: str | None = None,
        *,
        status: str | None = None,
        tier: str | None = None,
        form: str | None = None,
    ) -> Iterator[MemoryItem]:
        """Latest version of every item of ``cube`` in id order (ids > ``after``).

        With ``status``/``tier``/``form``, only the items that have them; the
        others are recognised from their record's fields without being built.
        """
        prefix = keys.cube_prefix(cube)
        start = keys.item_key(cube, after) + b"\x00" if after else prefix
        if status is not None and tier is not None and form is not None:
            # One class: read through the ``classes`` index, O(class) not O(cube).
            yield from self._iter_class(cube, after, status, tier, form)
            return
        wanted = (status, tier, form)
        filtered = wanted != (None, None, None)
        for key, value in self._scan("latest", prefix, start=start):
            vkey = key + keys.SEP + value  # = keys.version_key: "latest" holds the version
            raw = self._get("versions", vkey)
            if raw is None:
                continue
            if filtered and not _has_class(self._class_of(vkey, raw), wanted):
                continue
            yield self._decode_version(vkey, raw, self._get("usage", key))

    def _class_of(self, vkey: bytes, raw: bytes) -> tuple[str, str, str]:
        """(status, tier, form) of version record ``raw``: cached decode, else its fields."""
        entry = None if self._caches is None else self._caches.items.get(vkey)
        if entry is not None and entry.record == raw:
            return entry.base.status, entry.base.tier, entry.base.form
        return codec.decode_item_class(raw)

    def _iter_class(
        self, cube: str, after: str | None, status: str, tier: str, form: str
    ) -> Iterator[MemoryItem]:
        """Latest versions of the items in one (status, tier, form) class, in id order.

        Each entry is checked against the item it names, so a stale entry
        (none should exist) could only cost time, never list a wrong item.
        """
        prefix = keys.class_prefix(cube, status, tier, form)
        start = prefix + after.encode() + b"\x00" if after else prefix
        wanted = (status, tier, form)
        for key, _ in self._scan("classes", prefix, start=start):
            item = self.latest(cube, key[len(prefix) :].decode())
            if item is not None and (item.status, item.tier, item.form) == wanted:
                yield item

    def _record_class(self, vkey: bytes) -> tuple[str, str, str] | None:
        """(status, tier, form) of the stored version ``vkey``; None if it is not stored."""
        raw = self._get("versions", vkey)
        return None if raw is None else self._class_of(vkey, raw)

    def purge_record(self, cube: str, item_id: str) -> PurgeRecord | None:
        raw = self._get("purges", keys.item_key(cube, item_id))
        return None if raw is None else codec.decode_purge(raw)

    def purges(self, cube: str) -> list[PurgeRecord]:
        return [codec.decode_purge(v) for _, v in self._scan("purges", keys.cube_prefix(cube))]

    # -- usage (side data, not versioned, not WAL-logged) --------------------------------

    def usage(self, cube: str, item_id: str) -> Usage | None:
        raw = self._get("usage", keys.item_key(cube, item_id))
        return None if raw is None else _decode_usage(raw)

    def add_hits(self, pending: HitCounts, *, pause: Callable[[], None] | None = None) -> int:
        """Add counted search hits to the items' usage records (heat kept);
        hits of items gone since are dropped.

        The usage flush's loop (a busy search load counts thousands of items a
        second): keys in order, no ``Usage`` objects, one ``putmulti`` per
        slice of ids.  Ids are sorted as plain strings: sorting ``(cube, id)``
        tuples took 7-8 ms for 6,000 items here, in one C call that holds the
        GIL (a search waiting for it meanwhile); strings sort 10x faster.
        ``pause`` (if given) runs between two slices, outside any C call: the
        engine passes a GIL yield, so a long flush lets the request thread in
        (a flush of one slice, the common case, never pauses).
        Returns the number of records written.
        """
        latest_db, usage_db = self.dbs["latest"], self.dbs["usage"]
        get = self.txn.get
        written = 0
        sliced = False
        with self.txn.cursor(db=usage_db) as cur:
            for cube in sorted(pending.counts):
                counts, last = pending.counts[cube], pending.last_us[cube]
                prefix = keys.cube_prefix(cube)
                ids = sorted(counts)
                for start in range(0, len(ids), _HITS_PER_SLICE):
                    if sliced and pause is not None:
                        pause()
                    sliced = True
                    out: list[tuple[bytes, bytes]] = []
                    for item_id in ids[start : start + _HITS_PER_SLICE]:
                        key = prefix + item_id.encode()
                        if get(key, db=latest_db) is None:
                            continue
                        hits = counts[item_id]
                        raw = get(key, db=usage_db)
                        if raw is None:
                            record = _usage_record(hits, last[item_id], 0.0)
                        else:
                            old_hits, _, heat = _usage_fields(raw)
                            record = _usage_record(old_hits + hits, last[item_id], heat)
                        out.append((key, record))
                    if out:
                        cur.putmulti(out)
                        written += len(out)
        return written

    def put_usage(self, cube: str, item_id: str, usage: Usage) -> None:
        self.txn.put(
            keys.item_key(cube, item_id),
            _usage_record(usage.hits, usage.last_hit_us, usage.heat),
            db=self.dbs["usage"],
        )

    # -- access control ---------------------------------------------------------------

    def grants(self, cube: str) -> dict[str, str]:
        prefix = keys.cube_prefix(cube)
        return {
            key[len(prefix) :].decode(): value.decode()
            for key, value in self._scan("grants", prefix)
        }

    def token(self, name: str) -> TokenRecord | None:
        raw = self._get("tokens", name.encode())
        if raw is None:
            return None
        doc = codec.unpackb(raw)
        return TokenRecord(name, str(doc["principal"]), bytes(doc["hash"]), int(doc["created_us"]))

    def tokens(self) -> list[TokenRecord]:
        names = [key.decode() for key, _ in self._scan("tokens", b"")]
        return [t for t in (self.token(n) for n in names) if t is not None]

    def token_by_hash(self, token_hash: bytes) -> TokenRecord | None:
        name = self._get("tokenhash", token_hash)
        return None if name is None else self.token(name.decode())

    # -- applying mutations (write transactions only) -------------------------------------

    def apply(self, mutation: Mutation, payload: bytes | None = None) -> None:
        """Apply one resolved change.  Applying it twice leaves the same state.

        ``payload`` is the mutation's WAL payload when the caller already
        encoded it (for an item version it is exactly the stored record).
        """
        # Versions first, matched by type only (see engine._event_for).
        match mutation:
            case ItemPut():
                item = mutation.item
                if payload is None:
                    payload = encode_mutation(mutation)[1]
                self._put_version(
                    item.cube,
                    item.id,
                    item.version,
                    item.payload,
                    payload,
                    (item.status, item.tier, item.form),
                )
            case VersionPut():
                ref = mutation.keys
                if payload is None:
                    raise TypeError("a VersionPut is applied with its record")
                self._put_version(
                    ref.cube,
                    ref.id,
                    ref.version,
                    ref.payload,
                    payload,
                    (ref.status, ref.tier, ref.form),
                )
            case CubePut(cube):
                self.txn.put(cube.name.encode(), codec.encode_cube(cube), db=self.dbs["cubes"])
                self._cubes_present.add(cube.name)
            case CubeDrop(name):
                self._cubes_present.discard(name)
                self.txn.delete(name.encode(), db=self.dbs["cubes"])
                prefix = keys.cube_prefix(name)
                self._release_blobs_under("versions", prefix)
                for db_name in _PER_ITEM_DBS:
                    self._delete_prefix(db_name, prefix)
            case ItemPurge(record):
                key = keys.item_key(record.cube, record.id)
                self._drop_class(record.cube, record.id)
                self._release_blobs_under("versions", keys.version_prefix(record.cube, record.id))
                self._delete_prefix("versions", keys.version_prefix(record.cube, record.id))
                self.txn.delete(key, db=self.dbs["latest"])
                self.txn.delete(key, db=self.dbs["usage"])
                self.txn.put(key, codec.encode_purge(record), db=self.dbs["purges"])
            case GrantSet(cube, principal, level):
                key = keys.principal_key(cube, principal)
                if level is None:
                    self.txn.delete(key, db=self.dbs["grants"])
                else:
                    self.txn.put(key, level.encode(), db=self.dbs["grants"])
            case TokenPut(name, principal, token_hash, created_us):
                doc = {"principal": principal, "hash": token_hash, "created_us": created_us}
                self.txn.put(name.encode(), codec.packb(doc), db=self.dbs["tokens"])
                self.txn.put(token_hash, name.encode(), db=self.dbs["tokenhash"])
            case JobPut(job):
                self.txn.put(job.id.encode(), payload or encode_job(job), db=self.dbs["jobs"])
                self._index_open_job(job)
            case JobDelete(job_id, _):
                self.txn.delete(job_id.encode(), db=self.dbs["jobs"])
                self.txn.delete(job_id.encode(), db=self.dbs["openjobs"])
            case TokenDelete(name):
                existing = self.token(name)
                if existing is not None:
                    self.txn.delete(existing.token_hash, db=self.dbs["tokenhash"])
                self.txn.delete(name.encode(), db=self.dbs["tokens"])

    def _put_version(  # noqa: PLR0917 - the hot path: positional
        self,
        cube: str,
        item_id: str,
        version: int,
        item_payload: Any,
        record: bytes,
        cls: tuple[str, str, str],
    ) -> None:
        """Store a version; make it the latest if it is newer (and file the item
        under ``cls``, the version's (status, tier, form))."""
        # One LMDB call per write, not a lookup and a put: every py-lmdb call
        # releases the GIL, which costs a thread switch when other threads
        # wait for it (64 writers: their callers).  ``overwrite=False`` stores
        # the record only if the key is new and says whether it was.
        put = self.txn.put
        ikey = keys.item_key(cube, item_id)
        vkey = ikey + keys.SEP + keys.pack_u32(version)  # keys.version_key
        if not put(vkey, record, overwrite=False, db=self.dbs["versions"]):
            return  # replayed twice: versions are immutable
        for sha in payload_blob_refs(item_payload):
            self._add_blob_ref(sha, +1)
        if version == 1:
            # Any stored latest version is >= 1: keep it, else point at 1.
            if put(ikey, _VERSION_1, overwrite=False, db=self.dbs["latest"]):
                put(keys.class_key(cube, *cls, item_id), b"", db=self.dbs["classes"])
            return
        raw = self._get("latest", ikey)
        if raw is None or keys.unpack_u32(raw) < version:
            put(ikey, keys.pack_u32(version), db=self.dbs["latest"])
            old_cls = None if raw is None else self._record_class(ikey + keys.SEP + raw)
            if old_cls != cls:  # the usual update keeps its class: no page written
                if old_cls is not None:
                    self.txn.delete(keys.class_key(cube, *old_cls, item_id), db=self.dbs["classes"])
                put(keys.class_key(cube, *cls, item_id), b"", db=self.dbs["classes"])

    def _drop_class(self, cube: str, item_id: str) -> None:
        """Remove the item's ``classes`` entry (that of its latest version)."""
        raw = self._get("latest", keys.item_key(cube, item_id))
        if raw is None:
            return
        found = self._record_class(keys.item_key(cube, item_id) + keys.SEP + raw)
        if found is not None:
            self.txn.delete(keys.class_key(cube, *found, item_id), db=self.dbs["classes"])

    # -- the classes index ------------------------------------------------------------

    def classes_indexed(self) -> bool:
        return self._get("meta", _CLASSES_INDEXED) is not None

    def index_classes(self) -> int:
        """(Re)build the ``classes`` index from every item's latest version; returns its size.

        Stores written before the index existed get it once, at open.
        """
        self._delete_prefix("classes", b"")
        count = 0
        for key, value in self._scan("latest", b""):
            found = self._record_class(key + keys.SEP + value)
            if found is not None:
                cube, item_id = keys.split_item_key(key)
                self.txn.put(keys.class_key(cube, *found, item_id), b"", db=self.dbs["classes"])
                count += 1
        self.txn.put(_CLASSES_INDEXED, b"1", db=self.dbs["meta"])
        return count

    # -- jobs ---------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        raw = self._get("jobs", job_id.encode())
        return None if raw is None else decode_job(raw)

    def jobs(self) -> list[Job]:
        return [decode_job(value) for _, value in self._scan("jobs", b"")]

    def open_jobs(self) -> list[Job]:
        """Jobs not ended (queued or running), by id: read through the ``openjobs``
        index, so the cost does not grow with the ended jobs kept for retention."""
        out = []
        for key, _ in self._scan("openjobs", b""):
            raw = self._get("jobs", key)
            if raw is not None:
                out.append(decode_job(raw))
        return out

    def open_jobs_indexed(self) -> bool:
        return self._get("meta", _OPEN_JOBS_INDEXED) is not None

    def index_open_jobs(self) -> int:
        """(Re)build the ``openjobs`` index from every job record; returns its size.

        Stores written before the index existed get it once, at open.
        """
        self._delete_prefix("openjobs", b"")
        count = sum(self._index_open_job(job) for job in self.jobs())
        self.txn.put(_OPEN_JOBS_INDEXED, b"1", db=self.dbs["meta"])
        return count

    def _index_open_job(self, job: Job) -> bool:
        """Keep ``job`` in the ``openjobs`` index while it has not ended; True if it is in."""
        if job.terminal:
            self.txn.delete(job.id.encode(), db=self.dbs["openjobs"])
            return False
        self.txn.put(job.id.encode(), b"", db=self.dbs["openjobs"])
        return True

    # -- blob references and the change log ---------------------------------------------

    def blob_refcount(self, sha: str) -> int:
        raw = self._get("blobrefs", sha.encode())
        return 0 if raw is None else keys.unpack_u64(raw)

    def referenced_blobs(self) -> set[str]:
        return {key.decode() for key, _ in self._scan("blobrefs", b"")}

    def _add_blob_ref(self, sha: str, delta: int) -> None:
        count = self.blob_refcount(sha) + delta
        if delta > 0:
            self.referenced_blobs_added.add(sha)
        if count > 0:
            self.txn.put(sha.encode(), keys.pack_u64(count), db=self.dbs["blobrefs"])
            self.released_blobs.discard(sha)
        else:
            self.txn.delete(sha.encode(), db=self.dbs["blobrefs"])
            self.released_blobs.add(sha)

    def _release_blobs_under(self, db_name: str, prefix: bytes) -> None:
        for _, value in self._scan(db_name, prefix):
            for sha in payload_blob_refs(codec.decode_item_keys(value).payload):
                self._add_blob_ref(sha, -1)

    def record_change(self, lsn: int, index: int, change: list[Any]) -> None:
        """Change ``index`` of the record at ``lsn`` (an ATOMIC record has several)."""
        key = keys.pack_u64(lsn) + keys.pack_u32(index)
        self.txn.put(key, codec.packb(change), db=self.dbs["changes"])

    def record_changes(self, entries: Iterable[tuple[int, int, list[Any]]]) -> None:
        """Several :meth:`record_change` calls (the writer's hot path): one
        ``putmulti``, not a Python-level ``put`` per entry (~0.6 us each)."""
        key = _CHANGE_KEY.pack
        pack = codec.packb
        items = [(key(lsn, index), pack(change)) for lsn, index, change in entries]
        if len(items) < 4:  # (a lone writer) opening a cursor costs ~3 puts
            db = self.dbs["changes"]
            for k, v in items:
                self.txn.put(k, v, db=db)
        else:
            with self.txn.cursor(db=self.dbs["changes"]) as cur:
                cur.putmulti(items)

    def changes_since(self, after_lsn: int, limit: int) -> list[tuple[int, list[Any]]]:
        out: list[tuple[int, list[Any]]] = []
        for key, value in self._scan("changes", b"", start=keys.pack_u64(after_lsn + 1)):
            if len(out) >= limit:
                break
            out.append((keys.unpack_u64(key[:8]), codec.unpackb(value)))
        return out

    def prune_changes(self, up_to_lsn: int, limit: int | None = None) -> int:
        """Delete the change-log entries with LSN <= ``up_to_lsn``, oldest first;
        the LSN up to which the log is now pruned.

        With ``limit``, stop after about that many entries, at an LSN boundary
        (the entries of one ATOMIC record go together).
        """
        removed = 0
        last: int | None = None  # LSN of the last entry deleted
        with self.txn.cursor(db=self.dbs["changes"]) as cur:
            if not cur.first():
                return up_to_lsn
            while True:
                lsn = keys.unpack_u64(bytes(cur.key())[:8])
                if lsn > up_to_lsn:
                    break
                if limit is not None and removed >= limit and last is not None and lsn != last:
                    return last
                if not cur.delete():
                    break
                removed += 1
                last = lsn
                if not cur.key():
                    break
        return up_to_lsn

    def meta_u64(self, name: bytes) -> int | None:
        raw = self._get("meta", name)
        return None if raw is None else keys.unpack_u64(raw)

    def set_meta_u64(self, name: bytes, value: int) -> None:
        self.txn.put(name, keys.pack_u64(value), db=self.dbs["meta"])

    def consumer_lsns(self) -> dict[str, int]:
        prefix = b"consumer:"
        return {
            key[len(prefix) :].decode(): keys.unpack_u64(value)
            for key, value in self._scan("meta", prefix)
        }

    # -- helpers ----------------------------------------------------------------------

    def _get(self, db_name: str, key: bytes) -> bytes | None:
        value = self.txn.get(key, db=self.dbs[db_name])
        return None if value is None else bytes(value)

    def _scan(
        self, db_name: str, prefix: bytes, *, start: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Key/value pairs whose key starts with ``prefix``, from ``start`` on."""
        with self.txn.cursor(db=self.dbs[db_name]) as cur:
            if not cur.set_range(start if start is not None else prefix):
                return
            for key, value in cur:
                key_bytes = bytes(key)
                if not key_bytes.startswith(prefix):
                    return
                yield key_bytes, bytes(value)

    def _delete_prefix(self, db_name: str, prefix: bytes) -> None:
        with self.txn.cursor(db=self.dbs[db_name]) as cur:
            if not cur.set_range(prefix):
                return
            while bytes(cur.key()).startswith(prefix):
                if not cur.delete():
                    break


def _has_class(found: tuple[str, str, str], wanted: tuple[str | None, ...]) -> bool:
    """Whether ``found`` (status, tier, form) matches ``wanted`` (None: any)."""
    return all(w is None or w == f for f, w in zip(found, wanted, strict=True))


_HITS_PER_SLICE: Final = 64  # usage records per putmulti / pause in add_hits


def _usage_record(hits: int, last_hit_us: int | None, heat: float) -> bytes:
    """A ``usage`` DB value (``_decode_usage`` reads it)."""
    return codec.packb([hits, last_hit_us, heat])


def _usage_fields(raw: bytes | memoryview) -> tuple[int, int | None, float]:
    """A ``usage`` DB value's (hits, last hit us, heat), without a ``Usage``."""
    hits, last_hit_us, heat = codec.unpackb(raw)
    return int(hits), last_hit_us, float(heat)


def _decode_usage(raw: bytes) -> Usage:
    hits, last_hit_us, heat = _usage_fields(raw)
    return Usage(hits=hits, last_hit_us=last_hit_us, heat=heat)


# MemoryItem's slots (member descriptors): _replace_usage copies an item field
# by field without the frozen dataclass's __init__ (object.__setattr__ per
# field), which dataclasses.replace goes through.
_ITEM_FIELDS: Final = tuple(MemoryItem.__dataclass_fields__)
_ITEM_VALUES: Final = operator.attrgetter(*_ITEM_FIELDS)
_ITEM_SETTERS: Final = tuple(MemoryItem.__dict__[name].__set__ for name in _ITEM_FIELDS)
_SET_USAGE: Final = MemoryItem.__dict__["usage"].__set__


def _replace_usage(item: MemoryItem, usage: Usage | None) -> MemoryItem:
    """``dataclasses.replace(item, usage=usage or Usage())``, about 3x cheaper.

    Every read of an item whose hits changed since it was decoded merges its
    usage record this way (a search's hits, each time the counts are flushed).
    """
    merged: MemoryItem = object.__new__(MemoryItem)
    for set_field, value in zip(_ITEM_SETTERS, _ITEM_VALUES(item), strict=True):
        set_field(merged, value)
    _SET_USAGE(merged, usage if usage is not None else Usage())
    return merged


def payload_blob_refs(payload: Any) -> list[str]:
    """Blob shas named by an item payload's ``"blobs"`` (a map or a list)."""
    if not payload:
        return []
    blobs = payload.get("blobs")
    if isinstance(blobs, dict):
        values: list[Any] = list(blobs.values())
    elif isinstance(blobs, list):
        values = blobs
    else:
        return []
    return sorted({v for v in values if is_blob_ref(v)})
