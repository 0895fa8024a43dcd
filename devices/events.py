"""The canonical device event, its per-kind payloads, and the MQTT envelope.

Every event that crosses from an edge gateway to the hub is a ``DeviceEvent``. The set
of kinds is a table (``KINDS``): each row names the payload model and the device types
that may send that kind. Adding a kind adds a row, not a code path. The concrete event
classes are built from the table, and an incoming event is validated against the class
its ``kind`` selects (a pydantic discriminated union, validated in Rust), so a typo in
a kind, a payload field of the wrong type or a kind sent by the wrong device type is
rejected with a message that says which field is wrong and what was expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    UUID7,
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    create_model,
)

from devices.errors import InvalidEventError
from devices.ids import uuid7

MAX_EVENTS_PER_ENVELOPE = 500
"""ARCHITECTURE.md: an envelope carries 1 to 500 events."""

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
"""Gateway and device ids: they appear in MQTT topics, so no '/', '+', '#' or spaces."""

_IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN)

Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time is out of range once converted to UTC") from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware timestamp, normalised to UTC. Naive timestamps are refused."""


def is_identifier(value: str) -> bool:
    """True if ``value`` is a valid gateway or device id."""
    return _IDENTIFIER_RE.fullmatch(value) is not None


class DeviceType(StrEnum):
    SAFETY_ALARM = "safety_alarm"
    MEDICINE_DISPENSER = "medicine_dispenser"
    DOOR_LOCK = "door_lock"
    DOOR_SENSOR = "door_sensor"
    MOTION_SENSOR = "motion_sensor"
    BED_SENSOR = "bed_sensor"
    SMOKE_DETECTOR = "smoke_detector"
    FALL_DETECTOR = "fall_detector"
    WATER_LEAK_SENSOR = "water_leak_sensor"
    NURSE_CALL = "nurse_call"
    """A care home's nurse-call system (an ESPA 4.4.4 central or one of its call points)."""
    GATEWAY = "gateway"


class EventKind(StrEnum):
    BUTTON_PRESSED = "button_pressed"
    ALARM_CANCELLED = "alarm_cancelled"
    TEST_ALARM = "test_alarm"
    DOSE_DUE = "dose_due"
    DOSE_TAKEN = "dose_taken"
    DOSE_MISSED = "dose_missed"
    REFILL_NEEDED = "refill_needed"
    EMPTY = "empty"
    UNLOCKED = "unlocked"
    LOCKED = "locked"
    UNLOCK_FAILED = "unlock_failed"
    JAMMED = "jammed"
    MOTION = "motion"
    OPENED = "opened"
    CLOSED = "closed"
    BED_ENTERED = "bed_entered"
    BED_EXITED = "bed_exited"
    SMOKE = "smoke"
    FALL = "fall"
    VIBRATION = "vibration"
    NURSE_CALL = "nurse_call"
    NURSE_CALL_CLEARED = "nurse_call_cleared"
    WATER_LEAK = "water_leak"
    BATTERY_LOW = "battery_low"
    BATTERY_LEVEL = "battery_level"
    POWER_LOST = "power_lost"
    POWER_RESTORED = "power_restored"
    TAMPER = "tamper"
    DEVICE_OFFLINE = "device_offline"
    DEVICE_ONLINE = "device_online"
    HEARTBEAT = "heartbeat"


# --- payloads -------------------------------------------------------------------------


class Payload(BaseModel):
    """Base of every payload: frozen, and unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class EmptyPayload(Payload):
    """A kind that carries nothing beyond who and when."""


class ButtonPayload(Payload):
    button: Literal["pendant", "wrist", "base_unit", "pull_cord"] = "pendant"


class CancelPayload(Payload):
    source: Literal["pendant", "base_unit"] = "pendant"


class DosePayload(Payload):
    dose_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    scheduled_for: UtcDatetime


class RefillPayload(Payload):
    doses_left: int = Field(ge=0, le=10_000)


class LockPayload(Payload):
    source: Literal["keypad", "rf_tag", "app", "remote", "manual", "auto", "unknown"] = "unknown"
    user_ref: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None,
        description="The lock's own user slot or staff key id; never a person's name.",
    )
    command_id: UUID7 | None = Field(
        default=None, description="Set when the hub's command caused this event."
    )


class UnlockFailedPayload(LockPayload):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=120)] = "unknown"


class LocationPayload(Payload):
    room: Annotated[str, StringConstraints(max_length=40)] | None = None


class SmokePayload(Payload):
    test: bool = False


class FallPayload(Payload):
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)


class VibrationPayload(Payload):
    action: Literal["vibration", "tilt", "drop"] = "vibration"
    strength: int | None = Field(default=None, ge=0, le=100_000)


class NurseCallPayload(Payload):
    """A call from a nurse-call system (ESPA 4.4.4 records 1, 2, 3, 4 and 6)."""

    address: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="The call point's address in the nurse-call system (room, bed)."
    )
    message: Annotated[str, StringConstraints(max_length=160)] | None = None
    call_type: Annotated[str, StringConstraints(max_length=16)] | None = None
    priority: int | None = Field(default=None, ge=1, le=9, description="1 is the highest.")
    beep_code: Annotated[str, StringConstraints(max_length=16)] | None = None


class BatteryPayload(Payload):
    level_percent: int | None = Field(default=None, ge=0, le=100)
    voltage: float | None = Field(default=None, ge=0.0, le=60.0)


class BatteryLevelPayload(Payload):
    level_percent: int = Field(ge=0, le=100)
    voltage: float | None = Field(default=None, ge=0.0, le=60.0)


class SupervisionPayload(Payload):
    last_seen: UtcDatetime | None = None


class HeartbeatPayload(Payload):
    uptime_s: int | None = Field(default=None, ge=0)
    queue_depth: int | None = Field(default=None, ge=0)


# --- the table of kinds ---------------------------------------------------------------

_ANY_DEVICE = frozenset(DeviceType) - {DeviceType.GATEWAY}
_BATTERY_DEVICES = _ANY_DEVICE
_ALL = frozenset(DeviceType)
_DOOR = frozenset({DeviceType.DOOR_SENSOR, DeviceType.DOOR_LOCK})


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One row of the table: what a kind carries and who may send it."""

    kind: EventKind
    payload: type[Payload]
    device_types: frozenset[DeviceType]
    alarm_relevant: bool = False
    """True if a rule may act on it: written at once, never held for a batch."""


KINDS: dict[EventKind, KindSpec] = {
    spec.kind: spec
    for spec in (
        KindSpec(
            EventKind.BUTTON_PRESSED,
            ButtonPayload,
            frozenset({DeviceType.SAFETY_ALARM}),
            alarm_relevant=True,
        ),
        KindSpec(
            EventKind.ALARM_CANCELLED,
            CancelPayload,
            frozenset({DeviceType.SAFETY_ALARM}),
            alarm_relevant=True,
        ),
        KindSpec(EventKind.TEST_ALARM, EmptyPayload, _ALL),
        KindSpec(EventKind.DOSE_DUE, DosePayload, frozenset({DeviceType.MEDICINE_DISPENSER})),
        KindSpec(
            EventKind.DOSE_TAKEN,
            DosePayload,
            frozenset({DeviceType.MEDICINE_DISPENSER}),
            alarm_relevant=True,
        ),
        KindSpec(
            EventKind.DOSE_MISSED,
            DosePayload,
            frozenset({DeviceType.MEDICINE_DISPENSER}),
            alarm_relevant=True,
        ),
        KindSpec(
            EventKind.REFILL_NEEDED,
            RefillPayload,
            frozenset({DeviceType.MEDICINE_DISPENSER}),
            alarm_relevant=True,
        ),
        KindSpec(
            EventKind.EMPTY,
            EmptyPayload,
            frozenset({DeviceType.MEDICINE_DISPENSER}),
            alarm_relevant=True,
        ),
        KindSpec(EventKind.UNLOCKED, LockPayload, frozenset({DeviceType.DOOR_LOCK}), True),
        KindSpec(EventKind.LOCKED, LockPayload, frozenset({DeviceType.DOOR_LOCK})),
        KindSpec(
            EventKind.UNLOCK_FAILED, UnlockFailedPayload, frozenset({DeviceType.DOOR_LOCK}), True
        ),
        KindSpec(
            EventKind.JAMMED,
            EmptyPayload,
            frozenset({DeviceType.DOOR_LOCK, DeviceType.MEDICINE_DISPENSER}),
            alarm_relevant=True,
        ),
        KindSpec(EventKind.MOTION, LocationPayload, frozenset({DeviceType.MOTION_SENSOR})),
        KindSpec(EventKind.OPENED, LocationPayload, _DOOR, alarm_relevant=True),
        KindSpec(EventKind.CLOSED, LocationPayload, _DOOR),
        KindSpec(EventKind.BED_ENTERED, EmptyPayload, frozenset({DeviceType.BED_SENSOR})),
        KindSpec(EventKind.BED_EXITED, EmptyPayload, frozenset({DeviceType.BED_SENSOR})),
        KindSpec(
            EventKind.SMOKE,
            SmokePayload,
            frozenset({DeviceType.SMOKE_DETECTOR}),
            alarm_relevant=True,
        ),
        KindSpec(
            EventKind.FALL,
            FallPayload,
            frozenset({DeviceType.FALL_DETECTOR, DeviceType.SAFETY_ALARM}),
            alarm_relevant=True,
        ),
        KindSpec(EventKind.VIBRATION, VibrationPayload, frozenset({DeviceType.FALL_DETECTOR})),
        KindSpec(
            EventKind.NURSE_CALL,
            NurseCallPayload,
            frozenset({DeviceType.NURSE_CALL}),
            alarm_relevant=True,
        ),
        KindSpec(
            EventKind.NURSE_CALL_CLEARED,
            NurseCallPayload,
            frozenset({DeviceType.NURSE_CALL}),
            alarm_relevant=True,
        ),
        KindSpec(
            EventKind.WATER_LEAK,
            EmptyPayload,
            frozenset({DeviceType.WATER_LEAK_SENSOR}),
            alarm_relevant=True,
        ),
        KindSpec(EventKind.BATTERY_LOW, BatteryPayload, _BATTERY_DEVICES, alarm_relevant=True),
        KindSpec(EventKind.BATTERY_LEVEL, BatteryLevelPayload, _BATTERY_DEVICES),
        KindSpec(EventKind.POWER_LOST, EmptyPayload, _ALL, alarm_relevant=True),
        KindSpec(EventKind.POWER_RESTORED, EmptyPayload, _ALL, alarm_relevant=True),
        KindSpec(EventKind.TAMPER, EmptyPayload, _ANY_DEVICE, alarm_relevant=True),
        # A gateway's own offline/online events are made by the hub's supervision.
        KindSpec(EventKind.DEVICE_OFFLINE, SupervisionPayload, _ALL, alarm_relevant=True),
        KindSpec(EventKind.DEVICE_ONLINE, SupervisionPayload, _ALL, alarm_relevant=True),
        KindSpec(EventKind.HEARTBEAT, HeartbeatPayload, _ALL),
    )
}

ALARM_RELEVANT_KINDS: frozenset[EventKind] = frozenset(
    spec.kind for spec in KINDS.values() if spec.alarm_relevant
)


# --- the event ------------------------------------------------------------------------


class DeviceEvent(BaseModel):
    """The canonical event. Concrete classes, one per kind, are made from ``KINDS``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: UUID7 = Field(description="UUIDv7 made at capture; the idempotency key.")
    time: UtcDatetime = Field(description="When it happened, by the device's clock (UTC).")
    gateway_time: UtcDatetime | None = Field(
        default=None, description="When the gateway captured it, by the gateway's clock."
    )
    gateway_id: Identifier
    device_id: Identifier
    device_type: DeviceType
    kind: EventKind
    payload: Payload

    @property
    def alarm_relevant(self) -> bool:
        return self.kind in ALARM_RELEVANT_KINDS


def _event_class(spec: KindSpec) -> type[DeviceEvent]:
    types = tuple(sorted(t.value for t in spec.device_types))
    name = "".join(part.title() for part in spec.kind.value.split("_")) + "Event"
    fields: dict[str, Any] = {
        "kind": (Literal[spec.kind.value], ...),
        "device_type": (Literal[types], ...),
    }
    if any(f.is_required() for f in spec.payload.model_fields.values()):
        fields["payload"] = (spec.payload, ...)
    else:
        fields["payload"] = (spec.payload, Field(default_factory=spec.payload))
    model: type[DeviceEvent] = create_model(name, __base__=DeviceEvent, **fields)
    return model


EVENT_CLASSES: dict[EventKind, type[DeviceEvent]] = {
    kind: _event_class(spec) for kind, spec in KINDS.items()
}

if TYPE_CHECKING:
    AnyEvent = DeviceEvent
else:
    AnyEvent = Annotated[
        Union[tuple(EVENT_CLASSES.values())],  # noqa: UP007 - a runtime-built union
        Field(discriminator="kind"),
    ]


class EventEnvelope(BaseModel):
    """The payload of ``telecare/v1/{gateway_id}/events``: 1 to 500 events."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    events: list[AnyEvent] = Field(min_length=1, max_length=MAX_EVENTS_PER_ENVELOPE)


_EVENT_ADAPTER: TypeAdapter[DeviceEvent] = TypeAdapter(AnyEvent)


# --- parsing with errors a person can act on ------------------------------------------


def describe_validation_error(error: ValidationError, *, limit: int = 5) -> str:
    """Render pydantic's errors as one line per field: ``events.3.payload.dose_id: ...``."""
    lines = []
    for item in error.errors(include_url=False)[:limit]:
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{location}: {item['msg']}")
    extra = error.error_count() - limit
    if extra > 0:
        lines.append(f"... and {extra} more")
    return "; ".join(lines)


def _reason_for(error: ValidationError) -> str:
    types = {item["type"] for item in error.errors(include_url=False)}
    if "union_tag_invalid" in types:
        return "unknown_kind"
    if types & {"too_short", "too_long"} and any(
        item["loc"] == ("events",) for item in error.errors(include_url=False)
    ):
        return "envelope_size"
    if "json_invalid" in types:
        return "invalid_json"
    return "invalid_event"


def parse_envelope(raw: bytes | str) -> EventEnvelope:
    """Parse and validate one events message. Raises ``InvalidEventError``."""
    try:
        return EventEnvelope.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidEventError(_reason_for(exc), describe_validation_error(exc)) from None


def parse_event(data: dict[str, Any] | str | bytes) -> DeviceEvent:
    """Validate one event given as a dict or JSON text. Raises ``InvalidEventError``."""
    try:
        if isinstance(data, dict):
            return _EVENT_ADAPTER.validate_python(data)
        return _EVENT_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise InvalidEventError(_reason_for(exc), describe_validation_error(exc)) from None


def make_event(
    kind: EventKind | str,
    *,
    gateway_id: str,
    device_id: str,
    device_type: DeviceType | str,
    time: datetime | None = None,
    gateway_time: datetime | None = None,
    payload: dict[str, Any] | None = None,
    event_id: Any = None,
) -> DeviceEvent:
    """Build a validated event with a fresh UUIDv7 (used by edges and simulators)."""
    data: dict[str, Any] = {
        "id": event_id or uuid7(),
        "time": time or datetime.now(UTC),
        "gateway_time": gateway_time,
        "gateway_id": gateway_id,
        "device_id": device_id,
        "device_type": str(device_type),
        "kind": str(kind),
    }
    if payload is not None:
        data["payload"] = payload
    return parse_event(data)


def envelope_json(events: Iterable[DeviceEvent]) -> bytes:
    """Serialise events as an envelope, the wire form on the events topic."""
    body = [event.model_dump(mode="json", exclude_none=True) for event in events]
    return json.dumps({"events": body}, separators=(",", ":")).encode()
