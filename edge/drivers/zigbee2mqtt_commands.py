"""Lock-command confirmation for the Zigbee2MQTT driver (``edge.drivers.zigbee2mqtt``).

A ``lock`` / ``unlock`` command waits as a ``Pending`` for the lock to report the
requested position. ``confirm`` reads one state message from that lock (and the events
the translator made from it): it fails the command on a jam or a remote
``unlock_failed``, confirms it when the position is reached, and tags the ``locked`` /
``unlocked`` event that confirms it with the command's id (only when the event's source
is ``remote`` or ``unknown``: a keypad unlock at the same moment is someone else's).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

from devices.events import DeviceEvent, EventKind, LockPayload
from devices.zigbee2mqtt import DeviceState
from devices.zigbee2mqtt.codec import LockAction

Position = Literal["locked", "unlocked"]

_POSITION_BY_LOCK_STATE: dict[str, Position] = {"locked": "locked", "unlocked": "unlocked"}
_POSITION_BY_STATE: dict[str, Position] = {
    **dict.fromkeys(("LOCK", "LOCKED"), "locked"),
    **dict.fromkeys(("UNLOCK", "UNLOCKED"), "unlocked"),
}
ACTIONS: dict[str, tuple[LockAction, Position]] = {
    "lock": ("lock", "locked"),
    "unlock": ("unlock", "unlocked"),
}
"""Command kind: the action to publish and the position that confirms it."""
_OURS = frozenset({"remote", "unknown"})
"""Lock event sources that may be our own command (Zigbee ``rf``, or not reported)."""


@dataclass(slots=True)
class Pending:
    """A lock command waiting for the lock to report the requested position."""

    command_id: UUID
    position: Position
    outcome: asyncio.Future[str | None]
    """Resolves to None when confirmed, or to the reason the command failed."""


@dataclass(frozen=True, slots=True)
class Settle:
    """A pending command decided by a message, to resolve once its events are stored."""

    pending: Pending
    error: str | None


@dataclass(frozen=True, slots=True)
class _Verdict:
    position: Position | None = None
    failure: str | None = None


def _verdict(requested: Position, state: DeviceState, events: list[DeviceEvent]) -> _Verdict:
    """What one state message from a lock says about a pending command.

    A jam fails it, and so does an ``unlock_failed`` from a remote source when it asks to
    unlock. A ``locked`` / ``unlocked`` event the translator made from the message gives the
    position. Otherwise the message's ``lock_state`` (then ``state``) does, unless the
    message carries an operation event (``action``): its cached position is the old one.
    """
    verdict = _Verdict()
    for event in events:
        if event.kind == EventKind.JAMMED:
            return _Verdict(failure="the lock reported a jam")
        if (
            event.kind == EventKind.UNLOCK_FAILED
            and requested == "unlocked"
            and _source(event) in _OURS
        ):
            reason = getattr(event.payload, "reason", "unknown")
            return _Verdict(failure=f"the lock refused to unlock: {reason}")
        if event.kind in (EventKind.LOCKED, EventKind.UNLOCKED):
            verdict = _Verdict("locked" if event.kind == EventKind.LOCKED else "unlocked")
    if verdict.position is not None or state.action:
        return verdict
    position = _POSITION_BY_LOCK_STATE.get(state.lock_state or "")
    if position is None and state.lock_state != "not_fully_locked":
        position = _POSITION_BY_STATE.get(state.state or "")
    return _Verdict(position)


def _source(event: DeviceEvent) -> str:
    payload = event.payload
    return payload.source if isinstance(payload, LockPayload) else "unknown"


def confirm(
    pending: Pending | None, state: DeviceState, events: list[DeviceEvent]
) -> Settle | None:
    """Decide a lock's pending command from one message; tag the event it caused.

    ``events`` (the message's events) is changed in place: the confirming event gets
    the command's id. None if the message decides nothing.
    """
    if pending is None or pending.outcome.done():
        return None
    verdict = _verdict(pending.position, state, events)
    if verdict.failure is not None:
        return Settle(pending, verdict.failure)
    if verdict.position != pending.position:
        return None
    kind = EventKind.LOCKED if pending.position == "locked" else EventKind.UNLOCKED
    for i, event in enumerate(events):
        if event.kind == kind and _source(event) in _OURS:
            payload = event.payload.model_copy(update={"command_id": pending.command_id})
            events[i] = event.model_copy(update={"payload": payload})
    return Settle(pending, None)
