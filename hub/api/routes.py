"""``/api/v1`` routes: alarms (list, detail, the four actions), gateways, quarantine.

Until log-in arrives (the console issue) the acting person is named in the request body
(``actor``); every transition records it with the time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import psycopg
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from alarms.lifecycle import AlarmAction
from hub.store import operations
from hub.store.alarms import AlarmFilter, PgAlarmStore

router = APIRouter()
_store = PgAlarmStore()

AlarmStateName = Literal["raised", "acknowledged", "on_site", "resolved", "cancelled"]
PriorityName = Literal["critical", "high", "normal", "technical"]


async def _connection(request: Request) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with request.app.state.runtime.pool.connection() as conn:
        yield conn


Conn = Annotated[psycopg.AsyncConnection[Any], Depends(_connection)]


# --- schemas --------------------------------------------------------------------------


class ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str = Field(min_length=1, max_length=64, description="Staff id of the person acting.")
    note: str | None = Field(default=None, max_length=2000)


class ResolveRequest(ActionRequest):
    cause: str = Field(
        min_length=1,
        max_length=40,
        description="Cause code, e.g. 'fall', 'assistance', 'false_alarm', 'technical'.",
    )


class TransitionPublic(BaseModel):
    at: datetime
    from_state: str | None
    to_state: str
    actor: str
    reason: str | None


class TriggerPublic(BaseModel):
    event_id: UUID
    event_time: datetime
    kind: str
    device_id: str
    received_at: datetime


class AlarmPublic(BaseModel):
    id: UUID
    site_id: str
    resident_id: str | None
    gateway_id: str
    device_id: str
    category: str
    priority: PriorityName
    state: AlarmStateName
    trigger_event_id: UUID
    trigger_time: datetime
    raised_at: datetime
    updated_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    on_site_at: datetime | None
    closed_at: datetime | None
    cause_code: str | None
    note: str | None
    trigger_count: int


class AlarmDetail(AlarmPublic):
    transitions: list[TransitionPublic]
    triggers: list[TriggerPublic]


class GatewayPublic(BaseModel):
    id: str
    site_id: str
    status: str
    status_time: datetime | None
    status_changed_at: datetime | None
    version: str | None
    queue_depth: int | None


class QuarantinePublic(BaseModel):
    id: int
    received_at: datetime
    topic: str
    gateway_id: str | None
    reason: str
    detail: str
    payload_size: int


# --- alarms ---------------------------------------------------------------------------


@router.get("/alarms", tags=["alarms"])
async def list_alarms(
    conn: Conn,
    state: Annotated[list[AlarmStateName] | None, Query()] = None,
    priority: Annotated[list[PriorityName] | None, Query()] = None,
    site_id: str | None = None,
    open_only: Annotated[bool, Query(alias="open")] = False,
    before: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AlarmPublic]:
    """Alarms, newest first. ``open=true`` for the ones still being handled."""
    rows = await _store.list(
        conn,
        AlarmFilter(
            state=list(state) if state else None,
            priority=list(priority) if priority else None,
            site_id=site_id,
            open_only=open_only,
            before=before,
            limit=limit,
        ),
    )
    return [AlarmPublic.model_validate(row) for row in rows]


@router.get("/alarms/{alarm_id}", tags=["alarms"])
async def get_alarm(alarm_id: UUID, conn: Conn) -> AlarmDetail:
    """One alarm with its transitions (who, when, why) and the events that triggered it."""
    return AlarmDetail.model_validate(await _store.get(conn, alarm_id))


async def _act(
    conn: psycopg.AsyncConnection[Any],
    alarm_id: UUID,
    action: AlarmAction,
    body: ActionRequest,
    cause: str | None = None,
) -> AlarmDetail:
    await _store.apply(
        conn,
        alarm_id,
        action,
        actor=body.actor,
        at=datetime.now(UTC),
        reason=body.note,
        cause=cause,
    )
    return AlarmDetail.model_validate(await _store.get(conn, alarm_id))


@router.post("/alarms/{alarm_id}/acknowledge", tags=["alarms"])
async def acknowledge(alarm_id: UUID, body: ActionRequest, conn: Conn) -> AlarmDetail:
    """A staff member takes the alarm (raised → acknowledged)."""
    return await _act(conn, alarm_id, AlarmAction.ACKNOWLEDGE, body)


@router.post("/alarms/{alarm_id}/presence", tags=["alarms"])
async def presence(alarm_id: UUID, body: ActionRequest, conn: Conn) -> AlarmDetail:
    """Staff are with the resident (acknowledged → on_site)."""
    return await _act(conn, alarm_id, AlarmAction.PRESENCE, body)


@router.post("/alarms/{alarm_id}/resolve", tags=["alarms"])
async def resolve(alarm_id: UUID, body: ResolveRequest, conn: Conn) -> AlarmDetail:
    """Closed with a cause code (on_site, or acknowledged and handled remotely → resolved)."""
    return await _act(conn, alarm_id, AlarmAction.RESOLVE, body, cause=body.cause)


@router.post("/alarms/{alarm_id}/cancel", tags=["alarms"])
async def cancel(alarm_id: UUID, body: ActionRequest, conn: Conn) -> AlarmDetail:
    """A false alarm (raised or acknowledged → cancelled)."""
    return await _act(conn, alarm_id, AlarmAction.CANCEL, body)


# --- operations -----------------------------------------------------------------------


@router.get("/gateways", tags=["operations"])
async def list_gateways(conn: Conn) -> list[GatewayPublic]:
    """Registered gateways with their last reported status."""
    return [GatewayPublic.model_validate(row) for row in await operations.list_gateways(conn)]


@router.get("/quarantine", tags=["operations"])
async def list_quarantine(
    conn: Conn, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[QuarantinePublic]:
    """Messages that failed validation, newest first, with the reason."""
    rows = await operations.list_quarantine(conn, limit=limit)
    return [QuarantinePublic.model_validate(row) for row in rows]
