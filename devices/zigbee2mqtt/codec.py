"""Zigbee2MQTT messages: parse what the bridge publishes, build what we send back.

Sans-IO. MQTT already frames messages, so the unit of decoding is one ``(topic, payload)``
pair, not a byte stream: there is no buffer to keep, only a cap on the payload size.

Topics under the base topic (``zigbee2mqtt`` unless the bridge is configured otherwise):

- ``<base>/<friendly_name>``: the device's whole state as a JSON object, republished in
  full on every change (the bridge caches it; ``action`` is never cached);
- ``<base>/<friendly_name>/availability``: ``{"state": "online"}`` (Zigbee2MQTT 2.x) or the
  legacy plain ``online`` / ``offline`` (1.x); both are accepted;
- ``<base>/bridge/...``, ``.../set``, ``.../get``, ``.../set/<attribute>``,
  ``.../get/<attribute>`` and the ``.../action`` mirror that the Home Assistant integration
  publishes: ignored.

Friendly names may contain ``/`` (``kitchen/motion``): the last suffix decides what a topic
is. An empty payload on a device topic is the bridge clearing a retained message (device
removed or renamed) and is ignored, not an error.

Reference: https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from devices.events import describe_validation_error
from devices.zigbee2mqtt.errors import Zigbee2MqttError

DEFAULT_BASE_TOPIC = "zigbee2mqtt"

MAX_PAYLOAD_BYTES = 64 * 1024
"""Refuse larger payloads unread. A device state is normally well under 2 KiB; a lock that
publishes its whole PIN user table stays under 20 KiB."""

LockAction = Literal["lock", "unlock"]


class IgnoreReason(StrEnum):
    BRIDGE = "bridge"
    """``<base>/bridge/...``: the bridge's own state, logs, requests and responses."""
    COMMAND = "command"
    """``.../set``, ``.../get`` (and ``/set/<attribute>``): requests to the bridge."""
    MIRROR = "mirror"
    """``.../action``: a copy of the ``action`` already in the state message."""
    CLEARED = "cleared"
    """An empty payload: the bridge clearing a retained message."""


# --- the device state -----------------------------------------------------------------


def _last_seen(value: object) -> datetime | None:
    """``last_seen`` as the bridge sends it: ISO 8601 with an offset, or epoch ms."""
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, bool):  # pydantic reports ValueError, not TypeError, as invalid
        raise ValueError("last_seen must be an ISO 8601 string or epoch milliseconds")  # noqa: TRY004
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError("last_seen epoch milliseconds are out of range") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("last_seen is not an ISO 8601 timestamp") from None
        if parsed.tzinfo is None:
            raise ValueError(
                "last_seen has no UTC offset; set advanced.last_seen to ISO_8601 or epoch"
            )
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise ValueError("last_seen is out of range once converted to UTC") from None
    raise ValueError("last_seen must be an ISO 8601 string or epoch milliseconds")


LastSeen = Annotated[datetime | None, BeforeValidator(_last_seen)]


class DeviceState(BaseModel):
    """One state message. The fields we act on are typed (strictly: ``"true"`` is not a
    boolean); every other field the bridge sends is kept as it came, in ``model_extra``.
    ``None`` (JSON ``null``, or absent) means "not reported"."""

    model_config = ConfigDict(frozen=True, extra="allow", strict=True)

    # sensors (IAS zone and Xiaomi converters)
    contact: bool | None = None
    """``true`` is closed, ``false`` is open."""
    occupancy: bool | None = None
    smoke: bool | None = None
    test: bool | None = None
    """The smoke detector's test bit (``ias_smoke_alarm_1``)."""
    water_leak: bool | None = None
    tamper: bool | None = None
    battery_low: bool | None = None
    battery: float | None = None
    """Percent; may have decimals."""
    voltage: float | None = None
    """Battery voltage in millivolts for battery devices."""
    # vibration and fall sensors
    action: str | None = None
    """A transient action (``vibration``, ``unlock``, ...); ``""`` clears it."""
    strength: float | None = None
    fall_status: str | None = None
    """Heiman HS2FD: ``normal``, ``fall_warning``, ``fall_alarm``, ``unknown``."""
    status: str | None = None
    """OWON FDS315: ``unoccupied``, ``occupied``, ..., ``falling``."""
    # door locks (closuresDoorLock converters)
    state: str | None = None
    """``LOCK`` / ``UNLOCK`` for a lock (some converters say ``LOCKED`` / ``UNLOCKED``)."""
    lock_state: str | None = None
    """``locked``, ``unlocked`` or ``not_fully_locked``."""
    door_state: str | None = None
    """``open``, ``closed``, ``error_jammed``, ``error_forced_open``, ..."""
    action_source_name: str | None = None
    """``keypad``, ``rf``, ``manual``, ``rfid``, ``fingerprint``."""
    action_user: int | None = None
    """The lock's user slot; 65535 means none."""
    alarm: str | None = None
    """Yale Control4 module alarms, for example ``deadbolt_jammed``."""
    last_seen: LastSeen = None
    """When the bridge last heard the device, if ``advanced.last_seen`` is enabled."""


# --- parsed messages ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateMessage:
    friendly_name: str
    state: DeviceState


@dataclass(frozen=True, slots=True)
class AvailabilityMessage:
    friendly_name: str
    online: bool
    legacy: bool
    """True if it came as plain ``online`` / ``offline`` (Zigbee2MQTT 1.x)."""


@dataclass(frozen=True, slots=True)
class IgnoredMessage:
    topic: str
    reason: IgnoreReason


Message = StateMessage | AvailabilityMessage | IgnoredMessage


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A device's state or availability topic, before its payload is read."""

    kind: Literal["state", "availability"]
    topic: str
    friendly_name: str


def _command_parts(rest: str) -> tuple[str, str, str | None] | None:
    """``(name, verb, attribute)`` for ``<name>/set``, ``<name>/get/<attribute>``, ..."""
    head, _, last = rest.rpartition("/")
    if head and last in ("set", "get"):
        return head, last, None
    before, _, verb = head.rpartition("/")
    if before and verb in ("set", "get"):
        return before, verb, last
    return None


def parse_topic(
    topic: str, *, base_topic: str = DEFAULT_BASE_TOPIC
) -> DeviceTopic | IgnoredMessage:
    """Classify a topic. Raises ``Zigbee2MqttError`` if it is not under ``base_topic``."""
    rest = _under_base(topic, base_topic)
    if rest == "bridge" or rest.startswith("bridge/"):
        return IgnoredMessage(topic, IgnoreReason.BRIDGE)
    if _command_parts(rest) is not None:
        return IgnoredMessage(topic, IgnoreReason.COMMAND)
    head, _, last = rest.rpartition("/")
    if head and last == "action":
        return IgnoredMessage(topic, IgnoreReason.MIRROR)
    if head and last == "availability":
        return DeviceTopic("availability", topic, _checked_name(head))
    return DeviceTopic("state", topic, _checked_name(rest))


def _under_base(topic: str, base_topic: str) -> str:
    prefix = base_topic + "/"
    if not topic.startswith(prefix):
        raise Zigbee2MqttError(
            "foreign_topic",
            f"topic is not under the base topic {base_topic!r}; check the subscription "
            "and the bridge's mqtt.base_topic setting",
        )
    return topic[len(prefix) :]


def _checked_name(name: str) -> str:
    problem = friendly_name_problem(name)
    if problem is not None:
        raise Zigbee2MqttError("invalid_topic", f"the topic's friendly name {problem}")
    return name


_ENDS_WITH_SLASH_DIGITS = re.compile(r".*/\d*")
_RESERVED_LAST_SEGMENTS = frozenset({"set", "get", "availability", "action"})


def _has_control_character(name: str) -> bool:
    return any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in name)


_NAME_RULES: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda name: not name, "is empty"),
    (lambda name: name.startswith("/") or name.endswith("/"), "starts or ends with '/'"),
    (_has_control_character, "contains a control character"),
    (lambda name: "+" in name or "#" in name, "contains an MQTT wildcard ('+' or '#')"),
    (
        lambda name: _ENDS_WITH_SLASH_DIGITS.fullmatch(name) is not None,
        "ends with '/' and digits, which the bridge reserves for endpoints",
    ),
    (lambda name: name == "bridge" or name.startswith("bridge/"), "is the bridge's own topic"),
    (
        lambda name: "/" in name and name.rpartition("/")[2] in _RESERVED_LAST_SEGMENTS,
        "ends with a reserved suffix (/set, /get, /availability, /action)",
    ),
    (
        lambda name: _command_parts(name) is not None,
        "has /set/ or /get/ before its last part, which reads as a command topic",
    ),
)


def friendly_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a device's friendly name here, or ``None`` if it can.

    Follows the bridge's own rules (``validateFriendlyName``) and adds ours: a name must not
    be ``bridge`` or end in a suffix that would make its topics ambiguous.
    """
    for broken, problem in _NAME_RULES:
        if broken(name):
            return problem
    return None


# --- payloads -------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _text(payload: bytes) -> str:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Zigbee2MqttError(
            "payload_too_large",
            f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}",
        )
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Zigbee2MqttError(
            "invalid_utf8", f"payload is not UTF-8 (bad byte at offset {exc.start})"
        ) from None


def _json(text: str) -> object:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise Zigbee2MqttError("invalid_json", "payload JSON is nested too deeply") from None
    except ValueError as exc:
        raise Zigbee2MqttError("invalid_json", f"payload is not valid JSON: {exc}") from None


def _object(payload: bytes, what: str) -> dict[str, Any]:
    value = _json(_text(payload))
    if not isinstance(value, dict):
        raise Zigbee2MqttError(
            "not_object", f"{what} must be a JSON object, got {_json_type(value)}"
        )
    return value


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def parse_state(payload: bytes) -> DeviceState:
    """Validate a device state payload. Raises ``Zigbee2MqttError``."""
    fields = _object(payload, "a device state message")
    try:
        return DeviceState.model_validate(fields)
    except ValidationError as exc:
        raise Zigbee2MqttError(
            "invalid_field",
            f"device state has a field of the wrong type: {describe_validation_error(exc)}",
        ) from None


def parse_availability(payload: bytes) -> tuple[bool, bool]:
    """``(online, legacy)`` from an availability payload. Raises ``Zigbee2MqttError``."""
    text = _text(payload).strip()
    if text in ("online", "offline"):
        return text == "online", True
    try:
        value = _json(text)
    except Zigbee2MqttError:
        value = None
    if isinstance(value, dict) and value.get("state") in ("online", "offline"):
        return value["state"] == "online", False
    raise Zigbee2MqttError(
        "invalid_availability",
        'availability must be {"state": "online"} / {"state": "offline"} or the legacy '
        "plain online / offline",
    )


def decode(topic: DeviceTopic, payload: bytes) -> Message:
    """Read the payload of a device topic classified by ``parse_topic``."""
    if not payload:
        return IgnoredMessage(topic.topic, IgnoreReason.CLEARED)
    if topic.kind == "availability":
        online, legacy = parse_availability(payload)
        return AvailabilityMessage(topic.friendly_name, online=online, legacy=legacy)
    return StateMessage(topic.friendly_name, parse_state(payload))


def parse_message(topic: str, payload: bytes, *, base_topic: str = DEFAULT_BASE_TOPIC) -> Message:
    """Parse one message from the bridge. Raises ``Zigbee2MqttError`` with a reason."""
    route = parse_topic(topic, base_topic=base_topic)
    if isinstance(route, IgnoredMessage):
        return route
    return decode(route, payload)


# --- commands -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetRequest:
    """What a ``.../set`` message asks of a device."""

    friendly_name: str
    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lock_action(self) -> LockAction | None:
        """``lock`` or ``unlock`` if this asks a lock to move (the bridge ignores case)."""
        state = self.values.get("state")
        if isinstance(state, str) and state.upper() in ("LOCK", "UNLOCK"):
            return "lock" if state.upper() == "LOCK" else "unlock"
        return None


def _require_name(friendly_name: str) -> None:
    problem = friendly_name_problem(friendly_name)
    if problem is not None:
        raise Zigbee2MqttError("invalid_friendly_name", f"the friendly name {problem}")


def lock_command(
    friendly_name: str, action: LockAction, base_topic: str = DEFAULT_BASE_TOPIC
) -> tuple[str, bytes]:
    """``(topic, payload)`` that asks the bridge to lock or unlock a door lock."""
    _require_name(friendly_name)
    if action not in ("lock", "unlock"):
        raise Zigbee2MqttError("invalid_command", "a lock command is 'lock' or 'unlock'")
    body = json.dumps({"state": action.upper()}, separators=(",", ":")).encode()
    return f"{base_topic}/{friendly_name}/set", body


def parse_set(topic: str, payload: bytes, *, base_topic: str = DEFAULT_BASE_TOPIC) -> SetRequest:
    """Read a ``<name>/set`` (JSON object) or ``<name>/set/<attribute>`` (plain value)
    message, as the bridge would. For simulators and tests."""
    parts = _command_parts(_under_base(topic, base_topic))
    if parts is None or parts[1] != "set":
        raise Zigbee2MqttError(
            "not_a_command", "a set request goes to <name>/set or <name>/set/<attribute>"
        )
    name, _, attribute = parts
    _require_name(name)
    if attribute is None:
        values = _object(payload, "a set request")
    else:
        text = _text(payload)
        try:
            value = _json(text)
        except Zigbee2MqttError:
            value = text
        values = {attribute: value}
    return SetRequest(name, MappingProxyType(values))


# --- encoding, for simulators and tests -----------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise TypeError("naive datetime")
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def state_payload(fields: Mapping[str, Any]) -> bytes:
    """A state message as the bridge publishes it (compact JSON; datetimes as ISO 8601)."""
    try:
        body = json.dumps(
            dict(fields), separators=(",", ":"), allow_nan=False, default=_json_default
        ).encode()
    except (TypeError, ValueError) as exc:
        raise Zigbee2MqttError("not_encodable", f"state fields are not JSON: {exc}") from None
    if len(body) > MAX_PAYLOAD_BYTES:
        raise Zigbee2MqttError(
            "payload_too_large", f"state is {len(body)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    return body


def availability_payload(online: bool, legacy: bool = False) -> bytes:
    """``{"state":"online"}`` (Zigbee2MQTT 2.x) or plain ``online`` (legacy 1.x)."""
    word = "online" if online else "offline"
    if legacy:
        return word.encode()
    return json.dumps({"state": word}, separators=(",", ":")).encode()
