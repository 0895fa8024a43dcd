"""Errors raised by the alarms package.

TelecareError (devices.errors)
└── AlarmError
    └── InvalidTransitionError   the alarm's state does not allow that action
"""

from __future__ import annotations

from devices.errors import TelecareError


class AlarmError(TelecareError):
    """Root of the alarm package's errors."""


class InvalidTransitionError(AlarmError):
    """An action that the alarm's current state does not allow (HTTP 409 at the API)."""

    def __init__(self, state: str, action: str) -> None:
        super().__init__(f"an alarm that is {state} cannot be given '{action}'")
        self.state = state
        self.action = action
