"""Sans-IO codec for ESPA 4.4.4, the serial interface of nurse-call and paging systems.

Our reading of the protocol, with sources, is ``docs/protocols/espa444.md``. On the wire:

- a data block is ``SOH header STX record (RS record)* ETX BCC``; a record is
  ``number US value``; BCC is the XOR of every byte after SOH up to and including ETX;
- an enquiry is an address character and ENQ (``2 ENQ`` polls or selects station 2);
- the replies ACK, NAK and EOT are single bytes.

``encode(frame)`` makes the bytes of a frame. ``EspaDecoder.feed(data)`` takes bytes in
any split and returns frames, and ``EspaBadBlock`` reports for blocks that arrived but
cannot be used (bad BCC, no STX, too long) so the session can answer NAK. It never raises
on input: bad input is counted per reason in ``counters`` and skipped, and the decoder
resynchronises on the next SOH, ENQ or reply byte.

Text is carried as ``str`` decoded with ISO 8859-1, a lossless byte-for-character
mapping, so a block decodes and re-encodes to the same bytes. ESPA 4.4.4 specifies the
7-bit ISO 646 set with national variants; ``translate_national`` maps the variant letters
(``[`` is ``Æ`` in Norwegian) when the central is known to use one.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal

__all__ = [
    "ACK",
    "EMPTY_ADDRESS",
    "ENQ",
    "EOT",
    "ETX",
    "HEADER_CALL_TO_PAGER",
    "HEADER_CALL_TO_SUBSCRIBER",
    "HEADER_STATUS_INFORMATION",
    "HEADER_STATUS_REQUEST",
    "MAX_BLOCK",
    "NAK",
    "RECORD_BEEP_CODING",
    "RECORD_CALL_ADDRESS",
    "RECORD_CALL_STATUS",
    "RECORD_CALL_TYPE",
    "RECORD_DISPLAY_MESSAGE",
    "RECORD_PRIORITY",
    "RECORD_TRANSMISSIONS",
    "RS",
    "SOH",
    "STX",
    "US",
    "ControlCode",
    "EspaBadBlock",
    "EspaBlock",
    "EspaCall",
    "EspaControl",
    "EspaDecoder",
    "EspaEnquiry",
    "EspaFrame",
    "EspaItem",
    "EspaRecord",
    "NationalVariant",
    "bcc",
    "encode",
    "translate_national",
]

SOH: Final = 0x01
STX: Final = 0x02
ETX: Final = 0x03
EOT: Final = 0x04
ENQ: Final = 0x05
ACK: Final = 0x06
NAK: Final = 0x15
US: Final = 0x1F
"""Information separator 1: between a record's number and its value."""
RS: Final = 0x1E
"""Information separator 2: between records."""

HEADER_CALL_TO_PAGER: Final = "1"
HEADER_STATUS_INFORMATION: Final = "2"
HEADER_STATUS_REQUEST: Final = "3"
HEADER_CALL_TO_SUBSCRIBER: Final = "4"

MAX_BLOCK: Final = 1024
"""Bytes between SOH and ETX that the decoder keeps; a longer block is discarded.

The display message (record 2) is at most 128 characters by the standard; the other
records are a few digits each, so a real block is far below this.
"""

EMPTY_ADDRESS: Final = ""
"""The address of an ENQ that came without an address character."""

_FRAMING: Final = frozenset({SOH, STX, ETX, EOT, ENQ, ACK, NAK, US, RS})
"""Bytes that may not appear inside a header, a record number or a record value."""


class ControlCode(IntEnum):
    """The single-byte replies of the link layer."""

    ACK = ACK
    NAK = NAK
    EOT = EOT


def bcc(data: bytes) -> int:
    """The block check character: XOR of ``data`` (the bytes after SOH, ETX included)."""
    return functools.reduce(operator.xor, data, 0)


def _check_text(what: str, value: str, *, allow_empty: bool = True) -> None:
    if not value and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{what} has a character outside ISO 8859-1") from None
    if any(byte in _FRAMING for byte in raw):
        raise ValueError(f"{what} contains an ESPA control character")


# --- frames ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EspaRecord:
    """One data record: its number (``"1"`` call address, ...) and its value."""

    number: str
    value: str

    def __post_init__(self) -> None:
        _check_text("record number", self.number, allow_empty=False)
        _check_text("record value", self.value)


@dataclass(frozen=True, slots=True)
class EspaBlock:
    """A data block: a header (``"1"`` is a call to pager) and its records, in order."""

    header: str
    records: tuple[EspaRecord, ...] = ()

    def __post_init__(self) -> None:
        _check_text("header", self.header, allow_empty=False)

    def get(self, number: str) -> str | None:
        """The value of the first record with this number, or None."""
        for record in self.records:
            if record.number == number:
                return record.value
        return None


@dataclass(frozen=True, slots=True)
class EspaEnquiry:
    """``address ENQ``: a poll or a selection; which one depends on what came before."""

    address: str

    def __post_init__(self) -> None:
        if self.address == EMPTY_ADDRESS:
            return
        if len(self.address) != 1 or not 0x20 <= ord(self.address) <= 0xFF:
            raise ValueError("an address is one printable ISO 8859-1 character")


@dataclass(frozen=True, slots=True)
class EspaControl:
    """A reply byte: ACK, NAK or EOT."""

    code: ControlCode


@dataclass(frozen=True, slots=True)
class EspaBadBlock:
    """A block that arrived but cannot be used; the receiver answers NAK.

    ``reason`` is ``bad_bcc``, ``malformed`` (no STX, an empty header, a stray control
    character) or ``oversize``. The block's bytes are not kept: a display message may
    name a resident.
    """

    reason: Literal["bad_bcc", "malformed", "oversize"]
    size: int


EspaFrame = EspaBlock | EspaEnquiry | EspaControl
EspaItem = EspaFrame | EspaBadBlock


def encode(frame: EspaFrame) -> bytes:
    """The bytes of one frame."""
    if isinstance(frame, EspaControl):
        return bytes([frame.code])
    if isinstance(frame, EspaEnquiry):
        return frame.address.encode("latin-1") + bytes([ENQ])
    records = bytes([RS]).join(
        record.number.encode("latin-1") + bytes([US]) + record.value.encode("latin-1")
        for record in frame.records
    )
    body = frame.header.encode("latin-1") + bytes([STX]) + records + bytes([ETX])
    return bytes([SOH]) + body + bytes([bcc(body)])


# --- decoder --------------------------------------------------------------------------

_IDLE: Final = 0
_BLOCK: Final = 1
_CHECK: Final = 2
_DISCARD: Final = 3
_DISCARD_CHECK: Final = 4

_INTERRUPTS: Final = frozenset({EOT, ENQ, ACK, NAK})
"""Bytes that end a block in progress: the sender gave up on it."""


class EspaDecoder:
    """Bytes in any split to frames; bad input counted in ``counters`` and skipped.

    Counter names: ``blocks``, ``enquiries``, ``controls`` for good frames; ``garbage``
    (bytes outside any frame), ``bad_bcc``, ``malformed``, ``oversize``, ``truncated`` (a
    block cut short by SOH, EOT, ENQ, ACK or NAK), ``empty_record``, ``record_without_us``
    and ``record_without_number`` (records skipped inside an otherwise good block).
    """

    def __init__(self, *, max_block: int = MAX_BLOCK) -> None:
        if max_block < 4:
            raise ValueError("max_block must leave room for a header, STX and a record")
        self.max_block = max_block
        self.counters: Counter[str] = Counter()
        self._state = _IDLE
        self._buffer = bytearray()
        self._address: int | None = None
        """A printable byte seen while idle: the address of an ENQ that may follow."""
        self._discarded = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete block (never more than ``max_block``)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[EspaItem]:
        """Decode ``data``; returns the frames and bad-block reports it completes."""
        out: list[EspaItem] = []
        for byte in data:
            self._step(byte, out)
        return out

    def _step(self, byte: int, out: list[EspaItem]) -> None:
        if self._state == _IDLE:
            self._idle(byte, out)
        elif self._state == _BLOCK:
            self._in_block(byte, out)
        elif self._state == _CHECK:
            self._check(byte, out)
        elif self._state == _DISCARD:
            self._discard(byte, out)
        else:  # _DISCARD_CHECK: this byte is the discarded block's BCC
            self.counters["oversize"] += 1
            out.append(EspaBadBlock("oversize", self._discarded + 1))
            self._state = _IDLE

    def _idle(self, byte: int, out: list[EspaItem]) -> None:
        if byte == ENQ:
            address = EMPTY_ADDRESS if self._address is None else chr(self._address)
            self._address = None
            self.counters["enquiries"] += 1
            out.append(EspaEnquiry(address))
            return
        self._drop_address()
        if byte == SOH:
            self._buffer.clear()
            self._state = _BLOCK
        elif byte in (ACK, NAK, EOT):
            self.counters["controls"] += 1
            out.append(EspaControl(ControlCode(byte)))
        elif byte >= 0x20:
            self._address = byte
        else:
            self.counters["garbage"] += 1

    def _drop_address(self) -> None:
        if self._address is not None:
            self.counters["garbage"] += 1
            self._address = None

    def _in_block(self, byte: int, out: list[EspaItem]) -> None:
        if byte == ETX:
            self._state = _CHECK
        elif byte == SOH:
            self.counters["truncated"] += 1
            self._buffer.clear()
        elif byte in _INTERRUPTS:
            self.counters["truncated"] += 1
            last = self._buffer[-1] if self._buffer else None
            self._buffer.clear()
            self._state = _IDLE
            # An address typed just before ENQ belongs to the enquiry, not the block.
            self._address = last if byte == ENQ and last is not None and last >= 0x20 else None
            self._idle(byte, out)
        elif len(self._buffer) >= self.max_block:
            self._discarded = len(self._buffer) + 2  # SOH, the kept bytes and this one
            self._buffer.clear()
            self._state = _DISCARD
        else:
            self._buffer.append(byte)

    def _check(self, byte: int, out: list[EspaItem]) -> None:
        body = bytes(self._buffer) + bytes([ETX])
        self._buffer.clear()
        self._state = _IDLE
        if byte != bcc(body):
            self.counters["bad_bcc"] += 1
            out.append(EspaBadBlock("bad_bcc", len(body) + 2))
            return
        block = self._parse(body[:-1])
        if block is None:
            self.counters["malformed"] += 1
            out.append(EspaBadBlock("malformed", len(body) + 2))
            return
        self.counters["blocks"] += 1
        out.append(block)

    def _discard(self, byte: int, out: list[EspaItem]) -> None:
        if byte == SOH or byte in _INTERRUPTS:
            self.counters["oversize"] += 1
            out.append(EspaBadBlock("oversize", self._discarded))
            self._state = _IDLE
            self._idle(byte, out)
            return
        self._discarded += 1
        if byte == ETX:
            self._state = _DISCARD_CHECK

    def _parse(self, content: bytes) -> EspaBlock | None:
        header, stx, body = content.partition(bytes([STX]))
        if not stx or not header:
            return None
        records: list[EspaRecord] = []
        for piece in body.split(bytes([RS])):
            if not piece:
                self.counters["empty_record"] += 1
                continue
            number, us, value = piece.partition(bytes([US]))
            if not us:
                self.counters["record_without_us"] += 1
                continue
            if not number:
                self.counters["record_without_number"] += 1
                continue
            try:
                records.append(EspaRecord(number.decode("latin-1"), value.decode("latin-1")))
            except ValueError:  # a second STX or US inside a record
                return None
        try:
            return EspaBlock(header.decode("latin-1"), tuple(records))
        except ValueError:  # a separator inside the header
            return None


# --- calls ----------------------------------------------------------------------------

RECORD_CALL_ADDRESS: Final = "1"
RECORD_DISPLAY_MESSAGE: Final = "2"
RECORD_BEEP_CODING: Final = "3"
RECORD_CALL_TYPE: Final = "4"
RECORD_TRANSMISSIONS: Final = "5"
RECORD_PRIORITY: Final = "6"
RECORD_CALL_STATUS: Final = "7"

_CALL_FIELDS: Final = (
    ("address", RECORD_CALL_ADDRESS),
    ("message", RECORD_DISPLAY_MESSAGE),
    ("beep_code", RECORD_BEEP_CODING),
    ("call_type", RECORD_CALL_TYPE),
    ("transmissions", RECORD_TRANSMISSIONS),
    ("priority", RECORD_PRIORITY),
    ("call_status", RECORD_CALL_STATUS),
)
"""Call fields and their record numbers, in the order ``to_block`` writes them."""


@dataclass(frozen=True, slots=True)
class EspaCall:
    """A call to pager (header 1), records 1 to 7 by name; other records in ``extra``.

    Values are kept as sent (strings of digits mostly), so a call re-encodes to the same
    block; their meaning is the central's configuration and is read by the mapping.
    """

    address: str
    message: str | None = None
    beep_code: str | None = None
    call_type: str | None = None
    transmissions: str | None = None
    priority: str | None = None
    call_status: str | None = None
    extra: tuple[EspaRecord, ...] = ()

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("a call needs a call address (record 1)")
        for name, number in _CALL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                EspaRecord(number, value)  # validates the characters
        if any(record.number in _KNOWN_NUMBERS for record in self.extra):
            raise ValueError("records 1 to 7 are fields of the call, not extra records")

    @classmethod
    def from_block(cls, block: EspaBlock) -> EspaCall:
        """The call in a call-to-pager block; ``ValueError`` if it is not one.

        When a record number repeats, the first record wins for a named field and the
        others are dropped.
        """
        if block.header != HEADER_CALL_TO_PAGER:
            raise ValueError(f"header {block.header!r} is not a call to pager")
        fields = {name: block.get(number) for name, number in _CALL_FIELDS}
        address = fields.pop("address")
        if address is None:
            raise ValueError("a call needs a call address (record 1)")
        extra = tuple(r for r in block.records if r.number not in _KNOWN_NUMBERS)
        return cls(address, extra=extra, **fields)

    def to_block(self) -> EspaBlock:
        """The call-to-pager block for this call."""
        records = [
            EspaRecord(number, value)
            for name, number in _CALL_FIELDS
            if (value := getattr(self, name)) is not None
        ]
        return EspaBlock(HEADER_CALL_TO_PAGER, (*records, *self.extra))


_KNOWN_NUMBERS: Final = frozenset(number for _, number in _CALL_FIELDS)


# --- national variants of ISO 646 -----------------------------------------------------

NationalVariant = Literal["no", "da", "sv", "de"]

_NORDIC_NO_DA: Final = str.maketrans("[\\]{|}", "ÆØÅæøå")
_NATIONAL: Final[dict[str, dict[int, int]]] = {
    "no": _NORDIC_NO_DA,
    "da": _NORDIC_NO_DA,
    "sv": str.maketrans("[\\]{|}~", "ÄÖÅäöåü"),
    "de": str.maketrans("@[\\]{|}~", "§ÄÖÜäöüß"),
}


def translate_national(text: str, variant: NationalVariant | None) -> str:
    """Map the ISO 646 national letters of ``variant`` (``None`` leaves text as it is)."""
    if variant is None:
        return text
    return text.translate(_NATIONAL[variant])
