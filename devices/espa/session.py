"""ESPA 4.4.4 link sessions (sans-IO). Calls become events in ``devices.espa.mapping``.

The central is the control station (address ``1``, the master); our gateway is its
paging system (``2``, a slave). Poll: ``2 ENQ``, answered EOT (we never have data).
Select: ``1 ENQ 2 ENQ``, answered ACK. Then each data block is answered ACK, or NAK to
have it sent again; the central ends with EOT. Our reading, with its sources:
``docs/protocols/espa444.md``.

Sessions take bytes in (``receive_data``) and give bytes out (``data_to_send``); time is
monotonic seconds passed in (``tick(now)``, or ``now=`` with the data). No clock, no IO.

``EspaSlaveSession`` (our side) does not answer a call block itself: the call comes out
of ``receive_data``, and ``finish_call(accepted=...)`` answers ACK once it is stored or
NAK if it could not be. ESPA has no sequence numbers, so a retransmission after a lost
ACK looks like a new block: a block identical to the last accepted one within
``duplicate_window`` seconds is acknowledged again and not delivered twice.
``EspaMasterSession`` plays the central, for simulators and tests.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from devices.espa.codec import (
    HEADER_CALL_TO_PAGER,
    MAX_BLOCK,
    ControlCode,
    EspaBadBlock,
    EspaBlock,
    EspaCall,
    EspaControl,
    EspaDecoder,
    EspaEnquiry,
    EspaItem,
    encode,
)
from devices.espa.mapping import to_events

__all__ = [
    "CallOutcome",
    "EspaMasterSession",
    "EspaSlaveSession",
    "MasterState",
    "SlaveState",
    "to_events",
]

_ACK: Final = encode(EspaControl(ControlCode.ACK))
_NAK: Final = encode(EspaControl(ControlCode.NAK))
_EOT: Final = encode(EspaControl(ControlCode.EOT))


class SlaveState(StrEnum):
    IDLE = "idle"  # no station is selected, or we do not know which
    SELECTED = "selected"  # we are: blocks are for us
    PASSIVE = "passive"  # another station is: on a bus, its blocks are not ours


class EspaSlaveSession:
    """Our side of the line: selected by the central, receives its calls.

    ``point_to_point`` (the usual RS-232 line, the default): every block on the line is
    for us, selected or not, so a central that skips the handshake, or a selection we
    misread, never makes us ignore a call. Set it off on a multipoint (RS-485) bus: then
    only blocks after our own selection are answered, and another station's are left
    alone.
    """

    def __init__(
        self,
        *,
        address: str = "2",
        point_to_point: bool = True,
        duplicate_window: float = 15.0,
        selection_timeout: float = 30.0,
        max_block: int = MAX_BLOCK,
        now: float = 0.0,
    ) -> None:
        EspaEnquiry(address)  # validates: one printable character
        if not address:
            raise ValueError("the slave needs an address")
        self.address = address
        self.point_to_point = point_to_point
        self.duplicate_window = duplicate_window
        self.selection_timeout = selection_timeout
        self.decoder = EspaDecoder(max_block=max_block)
        self.counters: Counter[str] = Counter()
        self._now = now
        self._state = SlaveState.IDLE
        self._out = bytearray()
        self._backlog: deque[EspaItem] = deque()
        self._pending: tuple[EspaCall, EspaBlock] | None = None
        self._previous_enquiry: str | None = None
        self._last_accepted: tuple[EspaBlock, float] | None = None
        self._last_heard: float | None = None

    @property
    def state(self) -> SlaveState:
        return self._state

    @property
    def awaiting_decision(self) -> EspaCall | None:
        """The call waiting for ``finish_call``, if any."""
        return None if self._pending is None else self._pending[0]

    def receive_data(self, data: bytes, *, now: float | None = None) -> list[EspaCall]:
        """Feed bytes from the line; returns a call that needs ``finish_call``, if any.

        While a call waits for its decision, later frames are held back, so the replies
        go out in the order the frames came in.
        """
        if now is not None:
            self._now = max(self._now, now)
        items = self.decoder.feed(data)
        if items:
            self.counters["frames"] += len(items)
            self._last_heard = self._now
        self._backlog.extend(items)
        return self._drain()

    def finish_call(self, *, accepted: bool) -> list[EspaCall]:
        """Answer the pending call: ACK if stored, NAK to make the central send it again.

        Returns the next call that needs a decision, if the held-back frames have one.
        """
        if self._pending is None:
            raise RuntimeError("no call is waiting for a decision")
        _, block = self._pending
        self._pending = None
        if accepted:
            self.counters["calls_accepted"] += 1
            self._last_accepted = (block, self._now)
            self._reply(_ACK)
        else:
            self.counters["calls_rejected"] += 1
            self._reply(_NAK)
        self._drop_copies(block)
        return self._drain()

    def data_to_send(self) -> bytes:
        """Bytes to write to the line (taken: a second call returns only newer bytes)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tick(self, now: float) -> None:
        """Advance time: a selection that stays silent too long ends."""
        self._now = max(self._now, now)
        silent_since = self._last_heard if self._last_heard is not None else self._now
        if (
            self._state != SlaveState.IDLE
            and self._pending is None
            and self._now - silent_since > self.selection_timeout
        ):
            self.counters["selection_timeouts"] += 1
            self._state = SlaveState.IDLE

    # --- frames, one at a time --------------------------------------------------------

    def _drain(self) -> list[EspaCall]:
        while self._pending is None and self._backlog:
            call = self._handle(self._backlog.popleft())
            if call is not None:
                return [call]
        return []

    def _drop_copies(self, block: EspaBlock) -> None:
        """Drop copies of ``block`` sent while it waited: our late answer is for them too.

        An extra ACK for a copy would be taken as the answer to the central's next block.
        """
        kept: deque[EspaItem] = deque()
        copying = True
        for item in self._backlog:
            if copying and item == block:
                self.counters["duplicates"] += 1
                continue
            if isinstance(item, EspaEnquiry | EspaControl):
                copying = False
            kept.append(item)
        self._backlog = kept

    def _handle(self, item: EspaItem) -> EspaCall | None:
        if isinstance(item, EspaEnquiry):
            self._enquiry_received(item.address)
            return None
        self._previous_enquiry = None
        if isinstance(item, EspaControl):
            if item.code == ControlCode.EOT:
                self._state = SlaveState.IDLE
            else:
                self.counters["unexpected_replies"] += 1
            return None
        if not self._block_is_ours():
            return None
        if isinstance(item, EspaBadBlock):
            self.counters[f"nak_{item.reason}"] += 1
            self._reply(_NAK)
            return None
        return self._block_received(item)

    def _enquiry_received(self, address: str) -> None:
        previous, self._previous_enquiry = self._previous_enquiry, address
        if address == self.address:
            self._previous_enquiry = None
            if previous is not None and previous != self.address:
                self.counters["selections"] += 1
                self._state = SlaveState.SELECTED
                self._reply(_ACK)
            else:
                self.counters["polls"] += 1
                self._state = SlaveState.IDLE
                self._reply(_EOT)  # we never have data for the central
        elif previous is not None and previous != address:
            self._state = SlaveState.PASSIVE  # ``previous`` selected ``address``
        else:
            self._state = SlaveState.IDLE  # a poll of another station, or a master's own

    def _block_is_ours(self) -> bool:
        if self._state == SlaveState.SELECTED:
            return True
        if self.point_to_point:
            self.counters["unselected_blocks"] += 1
            return True
        self.counters["blocks_for_others"] += 1
        return False

    def _block_received(self, block: EspaBlock) -> EspaCall | None:
        if block.header != HEADER_CALL_TO_PAGER:
            # Status and other blocks are taken and not acted on (as paging systems do).
            self.counters[f"ignored_header_{block.header}"] += 1
            self._reply(_ACK)
            return None
        try:
            call = EspaCall.from_block(block)
        except ValueError:
            self.counters["invalid_calls"] += 1
            self._reply(_NAK)
            return None
        if self._is_repeat(block):
            self.counters["duplicates"] += 1
            self._reply(_ACK)
            return None
        self._pending = (call, block)
        return call

    def _is_repeat(self, block: EspaBlock) -> bool:
        if self._last_accepted is None:
            return False
        last, when = self._last_accepted
        return last == block and self._now - when <= self.duplicate_window

    def _reply(self, data: bytes) -> None:
        self.counters[{_ACK: "acks_sent", _NAK: "naks_sent", _EOT: "eots_sent"}[data]] += 1
        self._out += data


# --- the master (the central's side) --------------------------------------------------


class MasterState(StrEnum):
    IDLE = "idle"
    SELECTING = "selecting"
    SENDING = "sending"
    POLLING = "polling"


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What became of a call given to ``send_call``."""

    ticket: int
    call: EspaCall
    delivered: bool
    transmissions: int
    """How many times the block was sent (0 if the slave never took the selection)."""


@dataclass(slots=True)
class _Outgoing:
    ticket: int
    call: EspaCall
    transmissions: int = 0


class EspaMasterSession:
    """The control station: selects the slave and sends it calls, one block per call.

    A selection or a block that gets NAK, or no answer within ``response_timeout``, is
    sent again up to ``max_retries`` times; then the call fails and the session moves
    on to the next. With ``poll_interval`` set, an idle master polls the slave.
    """

    def __init__(
        self,
        *,
        address: str = "1",
        slave_address: str = "2",
        response_timeout: float = 2.0,
        max_retries: int = 3,
        poll_interval: float | None = None,
        now: float = 0.0,
    ) -> None:
        if not address or not slave_address or address == slave_address:
            raise ValueError("master and slave need two different addresses")
        self._select_bytes = encode(EspaEnquiry(address)) + encode(EspaEnquiry(slave_address))
        self._poll_bytes = encode(EspaEnquiry(slave_address))
        self.address = address
        self.response_timeout = response_timeout
        self.max_retries = max_retries
        self.poll_interval = poll_interval
        self.decoder = EspaDecoder()
        self.counters: Counter[str] = Counter()
        self.outcomes: list[CallOutcome] = []
        self._now = now
        self._state = MasterState.IDLE
        self._deadline = now
        self._next_poll = now
        self._queue: deque[_Outgoing] = deque()
        self._select_attempts = 0
        self._tickets = 0
        self._out = bytearray()

    @property
    def state(self) -> MasterState:
        return self._state

    @property
    def pending(self) -> int:
        """Calls not yet acknowledged or failed."""
        return len(self._queue)

    @property
    def acknowledged(self) -> list[EspaCall]:
        return [outcome.call for outcome in self.outcomes if outcome.delivered]

    @property
    def failed(self) -> list[EspaCall]:
        return [outcome.call for outcome in self.outcomes if not outcome.delivered]

    def send_call(self, call: EspaCall, *, now: float | None = None) -> int:
        """Queue a call; returns its ticket (``CallOutcome.ticket``).

        Pass ``now`` unless ``tick`` ran just before: the selection's deadline counts
        from it, and a deadline from a stale time expires at once.
        """
        if now is not None:
            self._now = max(self._now, now)
        self._tickets += 1
        self._queue.append(_Outgoing(self._tickets, call))
        self._advance()
        return self._tickets

    def receive_data(self, data: bytes, *, now: float | None = None) -> None:
        if now is not None:
            self._now = max(self._now, now)
        for item in self.decoder.feed(data):
            self._handle(item)
        self._advance()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def tick(self, now: float) -> None:
        self._now = max(self._now, now)
        if self._state != MasterState.IDLE and self._now >= self._deadline:
            self.counters["timeouts"] += 1
            if self._state == MasterState.SELECTING:
                self._retry_selection()
            elif self._state == MasterState.SENDING:
                self._retry_block()
            else:
                self.counters["poll_timeouts"] += 1
                self._state = MasterState.IDLE
        self._advance()

    # --- internals --------------------------------------------------------------------

    def _advance(self) -> None:
        if self._state != MasterState.IDLE:
            return
        if self._queue:
            self._select()
        elif self.poll_interval is not None and self._now >= self._next_poll:
            self._next_poll = self._now + self.poll_interval
            self._send(self._poll_bytes, MasterState.POLLING)

    def _handle(self, item: EspaItem) -> None:
        code = item.code if isinstance(item, EspaControl) else None
        if self._state == MasterState.SELECTING:
            if code == ControlCode.ACK:
                self._select_attempts = 0
                self._send_block()
            else:
                self.counters["selection_refused"] += 1
                self._retry_selection()
        elif self._state == MasterState.SENDING:
            if code == ControlCode.ACK:
                self._finish(delivered=True)
            else:
                self.counters["naks_received" if code == ControlCode.NAK else "bad_answers"] += 1
                self._retry_block()
        elif self._state == MasterState.POLLING and code == ControlCode.EOT:
            self.counters["polls_answered"] += 1
            self._state = MasterState.IDLE
        else:
            self.counters["unexpected"] += 1

    def _select(self) -> None:
        self.counters["selections"] += 1
        self._send(self._select_bytes, MasterState.SELECTING)

    def _send_block(self) -> None:
        head = self._queue[0]
        head.transmissions += 1
        self.counters["blocks_sent"] += 1
        self._send(encode(head.call.to_block()), MasterState.SENDING)

    def _retry_selection(self) -> None:
        self._select_attempts += 1
        self._out += _EOT
        if self._select_attempts > self.max_retries:
            self._finish(delivered=False)
        else:
            self._select()

    def _retry_block(self) -> None:
        if self._queue[0].transmissions > self.max_retries:
            self._out += _EOT
            self._finish(delivered=False)
        else:
            self._send_block()

    def _finish(self, *, delivered: bool) -> None:
        head = self._queue.popleft()
        self._select_attempts = 0
        self.outcomes.append(CallOutcome(head.ticket, head.call, delivered, head.transmissions))
        self.counters["delivered" if delivered else "failed"] += 1
        if delivered and self._queue:
            self._send_block()  # the next call in the same selection
            return
        if delivered:
            self._out += _EOT
        self._state = MasterState.IDLE

    def _send(self, data: bytes, state: MasterState) -> None:
        self._out += data
        self._state = state
        self._deadline = self._now + self.response_timeout
