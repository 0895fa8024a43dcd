"""One flush of the ingest: events, alarms, quarantine and gateway status in one commit.

Everything a batch of MQTT messages asks for is written in a single transaction, and
only after it commits are those messages acknowledged to the broker. So an event is
either stored (with the alarm it raised) and acknowledged, or neither, and the broker
redelivers it.

Events go in with COPY (binary) straight into ``events`` (a batch of a few rows, such as
an alarm, goes in as one multi-row INSERT ... ON CONFLICT DO NOTHING instead). If the
batch holds an id that is already stored (a redelivery), that COPY fails on the primary
key and the transaction is done again through a staging table and ``INSERT ... ON
CONFLICT DO NOTHING``: duplicates are counted, never stored twice. Redeliveries are rare,
so the fast path is the usual one.

``EventWriter(copy=False)`` (setting ``TELECARE_STORAGE__USE_COPY=false``) never uses
COPY: every batch goes in as multi-row INSERTs of up to ``INSERT_BATCH_ROWS`` rows. That
is for servers whose wire protocol has no COPY FROM STDIN, such as PGlite behind its
socket.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
import structlog
from psycopg.types.json import Jsonb

from alarms.rules import AlarmTrigger, clears, trigger_for
from devices.events import DeviceEvent
from devices.gateway import CommandResult, GatewayStatus
from devices.ids import uuid7
from hub.commands import record_results
from hub.store import clearing

log = structlog.get_logger(__name__)

EVENT_COLUMNS = (
    "id, time, gateway_time, received_at, gateway_id, device_id, device_type, kind, payload"
)
_EVENT_TYPES = [
    "uuid", "timestamptz", "timestamptz", "timestamptz", "text", "text", "text", "text", "jsonb",
]
SMALL_BATCH_ROWS = 20
"""Up to this many rows a batch is one INSERT (one round trip); above it, COPY."""
INSERT_BATCH_ROWS = 1000
"""Rows per INSERT statement when COPY is off (9 parameters a row; the limit is 65535)."""
_ROW_PLACEHOLDER = "(" + ", ".join(["%s"] * 9) + ")"
_COPY_EVENTS = f"COPY events ({EVENT_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_COPY_STAGE = f"COPY events_stage ({EVENT_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_CREATE_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS events_stage"
    " (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_INSERT_FROM_STAGE = (
    f"INSERT INTO events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM events_stage"
    " ON CONFLICT DO NOTHING RETURNING id"
)
# Raise an alarm, or join the open one of the same resident and category, in one round
# trip: the device's resident, the alarm row, the trigger and (for a new alarm) the
# first transition. xmax = 0 tells an inserted row from an updated one.
_RAISE_ALARM = """
WITH device AS (
    SELECT resident_id FROM devices WHERE gateway_id = %(gateway_id)s AND id = %(device_id)s
), alarm AS (
    INSERT INTO alarms (id, site_id, resident_id, gateway_id, device_id, category, priority,
                        state, trigger_event_id, trigger_time, raised_at, updated_at)
    VALUES (%(id)s, %(site_id)s, (SELECT resident_id FROM device), %(gateway_id)s,
            %(device_id)s, %(category)s, %(priority)s, 'raised', %(event_id)s,
            %(event_time)s, now(), now())
    ON CONFLICT (site_id, (coalesce(resident_id, '')), category)
        WHERE state IN ('raised', 'acknowledged', 'on_site')
    DO UPDATE SET
        trigger_count = alarms.trigger_count + 1,
        updated_at = now(),
        priority = CASE
            WHEN array_position(%(ranks)s::text[], excluded.priority)
                 > array_position(%(ranks)s::text[], alarms.priority)
            THEN excluded.priority ELSE alarms.priority END
    RETURNING id, priority, (xmax = 0) AS raised
), trigger AS (
    INSERT INTO alarm_triggers (alarm_id, event_id, event_time, kind, device_id, received_at)
    SELECT id, %(event_id)s, %(event_time)s, %(kind)s, %(device_id)s, %(received_at)s
    FROM alarm
    ON CONFLICT DO NOTHING
), transition AS (
    INSERT INTO alarm_transitions (alarm_id, at, from_state, to_state, actor, reason)
    SELECT id, now(), NULL, 'raised', 'system', %(reason)s FROM alarm WHERE raised
)
SELECT id, priority, raised FROM alarm
"""
_PRIORITY_RANKS = ["technical", "normal", "high", "critical"]


def _identity(data: bytes) -> bytes:
    return data


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    topic: str
    reason: str
    detail: str
    payload: bytes
    payload_size: int
    gateway_id: str | None = None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    gateway_id: str
    status: GatewayStatus


@dataclass(frozen=True, slots=True)
class RaisedAlarm:
    alarm_id: UUID
    priority: str
    event_id: UUID
    new: bool


@dataclass(slots=True)
class FlushRequest:
    """What one flush must write. ``received_at`` is per event id (hub clock)."""

    events: list[tuple[DeviceEvent, datetime]] = field(default_factory=list)
    gateways: set[str] = field(default_factory=set)
    """The gateways the events name, if the caller knows (saves a pass over the events)."""
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    command_results: list[tuple[str, CommandResult]] = field(default_factory=list)
    """(gateway, result) pairs from ``telecare/v1/{gateway}/command-results``."""
    from_gateways: bool = True
    """False for events the hub makes itself (supervision): they are not a sign of life."""


@dataclass(slots=True)
class FlushResult:
    inserted: int = 0
    duplicates: int = 0
    alarms: list[RaisedAlarm] = field(default_factory=list)
    resolved: list[UUID] = field(default_factory=list)
    """Technical alarms resolved by a clearing event in this flush."""
    quarantined: list[QuarantineRecord] = field(default_factory=list)


def _unregistered(gateway_id: str, leaf: str, payload: str) -> QuarantineRecord:
    raw = payload.encode()
    return QuarantineRecord(
        topic=f"telecare/v1/{gateway_id}/{leaf}",
        reason="unregistered_gateway",
        detail=f"gateway {gateway_id!r} is not registered; add it with 'telecare admin import'",
        payload=raw,
        payload_size=len(raw),
        gateway_id=gateway_id,
    )


class GatewayRegistry:
    """Registered gateways and their sites, cached; reloaded when an unknown one appears."""

    def __init__(self) -> None:
        self._sites: dict[str, str] = {}

    def site_of(self, gateway_id: str) -> str | None:
        return self._sites.get(gateway_id)

    async def ensure(
        self, conn: psycopg.AsyncConnection[Any], gateway_ids: Iterable[str]
    ) -> None:
        if any(gw not in self._sites for gw in gateway_ids):
            cur = await conn.execute("SELECT id, site_id FROM gateways")
            self._sites = dict(await cur.fetchall())


class EventWriter:
    """Writes a ``FlushRequest`` in one transaction on the connection it is given."""

    LAST_SEEN_EVERY_S = 5.0
    """``gateways.last_seen_at`` is written at most this often per gateway and process."""

    def __init__(self, registry: GatewayRegistry | None = None, *, copy: bool = True) -> None:
        self.registry = registry or GatewayRegistry()
        self.copy = copy
        """False: multi-row INSERTs only, for servers without COPY FROM STDIN."""
        self._last_seen_written: dict[str, float] = {}

    async def write(
        self, conn: psycopg.AsyncConnection[Any], request: FlushRequest
    ) -> FlushResult:
        """Write it all in one transaction. A batch holding an id already stored (a
        redelivery) fails its COPY on the primary key; the whole transaction is then done
        again through the staging table, which skips and counts the duplicates. That
        costs a second try on the rare batch instead of a savepoint on every one."""
        try:
            return await self._write(conn, request, staged=False)
        except psycopg.errors.UniqueViolation:
            return await self._write(conn, request, staged=True)

    async def _write(
        self, conn: psycopg.AsyncConnection[Any], request: FlushRequest, *, staged: bool
    ) -> FlushResult:
        result = FlushResult(quarantined=list(request.quarantine))
        now = time.monotonic()
        async with conn.transaction():
            gateways = request.gateways or {e.gateway_id for e, _ in request.events}
            heard = gateways | {s.gateway_id for s in request.statuses}
            await self.registry.ensure(conn, heard)
            stale = [
                gw for gw in heard
                if request.from_gateways
                and now - self._last_seen_written.get(gw, -1e9) >= self.LAST_SEEN_EVERY_S
            ]
            if stale:
                await conn.execute(
                    "UPDATE gateways SET last_seen_at = now() WHERE id = ANY(%s)", [stale]
                )
            events = request.events
            if any(self.registry.site_of(gw) is None for gw in gateways):
                events = self._registered_events(events, result)
            rows = self._unique_rows(events, result)
            inserted_ids = await self._insert_events(conn, rows, result, staged=staged)
            await self._raise_alarms(conn, events, inserted_ids, result)
            await self._update_statuses(conn, request.statuses, result)
            if request.command_results:
                await record_results(conn, request.command_results)
            await self._quarantine(conn, result.quarantined)
        self._last_seen_written.update((gw, now) for gw in stale)
        return result

    def _registered_events(
        self, events: list[tuple[DeviceEvent, datetime]], result: FlushResult
    ) -> list[tuple[DeviceEvent, datetime]]:
        kept = []
        for event, received_at in events:
            if self.registry.site_of(event.gateway_id) is None:
                result.quarantined.append(
                    _unregistered(event.gateway_id, "events", event.model_dump_json())
                )
            else:
                kept.append((event, received_at))
        return kept

    @staticmethod
    def _unique_rows(
        events: list[tuple[DeviceEvent, datetime]], result: FlushResult
    ) -> list[tuple[object, ...]]:
        seen: set[UUID] = set()
        rows: list[tuple[object, ...]] = []
        for event, received_at in events:
            if event.id in seen:
                result.duplicates += 1
                continue
            seen.add(event.id)
            rows.append(
                (
                    event.id,
                    event.time,
                    event.gateway_time,
                    received_at,
                    event.gateway_id,
                    event.device_id,
                    str(event.device_type),
                    event.kind,
                    # The payload's JSON straight from pydantic's serializer (bytes).
                    Jsonb(event.payload.__pydantic_serializer__.to_json(event.payload),
                          dumps=_identity),
                )
            )
        return rows

    async def _insert_events(
        self,
        conn: psycopg.AsyncConnection[Any],
        rows: Sequence[tuple[object, ...]],
        result: FlushResult,
        *,
        staged: bool,
    ) -> set[UUID] | None:
        """COPY the rows in, or INSERT them; returns the ids inserted, or None meaning all."""
        if not rows:
            return set()
        if len(rows) <= SMALL_BATCH_ROWS or not self.copy:
            # A small batch (what an alarm usually is) is one round trip, where COPY takes
            # several. With COPY off, every batch goes this way.
            inserted: set[UUID] = set()
            for start in range(0, len(rows), INSERT_BATCH_ROWS):
                inserted |= await self._insert(conn, rows[start : start + INSERT_BATCH_ROWS])
            result.inserted += len(inserted)
            result.duplicates += len(rows) - len(inserted)
            return inserted
        if not staged:
            await self._copy(conn, _COPY_EVENTS, rows)
            result.inserted += len(rows)
            return None
        await conn.execute(_CREATE_STAGE)
        await self._copy(conn, _COPY_STAGE, rows)
        cur = await conn.execute(_INSERT_FROM_STAGE)
        inserted = {row[0] for row in await cur.fetchall()}
        result.inserted += len(inserted)
        result.duplicates += len(rows) - len(inserted)
        return inserted

    @staticmethod
    async def _insert(
        conn: psycopg.AsyncConnection[Any], rows: Sequence[tuple[object, ...]]
    ) -> set[UUID]:
        """One multi-row INSERT ... ON CONFLICT DO NOTHING; the ids it inserted."""
        placeholders = ", ".join([_ROW_PLACEHOLDER] * len(rows))
        cur = await conn.execute(
            f"INSERT INTO events ({EVENT_COLUMNS}) VALUES {placeholders}"
            " ON CONFLICT DO NOTHING RETURNING id".encode(),
            [value for row in rows for value in row],
        )
        return {row[0] for row in await cur.fetchall()}

    @staticmethod
    async def _copy(
        conn: psycopg.AsyncConnection[Any], statement: str, rows: Sequence[tuple[object, ...]]
    ) -> None:
        async with conn.cursor().copy(statement) as copy:
            copy.set_types(_EVENT_TYPES)
            for row in rows:
                await copy.write_row(row)

    async def _raise_alarms(
        self,
        conn: psycopg.AsyncConnection[Any],
        events: list[tuple[DeviceEvent, datetime]],
        inserted_ids: set[UUID] | None,
        result: FlushResult,
    ) -> None:
        for event, received_at in events:
            if not event.alarm_relevant:
                continue
            if inserted_ids is not None and event.id not in inserted_ids:
                continue  # a duplicate: it raised its alarm when first stored
            trigger = trigger_for(event)
            if trigger is not None:
                result.alarms.append(
                    await self._raise(conn, event, received_at, trigger)
                )
            category = clears(event)
            if category is not None:
                resolved = await clearing.clear(
                    conn,
                    site_id=self.registry.site_of(event.gateway_id),
                    category=category,
                    event=event,
                    received_at=received_at,
                )
                if resolved is not None:
                    result.resolved.append(resolved)

    async def _raise(
        self,
        conn: psycopg.AsyncConnection[Any],
        event: DeviceEvent,
        received_at: datetime,
        trigger: AlarmTrigger,
    ) -> RaisedAlarm:
        cur = await conn.execute(
            _RAISE_ALARM,
            {
                "id": uuid7(),
                "site_id": self.registry.site_of(event.gateway_id),
                "gateway_id": event.gateway_id,
                "device_id": event.device_id,
                "category": trigger.category,
                "priority": trigger.priority.value,
                "event_id": event.id,
                "event_time": event.time,
                "kind": event.kind,
                "received_at": received_at,
                "reason": f"{event.kind} from device {event.device_id}",
                "ranks": _PRIORITY_RANKS,
            },
        )
        row = await cur.fetchone()
        assert row is not None  # noqa: S101 - INSERT ... RETURNING always returns the row
        alarm_id, priority, raised = row
        return RaisedAlarm(alarm_id=alarm_id, priority=priority, event_id=event.id, new=raised)

    async def _update_statuses(
        self,
        conn: psycopg.AsyncConnection[Any],
        statuses: list[StatusUpdate],
        result: FlushResult,
    ) -> None:
        for update in statuses:
            if self.registry.site_of(update.gateway_id) is None:
                result.quarantined.append(
                    _unregistered(update.gateway_id, "status", update.status.model_dump_json())
                )
                continue
            status = update.status
            await conn.execute(
                """
                UPDATE gateways SET
                    status_changed_at = CASE WHEN status <> %(state)s THEN now()
                                             ELSE status_changed_at END,
                    status = %(state)s,
                    status_time = coalesce(%(time)s, now()),
                    version = coalesce(%(version)s, version),
                    queue_depth = coalesce(%(queue_depth)s, queue_depth),
                    updated_at = now()
                WHERE id = %(id)s
                  AND (status_time IS NULL OR coalesce(%(time)s, now()) >= status_time)
                """,
                {
                    "state": status.state,
                    "time": status.time,
                    "version": status.version,
                    "queue_depth": status.queue_depth,
                    "id": update.gateway_id,
                },
            )

    @staticmethod
    async def _quarantine(
        conn: psycopg.AsyncConnection[Any], records: list[QuarantineRecord]
    ) -> None:
        if not records:
            return
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO quarantine (topic, gateway_id, reason, detail, payload,"
                " payload_size) VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (
                        r.topic,
                        r.gateway_id,
                        r.reason,
                        r.detail,
                        r.payload,
                        r.payload_size,
                    )
                    for r in records
                ],
            )
