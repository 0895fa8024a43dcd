"""Commands from the hub to a gateway over MQTT, and their results, through the API."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from devices.gateway import CommandResult, GatewayCommand
from tests.support import (
    HubProcess,
    home_registry,
    mqtt_client,
    publish,
    register,
    stop_quietly,
    wait_until_async,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def hub(data_dir: Path, database_url: str, mqtt_url: str) -> Iterator[HubProcess]:
    process = HubProcess(
        data_dir=data_dir, database_url=database_url, mqtt_url=mqtt_url,
        client_id=f"cmd-hub-{uuid.uuid4().hex[:8]}",
    ).start()
    try:
        yield process
    finally:
        stop_quietly(process)


def _post(hub: HubProcess, **body: Any) -> httpx.Response:
    return httpx.post(f"{hub.base_url}/api/v1/commands", json=body)


def _get(hub: HubProcess, command_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{hub.base_url}/api/v1/commands/{command_id}").json())


async def test_an_unlock_reaches_the_gateway_and_its_result_is_recorded(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway, devices=[("lock", "door_lock")]))
    received: asyncio.Queue[GatewayCommand] = asyncio.Queue()

    async def gateway_side() -> None:
        async with mqtt_client(mqtt_url) as client:
            await client.subscribe(f"telecare/v1/{gateway}/commands", qos=1)
            subscribed.set()
            async for message in client.messages:
                received.put_nowait(GatewayCommand.model_validate_json(bytes(message.payload)))

    subscribed = asyncio.Event()
    listener = asyncio.create_task(gateway_side())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        response = _post(hub, device_id="lock", kind="unlock", actor="nurse-7", reason="visit")
        assert response.status_code == 202, response.text
        sent = response.json()
        assert sent["state"] == "sent"
        assert sent["gateway_id"] == gateway
        command = await asyncio.wait_for(received.get(), 10)
        assert str(command.command_id) == sent["id"]
        assert command.kind == "unlock"
        assert command.device_id == "lock"
        assert command.expires_at > datetime.now(UTC)
    finally:
        listener.cancel()
    result = CommandResult(command_id=command.command_id, ok=True, time=datetime.now(UTC))
    await publish(mqtt_url, f"telecare/v1/{gateway}/command-results",
                  [result.model_dump_json().encode()])

    async def done() -> dict[str, Any]:
        found = _get(hub, sent["id"])
        return found if found["state"] == "succeeded" else {}

    recorded = await wait_until_async(done, timeout=15, what="the result recorded")
    assert recorded["actor"] == "nurse-7"
    assert recorded["reason"] == "visit"
    # A second (redelivered or forged) result does not overwrite the first.
    failed = CommandResult(command_id=command.command_id, ok=False, error="x",
                           time=datetime.now(UTC))
    await publish(mqtt_url, f"telecare/v1/{gateway}/command-results",
                  [failed.model_dump_json().encode()])
    await asyncio.sleep(1)
    assert _get(hub, sent["id"])["state"] == "succeeded"
    listed = httpx.get(f"{hub.base_url}/api/v1/commands", params={"device_id": "lock"}).json()
    assert sent["id"] in [c["id"] for c in listed]


async def test_commands_that_cannot_be_carried_out_are_refused_clearly(
    hub: HubProcess, database_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(
        gateway, devices=[("lock", "door_lock"), ("motion", "motion_sensor")]))
    missing = _post(hub, device_id="no-such-device", kind="unlock", actor="nurse-7")
    assert missing.status_code == 404
    assert "no-such-device" in missing.json()["detail"]
    wrong = _post(hub, device_id="motion", kind="unlock", actor="nurse-7")
    assert wrong.status_code == 422
    assert "motion_sensor" in wrong.json()["detail"]
    invalid = _post(hub, device_id="lock", kind="open_sesame", actor="nurse-7")
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["field"] == "body.kind"
    anonymous = _post(hub, device_id="lock", kind="unlock")
    assert anonymous.status_code == 422
    assert anonymous.json()["errors"][0]["field"] == "body.actor"


async def test_a_command_without_a_result_reads_as_expired(
    hub: HubProcess, database_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway, devices=[("lock", "door_lock")]))
    sent = _post(hub, device_id="lock", kind="lock", actor="nurse-7", ttl_s=5).json()
    assert sent["state"] == "sent"

    async def expired() -> bool:
        return bool(_get(hub, sent["id"])["state"] == "expired")

    await wait_until_async(expired, timeout=15, interval=0.5, what="expiry")


async def test_a_malformed_result_is_quarantined(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway))
    await publish(mqtt_url, f"telecare/v1/{gateway}/command-results",
                  [json.dumps({"command_id": "nope", "ok": "maybe"}).encode()])

    async def quarantined() -> list[dict[str, Any]]:
        rows = httpx.get(f"{hub.base_url}/api/v1/quarantine").json()
        return [r for r in rows if r["gateway_id"] == gateway
                and r["reason"] == "invalid_command_result"]

    await wait_until_async(quarantined, timeout=15, what="the bad result in quarantine")
