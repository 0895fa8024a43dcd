"""The ESPA driver over a real pseudo-terminal, with the central played by EspaMasterSession."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from devices.espa.codec import EspaCall
from devices.espa.session import EspaMasterSession
from devices.events import DeviceEvent, EventKind, NurseCallPayload
from edge.drivers.espa import EspaDriver

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


@dataclass
class End:
    """One side of the pseudo-terminal as an asyncio stream pair."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    read_transport: asyncio.ReadTransport

    def close(self) -> None:
        self.writer.close()
        self.read_transport.close()


async def open_end(fd: int) -> End:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    write_transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(os.dup(fd), "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(write_transport, protocol, reader, loop)
    return End(reader, writer, read_transport)


@pytest.fixture
async def line() -> AsyncIterator[tuple[End, End]]:
    """(central's end, gateway's end) of a raw pseudo-terminal."""
    central_fd, gateway_fd = os.openpty()
    tty.setraw(gateway_fd)  # no line discipline: ETX, EOT and NAK are data here
    central, gateway = await open_end(central_fd), await open_end(gateway_fd)
    os.close(central_fd)
    os.close(gateway_fd)
    try:
        yield central, gateway
    finally:
        central.close()
        gateway.close()
        await asyncio.sleep(0)  # let the transports finish closing


class Store:
    """The durable queue stand-in: fails the first ``failures`` writes, or is slow."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.failures = failures
        self.delay = delay
        self.stored: list[DeviceEvent] = []
        self.attempts = 0

    async def __call__(self, events: list[DeviceEvent]) -> None:
        self.attempts += 1
        await asyncio.sleep(self.delay)
        if self.attempts <= self.failures:
            raise OSError("disk full")
        self.stored.extend(events)


async def play_central(
    master: EspaMasterSession, end: End, *, until: Callable[[], bool], timeout: float = 5.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until():
        assert loop.time() < deadline, f"the central is stuck: {dict(master.counters)}"
        master.tick(loop.time())
        if out := master.data_to_send():
            end.writer.write(out)
            await end.writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.02):
                data = await end.reader.read(4096)
                master.receive_data(data, now=loop.time())


def make_driver(store: Store, **options: object) -> EspaDriver:
    settings: dict[str, object] = {
        "sink": store,
        "gateway_id": "gw-1",
        "central_device_id": "central",
        "addresses": {"101": "room-101", "102": "room-102"},
        "tick_interval": 0.02,
        "sink_timeout": 0.3,
        "clock": lambda: NOW,
    }
    settings.update(options)
    return EspaDriver(**settings)  # type: ignore[arg-type]


def central(*, max_retries: int = 2, poll_interval: float | None = None) -> EspaMasterSession:
    """The central's side; its clock is the loop's, as the test plays it with loop.time()."""
    return EspaMasterSession(
        response_timeout=0.8,
        max_retries=max_retries,
        poll_interval=poll_interval,
        now=asyncio.get_running_loop().time(),
    )


async def stop(end: End, task: asyncio.Task[None]) -> None:
    end.close()
    async with asyncio.timeout(2.0):
        await task  # run() returns once the central's side of the line is gone


async def test_calls_become_events_and_the_central_sees_acks(line: tuple[End, End]) -> None:
    central_end, gateway_end = line
    store = Store()
    driver = make_driver(store)
    task = asyncio.create_task(driver.run(gateway_end.reader, gateway_end.writer))
    master = central(poll_interval=0.05)
    calls = [EspaCall("101", message="Rom 101"), EspaCall("7", priority="1"), EspaCall("102")]
    for call in calls:
        master.send_call(call)
    await play_central(master, central_end, until=lambda: master.pending == 0)
    await play_central(master, central_end, until=lambda: master.counters["polls_answered"] > 0)
    await stop(central_end, task)
    assert master.acknowledged == calls
    assert master.counters["naks_received"] == 0
    assert [(e.kind, e.device_id) for e in store.stored] == [
        (EventKind.NURSE_CALL, "room-101"),
        (EventKind.NURSE_CALL, "central"),
        (EventKind.NURSE_CALL, "room-102"),
    ]
    assert store.stored[1].payload == NurseCallPayload(address="7", priority=1)
    counters = driver.counters
    assert (counters["events"], counters["calls_accepted"], counters["streams"]) == (3, 3, 1)
    assert counters["polls"] >= 1


async def test_a_failed_store_is_answered_with_nak_and_the_retry_is_stored_once(
    line: tuple[End, End],
) -> None:
    central_end, gateway_end = line
    store = Store(failures=1)
    driver = make_driver(store)
    task = asyncio.create_task(driver.run(gateway_end.reader, gateway_end.writer))
    master = central()
    master.send_call(EspaCall("101", message="help"))
    await play_central(master, central_end, until=lambda: master.pending == 0)
    await stop(central_end, task)
    assert master.acknowledged == [EspaCall("101", message="help")]
    assert master.counters["naks_received"] == 1
    assert master.outcomes[0].transmissions == 2
    assert len(store.stored) == 1
    assert (driver.counters["sink_failures"], driver.counters["events"]) == (1, 1)


async def test_a_store_that_keeps_failing_fails_the_call_at_the_central(
    line: tuple[End, End],
) -> None:
    central_end, gateway_end = line
    store = Store(failures=100)
    driver = make_driver(store)
    task = asyncio.create_task(driver.run(gateway_end.reader, gateway_end.writer))
    master = central()
    master.send_call(EspaCall("102"))
    await play_central(master, central_end, until=lambda: master.pending == 0)
    await stop(central_end, task)
    assert master.failed == [EspaCall("102")]
    assert master.counters["naks_received"] == 3  # the first send and two retries
    assert store.stored == []
    assert driver.counters["naks_sent"] == 3


async def test_a_slow_store_times_out_into_a_nak(line: tuple[End, End]) -> None:
    central_end, gateway_end = line
    store = Store(delay=0.5)
    driver = make_driver(store, sink_timeout=0.1)
    task = asyncio.create_task(driver.run(gateway_end.reader, gateway_end.writer))
    master = central(max_retries=1)
    master.send_call(EspaCall("101"))
    await play_central(master, central_end, until=lambda: master.pending == 0)
    await stop(central_end, task)
    assert master.failed == [EspaCall("101")]
    assert driver.counters["sink_timeouts"] == 2
    assert store.stored == []


async def test_every_poll_from_the_central_is_heard(line: tuple[End, End]) -> None:
    central_end, gateway_end = line
    heard: list[int] = []
    driver = make_driver(Store(), on_heard=lambda: heard.append(1))
    task = asyncio.create_task(driver.run(gateway_end.reader, gateway_end.writer))
    master = central(poll_interval=0.02)
    await play_central(master, central_end, until=lambda: master.counters["polls_answered"] >= 3)
    await stop(central_end, task)
    assert len(heard) >= 3
    assert driver.counters["polls"] >= 3
    assert driver.counters["streams"] == 1


def test_ids_are_checked_when_the_driver_is_made() -> None:
    with pytest.raises(ValueError, match="room 1"):
        make_driver(Store(), addresses={"1": "room 1"})
