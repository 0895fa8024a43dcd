"""The edge's SIA DC-09 receiver: alarm units on the home network report to it over TCP.

Per frame: ``decide`` (pure) chooses the answer; for an ACK the message's events are
handed to the ``sink`` (which stores them durably) and the ACK is written only after the
sink returns, because the ACK tells the unit that its alarm is safe. If the sink raises,
nothing is written: the unit sends the message again.

Answers (DC-09; the reasons are in ``docs/protocols/sia-dc09.md``):

- damaged frame (CRC, length, unreadable header): NAK;
- an ID token we do not receive (``RSP``, an ``ACK`` sent to us, ...): DUH;
- an account that is not bound to a unit here: NAK, counted as ``unknown_accounts`` and
  logged at error: the unit keeps retrying, then falls back to its other path;
- encrypted (``*SIA-DCS``): DUH, AES is not supported; the unit must be set to plain;
- a timestamp outside +20 s / -40 s of our clock: NAK with our time;
- content that cannot be read: DUH;
- otherwise ACK, also for codes we do not know (counted ``unknown_codes``, logged at
  warning) and for NULL (link test: no event, but the unit has checked in).

``counters`` (a dict the edge exports) holds the decoder's counts (``frames``,
``bad_crc``, ``garbage_bytes``, ...), the outcomes above, the answers (``acks``,
``naks``, ``duhs``) and ``events``, ``unknown_codes``, ``null_messages``,
``sink_errors``, ``translate_errors``, ``connections``, ``connections_refused``,
``idle_closed``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog

from devices.errors import DeviceError
from devices.events import DeviceEvent
from devices.sia.codec import (
    PROTOCOL_IDS,
    SiaBadFrame,
    SiaContentError,
    SiaDecoder,
    SiaFrame,
    SiaMessage,
    ack_for,
    duh_for,
    encode,
    frame_account,
    nak,
    parse_message,
    timestamp_in_window,
)
from devices.sia.codes import SiaAccountBinding, translate

log = structlog.get_logger(__name__)

SiaSink = Callable[[list[DeviceEvent]], Awaitable[None]]
"""Stores events durably; returns only once they are safe."""

Outcome = Literal[
    "ack", "bad_frame", "unsupported", "unknown_accounts", "encrypted", "timestamp", "bad_content"
]

_ANSWER_COUNTERS = {"ACK": "acks", "NAK": "naks", "DUH": "duhs"}
_READ_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one frame, and for an ACK the message and its account."""

    outcome: Outcome
    answer: SiaFrame
    message: SiaMessage | None = None
    binding: SiaAccountBinding | None = None


def decide(
    item: SiaFrame | SiaBadFrame, *, bindings: Mapping[str, SiaAccountBinding], now: datetime
) -> Decision:
    """Choose the answer to one decoded frame (pure: ``now`` is the receiver's clock)."""
    if isinstance(item, SiaBadFrame):
        return Decision("bad_frame", nak(now))
    if item.message_type not in PROTOCOL_IDS:
        return Decision("unsupported", duh_for(item, now))
    account = frame_account(item)
    binding = bindings.get(account) if account is not None else None
    if binding is None:
        return Decision("unknown_accounts", nak(now))
    return _decide_for_account(item, binding, now)


def _decide_for_account(frame: SiaFrame, binding: SiaAccountBinding, now: datetime) -> Decision:
    if frame.encrypted:
        return Decision("encrypted", duh_for(frame, now), binding=binding)
    if frame.timestamp is not None and not timestamp_in_window(frame.timestamp, now):
        return Decision("timestamp", nak(now), binding=binding)
    try:
        message = parse_message(frame)
    except SiaContentError:
        return Decision("bad_content", duh_for(frame, now), binding=binding)
    return Decision("ack", ack_for(frame, now), message=message, binding=binding)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SiaReceiver:
    """An asyncio TCP server speaking DC-09 to alarm units (loopback unless told)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        bindings: Iterable[SiaAccountBinding],
        sink: SiaSink,
        idle_timeout: float = 300.0,
        max_connections: int = 64,
        clock: Callable[[], datetime] = _utc_now,
        on_seen: Callable[[str, datetime], None] | None = None,
    ) -> None:
        """``on_seen(device_id, now)`` is called for each message ACKed from a unit (NULL
        link tests included), for supervision. ``port`` 0 binds a free port."""
        self._bindings: dict[str, SiaAccountBinding] = {}
        for binding in bindings:
            if binding.account in self._bindings:
                raise ValueError(f"SIA account {binding.account} is bound twice")
            self._bindings[binding.account] = binding
        self._host = host
        self._requested_port = port
        self._sink = sink
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._clock = clock
        self._on_seen = on_seen
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.counters: Counter[str] = Counter()
        self.last_seen: dict[str, datetime] = {}
        """Account to the receiver's time of its last ACKed message."""

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the SIA receiver is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, self._host, self._requested_port
        )
        log.info("sia_receiver_started", host=self._host, port=self.port)

    async def stop(self) -> None:
        """Stop listening and close every connection (an unanswered frame is resent)."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        log.info("sia_receiver_stopped")

    async def __aenter__(self) -> SiaReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = str(writer.get_extra_info("peername"))
        if task is None or len(self._connections) >= self._max_connections:
            self.counters["connections_refused"] += 1
            log.warning("sia_connection_refused", peer=peer, open=len(self._connections))
            writer.close()
            return
        self._connections.add(task)
        self.counters["connections"] += 1
        try:
            await self._serve(reader, writer, peer)
        except OSError as exc:  # reset by the unit, or the network went away
            log.info("sia_connection_lost", peer=peer, error=str(exc))
        except asyncio.CancelledError:
            # stop() with a unit connected. This is the connection's own task, started by
            # asyncio.start_server: ending it here is the cancellation's purpose, and on
            # Python 3.11 letting it escape logs "Exception in callback" for nothing.
            log.info("sia_connection_closed_at_stop", peer=peer)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        decoder = SiaDecoder(counters=self.counters)
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    data = await reader.read(_READ_SIZE)
            except TimeoutError:
                self.counters["idle_closed"] += 1
                log.info("sia_connection_idle", peer=peer, timeout_s=self._idle_timeout)
                return
            if not data:
                return
            for item in decoder.feed(data):
                answer = await self._answer(item, peer)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()

    async def _answer(self, item: SiaFrame | SiaBadFrame, peer: str) -> bytes | None:
        """The bytes to send back, or ``None`` if the events could not be stored."""
        now = self._clock()
        decision = decide(item, bindings=self._bindings, now=now)
        self.counters[decision.outcome] += 1
        if decision.outcome != "ack":
            _log_refusal(decision, item, peer)
        elif (
            decision.message is not None
            and decision.binding is not None
            and not await self._deliver(decision.message, decision.binding, now)
        ):
            return None
        self.counters[_ANSWER_COUNTERS[decision.answer.message_type]] += 1
        return encode(decision.answer)

    async def _deliver(
        self, message: SiaMessage, binding: SiaAccountBinding, now: datetime
    ) -> bool:
        """Hand the message's events to the sink; False if it failed (then no ACK)."""
        try:
            translation = translate(message, binding, now)
        except (DeviceError, ValueError):  # a table or binding fault: never ACK what is lost
            self.counters["translate_errors"] += 1
            log.exception("sia_translate_failed", account=message.account, seq=message.sequence)
            return False
        for reported in translation.unknown:
            self.counters["unknown_codes"] += 1
            log.warning(
                "sia_unknown_code",
                account=message.account,
                protocol=message.protocol,
                code=reported.code,
                qualifier=reported.qualifier,
                zone=reported.zone,
            )
        if translation.events:
            try:
                await self._sink(list(translation.events))
            except Exception:
                self.counters["sink_errors"] += 1
                log.exception("sia_sink_failed", account=message.account, seq=message.sequence)
                return False
            self.counters["events"] += len(translation.events)
        if message.protocol == "NULL":
            self.counters["null_messages"] += 1
        self.last_seen[binding.account] = now
        if self._on_seen is not None:
            try:
                self._on_seen(binding.device_id, now)
            except Exception:  # supervision must never cost an ACK for a stored alarm
                log.exception("sia_on_seen_failed", device_id=binding.device_id)
        return True


def _log_refusal(decision: Decision, item: SiaFrame | SiaBadFrame, peer: str) -> None:
    if isinstance(item, SiaBadFrame):
        log.warning("sia_bad_frame", peer=peer, reason=item.reason, size=len(item.raw))
        return
    fields = {"peer": peer, "account": frame_account(item), "seq": item.sequence}
    if decision.outcome == "unknown_accounts":
        # An alarm unit we are not set up for: its alarms cannot reach anybody from here.
        log.error("sia_unknown_account", **fields)
    else:
        log.warning("sia_message_refused", outcome=decision.outcome, **fields)
