"""Messages a gateway sends about itself (``telecare/v1/{gateway_id}/status``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from devices.events import UtcDatetime


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
