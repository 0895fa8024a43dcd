"""Keeping the event store's partitions: days ahead created, days past retention dropped.

Native partitioning: one partition a UTC day, ``events_pYYYYMMDD``. Rows that arrived
before their day's partition existed sit in ``events_default``; creating the partition
moves them in the same transaction. TimescaleDB: chunks are automatic; retention is a
policy set from settings, replaced only when the setting changed.

Maintenance runs under an advisory lock: two hub processes starting together would
otherwise both create the same partition, and one of them would fail to start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import sql

log = structlog.get_logger(__name__)

_PARTITION_RE = re.compile(r"^events_p(\d{8})$")
_LOCK_KEY = 0x7E1EC4AF  # pg_advisory_lock key for maintenance (migrations use ...AE)


@dataclass
class MaintenanceReport:
    backend: str
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    moved_from_default: int = 0


def partition_name(day: date) -> str:
    return f"events_p{day:%Y%m%d}"


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


async def storage_backend(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute("SELECT value FROM telecare_meta WHERE key = 'storage_backend'")
    row = await cur.fetchone()
    return str(row[0]) if row else "native"


async def existing_partitions(conn: psycopg.AsyncConnection[Any]) -> dict[date, str]:
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'events'::regclass"
    )
    found: dict[date, str] = {}
    for (name,) in await cur.fetchall():
        match = _PARTITION_RE.match(name)
        if match:
            found[datetime.strptime(match[1], "%Y%m%d").replace(tzinfo=UTC).date()] = name
    return found


async def create_partition(conn: psycopg.AsyncConnection[Any], day: date) -> int:
    """Create the partition for ``day``, moving its rows out of the default partition.

    Returns how many rows were moved. Runs in its own transaction.
    """
    name = sql.Identifier(partition_name(day))
    low, high = _day_start(day), _day_start(day + timedelta(days=1))
    async with conn.transaction():
        await conn.execute("LOCK TABLE events_default IN SHARE ROW EXCLUSIVE MODE")
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            ).format(name)
        )
        cur = await conn.execute(
            sql.SQL(
                "WITH moved AS (DELETE FROM events_default WHERE time >= %s AND time < %s"
                " RETURNING *) INSERT INTO {} SELECT * FROM moved"
            ).format(name),
            (low, high),
        )
        moved = cur.rowcount
        await conn.execute(
            sql.SQL("ALTER TABLE events ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                name, sql.Literal(low), sql.Literal(high)
            )
        )
    return max(moved, 0)


async def maintain(
    conn: psycopg.AsyncConnection[Any],
    *,
    today: date,
    ahead_days: int,
    retention_days: int,
) -> MaintenanceReport:
    """Create partitions from yesterday to ``ahead_days`` ahead; drop those past retention.

    ``conn`` must be in autocommit mode (each step is its own transaction).
    """
    await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        return await _maintain_locked(
            conn, today=today, ahead_days=ahead_days, retention_days=retention_days
        )
    finally:
        if not conn.closed:  # a lost connection has released the lock with its session
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


async def _maintain_locked(
    conn: psycopg.AsyncConnection[Any],
    *,
    today: date,
    ahead_days: int,
    retention_days: int,
) -> MaintenanceReport:
    backend = await storage_backend(conn)
    report = MaintenanceReport(backend=backend)
    if backend == "timescaledb":
        await _timescale_retention(conn, retention_days)
        return report
    existing = await existing_partitions(conn)
    for offset in range(-1, ahead_days + 1):
        day = today + timedelta(days=offset)
        if day not in existing:
            report.moved_from_default += await create_partition(conn, day)
            report.created.append(partition_name(day))
    cutoff = today - timedelta(days=retention_days)
    for day, name in sorted(existing.items()):
        if day + timedelta(days=1) <= cutoff:
            async with conn.transaction():
                await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            report.dropped.append(name)
    async with conn.transaction():
        cur = await conn.execute(
            "DELETE FROM events_default WHERE time < %s", (_day_start(cutoff),)
        )
        if cur.rowcount:
            log.info("events_default_expired", rows=cur.rowcount)
    if report.created or report.dropped:
        log.info(
            "partitions_maintained",
            created=len(report.created),
            dropped=len(report.dropped),
            moved_from_default=report.moved_from_default,
        )
    return report


async def _timescale_retention(conn: psycopg.AsyncConnection[Any], days: int) -> None:
    """Set the retention policy on ``events`` to ``days``, unless it is that already.

    Replacing it on every run would make a new job each hour and restart its schedule.
    """
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT (config->>'drop_after')::interval = make_interval(days => %s)"
            " FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()"
            " AND hypertable_name = 'events'",
            (days,),
        )
        current = await cur.fetchall()
        if current == [(True,)]:
            return
        await conn.execute("SELECT remove_retention_policy('events', if_exists => true)")
        await conn.execute(
            "SELECT add_retention_policy('events', make_interval(days => %s))", (days,)
        )
    log.info("retention_policy_set", days=days)
