"""SerialLink over real pseudo-terminals: bytes both ways, unplug, and replug.

A pty's master side plays the device; the link opens the slave side through a symlink
in tmp_path, as the daemon opens a udev ``/dev/serial/by-id/...`` link. Closing the
master is an unplugged USB adaptor; a new pty with the symlink re-pointed at it is the
adaptor plugged back in (its device node has a new name, as a real one may).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edge.serial_port import SerialLink

WAIT_S = 5.0


class FakeDevice:
    """The device end of a pseudo-terminal."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.slave_path = os.ttyname(slave)
        os.close(slave)  # only the link under test holds the slave side open
        os.set_blocking(self.master, False)
        self.closed = False

    def point(self, link: Path) -> None:
        """Re-point ``link`` at this device atomically, as udev does."""
        tmp = link.with_name(link.name + ".new")
        tmp.symlink_to(self.slave_path)
        tmp.replace(link)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def read(self, size: int) -> bytes:
        """Read exactly ``size`` bytes sent by the link."""
        data = b""
        async with asyncio.timeout(WAIT_S):
            while len(data) < size:
                try:
                    data += os.read(self.master, size - len(data))
                except BlockingIOError:
                    await asyncio.sleep(0.005)
        return data

    async def wait_until_link_closes(self) -> None:
        """The master reads EIO once nobody holds the slave side open any more."""
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    os.read(self.master, 1024)
                except BlockingIOError:
                    await asyncio.sleep(0.005)
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        return
                    raise

    def unplug(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)


class Driver:
    """A protocol driver stand-in: collects what it reads, lets the test write."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.writer: asyncio.StreamWriter | None = None
        self.runs = 0

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.runs += 1
        self.writer = writer
        while chunk := await reader.read(256):
            self.received += chunk

    async def receive(self, size: int) -> bytes:
        async with asyncio.timeout(WAIT_S):
            while len(self.received) < size:
                await asyncio.sleep(0.005)
        data = bytes(self.received[:size])
        del self.received[:size]
        return data

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()


class Events:
    """on_up / on_down, recorded in order, with a way to wait for the n-th one."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def up(self) -> None:
        self.calls.append("up")

    async def down(self) -> None:  # async on purpose: both kinds of callback are supported
        self.calls.append("down")

    async def wait_for(self, calls: list[str]) -> None:
        async with asyncio.timeout(WAIT_S):
            while self.calls != calls:
                await asyncio.sleep(0.005)


@pytest.fixture
def devices() -> Iterator[list[FakeDevice]]:
    made: list[FakeDevice] = []
    yield made
    for device in made:
        device.unplug()


def new_device(devices: list[FakeDevice]) -> FakeDevice:
    device = FakeDevice()
    devices.append(device)
    return device


@contextlib.asynccontextmanager
async def running(link: SerialLink, driver: Driver) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run(driver.run))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_link(
    path: Path, events: Events, *, reconnect_min_s: float = 0.02, reconnect_max_s: float = 0.1
) -> SerialLink:
    return SerialLink(
        str(path),
        baudrate=19200,
        on_up=events.up,
        on_down=events.down,
        reconnect_min_s=reconnect_min_s,
        reconnect_max_s=reconnect_max_s,
    )


async def test_bytes_flow_both_ways_and_a_stop_is_not_an_outage(
    tmp_path: Path, devices: list[FakeDevice]
) -> None:
    device = new_device(devices)
    port = tmp_path / "ttyDISPENSER"
    device.point(port)
    events, driver = Events(), Driver()
    link = make_link(port, events)

    async with running(link, driver):
        await events.wait_for(["up"])
        assert link.up
        device.write(b"\x02STATUS OK\x03")
        assert await driver.receive(11) == b"\x02STATUS OK\x03"
        await driver.send(b"\x06ACK")
        assert await device.read(4) == b"\x06ACK"

    assert events.calls == ["up"]  # cancelled: no on_down
    assert not link.up
    await device.wait_until_link_closes()  # the port was really closed
    assert link.counters["opened"] == 1


async def test_unplug_calls_on_down_and_replug_calls_on_up_again(
    tmp_path: Path, devices: list[FakeDevice]
) -> None:
    first = new_device(devices)
    port = tmp_path / "ttyNURSECALL"
    first.point(port)
    events, driver = Events(), Driver()
    link = make_link(port, events)

    async with running(link, driver):
        await events.wait_for(["up"])
        first.write(b"before")
        assert await driver.receive(6) == b"before"

        first.unplug()
        await events.wait_for(["up", "down"])
        assert not link.up
        assert link.counters["link_lost"] == 1

        await asyncio.sleep(0.2)  # the symlink points at a node that is gone
        assert events.calls == ["up", "down"]
        assert link.counters["open_failed"] >= 1

        second = new_device(devices)
        second.point(port)
        await events.wait_for(["up", "down", "up"])
        second.write(b"after")
        assert await driver.receive(5) == b"after"
        await driver.send(b"reply")
        assert await second.read(5) == b"reply"

    assert driver.runs == 2
    assert link.counters["opened"] == 2


async def test_a_port_missing_at_start_is_retried_with_backoff_not_in_a_busy_loop(
    tmp_path: Path, devices: list[FakeDevice]
) -> None:
    port = tmp_path / "ttyLATE"
    events, driver = Events(), Driver()
    link = make_link(port, events, reconnect_min_s=0.02, reconnect_max_s=0.1)

    async with running(link, driver):
        await asyncio.sleep(0.5)
        attempts = link.counters["open_failed"]
        # Delays 0.02, 0.04, 0.08, then 0.1 each: about 7 attempts in 0.5 s.
        assert 3 <= attempts <= 10
        assert events.calls == []  # never up, so nothing to announce as down

        device = new_device(devices)
        device.point(port)
        await events.wait_for(["up"])
        device.write(b"hello")
        assert await driver.receive(5) == b"hello"


async def test_a_failing_driver_is_restarted_and_counted(
    tmp_path: Path, devices: list[FakeDevice]
) -> None:
    device = new_device(devices)
    port = tmp_path / "ttyBUGGY"
    device.point(port)
    events = Events()
    driver = Driver()
    calls = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the driver")
        await driver.run(reader, writer)

    link = make_link(port, events)
    task = asyncio.create_task(link.run(flaky))
    try:
        await events.wait_for(["up", "down", "up"])
        device.write(b"ok")
        assert await driver.receive(2) == b"ok"
        assert link.counters["handler_failed"] == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failing_callback_does_not_stop_the_link(
    tmp_path: Path, devices: list[FakeDevice]
) -> None:
    device = new_device(devices)
    port = tmp_path / "ttyCALLBACK"
    device.point(port)
    driver = Driver()

    def broken() -> None:
        raise RuntimeError("callback bug")

    link = SerialLink(str(port), on_up=broken, reconnect_min_s=0.02, reconnect_max_s=0.1)
    async with running(link, driver):
        async with asyncio.timeout(WAIT_S):
            while link.counters["callback_failed"] == 0:
                await asyncio.sleep(0.005)
        device.write(b"x")  # written once the port is open: a pty drops earlier input
        assert await driver.receive(1) == b"x"
        assert link.counters["callback_failed"] == 1
        assert link.counters["opened"] == 1  # the link stayed up


def test_backoff_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="reconnect_min_s"):
        SerialLink("/dev/null", reconnect_min_s=5, reconnect_max_s=1)
