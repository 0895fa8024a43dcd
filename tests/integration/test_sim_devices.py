"""Simulated devices against the product's side of each protocol, over real transports.

- ``SimDispenser`` on a ``SimSerialPort`` against ``edge.drivers.dispenser.DispenserDriver``
  through ``edge.serial_port.SerialLink`` on the port's symlink (as the daemon opens
  ``/dev/serial/by-id/...``);
- ``SimNurseCallCentral`` against ``edge.drivers.espa.EspaDriver`` through ``SerialLink``;
- ``SimAlarmUnit`` against ``edge.drivers.sia.SiaReceiver`` on loopback TCP;
- ``SimZigbeeBridge`` against ``Zigbee2MqttTranslator`` fed by a plain aiomqtt
  subscriber on the test broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.dispenser.codec import ScheduledDose, TamperCause
from devices.events import DeviceEvent, DeviceType, EventKind
from devices.gateway import GatewayCommand
from devices.ids import uuid7
from devices.sia import SiaAccountBinding
from devices.zigbee2mqtt import DeviceBinding, Zigbee2MqttTranslator, lock_command
from edge.drivers.dispenser import DispenserDriver
from edge.drivers.espa import EspaDriver
from edge.drivers.sia import SiaReceiver
from edge.serial_port import SerialLink
from edge.uplink import BrokerAddress
from simulators.devices import (
    AlarmUnitTimeoutError,
    SimAlarmUnit,
    SimDispenser,
    SimNurseCallCentral,
    SimSerialPort,
    SimZigbeeBridge,
)

pytestmark = pytest.mark.timeout(60)

WAIT_S = 5.0
T0 = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)
GATEWAY = "gw-sim-1"
OSLO = ZoneInfo("Europe/Oslo")


def world_clock() -> datetime:
    """The simulated world's clock: a fixed morning (the link's timers are real)."""
    return T0


async def until(predicate: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


class LinkEvents:
    """A SerialLink's on_up / on_down calls, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def up(self) -> None:
        self.calls.append("up")

    def down(self) -> None:
        self.calls.append("down")


@contextlib.asynccontextmanager
async def serial_link(
    path: Path,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    events: LinkEvents,
) -> AsyncIterator[SerialLink]:
    link = SerialLink(
        str(path),
        on_up=events.up,
        on_down=events.down,
        reconnect_min_s=0.02,
        reconnect_max_s=0.1,
    )
    task = asyncio.create_task(link.run(handler))
    try:
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- dispenser ----------------------------------------------------------------------------


class Store:
    """The durable queue's stand-in: keeps what the driver stores."""

    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []

    async def __call__(self, events: list[DeviceEvent]) -> None:
        self.events.extend(events)

    def kinds(self) -> list[EventKind]:
        return [event.kind for event in self.events]


def hub_command(kind: Any, **params: Any) -> GatewayCommand:
    return GatewayCommand(
        command_id=uuid7(),
        kind=kind,
        device_id="disp-1",
        params=params,
        expires_at=datetime.now(UTC) + timedelta(seconds=30),
    )


def dispenser_driver(store: Store) -> DispenserDriver:
    return DispenserDriver(
        sink=store, gateway_id=GATEWAY, device_id="disp-1", zone=OSLO, tick_interval=0.02
    )


async def test_every_dispenser_report_arrives_once_and_commands_are_answered(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usb-dispenser-if00"
    store, link_events = Store(), LinkEvents()
    driver = dispenser_driver(store)
    port = SimSerialPort(path)
    # A dispenser whose clock lost power: the driver must set it.
    dispenser = SimDispenser(port, clock=world_clock, clock_set=False, heartbeat_s=None)
    async with dispenser, serial_link(path, driver.run, link_events):
        await until(lambda: link_events.calls == ["up"], "the edge to open the port")
        assert path.resolve() == Path(str(port.slave_name))

        dispenser.heartbeat()
        dispenser.dose_due("morning", T0)
        dispenser.dose_taken("morning", T0)
        dispenser.dose_missed("noon", T0 + timedelta(hours=4))
        dispenser.refill_needed(12)
        dispenser.empty()
        dispenser.jammed()
        dispenser.tamper(cause=TamperCause.MOVED)
        dispenser.power_lost()
        dispenser.power_restored()
        dispenser.battery(15, 3550)
        await dispenser.drained(WAIT_S)

        assert store.kinds() == [
            EventKind.DOSE_DUE,
            EventKind.DOSE_TAKEN,
            EventKind.DOSE_MISSED,
            EventKind.REFILL_NEEDED,
            EventKind.EMPTY,
            EventKind.JAMMED,
            EventKind.TAMPER,
            EventKind.POWER_LOST,
            EventKind.POWER_RESTORED,
            EventKind.BATTERY_LEVEL,
            EventKind.BATTERY_LOW,  # 15 % is low: the dispenser sets VKP 1.17
        ]
        assert store.events[0].payload.model_dump() == {"dose_id": "morning", "scheduled_for": T0}
        assert len({event.id for event in store.events}) == 11
        assert dispenser.counters["reports_acked"] == 11
        assert [type(m).__name__ for m in dispenser.acknowledged][:2] == ["Heartbeat", "DoseDue"]
        await until(lambda: dispenser.clock_set, "the driver to set the dispenser's clock")
        offset = datetime.now(OSLO).utcoffset()
        assert offset is not None
        assert dispenser.utc_offset_minutes == offset // timedelta(minutes=1)

        doses = [{"dose_id": "morning", "time": "08:00"}, {"dose_id": "evening", "time": "20:30"}]
        results = [
            await driver.execute(hub_command("dispenser_schedule", doses=doses)),
            await driver.execute(hub_command("sync_clock")),
            await driver.execute(hub_command("test_alarm")),
        ]
        assert [(result.ok, result.error) for result in results] == [(True, None)] * 3
        assert dispenser.schedule == (
            ScheduledDose("morning", time(8, 0)),
            ScheduledDose("evening", time(20, 30)),
        )
        assert store.kinds()[-1] == EventKind.TEST_ALARM  # the passed self-test


async def test_line_noise_and_a_corrupt_frame_do_not_lose_the_next_report(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usb-dispenser-noisy"
    store, link_events = Store(), LinkEvents()
    driver = dispenser_driver(store)
    dispenser = SimDispenser(SimSerialPort(path), clock=world_clock, heartbeat_s=None)
    async with dispenser, serial_link(path, driver.run, link_events):
        await until(lambda: link_events.calls == ["up"], "the edge to open the port")
        dispenser.power_lost()
        await dispenser.drained(WAIT_S)  # the line is in step before the noise
        await dispenser.send_garbage(64)
        await dispenser.send_corrupt_frame()
        dispenser.dose_due("evening", T0 + timedelta(hours=12))
        await dispenser.drained(WAIT_S)

        damaged = sum(driver.counters[name] for name in ("bad_crc", "short_frame", "bad_escape"))
        assert damaged >= 1
        assert driver.counters["naks_sent"] >= 1
        assert store.kinds() == [EventKind.POWER_LOST, EventKind.DOSE_DUE]
        assert dispenser.counters["corrupt_frames_sent"] == 1


REPORT_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("report"), st.integers(0, 99)),
        st.tuples(st.just("garbage"), st.integers(1, 80)),
        st.tuples(st.just("corrupt"), st.just(0)),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=REPORT_STEPS)
async def test_reports_mixed_with_line_damage_arrive_once_and_in_order(
    tmp_path: Path, steps: list[tuple[str, int]]
) -> None:
    path = tmp_path / f"usb-dispenser-{uuid.uuid4().hex[:8]}"
    store, link_events = Store(), LinkEvents()
    driver = dispenser_driver(store)
    dispenser = SimDispenser(
        SimSerialPort(path), clock=world_clock, heartbeat_s=None, ack_timeout=0.2
    )
    async with dispenser, serial_link(path, driver.run, link_events):
        await until(lambda: link_events.calls == ["up"], "the edge to open the port")
        sent = []
        for action, value in steps:
            if action == "report":
                sent.append(f"d{value}")
                dispenser.dose_taken(f"d{value}", T0)
            elif action == "garbage":
                await dispenser.send_garbage(value)
            else:
                await dispenser.send_corrupt_frame()
        await dispenser.drained(WAIT_S)
    assert [event.payload.model_dump()["dose_id"] for event in store.events] == sent
    assert dispenser.counters.get("reports_failed", 0) == 0


async def test_unplug_and_replug_are_seen_by_the_serial_link_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usb-dispenser-replug"
    store, link_events = Store(), LinkEvents()
    driver = dispenser_driver(store)
    port = SimSerialPort(path)
    dispenser = SimDispenser(port, clock=world_clock, heartbeat_s=None)
    async with dispenser, serial_link(path, driver.run, link_events) as link:
        await until(lambda: link_events.calls == ["up"], "the edge to open the port")

        port.unplug()
        await until(lambda: link_events.calls == ["up", "down"], "on_down after the unplug")
        assert not path.exists()
        assert not link.up
        dispenser.dose_missed("noon", T0 + timedelta(hours=4))  # sent into a dead line
        await asyncio.sleep(0.3)
        assert store.events == []
        assert port.counters["bytes_dropped"] > 0

        port.replug()
        await until(lambda: link_events.calls == ["up", "down", "up"], "on_up after the replug")
        await dispenser.drained(WAIT_S)
        assert store.kinds() == [EventKind.DOSE_MISSED]
        assert port.counters["plugs"] == 2
        assert link.counters["link_lost"] == 1
    assert not path.exists()  # a dispenser switched off leaves the bus


# --- nurse call ---------------------------------------------------------------------------


async def test_nurse_calls_arrive_as_canonical_events_through_the_espa_driver(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usb-nursecall"
    stored: list[DeviceEvent] = []

    async def sink(events: list[DeviceEvent]) -> None:
        stored.extend(events)

    driver = EspaDriver(
        sink=sink,
        gateway_id=GATEWAY,
        central_device_id="nursecall-1",
        addresses={"101": "callpoint-101"},
        cleared_statuses={"0"},
        sink_timeout=0.3,
    )
    link_events = LinkEvents()
    port = SimSerialPort(path)
    central = SimNurseCallCentral(port, clock=world_clock, poll_interval=0.1, response_timeout=1.0)
    async with central, serial_link(path, driver.run, link_events):
        await until(lambda: central.counters.get("polls_answered", 0) >= 1, "a poll answered")

        central.call("101", "Room 101 bed 1", priority=1, call_type="3")
        central.call("202", "Room 202")
        central.clear("101")
        await central.drained(WAIT_S)

        assert [(e.kind, e.device_id) for e in stored] == [
            (EventKind.NURSE_CALL, "callpoint-101"),
            (EventKind.NURSE_CALL, "nursecall-1"),  # an address not bound: the central
            (EventKind.NURSE_CALL_CLEARED, "callpoint-101"),
        ]
        first = stored[0].payload.model_dump()
        assert first["address"] == "101"
        assert first["message"] == "Room 101 bed 1"
        assert first["priority"] == 1
        assert first["call_type"] == "3"
        assert central.counters["delivered"] == 3
        assert central.failed == []
        assert [when for when, _ in central.history] == [T0, T0, T0]

        port.unplug()
        await until(lambda: link_events.calls == ["up", "down"], "on_down after the unplug")
        port.replug()
        await until(lambda: link_events.calls == ["up", "down", "up"], "on_up after the replug")
        polls = central.counters["polls_answered"]
        await until(lambda: central.counters["polls_answered"] > polls, "a poll after replug")
        central.call("101", "again")
        await central.drained(WAIT_S)
        assert [e.kind for e in stored[3:]] == [EventKind.NURSE_CALL]


# --- SIA DC-09 ----------------------------------------------------------------------------


def sia_binding() -> SiaAccountBinding:
    return SiaAccountBinding(
        account="1234",
        gateway_id=GATEWAY,
        device_id="alarm-1",
        device_type=DeviceType.SAFETY_ALARM,
        zones={"1": ("pendant-1", DeviceType.SAFETY_ALARM)},
    )


@pytest.mark.parametrize("protocol", ["SIA-DCS", "ADM-CID"])
async def test_a_pendant_press_arrives_and_a_link_test_makes_no_event(protocol: Any) -> None:
    stored: list[DeviceEvent] = []
    seen: list[str] = []

    async def sink(events: list[DeviceEvent]) -> None:
        stored.extend(events)

    receiver = SiaReceiver(
        "127.0.0.1",
        0,
        bindings=[sia_binding()],
        sink=sink,
        on_seen=lambda device_id, _now: seen.append(device_id),
    )
    async with receiver:
        unit = SimAlarmUnit("127.0.0.1", receiver.port, account="1234", protocol=protocol)
        async with unit:
            ack = await unit.pendant_press(zone=1)
            assert (ack.message_type, ack.sequence, ack.account) == ("ACK", 1, "1234")
            assert [(e.kind, e.device_id) for e in stored] == [
                (EventKind.BUTTON_PRESSED, "pendant-1")
            ]
            assert stored[0].payload.model_dump() == {"button": "pendant"}

            link = await unit.link_test()
            assert (link.message_type, link.sequence) == ("ACK", 2)
            assert len(stored) == 1  # a NULL message makes no event
            assert receiver.counters["null_messages"] == 1
            assert seen == ["alarm-1", "alarm-1"]

            await unit.fire(zone=3)
            assert (stored[-1].kind, stored[-1].device_id) == (EventKind.SMOKE, "alarm-1.z3")
            await unit.ac_restore()
            assert stored[-1].kind == EventKind.POWER_RESTORED
            assert unit.counters["connects"] == 1  # one connection kept for every message
            assert unit.counters["acks"] == 4


async def test_a_wrong_clock_is_corrected_by_the_nak_and_a_dropped_receiver_is_reconnected() -> (
    None
):
    stored: list[DeviceEvent] = []

    async def sink(events: list[DeviceEvent]) -> None:
        stored.extend(events)

    receiver = SiaReceiver("127.0.0.1", 0, bindings=[sia_binding()], sink=sink)
    await receiver.start()
    port = receiver.port
    unit = SimAlarmUnit(
        "127.0.0.1",
        port,
        account="1234",
        clock_skew=timedelta(minutes=10),  # a unit whose clock is 10 min fast
        ack_timeout=1.0,
        retry_delay=0.05,
    )
    try:
        await unit.medical_alarm()
        assert unit.counters["naks"] == 1
        assert unit.counters["clock_corrections"] == 1
        assert abs(unit.clock_skew) < timedelta(seconds=5)
        assert [e.kind for e in stored] == [EventKind.BUTTON_PRESSED]

        await receiver.stop()  # the receiver restarts: the connection drops
        receiver = SiaReceiver("127.0.0.1", port, bindings=[sia_binding()], sink=sink)
        await receiver.start()
        await unit.cancel()
        assert [e.kind for e in stored] == [EventKind.BUTTON_PRESSED, EventKind.ALARM_CANCELLED]
        assert unit.counters["connects"] == 2
    finally:
        await unit.stop()
        await receiver.stop()


async def test_an_unacknowledged_alarm_is_retried_then_raises() -> None:
    async def broken_sink(events: list[DeviceEvent]) -> None:
        raise OSError("disk full")

    receiver = SiaReceiver("127.0.0.1", 0, bindings=[sia_binding()], sink=broken_sink)
    async with receiver:
        unit = SimAlarmUnit(
            "127.0.0.1",
            receiver.port,
            account="1234",
            ack_timeout=0.2,
            max_tries=3,
            retry_delay=0.0,
        )
        async with unit:
            with pytest.raises(AlarmUnitTimeoutError, match="0001"):
                await unit.pendant_press()
        assert unit.counters["transmissions"] == 3
        assert unit.counters["timeouts"] == 3
        assert receiver.counters["sink_errors"] == 3
        assert unit.acknowledged == []


# --- Zigbee2MQTT --------------------------------------------------------------------------


class Z2MSubscriber:
    """A plain aiomqtt subscriber feeding the product's translator."""

    def __init__(self, mqtt_url: str, base: str, devices: dict[str, DeviceBinding]) -> None:
        self.broker = BrokerAddress.from_url(mqtt_url)
        self.base = base
        self.translator = Zigbee2MqttTranslator(GATEWAY, devices, base_topic=base)
        self.events: list[DeviceEvent] = []
        self.topics: list[str] = []
        self.client: aiomqtt.Client | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[aiomqtt.Client]:
        b = self.broker
        async with aiomqtt.Client(b.host, b.port, username=b.username, password=b.password) as c:
            await c.subscribe(f"{self.base}/#", qos=1)
            task = asyncio.create_task(self._listen(c))
            try:
                yield c
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self.topics.append(message.topic.value)
            self.events += self.translator.handle(message.topic.value, payload, datetime.now(UTC))

    def kinds(self, device_id: str) -> list[EventKind]:
        return [e.kind for e in self.events if e.device_id == device_id]

    def moves(self, device_id: str) -> list[DeviceEvent]:
        """A lock's events, without its battery readings."""
        return [
            e for e in self.events if e.device_id == device_id and e.kind != EventKind.BATTERY_LEVEL
        ]

    async def clear_retained(self, client: aiomqtt.Client) -> None:
        """Leave no retained messages behind on a shared broker."""
        for topic in {t for t in self.topics if t.endswith(("/availability", "bridge/state"))}:
            await client.publish(topic, b"", qos=1, retain=True)


async def test_the_zigbee_bridge_speaks_zigbee2mqtt_and_its_lock_answers_commands(
    mqtt_url: str,
) -> None:
    base = f"z2m-sim-{uuid.uuid4().hex[:8]}"
    devices = {
        "hall/door": DeviceBinding("door-1", DeviceType.DOOR_SENSOR, "hall"),
        "hall/lock": DeviceBinding("lock-1", DeviceType.DOOR_LOCK, "hall"),
        "kitchen/smoke": DeviceBinding("smoke-1", DeviceType.SMOKE_DETECTOR),
        "bath/leak": DeviceBinding("leak-1", DeviceType.WATER_LEAK_SENSOR),
        "bedroom/motion": DeviceBinding("motion-1", DeviceType.MOTION_SENSOR),
    }
    sub = Z2MSubscriber(mqtt_url, base, devices)
    bridge = SimZigbeeBridge(mqtt_url, base_topic=base, occupancy_timeout_s=0.2)
    async with sub.running() as client, bridge:
        await until(lambda: f"{base}/bridge/state" in sub.topics, "bridge/state")

        await bridge.contact("hall/door", open=True)
        await bridge.occupancy("bedroom/motion")
        await bridge.smoke("kitchen/smoke", on=True)
        await bridge.water_leak("bath/leak", on=True)
        await until(lambda: sub.kinds("leak-1") == [EventKind.WATER_LEAK], "the leak")
        assert sub.kinds("door-1") == [EventKind.OPENED]
        assert sub.kinds("motion-1") == [EventKind.MOTION]
        assert sub.kinds("smoke-1") == [EventKind.SMOKE]
        await bridge.contact("hall/door", open=False)
        await bridge.battery("hall/door", 12)
        await until(lambda: EventKind.BATTERY_LOW in sub.kinds("door-1"), "battery low")
        assert sub.kinds("door-1") == [
            EventKind.OPENED,
            EventKind.CLOSED,
            EventKind.BATTERY_LOW,
            EventKind.BATTERY_LEVEL,
        ]
        assert bridge.state("hall/door")["contact"] is True  # closed: the full state is kept

        await bridge.add_lock("hall/lock", locked=True)
        await client.publish(*lock_command("hall/lock", "unlock", base), qos=1)
        await until(lambda: EventKind.UNLOCKED in sub.kinds("lock-1"), "the unlock")
        unlocked = next(e for e in sub.events if e.kind == EventKind.UNLOCKED)
        assert unlocked.payload.model_dump()["source"] == "remote"
        assert bridge.state("hall/lock")["lock_state"] == "unlocked"
        assert "action" not in bridge.state("hall/lock")  # never cached

        await bridge.manual_lock("hall/lock")
        await bridge.staff_unlock("hall/lock", user=7)
        await until(lambda: len(sub.moves("lock-1")) == 3, "keypad and thumb-turn")
        staff = sub.moves("lock-1")[-1]
        assert staff.payload.model_dump()["source"] == "rf_tag"
        assert staff.payload.model_dump()["user_ref"] == "7"

        bridge.lock_behaviour("hall/lock", "ignore")
        await client.publish(*lock_command("hall/lock", "lock", base), qos=1)
        await until(lambda: bridge.counters["lock_ignored"] == 1, "the ignored command")
        bridge.lock_behaviour("hall/lock", "jam")
        await client.publish(*lock_command("hall/lock", "lock", base), qos=1)
        await until(lambda: EventKind.JAMMED in sub.kinds("lock-1"), "the jam")
        assert [e.kind for e in sub.moves("lock-1")] == [
            EventKind.UNLOCKED,
            EventKind.LOCKED,
            EventKind.UNLOCKED,
            EventKind.JAMMED,
        ]

        # The bridge clears occupancy after its timeout: a later report is not motion.
        await until(lambda: bridge.state("bedroom/motion")["occupancy"] is False, "no motion")
        await bridge.battery("bedroom/motion", 80)
        await until(lambda: EventKind.BATTERY_LEVEL in sub.kinds("motion-1"), "a battery report")
        assert sub.kinds("motion-1") == [EventKind.MOTION, EventKind.BATTERY_LEVEL]

        await bridge.go_offline("bath/leak")
        await bridge.water_leak("bath/leak", on=False)  # unheard while offline
        await bridge.come_online("bath/leak")
        await until(lambda: EventKind.DEVICE_ONLINE in sub.kinds("leak-1"), "back online")
        assert sub.kinds("leak-1") == [
            EventKind.WATER_LEAK,
            EventKind.DEVICE_OFFLINE,
            EventKind.DEVICE_ONLINE,
        ]
        assert bridge.counters["unheard"] == 1
        await sub.clear_retained(client)
