"""A simulated home, end to end: devices speaking their real protocols -> a real edge
daemon process -> the broker -> a real hub process -> rows and alarms.

The devices are the simulators of simulators/devices/: a Zigbee2MQTT bridge (sensors and
a lock), a medicine dispenser and a nurse-call central on pseudo-terminals, a safety-alarm
unit speaking SIA DC-09 over TCP. Everything else is the product as deployed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from simulators.devices import (
    AlarmUnitError,
    SimAlarmUnit,
    SimDispenser,
    SimNurseCallCentral,
    SimSerialPort,
    SimZigbeeBridge,
)
from tests.edge_support import EdgeProcess, EdgeSetup
from tests.support import (
    REAL_MQTT_URL,
    HubProcess,
    free_port,
    home_registry,
    register,
    settled,
    stop_quietly,
    wait_until_async,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Z2M_DEVICES = [
    ("front_door", "door-1", "door_sensor"),
    ("kitchen_motion", "motion-1", "motion_sensor"),
    ("bed", "bed-1", "bed_sensor"),
    ("kitchen_smoke", "smoke-1", "smoke_detector"),
    ("bath_leak", "leak-1", "water_leak_sensor"),
    ("fall", "fall-1", "fall_detector"),
    ("front_lock", "lock-1", "door_lock"),
]
EVERY_TYPE = {
    "safety_alarm", "medicine_dispenser", "door_lock", "door_sensor", "motion_sensor",
    "bed_sensor", "smoke_detector", "fall_detector", "water_leak_sensor", "nurse_call",
    "gateway",
}


@dataclass
class Home:
    gateway: str
    hub: HubProcess
    edge: EdgeProcess
    bridge: SimZigbeeBridge
    dispenser_port: SimSerialPort
    dispenser: SimDispenser
    central: SimNurseCallCentral
    unit: SimAlarmUnit
    database_url: str


@pytest.fixture
def hub(data_dir: Path, database_url: str, mqtt_url: str) -> Iterator[HubProcess]:
    process = HubProcess(
        data_dir=data_dir, database_url=database_url, mqtt_url=mqtt_url,
        client_id=f"home-hub-{uuid.uuid4().hex[:8]}",
        env={"TELECARE_SUPERVISION__INTERVAL_S": "0.5"},
    ).start()
    try:
        yield process
    finally:
        stop_quietly(process)


@pytest.fixture
async def home(
    hub: HubProcess, data_dir: Path, database_url: str, mqtt_url: str
) -> AsyncIterator[Home]:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    devices = [(device_id, kind) for _, device_id, kind in Z2M_DEVICES] + [
        ("dispenser-1", "medicine_dispenser"), ("central-1", "nurse_call"),
        ("call-101", "nurse_call"), ("unit-1", "safety_alarm"), ("pendant-1", "safety_alarm"),
    ]
    await register(database_url, home_registry(gateway, devices=devices))
    work = data_dir / gateway
    work.mkdir(parents=True)
    sia_port = free_port()
    base = f"z2m-{gateway}"
    setup = EdgeSetup(
        gateway_id=gateway, data_dir=work / "edge", hub_url=mqtt_url,
        protocol="5" if mqtt_url == REAL_MQTT_URL else "3.1.1", heartbeat_s=5,
        z2m_url=mqtt_url, z2m_base=base,
        z2m_devices=[{"friendly_name": n, "device_id": d, "device_type": t}
                     for n, d, t in Z2M_DEVICES],
        serial=[
            {"path": str(work / "dispenser"), "protocol": "dispenser",
             "device_id": "dispenser-1", "check_in_s": 30},
            {"path": str(work / "nursecall"), "protocol": "espa444",
             "central_device_id": "central-1", "cleared_statuses": ["0"],
             "addresses": {"101": "call-101"}},
        ],
        sia_port=sia_port,
        sia_accounts=[{"account": "1234", "device_id": "unit-1",
                       "device_type": "safety_alarm"}],
    )
    config = setup.write()
    # The zone table is easier to append than to teach EdgeSetup.
    text = config.read_text()
    text += '[sia.accounts.zones.1]\ndevice_id = "pendant-1"\ndevice_type = "safety_alarm"\n'
    config.write_text(text)

    dispenser_port = SimSerialPort(work / "dispenser")
    central_port = SimSerialPort(work / "nursecall")
    await dispenser_port.start()
    await central_port.start()
    bridge = SimZigbeeBridge(mqtt_url, base_topic=base)
    await bridge.start()
    await bridge.add_lock("front_lock")
    edge = EdgeProcess(config).start()
    dispenser = SimDispenser(dispenser_port, heartbeat_s=2.0)
    central = SimNurseCallCentral(central_port)
    await dispenser.start()
    await central.start()
    unit = SimAlarmUnit("127.0.0.1", sia_port, account="1234")
    try:
        yield Home(gateway, hub, edge, bridge, dispenser_port, dispenser, central, unit,
                   database_url)
    finally:
        for device in (unit, central, dispenser, bridge):
            await device.stop()
        edge.stop()
        await dispenser_port.stop()
        await central_port.stop()
        print(edge.log()[-8000:])  # shown only when the test fails


async def _kinds_by_type(database_url: str, gateway: str) -> dict[str, set[str]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT device_type, kind FROM events WHERE gateway_id = %s", [gateway])
        found: dict[str, set[str]] = {}
        for device_type, kind in await cur.fetchall():
            found.setdefault(device_type, set()).add(kind)
        return found


async def _sia_ready(unit: SimAlarmUnit) -> None:
    """The edge process needs a moment to open its receiver: retry the first message."""
    for _ in range(100):
        try:
            await unit.start()
            await unit.link_test()
        except (OSError, AlarmUnitError):
            await unit.stop()
            await asyncio.sleep(0.2)
        else:
            return
    raise AssertionError("the edge's SIA receiver never answered")


async def test_every_device_type_reaches_the_hub_through_a_real_edge(home: Home) -> None:
    now = datetime.now(UTC)
    await _sia_ready(home.unit)
    bridge = home.bridge
    await bridge.contact("front_door", open=True)
    await bridge.occupancy("kitchen_motion")
    await bridge.update("bed", occupancy=True)
    await bridge.smoke("kitchen_smoke", on=True)
    await bridge.water_leak("bath_leak", on=True)
    await bridge.vibration("fall", "drop")
    await bridge.staff_unlock("front_lock", user=7)
    home.dispenser.dose_taken("morning", now - timedelta(minutes=5))
    home.central.call("101", priority=1)
    await home.unit.pendant_press()

    async def all_types() -> dict[str, set[str]]:
        found = await _kinds_by_type(home.database_url, home.gateway)
        return found if set(found) >= EVERY_TYPE else {}

    found = await wait_until_async(all_types, timeout=60, interval=0.3,
                                   what="an event of every device type")
    assert "button_pressed" in found["safety_alarm"]
    assert "dose_taken" in found["medicine_dispenser"]
    assert "unlocked" in found["door_lock"]
    assert "opened" in found["door_sensor"]
    assert "bed_entered" in found["bed_sensor"]
    assert "smoke" in found["smoke_detector"]
    assert "water_leak" in found["water_leak_sensor"]
    assert "nurse_call" in found["nurse_call"]
    assert "heartbeat" in found["gateway"]

    # The pendant press, the smoke and the leak are alarms in the hub's API.
    async def alarms() -> set[str]:
        rows = httpx.get(f"{home.hub.base_url}/api/v1/alarms", params={"limit": 100}).json()
        categories = {a["category"] for a in rows if a["gateway_id"] == home.gateway}
        return categories if {"assistance", "fire", "water_leak"} <= categories else set()

    await wait_until_async(alarms, timeout=30, interval=0.3, what="the alarms")
    # Both clocks are on every event: the device's and the gateway's.
    async with await psycopg.AsyncConnection.connect(home.database_url) as conn:
        cur = await conn.execute(
            "SELECT DISTINCT kind FROM events WHERE gateway_id = %s AND gateway_time IS NULL",
            [home.gateway])
        without = await cur.fetchall()
    assert without == []


async def test_a_serial_device_unplugged_and_back_is_recorded_offline_then_online(
    home: Home,
) -> None:
    async def dispenser_kinds() -> list[str]:
        async with await psycopg.AsyncConnection.connect(home.database_url) as conn:
            cur = await conn.execute(
                "SELECT kind FROM events WHERE gateway_id = %s AND device_id = 'dispenser-1'"
                " AND kind IN ('device_offline', 'device_online', 'heartbeat', 'dose_due')"
                " ORDER BY received_at", [home.gateway])
            return [row[0] for row in await cur.fetchall()]

    home.dispenser.dose_due("noon", datetime.now(UTC))
    await wait_until_async(lambda: _contains(dispenser_kinds(), ["dose_due"]), timeout=30,
                           what="the dispenser connected")
    home.dispenser_port.unplug()
    await wait_until_async(lambda: _contains(dispenser_kinds(), ["device_offline"]),
                           timeout=30, what="device_offline after the unplug")

    async def offline_alarm() -> list[dict[str, Any]]:
        rows = httpx.get(f"{home.hub.base_url}/api/v1/alarms", params={"limit": 100}).json()
        return [a for a in rows if a["gateway_id"] == home.gateway
                and a["category"] == "offline" and a["state"] == "raised"]

    alarm = (await wait_until_async(offline_alarm, timeout=30, what="a technical alarm"))[0]
    home.dispenser_port.replug()
    await wait_until_async(
        lambda: _contains(dispenser_kinds(), ["device_offline", "device_online"]),
        timeout=60, what="device_online after the replug")

    async def resolved() -> bool:
        detail = httpx.get(f"{home.hub.base_url}/api/v1/alarms/{alarm['id']}").json()
        return bool(detail["state"] == "resolved")

    await wait_until_async(resolved, timeout=30, what="the technical alarm resolved")


async def _contains(kinds: Any, expected: list[str]) -> bool:
    """``expected`` appears in order within the kinds (other kinds may come between)."""
    found = iter(await kinds)
    return all(any(kind == want for kind in found) for want in expected)


async def test_garbage_and_a_corrupt_frame_among_good_ones(home: Home) -> None:
    scheduled = datetime.now(UTC).replace(microsecond=0)
    home.dispenser.dose_due("d1", scheduled)
    # Only once the edge has the line open: opening a serial port flushes its input.
    await home.dispenser.drained(timeout=30)
    await home.dispenser.send_garbage(64)
    await home.dispenser.send_corrupt_frame()
    home.dispenser.dose_taken("d1", scheduled)
    await home.dispenser.send_garbage(17)
    home.dispenser.dose_due("d2", scheduled + timedelta(hours=4))

    async def doses() -> list[tuple[str, str]]:
        async with await psycopg.AsyncConnection.connect(home.database_url) as conn:
            cur = await conn.execute(
                "SELECT kind, payload->>'dose_id' FROM events WHERE gateway_id = %s"
                " AND kind LIKE 'dose_%%' ORDER BY time, kind", [home.gateway])
            rows = [(str(r[0]), str(r[1])) for r in await cur.fetchall()]
        return rows if len(rows) >= 3 else []

    stored = await wait_until_async(doses, timeout=30, what="the good reports stored")
    assert sorted(stored) == [("dose_due", "d1"), ("dose_due", "d2"), ("dose_taken", "d1")]

    # Counted in the edge's status file and logged (reason and count, never the bytes).
    async def rejected() -> dict[str, Any]:
        path = home.edge.config.parent / "status.json"
        if not path.exists():
            return {}
        counters = json.loads(path.read_text()).get("dispenser:" + str(
            home.edge.config.parent.parent / "dispenser"), {})
        return counters if counters.get("bad_crc", 0) + counters.get("garbage", 0) else {}

    counters = await wait_until_async(rejected, timeout=30, interval=0.5,
                                      what="the rejected bytes counted in status.json")
    # The corrupt frame, and at least one stretch of garbage (split into "frames" at
    # whatever flag bytes it happened to contain, or skipped as garbage).
    assert counters["bad_crc"] + counters["garbage"] >= 2
    await wait_until_async(
        lambda: settled("edge_input_rejected" in home.edge.log()), timeout=15,
        what="a log line about the rejected input")

