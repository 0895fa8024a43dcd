"""Dispenser messages to canonical events, and hub commands to dispenser commands.

Which message becomes which event is a table (``EVENT_RULES``): adding a message that
reports something adds a row. The event's ``time`` is the device's clock from the frame
(the gateway's ``now`` if the device's clock is not set) and ``gateway_time`` is ``now``,
so the hub sees both clocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Any

from devices.dispenser.codec import (
    Battery,
    Command,
    DoseDue,
    DoseMissed,
    DoseTaken,
    Empty,
    Frame,
    Jammed,
    Message,
    PowerLost,
    PowerRestored,
    RefillNeeded,
    ReplyStatus,
    RunTest,
    ScheduledDose,
    SetSchedule,
    SyncClock,
    Tamper,
    TestReply,
)
from devices.dispenser.session import CommandFailed, CommandSucceeded
from devices.errors import DeviceError
from devices.events import DeviceEvent, DeviceType, EventKind, parse_event
from devices.gateway import CommandResult, GatewayCommand
from devices.ids import uuid7

_Rule = Callable[[Any], list[tuple[EventKind, dict[str, Any]]]]


def _dose(kind: EventKind) -> _Rule:
    def rule(message: DoseDue | DoseTaken | DoseMissed) -> list[tuple[EventKind, dict[str, Any]]]:
        return [(kind, {"dose_id": message.dose_id, "scheduled_for": message.scheduled_for})]

    return rule


def _plain(kind: EventKind) -> _Rule:
    return lambda _message: [(kind, {})]


def _battery(message: Battery) -> list[tuple[EventKind, dict[str, Any]]]:
    reading = {"level_percent": message.level_percent, "voltage": message.voltage_mv / 1000}
    events = [(EventKind.BATTERY_LEVEL, reading)]
    if message.vkp is not None:  # the device judged it low (VKP 1.17) or empty (1.18)
        events.append((EventKind.BATTERY_LOW, dict(reading)))
    return events


def _test(message: TestReply) -> list[tuple[EventKind, dict[str, Any]]]:
    return [(EventKind.TEST_ALARM, {})] if message.status is ReplyStatus.OK else []


EVENT_RULES: dict[type[Message], _Rule] = {
    DoseDue: _dose(EventKind.DOSE_DUE),
    DoseTaken: _dose(EventKind.DOSE_TAKEN),
    DoseMissed: _dose(EventKind.DOSE_MISSED),
    RefillNeeded: lambda m: [(EventKind.REFILL_NEEDED, {"doses_left": m.doses_left})],
    Empty: _plain(EventKind.EMPTY),
    Jammed: _plain(EventKind.JAMMED),
    Tamper: _plain(EventKind.TAMPER),
    PowerLost: _plain(EventKind.POWER_LOST),
    PowerRestored: _plain(EventKind.POWER_RESTORED),
    Battery: _battery,
    TestReply: _test,
}
"""Messages that report something, and the canonical events each becomes. Heartbeats,
ACK, NAK, commands and the other replies are not events."""


def to_events(
    frame: Frame | Message, *, gateway_id: str, device_id: str, now: datetime
) -> list[DeviceEvent]:
    """The canonical events a received frame (or its message) stands for; [] for none.

    ``now`` is the gateway's clock at receipt (timezone-aware). Each event gets a new
    UUIDv7, made here: call this once per received message, and store the result.
    """
    message = frame.message if isinstance(frame, Frame) else frame
    rule = EVENT_RULES.get(type(message))
    if rule is None:
        return []
    device_time = getattr(message, "time", None) or now
    return [
        parse_event(
            {
                "id": uuid7(),
                "time": device_time,
                "gateway_time": now,
                "gateway_id": gateway_id,
                "device_id": device_id,
                "device_type": DeviceType.MEDICINE_DISPENSER,
                "kind": kind,
                "payload": payload,
            }
        )
        for kind, payload in rule(message)
    ]


# --- hub commands ---------------------------------------------------------------------


class DispenserCommandError(DeviceError):
    """A hub command that cannot become a dispenser command; ``str()`` says which param."""


_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def command_from_gateway(command: GatewayCommand, *, now: datetime, zone: tzinfo = UTC) -> Command:
    """The protocol command for a hub command to a dispenser.

    ``dispenser_schedule`` becomes ``SetSchedule`` (times are the resident's local
    wall-clock times), ``sync_clock`` becomes ``SyncClock`` with ``now`` (the gateway's
    UTC clock, to the second) and the offset of ``zone`` at ``now``, ``test_alarm``
    becomes ``RunTest``. Raises ``DispenserCommandError`` for anything else.
    """
    if command.kind == "dispenser_schedule":
        return _schedule(command.params)
    if command.kind in ("sync_clock", "test_alarm"):
        if command.params:
            raise DispenserCommandError(f"{command.kind} takes no params, got {command.params}")
        return _sync_clock(now, zone) if command.kind == "sync_clock" else RunTest()
    raise DispenserCommandError(f"a medicine dispenser cannot carry out {command.kind!r}")


def _sync_clock(now: datetime, zone: tzinfo) -> SyncClock:
    if now.utcoffset() is None:
        raise DispenserCommandError("now must be timezone-aware")
    offset = now.astimezone(zone).utcoffset() or timedelta(0)
    try:
        return SyncClock(now.replace(microsecond=0), offset // timedelta(minutes=1))
    except (ValueError, TypeError) as exc:
        raise DispenserCommandError(f"sync_clock: {exc}") from None


def _schedule(params: dict[str, Any]) -> SetSchedule:
    if set(params) != {"doses"} or not isinstance(params["doses"], list):
        raise DispenserCommandError(
            f'dispenser_schedule params must be {{"doses": [...]}}, got keys {sorted(params)}'
        )
    doses = []
    for index, item in enumerate(params["doses"]):
        where = f"params.doses[{index}]"
        if not isinstance(item, dict) or set(item) != {"dose_id", "time"}:
            raise DispenserCommandError(f'{where} must be {{"dose_id": str, "time": "HH:MM"}}')
        match = _HHMM.fullmatch(item["time"]) if isinstance(item["time"], str) else None
        if match is None:
            raise DispenserCommandError(f"{where}.time must be HH:MM, got {item['time']!r}")
        try:
            doses.append(ScheduledDose(item["dose_id"], time(int(match[1]), int(match[2]))))
        except (ValueError, TypeError) as exc:
            raise DispenserCommandError(f"{where}.dose_id: {exc}") from None
    try:
        return SetSchedule(tuple(doses))
    except (ValueError, TypeError) as exc:
        raise DispenserCommandError(f"params.doses: {exc}") from None


def command_result(
    command: GatewayCommand, outcome: CommandSucceeded | CommandFailed, *, now: datetime
) -> CommandResult:
    """The answer for the hub (``command-results`` topic) once the dispenser has answered."""
    if isinstance(outcome, CommandSucceeded):
        return CommandResult(command_id=command.command_id, ok=True, time=now)
    error = f"dispenser: {outcome.reason}"
    return CommandResult(command_id=command.command_id, ok=False, error=error, time=now)
