"""The hub process against the real broker and database: counts, duplicates, quarantine,
the pendant press, gateway status, and the alarm actions over the API."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from devices.events import envelope_json, make_event
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
    stored_exactly,
    wait_until_async,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def hub(data_dir: Path, database_url: str, mqtt_url: str) -> Iterator[HubProcess]:
    process = HubProcess(
        data_dir=data_dir,
        database_url=database_url,
        mqtt_url=mqtt_url,
        client_id=f"test-hub-{uuid.uuid4().hex[:8]}",
    ).start()
    try:
        yield process
    finally:
        stop_quietly(process)


def _gateway() -> str:
    return f"gw-{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
async def test_ten_thousand_events_make_ten_thousand_rows_and_again_no_more(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = _gateway()
    await register(database_url, home_registry(gateway))
    events = motion_events(gateway, 10_000)
    singles = [envelope_json([e]) for e in events[:5_000]]
    batched = envelopes(events[5_000:], 250)
    topic = f"telecare/v1/{gateway}/events"

    assert await publish(mqtt_url, topic, singles + batched) == 5_000 + 20
    await wait_until_async(
        lambda: stored_exactly(database_url, gateway, 10_000), timeout=60, what="10,000 rows"
    )
    assert await count_rows(
        database_url, "SELECT count(DISTINCT id) FROM events WHERE gateway_id = %s", gateway
    ) == 10_000

    # The same 10,000 again: redelivered duplicates are counted, never stored twice.
    await publish(mqtt_url, topic, singles + batched)
    await wait_until_async(
        lambda: _metric_at_least(hub, "telecare_events_duplicate_total", 10_000),
        timeout=60, what="10,000 duplicates counted",
    )
    assert await events_stored(database_url, gateway) == 10_000
    assert hub.metric("telecare_events_ingested_total") == 10_000


async def _metric_at_least(hub: HubProcess, name: str, value: float) -> bool:
    return hub.metric(name) >= value


async def test_malformed_messages_are_quarantined_and_the_good_ones_stored(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway, other = _gateway(), _gateway()
    await register(database_url, home_registry(gateway))
    good = motion_events(gateway, 30)
    half_bad = json.loads(envelope_json(good[20:23]))
    half_bad["events"][1]["kind"] = "teleport"
    payloads = [
        *envelopes(good[:10], 5),
        b"{not json",
        b'{"events": []}',
        json.dumps(half_bad).encode(),
        envelope_json(motion_events(other, 2)),  # someone else's events on this topic
        *envelopes(good[10:20], 5),
    ]
    await publish(mqtt_url, f"telecare/v1/{gateway}/events", payloads)
    await publish(mqtt_url, f"telecare/v1/{other}/events", [envelope_json(motion_events(other, 1))])

    await wait_until_async(
        lambda: stored_exactly(database_url, gateway, 22), timeout=30, what="22 rows"
    )
    expected = {
        "invalid_json": 1, "envelope_size": 1, "unknown_kind": 1,
        "gateway_mismatch": 2, "unregistered_gateway": 1,
    }
    await wait_until_async(
        lambda: _has_quarantine(database_url, (gateway, other), expected), timeout=30,
        what=f"quarantine {expected}",
    )
    listed = httpx.get(f"{hub.base_url}/api/v1/quarantine").json()
    assert {q["reason"] for q in listed if q["gateway_id"] in (gateway, other)} == set(expected)
    assert await events_stored(database_url, gateway) == 22


async def _has_quarantine(
    database_url: str, gateways: tuple[str, ...], expected: dict[str, int]
) -> bool:
    found = await _quarantine_reasons(database_url, gateways)
    assert all(found.get(reason, 0) <= n for reason, n in expected.items()), found
    return found == expected


async def _quarantine_reasons(database_url: str, gateways: tuple[str, ...]) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT reason, count(*) FROM quarantine WHERE gateway_id = ANY(%s) GROUP BY reason",
            (list(gateways),),
        )
        return dict(await cur.fetchall())


async def test_a_pendant_press_raises_a_critical_alarm_seen_through_the_api(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = _gateway()
    await register(database_url, home_registry(gateway, devices=[("pendant", "safety_alarm")]))
    # A press inside a stream of telemetry: it must not wait for the batch.
    background = motion_events(gateway, 50)
    press = make_event("button_pressed", gateway_id=gateway, device_id="pendant",
                       device_type="safety_alarm")
    await publish(mqtt_url, f"telecare/v1/{gateway}/events",
                  [*envelopes(background, 10), envelope_json([press])])

    alarms = await wait_until_async(
        lambda: _open_alarms(hub), timeout=20, what="an alarm in the API"
    )
    assert len(alarms) == 1
    alarm = alarms[0]
    assert alarm["priority"] == "critical"
    assert alarm["state"] == "raised"
    assert alarm["resident_id"] == f"res-{gateway}"
    assert alarm["trigger_event_id"] == str(press.id)

    # A second press joins the open alarm instead of paging again.
    again = make_event("button_pressed", gateway_id=gateway, device_id="pendant",
                       device_type="safety_alarm")
    await publish(mqtt_url, f"telecare/v1/{gateway}/events", [envelope_json([again])])
    detail = await wait_until_async(
        lambda: _detail_with_triggers(hub, alarm["id"], 2), timeout=20, what="2 triggers"
    )
    assert detail["trigger_count"] == 2
    assert len(await _open_alarms(hub)) == 1
    assert hub.metric("telecare_alarms_raised_total") == 1


async def _open_alarms(hub: HubProcess) -> list[dict[str, object]]:
    response = httpx.get(f"{hub.base_url}/api/v1/alarms", params={"open": "true"})
    response.raise_for_status()
    result: list[dict[str, object]] = response.json()
    return result


async def _detail_with_triggers(hub: HubProcess, alarm_id: object, n: int) -> dict[str, object]:
    detail: dict[str, object] = httpx.get(f"{hub.base_url}/api/v1/alarms/{alarm_id}").json()
    triggers = detail["triggers"]
    assert isinstance(triggers, list)
    return detail if len(triggers) == n else {}


async def test_alarm_actions_follow_the_state_machine_and_record_who_and_when(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = _gateway()
    await register(database_url, home_registry(gateway, devices=[("pendant", "safety_alarm")]))
    press = make_event("button_pressed", gateway_id=gateway, device_id="pendant",
                       device_type="safety_alarm")
    await publish(mqtt_url, f"telecare/v1/{gateway}/events", [envelope_json([press])])
    alarm_id = (await wait_until_async(lambda: _open_alarms(hub), timeout=20))[0]["id"]
    url = f"{hub.base_url}/api/v1/alarms/{alarm_id}"

    def act(action: str, **body: object) -> httpx.Response:
        return httpx.post(f"{url}/{action}", json=body)

    assert act("presence", actor="nurse-7").status_code == 409  # not yet taken
    assert act("resolve", actor="nurse-7", cause="fall").status_code == 409
    assert act("acknowledge", actor="nurse-7").json()["state"] == "acknowledged"
    assert act("acknowledge", actor="nurse-8").status_code == 409  # already taken
    assert act("presence", actor="nurse-7").json()["state"] == "on_site"
    assert act("cancel", actor="nurse-7").status_code == 409  # too late to call it false
    invalid = act("resolve", actor="nurse-7")  # no cause code
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["field"] == "body.cause"
    done = act("resolve", actor="nurse-7", cause="assistance", note="hjalp opp i stolen").json()
    assert done["state"] == "resolved"
    assert done["cause_code"] == "assistance"
    assert done["acknowledged_by"] == "nurse-7"
    assert [(t["to_state"], t["actor"]) for t in done["transitions"]] == [
        ("raised", "system"), ("acknowledged", "nurse-7"), ("on_site", "nurse-7"),
        ("resolved", "nurse-7"),
    ]
    assert httpx.get(f"{hub.base_url}/api/v1/alarms/{uuid.uuid4()}").status_code == 404
    assert httpx.get(f"{hub.base_url}/api/v1/alarms/not-a-uuid").status_code == 422


async def test_gateway_status_and_last_will_update_the_gateway(
    hub: HubProcess, database_url: str, mqtt_url: str
) -> None:
    gateway = _gateway()
    await register(database_url, home_registry(gateway))
    topic = f"telecare/v1/{gateway}/status"
    online = {"state": "online", "time": "2026-01-01T10:00:00Z", "version": "1.2.3",
              "queue_depth": 4}
    await publish(mqtt_url, topic, [json.dumps(online).encode()], retain=True)
    try:
        status = await wait_until_async(
            lambda: _gateway_status(hub, gateway, "online"), timeout=20, what="online"
        )
        assert status["version"] == "1.2.3"
        assert status["queue_depth"] == 4
        # An older status (a stale retained message) does not overwrite a newer one.
        older = {**online, "state": "offline", "time": "2026-01-01T09:00:00Z"}
        await publish(mqtt_url, topic, [json.dumps(older).encode()])
        # A last will carries no time of its own: it counts as now.
        await publish(mqtt_url, topic, [b'{"state": "offline"}'])
        await wait_until_async(
            lambda: _gateway_status(hub, gateway, "offline"), timeout=20, what="offline"
        )
    finally:
        await publish(mqtt_url, topic, [b""], retain=True)  # clear the retained message


async def _gateway_status(hub: HubProcess, gateway: str, state: str) -> dict[str, object]:
    for row in httpx.get(f"{hub.base_url}/api/v1/gateways").json():
        if row["id"] == gateway and row["status"] == state:
            return dict(row)
    return {}


async def test_health_and_metrics(hub: HubProcess) -> None:
    health = httpx.get(f"{hub.base_url}/health").json()
    assert health == {"status": "ok", "database": "ok", "broker": "ok"}
    text = httpx.get(f"{hub.base_url}/metrics").text
    for name in ("telecare_events_ingested_total", "telecare_events_duplicate_total",
                 "telecare_ingest_lag_seconds_bucket", "telecare_ingest_batch_events_bucket"):
        assert name in text
    page = httpx.get(f"{hub.base_url}/")
    assert page.status_code == 200
    assert '<html lang="nb">' in page.text
    assert "Åpne alarmer" in page.text
    spec = httpx.get(f"{hub.base_url}/api/v1/openapi.json").json()
    assert "/api/v1/alarms/{alarm_id}/acknowledge" in spec["paths"]
