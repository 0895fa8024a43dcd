"""Which device events raise an alarm."""

from __future__ import annotations

from typing import Any

import pytest

from alarms.lifecycle import Priority
from alarms.rules import AlarmTrigger, trigger_for
from devices.events import DeviceEvent, make_event


def _event(kind: str, device_type: str, payload: dict[str, Any] | None = None) -> DeviceEvent:
    return make_event(
        kind, gateway_id="gw-1", device_id="dev-1", device_type=device_type, payload=payload
    )


@pytest.mark.parametrize(
    ("kind", "device_type", "payload", "category"),
    [
        ("button_pressed", "safety_alarm", None, "assistance"),
        ("button_pressed", "safety_alarm", {"button": "pull_cord"}, "assistance"),
        ("fall", "fall_detector", None, "fall"),
        ("fall", "safety_alarm", {"confidence": 0.4}, "fall"),
        ("smoke", "smoke_detector", None, "fire"),
        ("smoke", "smoke_detector", {"test": False}, "fire"),
    ],
)
def test_an_alarm_event_raises_a_critical_alarm(
    kind: str, device_type: str, payload: dict[str, Any] | None, category: str
) -> None:
    trigger = trigger_for(_event(kind, device_type, payload))

    assert trigger == AlarmTrigger(category, Priority.CRITICAL)


def test_a_smoke_detector_self_test_raises_nothing() -> None:
    assert trigger_for(_event("smoke", "smoke_detector", {"test": True})) is None


@pytest.mark.parametrize(
    ("kind", "device_type"),
    [("motion", "motion_sensor"), ("heartbeat", "gateway"), ("alarm_cancelled", "safety_alarm")],
)
def test_other_events_raise_nothing(kind: str, device_type: str) -> None:
    assert trigger_for(_event(kind, device_type)) is None
