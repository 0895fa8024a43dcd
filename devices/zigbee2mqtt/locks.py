"""Door locks behind Zigbee2MQTT: from ``action``, ``lock_state`` and ``state`` to events.

A lock reports two things, published by the bridge as separate messages in either order:

- an operation event (``action``, ``action_source_name``, ``action_user``): who did what,
  sent once; the bridge never caches it, so it appears in exactly one message;
- the lock's position (``lock_state``, ``state``): cached and repeated in every message,
  so the copy that arrives with an operation event is often the old one.

So an operation event decides the event and the new position, and the position in that
same message is not read. Without an operation event, a change of position between two
messages is a ``locked`` / ``unlocked`` event with an unknown source. The first position
seen after start is a baseline, not an event. ``not_fully_locked`` that persists for
``jam_after`` is ``jammed``; so is an ``error_jammed`` action or a ``deadbolt_jammed`` alarm.

Sources: ``fromZigbee.lock_operation_event`` and ``constants.lockSourceName`` in
zigbee-herdsman-converters, and the Yale Control4 module converters (``src/devices/yale.ts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from devices.events import EventKind
from devices.zigbee2mqtt.codec import DeviceState

Source = Literal["keypad", "rf_tag", "app", "remote", "manual", "auto", "unknown"]
Position = Literal["locked", "unlocked"]

NO_USER = 0xFFFF
"""``action_user`` 65535: the operation was not made with a user's credential."""

MAX_REASON_LENGTH = 120

_SOURCE_BY_NAME: dict[str, Source] = {
    "keypad": "keypad",
    "rfid": "rf_tag",
    "rf": "remote",  # a Zigbee command: from us or another controller on the network
    "zigbee": "remote",
    "manual": "manual",
    "auto": "auto",
}
"""``action_source_name`` to ``LockPayload.source``. ``fingerprint`` has no canonical
source yet and maps to ``unknown``."""

_ACTIONS: dict[str, tuple[EventKind, Source | None]] = {
    # closuresDoorLock operation events (ZCL operation event codes 1, 2, 7-14)
    "lock": (EventKind.LOCKED, None),
    "unlock": (EventKind.UNLOCKED, None),
    "one_touch_lock": (EventKind.LOCKED, "manual"),
    "key_lock": (EventKind.LOCKED, "manual"),
    "key_unlock": (EventKind.UNLOCKED, "manual"),
    "auto_lock": (EventKind.LOCKED, "auto"),
    "schedule_lock": (EventKind.LOCKED, "auto"),
    "schedule_unlock": (EventKind.UNLOCKED, "auto"),
    "manual_lock": (EventKind.LOCKED, "manual"),
    "manual_unlock": (EventKind.UNLOCKED, "manual"),
    # Yale Control4 module alarms reported as actions
    "keypad_lock": (EventKind.LOCKED, "keypad"),
    "keypad_unlock": (EventKind.UNLOCKED, "keypad"),
    "manual_lock_key_or_thumbturn": (EventKind.LOCKED, "manual"),
    "manual_unlock_key_or_thumbturn": (EventKind.UNLOCKED, "manual"),
    "manual_lock_touch": (EventKind.LOCKED, "manual"),
    "lock_module": (EventKind.LOCKED, "remote"),
    "unlock_module": (EventKind.UNLOCKED, "remote"),
    "error_jammed": (EventKind.JAMMED, None),
}

_UNLOCK_FAILURE_PREFIX = "unlock_failure_"
_JAM_ALARMS = frozenset({"deadbolt_jammed"})
_POSITION_BY_LOCK_STATE: dict[str, Position | Literal["not_fully_locked"]] = {
    "locked": "locked",
    "unlocked": "unlocked",
    "not_fully_locked": "not_fully_locked",
}
_POSITION_BY_STATE: dict[str, Position] = {
    "LOCK": "locked",
    "LOCKED": "locked",
    "UNLOCK": "unlocked",
    "UNLOCKED": "unlocked",
}


@dataclass(slots=True)
class LockMemory:
    """What the translator remembers about one lock between messages."""

    position: Position | None = None
    jam_since: datetime | None = None
    """Gateway time when ``not_fully_locked`` was first seen in the current episode."""
    jam_reported: bool = False
    alarm: str | None = None


LockEvent = tuple[EventKind, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class LockOutcome:
    events: list[LockEvent]
    unmapped_action: bool = False
    """An action we do not turn into an event (``lock_failure_*``, ``unknown``, ...)."""


def _source(action_source: Source | None, state: DeviceState) -> Source:
    if action_source is not None:
        return action_source
    return _SOURCE_BY_NAME.get(state.action_source_name or "", "unknown")


def _user_ref(state: DeviceState) -> str | None:
    user = state.action_user
    if user is None or not 0 <= user < NO_USER:
        return None
    return str(user)


def _position(state: DeviceState) -> Position | Literal["not_fully_locked"] | None:
    from_lock_state = _POSITION_BY_LOCK_STATE.get(state.lock_state or "")
    if from_lock_state is not None:
        return from_lock_state
    return _POSITION_BY_STATE.get(state.state or "")


def _action_event(state: DeviceState, action: str) -> LockEvent | None:
    """The event an operation event stands for, or None if it stands for none."""
    mapped = _ACTIONS.get(action)
    who = {"source": _source(None, state), "user_ref": _user_ref(state)}
    if mapped is not None:
        kind, source = mapped
        if kind is EventKind.JAMMED:
            return kind, {}
        return kind, {**who, "source": _source(source, state)}
    if action.startswith(_UNLOCK_FAILURE_PREFIX) and len(action) > len(_UNLOCK_FAILURE_PREFIX):
        reason = action[len(_UNLOCK_FAILURE_PREFIX) :][:MAX_REASON_LENGTH]
        return EventKind.UNLOCK_FAILED, {**who, "reason": reason}
    return None


def lock_events(state: DeviceState, memory: LockMemory, now: datetime) -> LockOutcome:
    """Events for one state message from a lock; updates ``memory``."""
    events: list[LockEvent] = []
    unmapped = moved = jam_signal = False
    if state.action:
        event = _action_event(state, state.action)
        if event is None:
            unmapped = True
        else:
            events.append(event)
            jam_signal = event[0] is EventKind.JAMMED
            moved = event[0] in (EventKind.LOCKED, EventKind.UNLOCKED)
            if moved:
                memory.position = "locked" if event[0] is EventKind.LOCKED else "unlocked"
    if state.alarm is not None and state.alarm != memory.alarm:
        memory.alarm = state.alarm
        if state.alarm in _JAM_ALARMS:
            jam_signal = True
            if not memory.jam_reported:
                events.append((EventKind.JAMMED, {}))
    if jam_signal:
        memory.jam_reported = True
    if not moved:
        events.extend(_position_events(state, memory, now, jam_signal=jam_signal))
    return LockOutcome(events, unmapped_action=unmapped)


def _position_events(
    state: DeviceState, memory: LockMemory, now: datetime, *, jam_signal: bool
) -> list[LockEvent]:
    position = _position(state)
    if position is None:
        return []
    if position == "not_fully_locked":
        if memory.jam_since is None:
            memory.jam_since = now
        return []
    if jam_signal:  # the position that came with a jam report is the old, cached one
        return []
    memory.jam_since = None
    memory.jam_reported = False
    previous, memory.position = memory.position, position
    if previous is None or previous == position:
        return []
    kind = EventKind.LOCKED if position == "locked" else EventKind.UNLOCKED
    return [(kind, {"source": "unknown", "user_ref": None})]


def jam_due(memory: LockMemory, now: datetime, jam_after: timedelta) -> datetime | None:
    """When the current jam began, if it has now lasted ``jam_after`` and is unreported."""
    since = memory.jam_since
    if since is None or memory.jam_reported or now - since < jam_after:
        return None
    memory.jam_reported = True
    return since
