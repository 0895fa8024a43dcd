"""A serial line that comes back: open, hand the stream to a driver, reopen when it dies.

``SerialLink.run(handler)`` opens the port with pyserial-asyncio-fast and gives the
``(reader, writer)`` pair to ``handler``, a protocol driver's ``run(reader, writer)``,
which owns the byte stream until it ends. When the port goes away (a read or write
error, the USB adaptor unplugged, end of file) or the handler returns or fails, the port
is closed, ``on_down()`` is called, and opening is retried with exponential backoff from
``reconnect_min_s`` to ``reconnect_max_s``; ``on_up()`` is called each time the port is
open again. ``run`` returns only when cancelled.

Choices:

- ``on_down`` follows an ``on_up``: a port that cannot be opened when the daemon starts
  does not call ``on_down`` (its devices keep their start-up grace and are reported by
  supervision when it ends). Cancelling ``run`` (the daemon stopping) closes the port
  without calling ``on_down``: a stop is not an outage.
- The backoff is reset only when the link stayed up for ``reconnect_max_s``, so a port
  that opens and fails at once is retried at a growing interval, never in a busy loop.
- Callbacks may be plain or async functions; an exception in one is logged and counted,
  and never stops the link.
- The path is opened again on every attempt, so a udev symlink
  (``/dev/serial/by-id/...``) that points to a new device node is followed.
- The port is opened with ``exclusive=True`` (an advisory lock): a second daemon or a
  forgotten terminal program on the same port is refused instead of stealing bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import serial
import serial_asyncio_fast
import structlog

log = structlog.get_logger(__name__)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""A protocol driver's ``run(reader, writer)``: it owns the stream until it ends."""

Callback = Callable[[], Awaitable[None] | None]

COUNTER_NAMES = (
    "opened",
    "open_failed",
    "link_lost",
    "handler_returned",
    "handler_failed",
    "callback_failed",
)


class SerialLink:
    """One serial port kept open for a protocol driver; see the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        baudrate: int = 9600,
        bytesize: Literal[5, 6, 7, 8] = 8,
        parity: Literal["N", "E", "O", "M", "S"] = "N",
        stopbits: float = 1,
        on_up: Callback | None = None,
        on_down: Callback | None = None,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        self.path = path
        self._settings: dict[str, Any] = {
            "baudrate": baudrate,
            "bytesize": bytesize,
            "parity": parity,
            "stopbits": stopbits,
        }
        self._on_up = on_up
        self._on_down = on_down
        self._min_s = reconnect_min_s
        self._max_s = reconnect_max_s
        self._open_timeout_s = open_timeout_s
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.up = False
        self._failures_in_row = 0
        self._log = log.bind(serial_path=path)

    async def run(self, handler: Handler) -> None:
        """Keep the port open and ``handler`` running on it, until cancelled."""
        delay = self._min_s
        announced_down = True  # nothing to announce until the port has been up
        while True:
            streams = await self._open()
            if streams is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_s)
                continue
            reader, writer = streams
            opened_at = time.monotonic()
            self.up = True
            announced_down = False
            self._log.info("serial_link_up")
            try:
                await self._call("on_up", self._on_up)
                await self._serve(handler, reader, writer)
            finally:
                self.up = False
                await _close(writer)
            # Only reached when the stream ended; a cancellation skips the announcement.
            if not announced_down:
                announced_down = True
                self.counters["link_lost"] += 1
                self._log.warning("serial_link_down")
                await self._call("on_down", self._on_down)
            if time.monotonic() - opened_at >= self._max_s:
                delay = self._min_s
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_s)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            async with asyncio.timeout(self._open_timeout_s):
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    loop=asyncio.get_running_loop(),
                    url=self.path,
                    exclusive=True,
                    **self._settings,
                )
        except (OSError, serial.SerialException, TimeoutError, ValueError) as exc:
            self.counters["open_failed"] += 1
            self._failures_in_row += 1
            # Warn once per outage; the retries that follow are at debug level.
            if self._failures_in_row == 1:
                self._log.warning("serial_open_failed", error=str(exc))
            else:
                self._log.debug("serial_open_failed", error=str(exc))
            return None
        self.counters["opened"] += 1
        self._failures_in_row = 0
        return reader, writer

    async def _serve(
        self, handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await handler(reader, writer)
        except (OSError, serial.SerialException, EOFError) as exc:
            self._log.info("serial_stream_ended", error=str(exc))
        except Exception:
            # A driver bug must not end supervision of the line: log it, count it, and
            # reopen after the backoff (a persistent bug is retried at reconnect_max_s).
            self.counters["handler_failed"] += 1
            self._log.exception("serial_handler_failed")
        else:
            self.counters["handler_returned"] += 1

    async def _call(self, name: str, callback: Callback | None) -> None:
        if callback is None:
            return
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.counters["callback_failed"] += 1
            self._log.exception("serial_callback_failed", callback=name)


async def read_within(read: Callable[[], Awaitable[bytes]], timeout_s: float) -> bytes | None:
    """What ``read()`` returns within ``timeout_s``: ``None`` if nothing came in time (the
    caller's cue to run its timers), ``b""`` at the end of the stream."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read()
    except TimeoutError:
        return None


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close the transport and wait (briefly) until pyserial has closed the port."""
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await writer.wait_closed()
