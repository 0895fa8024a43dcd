"""Errors raised by the devices package.

TelecareError
└── DeviceError
    └── InvalidEventError      an event or envelope that fails validation
"""

from __future__ import annotations


class TelecareError(Exception):
    """Root of every error the project raises on purpose."""


class DeviceError(TelecareError):
    """Something about a device, its events or its wire format is wrong."""


class InvalidEventError(DeviceError):
    """An event or an envelope failed validation.

    ``reason`` is a short machine-readable code (used as a metric label and stored in
    quarantine); ``str(error)`` is a message a person can act on.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
