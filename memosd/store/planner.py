"""Planning writes: turn a request into resolved mutations against one txn.

A :class:`Planner` is handed to every write while the group-commit leader
holds the batch's LMDB write transaction (a nested child transaction per
request).  Each method validates against the current state, decides ids,
versions and timestamps, applies the resulting mutations to the transaction
at once (so later steps of the same request, and later requests of the same
batch, see them) and remembers them for the WAL.  If a request raises, its
child transaction is aborted and nothing of it remains.

Several planner calls in one request are atomic: their mutations are logged
as one WAL record (``RecordType.ATOMIC``) and applied in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Final

from memosd.errors import BadRequest, Conflict, NotFound, TooLarge
from memosd.memcube import versioning
from memosd.memcube.model import (
    CubeConfig,
    MemCube,
    MemoryItem,
    Operation,
    PurgeRecord,
    Usage,
    new_cube,
)
from memosd.scheduler import jobs
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
    encode_mutation,
)
from memosd.store.view import StoreView

__all__ = ["Planner"]

GRANT_LEVELS: Final = ("read", "write")


class Planner:
    def __init__(
        self,
        view: StoreView,
        now_us: int,
        *,
        new_id: Callable[[int], str],
        max_text_bytes: int,
    ) -> None:
        self.view = view
        self.now_us = now_us
        self._new_id = new_id
        self._max_text_bytes = max_text_bytes
        self.logged: list[tuple[Mutation, int, bytes]] = []
        # Set before the first write reaches the transaction (a failing
        # apply may already have written part of its mutation).
        self.wrote = False

    # -- plumbing ---------------------------------------------------------------------

    def emit(self, mutation: Mutation) -> None:
        rtype, payload = encode_mutation(mutation)
        self.wrote = True
        self.view.apply(mutation, payload)
        self.logged.append((mutation, rtype, payload))

    def check_text(self, text: object) -> str:
        if not isinstance(text, str):
            raise BadRequest("text must be a string")
        # An ASCII str knows it is ASCII (O(1)): its length is its UTF-8 size.
        if (len(text) if text.isascii() else len(text.encode())) > self._max_text_bytes:
            raise TooLarge(f"text is larger than max_text_bytes={self._max_text_bytes}")
        return text

    # -- reads inside the transaction ---------------------------------------------------

    def require_cube(self, name: str) -> None:
        if not self.view.has_cube(name):
            raise NotFound(f"no cube named {name!r}")

    def item(self, cube: str, item_id: str) -> MemoryItem:
        """The latest version (tombstones included)."""
        self.require_cube(cube)
        item = self.view.latest(cube, item_id)
        if item is None:
            raise self.view.missing_item(cube, item_id)
        return item

    def history(self, cube: str, item_id: str) -> list[MemoryItem]:
        self.require_cube(cube)
        versions = self.view.history(cube, item_id)
        if not versions:
            raise self.view.missing_item(cube, item_id)
        return versions

    # -- cubes ------------------------------------------------------------------------

    def create_cube(self, name: str, *, owner: str, config: CubeConfig | None = None) -> MemCube:
        if self.view.has_cube(name):
            raise Conflict(f"cube {name!r} already exists")
        cube = new_cube(name, owner=owner, now_us=self.now_us, config=config)
        self.emit(CubePut(cube))
        return cube

    def drop_cube(self, name: str) -> int:
        self.require_cube(name)
        count = sum(1 for _ in self.view.iter_latest(name))
        self.emit(CubeDrop(name))
        return count

    # -- items ------------------------------------------------------------------------

    def add(
        self,
        cube: str,
        text: str,
        **fields: Any,
    ) -> MemoryItem:
        """Add an item (version 1); keyword fields as in :meth:`new_item`."""
        item = self.new_item(cube, text, **fields)
        self.emit(ItemPut(item))
        return item

    def new_item(
        self,
        cube: str,
        text: str,
        *,
        actor: str | None = None,
        form: str = "plaintext",
        tier: str = "short",
        tags: Iterable[str] = (),
        source: str | None = None,
        session: str | None = None,
        metadata: dict[str, Any] | None = None,
        payload: dict[str, Any] | None = None,
        importance: float = 0.5,
        ttl_s: int | None = None,
        valid_from_us: int | None = None,
        valid_to_us: int | None = None,
        parents: Sequence[tuple[str, int]] = (),
        operation: str = Operation.ADD,
    ) -> MemoryItem:
        """The version 1 :meth:`add` writes, checked against the state but not
        written (the engine's deferred adds write it later)."""
        self.require_cube(cube)
        return versioning.build_new_item(  # versioning.new_item, by position
            self._new_id(self.now_us),
            cube,
            self.check_text(text),
            self.now_us,
            form,
            tier,
            actor,
            source,
            session,
            tuple(parents),
            tuple(tags),
            metadata,
            payload,
            importance,
            ttl_s,
            valid_from_us,
            valid_to_us,
            operation,
        )

    def update(
        self,
        cube: str,
        item_id: str,
        *,
        actor: str | None = None,
        expected_version: int | None = None,
        operation: str = Operation.UPDATE,
        **changes: Any,
    ) -> MemoryItem:
        unknown = set(changes) - set(versioning.REVISABLE_FIELDS)
        if unknown:
            raise BadRequest(f"cannot update field(s) {sorted(unknown)}")
        if changes.get("text", versioning.NOT_GIVEN) is not versioning.NOT_GIVEN:
            self.check_text(changes["text"])
        try:
            op = Operation(operation)
        except ValueError:
            raise BadRequest(f"unknown operation {operation!r}") from None
        item = versioning.revise(
            self.item(cube, item_id),
            now_us=self.now_us,
            actor=actor,
            operation=op,
            expected_version=expected_version,
            **changes,
        )
        self.emit(ItemPut(item))
        return item

    def archive(
        self,
        cube: str,
        item_id: str,
        *,
        actor: str | None = None,
        valid_to_us: int | None = None,
        extra_parents: Sequence[tuple[str, int]] = (),
    ) -> MemoryItem:
        current = self.item(cube, item_id)
        item = versioning.archive(
            current,
            now_us=self.now_us,
            actor=actor,
            valid_to_us=self.now_us if valid_to_us is None else valid_to_us,
            extra_parents=tuple(extra_parents),
        )
        self.emit(ItemPut(item))
        return item

    def rollback(
        self, cube: str, item_id: str, version: int, *, actor: str | None = None
    ) -> MemoryItem:
        item = versioning.rollback(
            self.history(cube, item_id), version, now_us=self.now_us, actor=actor
        )
        self.emit(ItemPut(item))
        return item

    def delete(self, cube: str, item_id: str, *, actor: str | None = None) -> MemoryItem:
        item = versioning.tombstone(self.item(cube, item_id), now_us=self.now_us, actor=actor)
        self.emit(ItemPut(item))
        return item

    def purge(
        self, cube: str, item_id: str, *, actor: str | None = None, reason: str | None = None
    ) -> PurgeRecord:
        versions = self.history(cube, item_id)
        record = PurgeRecord(
            cube=cube,
            id=item_id,
            versions=len(versions),
            purged_us=self.now_us,
            actor=actor,
            reason=reason,
        )
        self.emit(ItemPurge(record))
        return record

    def import_items(self, cube: MemCube, items: Iterable[Sequence[MemoryItem]]) -> None:
        for versions in items:
            for item in versions:
                self.emit(ItemPut(replace(item, cube=cube.name, usage=Usage())))

    # -- access control -------------------------------------------------------------------

    def set_grant(self, cube: str, principal: str, level: str | None) -> None:
        if level is not None and level not in GRANT_LEVELS:
            raise BadRequest(f"grant level must be one of {GRANT_LEVELS}, not {level!r}")
        if not principal or "\x00" in principal:
            raise BadRequest("principal must be a non-empty string without NUL")
        self.require_cube(cube)
        self.emit(GrantSet(cube, principal, level))

    def put_token(self, name: str, *, token_hash: bytes, principal: str) -> None:
        if not name or "\x00" in name or len(name) > 128:
            raise BadRequest("token name must be 1-128 characters without NUL")
        if len(token_hash) != 32:
            raise BadRequest("token_hash must be a 32-byte sha256 digest")
        if self.view.token(name) is not None:
            raise Conflict(f"token {name!r} already exists")
        self.emit(TokenPut(name, principal, token_hash, self.now_us))

    def delete_token(self, name: str) -> None:
        if self.view.token(name) is None:
            raise NotFound(f"no token named {name!r}")
        self.emit(TokenDelete(name))

    # -- jobs -----------------------------------------------------------------------------

    def job(self, job_id: str) -> jobs.Job:
        job = self.view.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def submit_job(
        self,
        kind: str,
        *,
        cube: str | None = None,
        args: dict[str, Any] | None = None,
        actor: str | None = None,
        max_attempts: int = 3,
        dedup_key: str | None = None,
        not_before_us: int | None = None,
    ) -> jobs.Job:
        """Queue a job; with ``dedup_key``, a queued job with that key is returned instead.

        Only a job that has not started yet absorbs the request: a running
        one may already have read the state the request is about.
        """
        if cube is not None:
            self.require_cube(cube)
        if dedup_key is not None:
            for existing in self.view.open_jobs():
                if existing.dedup_key == dedup_key and existing.state == jobs.JobState.QUEUED:
                    return existing
        job = jobs.new_job(
            id=self._new_id(self.now_us),
            kind=kind,
            now_us=self.now_us,
            cube=cube,
            args=args,
            max_attempts=max_attempts,
            actor=actor,
            dedup_key=dedup_key,
            not_before_us=not_before_us,
        )
        self.emit(JobPut(job))
        return job

    def transition_job(
        self,
        job_id: str,
        change: Callable[[jobs.Job, int], jobs.Job],
        *,
        expected_revision: int | None = None,
    ) -> jobs.Job:
        current = self.job(job_id)
        if expected_revision is not None and current.revision != expected_revision:
            raise Conflict(
                f"job {job_id} changed (revision {current.revision}, expected {expected_revision})",
                reason="job_revision",
            )
        job = change(current, self.now_us)
        self.emit(JobPut(job))
        return job

    def delete_job(self, job_id: str) -> jobs.Job:
        """Remove an ended job's record (job retention); Conflict if it has not ended."""
        job = self.job(job_id)
        if not job.terminal:
            raise Conflict(f"job {job_id} is {job.state}, not ended", reason="job_state")
        self.emit(JobDelete(job.id, job.cube))
        return job
