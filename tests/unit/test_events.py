"""The canonical device event: round trips for every kind, and rejections a person can act on."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.errors import InvalidEventError
from devices.events import (
    ALARM_RELEVANT_KINDS,
    EVENT_CLASSES,
    KINDS,
    MAX_EVENTS_PER_ENVELOPE,
    BatteryLevelPayload,
    BatteryPayload,
    ButtonPayload,
    CancelPayload,
    DeviceEvent,
    DosePayload,
    EmptyPayload,
    EventKind,
    FallPayload,
    HeartbeatPayload,
    LocationPayload,
    LockPayload,
    NurseCallPayload,
    Payload,
    RefillPayload,
    SmokePayload,
    SupervisionPayload,
    UnlockFailedPayload,
    VibrationPayload,
    envelope_json,
    is_identifier,
    make_event,
    parse_envelope,
    parse_event,
)
from devices.ids import uuid7

# No example database: unit tests leave nothing behind in the working tree.
ROUND_TRIP = settings(max_examples=40, deadline=None, database=None)
MIXED = settings(max_examples=200, deadline=None, database=None)
FUZZ = settings(max_examples=300, deadline=None, database=None)

# --- strategies, built from the table ----------------------------------------------------

identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)

utc_offsets = st.builds(
    timezone,
    st.timedeltas(
        min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
    ),
)
aware_datetimes = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=utc_offsets
)

uuid7s = st.integers(min_value=0, max_value=(1 << 48) - 1).map(
    lambda ms: uuid7(now_ns=ms * 1_000_000)
)


def _literal(model: type[Payload], name: str) -> st.SearchStrategy[str]:
    """Any value of a ``Literal[...]`` payload field, read from the model itself."""
    return st.sampled_from(get_args(model.model_fields[name].annotation))


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def _lock_fields(model: type[LockPayload]) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "source": _literal(model, "source"),
        "user_ref": _optional(st.text(max_size=64)),
        "command_id": _optional(uuid7s),
    }


voltages = _optional(st.floats(min_value=0.0, max_value=60.0))

PAYLOADS: dict[type[Payload], st.SearchStrategy[Payload]] = {
    EmptyPayload: st.builds(EmptyPayload),
    ButtonPayload: st.builds(ButtonPayload, button=_literal(ButtonPayload, "button")),
    CancelPayload: st.builds(CancelPayload, source=_literal(CancelPayload, "source")),
    DosePayload: st.builds(
        DosePayload,
        dose_id=st.text(min_size=1, max_size=64),
        scheduled_for=aware_datetimes,
    ),
    RefillPayload: st.builds(RefillPayload, doses_left=st.integers(0, 10_000)),
    LockPayload: st.builds(LockPayload, **_lock_fields(LockPayload)),
    UnlockFailedPayload: st.builds(
        UnlockFailedPayload,
        reason=st.text(min_size=1, max_size=120),
        **_lock_fields(UnlockFailedPayload),
    ),
    LocationPayload: st.builds(LocationPayload, room=_optional(st.text(max_size=40))),
    SmokePayload: st.builds(SmokePayload, test=st.booleans()),
    FallPayload: st.builds(
        FallPayload, confidence=_optional(st.floats(min_value=0.0, max_value=1.0))
    ),
    BatteryPayload: st.builds(
        BatteryPayload, level_percent=_optional(st.integers(0, 100)), voltage=voltages
    ),
    BatteryLevelPayload: st.builds(
        BatteryLevelPayload, level_percent=st.integers(0, 100), voltage=voltages
    ),
    SupervisionPayload: st.builds(SupervisionPayload, last_seen=_optional(aware_datetimes)),
    VibrationPayload: st.builds(
        VibrationPayload,
        action=_literal(VibrationPayload, "action"),
        strength=_optional(st.integers(0, 100_000)),
    ),
    NurseCallPayload: st.builds(
        NurseCallPayload,
        address=st.text(min_size=1, max_size=64),
        message=_optional(st.text(max_size=160)),
        call_type=_optional(st.text(max_size=16)),
        priority=_optional(st.integers(1, 9)),
        beep_code=_optional(st.text(max_size=16)),
    ),
    HeartbeatPayload: st.builds(
        HeartbeatPayload,
        uptime_s=_optional(st.integers(0, 2**63 - 1)),
        queue_depth=_optional(st.integers(0, 2**63 - 1)),
    ),
}


@st.composite
def event_data(draw: st.DrawFn, kind: EventKind) -> dict[str, Any]:
    """The fields of a valid event of ``kind``, as Python values (times in any offset)."""
    spec = KINDS[kind]
    return {
        "id": draw(uuid7s),
        "time": draw(aware_datetimes),
        "gateway_time": draw(_optional(aware_datetimes)),
        "gateway_id": draw(identifiers),
        "device_id": draw(identifiers),
        "device_type": draw(st.sampled_from(sorted(spec.device_types))),
        "kind": kind,
        "payload": draw(PAYLOADS[spec.payload]),
    }


def events_of(kind: EventKind) -> st.SearchStrategy[DeviceEvent]:
    return event_data(kind).map(EVENT_CLASSES[kind].model_validate)


any_event = st.sampled_from(sorted(KINDS)).flatmap(events_of)


def _assert_utc(value: datetime | None) -> None:
    if value is not None:
        assert value.tzinfo is UTC


# --- round trips ------------------------------------------------------------------------


def test_every_payload_model_in_the_table_has_a_strategy() -> None:
    assert {spec.payload for spec in KINDS.values()} <= set(PAYLOADS)


@pytest.mark.parametrize("kind", sorted(KINDS))
@ROUND_TRIP
@given(data=st.data())
def test_an_event_of_every_kind_survives_the_wire(kind: EventKind, data: st.DataObject) -> None:
    fields = data.draw(event_data(kind))
    event = EVENT_CLASSES[kind].model_validate(fields)

    (parsed,) = parse_envelope(envelope_json([event])).events

    assert parsed == event
    assert type(parsed) is EVENT_CLASSES[kind]
    assert parsed.time == fields["time"]
    assert parsed.gateway_time == fields["gateway_time"]
    _assert_utc(parsed.time)
    _assert_utc(parsed.gateway_time)
    for name in ("scheduled_for", "last_seen"):
        _assert_utc(getattr(parsed.payload, name, None))
    assert parsed.model_dump(mode="json") == event.model_dump(mode="json")
    assert parse_event(json.dumps(parsed.model_dump(mode="json"))) == parsed


@MIXED
@given(events=st.lists(any_event, min_size=1, max_size=8))
def test_an_envelope_of_mixed_kinds_survives_the_wire(events: list[DeviceEvent]) -> None:
    raw = envelope_json(events)
    parsed = parse_envelope(raw).events

    assert parsed == events
    assert envelope_json(parsed) == raw
    assert [e.model_dump(mode="json") for e in parsed] == [
        e.model_dump(mode="json") for e in events
    ]


def test_times_in_other_offsets_come_back_in_utc() -> None:
    oslo_summer = timezone(timedelta(hours=2))
    event = make_event(
        "motion", gateway_id="gw-1", device_id="pir-1", device_type="motion_sensor",
        time=datetime(2024, 6, 1, 12, 0, tzinfo=oslo_summer),
    )

    (parsed,) = parse_envelope(envelope_json([event])).events

    assert parsed.time == datetime(2024, 6, 1, 10, 0, tzinfo=UTC)
    assert parsed.time.tzinfo is UTC
    assert parsed.model_dump(mode="json")["time"] == "2024-06-01T10:00:00Z"


def test_alarm_relevant_kinds_include_the_alarm_triggers() -> None:
    assert {EventKind.BUTTON_PRESSED, EventKind.FALL, EventKind.SMOKE} <= ALARM_RELEVANT_KINDS
    assert EventKind.MOTION not in ALARM_RELEVANT_KINDS
    assert make_event(
        "fall", gateway_id="gw-1", device_id="fd-1", device_type="fall_detector"
    ).alarm_relevant


# --- rejections -------------------------------------------------------------------------


def _good() -> dict[str, Any]:
    event = make_event(
        "motion", gateway_id="gw-1", device_id="pir-1", device_type="motion_sensor",
        payload={"room": "stue"},
    )
    return event.model_dump(mode="json")


def _envelope(**overrides: Any) -> bytes:
    return json.dumps({"events": [{**_good(), **overrides}]}).encode()


def _rejected(raw: bytes | str) -> InvalidEventError:
    with pytest.raises(InvalidEventError) as caught:
        parse_envelope(raw)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "reason", "names"),
    [
        pytest.param(_envelope(kind="levitation"), "unknown_kind", ["'kind'", "levitation"],
                     id="unknown-kind"),
        pytest.param(_envelope(kind="button_pressed", payload={}), "invalid_event",
                     ["button_pressed.device_type", "safety_alarm"], id="wrong-device-type"),
        pytest.param(_envelope(time="2024-06-01T12:00:00"), "invalid_event",
                     ["motion.time", "timezone"], id="naive-time"),
        pytest.param(_envelope(gateway_time="2024-06-01T12:00:00"), "invalid_event",
                     ["motion.gateway_time"], id="naive-gateway-time"),
        pytest.param(_envelope(id=str(uuid.uuid4())), "invalid_event",
                     ["motion.id", "version 7"], id="uuid-v4"),
        pytest.param(_envelope(colour="red"), "invalid_event",
                     ["motion.colour", "Extra inputs"], id="extra-event-field"),
        pytest.param(_envelope(payload={"room": "stue", "colour": "red"}), "invalid_event",
                     ["motion.payload.colour", "Extra inputs"], id="extra-payload-field"),
        pytest.param(json.dumps({"events": [_good()], "colour": "red"}).encode(),
                     "invalid_event", ["colour", "Extra inputs"], id="extra-envelope-field"),
        pytest.param(b'{"events":[]}', "envelope_size", ["events", "at least 1"],
                     id="zero-events"),
        pytest.param(json.dumps({"events": [_good()] * (MAX_EVENTS_PER_ENVELOPE + 1)}).encode(),
                     "envelope_size", ["events", "at most 500"], id="501-events"),
        pytest.param(b"not json {", "invalid_json", ["(top level)", "Invalid JSON"],
                     id="not-json"),
        pytest.param(b"", "invalid_json", ["(top level)", "Invalid JSON"], id="empty"),
        pytest.param(b"[1, 2]", "invalid_event", ["(top level)", "object"], id="json-array"),
        pytest.param(b'"events"', "invalid_event", ["(top level)", "object"], id="json-string"),
    ],
)
def test_a_bad_envelope_is_refused_with_its_reason_and_field(
    raw: bytes, reason: str, names: list[str]
) -> None:
    error = _rejected(raw)

    assert error.reason == reason
    for name in names:
        assert name in str(error)


@pytest.mark.parametrize("field", ["gateway_id", "device_id"])
@pytest.mark.parametrize("bad", ["gw/1", "gw+1", "gw#1", "gw 1", ""])
def test_an_identifier_unfit_for_a_topic_is_refused(field: str, bad: str) -> None:
    error = _rejected(_envelope(**{field: bad}))

    assert error.reason == "invalid_event"
    assert f"motion.{field}" in str(error)
    assert not is_identifier(bad)


def test_an_envelope_of_500_events_is_accepted() -> None:
    assert len(parse_envelope(json.dumps({"events": [_good()] * 500})).events) == 500


def test_the_error_names_the_index_of_the_bad_event() -> None:
    good = _good()
    raw = json.dumps({"events": [good, {**good, "device_id": "a/b"}]})

    assert "events.1.motion.device_id" in str(_rejected(raw))


def test_parse_event_refuses_a_payload_field_of_the_wrong_type() -> None:
    event = make_event("refill_needed", gateway_id="gw-1", device_id="md-1",
                       device_type="medicine_dispenser", payload={"doses_left": 3})
    data = {**event.model_dump(mode="json"), "payload": {"doses_left": "lots"}}

    with pytest.raises(InvalidEventError, match=r"refill_needed\.payload\.doses_left") as caught:
        parse_event(data)
    assert caught.value.reason == "invalid_event"


@pytest.mark.parametrize("good", ["gw-1", "A", "a.b:c_d-e", "x" * 64])
def test_is_identifier_accepts_topic_safe_ids(good: str) -> None:
    assert is_identifier(good)


@pytest.mark.parametrize("bad", ["-gw", "x" * 65, "gw/1", "gw+1", "gw#1", "gw 1", ""])
def test_is_identifier_refuses_ids_unfit_for_a_topic(bad: str) -> None:
    assert not is_identifier(bad)


def test_is_identifier_refuses_a_trailing_newline() -> None:
    assert not is_identifier("gw-1\n")


@pytest.mark.parametrize("when", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_time_that_overflows_in_utc_is_an_invalid_event(when: str) -> None:
    error = _rejected(_envelope(time=when))

    assert error.reason == "invalid_event"
    assert "motion.time" in str(error)


# --- fuzzing ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def mangled_envelopes(draw: st.DrawFn) -> bytes:
    """A real envelope with one field of one event replaced by any JSON value."""
    events = [e.model_dump(mode="json") for e in draw(st.lists(any_event, min_size=1, max_size=3))]
    target = draw(st.sampled_from(events))
    target[draw(st.sampled_from([*target, "payload_extra"]))] = draw(json_values)
    return json.dumps({"events": events}).encode()


@FUZZ
@given(
    raw=st.binary(max_size=512)
    | json_values.map(lambda v: json.dumps(v).encode())
    | mangled_envelopes()
)
def test_any_bytes_either_parse_or_raise_invalid_event_error(raw: bytes) -> None:
    try:
        envelope = parse_envelope(raw)
    except InvalidEventError as exc:
        error: InvalidEventError | None = exc
    else:
        error = None
        assert 1 <= len(envelope.events) <= MAX_EVENTS_PER_ENVELOPE
    if error is not None:
        assert error.reason in {"invalid_json", "envelope_size", "unknown_kind", "invalid_event"}
        assert str(error)
