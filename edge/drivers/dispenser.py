"""The medicine-dispenser driver: the gateway's end of one dispenser's serial line.

``DispenserDriver.run(reader, writer)`` owns one byte stream (a serial port opened by
``edge.serial_port.SerialLink``, or a pseudo-terminal in tests) until it closes, and runs
a ``GatewaySide(manual_ack=True)`` session on it (``docs/protocols/dispenser.md``).

Reports. Each new report becomes canonical events (``to_events``), made once, and is
acknowledged only after ``sink(events)`` (the durable queue) has returned: the ACK tells
the dispenser it may forget the report. If the sink fails or takes longer than
``sink_timeout``, no ACK is sent; the dispenser resends every T_ack, and the driver
stores the same events (same ids) again every ``sink_retry_s`` until the sink takes
them. (The session does not deliver a resend of a report it already delivered, so the
retry is the driver's.) Reports are stored in the order they arrived. A heartbeat makes
no event and is acknowledged at once, unless a report before it is still unstored.

Clock (spec, section 3). The driver sends SyncClock at the start of each stream, again
``clock_sync_interval_s`` after each successful sync (a day), when a report says the
dispenser's clock is not set (time 0), and within ``offset_check_s`` of a change of
``zone``'s UTC offset (daylight saving time). A failed sync is tried again after
``clock_retry_s``.

Commands. ``execute`` carries out the hub's ``dispenser_schedule``, ``sync_clock`` and
``test_alarm`` for this dispenser. Commands go to the line one at a time (the protocol is
stop and wait); a command is never sent after its ``expires_at``, and ``execute`` waits
for the answer at most until then. A self-test that passed becomes a ``test_alarm``
event, stored before the command is reported done.

``on_heard`` is called whenever good frames came from the dispenser (supervision: the
spec's 180 s of silence is ``check_in_s`` for the device). ``counters`` adds up the
decoder's, the session's and the driver's counters over every stream. Logs carry ids,
counts and reasons, never a frame's content: dose and schedule data are health data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo

import structlog

from devices.dispenser.codec import ClockReply, Command, DecodeError, SyncClock, TestReply
from devices.dispenser.events import (
    DispenserCommandError,
    command_from_gateway,
    command_result,
    to_events,
)
from devices.dispenser.session import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_MAX_TRIES,
    CommandFailed,
    CommandSucceeded,
    GatewayOutput,
    GatewaySide,
    MessageReceived,
)
from devices.errors import InvalidEventError
from devices.events import DeviceEvent, is_identifier
from devices.gateway import CommandResult, GatewayCommand
from edge.serial_port import read_within

log = structlog.get_logger(__name__)

Sink = Callable[[list[DeviceEvent]], Awaitable[None]]
"""Stores events durably; returns only when they are stored, raises if they are not."""

Outcome = CommandSucceeded | CommandFailed

COMMAND_KINDS = frozenset({"dispenser_schedule", "sync_clock", "test_alarm"})
NOT_CONNECTED = "dispenser not connected"
DISCONNECTED = "dispenser disconnected before it answered"
EXPIRED = "expired"
EXPIRED_UNANSWERED = "expired before the dispenser answered (it may still carry it out)"
TEST_NOT_STORED = "the self-test passed but its test_alarm event could not be stored"
_FIXED_ERRORS = frozenset(
    {NOT_CONNECTED, DISCONNECTED, EXPIRED, EXPIRED_UNANSWERED, TEST_NOT_STORED}
)
_MAX_ERROR = 500  # CommandResult.error's limit

COUNTER_NAMES = (
    *("streams", "end_of_stream", "stream_errors", "bytes_in", "bytes_out"),
    *("frames", *(reason.value for reason in DecodeError)),
    *("acks_sent", "naks_sent", "naks_received", "duplicates", "retransmissions"),
    *("unexpected", "stale_replies", "reports", "events", "mapping_failures"),
    *("sink_failures", "sink_timeouts", "unstored_at_close", "clock_not_set"),
    *("clock_syncs", "clock_syncs_failed", "commands", "commands_sent"),
    *("commands_ok", "commands_failed"),
)
"""Always present in ``counters`` (zero until counted), so an exporter sees every series."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _loggable(error: str | None) -> str | None:
    """The error for the log; a refusal of the params may quote them (a schedule)."""
    if error is None or error in _FIXED_ERRORS or error.startswith("dispenser: "):
        return error
    return "refused"


@dataclass(eq=False)
class _Line:
    """One stream's state: the session and what waits on it."""

    session: GatewaySide
    writer: asyncio.StreamWriter
    next_sync_at: float
    waiting: dict[int, asyncio.Future[Outcome | None]] = field(default_factory=dict)
    unstored: deque[tuple[MessageReceived, list[DeviceEvent]]] = field(default_factory=deque)
    store_retry_at: float = 0.0
    sync_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    offset_sent: int | None = None
    """The UTC offset of the last SyncClock tried (or carried out for the hub)."""


class DispenserDriver:
    """One medicine dispenser on one serial line; see the module docstring."""

    def __init__(
        self,
        *,
        sink: Sink,
        gateway_id: str,
        device_id: str,
        on_heard: Callable[[], None] | None = None,
        zone: tzinfo = UTC,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_tries: int = DEFAULT_MAX_TRIES,
        sink_timeout: float = 2.0,
        sink_retry_s: float = 1.0,
        tick_interval: float = 0.1,
        clock_sync_interval_s: float = 86_400.0,
        clock_retry_s: float = 60.0,
        offset_check_s: float = 30.0,
        read_size: int = 4096,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if bad := [value for value in (gateway_id, device_id) if not is_identifier(value)]:
            raise ValueError(f"not valid ids: {bad!r}")
        GatewaySide(ack_timeout=ack_timeout, max_tries=max_tries)  # checks both, early
        self._sink = sink
        self._gateway_id = gateway_id
        self._device_id = device_id
        self._on_heard = on_heard
        self._zone = zone
        self.ack_timeout = ack_timeout
        self.max_tries = max_tries
        self.sink_timeout = sink_timeout
        self.sink_retry_s = sink_retry_s
        self.tick_interval = tick_interval
        self.clock_sync_interval_s = clock_sync_interval_s
        self.clock_retry_s = clock_retry_s
        self.offset_check_s = offset_check_s
        self._read_size = read_size
        self._clock = clock
        self._totals: Counter[str] = Counter(dict.fromkeys(COUNTER_NAMES, 0))
        self._line: _Line | None = None
        self._gate = asyncio.Lock()  # one command on the line at a time
        self._in_flight: asyncio.Future[Outcome | None] | None = None
        self._log = log.bind(device_id=device_id)

    @property
    def counters(self) -> dict[str, int]:
        """Counts over every stream run so far, the current one included."""
        total = Counter(self._totals)
        if self._line is not None:
            total.update(self._line.session.counters)
            total.update(self._line.session.decoder.counters)
        return dict(total)

    @property
    def connected(self) -> bool:
        return self._line is not None

    # --- the line -------------------------------------------------------------------

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the line until the stream closes (end of file or a read/write error)."""
        loop = asyncio.get_running_loop()
        session = GatewaySide(
            ack_timeout=self.ack_timeout, max_tries=self.max_tries, manual_ack=True
        )
        line = _Line(session, writer, next_sync_at=loop.time())
        self._line = line
        self._totals["streams"] += 1
        keeper = asyncio.create_task(self._keep_clock(line), name="dispenser-clock")
        try:
            await self._serve(line, reader)
        except OSError as exc:  # ConnectionError, SerialException, EIO from a closed pty
            self._totals["stream_errors"] += 1
            self._log.info("dispenser_stream_closed", error=type(exc).__name__)
        finally:
            self._line = None
            keeper.cancel()
            try:
                await keeper
            except asyncio.CancelledError:
                pass
            except Exception:  # a bug there must not keep the port from closing
                self._log.exception("dispenser_clock_keeper_failed")
            self._close_line(line)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _close_line(self, line: _Line) -> None:
        for future in line.waiting.values():
            if not future.done():
                future.set_result(None)
        if line.unstored:  # never acknowledged: the dispenser still holds and resends them
            self._totals["unstored_at_close"] += len(line.unstored)
            self._log.warning("dispenser_reports_unstored_at_close", count=len(line.unstored))
        self._totals.update(line.session.counters)
        self._totals.update(line.session.decoder.counters)

    async def _serve(self, line: _Line, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await read_within(lambda: reader.read(self._read_size), self.tick_interval)
            if data == b"":
                self._totals["end_of_stream"] += 1
                return
            if data:
                await self._data_received(line, data)
            await self._store_unstored(line, loop.time())
            await self._outputs(line, line.session.tick(loop.time()))
            self._flush(line)
            await line.writer.drain()

    async def _data_received(self, line: _Line, data: bytes) -> None:
        self._totals["bytes_in"] += len(data)
        frames = line.session.decoder.counters["frames"]
        outputs = line.session.receive_data(data)
        if self._on_heard is not None and line.session.decoder.counters["frames"] > frames:
            self._on_heard()
        await self._outputs(line, outputs)

    async def _outputs(self, line: _Line, outputs: list[GatewayOutput]) -> None:
        for output in outputs:
            if isinstance(output, MessageReceived):
                self._report_received(line, output)
            else:
                self._command_finished(line, output)

    def _flush(self, line: _Line) -> None:
        if (out := line.session.data_to_send()) and not line.writer.is_closing():
            self._totals["bytes_out"] += len(out)
            line.writer.write(out)

    # --- reports --------------------------------------------------------------------

    def _report_received(self, line: _Line, received: MessageReceived) -> None:
        self._totals["reports"] += 1
        if getattr(received.message, "time", None) is None:  # the dispenser's clock is not set
            self._totals["clock_not_set"] += 1
            line.sync_wanted.set()
        try:
            events = to_events(
                received.message,
                gateway_id=self._gateway_id,
                device_id=self._device_id,
                now=self._clock(),
            )
        except InvalidEventError as exc:
            # Cannot happen with the codec's validated messages; if it does, refusing the
            # ACK would block every alarm behind this report for good, so it is
            # acknowledged and reported loudly instead.
            self._totals["mapping_failures"] += 1
            self._log.error("dispenser_report_unmappable", reason=exc.reason)
            events = []
        if not events and not line.unstored:
            line.session.ack(received)
            return
        line.unstored.append((received, events))

    async def _store_unstored(self, line: _Line, now: float) -> None:
        """Store waiting reports in order and acknowledge each once it is stored."""
        while line.unstored and now >= line.store_retry_at:
            received, events = line.unstored[0]
            if events and not await self._store(events):
                line.store_retry_at = now + self.sink_retry_s
                return
            line.unstored.popleft()
            line.session.ack(received)  # ignored if the dispenser has moved on meanwhile

    async def _store(self, events: list[DeviceEvent]) -> bool:
        try:
            async with asyncio.timeout(self.sink_timeout):
                await self._sink(events)
        except TimeoutError:
            self._totals["sink_timeouts"] += 1
            self._log.warning("dispenser_sink_timeout", timeout_s=self.sink_timeout)
            return False
        except Exception as exc:  # a failing sink means "no ACK", never the end of the line
            self._totals["sink_failures"] += 1
            self._log.warning("dispenser_sink_failed", error=type(exc).__name__)
            return False
        self._totals["events"] += len(events)
        self._log.debug("dispenser_events_stored", event_ids=[str(e.id) for e in events])
        return True

    # --- commands -------------------------------------------------------------------

    def handles(self, device_id: str) -> bool:
        return device_id == self._device_id

    async def execute(self, command: GatewayCommand) -> CommandResult:
        """Carry out a hub command on the dispenser; the result says whether it was done."""
        self._totals["commands"] += 1
        result = await self._execute(command)
        self._totals["commands_ok" if result.ok else "commands_failed"] += 1
        self._log.info(
            "dispenser_command_done",
            command_id=str(command.command_id),
            kind=command.kind,
            ok=result.ok,
            error=_loggable(result.error),
        )
        return result

    async def _execute(self, command: GatewayCommand) -> CommandResult:
        def build(at: datetime) -> Command:
            return command_from_gateway(command, now=at, zone=self._zone)

        try:
            if (refusal := self._refusal(command, build)) is not None:
                return self._failed(command, refusal)
            outcome = await self._exchange(build, deadline=command.expires_at)
        except DispenserCommandError as exc:
            return self._failed(command, str(exc))
        if isinstance(outcome, str):
            return self._failed(command, outcome)
        if isinstance(outcome, CommandSucceeded) and isinstance(outcome.reply, TestReply):
            return await self._test_passed(command, outcome)
        return command_result(command, outcome, now=self._clock())

    def _refusal(self, command: GatewayCommand, build: Callable[[datetime], Command]) -> str | None:
        """Why the command is refused before it is sent, or None.

        Raises ``DispenserCommandError`` for params that make no dispenser command.
        """
        if not self.handles(command.device_id):
            return f"device {command.device_id!r} is not this dispenser"
        if command.kind not in COMMAND_KINDS:
            return f"a medicine dispenser cannot carry out {command.kind!r}"
        if command.expires_at <= self._clock():
            return EXPIRED
        build(self._clock())  # bad params are refused before waiting for the line
        return NOT_CONNECTED if self._line is None else None

    async def _test_passed(
        self, command: GatewayCommand, outcome: CommandSucceeded
    ) -> CommandResult:
        """A passed self-test is the daily test of the path: its event must reach the hub."""
        now = self._clock()
        events = to_events(
            outcome.reply, gateway_id=self._gateway_id, device_id=self._device_id, now=now
        )
        if events and not await self._store(events):
            return self._failed(command, TEST_NOT_STORED)
        return command_result(command, outcome, now=self._clock())

    def _failed(self, command: GatewayCommand, error: str) -> CommandResult:
        return CommandResult(
            command_id=command.command_id, ok=False, error=error[:_MAX_ERROR], time=self._clock()
        )

    async def _exchange(
        self, build: Callable[[datetime], Command], *, deadline: datetime | None
    ) -> Outcome | str:
        """Send one command when the line is free; its outcome, or why there is none.

        ``deadline`` (wall clock): the command is not sent after it, and the answer is
        awaited until then. Without one, the session's retry limit bounds the wait.
        """
        limit = None if deadline is None else (deadline - self._clock()).total_seconds()
        sent = False
        try:
            async with asyncio.timeout(limit), self._gate:
                if self._in_flight is not None:  # one that an earlier caller gave up on
                    await asyncio.shield(self._in_flight)
                line = self._line
                if line is None:
                    return NOT_CONNECTED
                if deadline is not None and self._clock() >= deadline:
                    return EXPIRED
                future = self._send(line, build(self._clock()))
                sent = True
                outcome = await asyncio.shield(future)
        except TimeoutError:
            return EXPIRED_UNANSWERED if sent else EXPIRED
        return DISCONNECTED if outcome is None else outcome

    def _send(self, line: _Line, command: Command) -> asyncio.Future[Outcome | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome | None] = loop.create_future()
        handle = line.session.send(command, loop.time())
        line.waiting[handle] = future
        self._in_flight = future
        self._totals["commands_sent"] += 1
        self._flush(line)  # at once; the serving loop drains the writer
        return future

    def _command_finished(self, line: _Line, outcome: Outcome) -> None:
        if isinstance(outcome.command, SyncClock):
            self._clock_synced(line, outcome)
        future = line.waiting.pop(outcome.command_id, None)
        if future is not None and not future.done():
            future.set_result(outcome)
        if isinstance(outcome, CommandFailed):
            self._log.warning("dispenser_command_failed", reason=outcome.reason)

    # --- the dispenser's clock ------------------------------------------------------

    def _clock_synced(self, line: _Line, outcome: Outcome) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(outcome, CommandFailed):
            self._totals["clock_syncs_failed"] += 1
            line.next_sync_at = loop.time() + self.clock_retry_s
            return
        assert isinstance(outcome.command, SyncClock)  # noqa: S101 - checked by the caller
        self._totals["clock_syncs"] += 1
        line.next_sync_at = loop.time() + self.clock_sync_interval_s
        line.offset_sent = outcome.command.utc_offset_minutes
        previous = outcome.reply.previous_time if isinstance(outcome.reply, ClockReply) else None
        drift = None if previous is None else (previous - outcome.command.time).total_seconds()
        self._log.info("dispenser_clock_synced", was_set=previous is not None, drift_s=drift)

    def _offset_minutes(self, at: datetime) -> int:
        return (at.astimezone(self._zone).utcoffset() or timedelta(0)) // timedelta(minutes=1)

    def _sync_clock(self, at: datetime) -> Command:
        return SyncClock(at.replace(microsecond=0), self._offset_minutes(at))

    def _sync_due(self, line: _Line, now: float) -> bool:
        if line.sync_wanted.is_set() or now >= line.next_sync_at:
            return True
        offset = line.offset_sent
        return offset is not None and offset != self._offset_minutes(self._clock())

    async def _keep_clock(self, line: _Line) -> None:
        """Send SyncClock when it is due; runs as long as the stream."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._sync_due(line, loop.time()):
                wait = min(self.offset_check_s, line.next_sync_at - loop.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.0)):
                        await line.sync_wanted.wait()
                continue
            line.sync_wanted.clear()
            line.next_sync_at = loop.time() + self.clock_retry_s  # until the outcome says
            line.offset_sent = self._offset_minutes(self._clock())
            outcome = await self._exchange(self._sync_clock, deadline=None)
            if isinstance(outcome, str):
                self._log.info("dispenser_clock_sync_not_sent", reason=outcome)
