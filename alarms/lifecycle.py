"""The alarm state machine (ARCHITECTURE.md, "Alarms"). Pure: it decides, it does not act.

    raised ──acknowledge──▶ acknowledged ──presence──▶ on_site ──resolve──▶ resolved
      │                          │  └──────────────resolve (remotely, by phone)──▶ resolved
      └──────cancel──────────────┴──cancel──▶ cancelled

Presence requires acknowledgement first: the person who goes is the person who took
the alarm. Resolving from ``acknowledged`` is the remote resolution DOMAIN.md describes
(handled by phone, no visit needed); it still needs a cause code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from alarms.errors import InvalidTransitionError


class AlarmState(StrEnum):
    RAISED = "raised"
    ACKNOWLEDGED = "acknowledged"
    ON_SITE = "on_site"
    RESOLVED = "resolved"
    CANCELLED = "cancelled"


class AlarmAction(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    PRESENCE = "presence"
    RESOLVE = "resolve"
    CANCEL = "cancel"


class Priority(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    TECHNICAL = "technical"


OPEN_STATES = frozenset({AlarmState.RAISED, AlarmState.ACKNOWLEDGED, AlarmState.ON_SITE})

TRANSITIONS: dict[tuple[AlarmState, AlarmAction], AlarmState] = {
    (AlarmState.RAISED, AlarmAction.ACKNOWLEDGE): AlarmState.ACKNOWLEDGED,
    (AlarmState.ACKNOWLEDGED, AlarmAction.PRESENCE): AlarmState.ON_SITE,
    (AlarmState.ACKNOWLEDGED, AlarmAction.RESOLVE): AlarmState.RESOLVED,
    (AlarmState.ON_SITE, AlarmAction.RESOLVE): AlarmState.RESOLVED,
    (AlarmState.RAISED, AlarmAction.CANCEL): AlarmState.CANCELLED,
    (AlarmState.ACKNOWLEDGED, AlarmAction.CANCEL): AlarmState.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class Transition:
    """A decided state change, to be recorded with who, when and why."""

    from_state: AlarmState
    to_state: AlarmState
    action: AlarmAction
    actor: str
    at: datetime
    reason: str | None = None


def decide(
    state: AlarmState,
    action: AlarmAction,
    *,
    actor: str,
    at: datetime,
    reason: str | None = None,
) -> Transition:
    """The transition ``action`` makes from ``state``, or ``InvalidTransitionError``."""
    to_state = TRANSITIONS.get((state, action))
    if to_state is None:
        raise InvalidTransitionError(state.value, action.value)
    return Transition(state, to_state, action, actor, at, reason)
