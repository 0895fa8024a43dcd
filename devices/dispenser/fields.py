"""Field codecs and code tables of the dispenser protocol (``docs/protocols/dispenser.md``).

A message's layout is a table of (name, field codec). A field codec checks a value when a
message is built, packs it into bytes and unpacks it from a payload; unpacking raises
``PayloadError`` for anything out of range, so a decoder never builds an invalid message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import IntEnum, StrEnum
from typing import Any, Final

MIN_TIME_S: Final = 946_684_800
"""2000-01-01T00:00:00Z. A device time below it means "clock not set" (sent as 0)."""
MAX_TIME_S: Final = 0xFFFF_FFFF
MAX_DOSE_ID: Final = 32
MAX_DOSES: Final = 24
DOSE_ID_PATTERN: Final = r"[A-Za-z0-9._:-]{1,32}"
MIN_UTC_OFFSET: Final = -12 * 60
MAX_UTC_OFFSET: Final = 14 * 60

_DOSE_ID_RE = re.compile(DOSE_ID_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


class PayloadError(ValueError):
    """A payload that does not match its message's layout."""


class Vkp(StrEnum):
    """Dispenser alert codes of Norway's welfare-technology hub (VKP code system
    ``vkp-alert-code``), the ones this protocol carries. Wire form: two bytes, major and
    minor (1.17 is ``01 11``); ``00 00`` where a field is optional and nothing applies.
    """

    NOT_DISPENSED = "1.1"
    NO_MEDICINE = "1.2"
    """Not dispensed: blocked by missing medicine."""
    NO_CONFIRMATION = "1.3"
    """Unknown whether the dose was dispensed: no confirmation."""
    NOT_READ = "1.4"
    """The reminder was not acknowledged by the resident."""
    TECHNICAL_ERROR = "1.5"
    POUCH_NOT_READ = "1.6"
    ROLL_ERROR = "1.7"
    ROLL_STUCK = "1.8"
    DRAWER_FULL = "1.9"
    """The drawer for doses not taken is full."""
    SOON_EMPTY = "1.12"
    EMPTY = "1.13"
    BATTERY_LOW = "1.17"
    BATTERY_EMPTY = "1.18"
    NO_MAINS_POWER = "1.19"

    @property
    def wire(self) -> bytes:
        major, minor = self.value.split(".")
        return bytes([int(major), int(minor)])


class NakReason(IntEnum):
    """Why a frame was refused. The first three are transient: the sender resends at once."""

    BAD_CRC = 0x01
    BAD_FRAME = 0x02
    """Too short, a bad escape or too long: damaged on the line."""
    BUSY = 0x03
    BAD_VERSION = 0x10
    BAD_LENGTH = 0x11
    UNKNOWN_TYPE = 0x12
    BAD_PAYLOAD = 0x13
    UNEXPECTED = 0x14
    """A valid message that the receiver does not accept in this direction."""

    @property
    def transient(self) -> bool:
        return self < NakReason.BAD_VERSION


class ReplyStatus(IntEnum):
    OK = 0x00
    INVALID = 0x01
    """The command's values were refused (for example a schedule the device cannot hold)."""
    BUSY = 0x02
    """Dispensing or a refill is in progress; try again later."""
    FAULT = 0x03
    """The device could not carry it out (a failed self-test, a storage error)."""
    UNSUPPORTED = 0x04


class TamperCause(IntEnum):
    LID_FORCED = 0x01
    CASE_OPENED = 0x02
    MOVED = 0x03
    """Lifted or removed from its mount."""


@dataclass(frozen=True, slots=True)
class ScheduledDose:
    """One dose of a daily schedule, at a local wall-clock time (hours and minutes)."""

    dose_id: str
    at: time

    def __post_init__(self) -> None:
        DOSE_ID.check(self.dose_id)
        if not isinstance(self.at, time) or self.at.tzinfo is not None:
            raise ValueError(f"dose time must be a naive local time, got {self.at!r}")
        if self.at.second or self.at.microsecond:
            raise ValueError(f"dose time has whole minutes only, got {self.at}")


def _take(data: bytes, offset: int, size: int) -> bytes:
    end = offset + size
    if end > len(data):
        raise PayloadError(f"payload ends at byte {len(data)}, field needs {end}")
    return data[offset:end]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FieldCodec:
    """Checks, packs and unpacks one field. Subclasses override all three."""

    def check(self, value: Any) -> None:
        raise NotImplementedError

    def pack(self, value: Any) -> bytes:
        raise NotImplementedError

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UInt(FieldCodec):
    size: int
    maximum: int | None = None

    def limited(self, maximum: int) -> UInt:
        return UInt(self.size, maximum)

    @property
    def top(self) -> int:
        return (1 << (8 * self.size)) - 1 if self.maximum is None else self.maximum

    def check(self, value: Any) -> None:
        if not _is_int(value) or not 0 <= value <= self.top:
            raise ValueError(f"expected an integer 0..{self.top}, got {value!r}")

    def pack(self, value: Any) -> bytes:
        return int(value).to_bytes(self.size, "big")

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        value = int.from_bytes(_take(data, offset, self.size), "big")
        if value > self.top:
            raise PayloadError(f"{value} is above {self.top}")
        return value, offset + self.size


class _Bool(FieldCodec):
    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"expected a bool, got {value!r}")

    def pack(self, value: Any) -> bytes:
        return b"\x01" if value else b"\x00"

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        byte = _take(data, offset, 1)[0]
        if byte > 1:
            raise PayloadError(f"a flag is 0 or 1, got {byte}")
        return byte == 1, offset + 1


@dataclass(frozen=True, slots=True)
class _Time(FieldCodec):
    """UTC seconds since 1970 as uint32. ``optional``: ``None`` is 0 (clock not set)."""

    optional: bool

    def check(self, value: Any) -> None:
        if value is None and self.optional:
            return
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
        if value.microsecond:
            raise ValueError(f"times have whole seconds only, got {value.isoformat()}")
        if not MIN_TIME_S <= (value - _EPOCH) // _SECOND <= MAX_TIME_S:
            raise ValueError(f"time out of range 2000-01-01..2106-02-07: {value.isoformat()}")

    def pack(self, value: Any) -> bytes:
        seconds = 0 if value is None else (value - _EPOCH) // _SECOND
        return int(seconds).to_bytes(4, "big")

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        seconds = int.from_bytes(_take(data, offset, 4), "big")
        if seconds < MIN_TIME_S:
            if not self.optional:
                raise PayloadError(f"time {seconds} is before 2000-01-01")
            return None, offset + 4
        return _EPOCH + seconds * _SECOND, offset + 4


class _DoseId(FieldCodec):
    """A length byte (1..32) and that many ASCII characters from ``[A-Za-z0-9._:-]``."""

    def check(self, value: Any) -> None:
        if not isinstance(value, str) or not _DOSE_ID_RE.fullmatch(value):
            raise ValueError(f"dose id must match {DOSE_ID_PATTERN}, got {value!r}")

    def pack(self, value: Any) -> bytes:
        text = str(value).encode("ascii")
        return bytes([len(text)]) + text

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        size = _take(data, offset, 1)[0]
        raw = _take(data, offset + 1, size)
        text = raw.decode("ascii", errors="replace")
        if not _DOSE_ID_RE.fullmatch(text):
            raise PayloadError(f"dose id {raw!r} does not match {DOSE_ID_PATTERN}")
        return text, offset + 1 + size


class VkpField(FieldCodec):
    """A VKP code from ``allowed``; ``optional`` lets ``00 00`` mean none."""

    def __init__(self, *allowed: Vkp, optional: bool = False) -> None:
        self.allowed = frozenset(allowed)
        self.optional = optional

    def check(self, value: Any) -> None:
        if value is None and self.optional:
            return
        if value not in self.allowed:
            codes = ", ".join(sorted(self.allowed))
            raise ValueError(f"VKP code must be one of {codes}, got {value!r}")

    def pack(self, value: Any) -> bytes:
        return b"\x00\x00" if value is None else Vkp(value).wire

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        major, minor = _take(data, offset, 2)
        if major == minor == 0 and self.optional:
            return None, offset + 2
        try:
            code = Vkp(f"{major}.{minor}")
        except ValueError:
            raise PayloadError(f"unknown VKP code {major}.{minor}") from None
        if code not in self.allowed:
            raise PayloadError(f"VKP code {code} does not belong in this message")
        return code, offset + 2


class _Enum(FieldCodec):
    def __init__(self, enum: type[IntEnum]) -> None:
        self.enum = enum

    def check(self, value: Any) -> None:
        if not isinstance(value, self.enum):
            raise TypeError(f"expected a {self.enum.__name__}, got {value!r}")

    def pack(self, value: Any) -> bytes:
        return bytes([int(value)])

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        byte = _take(data, offset, 1)[0]
        try:
            return self.enum(byte), offset + 1
        except ValueError:
            raise PayloadError(f"unknown {self.enum.__name__} 0x{byte:02X}") from None


class _UtcOffset(FieldCodec):
    """Minutes east of UTC as int16, -720..+840."""

    def check(self, value: Any) -> None:
        if not _is_int(value) or not MIN_UTC_OFFSET <= value <= MAX_UTC_OFFSET:
            raise ValueError(f"UTC offset must be -720..840 minutes, got {value!r}")

    def pack(self, value: Any) -> bytes:
        return int(value).to_bytes(2, "big", signed=True)

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        value = int.from_bytes(_take(data, offset, 2), "big", signed=True)
        try:
            self.check(value)
        except ValueError as exc:
            raise PayloadError(str(exc)) from None
        return value, offset + 2


class _Schedule(FieldCodec):
    """A count byte (0..24), then per dose: hour, minute, dose id."""

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(d, ScheduledDose) for d in value):
            raise ValueError("doses must be a tuple of ScheduledDose")
        if len(value) > MAX_DOSES:
            raise ValueError(f"at most {MAX_DOSES} doses, got {len(value)}")
        ids = [dose.dose_id for dose in value]
        if len(set(ids)) != len(ids):
            raise ValueError("dose ids must be unique within a schedule")

    def pack(self, value: Any) -> bytes:
        parts = [bytes([len(value)])]
        for dose in value:
            parts.append(bytes([dose.at.hour, dose.at.minute]) + DOSE_ID.pack(dose.dose_id))
        return b"".join(parts)

    def unpack(self, data: bytes, offset: int) -> tuple[Any, int]:
        count = _take(data, offset, 1)[0]
        offset += 1
        doses = []
        for _ in range(count):
            hour, minute = _take(data, offset, 2)
            if hour > 23 or minute > 59:
                raise PayloadError(f"dose time {hour:02d}:{minute:02d} is not a time of day")
            dose_id, offset = DOSE_ID.unpack(data, offset + 2)
            doses.append(ScheduledDose(dose_id, time(hour, minute)))
        value = tuple(doses)
        try:
            self.check(value)
        except ValueError as exc:
            raise PayloadError(str(exc)) from None
        return value, offset


U8: Final = UInt(1)
U16: Final = UInt(2)
U32: Final = UInt(4)
BOOL: Final = _Bool()
DEVICE_TIME: Final = _Time(optional=True)
TIMESTAMP: Final = _Time(optional=False)
DOSE_ID: Final = _DoseId()
NAK_REASON: Final = _Enum(NakReason)
STATUS: Final = _Enum(ReplyStatus)
CAUSE: Final = _Enum(TamperCause)
UTC_OFFSET: Final = _UtcOffset()
SCHEDULE: Final = _Schedule()
