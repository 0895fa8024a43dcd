"""SIA DC-09 over TCP, sans-IO: frames, their content (DC-03 SIA and DC-05 Contact ID), answers.

A frame on the wire (parts in parentheses are optional)::

    \\n CRC LLLL "ID"seq (R<rcv>)(L<line>)(#<acct>) [data] ([x-data]...)(_HH:MM:SS,MM-DD-YYYY) \\r

CRC is CRC-16/ARC as 4 hex digits and LLLL the length as ``0`` + 3 hex digits, both over
the message from the first ``"`` to the end of the timestamp. An ID with a leading ``*``
is encrypted: everything after ``[`` is then hex cipher text (AES-CBC), which this layer
keeps as it is. Text is read as Latin-1 so that any byte survives a round trip (panels
put local-language zone names in x-data); the protocol itself is ASCII.

``SiaDecoder.feed`` cuts frames out of a byte stream: bytes before ``\\n`` are skipped and
counted, a frame whose CRC or length does not match (or whose header cannot be read)
becomes a ``SiaBadFrame`` so the receiver can answer NAK, and a frame that never ends is
dropped once it passes the buffer cap. ``parse_message`` reads a frame's content;
``ack_for``, ``nak`` and ``duh_for`` build the answers. Nothing here reads a clock.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from devices.errors import DeviceError

MAX_MESSAGE_LENGTH = 0xFFF
"""The length field is ``0`` and three hex digits."""

MAX_FRAME_BYTES = 1 + 8 + MAX_MESSAGE_LENGTH + 1
"""``\\n`` + CRC and length + message + ``\\r``: the decoder's buffer cap."""

PROTOCOL_IDS = frozenset({"SIA-DCS", "ADM-CID", "NULL"})  # keep in step with _PROTOCOLS
"""ID tokens of messages a unit sends; ``ACK``, ``NAK``, ``DUH`` are the receiver's answers."""

TIMESTAMP_AHEAD = timedelta(seconds=20)
TIMESTAMP_BEHIND = timedelta(seconds=40)
"""DC-09 window: a message stamped more than 20 s ahead of, or 40 s behind, the
receiver's clock is answered with NAK (which carries the receiver's time)."""

Qualifier = Literal["new", "restore", "repeat"]


class SiaContentError(DeviceError):
    """A correctly received frame whose content cannot be understood (answered with DUH)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- CRC-16/ARC ---------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (poly 0x8005 reflected, init 0), the CRC of DC-09."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


# --- frames -------------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z0-9-]{1,16}")
_HEX = {n: re.compile(rf"[0-9A-Fa-f]{{1,{n}}}") for n in (6, 16)}
_DIGITS = {n: re.compile(rf"[0-9]{{1,{n}}}") for n in (6, 16)}
_CIPHER = re.compile(r"[0-9A-Fa-f]*")
_TEXT = re.compile(r"[^\[\]\r\n]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class SiaFrame:
    """One DC-09 message, without its CRC and length (``encode`` computes them).

    In a ``NAK`` the account is written ``A<acct>`` (DC-09's ``"NAK"0000R0L0A0[]``), and
    its receiver, line and account are decimal so that form reads back unambiguously.
    """

    message_type: str
    """``SIA-DCS``, ``ADM-CID``, ``NULL``, ``ACK``, ``NAK``, ``DUH``, ... without the ``*``."""
    sequence: int
    data: str = ""
    """Between ``[`` and ``]``; for an encrypted frame, the hex cipher text after ``[``."""
    receiver: str | None = None
    line: str | None = None
    account: str | None = None
    encrypted: bool = False
    extended: tuple[str, ...] = ()
    """Extended data blocks (``[M...]``, ``[X...]``), each without its brackets."""
    timestamp: datetime | None = None
    """UTC, whole seconds."""

    def __post_init__(self) -> None:
        if self.timestamp is not None:
            if self.timestamp.tzinfo is None or self.timestamp.utcoffset() is None:
                raise ValueError("a frame's timestamp must be timezone-aware")
            if self.timestamp.microsecond:
                raise ValueError("a frame's timestamp has whole seconds")
            object.__setattr__(self, "timestamp", self.timestamp.astimezone(UTC))
        _check_fields(self)
        if len(_message_bytes(self)) > MAX_MESSAGE_LENGTH:
            raise ValueError(f"a DC-09 message is at most {MAX_MESSAGE_LENGTH} bytes")


def _check_fields(frame: SiaFrame) -> None:
    if not _TOKEN.fullmatch(frame.message_type):
        raise ValueError(f"invalid ID token {frame.message_type!r}")
    if not 0 <= frame.sequence <= 9999:
        raise ValueError("the sequence number has 4 digits")
    nak = frame.message_type == "NAK"
    for name, value, size in (
        ("receiver", frame.receiver, 6),
        ("line", frame.line, 6),
        ("account", frame.account, 16),
    ):
        pattern = _DIGITS[size] if nak else _HEX[size]
        if value is not None and not pattern.fullmatch(value):
            kind = "decimal" if nak else "hex"
            raise ValueError(f"{name} {value!r} is not 1 to {size} {kind} digits")
    if frame.encrypted:
        if not _CIPHER.fullmatch(frame.data):
            raise ValueError("an encrypted frame's data is hex cipher text")
        if frame.extended or frame.timestamp is not None:
            raise ValueError("an encrypted frame carries its x-data and timestamp encrypted")
        return
    for text in (frame.data, *frame.extended):
        if not _TEXT.fullmatch(text):
            raise ValueError(f"data {text!r} may not contain '[', ']', CR or LF")
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"data {text!r} is not 8-bit text") from None


def _timestamp_text(value: datetime) -> str:
    return (
        f"_{value.hour:02d}:{value.minute:02d}:{value.second:02d},"
        f"{value.month:02d}-{value.day:02d}-{value.year:04d}"
    )


def _message_bytes(frame: SiaFrame) -> bytes:
    parts = ['"*' if frame.encrypted else '"', frame.message_type, '"', f"{frame.sequence:04d}"]
    if frame.receiver is not None:
        parts += ["R", frame.receiver]
    if frame.line is not None:
        parts += ["L", frame.line]
    if frame.account is not None:
        parts += ["A" if frame.message_type == "NAK" else "#", frame.account]
    parts += ["[", frame.data]
    if not frame.encrypted:
        parts.append("]")
        parts += [f"[{block}]" for block in frame.extended]
        if frame.timestamp is not None:
            parts.append(_timestamp_text(frame.timestamp))
    return "".join(parts).encode("latin-1")


def encode(frame: SiaFrame) -> bytes:
    """The frame as bytes on the wire: ``\\n``, CRC, length, message, ``\\r``."""
    message = _message_bytes(frame)
    return b"\n%04X%04X%s\r" % (crc16_arc(message), len(message), message)


@dataclass(frozen=True, slots=True)
class SiaBadFrame:
    """A frame that arrived whole but damaged: answer NAK so the unit sends it again."""

    reason: Literal["header", "length", "crc", "format"]
    raw: bytes
    """The bytes between ``\\n`` and ``\\r``, for the log (never decoded further)."""


_HEADER = re.compile(
    r'"(?P<star>\*)?(?P<token>[A-Za-z0-9-]{1,16})"(?P<seq>[0-9]{4})'
    r"(?:R(?P<receiver>[0-9A-Fa-f]{1,6}))?(?:L(?P<line>[0-9A-Fa-f]{1,6}))?"
    r"(?:(?P<mark>#)(?P<account>[0-9A-Fa-f]{1,16}))?\[(?P<rest>.*)",
    re.DOTALL,
)
_NAK_HEADER = re.compile(
    r'"(?P<star>\*)?(?P<token>NAK)"(?P<seq>[0-9]{4})'
    r"(?:R(?P<receiver>[0-9]{1,6}))?(?:L(?P<line>[0-9]{1,6}))?"
    r"(?:(?P<mark>[#A])(?P<account>[0-9]{1,16}))?\[(?P<rest>.*)",
    re.DOTALL,
)
_PLAIN_REST = re.compile(
    r"(?P<data>[^\[\]\r\n]*)\](?P<ext>(?:\[[^\[\]\r\n]*\])*)"
    r"(?:_(?P<h>\d\d):(?P<mi>\d\d):(?P<s>\d\d),(?P<mo>\d\d)-(?P<d>\d\d)-(?P<y>\d{4}))?",
    re.DOTALL,
)
_HEX_DIGITS = frozenset(b"0123456789ABCDEFabcdef")


def _parse_message(text: str) -> SiaFrame | None:
    header = (_NAK_HEADER if text.startswith('"NAK"') else _HEADER).fullmatch(text)
    if header is None:
        return None
    encrypted = header["star"] is not None
    rest = header["rest"]
    data = rest
    extended: tuple[str, ...] = ()
    timestamp: datetime | None = None
    if encrypted:
        if not _CIPHER.fullmatch(rest):
            return None
    else:
        body = _PLAIN_REST.fullmatch(rest)
        if body is None:
            return None
        data = body["data"]
        extended = tuple(body["ext"][1:-1].split("][")) if body["ext"] else ()
        if body["y"] is not None:
            year, month, day = int(body["y"]), int(body["mo"]), int(body["d"])
            hour, minute, second = int(body["h"]), int(body["mi"]), int(body["s"])
            timestamp = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    return SiaFrame(
        message_type=header["token"],
        sequence=int(header["seq"]),
        receiver=header["receiver"],
        line=header["line"],
        account=header["account"],
        encrypted=encrypted,
        data=data,
        extended=extended,
        timestamp=timestamp,
    )


def decode_frame(body: bytes) -> SiaFrame | SiaBadFrame:
    """Read the bytes between ``\\n`` and ``\\r`` (CRC, length, message) as one frame."""
    head, message = body[:8], body[8:]
    if len(head) < 8 or not set(head) <= _HEX_DIGITS:
        return SiaBadFrame("header", body)
    declared = head[4:8].decode("ascii")
    if int(declared, 16) != len(message) and not _decimal_length(declared, len(message)):
        return SiaBadFrame("length", body)
    if int(head[:4], 16) != crc16_arc(message):
        return SiaBadFrame("crc", body)
    try:
        frame = _parse_message(message.decode("latin-1"))
    except ValueError:  # an impossible date in the timestamp, a field out of range
        frame = None
    return SiaBadFrame("format", body) if frame is None else frame


def _decimal_length(declared: str, actual: int) -> bool:
    """Some panels write the length in decimal; accepted, since the CRC has been checked."""
    return declared.isdigit() and int(declared) == actual


class SiaDecoder:
    """Cut DC-09 frames out of a TCP byte stream, in any split.

    ``counters`` (shared with the caller if given): ``frames``, ``garbage_bytes`` (skipped
    before a ``\\n``), ``bad_header``, ``bad_length``, ``bad_crc``, ``bad_format``,
    ``length_decimal`` (accepted quirk), ``truncated`` (a new ``\\n`` before the ``\\r``:
    the partial frame is dropped) and ``oversize`` (no ``\\r`` within the cap).
    """

    def __init__(
        self, *, max_frame_bytes: int = MAX_FRAME_BYTES, counters: Counter[str] | None = None
    ) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes
        self.counters: Counter[str] = Counter() if counters is None else counters

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (never more than the cap)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[SiaFrame | SiaBadFrame]:
        """Add bytes; return every frame they complete, good or damaged, in order."""
        self._buffer += data
        out: list[SiaFrame | SiaBadFrame] = []
        buffer = self._buffer
        while buffer:
            start = buffer.find(b"\n")
            if start != 0:
                skipped = len(buffer) if start < 0 else start
                self.counters["garbage_bytes"] += skipped
                del buffer[:skipped]
                continue
            end = buffer.find(b"\r", 1)
            restart = buffer.find(b"\n", 1)
            if restart != -1 and (end == -1 or restart < end):
                self.counters["truncated"] += 1
                del buffer[:restart]
                continue
            if end == -1:
                if len(buffer) > self._max:
                    self.counters["oversize"] += 1
                    buffer.clear()
                break
            out.append(self._frame(bytes(buffer[1:end])))
            del buffer[: end + 1]
        return out

    def _frame(self, body: bytes) -> SiaFrame | SiaBadFrame:
        item = decode_frame(body)
        if isinstance(item, SiaBadFrame):
            self.counters[f"bad_{item.reason}"] += 1
        else:
            self.counters["frames"] += 1
            declared = body[4:8]
            if int(declared, 16) != len(body) - 8:
                self.counters["length_decimal"] += 1
        return item


# --- content ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportedEvent:
    """One event in a message: an SIA code (``MA``) or a Contact ID event (``101``)."""

    code: str
    zone: str | None = None
    """Zone or user number as sent (``01``, ``002``)."""
    area: str | None = None
    """SIA ``ri`` (area) or Contact ID group (partition)."""
    qualifier: Qualifier = "new"
    """Contact ID 1 new, 3 restore, 6 repeat; SIA restores have their own codes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SiaMessage:
    """The content of an unencrypted SIA-DCS, ADM-CID or NULL frame."""

    account: str
    """Upper-case hex, from the header (or the content when the header has none)."""
    protocol: Literal["SIA-DCS", "ADM-CID", "NULL"]
    sequence: int
    events: tuple[ReportedEvent, ...] = ()
    timestamp: datetime | None = None


_CONTENT_ACCOUNT = re.compile(r"(?:#(?P<account>[0-9A-Fa-f]{1,16}))?\|?(?P<rest>.*)", re.DOTALL)
_SIA_BLOCK = re.compile(
    r"/?(?:(?P<mod>[a-z]{2})(?P<value>[0-9:]*)|(?P<code>[A-Z]{2})(?P<zone>[0-9]{0,6}))"
    r"(?:\^[^^]*\^)?"
)
_CONTACT_ID = re.compile(r"(?P<q>[0-9])(?P<event>[0-9]{3}) (?P<group>[0-9]{2}) (?P<zone>[0-9]{3})")
_QUALIFIERS: dict[str, Qualifier] = {"1": "new", "3": "restore", "6": "repeat"}
_PROTOCOLS: dict[str, Literal["SIA-DCS", "ADM-CID", "NULL"]] = {
    "SIA-DCS": "SIA-DCS",
    "ADM-CID": "ADM-CID",
    "NULL": "NULL",
}


def frame_account(frame: SiaFrame) -> str | None:
    """The account a frame is from (upper case): the header's, else ``#acct|`` in the data."""
    if frame.account is not None:
        return frame.account.upper()
    if frame.encrypted:
        return None
    match = _CONTENT_ACCOUNT.fullmatch(frame.data)
    account = match["account"] if match else None
    return account.upper() if account else None


def parse_message(frame: SiaFrame) -> SiaMessage:
    """Read a frame's content. Raises ``SiaContentError`` (answer DUH) if it cannot."""
    protocol = _PROTOCOLS.get(frame.message_type)
    if protocol is None:
        raise SiaContentError("unsupported", f"unsupported ID token {frame.message_type!r}")
    if frame.encrypted:
        raise SiaContentError("encrypted", "encrypted content cannot be read without a key")
    account = frame_account(frame)
    if account is None:
        raise SiaContentError("no_account", "the message names no account")
    match = _CONTENT_ACCOUNT.fullmatch(frame.data)
    rest = match["rest"] if match else frame.data
    if protocol == "SIA-DCS":
        events = _sia_events(rest)
    elif protocol == "ADM-CID":
        events = _contact_id_events(rest)
    else:  # NULL: link supervision, whatever it carries
        events = ()
    return SiaMessage(
        account=account,
        protocol=protocol,
        sequence=frame.sequence,
        events=events,
        timestamp=frame.timestamp,
    )


def _sia_events(data: str) -> tuple[ReportedEvent, ...]:
    """DC-03 data: ``N`` then ``/``-separated blocks: modifiers (``ri1``, ``ti12:30``,
    ``id3``) and events (two capitals, an optional zone or user number, ``^text^``)."""
    text = data[1:] if data.startswith("N") else data
    text = text.rstrip("/")
    events: list[ReportedEvent] = []
    area: str | None = None
    position = 0
    while position < len(text):
        block = _SIA_BLOCK.match(text, position)
        if block is None or block.end() == position:
            raise SiaContentError("bad_sia_data", f"unreadable SIA data at {position}")
        position = block.end()
        if block["mod"] == "ri":
            area = block["value"] or None
        elif block["code"] is not None:
            zone = block["zone"] or None
            events.append(ReportedEvent(code=block["code"], zone=zone, area=area))
    if not events:
        raise SiaContentError("no_event", "SIA data without an event code")
    return tuple(events)


def _contact_id_events(data: str) -> tuple[ReportedEvent, ...]:
    """DC-05 in DC-09: ``QEEE GG ZZZ`` (qualifier, event, group, zone or user)."""
    match = _CONTACT_ID.fullmatch(data)
    if match is None or match["q"] not in _QUALIFIERS:
        raise SiaContentError("bad_contact_id", "Contact ID data is not 'QEEE GG ZZZ'")
    return (
        ReportedEvent(
            code=match["event"],
            zone=match["zone"],
            area=match["group"],
            qualifier=_QUALIFIERS[match["q"]],
        ),
    )


# --- answers ------------------------------------------------------------------------------


def timestamp_in_window(timestamp: datetime, now: datetime) -> bool:
    """True if a message stamped ``timestamp`` passes DC-09's +20 s / -40 s test."""
    return now - TIMESTAMP_BEHIND <= timestamp <= now + TIMESTAMP_AHEAD


def _stamp(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(microsecond=0)


def _echo(frame: SiaFrame, token: str, now: datetime, *, with_timestamp: bool) -> SiaFrame:
    return SiaFrame(
        message_type=token,
        sequence=frame.sequence,
        receiver=frame.receiver,
        line=frame.line,
        account=frame_account(frame),
        timestamp=_stamp(now) if with_timestamp else None,
    )


def ack_for(frame: SiaFrame, now: datetime, *, with_timestamp: bool = False) -> SiaFrame:
    """ACK: the message is safe with us. Echoes sequence, receiver, line and account.

    DC-09 shows the unencrypted ACK without a timestamp; ``with_timestamp`` adds ``now``.
    An encrypted message needs an encrypted ACK, which this layer cannot make.
    """
    if frame.encrypted:
        raise ValueError("an encrypted message needs an encrypted ACK")
    return _echo(frame, "ACK", now, with_timestamp=with_timestamp)


def duh_for(frame: SiaFrame, now: datetime, *, with_timestamp: bool = False) -> SiaFrame:
    """DUH: received correctly but not understood (never encrypted)."""
    return _echo(frame, "DUH", now, with_timestamp=with_timestamp)


def nak(now: datetime) -> SiaFrame:
    """NAK: ``"NAK"0000R0L0A0[]`` with the receiver's time, so the unit can set its clock."""
    return SiaFrame(
        message_type="NAK", sequence=0, receiver="0", line="0", account="0", timestamp=_stamp(now)
    )
