"""The portable cube file: one cube exported to a single verifiable file.

A deliberately simple container (no compression, so no decompression bombs;
``gzip`` the file if you need it smaller).  Integers are big-endian::

    magic      15 bytes   b"\x89MEMOSDCUBE\r\n\x1a\n"   (PNG-style: catches text-mode damage)
    count      u32        number of sections that follow
    section    repeated:  u16 name length, name (ASCII), u64 data length, data
    trailer    8 bytes    b"SHA-256\x00"
    digest     32 bytes   SHA-256 of every byte before the trailer

Sections, in this order (any other name, order, duplicate or missing one is
an error)::

    manifest.json          what follows, with checksums (UTF-8 JSON object)
    cube.msgpack           the MemCube        (memosd.memcube.codec.encode_cube)
    grants.msgpack         {principal: "read" | "write"}
    items.msgpack          [[version 1, version 2, ...], ...] one list per item,
                           each version a bin of memosd.memcube.codec.encode_item
                           (ascending versions, tombstones included)
    purges.msgpack         [bin of memosd.memcube.codec.encode_purge, ...]
    blobs/<sha256 hex>     large payloads (KV caches, adapters), by content hash,
                           in ascending hash order

``manifest.json``::

    {
      "format": "memosd-cube",
      "format_version": 1,
      "cube": "<name>",
      "created_us": <int, microseconds since the epoch>,
      "created": "<ISO-8601 UTC>",
      "producer": "memosd <version>",
      "counts": {"items": n, "versions": n, "purges": n, "grants": n, "blobs": n},
      "sections": {"<section name>": {"sha256": "<hex>", "bytes": n}, ...}
    }

Verification on load, before anything is decoded: the file digest (so any
flipped, cut or appended byte is caught), then the framing, then each
section's SHA-256 and size against the manifest, then the decoded contents
(counts, item/cube/purge codecs with their own schema checks, one cube, item
versions ascending, no item twice).  Any failure is a
:class:`~memosd.errors.CodecError` (``bad_request``); a file over the size
limits is :class:`~memosd.errors.TooLarge`.  Nothing is unpickled or
executed: JSON and msgpack only.  A newer ``format_version`` is refused with a
message naming it.

Output is deterministic: the same export and ``now_us`` give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from memosd import __version__
from memosd.engine import CubeExport
from memosd.errors import CodecError, MemosError, TooLarge
from memosd.memcube import codec
from memosd.memcube.model import MemoryItem

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FormBlobs",
    "Limits",
    "PortableCube",
    "check_blobs",
    "dump_cube",
    "export_blobs",
    "load_cube",
    "read_portable",
]

FORMAT_NAME: Final = "memosd-cube"
FORMAT_VERSION: Final = 1

MANIFEST: Final = "manifest.json"
CUBE: Final = "cube.msgpack"
GRANTS: Final = "grants.msgpack"
ITEMS: Final = "items.msgpack"
PURGES: Final = "purges.msgpack"
_SECTIONS: Final = (CUBE, GRANTS, ITEMS, PURGES)
_BLOB_RE: Final = re.compile(r"blobs/([0-9a-f]{64})")
_GRANT_LEVELS: Final = frozenset({"read", "write"})
MAGIC: Final = b"\x89MEMOSDCUBE\r\n\x1a\n"
TRAILER: Final = b"SHA-256\x00"
_COUNT: Final = struct.Struct(">I")
_NAME_LEN: Final = struct.Struct(">H")
_DATA_LEN: Final = struct.Struct(">Q")
_DIGEST_BYTES: Final = 32


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked before anything in a portable file is decoded."""

    max_file_bytes: int = 2 * 1024**3
    max_manifest_bytes: int = 16 * 1024**2
    max_sections: int = 1_000_000


@dataclass(frozen=True, slots=True)
class PortableCube:
    """A verified portable file: its manifest, the cube export and its blobs."""

    manifest: dict[str, Any]
    export: CubeExport
    blobs: dict[str, bytes]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unpackb(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise CodecError(f"portable file: {what} is not valid msgpack ({exc})") from None


# --- writing ------------------------------------------------------------------------------


def dump_cube(
    export: CubeExport,
    *,
    blobs: Mapping[str, bytes] | None = None,
    now_us: int | None = None,
) -> bytes:
    """Serialise ``export`` (and content-addressed ``blobs``) into a portable file."""
    now_us = time.time_ns() // 1000 if now_us is None else now_us
    blobs = dict(blobs or {})
    for digest, blob in blobs.items():
        if _sha256(blob) != digest:
            raise CodecError(f"blob {digest[:12]}… does not match its sha256", reason="bad_blob")

    sections: dict[str, bytes] = {
        CUBE: codec.encode_cube(export.cube),
        GRANTS: _packb(dict(sorted(export.grants.items()))),
        ITEMS: _packb([[codec.encode_item(v) for v in versions] for versions in export.items]),
        PURGES: _packb([codec.encode_purge(p) for p in export.purges]),
    }
    members = {**sections, **{f"blobs/{d}": b for d, b in sorted(blobs.items())}}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "cube": export.cube.name,
        "created_us": now_us,
        "created": dt.datetime.fromtimestamp(now_us / 1e6, tz=dt.UTC).isoformat(),
        "producer": f"memosd {__version__}",
        "counts": {
            "items": len(export.items),
            "versions": sum(len(v) for v in export.items),
            "purges": len(export.purges),
            "grants": len(export.grants),
            "blobs": len(blobs),
        },
        "sections": {
            name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in members.items()
        },
    }
    framed = [(MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n"), *members.items()]
    parts = [MAGIC, _COUNT.pack(len(framed))]
    for name, data in framed:
        raw_name = name.encode("ascii")
        parts += [_NAME_LEN.pack(len(raw_name)), raw_name, _DATA_LEN.pack(len(data)), data]
    body = b"".join(parts)
    return body + TRAILER + hashlib.sha256(body).digest()


# --- reading ------------------------------------------------------------------------------


def load_cube(data: bytes, *, limits: Limits | None = None) -> CubeExport:
    """Verify and decode a portable file; the cube export it holds."""
    return read_portable(data, limits=limits).export


def read_portable(data: bytes, *, limits: Limits | None = None) -> PortableCube:
    """Verify every checksum, size and structure of a portable file, then decode it."""
    limits = limits or Limits()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("portable file: expected bytes")
    data = bytes(data)
    if len(data) > limits.max_file_bytes:
        raise TooLarge(
            f"portable file is {len(data)} bytes, over the limit of {limits.max_file_bytes}",
            reason="file_too_large",
        )
    if not data.startswith(MAGIC):
        raise CodecError("not a memosd portable cube file (bad magic)", reason="not_portable")
    members = _read_sections(data, limits)
    manifest = _check_manifest(members.pop(MANIFEST))
    listed: dict[str, Any] = manifest["sections"]
    if set(listed) != set(members):
        missing = sorted(set(listed) - set(members))
        extra = sorted(set(members) - set(listed))
        raise CodecError(
            f"portable file: sections do not match the manifest (missing {missing}, "
            f"unlisted {extra})",
            reason="checksum_mismatch",
        )
    for name, body in members.items():
        entry = listed[name]
        if entry["bytes"] != len(body) or entry["sha256"] != _sha256(body):
            raise CodecError(
                f"portable file: {name} does not match its checksum in the manifest",
                reason="checksum_mismatch",
                section=name,
            )
    blobs: dict[str, bytes] = {}
    for name, body in members.items():
        match = _BLOB_RE.fullmatch(name)
        if match is not None:
            if match.group(1) != _sha256(body):
                raise CodecError(f"portable file: {name} is not named by its sha256")
            blobs[match.group(1)] = body
    try:
        export = _decode_export(members)
    except MemosError:
        raise
    except Exception as exc:  # untrusted input: no decoder failure may escape untyped
        raise CodecError(f"portable file: undecodable contents ({exc})") from None
    _check_counts(manifest, export, blobs)
    if manifest["cube"] != export.cube.name:
        raise CodecError(
            f"portable file: manifest names cube {manifest['cube']!r} but holds "
            f"{export.cube.name!r}"
        )
    return PortableCube(manifest=manifest, export=export, blobs=blobs)


def _read_sections(data: bytes, limits: Limits) -> dict[str, bytes]:
    """Check the digest, then split the framing into ``{name: data}`` in order."""
    tail = len(TRAILER) + _DIGEST_BYTES
    if len(data) < len(MAGIC) + _COUNT.size + tail:
        raise CodecError("portable file is truncated", reason="checksum_mismatch")
    body, trailer, digest = data[:-tail], data[-tail:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if trailer != TRAILER or hashlib.sha256(body).digest() != digest:
        raise CodecError(
            "portable file is damaged or was modified (file checksum mismatch)",
            reason="checksum_mismatch",
        )
    (count,) = _COUNT.unpack_from(body, len(MAGIC))
    if count > limits.max_sections:
        raise TooLarge(
            f"portable file has {count} sections, over the limit of {limits.max_sections}"
        )
    pos = len(MAGIC) + _COUNT.size
    sections: dict[str, bytes] = {}
    for _ in range(count):
        if pos + _NAME_LEN.size > len(body):
            raise CodecError("portable file: section header past the end")
        (name_len,) = _NAME_LEN.unpack_from(body, pos)
        pos += _NAME_LEN.size
        raw_name = body[pos : pos + name_len]
        pos += name_len
        if len(raw_name) != name_len or pos + _DATA_LEN.size > len(body):
            raise CodecError("portable file: section header past the end")
        (size,) = _DATA_LEN.unpack_from(body, pos)
        pos += _DATA_LEN.size
        if size > len(body) - pos:
            raise CodecError("portable file: section data past the end")
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("portable file: section name is not ASCII") from None
        if name in sections:
            raise CodecError(f"portable file: duplicate section {name!r}")
        sections[name] = body[pos : pos + size]
        pos += size
    if pos != len(body):
        raise CodecError("portable file: bytes after the last section")

    names = list(sections)
    blob_names = names[1 + len(_SECTIONS) :]
    if (
        names[: 1 + len(_SECTIONS)] != [MANIFEST, *_SECTIONS]
        or any(_BLOB_RE.fullmatch(n) is None for n in blob_names)
        or blob_names != sorted(blob_names)
    ):
        raise CodecError(
            f"portable file: unexpected sections {names[:8]}"
            f"{'…' if len(names) > 8 else ''} (expected manifest.json, cube, grants, "
            "items, purges, then blobs/<sha256> in order)"
        )
    if len(sections[MANIFEST]) > limits.max_manifest_bytes:
        raise TooLarge(f"portable file: manifest is over {limits.max_manifest_bytes} bytes")
    return sections


def _check_manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"portable file: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CodecError("portable file: manifest.json is not an object")
    if manifest.get("format") != FORMAT_NAME:
        raise CodecError(
            f"not a memosd portable cube file (format {manifest.get('format')!r})",
            reason="not_portable",
        )
    version = manifest.get("format_version")
    if type(version) is not int:
        raise CodecError("portable file: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise CodecError(
            f"portable file format version {version} is newer than this memosd supports "
            f"({FORMAT_VERSION}); upgrade memosd to import it",
            reason="unsupported_version",
        )
    if version < 1:
        raise CodecError(f"portable file: invalid format_version {version}")
    if not isinstance(manifest.get("cube"), str):
        raise CodecError("portable file: manifest lacks the cube name")
    if type(manifest.get("created_us")) is not int:
        raise CodecError("portable file: manifest lacks created_us")
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not all(
        type(counts.get(k)) is int for k in ("items", "versions", "purges", "grants", "blobs")
    ):
        raise CodecError("portable file: manifest counts missing or malformed")
    sections = manifest.get("sections")
    if not isinstance(sections, dict):
        raise CodecError("portable file: manifest sections missing")
    for name, entry in sections.items():
        if (
            not isinstance(entry, dict)
            or type(entry.get("bytes")) is not int
            or not isinstance(entry.get("sha256"), str)
        ):
            raise CodecError(f"portable file: manifest entry for {name!r} is malformed")
    return manifest


def _decode_export(members: Mapping[str, bytes]) -> CubeExport:
    cube = codec.decode_cube(members[CUBE])

    grants_doc = _unpackb(members[GRANTS], "grants")
    if not isinstance(grants_doc, dict):
        raise CodecError("portable file: grants is not a map")
    grants: dict[str, str] = {}
    for principal, level in grants_doc.items():
        if not isinstance(principal, str) or not principal or level not in _GRANT_LEVELS:
            raise CodecError(f"portable file: bad grant {principal!r}: {level!r}")
        grants[principal] = level

    items_doc = _unpackb(members[ITEMS], "items")
    if not isinstance(items_doc, list):
        raise CodecError("portable file: items is not a list")
    items: list[list[MemoryItem]] = []
    seen: set[str] = set()
    for entry in items_doc:
        if not isinstance(entry, list) or not entry:
            raise CodecError("portable file: an item has no versions")
        versions: list[MemoryItem] = []
        for raw in entry:
            if not isinstance(raw, bytes):
                raise CodecError("portable file: an item version is not binary")
            versions.append(codec.decode_item(raw))
        _check_versions(versions, cube.name)
        if versions[0].id in seen:
            raise CodecError(f"portable file: item {versions[0].id} appears twice")
        seen.add(versions[0].id)
        items.append(versions)

    purges_doc = _unpackb(members[PURGES], "purges")
    if not isinstance(purges_doc, list):
        raise CodecError("portable file: purges is not a list")
    purges = []
    for raw in purges_doc:
        if not isinstance(raw, bytes):
            raise CodecError("portable file: a purge record is not binary")
        record = codec.decode_purge(raw)
        if record.cube != cube.name:
            raise CodecError(f"portable file: purge record of another cube {record.cube!r}")
        purges.append(record)
    return CubeExport(cube=cube, grants=grants, items=items, purges=purges)


def _check_versions(versions: list[MemoryItem], cube: str) -> None:
    first = versions[0]
    previous = 0
    for item in versions:
        if item.id != first.id:
            raise CodecError(f"portable file: versions of {first.id} mix in item {item.id}")
        if item.cube != cube:
            raise CodecError(f"portable file: item {item.id} belongs to cube {item.cube!r}")
        if item.version <= previous:
            raise CodecError(f"portable file: versions of {item.id} are not ascending")
        previous = item.version


def _check_counts(
    manifest: Mapping[str, Any], export: CubeExport, blobs: Mapping[str, bytes]
) -> None:
    actual = {
        "items": len(export.items),
        "versions": sum(len(v) for v in export.items),
        "purges": len(export.purges),
        "grants": len(export.grants),
        "blobs": len(blobs),
    }
    declared = {k: manifest["counts"][k] for k in actual}
    if declared != actual:
        raise CodecError(
            f"portable file: manifest counts {declared} do not match the contents {actual}",
            reason="checksum_mismatch",
        )


# --- blobs of blob-backed forms (KV caches, adapters) --------------------------------------


class FormBlobs:
    """How items name their blobs: a memory form registry, or the generic convention.

    ``roles(item)`` is ``{role: sha256}`` (a form's ``export_blobs``; without a
    registry, ``payload["blobs"]``); ``check(item, by_role)`` is the form's
    ``import_blobs`` (sha256 checks by default).
    """

    def __init__(self, forms: Any = None) -> None:
        self._forms = forms

    def roles(self, item: MemoryItem) -> dict[str, str]:
        if self._forms is not None and item.form in self._forms:
            return dict(self._forms.get(item.form).export_blobs(item))
        from memosd.plugins.forms import blob_roles  # noqa: PLC0415 - plugins import us late

        return blob_roles(item.payload)

    def check(self, item: MemoryItem, by_role: Mapping[str, bytes]) -> None:
        if self._forms is not None and item.form in self._forms:
            self._forms.get(item.form).import_blobs(item, by_role)
            return
        for role, sha in self.roles(item).items():
            data = by_role.get(role)
            if data is None or _sha256(data) != sha:
                raise CodecError(
                    f"item {item.id}: blob {role!r} is missing or does not match its sha256",
                    reason="missing_blob" if data is None else "bad_blob",
                )


def export_blobs(
    export: CubeExport, read_blob: Any, forms: FormBlobs | None = None
) -> dict[str, bytes]:
    """Every blob the export's item versions reference, read with ``read_blob(sha)``.

    Tombstones and purged items reference nothing; versions that share a blob
    (an adapter kept across versions, KV chunks reused by prefix) carry it once.
    """
    forms = forms or FormBlobs()
    out: dict[str, bytes] = {}
    for versions in export.items:
        for item in versions:
            for sha in forms.roles(item).values():
                if sha not in out:
                    out[sha] = read_blob(sha)
    return out


def check_blobs(
    export: CubeExport, blobs: Mapping[str, bytes], forms: FormBlobs | None = None
) -> None:
    """Before an import: every referenced blob is present and passes its form's check."""
    forms = forms or FormBlobs()
    for versions in export.items:
        for item in versions:
            roles = forms.roles(item)
            if roles:
                forms.check(item, {role: blobs[sha] for role, sha in roles.items() if sha in blobs})
