"""Which device events raise an alarm, as a table (one row a trigger).

A row says: an event of this kind (with this payload condition) raises an alarm of
this category and priority, or joins the open alarm of that category for the same
resident. A second table says which events clear a technical condition: an open alarm of
that category resolves by itself once every device that triggered it has sent its
clearing event (a device back online, mains power back). The alarm service issue extends
these tables with stateful rules (grace periods, night wandering, dose follow-up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alarms.lifecycle import Priority
from devices.events import DeviceEvent, EventKind, SmokePayload

OFFLINE = "offline"
"""Category of a device or gateway that stopped reporting (technical)."""


@dataclass(frozen=True, slots=True)
class AlarmTrigger:
    """What a raising event asks for: an alarm of this category and priority."""

    category: str
    priority: Priority


@dataclass(frozen=True, slots=True)
class TriggerRule:
    kind: EventKind
    trigger: AlarmTrigger
    applies: Callable[[DeviceEvent], bool] = lambda _event: True


def _not_a_test(event: DeviceEvent) -> bool:
    return not (isinstance(event.payload, SmokePayload) and event.payload.test)


TRIGGER_RULES: dict[EventKind, TriggerRule] = {
    rule.kind: rule
    for rule in (
        TriggerRule(EventKind.BUTTON_PRESSED, AlarmTrigger("assistance", Priority.CRITICAL)),
        TriggerRule(EventKind.FALL, AlarmTrigger("fall", Priority.CRITICAL)),
        TriggerRule(EventKind.SMOKE, AlarmTrigger("fire", Priority.CRITICAL), _not_a_test),
        TriggerRule(EventKind.WATER_LEAK, AlarmTrigger("water_leak", Priority.HIGH)),
        TriggerRule(EventKind.NURSE_CALL, AlarmTrigger("nurse_call", Priority.HIGH)),
        TriggerRule(EventKind.DEVICE_OFFLINE, AlarmTrigger(OFFLINE, Priority.TECHNICAL)),
        TriggerRule(EventKind.POWER_LOST, AlarmTrigger("power", Priority.TECHNICAL)),
        TriggerRule(EventKind.BATTERY_LOW, AlarmTrigger("battery", Priority.TECHNICAL)),
        TriggerRule(EventKind.TAMPER, AlarmTrigger("tamper", Priority.TECHNICAL)),
        TriggerRule(EventKind.JAMMED, AlarmTrigger("jammed", Priority.TECHNICAL)),
    )
}

CLEARING_RULES: dict[EventKind, str] = {
    EventKind.DEVICE_ONLINE: OFFLINE,
    EventKind.POWER_RESTORED: "power",
    EventKind.NURSE_CALL_CLEARED: "nurse_call",
}
"""Events that end a condition: kind -> the category whose open alarm they clear."""

CLEARING_KINDS: dict[str, frozenset[str]] = {
    category: frozenset(k.value for k, c in CLEARING_RULES.items() if c == category)
    for category in set(CLEARING_RULES.values())
}
"""Per category, the kinds that clear it (the writer checks a device's latest trigger)."""


def clears(event: DeviceEvent) -> str | None:
    """The category of open alarm this event clears, if any."""
    return CLEARING_RULES.get(EventKind(event.kind))


def trigger_for(event: DeviceEvent) -> AlarmTrigger | None:
    """The alarm this event raises (or joins), if any."""
    rule = TRIGGER_RULES.get(EventKind(event.kind))
    if rule is None or not rule.applies(event):
        return None
    return rule.trigger
