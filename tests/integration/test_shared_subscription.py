"""Two hub processes share the events through an MQTT shared subscription."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from devices.events import envelope_json
from tests.support import (
    REAL_MQTT_URL,
    HubProcess,
    home_registry,
    motion_events,
    publish,
    register,
    stop_quietly,
    stored_exactly,
    wait_until_async,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_two_hubs_on_a_shared_subscription_store_every_event_once(
    data_dir: Path, database_url: str, mqtt_url: str
) -> None:
    if mqtt_url != REAL_MQTT_URL:
        pytest.skip("the embedded amqtt broker has no shared subscriptions")
    group = f"hubs-{uuid.uuid4().hex[:6]}"
    hubs = [
        HubProcess(data_dir=data_dir, database_url=database_url, mqtt_url=mqtt_url,
                   client_id=f"{group}-{n}", env={"TELECARE_INGEST__SHARED_GROUP": group})
        for n in (1, 2)
    ]
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway))
    events = motion_events(gateway, 2_000)
    try:
        for hub in hubs:
            hub.start()
        await publish(mqtt_url, f"telecare/v1/{gateway}/events",
                      [envelope_json([e]) for e in events])
        await wait_until_async(lambda: stored_exactly(database_url, gateway, 2_000), timeout=60,
                               what="2,000 rows")
        shares = [hub.metric("telecare_events_ingested_total") for hub in hubs]
        assert sum(shares) == 2_000
        assert all(share > 0 for share in shares), shares
    finally:
        for hub in hubs:
            stop_quietly(hub)
