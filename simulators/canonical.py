"""Simulated actions as canonical ``DeviceEvent``s, for the analytics and the demo.

This is the shortcut past the wire protocols: the adapters from actions to Zigbee2MQTT,
SIA DC-09, ESPA 4.4.4 and the dispenser's serial protocol come later, and their edges
must produce the same events as ``to_events`` does here. A nurse call keeps its call
point's device id (the room), with the address in the payload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from devices.events import DeviceEvent, EventKind, parse_event
from devices.ids import uuid7
from simulators.world import (
    Action,
    BatteryDetail,
    CallDetail,
    DoseDetail,
    FallDetail,
    LockDetail,
)

_WITH_ROOM = frozenset({EventKind.MOTION, EventKind.OPENED, EventKind.CLOSED})


def to_events(action: Action, gateway_id: str | None = None) -> list[DeviceEvent]:
    """The events a gateway would publish for ``action``: the device's time, and
    ``gateway_time`` equal to it. ``gateway_id`` defaults to the action's own gateway.
    Raises ``devices.errors.InvalidEventError`` if the action cannot be an event.
    """
    data: dict[str, Any] = {
        "id": uuid7(now_ns=round(action.time.timestamp() * 1000) * 1_000_000),
        "time": action.time,
        "gateway_time": action.time,
        "gateway_id": gateway_id or action.gateway_id,
        "device_id": action.device_id,
        "device_type": action.device_type.value,
        "kind": action.kind.value,
        "payload": _payload(action),
    }
    return [parse_event(data)]


def to_event_stream(actions: Iterable[Action]) -> Iterator[DeviceEvent]:
    """Every action's events, in the actions' order."""
    for action in actions:
        yield from to_events(action)


def _payload(action: Action) -> dict[str, Any]:
    detail = action.detail
    if detail is None:
        return {"room": action.room} if action.kind in _WITH_ROOM and action.room else {}
    if isinstance(detail, LockDetail):
        payload: dict[str, Any] = {"source": detail.source, "user_ref": detail.user_ref}
        if action.kind is EventKind.UNLOCK_FAILED:
            payload["reason"] = detail.reason or "unknown"
        return payload
    return _PAYLOADS[type(detail)](detail)


_PAYLOADS: dict[type[Any], Callable[[Any], dict[str, Any]]] = {
    DoseDetail: lambda d: {"dose_id": d.dose_id, "scheduled_for": d.scheduled_for},
    CallDetail: lambda d: {"address": d.address, "priority": d.priority, "call_type": d.call_type},
    BatteryDetail: lambda d: {"level_percent": d.level},
    FallDetail: lambda d: {"confidence": d.confidence},
}
