"""UUIDv7 (RFC 9562) from the standard library: time-ordered, unique, made at capture.

Python 3.11 has no ``uuid.uuid7``; this follows RFC 9562 section 6.2 method 1: a 48-bit
Unix millisecond timestamp, then a 12-bit counter (rand_a) that keeps ids made in the
same millisecond by one process increasing, then 62 random bits.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7(now_ns: int | None = None) -> uuid.UUID:
    """A new UUIDv7. ``now_ns`` (Unix time in ns) is for tests and back-dated events."""
    global _last_ms, _counter  # noqa: PLW0603 - process-wide monotonic state, locked
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    with _lock:
        if now_ns is None:
            if ms <= _last_ms:
                _counter += 1
                if _counter > 0xFFF:  # counter spent: borrow the next millisecond
                    _last_ms += 1
                    _counter = 0
                ms = _last_ms
            else:
                _last_ms = ms
                _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
            counter = _counter
        else:
            counter = int.from_bytes(os.urandom(2), "big") & 0xFFF
    tail = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | tail
    return uuid.UUID(int=value)


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The Unix millisecond timestamp inside a UUIDv7."""
    return value.int >> 80
