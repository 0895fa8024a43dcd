"""Ingest.parse: one MQTT message in, what it asks to be written out. No broker, no database."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from devices.events import DeviceEvent, envelope_json, make_event
from devices.gateway import GatewayStatus
from hub.ingest import Inbound, Ingest
from hub.metrics import HubMetrics
from hub.settings import IngestSettings, MqttEndpoint
from hub.store.writer import StatusUpdate

GW = "gw-oslo-17"
EVENTS_TOPIC = f"telecare/v1/{GW}/events"
STATUS_TOPIC = f"telecare/v1/{GW}/status"


def _ingest(settings: IngestSettings | None = None) -> Ingest:
    return Ingest(
        endpoint=MqttEndpoint.from_url("mqtt://127.0.0.1:1"),
        settings=settings or IngestSettings(),
        pool=None,  # type: ignore[arg-type]  # parse never touches the database
        metrics=HubMetrics(),
    )


def _parse(
    topic: str, payload: bytes, *, ingest: Ingest | None = None, retain: bool = False
) -> Inbound:
    return (ingest or _ingest()).parse(topic, payload, mid=42, qos=1, generation=3)


def _motion(gateway_id: str = GW, device_id: str = "pir-1") -> DeviceEvent:
    return make_event(
        "motion", gateway_id=gateway_id, device_id=device_id, device_type="motion_sensor",
        payload={"room": "stue"},
    )


def _button(gateway_id: str = GW) -> DeviceEvent:
    return make_event(
        "button_pressed", gateway_id=gateway_id, device_id="pendant-1",
        device_type="safety_alarm",
    )


def _kept(inbound: Inbound) -> list[DeviceEvent]:
    return [event for event, _ in inbound.events]


# --- events ---------------------------------------------------------------------------


def test_a_good_envelope_gives_its_events() -> None:
    events = [_motion(device_id="pir-1"), _motion(device_id="pir-2")]
    before = datetime.now(UTC)

    inbound = _parse(EVENTS_TOPIC, envelope_json(events))

    assert _kept(inbound) == events
    assert inbound.quarantine == []
    assert inbound.statuses == []
    assert (inbound.mid, inbound.qos, inbound.generation) == (42, 1, 3)
    assert all(received.tzinfo is not None and received >= before for _, received in inbound.events)


def test_telemetry_alone_is_not_urgent() -> None:
    assert not _parse(EVENTS_TOPIC, envelope_json([_motion(), _motion()])).urgent


def test_an_alarm_relevant_event_makes_the_message_urgent() -> None:
    inbound = _parse(EVENTS_TOPIC, envelope_json([_motion(), _button(), _motion()]))

    assert inbound.urgent
    assert len(inbound.events) == 3


def test_events_of_another_gateway_are_quarantined_and_the_rest_kept() -> None:
    own, stranger, alarm = _motion(), _motion(gateway_id="gw-bergen-2"), _button()

    inbound = _parse(EVENTS_TOPIC, envelope_json([own, stranger, alarm]))

    assert _kept(inbound) == [own, alarm]
    (record,) = inbound.quarantine
    assert record.reason == "gateway_mismatch"
    assert "gw-bergen-2" in record.detail
    assert GW in record.detail
    assert str(stranger.id) in record.detail
    assert record.gateway_id == GW
    assert record.topic == EVENTS_TOPIC
    assert json.loads(record.payload)["id"] == str(stranger.id)


def test_a_mismatched_alarm_event_does_not_make_the_message_urgent() -> None:
    inbound = _parse(EVENTS_TOPIC, envelope_json([_motion(), _button(gateway_id="gw-other")]))

    assert not inbound.urgent
    assert [r.reason for r in inbound.quarantine] == ["gateway_mismatch"]


def test_one_unknown_kind_among_three_is_quarantined_alone() -> None:
    good = [_motion(device_id="pir-1"), _button()]
    odd = {**_motion(device_id="pir-2").model_dump(mode="json"), "kind": "levitation"}
    body = json.loads(envelope_json(good))
    body["events"].insert(1, odd)

    inbound = _parse(EVENTS_TOPIC, json.dumps(body).encode())

    assert _kept(inbound) == good
    assert inbound.urgent
    (record,) = inbound.quarantine
    assert record.reason == "unknown_kind"
    assert record.detail.startswith("events.1:")
    assert json.loads(record.payload)["kind"] == "levitation"
    assert record.gateway_id == GW


def test_invalid_json_is_quarantined_truncated_with_its_full_size() -> None:
    ingest = _ingest(IngestSettings(quarantine_raw_max_bytes=256))
    raw = b"{not json " + b"x" * 1000

    inbound = _parse(EVENTS_TOPIC, raw, ingest=ingest)

    assert inbound.events == []
    (record,) = inbound.quarantine
    assert record.reason == "invalid_json"
    assert record.payload == raw[:256]
    assert record.payload_size == len(raw)
    assert record.gateway_id == GW


def test_an_oversized_envelope_is_quarantined_whole() -> None:
    raw = envelope_json([_motion()] * 501)

    inbound = _parse(EVENTS_TOPIC, raw)

    assert inbound.events == []
    assert [r.reason for r in inbound.quarantine] == ["envelope_size"]
    assert inbound.quarantine[0].payload_size == len(raw)


@pytest.mark.parametrize(
    "topic",
    [
        f"telecare/v1/{GW}/other",
        f"telecare/v2/{GW}/events",
        "telecare/v1/bad gw/events",
        "telecare/v1/events",
        f"telecare/v1/{GW}/events/extra",
        f"other/v1/{GW}/events",
    ],
)
def test_a_topic_of_the_wrong_shape_is_quarantined(topic: str) -> None:
    inbound = _parse(topic, envelope_json([_motion()]))

    assert inbound.events == []
    assert inbound.statuses == []
    (record,) = inbound.quarantine
    assert record.reason == "bad_topic"
    assert record.topic == topic
    assert record.gateway_id is None


@pytest.mark.parametrize(
    "raw", [b"[1, 2]", b'"events"', b'{"colour": "red"}', b'{"events": 5}'], ids=str
)
def test_json_that_is_not_an_envelope_is_quarantined_not_raised(raw: bytes) -> None:
    inbound = _parse(EVENTS_TOPIC, raw)

    assert inbound.events == []
    assert [r.reason for r in inbound.quarantine] == ["invalid_event"]


# --- status ---------------------------------------------------------------------------


def test_a_status_message_gives_a_status_update() -> None:
    raw = b'{"state":"online","time":"2024-06-01T12:00:00+02:00","version":"1.4","queue_depth":3}'

    inbound = _parse(STATUS_TOPIC, raw, retain=True)

    (update,) = inbound.statuses
    assert update == StatusUpdate(
        GW,
        GatewayStatus(
            state="online", time=datetime(2024, 6, 1, 10, tzinfo=UTC), version="1.4",
            queue_depth=3,
        ),
    )
    assert inbound.events == []
    assert inbound.quarantine == []
    assert not inbound.urgent


def test_a_last_will_without_time_is_a_status() -> None:
    (update,) = _parse(STATUS_TOPIC, b'{"state":"offline"}').statuses

    assert update.status.state == "offline"
    assert update.status.time is None


@pytest.mark.parametrize("raw", [b"{online", b'{"state":"sleeping"}', b"[]"])
def test_a_bad_status_is_quarantined(raw: bytes) -> None:
    inbound = _parse(STATUS_TOPIC, raw)

    assert inbound.statuses == []
    (record,) = inbound.quarantine
    assert record.reason == "invalid_status"
    assert record.gateway_id == GW
    assert record.payload == raw


def test_an_empty_retained_status_gives_nothing_at_all() -> None:
    inbound = _parse(STATUS_TOPIC, b"", retain=True)

    assert inbound.events == []
    assert inbound.quarantine == []
    assert inbound.statuses == []
    assert not inbound.urgent
