"""Exporting a cube carries the blobs of its blob-backed items; importing checks them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from memosd.auth import Peer
from memosd.engine import Engine
from memosd.errors import BadRequest, CodecError
from memosd.portable import dump_cube, read_portable
from memosd.protocol import Request
from memosd.service import Service

ADMIN = Peer(os.getuid(), os.getgid(), os.getpid())  # the daemon's own uid: admin


def _call(svc: Service, op: str, **args: Any) -> Any:
    async def run() -> Any:
        return await svc.handle(Request(1, op, args), ADMIN)

    return anyio.run(run)


def _adapter_cube(engine: Engine) -> tuple[str, bytes]:
    engine.create_cube("notes", owner="uid:0")
    engine.add("notes", "plain memory")
    blob = b"adapter weights " * 1000
    sha = engine.blobs.put_bytes(blob)
    engine.add(
        "notes",
        "adapter v1",
        form="parameter",
        payload={"blobs": {"adapter": sha}, "manifest": {"rank": 4}},
    )
    return sha, blob


def test_export_carries_blobs_and_import_restores_them(
    tmp_path: Path, memosd_plugins: Callable[..., Any]
) -> None:
    source = Engine.open(tmp_path / "a")
    target = Engine.open(tmp_path / "b")
    try:
        sha, blob = _adapter_cube(source)
        plugins = memosd_plugins()
        reply = _call(Service(source, plugins=plugins), "export_cube", name="notes")
        data = reply.frames[0]
        assert read_portable(data).blobs == {sha: blob}

        _call(Service(target, plugins=plugins), "import_cube", data=data, name="copy")
        assert target.blobs.read(sha) == blob
        adapters = [i for i in target.list_items("copy") if i.form == "parameter"]
        assert [i.payload["blobs"]["adapter"] for i in adapters] == [sha]
        # The imported reference counts: purging the item deletes the blob.
        target.purge("copy", adapters[0].id)
        assert not target.blobs.exists(sha)
    finally:
        source.close()
        target.close()


def test_import_refuses_missing_or_altered_blobs(
    tmp_path: Path, memosd_plugins: Callable[..., Any]
) -> None:
    source = Engine.open(tmp_path / "a")
    target = Engine.open(tmp_path / "b")
    try:
        _adapter_cube(source)
        export = source.export_cube("notes")
        svc = Service(target, plugins=memosd_plugins())
        without = dump_cube(export)  # a file written without its blobs
        with pytest.raises(CodecError) as err:
            _call(svc, "import_cube", data=without)
        assert err.value.reason == "missing_blob"
        other = b"not the adapter"
        forged = dump_cube(export, blobs={hashlib.sha256(other).hexdigest(): other})
        with pytest.raises(CodecError):
            _call(svc, "import_cube", data=forged)
        assert target.list_cubes() == []  # nothing half-imported
    finally:
        source.close()
        target.close()


def test_import_validates_items_through_their_forms(
    tmp_path: Path, memosd_plugins: Callable[..., Any]
) -> None:
    source = Engine.open(tmp_path / "a")
    target = Engine.open(tmp_path / "b")
    try:
        source.create_cube("notes", owner="uid:0")
        source.add("notes", "x", form="no-such-form")  # the engine alone does not check forms
        data = dump_cube(source.export_cube("notes"))
        with pytest.raises(BadRequest) as err:
            _call(Service(target, plugins=memosd_plugins()), "import_cube", data=data)
        assert "no-such-form" in err.value.message
        assert target.list_cubes() == []
    finally:
        source.close()
        target.close()
