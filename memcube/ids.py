"""Item ids: ULIDs (26 characters of Crockford base32, sortable by time).

Layout (128 bits, big-endian): 48 bits of Unix time in milliseconds, then 80
bits of randomness.  The text form is canonical upper case, so the plain
string order (and the byte order of the UTF-8 key in LMDB) is time order.

Pure: the clock is never read here.  Callers pass ``now_us`` (microseconds
since the Unix epoch); only its millisecond part goes into the id.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Final

from memosd.errors import BadRequest

__all__ = [
    "ID_LENGTH",
    "MonotonicIdFactory",
    "id_time_us",
    "is_valid_id",
    "new_id",
]

ID_LENGTH: Final = 26
_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE: Final[dict[str, int]] = {ch: i for i, ch in enumerate(_ALPHABET)}
# The first character carries only 3 bits (26 * 5 = 130 > 128), hence [0-7].
_ID_MATCH: Final = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}").fullmatch
_TIME_BITS: Final = 48
_RANDOM_BITS: Final = 80
_RANDOM_BYTES: Final = _RANDOM_BITS // 8
_MAX_MS: Final = (1 << _TIME_BITS) - 1
_MAX_RANDOM: Final = (1 << _RANDOM_BITS) - 1


# Every 10-bit value as its two characters: 13 lookups per id instead of 26.
_PAIRS: Final = tuple(a + b for a in _ALPHABET for b in _ALPHABET)


def _encode(value: int) -> str:
    p = _PAIRS  # 130 bits = 13 pairs; the top pair starts with two zero bits
    return (
        p[value >> 120]
        + p[(value >> 110) & 1023]
        + p[(value >> 100) & 1023]
        + p[(value >> 90) & 1023]
        + p[(value >> 80) & 1023]
        + p[(value >> 70) & 1023]
        + p[(value >> 60) & 1023]
        + p[(value >> 50) & 1023]
        + p[(value >> 40) & 1023]
        + p[(value >> 30) & 1023]
        + p[(value >> 20) & 1023]
        + p[(value >> 10) & 1023]
        + p[value & 1023]
    )


def _ms_of(now_us: int) -> int:
    if type(now_us) is not int or now_us < 0:
        raise BadRequest(f"now_us must be a non-negative int, got {now_us!r}", reason="bad_time")
    ms = now_us // 1000
    if ms > _MAX_MS:
        raise BadRequest(f"now_us {now_us} is beyond the ULID time range", reason="bad_time")
    return ms


def _random80(rand: Callable[[int], bytes]) -> int:
    raw = rand(_RANDOM_BYTES)
    if len(raw) != _RANDOM_BYTES:
        raise BadRequest(f"rand must return {_RANDOM_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def new_id(now_us: int, rand: Callable[[int], bytes] = os.urandom) -> str:
    """A new ULID whose time part is ``now_us // 1000`` (milliseconds).

    Ids made in the same millisecond are ordered at random; use
    :class:`MonotonicIdFactory` when creation order must be kept.
    """
    return _encode((_ms_of(now_us) << _RANDOM_BITS) | _random80(rand))


class MonotonicIdFactory:
    """Makes strictly increasing ULIDs, also within one millisecond.

    In the same millisecond (or if the clock steps back) the previous id's
    random part is incremented by one and its time part kept, so ids never go
    backwards; their time part may then run slightly ahead of ``now_us``.
    Should the 80-bit random part overflow, the time part is advanced by one
    millisecond.  Thread-safe.
    """

    __slots__ = ("_last_ms", "_last_random", "_lock", "_rand")

    def __init__(self, rand: Callable[[int], bytes] = os.urandom) -> None:
        self._rand = rand
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def __call__(self, now_us: int) -> str:
        ms = _ms_of(now_us)
        with self._lock:
            if ms <= self._last_ms:
                ms = self._last_ms
                random = self._last_random + 1
                if random > _MAX_RANDOM:
                    ms += 1
                    if ms > _MAX_MS:
                        raise BadRequest("ULID time range exhausted", reason="bad_time")
                    random = _random80(self._rand)
            else:
                random = _random80(self._rand)
            self._last_ms = ms
            self._last_random = random
        return _encode((ms << _RANDOM_BITS) | random)


def is_valid_id(s: object) -> bool:
    """True for a canonical (upper-case, 26-character, in-range) ULID string."""
    return type(s) is str and _ID_MATCH(s) is not None


def _decode(s: str) -> int:
    if not is_valid_id(s):
        raise BadRequest(f"not a valid item id: {s!r}", reason="bad_id")
    value = 0
    for ch in s:
        value = (value << 5) | _DECODE[ch]
    return value


def id_time_us(id: str) -> int:
    """The creation time encoded in ``id``, in microseconds (millisecond precision)."""
    return (_decode(id) >> _RANDOM_BITS) * 1000
