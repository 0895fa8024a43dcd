"""Technical alarms that resolve by themselves when their condition clears.

A clearing event (``alarms.rules.CLEARING_RULES``: a device back online, mains power
back, a nurse call reset at the bed) is added to the open alarm's timeline as a trigger
row, and the alarm resolves (actor ``system``) once, for every device that triggered it,
the latest trigger is a clearing one. Several devices offline behind one alarm therefore
keep it open until the last of them is back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from alarms.rules import CLEARING_KINDS
from devices.events import DeviceEvent

_APPEND_CLEARING = """
WITH device AS (
    SELECT resident_id FROM devices WHERE gateway_id = %(gateway_id)s AND id = %(device_id)s
), target AS (
    SELECT a.id, a.state FROM alarms a
    WHERE a.site_id = %(site_id)s
      AND coalesce(a.resident_id, '') = coalesce((SELECT resident_id FROM device), '')
      AND a.category = %(category)s
      AND a.state IN ('raised', 'acknowledged', 'on_site')
    FOR UPDATE
), appended AS (
    INSERT INTO alarm_triggers (alarm_id, event_id, event_time, kind, device_id, received_at)
    SELECT id, %(event_id)s, %(event_time)s, %(kind)s, %(device_id)s, %(received_at)s
    FROM target
    ON CONFLICT DO NOTHING
)
SELECT id, state FROM target
"""

# Every device of the alarm whose latest trigger (the one just appended included: this
# runs as a separate statement) is not a clearing event keeps it open.
_STILL_UNCLEARED = """
SELECT count(*) FROM (
    SELECT DISTINCT ON (device_id) device_id, kind FROM alarm_triggers
    WHERE alarm_id = %(alarm_id)s
    ORDER BY device_id, event_time DESC, received_at DESC
) latest
WHERE kind <> ALL(%(clearing)s)
"""

_RESOLVE = """
WITH resolved AS (
    UPDATE alarms SET state = 'resolved', closed_at = now(), updated_at = now(),
                      cause_code = 'condition_cleared'
    WHERE id = %(alarm_id)s AND state IN ('raised', 'acknowledged', 'on_site')
    RETURNING id
)
INSERT INTO alarm_transitions (alarm_id, at, from_state, to_state, actor, reason)
SELECT id, now(), %(from_state)s, 'resolved', 'system', %(reason)s FROM resolved
"""


async def clear(
    conn: psycopg.AsyncConnection[Any],
    *,
    site_id: str | None,
    category: str,
    event: DeviceEvent,
    received_at: datetime,
) -> UUID | None:
    """Record a clearing event; return the alarm's id if that resolved it."""
    cur = await conn.execute(
        _APPEND_CLEARING,
        {
            "gateway_id": event.gateway_id,
            "device_id": event.device_id,
            "site_id": site_id,
            "category": category,
            "event_id": event.id,
            "event_time": event.time,
            "kind": event.kind,
            "received_at": received_at,
        },
    )
    row = await cur.fetchone()
    if row is None:
        return None  # nothing open: the condition never became an alarm
    alarm_id, state = row
    cur = await conn.execute(
        _STILL_UNCLEARED,
        {"alarm_id": alarm_id, "clearing": sorted(CLEARING_KINDS[category])},
    )
    uncleared = await cur.fetchone()
    if uncleared is not None and uncleared[0] > 0:
        return None
    await conn.execute(
        _RESOLVE,
        {
            "alarm_id": alarm_id,
            "from_state": state,
            "reason": f"condition cleared: {event.kind} from device {event.device_id}",
        },
    )
    return UUID(str(alarm_id))
