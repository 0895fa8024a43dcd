"""The two ends of a dispenser link, sans-IO (``docs/protocols/dispenser.md``, "Link layer").

``GatewaySide`` is the gateway's role: it acknowledges every new device message (and
again for a duplicate, without delivering it twice), refuses damaged frames with a NAK,
and sends commands one at a time, resending after ``ack_timeout`` up to ``max_tries``
times before it reports a failure. ``DeviceSide`` is the dispenser's role, for the
simulator and the tests: it sends its messages one at a time until each is acknowledged
and answers commands, replaying the same reply for a repeated command.

Both are driven like h11: feed what arrived with ``receive_data(data)``, write out what
``data_to_send()`` returns, and call ``tick(now)`` regularly (every 100 ms is plenty)
with a monotonic clock in seconds. Nothing here reads a clock or touches a port. A
retransmission started by ``receive_data`` (after a NAK, or the next queued message
after an answer) gets its timer on the next ``tick``.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from devices.dispenser.codec import (
    Ack,
    BadFrame,
    Command,
    DecodeError,
    DeviceMessage,
    DispenserDecoder,
    Frame,
    Message,
    Nak,
    NakReason,
    Reply,
    ReplyStatus,
    encode,
)

DEFAULT_ACK_TIMEOUT = 1.0
"""Seconds to wait for an answer before resending (the spec's T_ack)."""
DEFAULT_MAX_TRIES = 5
"""Transmissions of one command before the gateway reports it failed (the spec's N)."""

_ANSWER_TYPES = frozenset({Ack.TYPE, Nak.TYPE}) | frozenset(range(0x90, 0xA0))
"""Frames that answer another frame. They are never NAKed: their sequence number belongs
to the other side's numbering, and a NAK for it could refuse an unrelated frame."""


# --- what the sides report ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A new message from the device, delivered once (duplicates are not reported)."""

    seq: int
    message: DeviceMessage


@dataclass(frozen=True, slots=True)
class CommandSucceeded:
    command_id: int
    command: Command
    reply: Reply


@dataclass(frozen=True, slots=True)
class CommandFailed:
    """``reason``: ``no_answer``, ``refused:<nak reason>`` or ``device:<reply status>``."""

    command_id: int
    command: Command
    reason: str
    reply: Reply | None = None


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A new command for the device; answer it with ``DeviceSide.reply``."""

    seq: int
    command: Command


@dataclass(frozen=True, slots=True)
class EventDelivered:
    event_id: int
    message: DeviceMessage


@dataclass(frozen=True, slots=True)
class EventFailed:
    """Only when the device side has a ``max_tries``, or the gateway refused the message."""

    event_id: int
    message: DeviceMessage
    reason: str


GatewayOutput = MessageReceived | CommandSucceeded | CommandFailed
DeviceOutput = CommandReceived | EventDelivered | EventFailed

M = TypeVar("M", bound=Message)
Out = TypeVar("Out")


@dataclass(slots=True)
class _Pending(Generic[M]):
    handle: int
    seq: int
    message: M
    wire: bytes
    tries: int = 0
    deadline: float | None = None


class _Link(Generic[M, Out]):
    """Stop-and-wait sending with retries, NAKs for damaged frames; shared by both sides."""

    def __init__(self, *, ack_timeout: float, max_tries: int | None, first_seq: int) -> None:
        if not 0 <= first_seq <= 0xFF:
            raise ValueError(f"first_seq must be 0..255, got {first_seq}")
        if ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be positive, got {ack_timeout}")
        if max_tries is not None and max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}")
        self.ack_timeout = ack_timeout
        self.max_tries = max_tries
        self.decoder = DispenserDecoder()
        self.counters: Counter[str] = Counter()
        self._out = bytearray()
        self._queue: deque[_Pending[M]] = deque()
        self._current: _Pending[M] | None = None
        self._next_seq = first_seq
        self._next_handle = 0

    @property
    def idle(self) -> bool:
        """True when nothing is waiting for an answer or queued to be sent."""
        return self._current is None and not self._queue

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> list[Out]:
        out: list[Out] = []
        for item in self.decoder.feed(data):
            if isinstance(item, BadFrame):
                self._bad_frame(item)
            elif isinstance(item.message, Nak):
                out.extend(self._nak_received(item.seq, item.message.reason))
            else:
                out.extend(self._frame_received(item))
        return out

    def tick(self, now: float) -> list[Out]:
        current = self._current
        if current is None:
            return []
        if current.deadline is None:
            current.deadline = now + self.ack_timeout
            return []
        if now < current.deadline:
            return []
        if self.max_tries is not None and current.tries >= self.max_tries:
            return self._finish(self._failed(current, "no_answer"), now)
        self._transmit(current, now)
        return []

    # --- for the sides ----------------------------------------------------------------

    def _frame_received(self, frame: Frame) -> list[Out]:
        raise NotImplementedError

    def _failed(self, pending: _Pending[M], reason: str) -> Out:
        raise NotImplementedError

    def _enqueue(self, message: M, now: float) -> int:
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        seq, self._next_seq = self._next_seq, (self._next_seq + 1) % 256
        wire = encode(Frame(seq, message))
        self._queue.append(_Pending(handle, seq, message, wire))
        if self._current is None:
            self._start_next(now)
        return handle

    def _start_next(self, now: float | None) -> None:
        self._current = self._queue.popleft() if self._queue else None
        if self._current is not None:
            self._transmit(self._current, now)

    def _transmit(self, pending: _Pending[M], now: float | None) -> None:
        if pending.tries:
            self.counters["retransmissions"] += 1
        pending.tries += 1
        pending.deadline = None if now is None else now + self.ack_timeout
        self._out += pending.wire

    def _finish(self, result: Out, now: float | None) -> list[Out]:
        self._start_next(now)
        return [result]

    def _answer(self, seq: int, message: Message) -> None:
        self.counters["acks_sent" if isinstance(message, Ack) else "naks_sent"] += 1
        self._out += encode(Frame(seq, message))

    def _bad_frame(self, bad: BadFrame) -> None:
        if bad.reason is DecodeError.GARBAGE or bad.type_code in _ANSWER_TYPES:
            return
        if bad.reason.intact and bad.seq is not None:
            self._answer(bad.seq, Nak(_NAK_FOR[bad.reason]))
        elif bad.reason is DecodeError.BAD_CRC:
            self._answer(0, Nak(NakReason.BAD_CRC))
        else:
            self._answer(0, Nak(NakReason.BAD_FRAME))

    def _nak_received(self, seq: int, reason: NakReason) -> list[Out]:
        self.counters["naks_received"] += 1
        current = self._current
        if current is None or reason is NakReason.BUSY:
            return []  # BUSY: the timer resends, no sooner
        if reason.transient:
            if self.max_tries is None or current.tries < self.max_tries:
                self._transmit(current, None)
            return []
        if seq != current.seq:
            return []
        return self._finish(self._failed(current, f"refused:{reason.name.lower()}"), None)

    def _unexpected(self, frame: Frame) -> list[Out]:
        self.counters["unexpected"] += 1
        if frame.message.TYPE not in _ANSWER_TYPES:
            self._answer(frame.seq, Nak(NakReason.UNEXPECTED))
        return []


_NAK_FOR = {
    DecodeError.BAD_VERSION: NakReason.BAD_VERSION,
    DecodeError.BAD_LENGTH: NakReason.BAD_LENGTH,
    DecodeError.UNKNOWN_TYPE: NakReason.UNKNOWN_TYPE,
    DecodeError.BAD_PAYLOAD: NakReason.BAD_PAYLOAD,
}


class GatewaySide(_Link[Command, GatewayOutput]):
    """The gateway's end of the link.

    With ``manual_ack=True`` a device message is acknowledged only when the caller calls
    ``ack(received)``, after it has stored the event durably: a crash between receipt and
    storage then loses nothing, because the device resends. The default acknowledges at
    once, on receipt.
    """

    def __init__(
        self,
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_tries: int = DEFAULT_MAX_TRIES,
        manual_ack: bool = False,
        first_seq: int = 0,
    ) -> None:
        super().__init__(ack_timeout=ack_timeout, max_tries=max_tries, first_seq=first_seq)
        self.manual_ack = manual_ack
        self._last_accepted: Frame | None = None
        self._last_acked = False

    def send(self, command: Command, now: float) -> int:
        """Queue a command; returns the id its ``CommandSucceeded``/``CommandFailed`` carries."""
        if not isinstance(command, Command):
            raise TypeError(f"the gateway sends commands only, not {type(command).__name__}")
        return self._enqueue(command, now)

    def ack(self, received: MessageReceived) -> None:
        """Acknowledge a message (``manual_ack`` mode); stale ones are ignored."""
        if self._last_accepted == Frame(received.seq, received.message) and not self._last_acked:
            self._last_acked = True
            self._answer(received.seq, Ack())

    def _frame_received(self, frame: Frame) -> list[GatewayOutput]:
        message = frame.message
        if isinstance(message, DeviceMessage):
            return self._device_message(frame, message)
        if isinstance(message, Reply):
            return self._reply(frame.seq, message)
        return self._unexpected(frame)

    def _device_message(self, frame: Frame, message: DeviceMessage) -> list[GatewayOutput]:
        # A duplicate is the same frame again: same sequence number and same content. A
        # device that restarted numbers from 0 again, so the sequence alone is not enough.
        if frame == self._last_accepted:
            self.counters["duplicates"] += 1
            if self._last_acked:
                self._answer(frame.seq, Ack())
            return []
        self._last_accepted = frame
        self._last_acked = False
        received = MessageReceived(frame.seq, message)
        if not self.manual_ack:
            self.ack(received)
        return [received]

    def _reply(self, seq: int, reply: Reply) -> list[GatewayOutput]:
        current = self._current
        if current is None or seq != current.seq or not isinstance(reply, current.message.REPLY):
            self.counters["stale_replies"] += 1
            return []
        if reply.status is ReplyStatus.OK:
            result: GatewayOutput = CommandSucceeded(current.handle, current.message, reply)
        else:
            reason = f"device:{reply.status.name.lower()}"
            result = CommandFailed(current.handle, current.message, reason, reply)
        return self._finish(result, None)

    def _failed(self, pending: _Pending[Command], reason: str) -> GatewayOutput:
        return CommandFailed(pending.handle, pending.message, reason)


class DeviceSide(_Link[DeviceMessage, DeviceOutput]):
    """The dispenser's end of the link (simulators and tests).

    ``max_tries=None`` (the default) resends until acknowledged: a dispenser never gives
    up on a report. ``first_seq``: a real device starts at a random value after power-up,
    which makes a restart's first frame unlikely to look like a duplicate of the last one
    before it (see the spec, "Duplicates"). A message the gateway refuses for good (a NAK
    that resending cannot cure) is reported as ``EventFailed`` so that it does not block
    the ones behind it.
    """

    def __init__(
        self,
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_tries: int | None = None,
        first_seq: int = 0,
    ) -> None:
        super().__init__(ack_timeout=ack_timeout, max_tries=max_tries, first_seq=first_seq)
        self._last_command: Frame | None = None
        self._last_reply: bytes | None = None

    def send(self, message: DeviceMessage, now: float) -> int:
        """Queue a report; returns the id its ``EventDelivered``/``EventFailed`` carries."""
        if not isinstance(message, DeviceMessage):
            raise TypeError(f"a device sends device messages, not {type(message).__name__}")
        return self._enqueue(message, now)

    def reply(self, received: CommandReceived, reply: Reply) -> None:
        """Answer a command. The reply is kept and sent again if the command is repeated."""
        if not isinstance(reply, received.command.REPLY):
            expected = received.command.REPLY.__name__
            raise TypeError(f"{type(received.command).__name__} is answered by {expected}")
        wire = encode(Frame(received.seq, reply))
        if self._last_command == Frame(received.seq, received.command):
            self._last_reply = wire
        self._out += wire

    def _frame_received(self, frame: Frame) -> list[DeviceOutput]:
        message = frame.message
        if isinstance(message, Ack):
            return self._acked(frame.seq)
        if isinstance(message, Command):
            return self._command(frame, message)
        return self._unexpected(frame)

    def _acked(self, seq: int) -> list[DeviceOutput]:
        current = self._current
        if current is None or seq != current.seq:
            self.counters["stale_acks"] += 1
            return []
        return self._finish(EventDelivered(current.handle, current.message), None)

    def _command(self, frame: Frame, command: Command) -> list[DeviceOutput]:
        if frame == self._last_command:
            self.counters["duplicates"] += 1
            if self._last_reply is not None:
                self._out += self._last_reply
            return []  # not answered yet: the gateway will ask again
        self._last_command = frame
        self._last_reply = None
        return [CommandReceived(frame.seq, command)]

    def _failed(self, pending: _Pending[DeviceMessage], reason: str) -> DeviceOutput:
        return EventFailed(pending.handle, pending.message, reason)
