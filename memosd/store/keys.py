"""Byte keys of the LMDB store (pure).  Layout documented in ``memosd.store``."""

from __future__ import annotations

import struct

__all__ = [
    "SEP",
    "class_key",
    "class_prefix",
    "cube_prefix",
    "item_key",
    "pack_u32",
    "pack_u64",
    "principal_key",
    "split_item_key",
    "unpack_u32",
    "unpack_u64",
    "version_key",
    "version_prefix",
]

SEP = b"\x00"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(data: bytes) -> int:
    return int(_U32.unpack(data)[0])


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(data: bytes) -> int:
    return int(_U64.unpack(data)[0])


def cube_prefix(cube: str) -> bytes:
    """Prefix of every per-item key of ``cube``."""
    return cube.encode() + SEP


def item_key(cube: str, item_id: str) -> bytes:
    return cube.encode() + SEP + item_id.encode()


def split_item_key(key: bytes) -> tuple[str, str]:
    cube, _, item_id = key.partition(SEP)
    return cube.decode(), item_id.decode()


def class_prefix(cube: str, status: str, tier: str, form: str) -> bytes:
    """Prefix of the ``classes`` keys of ``cube``'s items with this status, tier and form."""
    return SEP.join((cube.encode(), status.encode(), tier.encode(), form.encode(), b""))


def class_key(cube: str, status: str, tier: str, form: str, item_id: str) -> bytes:
    return class_prefix(cube, status, tier, form) + item_id.encode()


def version_prefix(cube: str, item_id: str) -> bytes:
    return item_key(cube, item_id) + SEP


def version_key(cube: str, item_id: str, version: int) -> bytes:
    # Big-endian so LMDB's byte order is version order.
    return version_prefix(cube, item_id) + _U32.pack(version)


def principal_key(cube: str, principal: str) -> bytes:
    return cube.encode() + SEP + principal.encode()
