"""From Zigbee2MQTT messages to canonical ``DeviceEvent``s (sans-IO, stateful).

The bridge republishes a device's whole state on every change, so the translator keeps
the last reported value of each field it acts on and emits events on changes:

- door sensor ``contact``: ``false`` is ``opened``, ``true`` is ``closed``; the first
  report after start emits the current state once;
- motion sensor ``occupancy: true``: ``motion`` on every report (``false``: nothing);
- bed sensor (a pressure mat reporting ``occupancy``, or ``contact`` as some mats do,
  where ``contact: true`` means pressed): ``bed_entered`` / ``bed_exited`` on changes;
- smoke ``smoke``, water leak ``water_leak``, and on any device ``battery_low`` and
  ``tamper``: an event when the value becomes true. A first report of ``true`` after start
  counts (a repeated alarm is better than a lost one);
- fall detector: ``action`` ``vibration`` / ``tilt`` / ``drop`` (Aqara DJT11LM) is
  ``vibration`` on every report; ``fall_status`` becoming ``fall_warning`` or ``fall_alarm``
  (Heiman HS2FD) or ``status`` becoming ``falling`` (OWON FDS315) is ``fall``;
- door lock: see ``locks.py``; ``door_state`` ``open`` / ``closed`` like a contact;
- any device: a change of ``battery`` (whole percent) is ``battery_level``;
- availability: ``offline`` is ``device_offline`` (once), ``online`` after it is
  ``device_online``.

An event's ``time`` is the message's ``last_seen`` when the bridge sends it, else ``now``;
``gateway_time`` is always ``now``. Messages from a friendly name that is not bound are
counted (``counters["unknown_device"]``) and dropped before their payload is read, so a
neighbour's devices on the same bridge never reach quarantine. A malformed message is
counted under its reason and the ``Zigbee2MqttError`` re-raised for the caller to log and
quarantine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from devices.errors import InvalidEventError
from devices.events import DeviceEvent, DeviceType, EventKind, is_identifier, parse_event
from devices.ids import uuid7
from devices.zigbee2mqtt.codec import (
    DEFAULT_BASE_TOPIC,
    AvailabilityMessage,
    DeviceState,
    IgnoredMessage,
    decode,
    friendly_name_problem,
    parse_topic,
)
from devices.zigbee2mqtt.errors import Zigbee2MqttError
from devices.zigbee2mqtt.locks import LockMemory, jam_due, lock_events

MAX_ROOM_LENGTH = 40
MAX_STRENGTH = 100_000
MAX_VOLTAGE = 60.0
DEFAULT_JAM_AFTER = timedelta(seconds=30)
"""How long ``not_fully_locked`` must last before it is reported as a jam. A motor
completes a stroke in a few seconds; 30 s rules out a report caught mid-stroke."""

VIBRATION_ACTIONS = frozenset({"vibration", "tilt", "drop"})
FALL_STATUSES = frozenset({"fall_warning", "fall_alarm"})
FALLING_STATUSES = frozenset({"falling"})

_ANY = frozenset(DeviceType) - {DeviceType.GATEWAY}


@dataclass(frozen=True, slots=True)
class DeviceBinding:
    """Which canonical device a friendly name is."""

    device_id: str
    device_type: DeviceType
    room: str | None = None

    def __post_init__(self) -> None:
        if not is_identifier(self.device_id):
            raise ValueError(f"device_id {self.device_id!r} is not a valid identifier")
        if self.device_type is DeviceType.GATEWAY:
            raise ValueError("a Zigbee device cannot be bound as a gateway")
        if self.room is not None and len(self.room) > MAX_ROOM_LENGTH:
            raise ValueError(f"room is longer than {MAX_ROOM_LENGTH} characters")


@dataclass(slots=True)
class _Memory:
    """What the translator remembers about one device."""

    values: dict[str, Any] = field(default_factory=dict)
    """The last reported (non-null) value of each field acted on."""
    battery_level: int | None = None
    online: bool | None = None
    last_seen: datetime | None = None
    lock: LockMemory = field(default_factory=LockMemory)


Emitted = tuple[EventKind, dict[str, Any]]


def _empty(_: DeviceState) -> dict[str, Any]:
    return {}


def _battery(state: DeviceState) -> dict[str, Any]:
    return {"level_percent": _level(state.battery), "voltage": _volts(state.voltage)}


def _smoke(state: DeviceState) -> dict[str, Any]:
    return {"test": bool(state.test)}


@dataclass(frozen=True, slots=True)
class _Rise:
    """A boolean field whose change to ``true`` is an event."""

    field: str
    kind: EventKind
    device_types: frozenset[DeviceType]
    payload: Callable[[DeviceState], dict[str, Any]] = _empty


_PRIMARY_RISES = (
    _Rise("smoke", EventKind.SMOKE, frozenset({DeviceType.SMOKE_DETECTOR}), _smoke),
    _Rise("water_leak", EventKind.WATER_LEAK, frozenset({DeviceType.WATER_LEAK_SENSOR})),
)
_TECHNICAL_RISES = (
    _Rise("tamper", EventKind.TAMPER, _ANY),
    _Rise("battery_low", EventKind.BATTERY_LOW, _ANY, _battery),
)


def _level(battery: float | None) -> int | None:
    if battery is None:
        return None
    return round(min(max(battery, 0.0), 100.0))


def _volts(voltage: float | None) -> float | None:
    """Battery voltage in volts: the bridge reports millivolts."""
    if voltage is None or voltage < 0:
        return None
    volts = voltage / 1000 if voltage > MAX_VOLTAGE else voltage
    return round(volts, 3) if volts <= MAX_VOLTAGE else None


class Zigbee2MqttTranslator:
    """Turns the bridge's messages into canonical events for one gateway.

    ``handle`` for each message; ``tick`` now and then (every few seconds) so that a lock
    stuck ``not_fully_locked`` is reported as jammed even if it sends nothing more.
    """

    def __init__(
        self,
        gateway_id: str,
        devices: Mapping[str, DeviceBinding],
        *,
        base_topic: str = DEFAULT_BASE_TOPIC,
        jam_after: timedelta = DEFAULT_JAM_AFTER,
        new_id: Callable[[], UUID] = uuid7,
    ) -> None:
        if not is_identifier(gateway_id):
            raise ValueError(f"gateway_id {gateway_id!r} is not a valid identifier")
        for name in devices:
            problem = friendly_name_problem(name)
            if problem is not None:
                raise ValueError(f"friendly name {name!r} {problem}")
        self.gateway_id = gateway_id
        self.counters: Counter[str] = Counter()
        self._devices = dict(devices)
        self._base_topic = base_topic
        self._jam_after = jam_after
        self._new_id = new_id
        self._memory: dict[str, _Memory] = {}

    def handle(self, topic: str, payload: bytes, now: datetime) -> list[DeviceEvent]:
        """Events for one message. Raises ``Zigbee2MqttError`` (after counting it)."""
        _require_aware(now)
        try:
            route = parse_topic(topic, base_topic=self._base_topic)
            if isinstance(route, IgnoredMessage):
                self.counters[f"ignored_{route.reason}"] += 1
                return []
            binding = self._devices.get(route.friendly_name)
            if binding is None:
                self.counters["unknown_device"] += 1
                return []
            message = decode(route, payload)
        except Zigbee2MqttError as exc:
            self.counters[exc.reason] += 1
            raise
        memory = self._memory.setdefault(route.friendly_name, _Memory())
        if isinstance(message, IgnoredMessage):
            self.counters[f"ignored_{message.reason}"] += 1
            return []
        if isinstance(message, AvailabilityMessage):
            emitted = self._availability(message.online, memory)
            return self._events(binding, emitted, time=now, now=now)
        events = self._state(binding, message.state, memory, now)
        return events + self._jams(binding, memory, now)

    def tick(self, now: datetime) -> list[DeviceEvent]:
        """Events that are due because time passed (a lock jam that persisted)."""
        _require_aware(now)
        events: list[DeviceEvent] = []
        for name, memory in self._memory.items():
            events.extend(self._jams(self._devices[name], memory, now))
        return events

    # --- availability and state ---------------------------------------------------------

    def _availability(self, online: bool, memory: _Memory) -> list[Emitted]:
        previous, memory.online = memory.online, online
        supervision = {"last_seen": memory.last_seen}
        if online and previous is False:
            return [(EventKind.DEVICE_ONLINE, supervision)]
        if not online and previous is not False:
            return [(EventKind.DEVICE_OFFLINE, supervision)]
        return []

    def _state(
        self, binding: DeviceBinding, state: DeviceState, memory: _Memory, now: datetime
    ) -> list[DeviceEvent]:
        if state.last_seen is not None:
            memory.last_seen = state.last_seen
        emitted = self._primary(binding, state, memory, now)
        for rise in _TECHNICAL_RISES:
            emitted.extend(_rise(rise, binding, state, memory))
        level = _level(state.battery)
        if level is not None and level != memory.battery_level:
            memory.battery_level = level
            emitted.append((EventKind.BATTERY_LEVEL, _battery(state)))
        return self._events(binding, emitted, time=state.last_seen or now, now=now)

    def _primary(
        self, binding: DeviceBinding, state: DeviceState, memory: _Memory, now: datetime
    ) -> list[Emitted]:
        """The events that belong to the device's kind."""
        kind = binding.device_type
        room = {"room": binding.room}
        emitted: list[Emitted] = []
        if kind is DeviceType.DOOR_SENSOR and _changed("contact", state.contact, memory):
            emitted.append((EventKind.CLOSED if state.contact else EventKind.OPENED, room))
        elif kind is DeviceType.MOTION_SENSOR and state.occupancy:
            emitted.append((EventKind.MOTION, room))
        elif kind is DeviceType.BED_SENSOR:
            in_bed = state.occupancy if state.occupancy is not None else state.contact
            if _changed("in_bed", in_bed, memory):
                emitted.append((EventKind.BED_ENTERED if in_bed else EventKind.BED_EXITED, {}))
        elif kind is DeviceType.FALL_DETECTOR:
            emitted.extend(_fall_detector(state, memory))
        elif kind is DeviceType.DOOR_LOCK:
            emitted.extend(_door(state, memory, room))
            outcome = lock_events(state, memory.lock, now)
            if outcome.unmapped_action:
                self.counters["unmapped_action"] += 1
            emitted.extend(outcome.events)
        for rise in _PRIMARY_RISES:
            emitted.extend(_rise(rise, binding, state, memory))
        return emitted

    def _jams(self, binding: DeviceBinding, memory: _Memory, now: datetime) -> list[DeviceEvent]:
        if binding.device_type is not DeviceType.DOOR_LOCK:
            return []
        since = jam_due(memory.lock, now, self._jam_after)
        if since is None:
            return []
        return self._events(binding, [(EventKind.JAMMED, {})], time=since, now=now)

    # --- building events ----------------------------------------------------------------

    def _events(
        self, binding: DeviceBinding, emitted: list[Emitted], *, time: datetime, now: datetime
    ) -> list[DeviceEvent]:
        events = []
        for kind, payload in emitted:
            event = self._event(binding, kind, payload, time=time, now=now)
            if event is not None:
                events.append(event)
        return events

    def _event(
        self,
        binding: DeviceBinding,
        kind: EventKind,
        payload: dict[str, Any],
        *,
        time: datetime,
        now: datetime,
    ) -> DeviceEvent | None:
        data: dict[str, Any] = {
            "id": self._new_id(),
            "time": time,
            "gateway_time": now,
            "gateway_id": self.gateway_id,
            "device_id": binding.device_id,
            "device_type": binding.device_type.value,
            "kind": kind.value,
            "payload": payload,
        }
        try:
            return parse_event(data)
        except InvalidEventError:
            self.counters["invalid_event_payload"] += 1
        try:  # keep the event, lose the details: a lost alarm is worse than a bare one
            return parse_event({**data, "payload": {}})
        except InvalidEventError:
            self.counters["invalid_event"] += 1
            return None


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")


def _changed(name: str, value: object, memory: _Memory) -> bool:
    """Record a reported value; True if it differs from the last one (or is the first)."""
    if value is None:
        return False
    previous = memory.values.get(name)
    memory.values[name] = value
    return previous != value


def _rise(
    rise: _Rise, binding: DeviceBinding, state: DeviceState, memory: _Memory
) -> list[Emitted]:
    if binding.device_type not in rise.device_types:
        return []
    value = getattr(state, rise.field)
    if _changed(rise.field, value, memory) and value:
        return [(rise.kind, rise.payload(state))]
    return []


def _fall_detector(state: DeviceState, memory: _Memory) -> list[Emitted]:
    emitted: list[Emitted] = []
    if state.action in VIBRATION_ACTIONS:
        strength = state.strength
        if strength is not None and not 0 <= strength <= MAX_STRENGTH:
            strength = None
        rounded = None if strength is None else round(strength)
        emitted.append((EventKind.VIBRATION, {"action": state.action, "strength": rounded}))
    fell = _entered("fall_status", state.fall_status, FALL_STATUSES, memory)
    fell |= _entered("status", state.status, FALLING_STATUSES, memory)
    if fell:
        emitted.append((EventKind.FALL, {}))
    return emitted


def _entered(name: str, value: str | None, states: frozenset[str], memory: _Memory) -> bool:
    """True if ``value`` is in ``states`` and the last reported value was not."""
    previous = memory.values.get(name)
    if not _changed(name, value, memory):
        return False
    return value in states and previous not in states


def _door(state: DeviceState, memory: _Memory, room: dict[str, Any]) -> list[Emitted]:
    """A lock's own door sensor (``door_state``)."""
    if not _changed("door_state", state.door_state, memory):
        return []
    if state.door_state in ("open", "error_forced_open"):
        return [(EventKind.OPENED, room)]
    if state.door_state == "closed":
        return [(EventKind.CLOSED, room)]
    if state.door_state == "error_jammed":
        memory.lock.jam_reported = True
        return [(EventKind.JAMMED, {})]
    return []
