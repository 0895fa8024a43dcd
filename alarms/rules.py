"""Which device events raise an alarm, as a table (one row a trigger).

A row says: an event of this kind (with this payload condition) raises an alarm of
this category and priority, or joins the open alarm of that category for the same
resident. The alarm service issue extends this table with stateful rules (grace
periods, night wandering, supervision); the first path is the pendant press.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alarms.lifecycle import Priority
from devices.events import DeviceEvent, EventKind, SmokePayload


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
    )
}


def trigger_for(event: DeviceEvent) -> AlarmTrigger | None:
    """The alarm this event raises (or joins), if any."""
    rule = TRIGGER_RULES.get(EventKind(event.kind))
    if rule is None or not rule.applies(event):
        return None
    return rule.trigger
