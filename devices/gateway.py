"""Messages a gateway sends about itself (``telecare/v1/{gateway_id}/status``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import UUID7, BaseModel, ConfigDict, Field

from devices.events import Identifier, UtcDatetime


class GatewayStatus(BaseModel):
    """Retained status, and the gateway's last will (``state: offline``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: Literal["online", "offline"]
    time: UtcDatetime | None = Field(
        default=None,
        description="Gateway clock at publication; a last will set at connect may omit it.",
    )
    version: str | None = Field(default=None, max_length=64)
    queue_depth: int | None = Field(default=None, ge=0)


CommandKind = Literal["unlock", "lock", "dispenser_schedule", "sync_clock", "test_alarm"]
"""What the hub may ask a gateway to do (``telecare/v1/{gateway_id}/commands``)."""


class GatewayCommand(BaseModel):
    """A command from the hub to one device behind a gateway.

    ``params`` depends on ``kind``: ``dispenser_schedule`` carries
    ``{"doses": [{"dose_id": str, "time": "HH:MM"}, ...]}``; the others carry nothing.
    An edge refuses a command whose ``expires_at`` has passed (an unlock must never be
    carried out late).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id: UUID7
    kind: CommandKind
    device_id: Identifier
    params: dict[str, Any] = Field(default_factory=dict)
    expires_at: UtcDatetime


class CommandResult(BaseModel):
    """The edge's answer (``telecare/v1/{gateway_id}/command-results``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id: UUID7
    ok: bool
    error: str | None = Field(default=None, max_length=500)
    time: UtcDatetime
