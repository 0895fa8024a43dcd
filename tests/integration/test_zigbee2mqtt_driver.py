"""The Zigbee2MQTT driver against a real broker standing in for the home's local one.

Each test has its own base topic (``z2m-test-<uuid>``) and gateway id, so tests on a
shared Mosquitto never see each other. Payloads are the fixtures under
``tests/fixtures/zigbee2mqtt/`` replayed as the bridge would publish them, and
``state_payload`` for a fake lock that answers ``/set`` as Zigbee2MQTT would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import pytest
from structlog.testing import capture_logs

from devices.events import DeviceEvent, LockPayload, SupervisionPayload
from devices.gateway import CommandResult, GatewayCommand
from devices.ids import uuid7
from devices.zigbee2mqtt import parse_set, state_payload
from edge.config import Zigbee2MqttConfig
from edge.drivers.zigbee2mqtt import Zigbee2MqttDriver
from tests.support import REAL_MQTT_URL, ROOT, mqtt_client, wait_until_async
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FIXTURES = ROOT / "tests" / "fixtures" / "zigbee2mqtt"
T0 = datetime(2025, 2, 3, 9, 0, tzinfo=UTC)

DEVICES: list[dict[str, Any]] = [
    {
        "friendly_name": "flat12/front_door",
        "device_id": "door-1",
        "device_type": "door_sensor",
        "room": "hall",
    },
    {
        "friendly_name": "flat12/kitchen/motion",
        "device_id": "motion-1",
        "device_type": "motion_sensor",
        "room": "kitchen",
    },
    {"friendly_name": "flat12/hall/smoke", "device_id": "smoke-1", "device_type": "smoke_detector"},
    {
        "friendly_name": "flat12/bathroom/leak",
        "device_id": "leak-1",
        "device_type": "water_leak_sensor",
    },
    {
        "friendly_name": "flat12/front_lock",
        "device_id": "lock-1",
        "device_type": "door_lock",
        "room": "hall",
    },
]
ALL_IDS = sorted(device["device_id"] for device in DEVICES)


class Clock:
    """The driver's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Home:
    """A running driver, what it sank and saw, and a client on the broker as the bridge."""

    url: str
    base: str
    driver: Zigbee2MqttDriver
    bridge: aiomqtt.Client
    clock: Clock
    events: list[DeviceEvent] = field(default_factory=list)
    seen: list[tuple[str, datetime]] = field(default_factory=list)

    def kinds(self, device_id: str) -> list[str]:
        return [str(event.kind) for event in self.events if event.device_id == device_id]

    async def publish(self, messages: Iterable[tuple[str, bytes]], *, retain: bool = False) -> None:
        for topic, payload in messages:
            await self.bridge.publish(topic, payload, qos=1, retain=retain)

    async def state(self, name: str, fields: dict[str, Any]) -> None:
        await self.publish([(f"{self.base}/{name}", state_payload(fields))])

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
        async def check() -> bool:
            return predicate()

        await wait_until_async(check, timeout=timeout, what=what)

    async def wait_kinds(self, device_id: str, expected: list[str]) -> None:
        await self.wait(lambda: len(self.kinds(device_id)) >= len(expected), f"{device_id} events")
        await asyncio.sleep(0.2)  # anything more would be a wrong extra event
        assert self.kinds(device_id) == expected


def fixture(name: str, base: str) -> list[tuple[str, bytes]]:
    """A fixture file's messages, moved under ``base``."""
    messages = []
    for line in (FIXTURES / name).read_text().splitlines():
        item = json.loads(line)
        topic = base + item["topic"].removeprefix("zigbee2mqtt")
        messages.append((topic, item["payload"].encode()))
    return messages


async def forget_session(url: str, client_id: str) -> None:
    """Connect once with a clean session so the broker drops the driver's stored one."""
    parts = urlsplit(url)
    async with aiomqtt.Client(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        identifier=client_id,
        clean_session=True,
        protocol=aiomqtt.ProtocolVersion.V311,
    ):
        pass


@contextlib.asynccontextmanager
async def running(
    mqtt_url: str,
    *,
    driver_url: str | None = None,
    sink: Callable[[list[DeviceEvent]], Awaitable[None]] | None = None,
    start: bool = True,
    **options: Any,
) -> AsyncIterator[Home]:
    base = f"z2m-test-{uuid.uuid4().hex[:12]}"
    gateway = f"gw-z2m-{uuid.uuid4().hex[:8]}"
    config = Zigbee2MqttConfig.model_validate(
        {"mqtt_url": driver_url or mqtt_url, "base_topic": base, "devices": DEVICES}
    )
    clock = Clock()
    events: list[DeviceEvent] = []
    seen: list[tuple[str, datetime]] = []

    async def store(batch: list[DeviceEvent]) -> None:
        events.extend(batch)

    options = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **options}
    driver = Zigbee2MqttDriver(
        config,
        gateway_id=gateway,
        sink=sink or store,
        clock=clock,
        on_seen=lambda device_id, now: seen.append((device_id, now)),
        **options,
    )
    async with mqtt_client(mqtt_url) as bridge:
        home = Home(mqtt_url, base, driver, bridge, clock, events, seen)
        task = asyncio.create_task(driver.run()) if start else None
        try:
            if task is not None:
                await home.wait(lambda: driver.connected or task.done(), "the driver to connect")
            yield home
            if task is not None and task.done():
                task.result()  # surfaces a driver that died
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await forget_session(mqtt_url, f"telecare-edge-{gateway}-zigbee2mqtt")


def unlock(
    device_id: str = "lock-1", *, kind: str = "unlock", expires_s: float = 60
) -> GatewayCommand:
    return GatewayCommand.model_validate(
        {
            "command_id": uuid7(),
            "kind": kind,
            "device_id": device_id,
            "expires_at": T0 + timedelta(seconds=expires_s),
        }
    )


# --- sensors --------------------------------------------------------------------------


async def test_sensor_fixtures_become_the_canonical_events(mqtt_url: str) -> None:
    async with running(mqtt_url) as home:
        for name in (
            "aqara_mccgq11lm_contact.jsonl",
            "aqara_rtcgq11lm_occupancy.jsonl",
            "heiman_hs1sa_smoke.jsonl",
            "aqara_sjcgq11lm_water_leak.jsonl",
            "bridge.jsonl",
        ):
            await home.publish(fixture(name, home.base))
        await home.wait_kinds(
            "door-1",
            [
                "closed",
                "battery_level",
                "opened",
                "closed",
                "device_offline",
                "device_online",
            ],
        )
        await home.wait_kinds("motion-1", ["motion", "battery_level", "motion", "device_offline"])
        await home.wait_kinds("smoke-1", ["battery_level", "smoke", "smoke", "battery_level"])
        await home.wait_kinds(
            "leak-1", ["battery_level", "water_leak", "battery_low", "battery_level"]
        )
        smoke = [e for e in home.events if e.kind == "smoke"]
        assert [e.payload.model_dump() for e in smoke] == [{"test": True}, {"test": False}]
        opened = next(e for e in home.events if e.kind == "opened")
        assert opened.gateway_id == home.driver.gateway_id
        assert opened.device_type == "door_sensor"
        assert opened.payload.model_dump() == {"room": "hall"}
        assert opened.time == datetime(2024, 4, 8, 21, 25, 10, 21000, tzinfo=UTC)  # last_seen
        assert opened.gateway_time == T0
        counters = home.driver.counters
        assert counters["ignored_bridge"] == 1  # bridge/logging; bridge/state is the driver's
        assert counters["ignored_command"] == 3
        assert counters["events"] == len(home.events) == 18
    # Every state message and every availability "online" is a sign of life; "offline" is not.
    assert home.seen.count(("door-1", T0)) == 6
    assert home.seen.count(("motion-1", T0)) == 4
    assert home.seen.count(("smoke-1", T0)) == 4


async def test_a_malformed_payload_is_counted_logged_without_it_and_skipped(
    mqtt_url: str,
) -> None:
    async with running(mqtt_url) as home:
        personal = "Kari Nordmann, Storgata 1"
        motion = f"{home.base}/flat12/kitchen/motion"
        with capture_logs() as logs:
            await home.publish(
                [
                    (motion, b'{"occupancy":true}'),
                    (motion, f'{{"occupancy": true, "note": "{personal}"'.encode()),  # cut short
                    (motion, b"\xff\xfe{}"),
                    (motion, b'{"occupancy":"yes"}'),
                    (f"{home.base}/flat12/neighbours_door", b"not even json"),
                    (f"{home.base}/flat12/hall/smoke", b'{"smoke":true}'),
                    (motion, b'{"occupancy":true}'),
                ]
            )
            await home.wait(lambda: len(home.events) >= 3, "the good messages")
            await asyncio.sleep(0.2)
        assert [(e.device_id, e.kind) for e in home.events] == [
            ("motion-1", "motion"),
            ("smoke-1", "smoke"),
            ("motion-1", "motion"),
        ]
        counters = home.driver.counters
        assert counters["invalid_json"] == 1
        assert counters["invalid_utf8"] == 1
        assert counters["invalid_field"] == 1
        assert counters["unknown_device"] == 1
        rejected = [entry for entry in logs if entry["event"] == "zigbee2mqtt_message_rejected"]
        assert [entry["reason"] for entry in rejected] == [
            "invalid_json",
            "invalid_utf8",
            "invalid_field",
        ]
        assert all(entry["log_level"] == "warning" for entry in rejected)
        assert all(entry["device_id"] == "motion-1" for entry in rejected)
        assert "Kari" not in repr(logs)


async def test_a_retained_message_gives_events_but_is_no_sign_of_life(mqtt_url: str) -> None:
    async with running(mqtt_url, start=False) as home:
        smoke = f"{home.base}/flat12/hall/smoke"
        await home.publish([(smoke, b'{"smoke":true}')], retain=True)
        try:
            task = asyncio.create_task(home.driver.run())
            await home.wait(lambda: home.kinds("smoke-1") == ["smoke"], "the retained alarm")
            assert home.seen == []
            assert home.driver.counters["retained_messages"] == 1
            await home.publish([(smoke, b'{"smoke":false}')])
            await home.wait(lambda: home.seen == [("smoke-1", T0)], "a live message")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await home.publish([(smoke, b"")], retain=True)


# --- the bridge -----------------------------------------------------------------------


async def test_the_bridge_going_offline_takes_every_bound_device_offline_once(
    mqtt_url: str,
) -> None:
    async with running(mqtt_url) as home:
        bridge_state = f"{home.base}/bridge/state"
        await home.publish([(bridge_state, b'{"state":"online"}')])
        await home.state("flat12/front_door", {"contact": True})
        await home.publish([(f"{home.base}/flat12/kitchen/motion/availability", b"offline")])
        await home.wait(lambda: len(home.events) == 2, "closed and the motion sensor offline")
        home.clock.now = T0 + timedelta(minutes=5)
        await home.publish([(bridge_state, b'{"state":"offline"}'), (bridge_state, b"offline")])
        await home.wait(lambda: len(home.events) == 6, "four more devices offline")
        offline = home.events[2:]
        assert sorted(e.device_id for e in offline) == sorted(set(ALL_IDS) - {"motion-1"})
        assert {e.kind for e in offline} == {"device_offline"}
        door = next(e for e in offline if e.device_id == "door-1")
        assert door.payload == SupervisionPayload(last_seen=T0)
        assert door.time == door.gateway_time == T0 + timedelta(minutes=5)
        assert next(e for e in offline if e.device_id == "lock-1").payload.model_dump() == {
            "last_seen": None
        }

        await home.publish([(bridge_state, b"online")])
        await home.wait(lambda: len(home.events) == 10, "those four back online")
        back = home.events[6:]
        assert sorted(e.device_id for e in back) == sorted(e.device_id for e in offline)
        assert {e.kind for e in back} == {"device_online"}
        await asyncio.sleep(0.2)
        assert len(home.events) == 10  # the motion sensor stays offline: its own report
        assert home.driver.counters["bridge_offline"] == 1
        assert home.driver.counters["bridge_online"] == 1


# --- lock commands --------------------------------------------------------------------


async def fake_lock(
    home: Home, name: str, asked: list[str], ready: asyncio.Event, *, answer: bool
) -> None:
    """Answer ``/set`` as Zigbee2MQTT does for an ID Lock: the operation event (with the
    old cached position), then the new position. Records the actions asked of it."""
    async with mqtt_client(home.url) as client:
        await client.subscribe(f"{home.base}/{name}/set", qos=1)
        ready.set()
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            action = parse_set(message.topic.value, message.payload, base_topic=home.base)
            assert action.lock_action is not None
            asked.append(action.lock_action)
            if answer:
                position = "locked" if action.lock_action == "lock" else "unlocked"
                old = "unlocked" if position == "locked" else "locked"
                await home.state(
                    name,
                    {
                        "action": action.lock_action,
                        "action_source_name": "rf",
                        "action_user": 65535,
                        "lock_state": old,
                        "state": old[:-2].upper(),
                    },
                )
                await home.state(name, {"lock_state": position, "state": position[:-2].upper()})


@contextlib.asynccontextmanager
async def lock_answering(home: Home, *, answer: bool = True) -> AsyncIterator[list[str]]:
    ready = asyncio.Event()
    asked: list[str] = []
    task = asyncio.create_task(fake_lock(home, "flat12/front_lock", asked, ready, answer=answer))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield asked
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_unlock_confirmed_by_the_lock_is_ok_and_tags_its_event(mqtt_url: str) -> None:
    async with running(mqtt_url) as home:
        await home.state("flat12/front_lock", {"lock_state": "locked", "state": "LOCK"})
        await home.wait(lambda: home.seen != [], "the lock's baseline")
        async with lock_answering(home):
            command = unlock()
            result = await asyncio.wait_for(home.driver.execute(command), 10)
        assert result == CommandResult(command_id=command.command_id, ok=True, time=T0)
        await home.wait(lambda: "unlocked" in home.kinds("lock-1"), "the unlocked event")
        event = next(e for e in home.events if e.kind == "unlocked")
        assert event.payload == LockPayload(source="remote", command_id=command.command_id)
        assert home.driver.counters["commands_confirmed"] == 1


async def test_no_answer_from_the_lock_fails_after_the_timeout(mqtt_url: str) -> None:
    async with running(mqtt_url, timeout_s=0.5) as home:
        async with lock_answering(home, answer=False) as asked:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await asyncio.wait_for(home.driver.execute(unlock()), 10)
            assert 0.45 <= loop.time() - started < 3
            await home.wait(lambda: asked == ["unlock"], "the lock to be asked")
        assert not result.ok
        assert result.error == "no confirmation from the lock within 0.5 s"
        assert home.driver.counters["commands_failed"] == 1


async def test_commands_the_driver_must_refuse(mqtt_url: str) -> None:
    async with running(mqtt_url, start=False) as home:
        assert (await home.driver.execute(unlock())).error == (
            "not connected to the local Zigbee2MQTT broker"
        )
        task = asyncio.create_task(home.driver.run())
        try:
            await home.wait(lambda: home.driver.connected, "the driver to connect")
            async with lock_answering(home) as asked:
                cases = {
                    "expired": unlock(expires_s=-1),
                    "not a Zigbee2MQTT command": unlock(kind="sync_clock"),
                    "device door-1 is not a door lock on this gateway": unlock("door-1"),
                    "device lock-9 is not a door lock on this gateway": unlock("lock-9"),
                }
                for error, command in cases.items():
                    result = await home.driver.execute(command)
                    assert (result.ok, result.error) == (False, error)
                await asyncio.sleep(0.3)
                assert asked == []  # none of them reached the lock
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert home.driver.handles("lock-1")
    assert home.driver.handles("door-1")
    assert not home.driver.handles("lock-9")


# --- time, failures and outages -------------------------------------------------------


async def test_a_lock_stuck_not_fully_locked_is_reported_jammed_by_the_tick(
    mqtt_url: str,
) -> None:
    async with running(mqtt_url, tick_interval_s=0.05) as home:
        await home.publish(fixture("datek_0402946_id_lock_150.jsonl", home.base))
        await home.wait(lambda: len(home.kinds("lock-1")) == 6, "the lock's events")
        await asyncio.sleep(0.2)
        assert "jammed" not in home.kinds("lock-1")
        home.clock.now = T0 + timedelta(seconds=31)
        await home.wait(lambda: "jammed" in home.kinds("lock-1"), "the jam")
        assert home.kinds("lock-1")[-1] == "jammed"


async def test_a_failing_sink_stops_run_with_its_error(mqtt_url: str) -> None:
    class DiskFullError(OSError):
        pass

    async def broken(_: list[DeviceEvent]) -> None:
        raise DiskFullError("no space left on device")

    async with running(mqtt_url, sink=broken, start=False) as home:
        task = asyncio.create_task(home.driver.run())
        await home.wait(lambda: home.driver.connected, "the driver to connect")
        await home.state("flat12/hall/smoke", {"smoke": True})
        with pytest.raises(DiskFullError):
            await asyncio.wait_for(task, 10)
        assert home.driver.counters["sink_errors"] == 1


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_the_driver_reconnects_after_the_local_broker_link_is_cut(
    mqtt_url: str, protocol: str
) -> None:
    if protocol == "5" and mqtt_url != REAL_MQTT_URL:
        pytest.skip("the embedded amqtt broker speaks MQTT 3.1.1 only")
    broker = urlsplit(mqtt_url)
    async with (
        TcpProxy(broker.hostname or "127.0.0.1", broker.port or 1883) as proxy,
        running(mqtt_url, driver_url=proxy.url, keepalive_s=5, protocol=protocol) as home,
    ):
        smoke = "flat12/hall/smoke"
        await home.state(smoke, {"smoke": False, "battery": 90})
        await home.wait(lambda: home.kinds("smoke-1") == ["battery_level"], "the first report")

        await proxy.cut()
        await home.wait(lambda: not home.driver.connected, "the driver to notice")
        await home.state(smoke, {"smoke": True, "battery": 90})  # while the edge is away
        await asyncio.sleep(0.5)  # several refused reconnects
        assert home.driver.counters["connect_failures"] >= 1

        await proxy.restore()
        await home.wait(lambda: home.driver.connected, "the driver to reconnect")
        await home.state(smoke, {"smoke": False, "battery": 80})
        await home.wait(lambda: "battery_level" in home.kinds("smoke-1")[1:], "a new report")
        # The persistent session kept the alarm published during the outage.
        assert home.kinds("smoke-1") == ["battery_level", "smoke", "battery_level"]
        assert home.driver.counters["reconnects"] >= 1
        assert home.driver.counters["disconnects"] >= 1
