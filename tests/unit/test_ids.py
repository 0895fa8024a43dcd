"""UUIDv7: the layout of RFC 9562, and ids that only go up within one process."""

from __future__ import annotations

import time
import uuid
from itertools import pairwise
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import ids
from devices.ids import uuid7, uuid7_time_ms

MAX_MS = (1 << 48) - 1


def _fake_clock(monkeypatch: pytest.MonkeyPatch, *readings_ms: int) -> None:
    """Make ``uuid7`` read these milliseconds, one a call, repeating the last one.

    The module's monotonic state is saved by monkeypatch and restored after the test,
    so ids made later by other tests are not pushed into the fake clock's future.
    """
    remaining = list(readings_ms)

    def time_ns() -> int:
        ms = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        return ms * 1_000_000 + 123_456

    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=time_ns))
    monkeypatch.setattr(ids, "_last_ms", 0)
    monkeypatch.setattr(ids, "_counter", 0)


def test_version_and_variant_bits() -> None:
    value = uuid7()

    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert (value.int >> 76) & 0xF == 0x7
    assert (value.int >> 62) & 0b11 == 0b10


def test_ids_are_strictly_increasing_and_unique_within_a_process() -> None:
    made = [uuid7() for _ in range(100_000)]

    assert all(a < b for a, b in pairwise(made))
    assert len({value.int for value in made}) == len(made)
    assert all(value.version == 7 for value in made[::997])


def test_time_is_within_a_few_ms_of_the_wall_clock() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000

    assert before <= uuid7_time_ms(value) <= after + 5
    assert abs(uuid7_time_ms(value) - time.time() * 1000) < 50


@settings(max_examples=200, deadline=None, database=None)
@given(ms=st.integers(min_value=0, max_value=MAX_MS), sub_ms=st.integers(0, 999_999))
def test_now_ns_gives_the_given_millisecond(ms: int, sub_ms: int) -> None:
    value = uuid7(now_ns=ms * 1_000_000 + sub_ms)

    assert uuid7_time_ms(value) == ms
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_back_dated_ids_do_not_disturb_the_monotonic_sequence() -> None:
    first = uuid7()
    uuid7(now_ns=0)
    assert uuid7() > first


def test_a_spent_counter_borrows_the_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_clock(monkeypatch, 1_700_000_000_000)

    made = [uuid7() for _ in range(10_000)]

    assert all(a < b for a, b in pairwise(made))
    stamps = [uuid7_time_ms(value) for value in made]
    assert stamps[0] == 1_700_000_000_000
    assert stamps[-1] > stamps[0]
    assert set(stamps) <= set(range(1_700_000_000_000, 1_700_000_000_004))


def test_a_clock_going_backwards_keeps_ids_increasing(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_clock(monkeypatch, 1_700_000_000_010, 1_700_000_000_000, 1_700_000_000_005)

    made = [uuid7() for _ in range(3)]

    assert made[0] < made[1] < made[2]
    assert [uuid7_time_ms(value) for value in made] == [1_700_000_000_010] * 3
