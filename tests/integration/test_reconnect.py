"""The broker goes away and comes back: the hub reconnects by itself and goes on."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from devices.events import envelope_json
from hub.embedded import EmbeddedBrokerThread
from tests.support import (
    HubProcess,
    free_port,
    home_registry,
    motion_events,
    publish,
    register,
    stop_quietly,
    stored_exactly,
    wait_until,
    wait_until_async,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_hub_reconnects_after_the_broker_restarts(
    data_dir: Path, database_url: str
) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway))
    broker = EmbeddedBrokerThread(port=port)
    broker.start()
    hub = HubProcess(
        data_dir=data_dir, database_url=database_url, mqtt_url=url,
        client_id="reconnect-hub",
        env={"TELECARE_INGEST__PROTOCOL": "3.1.1", "TELECARE_INGEST__RECONNECT_MAX_S": "1"},
    )
    try:
        hub.start()
        await publish(url, f"telecare/v1/{gateway}/events",
                      [envelope_json(motion_events(gateway, 10))])
        await wait_until_async(lambda: stored_exactly(database_url, gateway, 10), timeout=20)

        broker.stop()
        wait_until(lambda: _broker_state(hub) == "disconnected", timeout=20,
                   what="/health to report the broker down")
        broker = EmbeddedBrokerThread(port=port)
        broker.start()
        wait_until(lambda: _broker_state(hub) == "ok", timeout=30, what="reconnection")

        await publish(url, f"telecare/v1/{gateway}/events",
                      [envelope_json(motion_events(gateway, 10))])
        await wait_until_async(lambda: stored_exactly(database_url, gateway, 20), timeout=20)
        assert hub.metric("telecare_mqtt_reconnects_total") >= 1
    finally:
        stop_quietly(hub)
        broker.stop()


def _broker_state(hub: HubProcess) -> str:
    response = httpx.get(f"{hub.base_url}/health", timeout=2)
    state: str = response.json()["broker"]
    assert response.status_code == (200 if state == "ok" else 503)
    return state
