"""What the bench sends and stores: telemetry events, envelopes, probes, pendant presses,
the registry of bench gateways and residents, and rows for the COPY baseline."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb

from devices.events import parse_envelope
from devices.ids import uuid7
from hub.bench.plan import ENVELOPE_EVENTS, GATEWAYS

# Telemetry kinds that no alarm rule acts on, so they wait for the batch window.
_TELEMETRY = (
    ("motion", "motion_sensor", "motion", '{"room":"living_room"}'),
    ("bed", "bed_sensor", "bed_entered", "{}"),
    ("door", "door_sensor", "battery_level", '{"level_percent":87,"voltage":2.95}'),
    ("door", "door_sensor", "closed", '{"room":"front_door"}'),
    ("gw", "gateway", "heartbeat", '{"uptime_s":86400,"queue_depth":0}'),
)
_DISTRICT = "bench-district"
_ALARM_GATEWAY = "bench-gw-alarm"
_PROBE_GATEWAY = "bench-gw-probe"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def telemetry_json(index: int, gateway: str, time_iso: str) -> str:
    """One telemetry event as the edge sends it (about 300 bytes)."""
    slug, device_type, kind, payload = _TELEMETRY[index % len(_TELEMETRY)]
    return (
        f'{{"id":"{uuid7()}","time":"{time_iso}","gateway_time":"{time_iso}",'
        f'"gateway_id":"{gateway}","device_id":"{gateway}.{slug}-{index % 4}",'
        f'"device_type":"{device_type}","kind":"{kind}","payload":{payload}}}'
    )


def _envelope(events: Iterable[str]) -> bytes:
    return ('{"events":[' + ",".join(events) + "]}").encode()


def _topic(gateway: str) -> str:
    return f"telecare/v1/{gateway}/events"


def _gateway(index: int) -> str:
    return f"bench-gw-{index % GATEWAYS:03d}"


def single_messages(count: int) -> list[tuple[str, bytes]]:
    """``count`` single-event messages, round robin over the bench gateways."""
    out: list[tuple[str, bytes]] = []
    time_iso = _now_iso()
    for i in range(count):
        if i % 1000 == 0:
            time_iso = _now_iso()
        gateway = _gateway(i)
        out.append((_topic(gateway), _envelope([telemetry_json(i, gateway, time_iso)])))
    return out


def envelope_messages(events: int) -> list[tuple[str, bytes]]:
    """Envelopes of ``ENVELOPE_EVENTS`` events, each from one gateway."""
    out: list[tuple[str, bytes]] = []
    for n in range(math.ceil(events / ENVELOPE_EVENTS)):
        gateway = _gateway(n)
        time_iso = _now_iso()
        size = min(ENVELOPE_EVENTS, events - n * ENVELOPE_EVENTS)
        out.append(
            (_topic(gateway), _envelope(telemetry_json(i, gateway, time_iso) for i in range(size)))
        )
    return out


def _check_payloads() -> None:
    """The generated events must be valid, or the bench measures quarantine."""
    for topic, payload in single_messages(len(_TELEMETRY)) + envelope_messages(3):
        gateway = topic.split("/")[2]
        for event in parse_envelope(payload).events:
            if event.alarm_relevant or event.gateway_id != gateway:
                raise AssertionError(f"bench payload unfit: {event.kind}")
    press, _ = _press(0)
    if not parse_envelope(press).events[0].alarm_relevant:
        raise AssertionError("bench pendant press is not alarm relevant")


def _press(index: int) -> tuple[bytes, UUID]:
    event_id = uuid7()
    body = (
        f'{{"id":"{event_id}","time":"{_now_iso()}","gateway_id":"{_ALARM_GATEWAY}",'
        f'"device_id":"bench-pendant-{index:04d}","device_type":"safety_alarm",'
        f'"kind":"button_pressed","payload":{{"button":"pendant"}}}}'
    )
    return _envelope([body]), event_id


def _probe_event() -> tuple[bytes, UUID]:
    event_id = uuid7()
    body = (
        f'{{"id":"{event_id}","time":"{_now_iso()}","gateway_id":"{_PROBE_GATEWAY}",'
        f'"device_id":"{_PROBE_GATEWAY}.motion-0","device_type":"motion_sensor",'
        f'"kind":"motion","payload":{{"room":"hall"}}}}'
    )
    return _envelope([body]), event_id


def registry(alarm_devices: int) -> dict[str, list[dict[str, Any]]]:
    """Gateways for the load, one probe gateway, and a care home of pendants."""
    sites = [
        {"id": f"bench-site-{i:03d}", "district_id": _DISTRICT, "kind": "home",
         "name": f"Bench home {i}"}
        for i in range(GATEWAYS)
    ]  # fmt: skip
    sites.append(
        {"id": "bench-care-home", "district_id": _DISTRICT, "kind": "care_home",
         "name": "Bench care home"}
    )  # fmt: skip
    gateways = [{"id": _gateway(i), "site_id": f"bench-site-{i:03d}"} for i in range(GATEWAYS)]
    gateways += [
        {"id": _PROBE_GATEWAY, "site_id": "bench-site-000"},
        {"id": _ALARM_GATEWAY, "site_id": "bench-care-home"},
    ]
    residents = [
        {"id": f"bench-res-{i:04d}", "site_id": "bench-care-home", "display_name": f"R{i}"}
        for i in range(alarm_devices)
    ]
    devices = [
        {"id": f"bench-pendant-{i:04d}", "gateway_id": _ALARM_GATEWAY,
         "device_type": "safety_alarm", "resident_id": f"bench-res-{i:04d}"}
        for i in range(alarm_devices)
    ]  # fmt: skip
    return {
        "districts": [{"id": _DISTRICT, "name": "Bench"}],
        "sites": sites,
        "residents": residents,
        "gateways": gateways,
        "devices": devices,
    }


def _copy_rows(count: int) -> list[tuple[object, ...]]:
    now = datetime.now(UTC)
    rows: list[tuple[object, ...]] = []
    for i in range(count):
        slug, device_type, kind, payload = _TELEMETRY[i % len(_TELEMETRY)]
        gateway = _gateway(i)
        rows.append(
            (uuid7(), now, now, now, gateway, f"{gateway}.{slug}-{i % 4}", device_type, kind,
             Jsonb(payload, dumps=_identity))
        )  # fmt: skip
    return rows


def _identity(text: str) -> str:
    return text
