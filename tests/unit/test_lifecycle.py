"""The alarm state machine, over every (state, action) pair."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import product

import pytest

from alarms.errors import InvalidTransitionError
from alarms.lifecycle import OPEN_STATES, TRANSITIONS, AlarmAction, AlarmState, decide

S, A = AlarmState, AlarmAction

# Written from the diagram in alarms/lifecycle.py, not read from TRANSITIONS.
DOCUMENTED: dict[tuple[AlarmState, AlarmAction], AlarmState] = {
    (S.RAISED, A.ACKNOWLEDGE): S.ACKNOWLEDGED,
    (S.RAISED, A.CANCEL): S.CANCELLED,
    (S.ACKNOWLEDGED, A.PRESENCE): S.ON_SITE,
    (S.ACKNOWLEDGED, A.RESOLVE): S.RESOLVED,  # remote resolution, by phone
    (S.ACKNOWLEDGED, A.CANCEL): S.CANCELLED,
    (S.ON_SITE, A.RESOLVE): S.RESOLVED,
}

ALL_PAIRS = list(product(AlarmState, AlarmAction))
AT = datetime(2024, 11, 3, 2, 14, 5, tzinfo=UTC)


def test_the_table_is_the_documented_diagram() -> None:
    assert TRANSITIONS == DOCUMENTED


@pytest.mark.parametrize(("state", "action"), [p for p in ALL_PAIRS if p in DOCUMENTED])
def test_an_allowed_action_moves_to_the_documented_state(
    state: AlarmState, action: AlarmAction
) -> None:
    transition = decide(state, action, actor="nurse-17", at=AT, reason="cause-42")

    assert transition.from_state is state
    assert transition.to_state is DOCUMENTED[state, action]
    assert transition.action is action
    assert transition.actor == "nurse-17"
    assert transition.at == AT
    assert transition.reason == "cause-42"


def test_reason_is_optional() -> None:
    transition = decide(S.RAISED, A.ACKNOWLEDGE, actor="nurse-17", at=AT)

    assert transition.reason is None


@pytest.mark.parametrize(("state", "action"), [p for p in ALL_PAIRS if p not in DOCUMENTED])
def test_any_other_action_is_refused(state: AlarmState, action: AlarmAction) -> None:
    with pytest.raises(InvalidTransitionError) as caught:
        decide(state, action, actor="nurse-17", at=AT)

    assert caught.value.state == state.value
    assert caught.value.action == action.value
    assert state.value in str(caught.value)
    assert action.value in str(caught.value)


@pytest.mark.parametrize("state", [S.RESOLVED, S.CANCELLED])
def test_a_closed_alarm_allows_nothing(state: AlarmState) -> None:
    assert state not in OPEN_STATES
    for action in AlarmAction:
        with pytest.raises(InvalidTransitionError):
            decide(state, action, actor="nurse-17", at=AT)


def test_every_open_state_has_a_way_out() -> None:
    assert {S.RAISED, S.ACKNOWLEDGED, S.ON_SITE} == OPEN_STATES
    for state in OPEN_STATES:
        assert any(from_state is state for from_state, _ in TRANSITIONS)
