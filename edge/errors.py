"""Errors raised by the edge package.

TelecareError (devices.errors)
└── EdgeError
    ├── ConfigError    the config file cannot be read or is wrong
    └── QueueError     the durable queue cannot be opened or written
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from devices.errors import TelecareError

if TYPE_CHECKING:
    from pathlib import Path


class EdgeError(TelecareError):
    """Root of the edge's own errors."""


class ConfigError(EdgeError):
    """The config file cannot be read or is wrong. ``problems`` holds one line per key."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        if len(problems) == 1:
            message = f"{path}: {problems[0]}"
        else:
            lines = "\n".join(f"  {problem}" for problem in problems)
            message = f"{path}: {len(problems)} problems:\n{lines}"
        super().__init__(message)


class QueueError(EdgeError):
    """The queue cannot be opened or written (disk full, locked by another process...)."""
