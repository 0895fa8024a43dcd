"""Alarms in PostgreSQL: reading them and applying state changes decided by ``alarms``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from alarms.lifecycle import AlarmAction, AlarmState, Transition, decide
from hub.errors import NotFoundError

_ALARM_COLUMNS = """
    a.id, a.site_id, a.resident_id, a.gateway_id, a.device_id, a.category, a.priority,
    a.state, a.trigger_event_id, a.trigger_time, a.raised_at, a.updated_at,
    a.acknowledged_at, a.acknowledged_by, a.on_site_at, a.closed_at, a.cause_code, a.note,
    a.trigger_count
"""

# Which timestamp columns an action sets, besides state.
_ACTION_COLUMNS: dict[AlarmAction, str] = {
    AlarmAction.ACKNOWLEDGE: "acknowledged_at = %(at)s, acknowledged_by = %(actor)s",
    AlarmAction.PRESENCE: "on_site_at = %(at)s",
    AlarmAction.RESOLVE: "closed_at = %(at)s, cause_code = %(cause)s, note = %(note)s",
    AlarmAction.CANCEL: "closed_at = %(at)s, note = %(note)s",
}


@dataclass(frozen=True)
class AlarmFilter:
    state: list[str] | None = None
    priority: list[str] | None = None
    site_id: str | None = None
    open_only: bool = False
    limit: int = 100
    before: datetime | None = None


class PgAlarmStore:
    """Reads and state changes of alarms, on a connection from the hub's pool."""

    async def list(
        self, conn: psycopg.AsyncConnection[Any], flt: AlarmFilter
    ) -> list[dict[str, Any]]:
        where: list[str] = ["TRUE"]
        params: dict[str, Any] = {"limit": flt.limit}
        if flt.open_only:
            where.append("a.state IN ('raised', 'acknowledged', 'on_site')")
        if flt.state:
            where.append("a.state = ANY(%(state)s)")
            params["state"] = flt.state
        if flt.priority:
            where.append("a.priority = ANY(%(priority)s)")
            params["priority"] = flt.priority
        if flt.site_id:
            where.append("a.site_id = %(site_id)s")
            params["site_id"] = flt.site_id
        if flt.before:
            where.append("a.raised_at < %(before)s")
            params["before"] = flt.before
        query = (
            f"SELECT {_ALARM_COLUMNS} FROM alarms a WHERE {' AND '.join(where)}"
            " ORDER BY a.raised_at DESC LIMIT %(limit)s"
        )
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query.encode(), params)
            return await cur.fetchall()

    async def get(self, conn: psycopg.AsyncConnection[Any], alarm_id: UUID) -> dict[str, Any]:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {_ALARM_COLUMNS} FROM alarms a WHERE a.id = %s".encode(), (alarm_id,)
            )
            alarm = await cur.fetchone()
            if alarm is None:
                raise NotFoundError(f"no alarm {alarm_id}")
            await cur.execute(
                "SELECT at, from_state, to_state, actor, reason FROM alarm_transitions"
                " WHERE alarm_id = %s ORDER BY at, id",
                (alarm_id,),
            )
            alarm["transitions"] = await cur.fetchall()
            await cur.execute(
                "SELECT event_id, event_time, kind, device_id, received_at FROM alarm_triggers"
                " WHERE alarm_id = %s ORDER BY event_time",
                (alarm_id,),
            )
            alarm["triggers"] = await cur.fetchall()
        return alarm

    async def apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        alarm_id: UUID,
        action: AlarmAction,
        *,
        actor: str,
        at: datetime,
        reason: str | None = None,
        cause: str | None = None,
    ) -> Transition:
        """Lock the alarm, let the state machine decide, record the transition."""
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT state FROM alarms WHERE id = %s FOR UPDATE", (alarm_id,)
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"no alarm {alarm_id}")
            transition = decide(AlarmState(row[0]), action, actor=actor, at=at, reason=reason)
            await conn.execute(
                f"UPDATE alarms SET state = %(state)s, updated_at = %(at)s,"
                f" {_ACTION_COLUMNS[action]} WHERE id = %(id)s".encode(),
                {
                    "state": transition.to_state.value,
                    "at": at,
                    "actor": actor,
                    "cause": cause,
                    "note": reason,
                    "id": alarm_id,
                },
            )
            await conn.execute(
                "INSERT INTO alarm_transitions (alarm_id, at, from_state, to_state, actor, reason)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    alarm_id,
                    at,
                    transition.from_state.value,
                    transition.to_state.value,
                    actor,
                    reason if cause is None else f"{cause}: {reason or ''}".rstrip(": "),
                ),
            )
        return transition
