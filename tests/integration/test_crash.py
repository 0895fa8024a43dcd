"""The hub killed with SIGKILL in the middle of a burst, then restarted.

Every event the broker acknowledged to the publisher must end up stored exactly once:
the ones the hub had committed stay, the ones it had received but not acknowledged are
redelivered by the broker (persistent session, manual PUBACK after COMMIT), and the ones
published while it was down are queued for it.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.conftest import drop_database, fresh_database
from tests.support import (
    HubProcess,
    count_rows,
    envelopes,
    events_stored,
    home_registry,
    motion_events,
    publish,
    register,
    stop_quietly,
    wait_until_async,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = 200
EVENTS_PER_MESSAGE = 50


@pytest.mark.parametrize(
    ("server", "broker"),
    [
        ("pg_admin_url", "mqtt_url"),
        ("embedded_pg_admin_url", "mqtt_url"),
        ("embedded_pg_admin_url", "embedded_mqtt_url"),
    ],
    ids=["configured", "embedded-postgres", "embedded-services"],
)
async def test_sigkill_mid_burst_loses_nothing_and_stores_nothing_twice(
    data_dir: Path, server: str, broker: str, request: pytest.FixtureRequest
) -> None:
    """Run on the configured services, and on the embedded PostgreSQL and broker.

    The embedded broker runs in the test process here (as a separate service from the
    hub), so the kill takes the hub and not the broker, as with a real Mosquitto.
    """
    admin_url: str = request.getfixturevalue(server)
    mqtt_url: str = request.getfixturevalue(broker)
    database_url = await fresh_database(admin_url)
    try:
        await _sigkill_mid_burst(data_dir, database_url, mqtt_url)
    finally:
        await drop_database(admin_url, database_url)


async def _sigkill_mid_burst(data_dir: Path, database_url: str, mqtt_url: str) -> None:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    await register(database_url, home_registry(gateway))
    events = motion_events(gateway, MESSAGES * EVENTS_PER_MESSAGE)
    payloads = envelopes(events, EVENTS_PER_MESSAGE)
    hub = HubProcess(
        data_dir=data_dir, database_url=database_url, mqtt_url=mqtt_url,
        client_id=f"crash-hub-{uuid.uuid4().hex[:8]}",
        # A wide batch window keeps received-but-uncommitted messages in the hub at
        # any moment, so the kill always catches some in flight.
        env={"TELECARE_INGEST__BATCH_WINDOW_MS": "300"},
    ).start()
    try:
        publisher = asyncio.create_task(_publish_slowly(mqtt_url, gateway, payloads))
        at_kill = await wait_until_async(
            lambda: _rows_between(database_url, gateway, 1, len(events) // 2),
            timeout=30, interval=0.02, what="the burst to be part-way",
        )
        hub.kill(signal.SIGKILL)
        await asyncio.sleep(1.0)  # the burst goes on while the hub is down
        hub.start()
        acknowledged = await asyncio.wait_for(publisher, timeout=60)
        assert acknowledged == MESSAGES  # the broker took every message

        await wait_until_async(
            lambda: _rows_between(database_url, gateway, len(events), len(events)),
            timeout=60, what="every event stored",
        )
        stored = await _stored_ids(database_url, gateway)
        assert stored == {e.id for e in events}
        assert await count_rows(
            database_url, "SELECT count(*) FROM events WHERE gateway_id = %s", gateway
        ) == len(events)
        assert 0 < at_kill < len(events)
        # After the restart the hub took over from where the killed one stopped:
        # it received at least every message whose events were not yet committed.
        received = hub.metric("telecare_mqtt_messages_received_total")
        assert received >= (len(events) - at_kill) / EVENTS_PER_MESSAGE
    finally:
        stop_quietly(hub)


async def _publish_slowly(url: str, gateway: str, payloads: list[bytes]) -> int:
    """About 60 messages a second, so the burst lasts a few seconds."""
    sent = 0
    for start in range(0, len(payloads), 6):
        sent += await publish(url, f"telecare/v1/{gateway}/events", payloads[start:start + 6])
        await asyncio.sleep(0.1)
    return sent


async def _rows_between(database_url: str, gateway: str, low: int, high: int) -> int:
    found = await events_stored(database_url, gateway)
    assert found <= MESSAGES * EVENTS_PER_MESSAGE
    return found if low <= found <= high else 0


async def _stored_ids(database_url: str, gateway: str) -> set[uuid.UUID]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT id FROM events WHERE gateway_id = %s", (gateway,))
        return {row[0] for row in await cur.fetchall()}
