"""Content-addressed blob files: KV-cache chunks, LoRA adapters, other tensors.

Layout: ``<data_dir>/blobs/<sha[:2]>/<sha>`` where ``sha`` is the sha256 hex
digest of the content; partially written files live in ``blobs/tmp/`` only.
A blob is made durable (write tmp → fsync → rename → fsync dir) *before* the
WAL record that references it, so a replayed record never points at a
missing file.  Reference counts live in LMDB (``blobrefs``) and are kept by
the engine; this module only does file I/O.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from memosd.errors import BadRequest, DiskFullError, NotFound, StorageError

__all__ = ["BlobStore", "is_blob_ref"]

_SHA_RE: Final = re.compile(r"[0-9a-f]{64}")
_CHUNK: Final = 1 << 20


def is_blob_ref(value: object) -> bool:
    return isinstance(value, str) and _SHA_RE.fullmatch(value) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full while {what}")
    return StorageError(f"I/O error while {what}: {exc}")


class BlobStore:
    def __init__(self, directory: Path, *, pin_s: float = 600.0) -> None:
        self.directory = directory
        # sha -> monotonic time of its last put: a writer that just stored (or
        # found) a blob is about to reference it, so releasing must not delete it.
        self._pin_s = pin_s
        self._pins: dict[str, float] = {}
        self._pins_lock = threading.Lock()
        self._tmp = directory / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Leftovers of writers that died mid-write are never referenced.
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, sha: str) -> Path:
        self._check(sha)
        path = self._final_path(sha)
        if not path.exists():
            raise NotFound(f"blob {sha} does not exist", reason="blob_missing")
        return path

    def exists(self, sha: str) -> bool:
        self._check(sha)
        return self._final_path(sha).exists()

    def read(self, sha: str) -> bytes:
        return self.path(sha).read_bytes()

    def put_bytes(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data`` durably; returns its sha256 hex.  Idempotent."""
        sha = hashlib.sha256(data).hexdigest()
        self._pin(sha)
        if self._final_path(sha).exists():
            return sha
        tmp = self._tmp / f"{sha}.{os.getpid()}.{time.monotonic_ns()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self._install(tmp, sha)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _storage_error(exc, "writing a blob") from exc
        return sha

    def put_file(self, source: Path) -> str:
        """Copy a finished file in (streaming); returns its sha256 hex."""
        digest = hashlib.sha256()
        tmp = self._tmp / f"file.{os.getpid()}.{time.monotonic_ns()}"
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            sha = digest.hexdigest()
            self._pin(sha)
            if self._final_path(sha).exists():
                tmp.unlink()
                return sha
            self._install(tmp, sha)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _storage_error(exc, "writing a blob") from exc
        return sha

    def _pin(self, sha: str) -> None:
        now = time.monotonic()
        with self._pins_lock:
            self._pins[sha] = now
            if len(self._pins) > 4096:
                cutoff = now - self._pin_s
                self._pins = {k: t for k, t in self._pins.items() if t >= cutoff}

    def unpin(self, shas: Iterable[str]) -> None:
        """The writers of these blobs have committed their references."""
        with self._pins_lock:
            for sha in shas:
                self._pins.pop(sha, None)

    def is_pinned(self, sha: str) -> bool:
        with self._pins_lock:
            put_at = self._pins.get(sha)
        return put_at is not None and time.monotonic() - put_at < self._pin_s

    def release(self, sha: str) -> bool:
        """Delete a blob whose last reference went away, unless a writer just put it.

        A pinned blob stays; the start-up/checkpoint GC removes it later if
        nothing ends up referencing it.
        """
        if self.is_pinned(sha):
            return False
        return self.delete(sha)

    def delete(self, sha: str) -> bool:
        self._check(sha)
        path = self._final_path(sha)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            _fsync_dir(path.parent)
        return True

    def iter_blobs(self) -> Iterator[tuple[str, float]]:
        """(sha, mtime) of every stored blob."""
        for shard in self.directory.iterdir():
            if shard.name == "tmp" or not shard.is_dir():
                continue
            for entry in shard.iterdir():
                if is_blob_ref(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        yield entry.name, entry.stat().st_mtime

    def total_bytes(self) -> int:
        return sum(self._final_path(sha).stat().st_size for sha, _ in self.iter_blobs())

    def _install(self, tmp: Path, sha: str) -> None:
        final = self._final_path(sha)
        shard_new = not final.parent.exists()
        final.parent.mkdir(exist_ok=True)
        if shard_new:
            _fsync_dir(self.directory)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def _final_path(self, sha: str) -> Path:
        return self.directory / sha[:2] / sha

    @staticmethod
    def _check(sha: str) -> None:
        if not is_blob_ref(sha):
            raise BadRequest(f"not a blob reference (sha256 hex): {sha!r}", reason="bad_blob_ref")
