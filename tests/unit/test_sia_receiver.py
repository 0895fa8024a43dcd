"""The edge's SIA DC-09 receiver over real loopback TCP: an alarm is stored before it is
acknowledged, a failed store is never acknowledged, and every refusal has its answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devices.events import ButtonPayload, DeviceEvent, DeviceType, EventKind
from devices.sia import (
    SiaAccountBinding,
    SiaBadFrame,
    SiaDecoder,
    SiaFrame,
    ack_for,
    encode,
    nak,
)
from edge.drivers.sia import SiaReceiver, decide

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
UNIT = SiaAccountBinding(
    account="1234",
    gateway_id="gw-1",
    device_id="unit-1",
    device_type=DeviceType.SAFETY_ALARM,
    zones={"1": ("pendant-1", DeviceType.SAFETY_ALARM)},
)
ENCRYPTED_UNIT = SiaAccountBinding(
    account="123F", gateway_id="gw-1", device_id="unit-2", device_type=DeviceType.SAFETY_ALARM
)
FIXTURES = {
    f["name"]: f["frame"]
    for f in json.loads(
        (Path(__file__).parent.parent / "fixtures" / "sia" / "public_frames.json").read_text()
    )["frames"]
}


def sia(data: str, seq: int = 1, account: str = "1234", **fields: Any) -> SiaFrame:
    return SiaFrame(
        message_type=fields.pop("message_type", "SIA-DCS"),
        sequence=seq,
        receiver="1",
        line="0",
        account=account,
        data=data,
        **fields,
    )


class Sink:
    """Records batches; can be made to fail, or to wait at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[DeviceEvent]] = []
        self.fail = False
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def __call__(self, events: list[DeviceEvent]) -> None:
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise OSError("disk full")
        self.batches.append(events)


class Unit:
    """An alarm unit's end of one TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = SiaDecoder()
        self.pending: list[SiaFrame | SiaBadFrame] = []

    async def send(self, *items: SiaFrame | bytes) -> None:
        self.writer.write(b"".join(i if isinstance(i, bytes) else encode(i) for i in items))
        await self.writer.drain()

    async def answer(self) -> SiaFrame:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(4096), 5)
            assert data, "the receiver closed the connection"
            self.pending += self.decoder.feed(data)
        item = self.pending.pop(0)
        assert isinstance(item, SiaFrame)
        return item

    async def nothing_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.reader.read(4096), seconds)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def seen() -> list[str]:
    return []


@pytest.fixture
async def receiver(sink: Sink, seen: list[str]) -> AsyncIterator[SiaReceiver]:
    async with SiaReceiver(
        bindings=[UNIT, ENCRYPTED_UNIT],
        sink=sink,
        clock=lambda: NOW,
        on_seen=lambda device_id, _: seen.append(device_id),
    ) as running:
        yield running


@pytest.fixture
async def connect(receiver: SiaReceiver) -> AsyncIterator[Callable[[], Any]]:
    units: list[Unit] = []

    async def open_unit() -> Unit:
        unit = Unit(*await asyncio.open_connection("127.0.0.1", receiver.port))
        units.append(unit)
        return unit

    yield open_unit
    for unit in units:
        await close(unit.writer)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_an_alarm_is_stored_before_it_is_acknowledged(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any]
) -> None:
    unit = await connect()
    sink.gate = asyncio.Event()
    frame = sia("#1234|Nri1/QA01", seq=17)
    await unit.send(frame)
    await asyncio.wait_for(sink.called.wait(), 5)
    assert await unit.nothing_within(0.2), "ACK sent before the sink returned"
    sink.gate.set()
    assert await unit.answer() == ack_for(frame, NOW)
    ((event,),) = sink.batches
    assert (event.kind, event.device_id, event.gateway_id) == (
        EventKind.BUTTON_PRESSED,
        "pendant-1",
        "gw-1",
    )
    assert event.payload == ButtonPayload(button="pendant")
    assert receiver.counters["events"] == 1
    assert receiver.last_seen == {"1234": NOW}


async def test_a_failed_store_is_never_acknowledged(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any]
) -> None:
    unit = await connect()
    sink.fail = True
    alarm = sia("#1234|Nri1/MA01", seq=5)
    link_test = sia("", seq=6, message_type="NULL")
    with capture_logs() as logs:
        await unit.send(alarm, link_test)
        assert await unit.answer() == ack_for(link_test, NOW)  # nothing came for the alarm
    assert receiver.counters["sink_errors"] == 1
    assert any(entry["event"] == "sia_sink_failed" for entry in logs)
    sink.fail = False
    await unit.send(alarm)  # the unit retries
    assert await unit.answer() == ack_for(alarm, NOW)
    assert len(sink.batches) == 1


async def test_many_frames_and_connections_each_get_their_answers_in_order(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any]
) -> None:
    units = [await connect() for _ in range(5)]
    frames = {i: [sia(f"#1234|Nri1/RP/YT{i}", seq=i * 10 + n) for n in range(4)] for i in range(5)}
    await asyncio.gather(*(unit.send(*frames[i]) for i, unit in enumerate(units)))
    for i, unit in enumerate(units):
        assert [await unit.answer() for _ in range(4)] == [ack_for(f, NOW) for f in frames[i]]
    assert receiver.counters["events"] == 40
    assert receiver.counters["connections"] == 5


async def test_damaged_frame_gets_nak_and_the_next_one_is_accepted(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any]
) -> None:
    unit = await connect()
    good = sia("#1234|Nri1/FA03")
    damaged = bytearray(encode(good))
    damaged[-3] ^= 0x01  # a changed byte in the content: the CRC no longer matches
    await unit.send(b"noise", bytes(damaged), good)
    assert await unit.answer() == nak(NOW)
    assert await unit.answer() == ack_for(good, NOW)
    assert receiver.counters["bad_crc"] == 1
    assert receiver.counters["garbage_bytes"] == 5
    assert (receiver.counters["naks"], receiver.counters["acks"]) == (1, 1)


@pytest.mark.parametrize(
    ("frame", "answer", "outcome"),
    [
        (sia("#9999|Nri1/MA01", account="9999"), "NAK", "unknown_accounts"),
        (sia("#1234|1101 01 001", message_type="RSP"), "DUH", "unsupported"),
        (sia("#1234|Nri1/MA01%"), "DUH", "bad_content"),
        (sia("#1234|NMA01", timestamp=NOW + timedelta(seconds=21)), "NAK", "timestamp"),
        (sia("#1234|NMA01", timestamp=NOW - timedelta(seconds=41)), "NAK", "timestamp"),
    ],
)
async def test_refusals(
    receiver: SiaReceiver,
    sink: Sink,
    connect: Callable[[], Any],
    frame: SiaFrame,
    answer: str,
    outcome: str,
) -> None:
    unit = await connect()
    await unit.send(frame)
    reply = await unit.answer()
    assert reply.message_type == answer
    if answer == "NAK":
        assert reply == nak(NOW)
    else:
        assert (reply.sequence, reply.account) == (frame.sequence, frame.account)
    assert receiver.counters[outcome] == 1
    assert sink.batches == []
    assert receiver.last_seen == {}


async def test_encrypted_frame_without_a_key_gets_duh(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any]
) -> None:
    unit = await connect()
    await unit.send(b"\n" + FIXTURES["encrypted_adm_cid"].encode() + b"\r")
    reply = await unit.answer()
    assert (reply.message_type, reply.sequence, reply.account, reply.encrypted) == (
        "DUH",
        6879,
        "123F",
        False,
    )
    assert receiver.counters["encrypted"] == 1


async def test_a_timestamp_inside_the_window_is_the_event_time(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any]
) -> None:
    unit = await connect()
    stamp = NOW - timedelta(seconds=40)
    frame = sia("#1234|Nri1/WA02", timestamp=stamp)
    await unit.send(frame)
    assert await unit.answer() == ack_for(frame, NOW)
    ((event,),) = sink.batches
    assert (event.time, event.gateway_time) == (stamp, NOW)


async def test_unknown_code_is_acknowledged_counted_and_logged(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any]
) -> None:
    unit = await connect()
    frame = sia("#1234|Nri1/ZZ07/QA01")
    with capture_logs() as logs:
        await unit.send(frame)
        assert await unit.answer() == ack_for(frame, NOW)
    assert receiver.counters["unknown_codes"] == 1
    (warning,) = [entry for entry in logs if entry["event"] == "sia_unknown_code"]
    assert (warning["log_level"], warning["code"], warning["zone"]) == ("warning", "ZZ", "07")
    assert [e.kind for e in sink.batches[0]] == [EventKind.BUTTON_PRESSED]


async def test_link_test_is_acknowledged_and_counts_as_a_check_in(
    receiver: SiaReceiver, sink: Sink, connect: Callable[[], Any], seen: list[str]
) -> None:
    unit = await connect()
    frame = sia("", message_type="NULL", timestamp=NOW)
    await unit.send(frame)
    assert await unit.answer() == ack_for(frame, NOW)
    assert sink.batches == []
    assert not sink.called.is_set()
    assert receiver.last_seen == {"1234": NOW}
    assert seen == ["unit-1"]
    assert receiver.counters["null_messages"] == 1


async def test_idle_connection_is_closed(sink: Sink) -> None:
    async with SiaReceiver(bindings=[UNIT], sink=sink, idle_timeout=0.1) as receiver:
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        await close(writer)
        assert receiver.counters["idle_closed"] == 1


async def test_connections_beyond_the_limit_are_refused(sink: Sink) -> None:
    async with SiaReceiver(bindings=[UNIT], sink=sink, max_connections=1) as receiver:
        first = Unit(*await asyncio.open_connection("127.0.0.1", receiver.port))
        frame = sia("", message_type="NULL")
        await first.send(frame)
        await first.answer()  # the first connection is being served
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        assert receiver.counters["connections_refused"] == 1
        await first.send(frame)
        assert await first.answer() == ack_for(frame, NOW)
        for w in (first.writer, writer):
            await close(w)


async def test_stop_closes_open_connections(sink: Sink) -> None:
    receiver = SiaReceiver(bindings=[UNIT], sink=sink)
    await receiver.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    await Unit(reader, writer).send(sia("", message_type="NULL"))
    await asyncio.wait_for(reader.read(100), 5)
    await receiver.stop()
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    await close(writer)
    with pytest.raises(RuntimeError):
        _ = receiver.port


def test_decide_refuses_an_unknown_account_before_reading_anything() -> None:
    encrypted = SiaFrame(message_type="SIA-DCS", sequence=1, account="AAAA", encrypted=True)
    assert decide(encrypted, bindings={}, now=NOW).outcome == "unknown_accounts"
    assert decide(SiaBadFrame("crc", b""), bindings={}, now=NOW).answer == nak(NOW)


def test_an_account_bound_twice_is_refused() -> None:
    async def sink(events: list[DeviceEvent]) -> None:
        del events

    with pytest.raises(ValueError, match="bound twice"):
        SiaReceiver(bindings=[UNIT, UNIT], sink=sink)
