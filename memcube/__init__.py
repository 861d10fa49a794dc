"""MemCube: the memosd data model (pure: no I/O, no clock reads).

A **cube** (:class:`MemCube`) is a named container of memory items owned by
one principal, with per-cube configuration (embedding model, tier policy).

A **memory item** is a chain of immutable versions (:class:`MemoryItem`).
Each version carries the whole header:

* identity: ``id`` (a ULID, sortable by creation time), ``cube``, ``version``
  (1, 2, 3... per item);
* kind and place: ``form`` (``plaintext`` | ``activation`` | ``parameter`` |
  a plugin form), ``tier`` (``short`` | ``mid`` | ``long``), ``status``
  (``active`` | ``archived`` | ``deleted``);
* content: ``text``, ``metadata`` (msgpack-safe dict), ``payload``
  (form-specific data such as blob references), ``tags``, ``importance``,
  ``ttl_s``;
* time, bi-temporal: ``created_us`` (system time of version 1) and
  ``recorded_us`` (system time this version was written), and the world
  time the fact holds, ``valid_from_us``/``valid_to_us``;
* ``provenance`` (source, actor, session, parents ``(id, version)``,
  operation) and ``usage`` (hits, last hit, heat; not versioned).

All times are integers, microseconds since the Unix epoch, passed in by the
caller.

**Version rules** (:mod:`memosd.memcube.versioning`): every change writes a
new version (``version + 1``) and old versions are never rewritten.  Updates
can be guarded by ``expected_version`` (optimistic concurrency); a delete is
a tombstone version with emptied content; rollback writes a new version whose
content equals an old one; a superseded fact is archived (status
``archived``, ``valid_to_us`` set), not deleted.

**As-of reads**: the state at system time T is the highest version with
``recorded_us <= T`` (:func:`as_of`); ``recorded_us`` never decreases along
versions (a clock stepping back is clamped).

**Purge** is the only real erasure: the store drops every version of an item
(and derived data: index entries, KV caches, adapters are marked stale) and
keeps a :class:`PurgeRecord` saying that it happened, by whom and why, never
what the item held.

**Encoding** (:mod:`memosd.memcube.codec`): msgpack maps tagged with a type and
:data:`SCHEMA_VERSION`; decoding is strict and raises only :class:`CodecError`.
"""

from memosd.memcube.codec import (
    DEFAULT_MAX_BYTES,
    SCHEMA_VERSION,
    decode_any,
    decode_cube,
    decode_item,
    decode_purge,
    encode_cube,
    encode_item,
    encode_purge,
    packb,
    unpackb,
)
from memosd.memcube.ids import MonotonicIdFactory, id_time_us, is_valid_id, new_id
from memosd.memcube.model import (
    CUBE_SCHEMA_VERSION,
    CubeConfig,
    Form,
    MemCube,
    MemoryItem,
    Operation,
    Provenance,
    PurgeRecord,
    Status,
    Tier,
    Usage,
    new_cube,
    validate_cube_name,
    validate_form_name,
    validate_metadata,
    validate_tags,
)
from memosd.memcube.versioning import (
    CONTENT_FIELDS,
    NOT_GIVEN,
    REVISABLE_FIELDS,
    NotGiven,
    archive,
    as_of,
    conversation,
    diff,
    latest,
    new_item,
    restore,
    revise,
    rollback,
    tombstone,
)

__all__ = [
    "CONTENT_FIELDS",
    "CUBE_SCHEMA_VERSION",
    "DEFAULT_MAX_BYTES",
    "NOT_GIVEN",
    "REVISABLE_FIELDS",
    "SCHEMA_VERSION",
    "CubeConfig",
    "Form",
    "MemCube",
    "MemoryItem",
    "MonotonicIdFactory",
    "NotGiven",
    "Operation",
    "Provenance",
    "PurgeRecord",
    "Status",
    "Tier",
    "Usage",
    "archive",
    "as_of",
    "conversation",
    "decode_any",
    "decode_cube",
    "decode_item",
    "decode_purge",
    "diff",
    "encode_cube",
    "encode_item",
    "encode_purge",
    "id_time_us",
    "is_valid_id",
    "latest",
    "new_cube",
    "new_id",
    "new_item",
    "packb",
    "restore",
    "revise",
    "rollback",
    "tombstone",
    "unpackb",
    "validate_cube_name",
    "validate_form_name",
    "validate_metadata",
    "validate_tags",
]
