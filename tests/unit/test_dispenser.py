"""The dispenser codec: round trips of every message, any split, garbage, damage, the cap,
the documented examples, and the mapping to canonical events and from hub commands."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.dispenser import fields
from devices.dispenser.codec import (
    FLAG,
    MAX_FRAME,
    MESSAGE_TYPES,
    Ack,
    BadFrame,
    Battery,
    ClockReply,
    DecodeError,
    DeviceMessage,
    DispenserDecoder,
    DoseDue,
    DoseMissed,
    DoseTaken,
    Empty,
    Frame,
    Heartbeat,
    Jammed,
    Message,
    Nak,
    NakReason,
    PowerLost,
    PowerRestored,
    RefillNeeded,
    Reply,
    ReplyStatus,
    RunTest,
    ScheduledDose,
    ScheduleReply,
    SetSchedule,
    SyncClock,
    Tamper,
    TamperCause,
    TestReply,
    Vkp,
    crc16,
    decode_body,
    encode,
    stuff,
)
from devices.dispenser.events import (
    EVENT_RULES,
    DispenserCommandError,
    command_from_gateway,
    command_result,
    to_events,
)
from devices.dispenser.session import CommandFailed, CommandSucceeded
from devices.events import EventKind
from devices.gateway import GatewayCommand
from devices.ids import uuid7

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "dispenser"
SPEC = ROOT / "docs" / "protocols" / "dispenser.md"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)

PER_TYPE = settings(max_examples=40, deadline=None, database=None)
STREAMS = settings(max_examples=100, deadline=None, database=None)

# --- strategies, built from each message's layout ---------------------------------------

times = st.integers(fields.MIN_TIME_S, fields.MAX_TIME_S).map(
    lambda s: EPOCH + timedelta(seconds=s)
)
dose_ids = st.from_regex(fields.DOSE_ID_PATTERN, fullmatch=True)
doses = st.builds(ScheduledDose, dose_ids, st.builds(time, st.integers(0, 23), st.integers(0, 59)))
schedules = st.lists(doses, max_size=fields.MAX_DOSES, unique_by=lambda d: d.dose_id).map(tuple)
short_schedules = st.lists(doses, max_size=2, unique_by=lambda d: d.dose_id).map(tuple)


def _field(codec: fields.FieldCodec, *, small: bool = False) -> st.SearchStrategy[Any]:
    simple: dict[int, st.SearchStrategy[Any]] = {
        id(fields.BOOL): st.booleans(),
        id(fields.DEVICE_TIME): st.none() | times,
        id(fields.TIMESTAMP): times,
        id(fields.DOSE_ID): dose_ids,
        id(fields.UTC_OFFSET): st.integers(fields.MIN_UTC_OFFSET, fields.MAX_UTC_OFFSET),
        id(fields.SCHEDULE): short_schedules if small else schedules,
        id(fields.NAK_REASON): st.sampled_from(NakReason),
        id(fields.STATUS): st.sampled_from(ReplyStatus),
        id(fields.CAUSE): st.sampled_from(TamperCause),
    }
    if id(codec) in simple:
        return simple[id(codec)]
    if isinstance(codec, fields.UInt):
        return st.integers(0, codec.top)
    if isinstance(codec, fields.VkpField):
        codes = st.sampled_from(sorted(codec.allowed))
        return st.none() | codes if codec.optional else codes
    raise AssertionError(f"no strategy for {codec!r}: add one")


def messages_of(cls: type[Message], *, small: bool = False) -> st.SearchStrategy[Message]:
    return st.builds(cls, **{name: _field(codec, small=small) for name, codec in cls.LAYOUT})


any_message = st.sampled_from(list(MESSAGE_TYPES.values())).flatmap(messages_of)
small_messages = st.sampled_from(list(MESSAGE_TYPES.values())).flatmap(
    lambda cls: messages_of(cls, small=True)
)
frames = st.builds(Frame, st.integers(0, 255), small_messages)
"""Frames for stream tests: every type, schedules kept short (the round trip covers long)."""


def feed_all(decoder: DispenserDecoder, data: bytes, *, step: int = 0) -> list[Frame | BadFrame]:
    if not step:
        return decoder.feed(data)
    out: list[Frame | BadFrame] = []
    for start in range(0, len(data), step):
        out += decoder.feed(data[start : start + step])
    return out


def good(items: list[Frame | BadFrame]) -> list[Frame]:
    return [item for item in items if isinstance(item, Frame)]


def bad(items: list[Frame | BadFrame]) -> list[DecodeError]:
    return [item.reason for item in items if isinstance(item, BadFrame)]


def raw_frame(seq: int, type_code: int, payload: bytes, *, version: int = 1) -> bytes:
    body = bytes([version, seq, type_code]) + len(payload).to_bytes(2, "big") + payload
    return bytes([FLAG]) + stuff(body + crc16(body).to_bytes(2, "big")) + bytes([FLAG])


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_every_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(messages_of(cls))
    frame = Frame(data.draw(st.integers(0, 255)), message)
    wire = encode(frame)
    assert wire[0] == wire[-1] == FLAG
    assert FLAG not in wire[1:-1]  # stuffing keeps the flag out of the body
    assert DispenserDecoder().feed(wire) == [frame]
    assert cls.from_payload(message.to_payload()) == message


@STREAMS
@given(st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(1, 40), min_size=1))
def test_a_stream_decodes_the_same_in_any_split(sent: list[Frame], sizes: list[int]) -> None:
    wire = b"".join(encode(frame) for frame in sent)
    decoder = DispenserDecoder()
    out: list[Frame | BadFrame] = []
    start, index = 0, 0
    while start < len(wire):
        size = sizes[index % len(sizes)]
        out += decoder.feed(wire[start : start + size])
        start, index = start + size, index + 1
    assert out == sent
    assert feed_all(DispenserDecoder(), wire, step=1) == sent  # one byte at a time
    assert decoder.counters["frames"] == len(sent)


@STREAMS
@given(st.lists(st.tuples(st.binary(max_size=60), frames), min_size=1, max_size=6))
def test_garbage_before_and_between_frames_is_skipped(
    pieces: list[tuple[bytes, Frame]],
) -> None:
    wire = b"".join(garbage + encode(frame) for garbage, frame in pieces)
    out = feed_all(DispenserDecoder(), wire, step=7)
    assert good(out) == [frame for _, frame in pieces]


@STREAMS
@given(st.lists(frames, min_size=3, max_size=6), st.data())
def test_a_damaged_frame_is_reported_and_the_next_one_decoded(
    sent: list[Frame], data: st.DataObject
) -> None:
    victim = data.draw(st.integers(0, len(sent) - 1))
    wires = [bytearray(encode(frame)) for frame in sent]
    position = data.draw(st.integers(1, len(wires[victim]) - 2))
    wires[victim][position] ^= data.draw(st.integers(1, 255))
    out = feed_all(DispenserDecoder(), b"".join(wires), step=data.draw(st.integers(0, 5)))
    assert good(out) == sent[:victim] + sent[victim + 1 :]
    assert bad(out), "the damage is reported"


def test_counters_name_each_reason() -> None:
    ack = encode(Frame(1, Ack()))
    damaged = bytearray(encode(Frame(2, Ack())))
    damaged[3] ^= 0x04
    decoder = DispenserDecoder()
    out = decoder.feed(b"\x00\x01junk" + ack + bytes(damaged) + ack)
    assert good(out) == [Frame(1, Ack()), Frame(1, Ack())]
    assert decoder.counters == {"garbage": 1, "bad_crc": 1, "frames": 2}


def test_the_buffer_is_capped_and_the_next_frame_still_decodes() -> None:
    decoder = DispenserDecoder()
    out = decoder.feed(bytes(5000))  # garbage before any flag
    assert out == []
    assert decoder.buffered <= MAX_FRAME
    out = decoder.feed(bytes([FLAG]) + bytes(5000))  # the flag ends the garbage; no end
    assert bad(out) == [DecodeError.GARBAGE, DecodeError.OVERFLOW]
    assert decoder.buffered <= MAX_FRAME
    out = decoder.feed(encode(Frame(9, RunTest())))
    assert out == [Frame(9, RunTest())]
    assert decoder.counters["overflow"] == 1


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (bytes([FLAG, 1, 2, 3, FLAG]), DecodeError.SHORT),
        (raw_frame(1, Ack.TYPE, b"", version=2), DecodeError.BAD_VERSION),
        (raw_frame(1, 0x7F, b""), DecodeError.UNKNOWN_TYPE),
        (raw_frame(1, Nak.TYPE, b"\xee"), DecodeError.BAD_PAYLOAD),  # unknown NAK reason
        (raw_frame(1, Ack.TYPE, b"\x00"), DecodeError.BAD_PAYLOAD),  # a byte after the fields
        (raw_frame(1, RunTest.TYPE, b""), None),
        (bytes([FLAG, 1, 1, 0x7D, 0x41, 2, FLAG]), DecodeError.BAD_ESCAPE),
        (bytes([FLAG, 1, 1, 0x7D, FLAG]), DecodeError.BAD_ESCAPE),  # abort sequence
    ],
)
def test_each_kind_of_bad_frame(wire: bytes, reason: DecodeError | None) -> None:
    decoder = DispenserDecoder()
    out = decoder.feed(wire + encode(Frame(4, Ack())))
    assert out[-1] == Frame(4, Ack()), "the next good frame is still decoded"
    if reason is None:
        assert out == [Frame(1, RunTest()), Frame(4, Ack())]
    else:
        assert bad(out) == [reason]
        assert decoder.counters[reason] == 1


def test_bad_length_and_intact_frames_keep_seq_and_type() -> None:
    body = bytes([1, 7, Ack.TYPE, 0, 3])  # says 3 payload bytes, carries none
    result = decode_body(body + crc16(body).to_bytes(2, "big"))
    assert isinstance(result, BadFrame)
    assert (result.reason, result.seq, result.type_code) == (DecodeError.BAD_LENGTH, 7, 1)
    assert result.reason.intact


@pytest.mark.parametrize(
    ("cls", "payload", "words"),
    [
        (Battery, bytes.fromhex("67d3e1c4 65 0dde 0000"), "above 100"),  # 101 %
        (DoseDue, bytes.fromhex("67d3e1c4 67d3e1c4 02 6120"), "does not match"),  # "a "
        (DoseDue, bytes.fromhex("67d3e1c4 00000000 01 61"), "before 2000"),
        (DoseMissed, bytes.fromhex("00000000 67d3e1c4 0111 01 61"), "does not belong"),
        (Jammed, bytes.fromhex("67d3e1c4 0104"), "does not belong"),  # 1.4 is not a jam
        (Heartbeat, bytes.fromhex("67d3e1c4 00000001 0001 64 02"), "0 or 1"),
        (SyncClock, bytes.fromhex("67d3e1c4 0400"), "UTC offset"),
        (SetSchedule, bytes.fromhex("01 1800 01 61"), "not a time of day"),
        (SetSchedule, bytes.fromhex("02 0800 01 61 0900 01 61"), "unique"),
        (Empty, bytes.fromhex("67d3e1c4"), "payload ends"),
    ],
)
def test_payloads_out_of_range_are_refused(cls: type[Message], payload: bytes, words: str) -> None:
    with pytest.raises(fields.PayloadError, match=words):
        cls.from_payload(payload)
    out = DispenserDecoder().feed(raw_frame(3, cls.TYPE, payload))
    assert bad(out) == [DecodeError.BAD_PAYLOAD]


def test_a_device_time_before_2000_means_the_clock_is_not_set() -> None:
    message = PowerRestored.from_payload((12345).to_bytes(4, "big"))
    assert message == PowerRestored(None)
    assert PowerRestored(None).to_payload() == bytes(4)


@pytest.mark.parametrize(
    "build",
    [
        lambda: DoseDue(datetime(2025, 1, 1), "a", NOW),  # naive
        lambda: DoseDue(NOW.replace(microsecond=5), "a", NOW),
        lambda: DoseDue(NOW, "has space", NOW),
        lambda: DoseDue(NOW, "x" * 33, NOW),
        lambda: DoseMissed(NOW, "a", NOW, Vkp.EMPTY),
        lambda: Battery(NOW, 101, 3000),
        lambda: Battery(NOW, 50, 3000, Vkp.NO_MAINS_POWER),
        lambda: RefillNeeded(NOW, 10_001),
        lambda: Heartbeat(NOW, 1, 1, 50, 1),  # type: ignore[arg-type]  # not a bool
        lambda: SyncClock(datetime(1999, 12, 31, tzinfo=UTC)),
        lambda: SetSchedule(tuple(ScheduledDose(f"d{i}", time(8)) for i in range(25))),
        lambda: ScheduledDose("a", time(8, 0, 30)),
        lambda: Frame(256, Ack()),
    ],
)
def test_invalid_messages_cannot_be_built(build: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        build()


# --- the specification's examples -------------------------------------------------------

T = datetime(2025, 3, 14, tzinfo=UTC)


def at(h: int, m: int, s: int = 0) -> datetime:
    return T.replace(hour=h, minute=m, second=s)


DOCUMENTED: dict[str, list[Frame | DecodeError]] = {
    "session_reports.hex": [
        Frame(0, Heartbeat(at(7, 59), 86400, 42, 100, True)),
        Frame(0, Ack()),
        Frame(1, DoseDue(at(8, 0), "morning", at(8, 0))),
        Frame(1, Ack()),
        Frame(2, DoseTaken(at(8, 3, 12), "morning", at(8, 0))),
        Frame(2, Ack()),
        Frame(2, DoseTaken(at(8, 3, 12), "morning", at(8, 0))),
        Frame(2, Ack()),
    ],
    "session_commands.hex": [
        Frame(0, SyncClock(at(9, 0), 60)),
        Frame(0, ClockReply(ReplyStatus.OK, at(8, 59, 57))),
        Frame(
            1,
            SetSchedule(
                (
                    ScheduledDose("morning", time(8, 0)),
                    ScheduledDose("noon", time(13, 0)),
                    ScheduledDose("evening", time(20, 30)),
                )
            ),
        ),
        Frame(1, ScheduleReply(ReplyStatus.OK, 3)),
        Frame(2, RunTest()),
        Frame(2, TestReply(ReplyStatus.OK, at(9, 0, 5))),
    ],
    "session_errors.hex": [
        DecodeError.BAD_CRC,
        Frame(0, Nak(NakReason.BAD_CRC)),
        Frame(3, DoseMissed(at(14, 0), "noon", at(12, 0), Vkp.NOT_DISPENSED)),
        Frame(3, Ack()),
        Frame(4, RefillNeeded(at(14, 5), 126)),
        Frame(4, Ack()),
        Frame(5, Battery(at(14, 10), 15, 3550, Vkp.BATTERY_LOW)),
        Frame(5, Ack()),
        DecodeError.UNKNOWN_TYPE,
        Frame(6, Nak(NakReason.UNKNOWN_TYPE)),
    ],
}


def fixture_lines(name: str) -> list[tuple[str, bytes]]:
    """(direction, bytes) per line of a hex dump: ``D>G 7E 01 ...``; ``#`` starts a comment."""
    lines = []
    for line in (FIXTURES / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            direction, _, hex_bytes = line.partition(" ")
            assert direction in ("D>G", "G>D"), line
            lines.append((direction, bytes.fromhex(hex_bytes)))
    return lines


def test_every_fixture_is_documented_and_checked() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.hex")) == sorted(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_fixture_lines_decode_as_documented(name: str) -> None:
    lines = fixture_lines(name)
    assert len(lines) == len(DOCUMENTED[name])
    for (_, wire), expected in zip(lines, DOCUMENTED[name], strict=True):
        out = DispenserDecoder().feed(wire)
        if isinstance(expected, Frame):
            assert out == [expected]
            assert encode(expected) == wire, "our encoder writes exactly the documented bytes"
        else:
            assert bad(out) == [expected]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_the_spec_shows_the_fixture_bytes(name: str) -> None:
    spec = SPEC.read_text()
    marker = f"<!-- fixture: tests/fixtures/dispenser/{name} -->"
    assert marker in spec
    block = re.search(re.escape(marker) + r"\s*```text\n(.*?)```", spec, re.DOTALL)
    assert block is not None, f"a ```text block must follow {marker}"
    assert block[1].strip() == (FIXTURES / name).read_text().strip()


def test_the_spec_crc_examples_hold() -> None:
    spec = SPEC.read_text()
    assert crc16(b"123456789") == 0x29B1
    assert "`123456789` is `29 B1`" in spec
    ack_header = bytes.fromhex("0100010000")
    assert crc16(ack_header) == 0x8C6D
    assert "01 00 01 00 00" in spec
    assert "`8C 6D`" in spec


# --- canonical events -------------------------------------------------------------------

EXPECTED_KINDS: dict[type[Message], list[EventKind]] = {
    DoseDue: [EventKind.DOSE_DUE],
    DoseTaken: [EventKind.DOSE_TAKEN],
    DoseMissed: [EventKind.DOSE_MISSED],
    RefillNeeded: [EventKind.REFILL_NEEDED],
    Empty: [EventKind.EMPTY],
    Jammed: [EventKind.JAMMED],
    Tamper: [EventKind.TAMPER],
    PowerLost: [EventKind.POWER_LOST],
    PowerRestored: [EventKind.POWER_RESTORED],
}


@STREAMS
@given(small_messages)
def test_every_message_maps_to_valid_events_or_none(message: Message) -> None:
    events = to_events(Frame(1, message), gateway_id="gw-1", device_id="disp-1", now=NOW)
    kinds = [event.kind for event in events]
    device_time = getattr(message, "time", None)
    if isinstance(message, Battery):
        low = [EventKind.BATTERY_LOW] if message.vkp else []
        assert kinds == [EventKind.BATTERY_LEVEL, *low]
        assert events[0].payload.model_dump() == {
            "level_percent": message.level_percent,
            "voltage": message.voltage_mv / 1000,
        }
    elif isinstance(message, TestReply):
        assert kinds == ([EventKind.TEST_ALARM] if message.status is ReplyStatus.OK else [])
    elif isinstance(message, (Heartbeat, Ack, Nak, Reply)) or not isinstance(
        message, DeviceMessage
    ):
        assert kinds == []
    else:
        assert kinds == EXPECTED_KINDS[type(message)]
    for event in events:
        assert event.time == (device_time or NOW)
        assert event.gateway_time == NOW
        assert (event.gateway_id, event.device_id) == ("gw-1", "disp-1")
        assert event.device_type == "medicine_dispenser"


def test_dose_events_carry_the_dose() -> None:
    message = DoseMissed(at(14, 0), "noon", at(12, 0), Vkp.NO_MEDICINE)
    (event,) = to_events(message, gateway_id="gw-1", device_id="disp-1", now=NOW)
    assert event.kind == EventKind.DOSE_MISSED
    assert event.payload.model_dump() == {"dose_id": "noon", "scheduled_for": at(12, 0)}
    assert event.alarm_relevant
    assert set(EVENT_RULES) >= set(EXPECTED_KINDS)


def test_refill_carries_doses_left() -> None:
    (event,) = to_events(
        RefillNeeded(at(14, 5), 126), gateway_id="gw-1", device_id="disp-1", now=NOW
    )
    assert event.payload.model_dump() == {"doses_left": 126}


# --- hub commands -----------------------------------------------------------------------


def hub_command(kind: str, params: dict[str, Any] | None = None) -> GatewayCommand:
    return GatewayCommand.model_validate(
        {
            "command_id": uuid7(),
            "kind": kind,
            "device_id": "disp-1",
            "params": params or {},
            "expires_at": NOW + timedelta(minutes=5),
        }
    )


def test_a_schedule_command_becomes_set_schedule() -> None:
    command = hub_command(
        "dispenser_schedule",
        {"doses": [{"dose_id": "morning", "time": "08:00"}, {"dose_id": "eve", "time": "20:30"}]},
    )
    assert command_from_gateway(command, now=NOW) == SetSchedule(
        (ScheduledDose("morning", time(8, 0)), ScheduledDose("eve", time(20, 30)))
    )
    assert command_from_gateway(hub_command("dispenser_schedule", {"doses": []}), now=NOW) == (
        SetSchedule(())
    )


def test_sync_clock_and_test_alarm() -> None:
    now = datetime(2025, 7, 1, 10, 0, 0, 750_000, tzinfo=UTC)
    oslo = ZoneInfo("Europe/Oslo")
    assert command_from_gateway(hub_command("sync_clock"), now=now, zone=oslo) == SyncClock(
        now.replace(microsecond=0), 120
    )
    winter = datetime(2025, 1, 1, tzinfo=UTC)
    sync = command_from_gateway(hub_command("sync_clock"), now=winter, zone=oslo)
    assert sync == SyncClock(winter, 60)
    assert command_from_gateway(hub_command("test_alarm"), now=now) == RunTest()


@pytest.mark.parametrize(
    ("kind", "params", "words"),
    [
        ("unlock", {}, "cannot carry out 'unlock'"),
        ("test_alarm", {"x": 1}, "takes no params"),
        ("dispenser_schedule", {}, "must be"),
        ("dispenser_schedule", {"doses": "08:00"}, "must be"),
        ("dispenser_schedule", {"doses": [{"dose_id": "a"}]}, r"params.doses\[0\] must be"),
        ("dispenser_schedule", {"doses": [{"dose_id": "a", "time": "8:00"}]}, "HH:MM"),
        ("dispenser_schedule", {"doses": [{"dose_id": "a", "time": "24:00"}]}, "HH:MM"),
        ("dispenser_schedule", {"doses": [{"dose_id": "a b", "time": "08:00"}]}, "dose_id"),
        ("dispenser_schedule", {"doses": [{"dose_id": 7, "time": "08:00"}]}, "dose_id"),
        (
            "dispenser_schedule",
            {"doses": [{"dose_id": "a", "time": "08:00"}, {"dose_id": "a", "time": "09:00"}]},
            "unique",
        ),
        (
            "dispenser_schedule",
            {"doses": [{"dose_id": f"d{i}", "time": "08:00"} for i in range(25)]},
            "at most 24",
        ),
    ],
)
def test_bad_commands_are_refused_with_a_reason(
    kind: str, params: dict[str, Any], words: str
) -> None:
    with pytest.raises(DispenserCommandError, match=words):
        command_from_gateway(hub_command(kind, params), now=NOW)


def test_command_results_for_the_hub() -> None:
    command = hub_command("test_alarm")
    ok = command_result(
        command, CommandSucceeded(0, RunTest(), TestReply(ReplyStatus.OK, NOW)), now=NOW
    )
    assert (ok.command_id, ok.ok, ok.error) == (command.command_id, True, None)
    failed = command_result(command, CommandFailed(0, RunTest(), "no_answer"), now=NOW)
    assert (failed.ok, failed.error) == (False, "dispenser: no_answer")
    assert isinstance(failed.command_id, uuid.UUID)
