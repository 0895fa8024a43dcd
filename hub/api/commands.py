"""``/api/v1/commands``: send a command to a device behind a gateway, and follow it.

Until log-in arrives (the console issue) the person asking is named in the body
(``actor``), and every command is kept with who asked, why, and what came of it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from devices.events import Identifier
from devices.gateway import CommandKind
from hub import commands
from hub.api.routes import Conn
from hub.errors import NotFoundError

router = APIRouter()


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: Identifier
    gateway_id: Identifier | None = Field(
        default=None, description="Needed only if the device id exists behind several gateways."
    )
    kind: CommandKind
    params: dict[str, Any] = Field(
        default_factory=dict,
        description='dispenser_schedule: {"doses": [{"dose_id": "morning", "time": "08:00"}]}',
    )
    actor: str = Field(min_length=1, max_length=64, description="Staff id of the person asking.")
    reason: str | None = Field(default=None, max_length=500,
                               description="Why, e.g. 'visit', or the alarm id.")
    ttl_s: int = Field(default=60, ge=5, le=3600,
                       description="Seconds after which the edge must not carry it out.")


class CommandPublic(BaseModel):
    id: UUID
    gateway_id: str
    device_id: str
    kind: str
    params: dict[str, Any]
    actor: str
    reason: str | None
    created_at: datetime
    expires_at: datetime
    state: str = Field(description="pending, sent, succeeded, failed or expired")
    sent_at: datetime | None
    result_at: datetime | None
    result_time: datetime | None
    error: str | None


@router.post("/commands", status_code=202, response_model=CommandPublic)
async def send_command(body: CommandRequest, request: Request, conn: Conn) -> dict[str, Any]:
    """Record the command and publish it to the gateway; the result arrives later."""
    runtime = request.app.state.runtime
    if runtime.ingest is None:
        raise commands.CommandError("this hub process does not run the MQTT ingest", status=503)
    return await commands.send_command(
        conn, runtime.ingest,
        device_id=body.device_id, gateway_id=body.gateway_id, kind=body.kind,
        params=body.params, actor=body.actor, reason=body.reason, ttl_s=body.ttl_s,
    )


@router.get("/commands/{command_id}", response_model=CommandPublic)
async def get_command(command_id: UUID, conn: Conn) -> dict[str, Any]:
    found = await commands.get_command(conn, command_id)
    if found is None:
        raise NotFoundError(f"no command {command_id}")
    return found


@router.get("/commands", response_model=list[CommandPublic])
async def list_commands(
    conn: Conn,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    return await commands.list_commands(conn, device_id=device_id, limit=limit)
