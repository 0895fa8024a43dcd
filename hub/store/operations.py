"""Reads for operations: gateways and their status, the quarantine."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row


async def list_gateways(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Registered gateways with their last reported status, by id."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, site_id, status, status_time, status_changed_at, version, queue_depth"
            " FROM gateways ORDER BY id"
        )
        return await cur.fetchall()


async def list_quarantine(
    conn: psycopg.AsyncConnection[Any], *, limit: int
) -> list[dict[str, Any]]:
    """Quarantined messages, newest first, without their raw payloads."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, received_at, topic, gateway_id, reason, detail, payload_size"
            " FROM quarantine ORDER BY id DESC LIMIT %s",
            (limit,),
        )
        return await cur.fetchall()
