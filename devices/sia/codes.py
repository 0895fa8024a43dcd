"""From SIA and Contact ID codes to canonical events: a table, and the translation.

Each code is a row: the event kind it becomes, the payload, and the device type that
sends it when its zone is not bound to a device. A row without a kind is a code we know
and acknowledge but that makes no event (the restore of an alarm: an alarm is closed by
people, not by the unit). A code without a row is *unknown*: the message is still
acknowledged (DC-09 keeps DUH for messages that cannot be read at all), and the caller
counts and logs it, so an alarm code we do not know is never dropped silently.

Which device an event is from: the zone's device if the zone is bound and that device
type may send the kind; else the account's own device if its type may; else a device
named ``<account device>.z<zone>`` of the row's device type (an unbound smoke detector
behind a safety-alarm unit still raises a fire alarm, under an id the log names).

Contact ID keys are the qualifier and the event code as on the wire (``1101``,
``3301``). A repeat (``6``) of a code without its own row is treated as new: a condition
that is still present is never quieter than when it began.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from devices.events import KINDS, DeviceEvent, DeviceType, EventKind, is_identifier, parse_event
from devices.ids import uuid7
from devices.sia.codec import ReportedEvent, SiaMessage

_MAX_ZONE = 999_999


@dataclass(frozen=True, slots=True)
class CodeRow:
    """What one SIA or Contact ID code means for us."""

    description: str
    kind: EventKind | None = None
    """``None``: acknowledged, no event."""
    device_type: DeviceType | None = None
    """Who sends it when its zone is not bound (must be allowed for ``kind``)."""
    payload: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.kind is None) != (self.device_type is None):
            raise ValueError(f"{self.description}: a kind needs a device type, and only then")
        if self.kind is not None:
            spec = KINDS[self.kind]
            if self.device_type not in spec.device_types:
                raise ValueError(f"{self.description}: {self.device_type} cannot send {self.kind}")
            spec.payload.model_validate(dict(self.payload))


def _event(kind: EventKind, sender: DeviceType, description: str, **payload: str) -> CodeRow:
    return CodeRow(description, kind, sender, MappingProxyType(payload))


def _silent(description: str) -> CodeRow:
    return CodeRow(description)


_K = EventKind
_ALARM = DeviceType.SAFETY_ALARM

SIA_CODES: Mapping[str, CodeRow] = MappingProxyType(
    {
        "MA": _event(_K.BUTTON_PRESSED, _ALARM, "medical alarm", button="base_unit"),
        "MH": _silent("medical alarm restore"),
        "QA": _event(_K.BUTTON_PRESSED, _ALARM, "emergency alarm", button="pendant"),
        "QH": _silent("emergency alarm restore"),
        "FA": _event(_K.SMOKE, DeviceType.SMOKE_DETECTOR, "fire alarm"),
        "FH": _silent("fire alarm restore"),
        "WA": _event(_K.WATER_LEAK, DeviceType.WATER_LEAK_SENSOR, "water alarm"),
        "WH": _silent("water alarm restore"),
        "RP": _event(_K.TEST_ALARM, _ALARM, "automatic test"),
        "RX": _event(_K.TEST_ALARM, _ALARM, "manual test"),
        "YT": _event(_K.BATTERY_LOW, _ALARM, "system battery trouble"),
        "YR": _silent("system battery restore"),
        "XT": _event(_K.BATTERY_LOW, _ALARM, "transmitter battery trouble"),
        "XR": _silent("transmitter battery restore"),
        "TA": _event(_K.TAMPER, _ALARM, "tamper alarm"),
        "TR": _silent("tamper restore"),
        "AT": _event(_K.POWER_LOST, _ALARM, "AC trouble"),
        "AR": _event(_K.POWER_RESTORED, _ALARM, "AC restore"),
        "OC": _event(_K.ALARM_CANCELLED, _ALARM, "cancel report", source="base_unit"),
    }
)
"""SIA DC-03 event codes (two letters)."""

CONTACT_ID_CODES: Mapping[str, CodeRow] = MappingProxyType(
    {
        "1100": _event(_K.BUTTON_PRESSED, _ALARM, "medical", button="base_unit"),
        "3100": _silent("medical restore"),
        "1101": _event(_K.BUTTON_PRESSED, _ALARM, "personal emergency", button="pendant"),
        "3101": _silent("personal emergency restore"),
        "1110": _event(_K.SMOKE, DeviceType.SMOKE_DETECTOR, "fire"),
        "3110": _silent("fire restore"),
        "1111": _event(_K.SMOKE, DeviceType.SMOKE_DETECTOR, "smoke"),
        "3111": _silent("smoke restore"),
        "1113": _event(_K.WATER_LEAK, DeviceType.WATER_LEAK_SENSOR, "water leakage"),
        "3113": _silent("water leakage restore"),
        "1144": _event(_K.TAMPER, _ALARM, "sensor tamper"),
        "3144": _silent("sensor tamper restore"),
        "1301": _event(_K.POWER_LOST, _ALARM, "AC loss"),
        "3301": _event(_K.POWER_RESTORED, _ALARM, "AC restore"),
        "1302": _event(_K.BATTERY_LOW, _ALARM, "low system battery"),
        "3302": _silent("low system battery restore"),
        "1383": _event(_K.TAMPER, _ALARM, "sensor tamper (trouble)"),
        "3383": _silent("sensor tamper restore (trouble)"),
        "1384": _event(_K.BATTERY_LOW, _ALARM, "RF low battery"),
        "3384": _silent("RF low battery restore"),
        "1406": _event(_K.ALARM_CANCELLED, _ALARM, "cancel", source="base_unit"),
        "1601": _event(_K.TEST_ALARM, _ALARM, "manual trigger test"),
        "1602": _event(_K.TEST_ALARM, _ALARM, "periodic test"),
    }
)
"""Contact ID (DC-05) events: qualifier digit and three-digit event code."""

_QUALIFIER_DIGIT = {"new": "1", "restore": "3", "repeat": "6"}


def lookup(protocol: str, reported: ReportedEvent) -> CodeRow | None:
    """The row for one reported event, or ``None`` if the code is unknown."""
    if protocol == "SIA-DCS":
        return SIA_CODES.get(reported.code)
    if protocol == "ADM-CID":
        key = _QUALIFIER_DIGIT[reported.qualifier] + reported.code
        row = CONTACT_ID_CODES.get(key)
        if row is None and reported.qualifier == "repeat":
            row = CONTACT_ID_CODES.get("1" + reported.code)
        return row
    return None


# --- accounts and translation ----------------------------------------------------------


def zone_key(zone: str | int) -> str:
    """Zones are numbers: ``1``, ``01`` and ``001`` are one zone."""
    text = str(zone)
    if not text.isdigit() or int(text) > _MAX_ZONE:
        raise ValueError(f"zone {text!r} is not a number from 0 to {_MAX_ZONE}")
    return str(int(text))


@dataclass(frozen=True, slots=True, kw_only=True)
class SiaAccountBinding:
    """Which unit an SIA account is, and which devices report through its zones."""

    account: str
    gateway_id: str
    device_id: str
    device_type: DeviceType
    zones: Mapping[str, tuple[str, DeviceType]] = field(default_factory=dict)
    """Zone number (any of ``"1"``, ``"01"``, ``1``) to (device id, device type)."""

    def __post_init__(self) -> None:
        account = self.account.upper()
        if not (1 <= len(account) <= 16 and all(c in "0123456789ABCDEF" for c in account)):
            raise ValueError(f"account {self.account!r} is not 1 to 16 hex digits")
        for name in (self.gateway_id, self.device_id):
            if not is_identifier(name):
                raise ValueError(f"invalid id {name!r}")
        zones: dict[str, tuple[str, DeviceType]] = {}
        for zone, (device_id, device_type) in self.zones.items():
            if not is_identifier(device_id):
                raise ValueError(f"zone {zone}: invalid device id {device_id!r}")
            key = zone_key(zone)
            if key in zones:
                raise ValueError(f"zone {key} is bound twice")
            zones[key] = (device_id, DeviceType(device_type))
        object.__setattr__(self, "account", account)
        object.__setattr__(self, "device_type", DeviceType(self.device_type))
        object.__setattr__(self, "zones", MappingProxyType(zones))


@dataclass(frozen=True, slots=True)
class SiaTranslation:
    """The events a message makes, and what it reported that makes none."""

    events: tuple[DeviceEvent, ...]
    unknown: tuple[ReportedEvent, ...]
    """Codes without a row: acknowledged, to be counted and logged at warning."""
    silent: tuple[ReportedEvent, ...]
    """Known codes that make no event (restores)."""


def _sender(
    kind: EventKind, fallback: DeviceType, reported: ReportedEvent, binding: SiaAccountBinding
) -> tuple[str, str]:
    allowed = KINDS[kind].device_types
    zone = zone_key(reported.zone) if reported.zone is not None else None
    bound = binding.zones.get(zone) if zone is not None else None
    if bound is not None and bound[1] in allowed:
        return bound[0], bound[1].value
    if binding.device_type in allowed:
        return binding.device_id, binding.device_type.value
    return f"{binding.device_id[:56]}.z{zone or '0'}", fallback.value


def translate(message: SiaMessage, binding: SiaAccountBinding, now: datetime) -> SiaTranslation:
    """Canonical events for one message. ``now`` (the gateway's clock) is ``gateway_time``,
    and the event time when the message has no timestamp. Each event gets a new UUIDv7."""
    events: list[DeviceEvent] = []
    unknown: list[ReportedEvent] = []
    silent: list[ReportedEvent] = []
    for reported in message.events:
        row = lookup(message.protocol, reported)
        if row is None:
            unknown.append(reported)
            continue
        if row.kind is None or row.device_type is None:  # CodeRow keeps the two together
            silent.append(reported)
            continue
        device_id, device_type = _sender(row.kind, row.device_type, reported, binding)
        event = {
            "id": uuid7(now_ns=int(now.timestamp() * 1000) * 1_000_000),
            "time": message.timestamp or now,
            "gateway_time": now,
            "gateway_id": binding.gateway_id,
            "device_id": device_id,
            "device_type": device_type,
            "kind": row.kind.value,
            "payload": dict(row.payload),
        }
        events.append(parse_event(event))
    return SiaTranslation(tuple(events), tuple(unknown), tuple(silent))


def to_events(message: SiaMessage, binding: SiaAccountBinding, now: datetime) -> list[DeviceEvent]:
    """The canonical events for one message (``translate`` also says what made none)."""
    return list(translate(message, binding, now).events)
