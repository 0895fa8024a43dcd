"""Zigbee2MQTT codec and translator: topics, payloads, fixtures, state changes, locks."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.errors import TelecareError
from devices.events import DeviceEvent, DeviceType
from devices.zigbee2mqtt import (
    MAX_PAYLOAD_BYTES,
    AvailabilityMessage,
    DeviceBinding,
    DeviceState,
    IgnoredMessage,
    LockAction,
    StateMessage,
    Zigbee2MqttError,
    Zigbee2MqttTranslator,
    availability_payload,
    friendly_name_problem,
    lock_command,
    parse_message,
    parse_set,
    state_payload,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zigbee2mqtt"
NOW = datetime(2025, 2, 3, 9, 30, tzinfo=UTC)
MODEL = settings(max_examples=200, deadline=None, database=None)
FUZZ = settings(max_examples=200, deadline=None, database=None)

Summary = tuple[str, str, dict[str, Any]]


def summary(event: DeviceEvent) -> Summary:
    return event.device_id, str(event.kind), event.payload.model_dump()


def lock(source: str, user: str | None = None) -> dict[str, Any]:
    return {"source": source, "user_ref": user, "command_id": None}


def battery(level: int | None, volts: float | None = None) -> dict[str, Any]:
    return {"level_percent": level, "voltage": volts}


def translator(bindings: dict[str, DeviceBinding], **kwargs: Any) -> Zigbee2MqttTranslator:
    return Zigbee2MqttTranslator("gw-1", bindings, **kwargs)


def replay(tr: Zigbee2MqttTranslator, fixture: str) -> list[DeviceEvent]:
    events = []
    for line in (FIXTURES / fixture).read_text().splitlines():
        message = json.loads(line)
        events += tr.handle(message["topic"], message["payload"].encode(), NOW)
    return events


# --- topics and payloads ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("zigbee2mqtt/a/b/door", b'{"contact":true}', StateMessage),
        ("zigbee2mqtt/a/b/door/availability", b"online", AvailabilityMessage),
        ("zigbee2mqtt/bridge/state", b'{"state":"online"}', IgnoredMessage),
        ("zigbee2mqtt/a/lock/set", b'{"state":"LOCK"}', IgnoredMessage),
        ("zigbee2mqtt/a/lock/get", b'{"state":""}', IgnoredMessage),
        ("zigbee2mqtt/a/lock/set/state", b"LOCK", IgnoredMessage),
        ("zigbee2mqtt/a/button/action", b"single", IgnoredMessage),
        ("zigbee2mqtt/a/door", b"", IgnoredMessage),
    ],
)
def test_topics_are_classified_by_their_last_suffix(
    topic: str, payload: bytes, expected: type
) -> None:
    assert isinstance(parse_message(topic, payload), expected)


def test_state_keeps_slashed_names_and_unknown_fields() -> None:
    message = parse_message("zigbee2mqtt/kitchen/motion", b'{"occupancy":true,"illuminance":23}')
    assert isinstance(message, StateMessage)
    assert message.friendly_name == "kitchen/motion"
    assert message.state.occupancy is True
    assert message.state.model_extra == {"illuminance": 23}


@pytest.mark.parametrize(
    ("payload", "online", "legacy"),
    [
        (b'{"state":"online"}', True, False),
        (b'{"state":"offline"}', False, False),
        (b"online", True, True),
        (b"offline\n", False, True),
    ],
)
def test_availability_in_both_formats(payload: bytes, online: bool, legacy: bool) -> None:
    message = parse_message("zigbee2mqtt/hall/door/availability", payload)
    assert message == AvailabilityMessage("hall/door", online=online, legacy=legacy)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("zigbee2mqtt/door", b"{not json", "invalid_json"),
        ("zigbee2mqtt/door", b"[1, 2]", "not_object"),
        ("zigbee2mqtt/door", b'"open"', "not_object"),
        ("zigbee2mqtt/door", b'{"contact": "true"}', "invalid_field"),
        ("zigbee2mqtt/door", b'{"battery": true}', "invalid_field"),
        ("zigbee2mqtt/door", b'{"action_user": 1.5}', "invalid_field"),
        ("zigbee2mqtt/door", b'{"last_seen": "2024-04-08T21:21:36"}', "invalid_field"),
        ("zigbee2mqtt/door", b'{"last_seen": "yesterday"}', "invalid_field"),
        ("zigbee2mqtt/door", b'{"battery": NaN}', "invalid_json"),
        ("zigbee2mqtt/door", b"\xff\xfe{}", "invalid_utf8"),
        ("zigbee2mqtt/door", b"[" * 100_000, "payload_too_large"),
        ("zigbee2mqtt/door", b"[" * 60_000, "invalid_json"),
        ("zigbee2mqtt/door/availability", b"maybe", "invalid_availability"),
        ("zigbee2mqtt/door/availability", b'{"state":"up"}', "invalid_availability"),
        ("home/door", b"{}", "foreign_topic"),
        ("zigbee2mqtt/", b"{}", "invalid_topic"),
        ("zigbee2mqtt/door/", b"{}", "invalid_topic"),
        ("zigbee2mqtt/lamp/2", b"{}", "invalid_topic"),
    ],
)
def test_malformed_input_raises_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Zigbee2MqttError) as caught:
        parse_message(topic, payload)
    assert caught.value.reason == reason
    assert isinstance(caught.value, TelecareError)
    assert str(caught.value)


def test_last_seen_as_iso_or_epoch_milliseconds() -> None:
    expected = datetime(2024, 4, 8, 21, 21, 36, 794000, tzinfo=UTC)
    for raw in ('"2024-04-08T21:21:36.794Z"', '"2024-04-08T23:21:36.794+02:00"', "1712611296794"):
        state = DeviceState.model_validate_json(f'{{"last_seen": {raw}}}')
        assert state.last_seen == expected


PARSE_REASONS = {
    None,
    *("foreign_topic", "invalid_topic", "payload_too_large", "invalid_utf8", "invalid_json"),
    *("not_object", "invalid_field", "invalid_availability"),
}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
known_fields = st.sampled_from(sorted(DeviceState.model_fields))
objects = st.dictionaries(known_fields | st.text(max_size=8), json_values, max_size=6)
any_payload = st.binary(max_size=200) | objects.map(lambda o: json.dumps(o).encode())
any_topic = st.sampled_from(["zigbee2mqtt/x", "zigbee2mqtt/x/availability"]) | st.text().map(
    lambda t: "zigbee2mqtt/" + t
)


@FUZZ
@given(topic=any_topic, payload=any_payload)
def test_garbage_raises_nothing_but_our_error(topic: str, payload: bytes) -> None:
    try:
        parse_message(topic, payload)
        reason = None
    except Zigbee2MqttError as exc:
        reason = exc.reason
    assert reason in PARSE_REASONS


@settings(max_examples=150, deadline=None, database=None)
@given(
    kind=st.sampled_from(sorted(set(DeviceType) - {DeviceType.GATEWAY})),
    payloads=st.lists(st.tuples(st.booleans(), any_payload), max_size=5),
)
def test_translator_survives_garbage_from_any_device_type(
    kind: DeviceType, payloads: list[tuple[bool, bytes]]
) -> None:
    tr = translator({"x": DeviceBinding("dev-1", kind)})
    for availability, payload in payloads:
        topic = "zigbee2mqtt/x/availability" if availability else "zigbee2mqtt/x"
        try:
            events = tr.handle(topic, payload, NOW)
        except Zigbee2MqttError:
            continue
        assert all(event.device_id == "dev-1" for event in events)
    assert tr.tick(NOW + timedelta(hours=1)) == [] or kind is DeviceType.DOOR_LOCK


# --- encoding round trips -----------------------------------------------------------------

typed_fields = st.fixed_dictionaries(
    {},
    optional={
        "contact": st.booleans(),
        "battery": st.integers(0, 100) | st.floats(0, 100),
        "voltage": st.integers(0, 3300),
        "action": st.text(max_size=20),
        "action_user": st.integers(0, 65535),
        "lock_state": st.sampled_from(["locked", "unlocked", "not_fully_locked"]),
        "last_seen": st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)),
    },
)
extras = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in DeviceState.model_fields),
    json_values.filter(lambda v: v is not None),
    max_size=4,
)


@MODEL
@given(fields=typed_fields, extra=extras)
def test_state_payload_round_trips(fields: dict[str, Any], extra: dict[str, Any]) -> None:
    message = parse_message("zigbee2mqtt/a/b", state_payload({**fields, **extra}))
    assert isinstance(message, StateMessage)
    assert message.state.model_dump(exclude_none=True) == {**fields, **extra}


@given(online=st.booleans(), legacy=st.booleans())
def test_availability_payload_round_trips(online: bool, legacy: bool) -> None:
    message = parse_message("zigbee2mqtt/a/availability", availability_payload(online, legacy))
    assert message == AvailabilityMessage("a", online=online, legacy=legacy)


def test_state_payload_refuses_what_is_not_json() -> None:
    with pytest.raises(Zigbee2MqttError) as caught:
        state_payload({"battery": float("nan")})
    assert caught.value.reason == "not_encodable"


# --- commands -------------------------------------------------------------------------------

friendly_names = st.from_regex(r"[a-z][a-z0-9_ ]{0,10}(/[a-z][a-z0-9_]{0,10}){0,2}", fullmatch=True)


def test_lock_command_topic_and_payload() -> None:
    assert lock_command("flat12/front_lock", "unlock") == (
        "zigbee2mqtt/flat12/front_lock/set",
        b'{"state":"UNLOCK"}',
    )
    assert lock_command("door", "lock", base_topic="z2m") == ("z2m/door/set", b'{"state":"LOCK"}')


@given(name=friendly_names.filter(lambda n: friendly_name_problem(n) is None), unlock=st.booleans())
def test_lock_command_round_trips_through_parse_set(name: str, unlock: bool) -> None:
    action: LockAction = "unlock" if unlock else "lock"
    request = parse_set(*lock_command(name, action))
    assert (request.friendly_name, request.lock_action) == (name, action)


def test_parse_set_reads_attribute_topics_and_any_case() -> None:
    assert parse_set("zigbee2mqtt/a/set/state", b"LOCK").lock_action == "lock"
    assert parse_set("zigbee2mqtt/a/set", b'{"state":"unlock"}').lock_action == "unlock"
    assert parse_set("zigbee2mqtt/a/set", b'{"sound_volume":"low"}').lock_action is None


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: lock_command("front+lock", "lock"), "invalid_friendly_name"),
        (lambda: lock_command("front/lock/set", "lock"), "invalid_friendly_name"),
        (lambda: lock_command("flat/set/lock", "lock"), "invalid_friendly_name"),
        (lambda: lock_command("door", "open"), "invalid_command"),  # type: ignore[arg-type]
        (lambda: parse_set("zigbee2mqtt/a", b"{}"), "not_a_command"),
        (lambda: parse_set("zigbee2mqtt/a/get", b"{}"), "not_a_command"),
        (lambda: parse_set("zigbee2mqtt/a/set", b"[]"), "not_object"),
    ],
)
def test_bad_commands_are_refused(call: Any, reason: str) -> None:
    with pytest.raises(Zigbee2MqttError) as caught:
        call()
    assert caught.value.reason == reason


# --- fixtures -------------------------------------------------------------------------------


def test_fixture_aqara_contact() -> None:
    tr = translator({"flat12/front_door": DeviceBinding("door-12", DeviceType.DOOR_SENSOR, "hall")})
    events = replay(tr, "aqara_mccgq11lm_contact.jsonl")
    hall = {"room": "hall"}
    assert [summary(e) for e in events] == [
        ("door-12", "closed", hall),
        ("door-12", "battery_level", battery(100, 3.035)),
        ("door-12", "opened", hall),
        ("door-12", "closed", hall),
        ("door-12", "device_offline", {"last_seen": datetime(2024, 4, 8, 21, 41, 55, 902000, UTC)}),
        ("door-12", "device_online", {"last_seen": datetime(2024, 4, 8, 21, 41, 55, 902000, UTC)}),
    ]
    assert events[2].time == datetime(2024, 4, 8, 21, 25, 10, 21000, tzinfo=UTC)
    assert all(e.gateway_time == NOW for e in events)
    assert events[4].time == NOW


def test_fixture_aqara_motion_with_legacy_availability() -> None:
    binding = DeviceBinding("motion-12", DeviceType.MOTION_SENSOR, "kitchen")
    events = replay(
        translator({"flat12/kitchen/motion": binding}), "aqara_rtcgq11lm_occupancy.jsonl"
    )
    kitchen = {"room": "kitchen"}
    assert [summary(e) for e in events] == [
        ("motion-12", "motion", kitchen),
        ("motion-12", "battery_level", battery(100, 3.015)),
        ("motion-12", "motion", kitchen),
        ("motion-12", "device_offline", {"last_seen": None}),
    ]


def test_fixture_heiman_smoke_with_test_button() -> None:
    tr = translator({"flat12/hall/smoke": DeviceBinding("smoke-12", DeviceType.SMOKE_DETECTOR)})
    assert [summary(e) for e in replay(tr, "heiman_hs1sa_smoke.jsonl")] == [
        ("smoke-12", "battery_level", battery(92)),
        ("smoke-12", "smoke", {"test": True}),
        ("smoke-12", "smoke", {"test": False}),
        ("smoke-12", "battery_level", battery(91)),
    ]


def test_fixture_aqara_water_leak() -> None:
    binding = DeviceBinding("leak-12", DeviceType.WATER_LEAK_SENSOR)
    events = replay(
        translator({"flat12/bathroom/leak": binding}), "aqara_sjcgq11lm_water_leak.jsonl"
    )
    assert [summary(e) for e in events] == [
        ("leak-12", "battery_level", battery(100, 3.005)),
        ("leak-12", "water_leak", {}),
        ("leak-12", "battery_low", battery(9, 2.735)),
        ("leak-12", "battery_level", battery(9, 2.735)),
    ]


def test_fixture_aqara_vibration() -> None:
    binding = DeviceBinding("bed-12", DeviceType.FALL_DETECTOR)
    tr = translator({"flat12/bedroom/bed_vibration": binding})
    assert [summary(e) for e in replay(tr, "aqara_djt11lm_vibration.jsonl")] == [
        ("bed-12", "battery_level", battery(100, 3.025)),
        ("bed-12", "vibration", {"action": "vibration", "strength": None}),
        ("bed-12", "vibration", {"action": "drop", "strength": 21}),
        ("bed-12", "vibration", {"action": "tilt", "strength": 21}),
    ]
    assert tr.counters["ignored_mirror"] == 1


def test_fixture_id_lock_150() -> None:
    tr = translator({"flat12/front_lock": DeviceBinding("lock-12", DeviceType.DOOR_LOCK)})
    events = replay(tr, "datek_0402946_id_lock_150.jsonl")
    assert [summary(e) for e in events] == [
        ("lock-12", "battery_level", battery(88)),
        ("lock-12", "unlocked", lock("keypad", "3")),
        ("lock-12", "unlock_failed", {**lock("rf_tag"), "reason": "invalid_pin_or_id"}),
        ("lock-12", "locked", lock("manual")),
        ("lock-12", "battery_level", battery(87)),
        ("lock-12", "unlocked", lock("unknown")),
    ]
    assert events[1].time == datetime(2025, 2, 3, 8, 2, 47, 105000, tzinfo=UTC)
    assert tr.tick(NOW + timedelta(seconds=29)) == []
    jammed = tr.tick(NOW + timedelta(seconds=30))
    assert [summary(e) for e in jammed] == [("lock-12", "jammed", {})]
    assert tr.tick(NOW + timedelta(minutes=5)) == []


def test_fixture_kwikset_capture() -> None:
    tr = translator({"0x002446fffd038aa7": DeviceBinding("lock-3", DeviceType.DOOR_LOCK)})
    events = replay(tr, "kwikset_convert_capture.jsonl")
    assert [summary(e) for e in events] == [
        ("lock-3", "unlocked", lock("manual")),
        ("lock-3", "battery_level", battery(70, 5.0)),
    ]
    assert events[0].time == datetime(2025, 8, 7, 22, 10, 54, tzinfo=UTC)


def test_fixture_yale_jams() -> None:
    tr = translator(
        {
            "flat14/front_lock": DeviceBinding("lock-14", DeviceType.DOOR_LOCK),
            "flat15/front_lock": DeviceBinding("lock-15", DeviceType.DOOR_LOCK),
        }
    )
    assert [summary(e) for e in replay(tr, "yale_jammed.jsonl")] == [
        ("lock-14", "battery_level", battery(64)),
        ("lock-14", "jammed", {}),
        ("lock-14", "unlocked", lock("keypad")),
        ("lock-15", "battery_level", battery(80)),
        ("lock-15", "jammed", {}),
    ]
    assert tr.tick(NOW + timedelta(hours=1)) == []  # already reported, not twice


def test_fixture_fall_detectors() -> None:
    tr = translator(
        {
            "flat12/bathroom/fall": DeviceBinding("fall-1", DeviceType.FALL_DETECTOR),
            "flat12/bedroom/radar": DeviceBinding("fall-2", DeviceType.FALL_DETECTOR),
        }
    )
    events = replay(tr, "fall_detectors.jsonl")
    assert [summary(e) for e in events] == [
        ("fall-1", "fall", {"confidence": None}),
        ("fall-2", "fall", {"confidence": None}),
    ]


def test_fixture_bridge_topics_are_ignored() -> None:
    tr = translator({"flat12/old_name": DeviceBinding("door-1", DeviceType.DOOR_SENSOR)})
    assert replay(tr, "bridge.jsonl") == []
    assert tr.counters == {"ignored_bridge": 2, "ignored_command": 3, "ignored_cleared": 1}


# --- translator behaviour -------------------------------------------------------------------


def test_unknown_devices_are_counted_not_parsed() -> None:
    tr = translator({})
    assert tr.handle("zigbee2mqtt/neighbour/door", b"garbage", NOW) == []
    assert tr.counters["unknown_device"] == 1


def test_a_parse_error_is_counted_raised_and_the_next_message_still_decoded() -> None:
    tr = translator({"door": DeviceBinding("door-1", DeviceType.DOOR_SENSOR)})
    with pytest.raises(Zigbee2MqttError):
        tr.handle("zigbee2mqtt/door", b'{"contact": "open"}', NOW)
    assert tr.counters["invalid_field"] == 1
    assert [e.kind for e in tr.handle("zigbee2mqtt/door", b'{"contact":false}', NOW)] == ["opened"]


def test_first_alarm_state_after_start_is_reported() -> None:
    tr = translator({"s": DeviceBinding("smoke-1", DeviceType.SMOKE_DETECTOR)})
    kinds = [e.kind for e in tr.handle("zigbee2mqtt/s", b'{"smoke":true,"battery_low":true}', NOW)]
    assert kinds == ["smoke", "battery_low"]
    assert tr.handle("zigbee2mqtt/s", b'{"smoke":true,"battery_low":true}', NOW) == []


def test_battery_is_rounded_clamped_and_voltage_converted() -> None:
    tr = translator({"d": DeviceBinding("door-1", DeviceType.DOOR_SENSOR)})
    first = tr.handle("zigbee2mqtt/d", b'{"battery":45.6,"voltage":2985}', NOW)
    assert [summary(e) for e in first] == [("door-1", "battery_level", battery(46, 2.985))]
    assert tr.handle("zigbee2mqtt/d", b'{"battery":46.2}', NOW) == []
    clamped = tr.handle("zigbee2mqtt/d", b'{"battery":180,"voltage":3.1}', NOW)
    assert [summary(e) for e in clamped] == [("door-1", "battery_level", battery(100, 3.1))]


def test_epoch_last_seen_sets_the_event_time() -> None:
    tr = translator({"d": DeviceBinding("door-1", DeviceType.DOOR_SENSOR)})
    (event,) = tr.handle("zigbee2mqtt/d", b'{"contact":false,"last_seen":1712611296794}', NOW)
    assert event.time == datetime(2024, 4, 8, 21, 21, 36, 794000, tzinfo=UTC)
    assert event.gateway_time == NOW


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"action": "rfid_unlock_x", "action_source_name": "rfid"}, []),
        (
            {"action": "unlock", "action_source_name": "rfid", "action_user": 7},
            [lock("rf_tag", "7")],
        ),
        ({"action": "unlock", "action_source_name": "rf"}, [lock("remote")]),
        (
            {"action": "unlock", "action_source_name": "fingerprint", "action_user": 1},
            [lock("unknown", "1")],
        ),
        ({"action": "key_unlock", "action_source_name": "keypad"}, [lock("manual")]),
        ({"action": "schedule_unlock"}, [lock("auto")]),
    ],
)
def test_unlock_sources(fields: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    tr = translator({"l": DeviceBinding("lock-1", DeviceType.DOOR_LOCK)})
    events = tr.handle("zigbee2mqtt/l", state_payload(fields), NOW)
    assert [e.payload.model_dump() for e in events] == expected


def test_lock_failure_is_counted_not_turned_into_an_event() -> None:
    tr = translator({"l": DeviceBinding("lock-1", DeviceType.DOOR_LOCK)})
    payload = b'{"action":"lock_failure_invalid_pin_or_id","action_source_name":"keypad"}'
    assert tr.handle("zigbee2mqtt/l", payload, NOW) == []
    assert tr.counters["unmapped_action"] == 1


def test_a_brief_not_fully_locked_is_not_a_jam() -> None:
    tr = translator({"l": DeviceBinding("lock-1", DeviceType.DOOR_LOCK)})
    tr.handle("zigbee2mqtt/l", b'{"lock_state":"unlocked"}', NOW)
    tr.handle("zigbee2mqtt/l", b'{"lock_state":"not_fully_locked"}', NOW)
    later = NOW + timedelta(seconds=4)
    assert [e.kind for e in tr.handle("zigbee2mqtt/l", b'{"lock_state":"locked"}', later)] == [
        "locked"
    ]
    assert tr.tick(NOW + timedelta(hours=1)) == []


def test_a_persisting_jam_is_reported_once_per_episode_even_without_tick() -> None:
    tr = translator(
        {"l": DeviceBinding("lock-1", DeviceType.DOOR_LOCK)}, jam_after=timedelta(days=10)
    )
    stuck = b'{"lock_state":"not_fully_locked"}'
    assert tr.handle("zigbee2mqtt/l", stuck, NOW) == []
    (jam,) = tr.handle("zigbee2mqtt/l", stuck, NOW + timedelta(days=10))
    assert (jam.kind, jam.time) == ("jammed", NOW)
    assert tr.handle("zigbee2mqtt/l", stuck, NOW + timedelta(days=11)) == []
    tr.handle("zigbee2mqtt/l", b'{"lock_state":"locked"}', NOW + timedelta(days=12))
    tr.handle("zigbee2mqtt/l", stuck, NOW + timedelta(days=13))
    assert [e.kind for e in tr.tick(NOW + timedelta(days=23))] == ["jammed"]


def test_a_locks_door_sensor() -> None:
    tr = translator({"l": DeviceBinding("lock-1", DeviceType.DOOR_LOCK, "hall")})
    events = tr.handle("zigbee2mqtt/l", b'{"door_state":"open","lock_state":"unlocked"}', NOW)
    assert [summary(e) for e in events] == [("lock-1", "opened", {"room": "hall"})]


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="identifier"):
        DeviceBinding("has space", DeviceType.DOOR_SENSOR)
    with pytest.raises(ValueError, match="gateway"):
        DeviceBinding("gw", DeviceType.GATEWAY)
    with pytest.raises(ValueError, match="friendly name"):
        translator({"bridge": DeviceBinding("d", DeviceType.DOOR_SENSOR)})
    with pytest.raises(ValueError, match="timezone"):
        translator({}).handle("zigbee2mqtt/x", b"{}", datetime(2025, 1, 1))


def test_oversized_payload_is_refused_before_reading() -> None:
    tr = translator({"d": DeviceBinding("door-1", DeviceType.DOOR_SENSOR)})
    with pytest.raises(Zigbee2MqttError):
        tr.handle("zigbee2mqtt/d", b" " * (MAX_PAYLOAD_BYTES + 1), NOW)
    assert tr.counters["payload_too_large"] == 1


# --- random sequences of state changes against an independent model -------------------------

BINDINGS = {
    "flat1/door": DeviceBinding("door", DeviceType.DOOR_SENSOR, "hall"),
    "flat1/kitchen/motion": DeviceBinding("motion", DeviceType.MOTION_SENSOR, "kitchen"),
    "flat1/smoke": DeviceBinding("smoke", DeviceType.SMOKE_DETECTOR),
    "flat1/leak": DeviceBinding("leak", DeviceType.WATER_LEAK_SENSOR),
    "flat1/bed": DeviceBinding("bed", DeviceType.FALL_DETECTOR),
    "flat1/lock": DeviceBinding("lock", DeviceType.DOOR_LOCK),
}
COMMON: dict[str, st.SearchStrategy[Any]] = {
    "battery": st.integers(0, 100),
    "battery_low": st.booleans(),
    "tamper": st.booleans(),
}
CACHED: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "flat1/door": {"contact": st.booleans()},
    "flat1/kitchen/motion": {"occupancy": st.booleans()},
    "flat1/smoke": {"smoke": st.booleans(), "test": st.booleans()},
    "flat1/leak": {"water_leak": st.booleans()},
    "flat1/bed": {"strength": st.integers(0, 500)},
    "flat1/lock": {"lock_state": st.sampled_from(["locked", "unlocked"])},
}
LOCK_ACTIONS = {
    "lock": ("locked", None),
    "unlock": ("unlocked", None),
    "auto_lock": ("locked", "auto"),
    "manual_unlock": ("unlocked", "manual"),
    "keypad_unlock": ("unlocked", "keypad"),
}
SOURCES = {"keypad": "keypad", "rfid": "rf_tag", "rf": "remote", "manual": "manual"}
ACTIONS = {
    "flat1/bed": st.fixed_dictionaries({"action": st.sampled_from(["vibration", "tilt", "drop"])}),
    "flat1/lock": st.fixed_dictionaries(
        {
            "action": st.sampled_from(
                [*LOCK_ACTIONS, "unlock_failure_invalid_pin_or_id", "lock_failure_invalid_schedule"]
            )
        },
        optional={
            "action_source_name": st.sampled_from(sorted(SOURCES)),
            "action_user": st.sampled_from([0, 3, 17, 65535]),
        },
    ),
}


def _state_step(name: str) -> st.SearchStrategy[tuple[Any, ...]]:
    updates = st.fixed_dictionaries({}, optional={**CACHED[name], **COMMON})
    action = st.none() | ACTIONS[name] if name in ACTIONS else st.none()
    return st.tuples(st.just("state"), st.just(name), updates, action)


steps = st.lists(
    st.sampled_from(sorted(BINDINGS)).flatmap(_state_step)
    | st.tuples(
        st.just("availability"), st.sampled_from(sorted(BINDINGS)), st.booleans(), st.booleans()
    ),
    max_size=40,
)


class Model:
    """What the translator should emit, written from the rules, not from the code."""

    def __init__(self) -> None:
        self.last: dict[str, dict[str, Any]] = defaultdict(dict)
        self.online: dict[str, bool] = {}
        self.position: dict[str, str] = {}

    def availability(self, name: str, online: bool) -> list[Summary]:
        before = self.online.get(name)
        self.online[name] = online
        device = BINDINGS[name].device_id
        if online and before is False:
            return [(device, "device_online", {"last_seen": None})]
        if not online and before is not False:
            return [(device, "device_offline", {"last_seen": None})]
        return []

    def state(self, name: str, msg: dict[str, Any]) -> list[Summary]:
        last, device = self.last[name], BINDINGS[name].device_id
        room = {"room": BINDINGS[name].room}
        out: list[tuple[str, dict[str, Any]]] = []

        def became(key: str) -> bool:
            return msg.get(key) is True and last.get(key) is not True

        if "contact" in msg and msg["contact"] != last.get("contact"):
            out.append(("closed" if msg["contact"] else "opened", room))
        if msg.get("occupancy") is True:
            out.append(("motion", room))
        if msg.get("action") in ("vibration", "tilt", "drop"):
            out.append(("vibration", {"action": msg["action"], "strength": msg.get("strength")}))
        if name == "flat1/lock":
            out += self._lock(name, msg)
        if became("smoke"):
            out.append(("smoke", {"test": msg.get("test", False)}))
        if became("water_leak"):
            out.append(("water_leak", {}))
        if became("tamper"):
            out.append(("tamper", {}))
        if became("battery_low"):
            out.append(("battery_low", battery(msg.get("battery"))))
        if "battery" in msg and msg["battery"] != last.get("battery"):
            out.append(("battery_level", battery(msg["battery"])))
        last.update({k: v for k, v in msg.items() if not k.startswith("action")})
        return [(device, kind, payload) for kind, payload in out]

    def _lock(self, name: str, msg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        action = msg.get("action", "")
        source = SOURCES.get(msg.get("action_source_name", ""), "unknown")
        user = msg.get("action_user")
        user_ref = None if user in (None, 65535) else str(user)
        if action in LOCK_ACTIONS:
            position, forced = LOCK_ACTIONS[action]
            self.position[name] = position
            return [(position, lock(forced or source, user_ref))]
        out = []
        if action == "unlock_failure_invalid_pin_or_id":
            out.append(("unlock_failed", {**lock(source, user_ref), "reason": "invalid_pin_or_id"}))
        if "lock_state" in msg:
            before = self.position.get(name)
            self.position[name] = msg["lock_state"]
            if before is not None and before != msg["lock_state"]:
                out.append((msg["lock_state"], lock("unknown")))
        return out


@MODEL
@given(steps=steps)
def test_random_state_changes_give_exactly_the_expected_events(
    steps: list[tuple[Any, ...]],
) -> None:
    tr, model = translator(BINDINGS), Model()
    published: dict[str, dict[str, Any]] = defaultdict(dict)
    got: list[Summary] = []
    expected: list[Summary] = []
    for step in steps:
        if step[0] == "availability":
            _, name, online, legacy = step
            topic, payload = (
                f"zigbee2mqtt/{name}/availability",
                availability_payload(online, legacy),
            )
            expected += model.availability(name, online)
        else:
            _, name, updates, action = step
            published[name].update(updates)  # the bridge caches state, never the action
            message = {**published[name], **(action or {})}
            topic, payload = f"zigbee2mqtt/{name}", state_payload(message)
            expected += model.state(name, message)
        got += [summary(event) for event in tr.handle(topic, payload, NOW)]
    assert got == expected


def test_a_bed_sensor_reports_entering_and_leaving_the_bed_on_changes_only() -> None:
    tr = translator({"flat12/bed": DeviceBinding("bed-12", DeviceType.BED_SENSOR)})
    topic = "zigbee2mqtt/flat12/bed"
    reports = [{"occupancy": True}, {"occupancy": True, "battery": 80}, {"occupancy": False},
               {"occupancy": False}, {"occupancy": True}]
    kinds = [e.kind for r in reports for e in tr.handle(topic, state_payload(r), NOW)]
    assert kinds == ["bed_entered", "battery_level", "bed_exited", "bed_entered"]
    # A mat that reports as a contact: pressed (contact true) is in bed.
    mat = translator({"flat12/mat": DeviceBinding("mat-12", DeviceType.BED_SENSOR)})
    pressed = mat.handle("zigbee2mqtt/flat12/mat", state_payload({"contact": True}), NOW)
    released = mat.handle("zigbee2mqtt/flat12/mat", state_payload({"contact": False}), NOW)
    assert [e.kind for e in pressed + released] == ["bed_entered", "bed_exited"]
