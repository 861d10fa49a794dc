"""Index snapshots on disk: per-cube files plus one manifest, all at one LSN.

Layout under ``<data_dir>/index/``::

    MANIFEST                  msgpack [body: bytes, sha256(body): bytes]
    <cube>/<gen>.faiss        faiss.write_index of the cube's IndexIDMap2 (absent if no dense)
    <cube>/<gen>.labels.npy   int64 labels, one per indexed item (numpy .npy, no pickle)
    <cube>/<gen>.items.msgpack {"ids": [item id...], "versions": [int...], "next_label": int,
                               "sessions": [str | None...], "digests": [int...]}
                              (row-aligned with labels.npy; "digests" are the indexed
                              texts' text_digest, absent before 2026-12-04: 0, unknown)
    <cube>/<gen>.bm25.msgpack BM25Index.to_state() (packed arrays since 2026-12; the
                              per-document term lists written before are still read)

``body`` is the msgpack map::

    {"format": 1, "lsn": int, "model": str, "dim": int, "written_us": int,
     "cubes": {name: {"gen": str, "items": int, "files": {file name: sha256 hex}}}}

Every cube's files reflect the index state when the indexer had applied all
changes up to ``lsn`` (cubes untouched since an earlier snapshot keep their
older files: nothing changed them since).  Writing: each new file goes to a
``.tmp`` name, is fsynced and renamed; then the manifest likewise; then the
directory is fsynced and files no manifest names are deleted.  A crash at any
point leaves the previous manifest and its files intact.

Reading: the manifest's own checksum, then each file's, are verified; a
cube whose files fail is reported so the caller rebuilds just that cube.
Only msgpack, .npy (``allow_pickle=False``) and faiss's own format are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np
import structlog

from memosd.errors import CorruptionError
from memosd.index.bm25 import BM25Index
from memosd.index.cube import CubeIndex
from memosd.index.dense import DenseIndex

__all__ = ["FORMAT", "LoadedSnapshot", "load_snapshot", "write_snapshot"]

FORMAT: Final = 1
MANIFEST: Final = "MANIFEST"
_log = structlog.get_logger("memosd.index.snapshot")


@dataclass(slots=True)
class LoadedSnapshot:
    lsn: int
    cubes: dict[str, CubeIndex] = field(default_factory=dict)
    #: cube name -> why its files could not be used (rebuild these)
    failed: dict[str, str] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> str:
    """fsync ``tmp``, rename it to ``final``; return its sha256."""
    _fsync_file(tmp)
    os.replace(tmp, final)
    return _sha256_file(final)


def _write_bytes(path: Path, data: bytes) -> str:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    return _publish(tmp, path)


def _write_cube(root: Path, cube: CubeIndex, gen: str) -> dict[str, Any]:
    cube_dir = root / cube.name
    cube_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    # The indexer's worker writes snapshots between batches and is the only
    # thread that changes a cube's index, so the state is read without the
    # lock (searches, which only read, go on; at 1M items this takes ~1 s).
    # Only folding BM25's tail in swaps arrays, under the lock.
    cube.maintain_bm25(merge_only=True)
    labels = np.fromiter(
        (entry[0] for entry in cube.by_item.values()), dtype=np.int64, count=len(cube.by_item)
    )
    ids = list(cube.by_item)
    items = {
        "ids": ids,
        "versions": [entry[1] for entry in cube.by_item.values()],
        "next_label": cube.next_label,
        "sessions": [cube.session_of.get(item_id) for item_id in ids],
        "digests": [entry[2] for entry in cube.by_item.values()],
    }
    bm25 = msgpack.packb(cube.bm25.to_state(), use_bin_type=True)
    cube.dirty = False
    name = f"{gen}.labels.npy"
    tmp = cube_dir / (name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, labels, allow_pickle=False)
    files[name] = _publish(tmp, cube_dir / name)
    name = f"{gen}.items.msgpack"
    files[name] = _write_bytes(cube_dir / name, msgpack.packb(items, use_bin_type=True))
    name = f"{gen}.bm25.msgpack"
    files[name] = _write_bytes(cube_dir / name, bm25)
    if cube.dense is not None:
        name = f"{gen}.faiss"
        tmp = cube_dir / (name + ".tmp")
        cube.dense.write(str(tmp))
        files[name] = _publish(tmp, cube_dir / name)
    _fsync_dir(cube_dir)
    return {"gen": gen, "items": len(ids), "files": files}


def write_snapshot(
    root: Path,
    cubes: Mapping[str, CubeIndex],
    *,
    lsn: int,
    model: str,
    dim: int,
    previous: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Persist every dirty cube (and reuse ``previous`` entries of clean ones).

    Must run while no other thread mutates ``cubes`` (the indexer's worker
    calls it between batches).  Returns the manifest's cube entries.
    """
    root.mkdir(parents=True, exist_ok=True)
    gen = f"{lsn:020d}-{time.time_ns():x}"
    entries: dict[str, dict[str, Any]] = {}
    for name, cube in cubes.items():
        old = (previous or {}).get(name)
        if old is not None and not cube.dirty:
            entries[name] = old
        else:
            entries[name] = _write_cube(root, cube, gen)
    body = msgpack.packb(
        {
            "format": FORMAT,
            "lsn": lsn,
            "model": model,
            "dim": dim,
            "written_us": time.time_ns() // 1000,
            "cubes": entries,
        },
        use_bin_type=True,
    )
    manifest = msgpack.packb([body, hashlib.sha256(body).digest()], use_bin_type=True)
    _write_bytes(root / MANIFEST, manifest)
    _fsync_dir(root)
    _remove_unreferenced(root, entries)
    return entries


def _remove_unreferenced(root: Path, entries: Mapping[str, dict[str, Any]]) -> None:
    for child in root.iterdir():
        if child.name == MANIFEST:
            continue
        if child.is_dir():
            keep = set(entries.get(child.name, {}).get("files", {}))
            for f in child.iterdir():
                if f.name not in keep:
                    with contextlib.suppress(OSError):
                        f.unlink()
            if not keep:
                with contextlib.suppress(OSError):
                    child.rmdir()
        elif child.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                child.unlink()


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The verified manifest body, None if there is none; CorruptionError if damaged."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        body, digest = msgpack.unpackb(path.read_bytes(), raw=False)
        if hashlib.sha256(body).digest() != digest:
            raise CorruptionError("index manifest checksum mismatch")
        manifest: dict[str, Any] = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except CorruptionError:
        raise
    except Exception as exc:
        raise CorruptionError(f"index manifest unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CorruptionError(f"index manifest format {manifest.get('format')!r} unknown")
    return manifest


def _load_cube(
    root: Path, name: str, entry: dict[str, Any], dense_settings: dict[str, Any]
) -> CubeIndex:
    cube_dir = root / name
    files: dict[str, str] = entry["files"]
    for fname, digest in files.items():
        path = cube_dir / fname
        if not path.exists():
            raise CorruptionError(f"missing {fname}")
        if _sha256_file(path) != digest:
            raise CorruptionError(f"checksum mismatch in {fname}")
    gen = entry["gen"]
    with (cube_dir / f"{gen}.labels.npy").open("rb") as f:
        labels = np.load(f, allow_pickle=False)
    items = msgpack.unpackb((cube_dir / f"{gen}.items.msgpack").read_bytes(), raw=False)
    bm25 = BM25Index.from_state(
        msgpack.unpackb(
            (cube_dir / f"{gen}.bm25.msgpack").read_bytes(), raw=False, strict_map_key=False
        )
    )
    dense: DenseIndex | None = None
    if f"{gen}.faiss" in files:
        dense = DenseIndex.load(
            str(cube_dir / f"{gen}.faiss"), (int(x) for x in labels), **dense_settings
        )
    cube = CubeIndex(name, dense=dense, bm25=bm25)
    digests = items.get("digests")  # absent in snapshots of older releases: unknown
    if digests is None:
        digests = [0] * len(items["ids"])
    rows = zip(labels, items["ids"], items["versions"], digests, strict=True)
    for label, item_id, version, digest in rows:
        cube.by_item[str(item_id)] = (int(label), int(version), int(digest))
        cube.by_label[int(label)] = str(item_id)
    cube.next_label = int(items["next_label"])
    sessions = items.get("sessions")  # absent in snapshots of older releases
    if sessions is not None:
        for item_id, raw in zip(items["ids"], sessions, strict=True):
            if raw is not None:
                session = sys.intern(str(raw))  # one string per session, not one per item
                cube.session_of[str(item_id)] = session
                cube.sessions.setdefault(session, []).append(str(item_id))
        for members in cube.sessions.values():
            members.sort()
    cube.dirty = False
    if len(bm25) != len(cube.by_item) or (dense is not None and len(dense) != len(cube.by_item)):
        raise CorruptionError("index parts disagree on the number of items")
    return cube


def load_snapshot(
    root: Path, *, model: str, dim: int, dense_settings: dict[str, Any]
) -> LoadedSnapshot | None:
    """The snapshot under ``root``; None if absent, unusable, or of another model."""
    try:
        manifest = read_manifest(root)
    except CorruptionError as exc:
        _log.warning("index snapshot manifest unusable; full rebuild", error=str(exc))
        return None
    if manifest is None:
        return None
    if manifest.get("model") != model or manifest.get("dim") != dim:
        _log.warning(
            "index snapshot was built with another embedding model; full rebuild",
            snapshot_model=manifest.get("model"),
            snapshot_dim=manifest.get("dim"),
            model=model,
            dim=dim,
        )
        return None
    loaded = LoadedSnapshot(lsn=int(manifest["lsn"]))
    for name, entry in manifest["cubes"].items():
        try:
            loaded.cubes[name] = _load_cube(root, name, entry, dense_settings)
            loaded.entries[name] = entry
        except Exception as exc:
            loaded.failed[name] = str(exc)
            _log.warning(
                "index snapshot of a cube unusable; rebuilding it", cube=name, error=str(exc)
            )
    return loaded
