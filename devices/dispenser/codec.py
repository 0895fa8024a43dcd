"""Sans-IO codec for the dispenser serial line protocol, version 1.

The specification is ``docs/protocols/dispenser.md``. A frame on the wire is
``7E stuffed(VER SEQ TYPE LEN_HI LEN_LO PAYLOAD CRC_HI CRC_LO) 7E``: HDLC-style byte
stuffing (``7D`` escapes ``7E`` and ``7D`` as ``7D 5E`` and ``7D 5D``), a big-endian
length and a CRC-16/CCITT-FALSE over the unstuffed header and payload.

The message models live in ``messages.py`` (field codecs and code tables in
``fields.py``) and are re-exported here, so this module is the codec's whole surface.
``encode(frame)`` makes the bytes; ``DispenserDecoder.feed(data)`` takes bytes in any
split and returns good frames and ``BadFrame`` reports, counting each reason; it never
raises on input.
"""

from __future__ import annotations

import binascii
import struct
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from devices.dispenser.fields import (
    NakReason,
    PayloadError,
    ReplyStatus,
    ScheduledDose,
    TamperCause,
    Vkp,
)
from devices.dispenser.messages import (
    MESSAGE_TYPES,
    Ack,
    Battery,
    ClockReply,
    Command,
    DeviceMessage,
    DoseDue,
    DoseMissed,
    DoseTaken,
    Empty,
    Heartbeat,
    Jammed,
    LinkMessage,
    Message,
    Nak,
    PowerLost,
    PowerRestored,
    RefillNeeded,
    Reply,
    RunTest,
    ScheduleReply,
    SetSchedule,
    SyncClock,
    Tamper,
    TestReply,
)

__all__ = [
    "CRC_SIZE",
    "ESCAPE",
    "FLAG",
    "HEADER_SIZE",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "MESSAGE_TYPES",
    "VERSION",
    "Ack",
    "BadFrame",
    "Battery",
    "ClockReply",
    "Command",
    "DecodeError",
    "DeviceMessage",
    "DispenserDecoder",
    "DoseDue",
    "DoseMissed",
    "DoseTaken",
    "Empty",
    "Frame",
    "Heartbeat",
    "Jammed",
    "LinkMessage",
    "Message",
    "Nak",
    "NakReason",
    "PayloadError",
    "PowerLost",
    "PowerRestored",
    "RefillNeeded",
    "Reply",
    "ReplyStatus",
    "RunTest",
    "ScheduleReply",
    "ScheduledDose",
    "SetSchedule",
    "SyncClock",
    "Tamper",
    "TamperCause",
    "TestReply",
    "Vkp",
    "crc16",
    "decode_body",
    "encode",
    "stuff",
]

FLAG: Final = 0x7E
ESCAPE: Final = 0x7D
_ESCAPE_XOR: Final = 0x20
VERSION: Final = 1
HEADER_SIZE: Final = 5
CRC_SIZE: Final = 2
MAX_PAYLOAD: Final = 1024
MAX_FRAME: Final = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE
"""The longest frame between flags, unstuffed: also the decoder's buffer cap."""

_HEADER = struct.Struct(">BBBH")


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final XOR."""
    return binascii.crc_hqx(data, 0xFFFF)


def stuff(body: bytes) -> bytes:
    """Escape every ``7D`` and ``7E`` in ``body`` (``7D`` first, so escapes stay single)."""
    return body.replace(b"\x7d", b"\x7d\x5d").replace(b"\x7e", b"\x7d\x5e")


# --- frames ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """A message with its sequence number (for ACK, NAK and replies: the one answered)."""

    seq: int
    message: Message

    def __post_init__(self) -> None:
        if not 0 <= self.seq <= 0xFF:
            raise ValueError(f"seq must be 0..255, got {self.seq}")


def encode(frame: Frame) -> bytes:
    """The frame as it goes on the wire, flags included."""
    payload = frame.message.to_payload()
    body = _HEADER.pack(VERSION, frame.seq, frame.message.TYPE, len(payload)) + payload
    body += crc16(body).to_bytes(CRC_SIZE, "big")
    return bytes([FLAG]) + stuff(body) + bytes([FLAG])


class DecodeError(StrEnum):
    """Why input was discarded; also the decoder's counter names."""

    GARBAGE = "garbage"
    """Bytes before the first flag: the receiver joined the line mid-frame, or noise."""
    SHORT = "short_frame"
    BAD_ESCAPE = "bad_escape"
    OVERFLOW = "overflow"
    BAD_CRC = "bad_crc"
    BAD_VERSION = "bad_version"
    BAD_LENGTH = "bad_length"
    UNKNOWN_TYPE = "unknown_type"
    BAD_PAYLOAD = "bad_payload"

    @property
    def intact(self) -> bool:
        """True if the frame passed its CRC: it arrived as sent, so resending cannot help."""
        return self in _INTACT


_INTACT = frozenset(
    {
        DecodeError.BAD_VERSION,
        DecodeError.BAD_LENGTH,
        DecodeError.UNKNOWN_TYPE,
        DecodeError.BAD_PAYLOAD,
    }
)


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Input the decoder discarded. ``seq`` and ``type_code`` are set once the CRC passed."""

    reason: DecodeError
    raw: bytes
    detail: str = ""
    seq: int | None = None
    type_code: int | None = None


def decode_body(body: bytes) -> Frame | BadFrame:  # noqa: PLR0911 - one return per check
    """Check and parse one unstuffed frame (the bytes between two flags)."""
    raw = bytes(body)
    if len(raw) < HEADER_SIZE + CRC_SIZE:
        return BadFrame(DecodeError.SHORT, raw, f"{len(raw)} bytes")
    if crc16(raw[:-CRC_SIZE]) != int.from_bytes(raw[-CRC_SIZE:], "big"):
        return BadFrame(DecodeError.BAD_CRC, raw)
    version, seq, type_code, length = _HEADER.unpack_from(raw)
    known = {"seq": seq, "type_code": type_code}
    if version != VERSION:
        return BadFrame(DecodeError.BAD_VERSION, raw, f"version {version}", **known)
    if length != len(raw) - HEADER_SIZE - CRC_SIZE:
        detail = f"LEN {length}, payload {len(raw) - HEADER_SIZE - CRC_SIZE}"
        return BadFrame(DecodeError.BAD_LENGTH, raw, detail, **known)
    cls = MESSAGE_TYPES.get(type_code)
    if cls is None:
        return BadFrame(DecodeError.UNKNOWN_TYPE, raw, f"type 0x{type_code:02X}", **known)
    try:
        message = cls.from_payload(raw[HEADER_SIZE:-CRC_SIZE])
    except PayloadError as exc:
        return BadFrame(DecodeError.BAD_PAYLOAD, raw, f"{cls.__name__}: {exc}", **known)
    return Frame(seq, message)


class DispenserDecoder:
    """Bytes in any split to frames. Never raises on input; counts every discard by reason.

    ``counters`` holds one count per ``DecodeError`` value seen, and ``frames`` for good
    ones. The buffer never holds more than ``MAX_FRAME`` bytes: a longer run without a
    flag is reported once as ``overflow`` and skipped up to the next flag.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.counters: Counter[str] = Counter()
        self._buffer = bytearray()
        self._hunting = True  # before the first flag, every byte is garbage
        self._skipping = False  # after an overflow or a bad escape, silently to the next flag
        self._escaped = False

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (never more than ``max_frame``)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        out: list[Frame | BadFrame] = []
        for byte in data:
            item = self._byte(byte)
            if item is not None:
                self.counters["frames" if isinstance(item, Frame) else item.reason] += 1
                out.append(item)
        return out

    def _byte(self, byte: int) -> Frame | BadFrame | None:
        if byte == FLAG:
            return self._flag()
        if self._skipping:
            return None
        if self._hunting:
            self._buffer.append(byte)
            if len(self._buffer) > self.max_frame:  # keep the report bounded, keep hunting
                del self._buffer[: -self.max_frame]
            return None
        return self._frame_byte(byte)

    def _frame_byte(self, byte: int) -> BadFrame | None:
        if self._escaped:
            self._escaped = False
            if byte not in (FLAG ^ _ESCAPE_XOR, ESCAPE ^ _ESCAPE_XOR):
                return self._abandon(DecodeError.BAD_ESCAPE, f"7D {byte:02X}")
            byte ^= _ESCAPE_XOR
        elif byte == ESCAPE:
            self._escaped = True
            return None
        if len(self._buffer) >= self.max_frame:
            return self._abandon(DecodeError.OVERFLOW, f"more than {self.max_frame} bytes")
        self._buffer.append(byte)
        return None

    def _flag(self) -> Frame | BadFrame | None:
        body = bytes(self._buffer)
        hunting, skipping, escaped = self._hunting, self._skipping, self._escaped
        self._buffer.clear()
        self._hunting = self._skipping = self._escaped = False
        if skipping:
            return None
        if hunting:
            return BadFrame(DecodeError.GARBAGE, body) if body else None
        if escaped:
            return BadFrame(DecodeError.BAD_ESCAPE, body, "7D before a flag (abort)")
        if not body:
            return None  # back-to-back flags: idle fill, or the end and start of two frames
        return decode_body(body)

    def _abandon(self, reason: DecodeError, detail: str) -> BadFrame:
        raw = bytes(self._buffer)
        self._buffer.clear()
        self._escaped = False
        self._skipping = True
        return BadFrame(reason, raw, detail)
