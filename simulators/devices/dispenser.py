"""A simulated medicine dispenser on a serial line, speaking our dispenser protocol.

``SimDispenser(port, clock=...)`` runs the reference ``devices.dispenser.DeviceSide``
session over a ``SimSerialPort``: each report is numbered and resent every ``T_ack``
until the gateway acknowledges it, reports go one at a time in order, and a report the
gateway refuses for good is dropped so it never blocks the ones behind it (the spec's
"Link layer", ``docs/protocols/dispenser.md``). The report methods (``dose_due``,
``dose_taken``, ...) queue a report and return at once; ``await drained(timeout)`` waits
until every queued report is acknowledged.

The dispenser answers the gateway's commands as the spec says: ``SetSchedule`` replaces
its schedule (kept in ``schedule``), ``SyncClock`` sets its clock and local offset (its
reports then carry the gateway's time), ``RunTest`` runs the self-test (``test_passes``
decides the outcome). It sends a heartbeat when it has sent nothing for ``heartbeat_s``.

``clock`` is the simulated world's wall clock (timezone-aware ``datetime``): it stamps
the reports. The link's timers run on the event loop's monotonic clock, because the
serial line is real even when the world's time is not.

Fault injection: ``send_garbage(n)`` writes noise between frames; ``send_corrupt_frame()``
writes a frame whose CRC is wrong (the gateway answers NAK ``BAD_CRC`` and must go on).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from devices.dispenser.codec import (
    FLAG,
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
    stuff,
)
from devices.dispenser.session import (
    DEFAULT_ACK_TIMEOUT,
    CommandReceived,
    DeviceOutput,
    DeviceSide,
    EventDelivered,
    EventFailed,
)
from edge.serial_port import read_within
from simulators.devices.pty import SimSerialPort

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

BATTERY_LOW_PERCENT = 20
"""At or below this level a battery report carries VKP 1.17 (battery low)."""
BATTERY_EMPTY_PERCENT = 5
"""At or below this level it carries VKP 1.18 (battery empty, shutting down)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _whole(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(microsecond=0)


class SimDispenser:
    """One simulated dispenser; see the module docstring.

    ``counters``: ``reports_queued``, ``reports_acked``, ``reports_failed`` (refused for
    good by the gateway), ``heartbeats``, ``commands_received``, ``commands_answered``,
    ``garbage_bytes_sent``, ``corrupt_frames_sent``, plus the session's
    (``retransmissions``, ``naks_received``, ``duplicates``, ...).
    ``acknowledged`` lists the reports the gateway acknowledged, in order.
    """

    def __init__(
        self,
        port: SimSerialPort,
        *,
        clock: Clock = utc_now,
        clock_set: bool = True,
        heartbeat_s: float | None = 60.0,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        tick_s: float = 0.05,
        first_seq: int | None = None,
        doses_left: int = 42,
        battery_percent: int = 100,
        mains_powered: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        """``clock_set=False``: the real-time clock lost power; reports carry "not set"
        until the gateway sends SyncClock. ``first_seq`` (random by default, as after a
        power-up) is the first sequence number."""
        self._rng = rng or random.Random()
        self._port = port
        self._clock = clock
        self._clock_set = clock_set
        self._skew = timedelta(0)
        self.heartbeat_s = heartbeat_s
        self._tick_s = tick_s
        first = self._rng.randrange(256) if first_seq is None else first_seq
        self._session = DeviceSide(ack_timeout=ack_timeout, first_seq=first)
        self.schedule: tuple[ScheduledDose, ...] = ()
        self.utc_offset_minutes = 0
        self.test_passes = True
        self.doses_left = doses_left
        self.battery_percent = battery_percent
        self.mains_powered = mains_powered
        self.acknowledged: list[DeviceMessage] = []
        self.failed: list[DeviceMessage] = []
        self._counts: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._started_at = 0.0
        self._last_sent = 0.0

    # --- life cycle -------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        return {**self._session.counters, **self._counts}

    @property
    def clock_set(self) -> bool:
        """False until SyncClock when the dispenser started with its clock not set."""
        return self._clock_set

    @property
    def pending(self) -> bool:
        """True while a report waits for its acknowledgement or is queued."""
        return not self._session.idle

    async def start(self) -> None:
        """Switch on: plug the port in (if it is not) and start the link."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._started_at = self._last_sent = loop.time()
        await self._port.start()
        self._task = asyncio.create_task(self._run(), name="sim-dispenser")

    async def stop(self) -> None:
        """Switch off: the link stops (queued reports are not sent) and the port is
        unplugged, as a USB dispenser leaves the gateway's bus when it is off."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._port.stop()

    async def __aenter__(self) -> SimDispenser:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def drained(self, timeout: float) -> None:  # noqa: ASYNC109 - a bounded wait, by design
        """Wait until every report queued so far is acknowledged (or refused for good).

        Raises ``TimeoutError`` if that takes longer than ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while self.pending:
                self._idle.clear()
                await self._idle.wait()

    # --- reports ----------------------------------------------------------------------

    def dose_due(self, dose_id: str, scheduled_for: datetime) -> int:
        """The dose is in the tray and the reminder has started."""
        return self._report(DoseDue(self._device_time(), dose_id, _whole(scheduled_for)))

    def dose_taken(self, dose_id: str, scheduled_for: datetime) -> int:
        return self._report(DoseTaken(self._device_time(), dose_id, _whole(scheduled_for)))

    def dose_missed(
        self, dose_id: str, scheduled_for: datetime, *, vkp: Vkp = Vkp.NOT_DISPENSED
    ) -> int:
        """Not dispensed or not taken in time; ``vkp`` is 1.1 to 1.4."""
        message = DoseMissed(self._device_time(), dose_id, _whole(scheduled_for), vkp)
        return self._report(message)

    def refill_needed(self, doses_left: int) -> int:
        self.doses_left = doses_left
        return self._report(RefillNeeded(self._device_time(), doses_left))

    def empty(self) -> int:
        self.doses_left = 0
        return self._report(Empty(self._device_time()))

    def jammed(self, *, vkp: Vkp = Vkp.TECHNICAL_ERROR) -> int:
        """Dispensing stopped; ``vkp`` is 1.5 to 1.9."""
        return self._report(Jammed(self._device_time(), vkp))

    def tamper(self, *, cause: TamperCause = TamperCause.LID_FORCED) -> int:
        return self._report(Tamper(self._device_time(), cause))

    def power_lost(self) -> int:
        self.mains_powered = False
        return self._report(PowerLost(self._device_time()))

    def power_restored(self) -> int:
        self.mains_powered = True
        return self._report(PowerRestored(self._device_time()))

    def battery(self, level_percent: int, voltage_mv: int, *, low: bool | None = None) -> int:
        """A battery reading. ``low`` (default: judged from the level) adds VKP 1.17, or
        1.18 at ``BATTERY_EMPTY_PERCENT`` or below."""
        self.battery_percent = level_percent
        if low is None:
            low = level_percent <= BATTERY_LOW_PERCENT
        vkp = None
        if low:
            vkp = Vkp.BATTERY_EMPTY if level_percent <= BATTERY_EMPTY_PERCENT else Vkp.BATTERY_LOW
        return self._report(Battery(self._device_time(), level_percent, voltage_mv, vkp))

    def heartbeat(self) -> int:
        self._counts["heartbeats"] += 1
        loop = asyncio.get_running_loop()
        message = Heartbeat(
            self._device_time(),
            max(0, int(loop.time() - self._started_at)),
            self.doses_left,
            self.battery_percent,
            self.mains_powered,
        )
        return self._report(message)

    # --- fault injection --------------------------------------------------------------

    async def send_garbage(self, n: int) -> None:
        """Write ``n`` bytes of line noise (no flag byte, so it is one blob of damage)."""
        noise = self._rng.randbytes(n).replace(bytes([FLAG]), b"\x00")
        self._counts["garbage_bytes_sent"] += len(noise)
        await self._port.write(noise)

    async def send_corrupt_frame(self) -> None:
        """Write a heartbeat whose CRC is wrong; it is not a queued report."""
        message = Heartbeat(self._device_time(), 0, self.doses_left, self.battery_percent, True)
        payload = message.to_payload()
        seq = self._rng.randrange(256)
        body = bytes([1, seq, message.TYPE]) + len(payload).to_bytes(2, "big") + payload
        bad_crc = (crc16(body) ^ 0x0001).to_bytes(2, "big")
        self._counts["corrupt_frames_sent"] += 1
        await self._port.write(bytes([FLAG]) + stuff(body + bad_crc) + bytes([FLAG]))

    # --- the link ---------------------------------------------------------------------

    def _device_time(self) -> datetime | None:
        if not self._clock_set:
            return None
        return _whole(self._clock() + self._skew)

    def _report(self, message: DeviceMessage) -> int:
        loop = asyncio.get_running_loop()
        handle = self._session.send(message, loop.time())
        self._counts["reports_queued"] += 1
        self._last_sent = loop.time()
        self._idle.clear()
        self._flush()
        return handle

    def _flush(self) -> None:
        out = self._session.data_to_send()
        if out:
            self._port.write_nowait(out)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await read_within(self._port.read, self._tick_s)
            now = loop.time()
            outputs = self._session.receive_data(data) if data else []
            outputs += self._session.tick(now)
            self._handle(outputs)
            if (
                self.heartbeat_s is not None
                and self._session.idle
                and now - self._last_sent >= self.heartbeat_s
            ):
                self.heartbeat()
            self._flush()
            if self._session.idle:
                self._idle.set()

    def _handle(self, outputs: list[DeviceOutput]) -> None:
        for output in outputs:
            if isinstance(output, EventDelivered):
                self._counts["reports_acked"] += 1
                self.acknowledged.append(output.message)
            elif isinstance(output, EventFailed):
                self._counts["reports_failed"] += 1
                self.failed.append(output.message)
                log.warning("sim_dispenser_report_refused", reason=output.reason)
            elif isinstance(output, CommandReceived):
                self._counts["commands_received"] += 1
                self._session.reply(output, self._carry_out(output.command))
                self._counts["commands_answered"] += 1

    def _carry_out(self, command: Command) -> Reply:
        if isinstance(command, SetSchedule):
            self.schedule = command.doses
            return ScheduleReply(ReplyStatus.OK, len(command.doses))
        if isinstance(command, SyncClock):
            previous = self._device_time()
            self._skew = command.time - self._clock()
            self._clock_set = True
            self.utc_offset_minutes = command.utc_offset_minutes
            return ClockReply(ReplyStatus.OK, previous)
        if isinstance(command, RunTest):
            status = ReplyStatus.OK if self.test_passes else ReplyStatus.FAULT
            return TestReply(status, self._device_time())
        # A command added to the protocol later: every reply type takes a status alone.
        return command.REPLY(ReplyStatus.UNSUPPORTED)  # type: ignore[call-arg]
