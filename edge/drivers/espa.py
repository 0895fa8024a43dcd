"""The ESPA 4.4.4 driver: the gateway as the paging system on a nurse-call central's line.

``EspaDriver.run(reader, writer)`` owns one byte stream (a serial port opened by
``edge.serial_port.SerialLink``, or a pseudo-terminal in tests) until it closes, and runs
an ``EspaSlaveSession`` on it. For every call block it builds the canonical event and
awaits ``sink(events)`` (the durable queue) *before* answering: ACK tells the central the
call is taken, so it is sent only once the event is stored. If the sink fails, or takes
longer than ``sink_timeout`` (it is then cancelled), the answer is NAK and the central
sends the call again: a write that completed anyway gives a second event, never a loss.

Keep ``sink_timeout`` below the central's own response timeout (a few seconds; it is a
setting of the central): an answer that comes after the central has given up on a block
is taken as the answer to whatever it sends next.

``on_heard`` (optional) is called whenever frames came from the central; a central that
polls (most do, every second or faster) can so be supervised as a device with
``edge.supervision.Supervisor.seen``. ``counters`` adds up the decoder's, the session's
and the driver's counters over every stream the driver has run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime

import structlog

from devices.errors import InvalidEventError
from devices.espa.codec import EspaCall, NationalVariant
from devices.espa.mapping import to_events
from devices.espa.session import EspaSlaveSession
from devices.events import DeviceEvent, is_identifier
from edge.serial_port import read_within

log = structlog.get_logger(__name__)

Sink = Callable[[list[DeviceEvent]], Awaitable[None]]
"""Stores events durably; returns only when they are stored, raises if they are not."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class EspaDriver:
    """One nurse-call central on one line; see the module docstring."""

    def __init__(
        self,
        *,
        sink: Sink,
        gateway_id: str,
        central_device_id: str,
        addresses: Mapping[str, str] | None = None,
        address: str = "2",
        cleared_statuses: Collection[str] = frozenset(),
        national_variant: NationalVariant | None = None,
        point_to_point: bool = True,
        sink_timeout: float = 2.0,
        tick_interval: float = 0.1,
        read_size: int = 4096,
        clock: Callable[[], datetime] = _utc_now,
        on_heard: Callable[[], None] | None = None,
    ) -> None:
        ids = [gateway_id, central_device_id, *(addresses or {}).values()]
        if bad := [value for value in ids if not is_identifier(value)]:
            raise ValueError(f"not valid ids: {bad!r}")
        self._sink = sink
        self._gateway_id = gateway_id
        self._central_device_id = central_device_id
        self._addresses = dict(addresses or {})
        self._address = address
        self._cleared_statuses = frozenset(cleared_statuses)
        self._national_variant: NationalVariant | None = national_variant
        self._point_to_point = point_to_point
        self.sink_timeout = sink_timeout
        self.tick_interval = tick_interval
        self._read_size = read_size
        self._clock = clock
        self._on_heard = on_heard
        self._totals: Counter[str] = Counter()
        self._session: EspaSlaveSession | None = None

    @property
    def counters(self) -> dict[str, int]:
        """Counts over every stream run so far, the current one included."""
        total = Counter(self._totals)
        if self._session is not None:
            total.update(self._session.counters)
            total.update(self._session.decoder.counters)
        return dict(total)

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the line until the stream closes (end of file or a read/write error)."""
        loop = asyncio.get_running_loop()
        session = EspaSlaveSession(
            address=self._address,
            point_to_point=self._point_to_point,
            now=loop.time(),
        )
        self._session = session
        self._totals["streams"] += 1
        try:
            await self._serve(session, reader, writer)
        except OSError as exc:  # ConnectionError, EIO from a closed pseudo-terminal
            self._totals["stream_errors"] += 1
            log.info("espa_stream_closed", error=type(exc).__name__)
        finally:
            self._session = None
            self._totals.update(session.counters)
            self._totals.update(session.decoder.counters)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(
        self,
        session: EspaSlaveSession,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await read_within(lambda: reader.read(self._read_size), self.tick_interval)
            if data == b"":
                self._totals["end_of_stream"] += 1
                return
            if data:
                await self._data_received(session, data, loop.time())
            session.tick(loop.time())
            if out := session.data_to_send():
                self._totals["bytes_out"] += len(out)
                writer.write(out)
                await writer.drain()

    async def _data_received(self, session: EspaSlaveSession, data: bytes, now: float) -> None:
        self._totals["bytes_in"] += len(data)
        frames = session.counters["frames"]
        calls = session.receive_data(data, now=now)
        if self._on_heard is not None and session.counters["frames"] > frames:
            self._on_heard()
        while calls:
            accepted = await self._deliver(calls[0])
            calls = session.finish_call(accepted=accepted)

    async def _deliver(self, call: EspaCall) -> bool:
        """Store the call's events; True if stored (answer ACK), False if not (NAK)."""
        try:
            events = to_events(
                call,
                gateway_id=self._gateway_id,
                central_device_id=self._central_device_id,
                addresses=self._addresses,
                now=self._clock(),
                cleared_statuses=self._cleared_statuses,
                national_variant=self._national_variant,
            )
        except InvalidEventError as exc:
            self._totals["mapping_failures"] += 1
            log.error("espa_call_unmappable", reason=exc.reason)
            return False
        try:
            async with asyncio.timeout(self.sink_timeout):
                await self._sink(events)
        except TimeoutError:
            self._totals["sink_timeouts"] += 1
            log.warning("espa_sink_timeout", timeout_s=self.sink_timeout)
            return False
        except Exception as exc:  # the sink's failure is answered with NAK, never fatal
            self._totals["sink_failures"] += 1
            log.warning("espa_sink_failed", error=type(exc).__name__)
            return False
        self._totals["events"] += len(events)
        return True
