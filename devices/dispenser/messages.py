"""The messages of the dispenser protocol, version 1 (``docs/protocols/dispenser.md``).

Each message is a frozen dataclass with a type code and a layout: a table of (field name,
field codec) in wire order. Adding a message adds a class and a row in ``MESSAGE_TYPES``,
no parsing code. A message is validated when it is built, so ``encode`` never sends a
value the other side would refuse, and a decoder never builds an invalid one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from devices.dispenser.fields import (
    BOOL,
    CAUSE,
    DEVICE_TIME,
    DOSE_ID,
    NAK_REASON,
    SCHEDULE,
    STATUS,
    TIMESTAMP,
    U8,
    U16,
    U32,
    UTC_OFFSET,
    FieldCodec,
    NakReason,
    PayloadError,
    ReplyStatus,
    ScheduledDose,
    TamperCause,
    Vkp,
    VkpField,
)

Layout = tuple[tuple[str, FieldCodec], ...]

MAX_DOSES_LEFT = 10_000
MAX_VOLTAGE_MV = 60_000


class Message:
    """Base of every message: a type code and a wire layout, validated on construction."""

    __slots__ = ()
    TYPE: ClassVar[int]
    LAYOUT: ClassVar[Layout] = ()

    def __post_init__(self) -> None:
        for name, codec in self.LAYOUT:
            codec.check(getattr(self, name))

    def to_payload(self) -> bytes:
        return b"".join(codec.pack(getattr(self, name)) for name, codec in self.LAYOUT)

    @classmethod
    def from_payload(cls, payload: bytes) -> Message:
        """Parse a payload; raises ``PayloadError`` (a ``ValueError``) if it is not valid."""
        values: dict[str, Any] = {}
        offset = 0
        for name, codec in cls.LAYOUT:
            values[name], offset = codec.unpack(payload, offset)
        if offset != len(payload):
            raise PayloadError(f"{len(payload) - offset} bytes after the last field")
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise PayloadError(str(exc)) from None


class LinkMessage(Message):
    """ACK and NAK: answers on the link, never acknowledged themselves."""

    __slots__ = ()


class DeviceMessage(Message):
    """What a dispenser reports: sent with retries until the gateway acknowledges it."""

    __slots__ = ()


class Command(Message):
    """What the gateway asks of a dispenser: answered by a ``Reply`` instead of an ACK."""

    __slots__ = ()
    REPLY: ClassVar[type[Reply]]


class Reply(Message):
    """A dispenser's answer to a command; its frame carries the command's sequence."""

    __slots__ = ()
    status: ReplyStatus


@dataclass(frozen=True, slots=True)
class Ack(LinkMessage):
    TYPE: ClassVar[int] = 0x01


@dataclass(frozen=True, slots=True)
class Nak(LinkMessage):
    TYPE: ClassVar[int] = 0x02
    LAYOUT: ClassVar[Layout] = (("reason", NAK_REASON),)
    reason: NakReason


@dataclass(frozen=True, slots=True)
class Heartbeat(DeviceMessage):
    """Sent every 60 s: the device is alive; its state at a glance."""

    TYPE: ClassVar[int] = 0x10
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        ("uptime_s", U32),
        ("doses_left", U16.limited(MAX_DOSES_LEFT)),
        ("battery_percent", U8.limited(100)),
        ("mains_powered", BOOL),
    )
    time: datetime | None
    uptime_s: int
    doses_left: int
    battery_percent: int
    mains_powered: bool


_DOSE_LAYOUT: Layout = (
    ("time", DEVICE_TIME),
    ("scheduled_for", TIMESTAMP),
    ("dose_id", DOSE_ID),
)


@dataclass(frozen=True, slots=True)
class DoseDue(DeviceMessage):
    """The dose is ready in the tray and the reminder has started."""

    TYPE: ClassVar[int] = 0x20
    LAYOUT: ClassVar[Layout] = _DOSE_LAYOUT
    time: datetime | None
    dose_id: str
    scheduled_for: datetime


@dataclass(frozen=True, slots=True)
class DoseTaken(DeviceMessage):
    """The resident took the dose out of the tray."""

    TYPE: ClassVar[int] = 0x21
    LAYOUT: ClassVar[Layout] = _DOSE_LAYOUT
    time: datetime | None
    dose_id: str
    scheduled_for: datetime


@dataclass(frozen=True, slots=True)
class DoseMissed(DeviceMessage):
    """The dose was not dispensed or not taken in time (VKP 1.1 to 1.4)."""

    TYPE: ClassVar[int] = 0x22
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        ("scheduled_for", TIMESTAMP),
        ("vkp", VkpField(Vkp.NOT_DISPENSED, Vkp.NO_MEDICINE, Vkp.NO_CONFIRMATION, Vkp.NOT_READ)),
        ("dose_id", DOSE_ID),
    )
    time: datetime | None
    dose_id: str
    scheduled_for: datetime
    vkp: Vkp = Vkp.NOT_DISPENSED


@dataclass(frozen=True, slots=True)
class RefillNeeded(DeviceMessage):
    """Few doses left (VKP 1.12)."""

    TYPE: ClassVar[int] = 0x30
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        ("vkp", VkpField(Vkp.SOON_EMPTY)),
        ("doses_left", U16.limited(MAX_DOSES_LEFT)),
    )
    time: datetime | None
    doses_left: int
    vkp: Vkp = Vkp.SOON_EMPTY


@dataclass(frozen=True, slots=True)
class Empty(DeviceMessage):
    """No medicine left (VKP 1.13)."""

    TYPE: ClassVar[int] = 0x31
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        ("vkp", VkpField(Vkp.EMPTY)),
    )
    time: datetime | None
    vkp: Vkp = Vkp.EMPTY


@dataclass(frozen=True, slots=True)
class Jammed(DeviceMessage):
    """Dispensing stopped by a jam or a technical error (VKP 1.5 to 1.9)."""

    TYPE: ClassVar[int] = 0x32
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        (
            "vkp",
            VkpField(
                Vkp.TECHNICAL_ERROR,
                Vkp.POUCH_NOT_READ,
                Vkp.ROLL_ERROR,
                Vkp.ROLL_STUCK,
                Vkp.DRAWER_FULL,
            ),
        ),
    )
    time: datetime | None
    vkp: Vkp = Vkp.TECHNICAL_ERROR


@dataclass(frozen=True, slots=True)
class Tamper(DeviceMessage):
    """The lid was forced, the case opened or the dispenser moved from its place."""

    TYPE: ClassVar[int] = 0x40
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        ("cause", CAUSE),
    )
    time: datetime | None
    cause: TamperCause = TamperCause.LID_FORCED


@dataclass(frozen=True, slots=True)
class PowerLost(DeviceMessage):
    """Mains power lost; running on battery (VKP 1.19)."""

    TYPE: ClassVar[int] = 0x50
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        ("vkp", VkpField(Vkp.NO_MAINS_POWER)),
    )
    time: datetime | None
    vkp: Vkp = Vkp.NO_MAINS_POWER


@dataclass(frozen=True, slots=True)
class PowerRestored(DeviceMessage):
    """Mains power is back (also sent once after a cold start on mains)."""

    TYPE: ClassVar[int] = 0x51
    LAYOUT: ClassVar[Layout] = (("time", DEVICE_TIME),)
    time: datetime | None


@dataclass(frozen=True, slots=True)
class Battery(DeviceMessage):
    """A battery reading; ``vkp`` is set when the device judges it low (1.17) or empty (1.18)."""

    TYPE: ClassVar[int] = 0x52
    LAYOUT: ClassVar[Layout] = (
        ("time", DEVICE_TIME),
        ("level_percent", U8.limited(100)),
        ("voltage_mv", U16.limited(MAX_VOLTAGE_MV)),
        ("vkp", VkpField(Vkp.BATTERY_LOW, Vkp.BATTERY_EMPTY, optional=True)),
    )
    time: datetime | None
    level_percent: int
    voltage_mv: int
    vkp: Vkp | None = None


@dataclass(frozen=True, slots=True)
class ScheduleReply(Reply):
    TYPE: ClassVar[int] = 0x90
    LAYOUT: ClassVar[Layout] = (
        ("status", STATUS),
        ("doses_stored", U8),
    )
    status: ReplyStatus
    doses_stored: int = 0


@dataclass(frozen=True, slots=True)
class ClockReply(Reply):
    """``previous_time``: the device clock when the command arrived (None if it was not set)."""

    TYPE: ClassVar[int] = 0x91
    LAYOUT: ClassVar[Layout] = (
        ("status", STATUS),
        ("previous_time", DEVICE_TIME),
    )
    status: ReplyStatus
    previous_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class TestReply(Reply):
    """The outcome of the self-test (buzzer, display, motor, sensors) and when it ran."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name
    TYPE: ClassVar[int] = 0x92
    LAYOUT: ClassVar[Layout] = (
        ("status", STATUS),
        ("time", DEVICE_TIME),
    )
    status: ReplyStatus
    time: datetime | None = None


@dataclass(frozen=True, slots=True)
class SetSchedule(Command):
    """Replace the whole schedule: each dose at a local wall-clock time, every day."""

    TYPE: ClassVar[int] = 0x80
    REPLY: ClassVar[type[Reply]] = ScheduleReply
    LAYOUT: ClassVar[Layout] = (("doses", SCHEDULE),)
    doses: tuple[ScheduledDose, ...]


@dataclass(frozen=True, slots=True)
class SyncClock(Command):
    """Set the device clock to UTC ``time``; local time is UTC plus ``utc_offset_minutes``."""

    TYPE: ClassVar[int] = 0x81
    REPLY: ClassVar[type[Reply]] = ClockReply
    LAYOUT: ClassVar[Layout] = (
        ("time", TIMESTAMP),
        ("utc_offset_minutes", UTC_OFFSET),
    )
    time: datetime
    utc_offset_minutes: int = 0


@dataclass(frozen=True, slots=True)
class RunTest(Command):
    """Run the self-test now and report it (the daily test of the whole path)."""

    TYPE: ClassVar[int] = 0x82
    REPLY: ClassVar[type[Reply]] = TestReply


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Ack,
        Nak,
        Heartbeat,
        DoseDue,
        DoseTaken,
        DoseMissed,
        RefillNeeded,
        Empty,
        Jammed,
        Tamper,
        PowerLost,
        PowerRestored,
        Battery,
        SetSchedule,
        SyncClock,
        RunTest,
        ScheduleReply,
        ClockReply,
        TestReply,
    )
}
