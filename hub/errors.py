"""Errors raised by the hub.

TelecareError (devices.errors)
└── HubError
    ├── MigrationError         a migration could not be applied
    ├── ConfigurationError     settings or an import file that cannot work
    ├── NotFoundError          no such alarm, resident, ...
    └── ConflictError          a state change the alarm's state does not allow
"""

from __future__ import annotations

from devices.errors import TelecareError


class HubError(TelecareError):
    """Root of the hub's own errors."""


class MigrationError(HubError):
    """A migration could not be applied, or the database does not match the code."""


class ConfigurationError(HubError):
    """Settings or an import file that cannot work; the message says what to fix."""


class NotFoundError(HubError):
    """The thing asked for does not exist."""
