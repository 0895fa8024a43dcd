"""The dispenser link: acknowledgements, NAKs, retries, duplicates, command results, and a
gateway and a dispenser back to back over a line that drops and damages bytes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.dispenser.codec import (
    Ack,
    Battery,
    ClockReply,
    Command,
    DeviceMessage,
    DispenserDecoder,
    DoseDue,
    DoseTaken,
    Empty,
    Frame,
    Heartbeat,
    Nak,
    NakReason,
    PowerLost,
    Reply,
    ReplyStatus,
    RunTest,
    ScheduledDose,
    ScheduleReply,
    SetSchedule,
    SyncClock,
    Tamper,
    TestReply,
    Vkp,
    crc16,
    encode,
    stuff,
)
from devices.dispenser.session import (
    CommandFailed,
    CommandReceived,
    CommandSucceeded,
    DeviceOutput,
    DeviceSide,
    EventDelivered,
    EventFailed,
    GatewayOutput,
    GatewaySide,
    MessageReceived,
)

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "dispenser"
T0 = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)


def report(i: int) -> DeviceMessage:
    """A distinct device message for each i (so a lost or doubled one shows)."""
    at = T0 + timedelta(seconds=i)
    kinds: list[DeviceMessage] = [
        DoseDue(at, f"d{i}", T0),
        DoseTaken(at, f"d{i}", T0),
        Battery(at, i % 101, 3000 + i, Vkp.BATTERY_LOW if i % 2 else None),
        Tamper(at),
        PowerLost(at),
        Heartbeat(at, i, i, 50, True),
        Empty(at),
    ]
    return kinds[i % len(kinds)]


def answer(command: Command) -> Reply:
    if isinstance(command, SetSchedule):
        return ScheduleReply(ReplyStatus.OK, len(command.doses))
    if isinstance(command, SyncClock):
        return ClockReply(ReplyStatus.OK, None)
    return TestReply(ReplyStatus.OK, T0)


def frames_in(data: bytes) -> list[Frame]:
    return [item for item in DispenserDecoder().feed(data) if isinstance(item, Frame)]


def deliver_device_outputs(
    device: DeviceSide, outputs: list[DeviceOutput], received: list[CommandReceived]
) -> None:
    for output in outputs:
        if isinstance(output, CommandReceived):
            received.append(output)
            device.reply(output, answer(output.command))


# --- one side at a time -----------------------------------------------------------------


def test_a_report_is_acknowledged_and_delivered() -> None:
    device, gateway = DeviceSide(), GatewaySide()
    handle = device.send(report(1), now=0.0)
    assert gateway.receive_data(device.data_to_send()) == [MessageReceived(0, report(1))]
    ack = gateway.data_to_send()
    assert frames_in(ack) == [Frame(0, Ack())]
    assert device.receive_data(ack) == [EventDelivered(handle, report(1))]
    assert device.idle


def test_without_an_ack_the_device_resends_and_the_duplicate_is_not_delivered_twice() -> None:
    device, gateway = DeviceSide(ack_timeout=1.0), GatewaySide()
    device.send(report(2), now=0.0)
    first = device.data_to_send()
    assert gateway.receive_data(first) == [MessageReceived(0, report(2))]
    gateway.data_to_send()  # the ACK is lost on the line
    assert device.tick(0.5) == []
    assert device.data_to_send() == b""  # not yet
    device.tick(1.0)
    again = device.data_to_send()
    assert again == first
    assert gateway.receive_data(again) == []  # a duplicate: not delivered again
    assert frames_in(gateway.data_to_send()) == [Frame(0, Ack())]  # but acknowledged again
    assert gateway.counters["duplicates"] == 1
    assert device.counters["retransmissions"] == 1


def test_reports_go_one_at_a_time_in_order() -> None:
    device, gateway = DeviceSide(), GatewaySide()
    for i in range(3):
        device.send(report(i), now=0.0)
    delivered = []
    for _ in range(3):
        sent = device.data_to_send()
        assert len(frames_in(sent)) == 1  # stop-and-wait
        delivered += gateway.receive_data(sent)
        device.receive_data(gateway.data_to_send())
    assert [m.message for m in delivered if isinstance(m, MessageReceived)] == [
        report(0),
        report(1),
        report(2),
    ]
    assert [m.seq for m in delivered if isinstance(m, MessageReceived)] == [0, 1, 2]
    assert device.idle


def test_a_damaged_frame_gets_a_nak_and_is_resent_at_once() -> None:
    device, gateway = DeviceSide(), GatewaySide()
    device.send(report(3), now=0.0)
    damaged = bytearray(device.data_to_send())
    damaged[8] ^= 0x10
    assert gateway.receive_data(bytes(damaged)) == []
    nak = gateway.data_to_send()
    assert frames_in(nak) == [Frame(0, Nak(NakReason.BAD_CRC))]
    device.receive_data(nak)  # no tick needed: a NAK means "again, now"
    assert gateway.receive_data(device.data_to_send()) == [MessageReceived(0, report(3))]
    assert gateway.decoder.counters["bad_crc"] == 1


def test_a_refused_report_does_not_block_the_ones_behind_it() -> None:
    device = DeviceSide()
    first = device.send(report(4), now=0.0)
    device.send(report(5), now=0.0)
    device.data_to_send()
    out = device.receive_data(encode(Frame(0, Nak(NakReason.BAD_PAYLOAD))))
    assert out == [EventFailed(first, report(4), "refused:bad_payload")]
    assert frames_in(device.data_to_send()) == [Frame(1, report(5))]


def test_a_nak_for_another_seq_or_busy_does_not_fail_the_current_frame() -> None:
    device = DeviceSide()
    device.send(report(6), now=0.0)
    device.data_to_send()
    assert device.receive_data(encode(Frame(9, Nak(NakReason.UNKNOWN_TYPE)))) == []
    assert device.receive_data(encode(Frame(0, Nak(NakReason.BUSY)))) == []
    assert device.data_to_send() == b""  # BUSY: wait for the timer
    assert not device.idle


def test_a_restarted_device_is_not_taken_for_a_duplicate() -> None:
    gateway = GatewaySide()
    before = DeviceSide()
    before.send(PowerLost(T0), now=0.0)
    assert len(gateway.receive_data(before.data_to_send())) == 1
    after = DeviceSide()  # power cycle: numbering starts again at 0
    after.send(PowerLost(T0 + timedelta(minutes=3)), now=0.0)
    received = gateway.receive_data(after.data_to_send())
    assert received == [MessageReceived(0, PowerLost(T0 + timedelta(minutes=3)))]


def test_manual_ack_waits_until_the_event_is_stored() -> None:
    device, gateway = DeviceSide(), GatewaySide(manual_ack=True)
    device.send(report(7), now=0.0)
    sent = device.data_to_send()
    (received,) = gateway.receive_data(sent)
    assert isinstance(received, MessageReceived)
    assert gateway.data_to_send() == b""  # not stored yet: no ACK
    assert gateway.receive_data(sent) == []  # a resend meanwhile: still no ACK
    assert gateway.data_to_send() == b""
    gateway.ack(received)
    assert frames_in(gateway.data_to_send()) == [Frame(0, Ack())]
    gateway.ack(received)  # twice is harmless
    assert gateway.data_to_send() == b""
    assert gateway.receive_data(sent) == []
    assert frames_in(gateway.data_to_send()) == [Frame(0, Ack())]


def test_a_command_succeeds_with_its_reply() -> None:
    device, gateway = DeviceSide(), GatewaySide()
    command = SetSchedule((ScheduledDose("morning", time(8, 0)),))
    handle = gateway.send(command, now=0.0)
    (received,) = device.receive_data(gateway.data_to_send())
    assert received == CommandReceived(0, command)
    assert isinstance(received, CommandReceived)
    device.reply(received, ScheduleReply(ReplyStatus.OK, 1))
    out = gateway.receive_data(device.data_to_send())
    assert out == [CommandSucceeded(handle, command, ScheduleReply(ReplyStatus.OK, 1))]
    assert gateway.idle


def test_a_repeated_command_is_answered_again_but_carried_out_once() -> None:
    device, gateway = DeviceSide(), GatewaySide(ack_timeout=1.0)
    gateway.send(RunTest(), now=0.0)
    command = gateway.data_to_send()
    (received,) = device.receive_data(command)
    assert isinstance(received, CommandReceived)
    assert device.receive_data(command) == []  # not answered yet: nothing to repeat
    assert device.data_to_send() == b""
    device.reply(received, TestReply(ReplyStatus.OK, T0))
    reply = device.data_to_send()  # lost on the line
    gateway.tick(1.0)
    assert gateway.data_to_send() == command
    assert device.receive_data(command) == []  # the same command: not carried out again
    assert device.data_to_send() == reply
    assert device.counters["duplicates"] == 2


def test_a_command_fails_after_max_tries_and_the_next_one_goes() -> None:
    gateway = GatewaySide(ack_timeout=1.0, max_tries=3)
    first = gateway.send(RunTest(), now=0.0)
    second = gateway.send(SyncClock(T0), now=0.0)
    results: list[GatewayOutput] = []
    sent = b""
    now = 0.0
    while not results:
        now += 0.1
        results += gateway.tick(now)
        sent += gateway.data_to_send()
    assert results == [CommandFailed(first, RunTest(), "no_answer")]
    assert now == pytest.approx(3.0, abs=0.11)  # three tries, one second each
    assert frames_in(sent) == [Frame(0, RunTest())] * 3 + [Frame(1, SyncClock(T0))]
    assert not gateway.idle
    del second


def test_an_error_reply_fails_the_command_with_the_reply() -> None:
    device, gateway = DeviceSide(), GatewaySide()
    handle = gateway.send(SyncClock(T0), now=0.0)
    (received,) = device.receive_data(gateway.data_to_send())
    assert isinstance(received, CommandReceived)
    with pytest.raises(TypeError, match="answered by ClockReply"):
        device.reply(received, TestReply(ReplyStatus.OK))
    device.reply(received, ClockReply(ReplyStatus.BUSY))
    out = gateway.receive_data(device.data_to_send())
    assert out == [
        CommandFailed(handle, SyncClock(T0), "device:busy", ClockReply(ReplyStatus.BUSY))
    ]


def test_stale_and_mismatched_replies_are_ignored() -> None:
    gateway = GatewaySide()
    gateway.send(RunTest(), now=0.0)
    assert gateway.receive_data(encode(Frame(5, TestReply(ReplyStatus.OK)))) == []
    assert gateway.receive_data(encode(Frame(0, ClockReply(ReplyStatus.OK)))) == []
    assert gateway.counters["stale_replies"] == 2
    assert gateway.data_to_send() == encode(Frame(0, RunTest()))  # no NAK for answers


def test_wrong_direction_is_refused_but_answers_are_never_naked() -> None:
    gateway, device = GatewaySide(), DeviceSide()
    gateway.receive_data(encode(Frame(4, RunTest())))  # a command from the device
    assert frames_in(gateway.data_to_send()) == [Frame(4, Nak(NakReason.UNEXPECTED))]
    device.receive_data(encode(Frame(4, report(1))))  # a report from the gateway
    assert frames_in(device.data_to_send()) == [Frame(4, Nak(NakReason.UNEXPECTED))]
    gateway.receive_data(encode(Frame(4, Ack())))
    body = bytes([1, 4, Nak.TYPE, 0, 1, 0xEE])  # a NAK with an unknown reason, intact
    gateway.receive_data(b"\x7e" + stuff(body + crc16(body).to_bytes(2, "big")) + b"\x7e")
    assert gateway.data_to_send() == b""
    assert gateway.counters["unexpected"] == 2


def test_sides_refuse_what_they_may_not_send() -> None:
    with pytest.raises(TypeError):
        GatewaySide().send(report(1), now=0.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DeviceSide().send(RunTest(), now=0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tries"):
        GatewaySide(max_tries=0)
    with pytest.raises(ValueError, match="ack_timeout"):
        DeviceSide(ack_timeout=0)


def test_the_gateway_answers_the_documented_sessions_byte_for_byte() -> None:
    for name in ("session_reports.hex", "session_errors.hex"):
        gateway = GatewaySide()
        lines = [
            (line[:3], bytes.fromhex(line[4:]))
            for line in (FIXTURES / name).read_text().splitlines()
            if line[:3] in ("D>G", "G>D")
        ]
        expected_answers = b"".join(data for direction, data in lines if direction == "G>D")
        answers = b""
        for direction, data in lines:
            if direction == "D>G":
                gateway.receive_data(data)
                answers += gateway.data_to_send()
        assert answers == expected_answers, name


# --- back to back over a bad line -------------------------------------------------------


@dataclass
class Line:
    """One direction of the serial line: drops and damages bytes, splits writes."""

    rng: random.Random
    drop: float
    damage: float
    one_byte_at_a_time: bool
    pending: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        out = bytearray()
        for byte in data:
            roll = self.rng.random()
            if roll < self.drop:
                continue
            out.append(self.rng.randrange(256) if roll < self.drop + self.damage else byte)
        if self.one_byte_at_a_time:
            self.pending += [bytes([b]) for b in out]
        else:
            cut = self.rng.randrange(len(out) + 1)
            self.pending += [bytes(out[:cut]), bytes(out[cut:])]

    def read(self) -> list[bytes]:
        chunks, self.pending = self.pending, []
        return chunks


@dataclass
class BackToBack:
    """A dispenser and a gateway joined by two bad lines, driven by a fake clock."""

    to_gateway: Line
    to_device: Line
    device: DeviceSide = field(default_factory=lambda: DeviceSide(ack_timeout=1.0))
    gateway: GatewaySide = field(default_factory=lambda: GatewaySide(ack_timeout=1.0))
    now: float = 0.0
    delivered: list[DeviceMessage] = field(default_factory=list)
    acknowledged: dict[int, DeviceMessage] = field(default_factory=dict)
    results: dict[int, CommandSucceeded | CommandFailed] = field(default_factory=dict)
    carried_out: list[CommandReceived] = field(default_factory=list)

    def step(self) -> None:
        self.now += 0.1
        assert self.device.tick(self.now) == [], "the device never gives up on a report"
        self._gateway_outputs(self.gateway.tick(self.now))
        self.to_gateway.write(self.device.data_to_send())
        self.to_device.write(self.gateway.data_to_send())
        for chunk in self.to_gateway.read():
            self._gateway_outputs(self.gateway.receive_data(chunk))
        for chunk in self.to_device.read():
            outputs = self.device.receive_data(chunk)
            deliver_device_outputs(self.device, outputs, self.carried_out)
            for output in outputs:
                assert not isinstance(output, EventFailed), f"a report was refused: {output}"
                if isinstance(output, EventDelivered):
                    self.acknowledged[output.event_id] = output.message

    def _gateway_outputs(self, outputs: list[GatewayOutput]) -> None:
        for output in outputs:
            if isinstance(output, MessageReceived):
                self.delivered.append(output.message)
            else:
                assert output.command_id not in self.results, "one result per command"
                self.results[output.command_id] = output


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    reports=st.integers(1, 25),
    drop=st.sampled_from([0.0, 0.005, 0.02]),
    damage=st.sampled_from([0.0, 0.005, 0.02]),
    one_byte=st.booleans(),
)
def test_back_to_back_every_report_arrives_once_in_order_and_commands_get_results(
    seed: int, reports: int, drop: float, damage: float, one_byte: bool
) -> None:
    rng = random.Random(seed)
    bench = BackToBack(Line(rng, drop, damage, one_byte), Line(rng, drop, damage, one_byte))
    sent = [report(i) for i in range(reports)]
    commands: list[Command] = [
        SyncClock(T0),
        SetSchedule((ScheduledDose("m", time(8)),)),
        RunTest(),
    ]
    handles = {bench.gateway.send(command, now=0.0): command for command in commands}
    reported = {bench.device.send(message, now=0.0): message for message in sent}
    for _ in range(20_000):  # bounded: 2,000 s of simulated time at most
        if len(bench.acknowledged) == len(sent) and len(bench.results) == len(commands):
            break
        bench.step()
    else:
        raise AssertionError("the link did not settle in 2,000 s of simulated time")

    assert bench.delivered == sent, "every report exactly once, in order"
    assert bench.acknowledged == reported
    assert bench.device.idle
    assert set(bench.results) == set(handles)
    carried_out = [seen.command for seen in bench.carried_out]
    for handle, result in bench.results.items():
        assert result.command == handles[handle]
        if isinstance(result, CommandSucceeded):
            assert carried_out.count(handles[handle]) == 1, "carried out exactly once"
            assert result.reply == answer(handles[handle])
        else:
            assert carried_out.count(handles[handle]) <= 1
            assert result.reason == "no_answer"
    if drop == damage == 0.0:
        assert all(isinstance(r, CommandSucceeded) for r in bench.results.values())
        assert bench.gateway.counters["duplicates"] == 0
