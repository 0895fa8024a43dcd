"""A simulated nurse-call central on an ESPA 4.4.4 line, the control station (address 1).

``SimNurseCallCentral(port, clock=...)`` runs the reference
``devices.espa.EspaMasterSession`` over a ``SimSerialPort``: it polls the paging system
(our gateway, address 2) every ``poll_interval`` seconds while idle, selects it for each
call, sends one call-to-pager block per call and resends a block that gets NAK or no
answer, up to ``max_retries`` times, then gives the call up (a real central then shows
the failure on its own panel). See ``docs/protocols/espa444.md``.

``call(address, ...)`` raises a call at a call point; ``clear(address)`` sends the same
call point with the call status (record 7) ``cleared_status``, the value the edge must
list in its port's ``cleared_statuses`` to read it as ``nurse_call_cleared`` (the
example config uses ``"0"``, as here). ``await central.drained(timeout)`` waits until
every call is delivered or given up; ``delivered`` and ``failed`` say which.

ESPA carries no time. ``clock`` stamps ``history``, the ground truth of when each call was
raised by the simulated world's clock; the link's timers run on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from devices.espa.codec import EspaCall
from devices.espa.session import CallOutcome, EspaMasterSession
from edge.serial_port import read_within
from simulators.devices.pty import SimSerialPort

Clock = Callable[[], datetime]

DEFAULT_CLEARED_STATUS = "0"
"""Record 7 value of a clearing, as in ``docs/deploy/edge.example.toml``."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class SimNurseCallCentral:
    """One simulated nurse-call central; see the module docstring.

    ``counters``: ``calls``, ``clears``, and the session's (``delivered``, ``failed``,
    ``selections``, ``blocks_sent``, ``naks_received``, ``timeouts``, ``polls_answered``,
    ...).
    """

    def __init__(
        self,
        port: SimSerialPort,
        *,
        clock: Clock = utc_now,
        address: str = "1",
        paging_address: str = "2",
        poll_interval: float | None = 1.0,
        response_timeout: float = 2.0,
        max_retries: int = 3,
        cleared_status: str = DEFAULT_CLEARED_STATUS,
        tick_s: float = 0.05,
    ) -> None:
        self._port = port
        self._clock = clock
        self._tick_s = tick_s
        self.cleared_status = cleared_status
        self._session = EspaMasterSession(
            address=address,
            slave_address=paging_address,
            response_timeout=response_timeout,
            max_retries=max_retries,
            poll_interval=poll_interval,
        )
        self.history: list[tuple[datetime, EspaCall]] = []
        """Every call raised, with the world's time: the ground truth."""
        self._counts: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def counters(self) -> dict[str, int]:
        return {**self._session.counters, **self._counts}

    @property
    def outcomes(self) -> list[CallOutcome]:
        return list(self._session.outcomes)

    @property
    def delivered(self) -> list[EspaCall]:
        """Calls the gateway acknowledged, in order."""
        return self._session.acknowledged

    @property
    def failed(self) -> list[EspaCall]:
        """Calls given up after the retries."""
        return self._session.failed

    @property
    def pending(self) -> int:
        return self._session.pending

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Plug the port in (if it is not) and start polling."""
        if self._task is not None:
            return
        await self._port.start()
        self._session.tick(asyncio.get_running_loop().time())
        self._task = asyncio.create_task(self._run(), name="sim-nurse-call")

    async def stop(self) -> None:
        """Stop the central and unplug its port."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._port.stop()

    async def __aenter__(self) -> SimNurseCallCentral:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def drained(self, timeout: float) -> None:  # noqa: ASYNC109 - a bounded wait, by design
        """Wait until every call so far is delivered or given up; ``TimeoutError`` if not
        within ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while self._session.pending:
                self._idle.clear()
                await self._idle.wait()

    # --- calls ------------------------------------------------------------------------

    def call(
        self,
        address: str,
        message: str | None = None,
        *,
        priority: int | str | None = None,
        call_type: str | None = None,
        beep_code: str | None = None,
    ) -> int:
        """Raise a call at call point ``address``; returns its ticket (``outcomes``).

        Raises ``ValueError`` for a call ESPA cannot carry (an empty address, a control
        character or a character outside ISO 8859-1).
        """
        self._counts["calls"] += 1
        return self._send(
            EspaCall(
                address,
                message=message,
                beep_code=beep_code,
                call_type=call_type,
                priority=None if priority is None else str(priority),
            )
        )

    def clear(self, address: str, *, message: str | None = None) -> int:
        """The call at ``address`` was reset at the bed: record 7 is ``cleared_status``."""
        self._counts["clears"] += 1
        return self._send(EspaCall(address, message=message, call_status=self.cleared_status))

    def _send(self, call: EspaCall) -> int:
        self.history.append((self._clock(), call))
        ticket = self._session.send_call(call, now=asyncio.get_running_loop().time())
        self._idle.clear()
        self._flush()
        return ticket

    # --- the link ---------------------------------------------------------------------

    def _flush(self) -> None:
        out = self._session.data_to_send()
        if out:
            self._port.write_nowait(out)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await read_within(self._port.read, self._tick_s)
            now = loop.time()
            if data:
                self._session.receive_data(data, now=now)
            self._session.tick(now)
            self._flush()
            if not self._session.pending:
                self._idle.set()
