"""Supervision: a silent or dead gateway raises one technical alarm, and it clears itself.

Also the edge's own ``device_offline``/``device_online`` for devices behind a live gateway:
one alarm per resident however many devices go quiet, resolved when the last is back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from devices.events import envelope_json, make_event
from tests.support import (
    HubProcess,
    home_registry,
    publish,
    register,
    settled,
    stop_quietly,
    wait_until_async,
)

pytestmark = pytest.mark.integration

FAST = {
    "TELECARE_SUPERVISION__GATEWAY_TIMEOUT_S": "5",
    "TELECARE_SUPERVISION__INTERVAL_S": "0.3",
    "TELECARE_SUPERVISION__RESTART_GRACE_S": "0",
}


def _hub(data_dir: Path, database_url: str, mqtt_url: str, env: dict[str, str]) -> HubProcess:
    return HubProcess(
        data_dir=data_dir, database_url=database_url, mqtt_url=mqtt_url,
        client_id=f"sup-hub-{uuid.uuid4().hex[:8]}", env=env,
    )


@pytest.fixture
def hub(data_dir: Path, database_url: str, mqtt_url: str) -> Iterator[HubProcess]:
    process = _hub(data_dir, database_url, mqtt_url, FAST).start()
    try:
        yield process
    finally:
        stop_quietly(process)


def _alarms(hub: HubProcess, gateway: str, **match: str) -> list[dict[str, Any]]:
    rows = httpx.get(f"{hub.base_url}/api/v1/alarms", params={"limit": 200}).json()
    return [
        a for a in rows
        if a["gateway_id"] == gateway and all(a.get(k) == v for k, v in match.items())
    ]


def _detail(hub: HubProcess, alarm_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{hub.base_url}/api/v1/alarms/{alarm_id}").json())


async def _one(hub: HubProcess, gateway: str, what: str, **match: str) -> dict[str, Any]:
    async def found() -> list[dict[str, Any]]:
        return _alarms(hub, gateway, **match)

    return (await wait_until_async(found, timeout=30, interval=0.2, what=what))[0]


async def test_a_silent_gateway_raises_one_technical_alarm_that_clears_when_it_is_back(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway, devices=[("motion-1", "motion_sensor")]))
    topic = f"telecare/v1/{gateway}/events"

    def motion() -> bytes:
        return envelope_json([make_event("motion", gateway_id=gateway, device_id="motion-1",
                                         device_type="motion_sensor")])

    await publish(mqtt_url, topic, [motion()])
    alarm = await _one(hub, gateway, "an offline alarm", category="offline", state="raised")
    assert alarm["priority"] == "technical"
    assert alarm["device_id"] == gateway  # the gateway itself, not its devices
    assert alarm["resident_id"] is None
    # Checked again and again (every 0.3 s) while silent: still one alarm, one trigger.
    await asyncio.sleep(1.5)
    assert _detail(hub, alarm["id"])["trigger_count"] == 1
    assert len(_alarms(hub, gateway)) == 1

    await publish(mqtt_url, topic, [motion()])
    resolved = await _one(hub, gateway, "the alarm resolved", id=alarm["id"], state="resolved")
    detail = _detail(hub, resolved["id"])
    assert [(t["to_state"], t["actor"]) for t in detail["transitions"]] == [
        ("raised", "system"), ("resolved", "system"),
    ]
    assert [t["kind"] for t in detail["triggers"]] == ["device_offline", "device_online"]
    assert detail["cause_code"] == "condition_cleared"


async def test_a_last_will_raises_the_alarm_at_once_and_online_resolves_it(
    data_dir: Path, database_url: str, mqtt_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway))
    # A long silence timeout: only the will can raise this alarm within the test.
    hub = _hub(data_dir, database_url, mqtt_url,
               {**FAST, "TELECARE_SUPERVISION__GATEWAY_TIMEOUT_S": "3600"}).start()
    topic = f"telecare/v1/{gateway}/status"
    try:
        await publish(mqtt_url, topic, [b'{"state": "offline"}'], retain=True)
        alarm = await _one(hub, gateway, "an offline alarm", category="offline", state="raised")
        online = {"state": "online", "time": datetime.now(UTC).isoformat()}
        await publish(mqtt_url, topic, [json.dumps(online).encode()], retain=True)
        await _one(hub, gateway, "the alarm resolved", id=alarm["id"], state="resolved")
    finally:
        await publish(mqtt_url, topic, [b""], retain=True)
        stop_quietly(hub)


async def test_a_hub_restart_pages_nobody_during_the_grace_period(
    data_dir: Path, database_url: str, mqtt_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE gateways SET last_seen_at = %s WHERE id = %s",
            [datetime.now(UTC) - timedelta(hours=1), gateway],
        )
    hub = _hub(data_dir, database_url, mqtt_url,
               {**FAST, "TELECARE_SUPERVISION__RESTART_GRACE_S": "6"}).start()
    try:
        started = datetime.now(UTC)
        alarm = await _one(hub, gateway, "the alarm after the grace", category="offline")
        raised_at = datetime.fromisoformat(alarm["raised_at"])
        # Silent for an hour, timeout 5 s, yet nothing before the 6 s grace had passed.
        assert raised_at - started >= timedelta(seconds=4)
    finally:
        stop_quietly(hub)


async def test_devices_offline_behind_a_live_gateway_make_one_alarm_until_the_last_is_back(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    devices = [("pendant", "safety_alarm"), ("smoke", "smoke_detector")]
    await register(database_url, home_registry(gateway, devices=devices))
    topic = f"telecare/v1/{gateway}/events"

    async def send(kind: str, device_id: str, device_type: str) -> None:
        event = make_event(kind, gateway_id=gateway, device_id=device_id,
                           device_type=device_type)
        await publish(mqtt_url, topic, [envelope_json([event])])

    await send("device_offline", "pendant", "safety_alarm")
    await send("device_offline", "smoke", "smoke_detector")
    alarm = await _one(hub, gateway, "a device alarm", category="offline",
                       resident_id=f"res-{gateway}")
    await wait_until_async(lambda: settled(_detail(hub, alarm["id"])["trigger_count"] == 2),
                           timeout=10, what="the second device joined")
    await send("device_online", "pendant", "safety_alarm")
    await send("heartbeat", gateway, "gateway")  # something after, to be sure it was seen
    await wait_until_async(
        lambda: settled(len(_detail(hub, alarm["id"])["triggers"]) == 3), timeout=10,
        what="the first clearing event on the timeline",
    )
    assert _detail(hub, alarm["id"])["state"] == "raised"  # the smoke detector is still out
    await send("device_online", "smoke", "smoke_detector")
    await _one(hub, gateway, "resolved", id=alarm["id"], state="resolved")
    assert len(_alarms(hub, gateway, category="offline")) == 1

