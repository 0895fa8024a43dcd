"""Hub-side supervision of gateways: a dead gateway raises one technical alarm.

An edge supervises its own devices and sends ``device_offline``/``device_online`` for
them; nobody behind a dead gateway can say it is dead, so the hub watches the gateways.
A gateway is down when its retained status (or its last will) says ``offline``, or when
nothing at all has come from it for its timeout (``gateways.supervision_timeout_s``, else
``TELECARE_SUPERVISION__GATEWAY_TIMEOUT_S``). The hub then writes a ``device_offline``
event for the gateway itself through the ordinary event path: it is stored, and the rule
table turns it into one technical ``offline`` alarm for the site. When the gateway is
heard again, a ``device_online`` event clears and resolves that alarm (hub/store/
clearing.py), with both events on the alarm's timeline.

Silence is not judged for a grace period after the hub starts (the broker's backlog is
still arriving): a hub restart pages nobody. With several hub processes, one at a time
does the check (a transaction-level advisory lock), so a gateway is flagged once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool
import structlog

from alarms.rules import OFFLINE
from devices.events import DeviceEvent, DeviceType, EventKind, make_event
from hub.settings import SupervisionSettings
from hub.store.writer import EventWriter, FlushRequest

log = structlog.get_logger(__name__)

_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('telecare.gateway_supervision'))"

_GATEWAYS = """
SELECT g.id,
       g.status = 'offline' AS said_offline,
       coalesce(g.last_seen_at < now() - make_interval(
           secs => coalesce(g.supervision_timeout_s, %(timeout_s)s)), false) AS silent,
       g.last_seen_at,
       (SELECT t.kind FROM alarms a JOIN alarm_triggers t ON t.alarm_id = a.id
         WHERE a.gateway_id = g.id AND a.category = %(category)s AND t.device_id = g.id
           AND a.state IN ('raised', 'acknowledged', 'on_site')
         ORDER BY t.event_time DESC, t.received_at DESC LIMIT 1) AS latest
FROM gateways g
WHERE g.status <> 'unknown' OR g.last_seen_at IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class GatewayCheck:
    gateway_id: str
    said_offline: bool
    silent: bool
    last_seen_at: datetime | None
    latest: str | None
    """The latest supervision event on the gateway's open offline alarm, if any."""


def decide(check: GatewayCheck, *, judge_silence: bool) -> EventKind | None:
    """What to write for one gateway: ``device_offline``, ``device_online`` or nothing."""
    down = check.said_offline or (judge_silence and check.silent)
    flagged = check.latest == EventKind.DEVICE_OFFLINE
    if down and not flagged:
        return EventKind.DEVICE_OFFLINE
    if flagged and not check.said_offline and not check.silent:
        return EventKind.DEVICE_ONLINE
    return None


class GatewaySupervisor:
    """The periodic check; ``run()`` until cancelled, ``check_once()`` for one pass."""

    def __init__(
        self, pool: psycopg_pool.AsyncConnectionPool[Any], settings: SupervisionSettings
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.writer = EventWriter()
        self.started = time.monotonic()
        grace = settings.restart_grace_s
        self.grace_s = settings.gateway_timeout_s if grace is None else grace

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self.check_once()
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                log.error("gateway_supervision_failed", error=str(exc))

    async def check_once(self) -> list[DeviceEvent]:
        """One pass: the supervision events written (empty if another hub holds the lock)."""
        judge_silence = time.monotonic() - self.started >= self.grace_s
        written: list[DeviceEvent] = []
        async with self.pool.connection() as conn, conn.transaction():
            locked = await (await conn.execute(_LOCK)).fetchone()
            if not locked or not locked[0]:
                return written
            cur = await conn.execute(
                _GATEWAYS,
                {"timeout_s": self.settings.gateway_timeout_s, "category": OFFLINE},
            )
            checks = [GatewayCheck(*row) for row in await cur.fetchall()]
            now = datetime.now(UTC)
            for check in checks:
                kind = decide(check, judge_silence=judge_silence)
                if kind is None:
                    continue
                event = make_event(
                    kind,
                    gateway_id=check.gateway_id,
                    device_id=check.gateway_id,
                    device_type=DeviceType.GATEWAY,
                    time=now,
                    payload={"last_seen": check.last_seen_at} if check.last_seen_at else {},
                )
                request = FlushRequest(events=[(event, now)], from_gateways=False)
                await self.writer.write(conn, request)
                written.append(event)
                log.warning(
                    "gateway_offline" if kind == EventKind.DEVICE_OFFLINE
                    else "gateway_back_online",
                    gateway_id=check.gateway_id,
                    said_offline=check.said_offline,
                    silent=check.silent,
                )
        return written
