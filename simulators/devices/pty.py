"""A simulated serial port: a pseudo-terminal whose slave side the edge opens by a symlink.

``SimSerialPort(link_path)`` plays the device's end of a serial cable. ``start()`` opens a
pseudo-terminal pair, puts the slave side in raw mode and points the symlink
``link_path`` at it, as udev points ``/dev/serial/by-id/...`` at a USB adaptor's node, so
the edge config names a stable path. The device reads and writes the master side:
``read()`` and ``write()`` are asyncio coroutines on the non-blocking master descriptor
(``loop.add_reader`` / ``add_writer``, no threads, no polling loop).

``unplug()`` closes the pair and removes the symlink: the edge reads an error on its
slave descriptor and sees the line go away. ``replug()`` opens a new pair (with a new
device node, as a real adaptor may get) and points the symlink at it again.

Choices:

- The port holds its own descriptor of the slave side while plugged. Without it, the
  master reports a hang-up whenever the edge has the port closed, and a reader callback
  on it would fire in a busy loop; with it, the master simply has nothing to read.
- While unplugged, ``write`` drops the bytes (counted as ``bytes_dropped``), as a UART
  whose cable is out sends into nothing; ``read`` waits until the port is plugged again
  and data arrives. A device protocol that resends until acknowledged recovers by itself.
- Bytes the edge has not read yet stay in the kernel's buffer; past ``max_pending``
  bytes waiting on our side (the edge not reading for a long time) new writes are
  dropped and counted rather than kept without bound. Incoming bytes are held up to
  ``max_pending`` too; past that the port stops reading until the device reads.
- When the edge opens the port, pyserial discards what was waiting in the slave's input
  buffer: bytes written before the edge opened the port are lost, as on a real line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tty
from collections import Counter
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DEFAULT_MAX_PENDING = 64 * 1024
_READ_SIZE = 4096


class SimSerialPort:
    """The device end of a simulated serial line; see the module docstring.

    ``counters``: ``bytes_written`` (accepted by the kernel), ``bytes_read``,
    ``bytes_dropped`` (written while unplugged or past ``max_pending``), ``plugs``,
    ``unplugs``, ``read_errors``, ``write_errors``.
    """

    def __init__(self, link_path: Path, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be positive")
        self.link_path = Path(link_path)
        self.max_pending = max_pending
        self.counters: Counter[str] = Counter()
        self._master: int | None = None
        self._slave: int | None = None
        self._slave_name: str | None = None
        self._reading = False
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._readable = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- state ------------------------------------------------------------------------

    @property
    def plugged(self) -> bool:
        return self._master is not None

    @property
    def slave_name(self) -> str | None:
        """The current device node (``/dev/pts/N``) the symlink points at, if plugged."""
        return self._slave_name

    @property
    def pending_out(self) -> int:
        """Bytes written by the device that the kernel has not taken yet."""
        return len(self._outbox)

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Plug in: open the pair and point the symlink at it."""
        if not self.plugged:
            self.replug()

    async def stop(self) -> None:
        """Unplug and forget: the symlink is removed."""
        self.unplug()

    async def __aenter__(self) -> SimSerialPort:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def unplug(self) -> None:
        """Close the pair and remove the symlink: the edge sees the line go away."""
        if self._master is None:
            return
        self._stop_reading()
        self._stop_writing()
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = self._slave_name = None
        if self._outbox:
            self.counters["bytes_dropped"] += len(self._outbox)
            self._outbox.clear()
        self._flushed.set()
        with contextlib.suppress(FileNotFoundError):
            self.link_path.unlink()
        self.counters["unplugs"] += 1
        log.debug("sim_serial_unplugged", link=str(self.link_path))

    def replug(self) -> None:
        """Open a new pair (a new device node) and point the symlink at it atomically."""
        self.unplug()
        self._loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            os.set_blocking(master, False)
            name = os.ttyname(slave)
            tmp = self.link_path.with_name(f".{self.link_path.name}.new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(name)
            tmp.replace(self.link_path)
        except OSError:
            os.close(master)
            os.close(slave)
            raise
        self._master, self._slave, self._slave_name = master, slave, name
        self._inbox.clear()
        self._start_reading()
        self.counters["plugs"] += 1
        log.debug("sim_serial_plugged", link=str(self.link_path), node=name)

    # --- reading ----------------------------------------------------------------------

    async def read(self, max_bytes: int = _READ_SIZE) -> bytes:
        """Bytes from the edge (at least one); waits while there are none or unplugged."""
        while not self._inbox:
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._inbox[:max_bytes])
        del self._inbox[:max_bytes]
        if not self._reading and self._master is not None:
            self._start_reading()  # room again after back-pressure
        return data

    def _start_reading(self) -> None:
        if self._master is not None and self._loop is not None and not self._reading:
            self._loop.add_reader(self._master, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._master is not None and self._loop is not None:
            self._loop.remove_reader(self._master)
        self._reading = False

    def _on_readable(self) -> None:
        assert self._master is not None  # noqa: S101 - the reader is removed before closing
        try:
            chunk = os.read(self._master, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO would mean nobody holds the slave side; we do, so it is unexpected.
            self.counters["read_errors"] += 1
            log.warning("sim_serial_read_failed", link=str(self.link_path), errno=exc.errno)
            self._stop_reading()
            return
        if not chunk:
            self._stop_reading()
            return
        self.counters["bytes_read"] += len(chunk)
        self._inbox += chunk
        self._readable.set()
        if len(self._inbox) >= self.max_pending:
            self._stop_reading()

    # --- writing ----------------------------------------------------------------------

    def write_nowait(self, data: bytes) -> None:
        """Send ``data`` as soon as the line takes it, in order; never blocks."""
        if not data:
            return
        if self._master is None or len(self._outbox) + len(data) > self.max_pending:
            self.counters["bytes_dropped"] += len(data)
            return
        was_empty = not self._outbox
        self._outbox += data
        self._flushed.clear()
        if was_empty:
            self._flush()

    async def write(self, data: bytes) -> None:
        """Send ``data`` and wait until the kernel has taken it (or it was dropped)."""
        self.write_nowait(data)
        await self.drain()

    async def drain(self) -> None:
        """Wait until every byte written so far is taken by the kernel or dropped."""
        await self._flushed.wait()

    def _flush(self) -> None:
        master = self._master
        if master is None:
            return
        while self._outbox:
            try:
                sent = os.write(master, self._outbox)
            except BlockingIOError:
                self._start_writing()
                return
            except OSError as exc:
                self.counters["write_errors"] += 1
                if exc.errno not in (errno.EIO, errno.EBADF):
                    log.warning(
                        "sim_serial_write_failed", link=str(self.link_path), errno=exc.errno
                    )
                self.counters["bytes_dropped"] += len(self._outbox)
                self._outbox.clear()
                break
            self.counters["bytes_written"] += sent
            del self._outbox[:sent]
        self._stop_writing()
        self._flushed.set()

    def _start_writing(self) -> None:
        if self._master is not None and self._loop is not None:
            self._loop.add_writer(self._master, self._flush)

    def _stop_writing(self) -> None:
        if self._master is not None and self._loop is not None:
            self._loop.remove_writer(self._master)
