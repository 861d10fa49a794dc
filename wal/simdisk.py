"""An in-memory filesystem that can lose power.

``kill -9`` cannot test a WAL: the page cache survives the process, so every
``write`` that returned is still there on restart.  Power loss is different:
only what an ``fdatasync`` made durable is guaranteed, and a new name in a
directory is only guaranteed after an fsync of that directory.  This module
models exactly that difference:

* per file, the *durable* bytes (as of the last fdatasync) and the list of
  writes and truncations made since (still in the "page cache");
* per directory, the durable entries and the create/rename/remove operations
  made since the last fsync of that directory.

:meth:`SimulatedDisk.crash_image` draws one possible state after a power cut:
durable data is kept, every unsynced write is independently dropped, kept,
torn at a random byte, torn with the rest zero-filled, or zeroed, and every
unsynced directory operation is applied or not.  With history recording on,
:meth:`SimulatedDisk.all_crash_points` replays a finished run step by step so
a test can crash it after every single operation.
"""

from __future__ import annotations

import errno
import posixpath
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SimulatedDisk"]

_ROOT = "/"


@dataclass
class _Inode:
    durable: bytearray = field(default_factory=bytearray)
    current: bytearray = field(default_factory=bytearray)
    # ("write", offset, data) or ("truncate", size), oldest first, since the last sync.
    pending: list[tuple[Any, ...]] = field(default_factory=list)


def _norm(path: str) -> str:
    return posixpath.normpath(posixpath.join(_ROOT, str(path)))


def _not_found(path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "No such file or directory", path)


class SimulatedDisk:
    """A thread-safe in-memory :class:`~memosd.wal.fileio.FileIO` with power-loss images."""

    def __init__(
        self,
        *,
        record_history: bool = False,
        files: dict[str, bytes] | None = None,
        dirs: set[str] | None = None,
    ) -> None:
        """An empty disk, or one whose ``files``/``dirs`` are already durable."""
        self._lock = threading.Lock()
        # The durable starting state, so all_crash_points can replay from it.
        self._base_files = dict(files or {})
        self._base_dirs = {_ROOT, *(_norm(d) for d in dirs or ())}
        self._files: dict[str, _Inode] = {}
        for path, content in self._base_files.items():
            self._files[_norm(path)] = _Inode(bytearray(content), bytearray(content))
        self._durable_files: dict[str, _Inode] = dict(self._files)
        self._dirs: set[str] = set(self._base_dirs)
        self._durable_dirs: set[str] = set(self._base_dirs)
        # (parent directory, operation tuple) not yet made durable by fsync_dir.
        self._pending_dir_ops: list[tuple[str, tuple[Any, ...]]] = []
        self._fds: dict[int, _Inode] = {}
        self._next_fd = 3  # deterministic, so a replay hands out the same numbers
        self._history: list[tuple[str, tuple[Any, ...]]] | None = [] if record_history else None

    # --- bookkeeping ---------------------------------------------------------

    @property
    def step(self) -> int:
        """How many mutating operations have run (the crash-point counter)."""
        with self._lock:
            return len(self._history) if self._history is not None else 0

    def _record(self, op: str, *args: Any) -> None:
        if self._history is not None:
            self._history.append((op, args))

    def _inode(self, path: str) -> _Inode:
        inode = self._files.get(path)
        if inode is None:
            raise _not_found(path)
        return inode

    def _fd(self, fd: int) -> _Inode:
        inode = self._fds.get(fd)
        if inode is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return inode

    def _new_fd(self, inode: _Inode) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = inode
        return fd

    def _link_new(self, path: str) -> _Inode:
        parent = posixpath.dirname(path)
        if parent not in self._dirs:
            raise _not_found(path)
        inode = _Inode()
        self._files[path] = inode
        self._pending_dir_ops.append((parent, ("link", path, inode)))
        return inode

    # --- FileIO ----------------------------------------------------------------

    def open_write(self, path: str) -> int:
        path = _norm(path)
        with self._lock:
            self._record("open_write", path)
            inode = self._files.get(path) or self._link_new(path)
            return self._new_fd(inode)

    def create(self, path: str) -> int:
        path = _norm(path)
        with self._lock:
            self._record("create", path)
            inode = self._files.get(path)
            if inode is None:
                inode = self._link_new(path)
            elif inode.current:
                del inode.current[:]
                inode.pending.append(("truncate", 0))
            return self._new_fd(inode)

    def write(self, fd: int, data: bytes, offset: int) -> int:
        with self._lock:
            self._record("write", fd, bytes(data), offset)
            inode = self._fd(fd)
            inode.pending.append(("write", offset, bytes(data)))
            if len(inode.current) < offset:
                inode.current += bytes(offset - len(inode.current))
            inode.current[offset : offset + len(data)] = data
            return len(data)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """A write-out hint guarantees nothing on power loss: nothing changes."""
        with self._lock:
            self._fd(fd)

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            self._record("fdatasync", fd)
            inode = self._fd(fd)
            inode.durable = bytearray(inode.current)
            inode.pending.clear()

    def close(self, fd: int) -> None:
        with self._lock:
            self._record("close", fd)
            self._fd(fd)
            del self._fds[fd]

    def read_file(self, path: str) -> bytes:
        path = _norm(path)
        with self._lock:
            return bytes(self._inode(path).current)

    def file_size(self, path: str) -> int:
        path = _norm(path)
        with self._lock:
            return len(self._inode(path).current)

    def listdir(self, path: str) -> list[str]:
        path = _norm(path)
        with self._lock:
            if path not in self._dirs:
                raise _not_found(path)
            children = [p for p in (*self._files, *self._dirs) if p != path]
            return sorted(posixpath.basename(p) for p in children if posixpath.dirname(p) == path)

    def makedirs(self, path: str) -> None:
        path = _norm(path)
        with self._lock:
            self._record("makedirs", path)
            missing: list[str] = []
            cursor = path
            while cursor not in self._dirs:
                if cursor in self._files:
                    raise FileExistsError(errno.EEXIST, "File exists", cursor)
                missing.append(cursor)
                cursor = posixpath.dirname(cursor)
            for directory in reversed(missing):
                self._dirs.add(directory)
                self._pending_dir_ops.append((posixpath.dirname(directory), ("mkdir", directory)))

    def rename(self, src: str, dst: str) -> None:
        src, dst = _norm(src), _norm(dst)
        with self._lock:
            self._record("rename", src, dst)
            inode = self._inode(src)
            if posixpath.dirname(src) != posixpath.dirname(dst):
                raise OSError(errno.EXDEV, "SimulatedDisk renames only within a directory")
            del self._files[src]
            self._files[dst] = inode
            self._pending_dir_ops.append((posixpath.dirname(src), ("rename", src, dst)))

    def remove(self, path: str) -> None:
        path = _norm(path)
        with self._lock:
            self._record("remove", path)
            self._inode(path)
            del self._files[path]
            self._pending_dir_ops.append((posixpath.dirname(path), ("unlink", path)))

    def truncate(self, path: str, size: int) -> None:
        path = _norm(path)
        with self._lock:
            self._record("truncate", path, size)
            inode = self._inode(path)
            if size <= len(inode.current):
                del inode.current[size:]
            else:
                inode.current += bytes(size - len(inode.current))
            inode.pending.append(("truncate", size))

    def fsync_dir(self, path: str) -> None:
        path = _norm(path)
        with self._lock:
            self._record("fsync_dir", path)
            if path not in self._dirs:
                raise _not_found(path)
            still_pending = []
            for parent, op in self._pending_dir_ops:
                if parent == path:
                    _apply_dir_op(self._durable_files, self._durable_dirs, op)
                else:
                    still_pending.append((parent, op))
            self._pending_dir_ops = still_pending

    # --- power loss --------------------------------------------------------------

    def crash_image(self, rng: random.Random, *, record_history: bool = False) -> SimulatedDisk:
        """One possible disk state after power is cut now (an independent disk)."""
        with self._lock:
            files = dict(self._durable_files)
            dirs = set(self._durable_dirs)
            for _parent, op in self._pending_dir_ops:
                if rng.random() < 0.5:
                    _apply_dir_op(files, dirs, op)
            # A directory whose parent's entry was lost is unreachable, and so
            # is everything below it.
            for directory in sorted(dirs, key=lambda d: d.count("/")):
                if directory != _ROOT and posixpath.dirname(directory) not in dirs:
                    dirs.discard(directory)
            contents: dict[int, bytes] = {}
            survivors: dict[str, bytes] = {}
            for path, inode in files.items():
                if posixpath.dirname(path) in dirs:
                    if id(inode) not in contents:
                        contents[id(inode)] = bytes(_crashed_content(inode, rng))
                    survivors[path] = contents[id(inode)]
            return SimulatedDisk(record_history=record_history, files=survivors, dirs=dirs)

    def snapshot(self) -> dict[str, bytes]:
        """Current (page-cache) content of every file, by path."""
        with self._lock:
            return {path: bytes(inode.current) for path, inode in self._files.items()}

    def all_crash_points(self) -> Iterator[tuple[int, SimulatedDisk]]:
        """Replay the recorded run; yield (step, disk as of that step) for every step.

        The yielded disk is the live replay: call :meth:`crash_image` on it,
        do not mutate it.  Step 0 is the starting state (empty, or the
        ``files`` the disk was built with).
        """
        with self._lock:
            if self._history is None:
                raise RuntimeError("SimulatedDisk(record_history=True) is needed to replay")
            history = list(self._history)
        replay = SimulatedDisk(files=self._base_files, dirs=self._base_dirs)
        yield 0, replay
        for step, (op, args) in enumerate(history, start=1):
            getattr(replay, op)(*args)
            yield step, replay


def _apply_dir_op(files: dict[str, _Inode], dirs: set[str], op: tuple[Any, ...]) -> None:
    """Apply one directory operation; a no-op if its precondition was lost in the crash."""
    kind = op[0]
    if kind == "link":
        files[op[1]] = op[2]
    elif kind == "unlink":
        files.pop(op[1], None)
    elif kind == "rename":
        inode = files.pop(op[1], None)
        if inode is not None:
            files[op[2]] = inode
    elif kind == "mkdir":
        dirs.add(op[1])


def _crashed_content(inode: _Inode, rng: random.Random) -> bytearray:
    """The durable bytes plus a random fate for each unsynced write or truncation."""
    content = bytearray(inode.durable)
    for op in inode.pending:
        if op[0] == "truncate":
            if rng.random() < 0.5:
                size = op[1]
                del content[size:]
                content += bytes(size - len(content))
            continue
        _, offset, data = op
        fate = rng.randrange(5)
        if fate == 0:  # never reached the platter
            continue
        if fate == 1:  # fully written
            kept, zeros = len(data), 0
        elif fate == 2:  # torn: a prefix made it, the file ends there
            kept, zeros = rng.randrange(len(data) + 1), 0
        elif fate == 3:  # torn: the size was updated, the missing blocks read as zeros
            kept = rng.randrange(len(data) + 1)
            zeros = len(data) - kept
        else:  # size updated, no data blocks written
            kept, zeros = 0, len(data)
        end = offset + kept + zeros
        if len(content) < end:
            content += bytes(end - len(content))
        content[offset : offset + kept] = data[:kept]
        content[offset + kept : end] = bytes(zeros)
    return content
