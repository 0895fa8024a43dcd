"""A simulated social-alarm unit reporting to an SIA DC-09 receiver over TCP.

``SimAlarmUnit(host, port, account=..., protocol="SIA-DCS" | "ADM-CID")`` is the unit's
side of DC-09 (``docs/protocols/sia-dc09.md``): each message gets the next sequence number
(0001 to 9999, then 0001 again) and the unit's timestamp, is written on a TCP connection
kept open between messages, and waits for the receiver's ACK of that sequence. A NAK
(damaged on the way, or a timestamp out of the receiver's window) or no answer within
``ack_timeout`` makes it send the message again, up to ``max_tries`` transmissions; a
dropped connection is opened again. The frames are built with ``devices.sia.encode``.

- A NAK carries the receiver's time: the unit sets its clock from it before it sends
  again, as DC-09 intends (a unit with a wrong clock is NAKed until it corrects it).
- After a timeout the connection is closed and opened again for the next attempt, so an
  answer that comes late can never be taken for the answer to another message.
- A DUH (understood the frame, cannot process it) is final: sending the same again
  cannot help, so ``AlarmUnitRefusedError`` is raised at once.

Every report method (``pendant_press``, ``fire``, ``link_test``, ...) returns the ACK
frame once the receiver has acknowledged, or raises ``AlarmUnitError`` after the
retries. One message is in flight at a time; concurrent calls wait their turn.

``clock`` is the simulated world's wall clock (timezone-aware); the timers run on the
event loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import structlog

from devices.errors import TelecareError
from devices.sia.codec import SiaBadFrame, SiaDecoder, SiaFrame, encode

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
UnitProtocol = Literal["SIA-DCS", "ADM-CID"]

MAX_SEQUENCE = 9999


class AlarmUnitError(TelecareError):
    """A message the receiver did not acknowledge."""


class AlarmUnitTimeoutError(AlarmUnitError):
    """No ACK after every transmission (NAKs, timeouts or no connection)."""


class AlarmUnitRefusedError(AlarmUnitError):
    """The receiver answered DUH: it cannot process this message."""


@dataclass(frozen=True, slots=True)
class Report:
    """One kind of report: its SIA code and its Contact ID qualifier and event code."""

    sia: str
    contact_id: str
    """Qualifier digit and three-digit event: ``1101`` is a new personal emergency."""


REPORTS: dict[str, Report] = {
    "pendant_press": Report("QA", "1101"),
    "medical_alarm": Report("MA", "1100"),
    "cancel": Report("OC", "1406"),
    "fire": Report("FA", "1110"),
    "water": Report("WA", "1113"),
    "low_battery": Report("YT", "1302"),
    "ac_loss": Report("AT", "1301"),
    "ac_restore": Report("AR", "3301"),
    "periodic_test": Report("RP", "1602"),
}
"""The codes the unit sends, following the rows of ``devices.sia.codes``."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def next_sequence(sequence: int) -> int:
    """1 to 9999, then 1 again (0000 is what a receiver writes in its NAK)."""
    return sequence % MAX_SEQUENCE + 1


class SimAlarmUnit:
    """One simulated alarm unit; see the module docstring.

    ``counters``: ``messages``, ``transmissions``, ``acks``, ``naks``, ``duhs``,
    ``timeouts``, ``connects``, ``connect_failures``, ``connection_lost``,
    ``clock_corrections``, ``failed``, ``stray_answers``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        account: str,
        protocol: UnitProtocol = "SIA-DCS",
        receiver: str | None = "0",
        line: str | None = "0",
        area: int = 1,
        clock: Clock = utc_now,
        clock_skew: timedelta = timedelta(0),
        ack_timeout: float = 5.0,
        max_tries: int = 5,
        retry_delay: float = 0.5,
        first_sequence: int = 1,
    ) -> None:
        """``clock_skew`` is how wrong the unit's clock is (corrected by a NAK's time)."""
        if protocol not in ("SIA-DCS", "ADM-CID"):
            raise ValueError(f"protocol must be SIA-DCS or ADM-CID, got {protocol!r}")
        if max_tries < 1 or ack_timeout <= 0 or retry_delay < 0:
            raise ValueError("need max_tries >= 1, ack_timeout > 0 and retry_delay >= 0")
        if not 1 <= first_sequence <= MAX_SEQUENCE:
            raise ValueError(f"first_sequence must be 1 to {MAX_SEQUENCE}")
        if not 0 <= area <= 99:
            raise ValueError("area must be 0 to 99")
        self.host = host
        self.port = port
        self.account = account.upper()
        self.protocol: UnitProtocol = protocol
        self.receiver = receiver
        self.line = line
        self.area = area
        self._clock = clock
        self.clock_skew = clock_skew
        self.ack_timeout = ack_timeout
        self.max_tries = max_tries
        self.retry_delay = retry_delay
        self._next_sequence = first_sequence
        self.counters: Counter[str] = Counter()
        self.acknowledged: list[SiaFrame] = []
        """The messages the receiver acknowledged, in order."""
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = SiaDecoder()
        SiaFrame(message_type=protocol, sequence=1, account=self.account)  # validates

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to do: the unit connects when it has something to send."""

    async def stop(self) -> None:
        """Close the connection (a message still in flight is sent again on a new one)."""
        await self._disconnect()

    async def __aenter__(self) -> SimAlarmUnit:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- reports ----------------------------------------------------------------------

    async def pendant_press(self, zone: int = 1) -> SiaFrame:
        """The resident pressed the pendant (SIA ``QA``, Contact ID ``1101``)."""
        return await self.report("pendant_press", zone)

    async def medical_alarm(self, zone: int = 0) -> SiaFrame:
        """The base unit's alarm button (SIA ``MA``, Contact ID ``1100``)."""
        return await self.report("medical_alarm", zone)

    async def cancel(self, zone: int = 0) -> SiaFrame:
        """The alarm was cancelled at the unit (SIA ``OC``, Contact ID ``1406``)."""
        return await self.report("cancel", zone)

    async def fire(self, zone: int) -> SiaFrame:
        return await self.report("fire", zone)

    async def water(self, zone: int) -> SiaFrame:
        return await self.report("water", zone)

    async def low_battery(self, zone: int = 0) -> SiaFrame:
        return await self.report("low_battery", zone)

    async def ac_loss(self) -> SiaFrame:
        return await self.report("ac_loss", 0)

    async def ac_restore(self) -> SiaFrame:
        return await self.report("ac_restore", 0)

    async def periodic_test(self) -> SiaFrame:
        return await self.report("periodic_test", 0)

    async def link_test(self) -> SiaFrame:
        """A ``NULL`` message: link supervision, no event."""
        return await self.send("NULL", "")

    async def report(self, name: str, zone: int) -> SiaFrame:
        """Send the report ``name`` (a key of ``REPORTS``) for ``zone``."""
        if not 0 <= zone <= 999:
            raise ValueError("zone must be 0 to 999")
        row = REPORTS[name]
        if self.protocol == "SIA-DCS":
            data = f"#{self.account}|Nri{self.area}/{row.sia}{zone:03d}"
        else:
            qualifier, event = row.contact_id[0], row.contact_id[1:]
            data = f"#{self.account}|{qualifier}{event} {self.area:02d} {zone:03d}"
        return await self.send(self.protocol, data)

    async def send(self, message_type: str, data: str) -> SiaFrame:
        """Send one message until it is ACKed; returns the ACK.

        Raises ``AlarmUnitRefusedError`` on DUH, ``AlarmUnitTimeoutError`` when every
        transmission went unanswered or was NAKed.
        """
        async with self._lock:
            sequence = self._next_sequence
            self._next_sequence = next_sequence(sequence)
            self.counters["messages"] += 1
            try:
                ack = await self._deliver(message_type, sequence, data)
            except AlarmUnitError:
                self.counters["failed"] += 1
                raise
            self.acknowledged.append(ack)
            return ack

    # --- delivery ---------------------------------------------------------------------

    def _frame(self, message_type: str, sequence: int, data: str) -> SiaFrame:
        now = (self._clock() + self.clock_skew).astimezone(UTC).replace(microsecond=0)
        return SiaFrame(
            message_type=message_type,
            sequence=sequence,
            receiver=self.receiver,
            line=self.line,
            account=self.account,
            data=data,
            timestamp=now,
        )

    async def _deliver(self, message_type: str, sequence: int, data: str) -> SiaFrame:
        last = "no answer"
        for attempt in range(self.max_tries):
            if attempt:
                await asyncio.sleep(self.retry_delay)
            frame = self._frame(message_type, sequence, data)
            answer = await self._transmit(frame)
            if answer is None:
                last = "no answer"
                continue
            if answer.message_type == "ACK":
                self.counters["acks"] += 1
                return answer
            if answer.message_type == "DUH":
                self.counters["duhs"] += 1
                raise AlarmUnitRefusedError(f"receiver answered DUH to sequence {sequence:04d}")
            self.counters["naks"] += 1
            last = "NAK"
            self._correct_clock(answer)
        raise AlarmUnitTimeoutError(
            f"sequence {sequence:04d} not acknowledged after {self.max_tries} tries ({last})"
        )

    def _correct_clock(self, nak: SiaFrame) -> None:
        if nak.timestamp is None:
            return
        skew = nak.timestamp - self._clock().astimezone(UTC).replace(microsecond=0)
        if abs(skew - self.clock_skew) > timedelta(seconds=1):
            self.counters["clock_corrections"] += 1
            self.clock_skew = skew

    async def _transmit(self, frame: SiaFrame) -> SiaFrame | None:
        """Write ``frame``; the answer to it, or None (timeout, no connection)."""
        streams = await self._connection()
        if streams is None:
            return None
        reader, writer = streams
        try:
            self.counters["transmissions"] += 1
            writer.write(encode(frame))
            await writer.drain()
            async with asyncio.timeout(self.ack_timeout):
                return await self._answer(reader, frame)
        except TimeoutError:
            self.counters["timeouts"] += 1
        except (OSError, EOFError) as exc:
            self.counters["connection_lost"] += 1
            log.debug("sim_alarm_unit_connection_lost", error=str(exc))
        await self._disconnect()
        return None

    async def _answer(self, reader: asyncio.StreamReader, frame: SiaFrame) -> SiaFrame:
        """Read until the answer to ``frame`` arrives (ACK/DUH of its sequence, or a NAK)."""
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                raise EOFError("the receiver closed the connection")
            for item in self._decoder.feed(chunk):
                if isinstance(item, SiaBadFrame):
                    self.counters["stray_answers"] += 1
                    continue
                if item.message_type == "NAK":
                    return item
                if item.message_type in ("ACK", "DUH") and item.sequence == frame.sequence:
                    return item
                self.counters["stray_answers"] += 1

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The open connection, or a new one; None if the receiver cannot be reached."""
        if self._reader is not None and self._writer is not None:
            if not self._writer.is_closing() and not self._reader.at_eof():
                return self._reader, self._writer
            await self._disconnect()
        try:
            async with asyncio.timeout(self.ack_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self.counters["connect_failures"] += 1
            log.debug("sim_alarm_unit_connect_failed", error=str(exc) or type(exc).__name__)
            return None
        self.counters["connects"] += 1
        self._reader, self._writer = reader, writer
        self._decoder = SiaDecoder()
        return reader, writer

    async def _disconnect(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
