"""ULID ids: format, time part, sortability, monotonic factory."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memosd.errors import BadRequest
from memosd.memcube.ids import ID_LENGTH, MonotonicIdFactory, id_time_us, is_valid_id, new_id

MAX_US = ((1 << 48) - 1) * 1000 + 999


def fixed_rand(byte: int) -> Callable[[int], bytes]:
    return lambda n: bytes([byte]) * n


def test_known_id_encoding() -> None:
    # 1 ms after the epoch, all-zero randomness: time part "0000000001", then 16 zeros.
    assert new_id(1000, fixed_rand(0)) == "00000000010000000000000000"
    assert new_id(0, fixed_rand(0xFF)) == "0000000000ZZZZZZZZZZZZZZZZ"
    assert new_id(MAX_US, fixed_rand(0xFF)) == "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"


def test_id_shape_and_time() -> None:
    now = 1_732_240_000_123_456
    ident = new_id(now)
    assert len(ident) == ID_LENGTH
    assert is_valid_id(ident)
    assert id_time_us(ident) == now // 1000 * 1000


@pytest.mark.parametrize("bad_time", [-1, MAX_US + 1, 1.5, True, "1"])
def test_bad_time_rejected(bad_time: object) -> None:
    with pytest.raises(BadRequest):
        new_id(bad_time)  # type: ignore[arg-type]


def test_rand_must_return_ten_bytes() -> None:
    with pytest.raises(BadRequest):
        new_id(0, lambda n: b"short")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0" * 25,
        "0" * 27,
        "8" + "0" * 25,  # beyond 128 bits
        "0" * 25 + "I",  # I, L, O, U are not Crockford characters
        "0" * 25 + "U",
        "01hf7yat00xfm470na145gd24w",  # lower case is not canonical
        "0" * 25 + "\n",
        None,
        b"0" * 26,
    ],
)
def test_invalid_ids(text: object) -> None:
    assert not is_valid_id(text)
    if isinstance(text, str):
        with pytest.raises(BadRequest):
            id_time_us(text)


@given(st.integers(0, MAX_US), st.integers(0, MAX_US), st.binary(min_size=10, max_size=10))
def test_ids_sort_by_time(t1: int, t2: int, rnd: bytes) -> None:
    a, b = new_id(t1, lambda n: rnd), new_id(t2, lambda n: rnd)
    assert is_valid_id(a)
    assert id_time_us(a) == t1 // 1000 * 1000
    if t1 // 1000 < t2 // 1000:
        assert a < b
    assert a.encode() < b.encode() or t1 // 1000 >= t2 // 1000


@given(st.lists(st.integers(0, 10_000_000), min_size=1, max_size=200))
def test_monotonic_factory_strictly_increases(times: list[int]) -> None:
    make = MonotonicIdFactory()
    ids = [make(t) for t in times]  # times may repeat and go backwards
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(is_valid_id(i) for i in ids)


def test_monotonic_same_millisecond_increments() -> None:
    make = MonotonicIdFactory(fixed_rand(0))
    first, second = make(5_000), make(5_999)
    assert first == "00000000050000000000000000"
    assert second == "00000000050000000000000001"
    later = make(6_000)
    assert id_time_us(later) == 6_000


def test_monotonic_clock_step_back_keeps_order() -> None:
    make = MonotonicIdFactory()
    a = make(10_000_000)
    b = make(1_000)
    assert a < b
    assert id_time_us(b) == 10_000_000


def test_monotonic_random_overflow_advances_time() -> None:
    make = MonotonicIdFactory(fixed_rand(0xFF))
    a = make(7_000)
    b = make(7_000)
    assert a < b
    assert id_time_us(b) == 8_000
