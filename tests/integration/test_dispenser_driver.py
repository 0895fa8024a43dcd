"""The dispenser driver over a real pseudo-terminal, through the real serial layer.

The test plays the dispenser with ``DeviceSide`` on the pty's master; the driver runs on
the slave side, opened by ``edge.serial_port.SerialLink`` as the daemon opens a port.
Every wait is bounded (``WAIT_S``), so a stuck line fails the test instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from devices.dispenser.codec import (
    Battery,
    ClockReply,
    Command,
    DeviceMessage,
    DoseDue,
    DoseMissed,
    DoseTaken,
    Empty,
    Frame,
    Heartbeat,
    Jammed,
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
    encode,
)
from devices.dispenser.session import CommandReceived, DeviceSide, EventDelivered
from devices.events import (
    BatteryLevelPayload,
    DeviceEvent,
    DeviceType,
    DosePayload,
    EventKind,
    RefillPayload,
)
from devices.gateway import CommandResult, GatewayCommand
from devices.ids import uuid7
from edge.drivers.dispenser import DispenserDriver
from edge.serial_port import SerialLink

WAIT_S = 5.0
T = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)
DEVICE = "disp-1"
OSLO = ZoneInfo("Europe/Oslo")


def answer_ok(command: Command) -> Reply | None:
    if isinstance(command, SetSchedule):
        return ScheduleReply(ReplyStatus.OK, len(command.doses))
    if isinstance(command, SyncClock):
        return ClockReply(ReplyStatus.OK, command.time - timedelta(seconds=3))
    return TestReply(ReplyStatus.OK, T)


def silent_on_schedule(command: Command) -> Reply | None:
    return None if isinstance(command, SetSchedule) else answer_ok(command)


class Dispenser:
    """The device end of the pseudo-terminal, played with ``DeviceSide``."""

    def __init__(
        self, master: int, *, answer: Callable[[Command], Reply | None] = answer_ok
    ) -> None:
        self.master = master
        self.side = DeviceSide(ack_timeout=0.2)
        self.answer = answer
        self.commands: list[Command] = []
        self.delivered: list[DeviceMessage] = []
        self.on_delivered: Callable[[DeviceMessage], None] = lambda _message: None

    def send(self, message: DeviceMessage) -> None:
        self.side.send(message, asyncio.get_running_loop().time())

    def inject(self, data: bytes) -> None:
        """Raw bytes on the line, past the link layer (noise, a damaged frame)."""
        os.write(self.master, data)

    def step(self) -> None:
        now = asyncio.get_running_loop().time()
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            data = b""
        except OSError as exc:  # EIO: nobody holds the slave side open (yet, or any more)
            if exc.errno != errno.EIO:
                raise
            data = b""
        for output in [*self.side.receive_data(data), *self.side.tick(now)]:
            if isinstance(output, CommandReceived):
                self.commands.append(output.command)
                if (reply := self.answer(output.command)) is not None:
                    self.side.reply(output, reply)
            elif isinstance(output, EventDelivered):
                self.delivered.append(output.message)
                self.on_delivered(output.message)
        if out := self.side.data_to_send():
            os.write(self.master, out)

    async def play(self, until: Callable[[], bool], timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while not until():
                self.step()
                await asyncio.sleep(0.005)

    async def play_during(self, task: asyncio.Future[Any]) -> None:
        await self.play(task.done)

    def syncs(self) -> list[SyncClock]:
        return [c for c in self.commands if isinstance(c, SyncClock)]


class Store:
    """The durable queue stand-in: fails the first ``failures`` writes; slow ones sleep."""

    def __init__(self, *, failures: int = 0, delay: float = 0.0, slow_calls: int = 0) -> None:
        self.failures = failures
        self.delay = delay
        self.slow_calls = slow_calls
        self.stored: list[DeviceEvent] = []
        self.attempted_ids: list[set[str]] = []

    async def __call__(self, events: list[DeviceEvent]) -> None:
        self.attempted_ids.append({str(event.id) for event in events})
        if len(self.attempted_ids) <= self.slow_calls:
            await asyncio.sleep(self.delay)
        if len(self.attempted_ids) <= self.failures:
            raise OSError("disk full")
        self.stored.extend(events)

    def kinds(self) -> list[EventKind]:
        return [event.kind for event in self.stored]


class MovingClock:
    """Wall time that starts at ``start`` and runs with the event loop's clock."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.t0 = asyncio.get_running_loop().time()

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=asyncio.get_running_loop().time() - self.t0)


@dataclass
class Rig:
    driver: DispenserDriver
    dispenser: Dispenser
    store: Store
    link: SerialLink
    heard: list[int]
    clock: MovingClock


@contextlib.asynccontextmanager
async def rig(
    store: Store | None = None,
    *,
    answer: Callable[[Command], Reply | None] = answer_ok,
    start: datetime = T,
    **options: Any,
) -> AsyncIterator[Rig]:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)  # only the link under test holds the slave side open
    os.set_blocking(master, False)
    store = store or Store()
    heard: list[int] = []
    clock = MovingClock(start)
    settings: dict[str, Any] = {
        "sink": store,
        "gateway_id": "gw-1",
        "device_id": DEVICE,
        "on_heard": lambda: heard.append(1),
        "tick_interval": 0.02,
        "sink_timeout": 0.5,
        "sink_retry_s": 0.1,
        "clock": clock,
    }
    settings.update(options)
    driver = DispenserDriver(**settings)
    up = asyncio.Event()
    link = SerialLink(path, on_up=up.set, reconnect_min_s=0.05, reconnect_max_s=0.1)
    task = asyncio.create_task(link.run(driver.run))
    try:
        async with asyncio.timeout(WAIT_S):
            await up.wait()
        yield Rig(driver, Dispenser(master, answer=answer), store, link, heard, clock)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):  # a test may have closed it already
            os.close(master)


def command(
    kind: str, *, params: dict[str, Any] | None = None, expires_in: float = 30.0, now: datetime = T
) -> GatewayCommand:
    return GatewayCommand.model_validate(
        {
            "command_id": uuid7(),
            "kind": kind,
            "device_id": DEVICE,
            "params": params or {},
            "expires_at": now + timedelta(seconds=expires_in),
        }
    )


async def execute(r: Rig, cmd: GatewayCommand) -> CommandResult:
    """Run the command while the dispenser plays its end of the line."""
    task = asyncio.ensure_future(r.driver.execute(cmd))
    await r.dispenser.play_during(task)
    return task.result()


SCHEDULE = {
    "doses": [{"dose_id": "morning", "time": "08:00"}, {"dose_id": "evening", "time": "20:30"}]
}

REPORTS: list[tuple[DeviceMessage, list[EventKind]]] = [
    (Heartbeat(T, 86_400, 42, 100, True), []),
    (DoseDue(T, "morning", T), [EventKind.DOSE_DUE]),
    (DoseTaken(T + timedelta(minutes=3), "morning", T), [EventKind.DOSE_TAKEN]),
    (DoseMissed(T + timedelta(hours=5), "noon", T + timedelta(hours=4)), [EventKind.DOSE_MISSED]),
    (RefillNeeded(T, 126), [EventKind.REFILL_NEEDED]),
    (Empty(T), [EventKind.EMPTY]),
    (Jammed(T, Vkp.ROLL_STUCK), [EventKind.JAMMED]),
    (Tamper(T, TamperCause.MOVED), [EventKind.TAMPER]),
    (PowerLost(T), [EventKind.POWER_LOST]),
    (PowerRestored(T), [EventKind.POWER_RESTORED]),
    (Battery(T, 15, 3550, Vkp.BATTERY_LOW), [EventKind.BATTERY_LEVEL, EventKind.BATTERY_LOW]),
]


# --- reports ----------------------------------------------------------------------------


async def test_reports_become_events_and_are_acknowledged_only_once_stored() -> None:
    # The first two writes take longer than the dispenser's T_ack: it resends meanwhile.
    store = Store(delay=0.3, slow_calls=2)
    async with rig(store) as r:
        stored_at_ack: list[list[EventKind]] = []
        r.dispenser.on_delivered = lambda _m: stored_at_ack.append(store.kinds())
        for message, _kinds in REPORTS:
            r.dispenser.send(message)
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == len(REPORTS))
        counters = r.driver.counters

    expected = [kind for _message, kinds in REPORTS for kind in kinds]
    assert store.kinds() == expected  # each once, in order, despite the resends
    done = 0
    for (_message, kinds), stored in zip(REPORTS, stored_at_ack, strict=True):
        done += len(kinds)
        assert stored[:done] == expected[:done]  # its events were stored before its ACK
    assert r.dispenser.side.counters["retransmissions"] >= 1
    assert counters["duplicates"] >= 1
    assert (counters["events"], counters["reports"]) == (len(expected), len(REPORTS))
    assert len(r.heard) >= len(REPORTS)

    missed = store.stored[2]
    assert (missed.device_id, missed.gateway_id) == (DEVICE, "gw-1")
    assert missed.device_type == DeviceType.MEDICINE_DISPENSER
    assert missed.time == T + timedelta(hours=5)  # the dispenser's own clock
    assert missed.payload == DosePayload(dose_id="noon", scheduled_for=T + timedelta(hours=4))
    assert store.stored[3].payload == RefillPayload(doses_left=126)
    assert store.stored[9].payload == BatteryLevelPayload(level_percent=15, voltage=3.55)


async def test_a_failing_sink_gets_no_ack_and_the_report_is_stored_when_it_recovers() -> None:
    store = Store(failures=2)
    async with rig(store, sink_retry_s=0.25) as r:
        acked_with: list[int] = []
        r.dispenser.on_delivered = lambda _m: acked_with.append(len(store.stored))
        r.dispenser.send(DoseMissed(T, "noon", T, Vkp.NO_MEDICINE))
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == 1)
        r.dispenser.send(Tamper(T))
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == 2)
        counters = r.driver.counters

    assert store.kinds() == [EventKind.DOSE_MISSED, EventKind.TAMPER]
    assert acked_with == [1, 2]  # no ACK while the sink failed
    assert len(store.attempted_ids) == 4  # two failures, then the report, then the tamper
    assert store.attempted_ids[0] == store.attempted_ids[2]  # the same event, not a new one
    assert r.dispenser.side.counters["retransmissions"] >= 1  # the dispenser kept resending
    assert counters["sink_failures"] == 2


async def test_a_sink_that_times_out_gets_no_ack_and_the_report_is_stored_once() -> None:
    store = Store(delay=1.0, slow_calls=1)
    async with rig(store, sink_timeout=0.1) as r:
        r.dispenser.send(Empty(T))
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == 1)
        counters = r.driver.counters
    assert store.kinds() == [EventKind.EMPTY]
    assert counters["sink_timeouts"] == 1


async def test_garbage_and_damaged_frames_are_counted_and_the_good_ones_stored() -> None:
    async with rig() as r:
        r.dispenser.inject(b"\x00\x13noise\x11\xff")  # before the first flag: garbage
        r.dispenser.send(DoseDue(T, "morning", T))
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == 1)
        damaged = bytearray(encode(Frame(9, DoseTaken(T, "morning", T))))
        damaged[-5] ^= 0x01  # a bit flipped in the dose id: the CRC fails
        r.dispenser.inject(bytes(damaged))
        r.dispenser.inject(bytes.fromhex("7E 01 06 7F 00 00 68 FD 7E"))  # unknown type 7F
        r.dispenser.send(DoseTaken(T + timedelta(minutes=1), "morning", T))
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == 2)
        counters = r.driver.counters

    assert r.store.kinds() == [EventKind.DOSE_DUE, EventKind.DOSE_TAKEN]
    assert r.store.stored[1].time == T + timedelta(minutes=1)
    assert (counters["garbage"], counters["bad_crc"], counters["unknown_type"]) == (1, 1, 1)
    assert counters["naks_sent"] == 2  # garbage is never answered


# --- the dispenser's clock --------------------------------------------------------------


async def test_the_clock_is_synced_at_connect_and_when_a_report_says_it_is_not_set() -> None:
    async with rig(zone=OSLO) as r:
        await r.dispenser.play(lambda: r.driver.counters["clock_syncs"] == 1)
        first = r.dispenser.syncs()[0]
        r.dispenser.send(Heartbeat(None, 5, 42, 100, True))  # the clock lost power
        r.dispenser.send(DoseDue(None, "morning", T))
        await r.dispenser.play(lambda: r.driver.counters["clock_syncs"] >= 2)
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == 2)
        counters = r.driver.counters

    assert r.dispenser.commands[0] == first  # the first thing on a new line
    assert first.utc_offset_minutes == 60  # Oslo in winter
    assert T <= first.time < T + timedelta(seconds=WAIT_S)
    assert counters["clock_not_set"] == 2
    due = r.store.stored[0]
    assert due.time == due.gateway_time  # stamped with the gateway's clock
    assert T <= due.time < T + timedelta(seconds=WAIT_S)


async def test_the_clock_is_synced_again_each_interval_and_on_an_offset_change() -> None:
    dst = datetime(2025, 3, 30, 1, 0, tzinfo=UTC)  # 02:00 in Oslo becomes 03:00
    async with rig(zone=OSLO, start=dst - timedelta(seconds=0.5), offset_check_s=0.05) as r:
        await r.dispenser.play(lambda: r.driver.counters["clock_syncs"] >= 2)
    offsets = [sync.utc_offset_minutes for sync in r.dispenser.syncs()]
    assert offsets[:2] == [60, 120]

    async with rig(clock_sync_interval_s=0.2) as r:
        await r.dispenser.play(lambda: r.driver.counters["clock_syncs"] >= 3, timeout=2.0)
    assert len(r.dispenser.syncs()) >= 3


# --- commands ---------------------------------------------------------------------------


async def test_a_schedule_round_trip_succeeds() -> None:
    async with rig() as r:
        result = await execute(r, command("dispenser_schedule", params=SCHEDULE))
    assert result.ok, result.error
    assert r.dispenser.commands[-1] == SetSchedule(
        (
            ScheduledDose("morning", time(8, 0)),
            ScheduledDose("evening", time(20, 30)),
        )
    )
    assert r.driver.counters["commands_ok"] == 1


async def test_a_passed_self_test_is_stored_as_a_test_alarm_and_sync_clock_works() -> None:
    async with rig(zone=OSLO) as r:
        tested = await execute(r, command("test_alarm"))
        synced = await execute(r, command("sync_clock"))
    assert (tested.ok, synced.ok) == (True, True)
    assert r.store.kinds() == [EventKind.TEST_ALARM]
    assert r.store.stored[0].time == T  # when the dispenser ran the test
    assert isinstance(r.dispenser.commands[-2], RunTest)
    assert r.dispenser.commands[-1] == r.dispenser.syncs()[-1]
    assert r.dispenser.syncs()[-1].utc_offset_minutes == 60


async def test_a_dispenser_that_does_not_answer_fails_the_command_after_the_retries() -> None:
    async with rig(answer=silent_on_schedule, ack_timeout=0.1, max_tries=3) as r:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await execute(r, command("dispenser_schedule", params=SCHEDULE))
        elapsed = loop.time() - started
    assert not result.ok
    assert result.error == "dispenser: no_answer"
    schedules = [c for c in r.dispenser.commands if isinstance(c, SetSchedule)]
    assert len(schedules) == 1
    assert r.dispenser.side.counters["duplicates"] == 2  # three transmissions in all
    assert elapsed < 2.0
    assert r.driver.counters["commands_failed"] == 1


async def test_a_refusal_by_the_dispenser_fails_the_command() -> None:
    def busy(cmd: Command) -> Reply | None:
        if isinstance(cmd, SetSchedule):
            return ScheduleReply(ReplyStatus.BUSY, 0)
        return answer_ok(cmd)

    async with rig(answer=busy) as r:
        result = await execute(r, command("dispenser_schedule", params=SCHEDULE))
    assert (result.ok, result.error) == (False, "dispenser: device:busy")


async def test_an_expired_command_is_never_sent_and_the_wait_ends_at_expiry() -> None:
    async with rig(answer=silent_on_schedule, max_tries=100) as r:
        await r.dispenser.play(lambda: r.driver.counters["clock_syncs"] == 1)
        late = await execute(r, command("dispenser_schedule", params=SCHEDULE, expires_in=-1))
        assert (late.ok, late.error) == (False, "expired")
        assert not any(isinstance(c, SetSchedule) for c in r.dispenser.commands)

        loop = asyncio.get_running_loop()
        started = loop.time()
        unanswered = await execute(
            r, command("dispenser_schedule", params=SCHEDULE, expires_in=0.4, now=r.clock())
        )
        elapsed = loop.time() - started
    assert not unanswered.ok
    assert unanswered.error is not None
    assert unanswered.error.startswith("expired before the dispenser answered")
    assert elapsed < 1.5


async def test_commands_are_refused_without_a_line_or_for_what_a_dispenser_cannot_do() -> None:
    store = Store()
    driver = DispenserDriver(sink=store, gateway_id="gw-1", device_id=DEVICE, clock=lambda: T)
    assert driver.handles(DEVICE)
    assert not driver.handles("lock-1")

    result = await driver.execute(command("test_alarm"))
    assert (result.ok, result.error) == (False, "dispenser not connected")
    result = await driver.execute(command("unlock"))
    assert not result.ok
    assert "unlock" in (result.error or "")
    bad = {"doses": [{"dose_id": "morning", "time": "25:00"}]}
    result = await driver.execute(command("dispenser_schedule", params=bad))
    assert not result.ok
    assert "params.doses[0].time" in (result.error or "")
    assert driver.counters["commands_failed"] == 3


# --- the end of the line ----------------------------------------------------------------


async def test_closing_the_line_ends_run_and_fails_a_waiting_command() -> None:
    async with rig(answer=silent_on_schedule, max_tries=100) as r:
        r.dispenser.send(DoseDue(T, "morning", T))
        await r.dispenser.play(lambda: len(r.dispenser.delivered) == 1)
        task = asyncio.ensure_future(
            r.driver.execute(command("dispenser_schedule", params=SCHEDULE))
        )
        await r.dispenser.play(
            lambda: any(isinstance(c, SetSchedule) for c in r.dispenser.commands)
        )
        os.close(r.dispenser.master)  # the USB cable pulled
        async with asyncio.timeout(WAIT_S):
            result = await task
            while r.link.counters["handler_returned"] == 0:
                await asyncio.sleep(0.01)
        counters = r.driver.counters

    assert (result.ok, result.error) == (False, "dispenser disconnected before it answered")
    assert r.link.counters["handler_failed"] == 0  # run() returned, it did not raise
    assert counters["streams"] == 1
    assert counters["stream_errors"] + counters["end_of_stream"] == 1
    assert not r.driver.connected


def test_ids_and_timers_are_checked_when_the_driver_is_made() -> None:
    with pytest.raises(ValueError, match="disp 1"):
        DispenserDriver(sink=Store(), gateway_id="gw-1", device_id="disp 1")
    with pytest.raises(ValueError, match="ack_timeout"):
        DispenserDriver(sink=Store(), gateway_id="gw-1", device_id=DEVICE, ack_timeout=0)
