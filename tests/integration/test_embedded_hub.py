"""The hub on its embedded defaults: no TELECARE_DATABASE_URL, no TELECARE_MQTT_URL.

This path runs in every CI run, whether or not the real services are there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from devices.events import envelope_json, make_event
from tests.support import (
    ROOT,
    HubProcess,
    free_port,
    home_registry,
    motion_events,
    publish,
    stop_quietly,
    wait_until_async,
)

pytestmark = [pytest.mark.integration, pytest.mark.embedded, pytest.mark.slow]


async def test_embedded_hub_imports_ingests_raises_an_alarm_and_keeps_data_over_restart(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    mqtt_port = free_port()
    env = {"TELECARE_EMBEDDED_MQTT_PORT": str(mqtt_port)}
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(
        yaml.safe_dump(home_registry("gw-emb", devices=[("pendant", "safety_alarm")]))
    )
    hub = HubProcess(data_dir=data_dir, database_url=None, mqtt_url=None,
                     client_id="embedded-hub", env=env)

    # The operator's entry point: `telecare admin import` on the embedded database.
    imported = subprocess.run(
        [sys.executable, "-m", "hub", "admin", "import", str(registry_file)],
        env=hub.env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert "1 gateways, 1 devices" in imported.stdout

    mqtt_url = f"mqtt://127.0.0.1:{mqtt_port}"
    try:
        hub.start()
        press = make_event("button_pressed", gateway_id="gw-emb", device_id="pendant",
                           device_type="safety_alarm")
        payloads = [envelope_json(motion_events("gw-emb", 100)), envelope_json([press])]
        await publish(mqtt_url, "telecare/v1/gw-emb/events", payloads)
        alarm = await wait_until_async(
            lambda: _first_open_alarm(hub), timeout=30, what="the alarm"
        )
        assert alarm["priority"] == "critical"
        assert alarm["trigger_event_id"] == str(press.id)
        await wait_until_async(
            lambda: _ingested(hub, 101), timeout=30, what="101 events ingested"
        )

        hub.stop()
        hub.start()  # the same data directory: the alarm is still there
        again = await _first_open_alarm(hub)
        assert again["id"] == alarm["id"]
        assert httpx.get(f"{hub.base_url}/health").json()["database"] == "ok"
    finally:
        stop_quietly(hub)


async def _first_open_alarm(hub: HubProcess) -> dict[str, object]:
    alarms = httpx.get(f"{hub.base_url}/api/v1/alarms", params={"open": "true"}).json()
    return dict(alarms[0]) if alarms else {}


async def _ingested(hub: HubProcess, count: int) -> bool:
    return hub.metric("telecare_events_ingested_total") == count
