"""Commands from the hub to devices behind a gateway, and their results.

A person (``actor``) asks for a command through the API; the hub checks that the device
exists behind the gateway and can do it, records the command (who, why, when, until
when), publishes it to ``telecare/v1/{gateway_id}/commands`` at QoS 1 and answers at once
with the command's id and state ``sent``. The edge answers on
``telecare/v1/{gateway_id}/command-results``; the ingest hands the result to
``record_results`` in the same transaction as the rest of its flush. A command that has
no result when it expires reads as ``expired``: the edge refuses to carry out an expired
command, so an unlock is never done late.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from devices.errors import TelecareError
from devices.events import DeviceType
from devices.gateway import CommandKind, CommandResult, GatewayCommand
from devices.ids import uuid7

COMMANDS_TOPIC = "telecare/v1/{gateway_id}/commands"
RESULTS_TOPIC = "telecare/v1/+/command-results"

DEVICE_TYPES_FOR: dict[str, frozenset[str]] = {
    "unlock": frozenset({DeviceType.DOOR_LOCK.value}),
    "lock": frozenset({DeviceType.DOOR_LOCK.value}),
    "dispenser_schedule": frozenset({DeviceType.MEDICINE_DISPENSER.value}),
    "sync_clock": frozenset({DeviceType.MEDICINE_DISPENSER.value}),
    "test_alarm": frozenset(t.value for t in DeviceType),
}


class CommandError(TelecareError):
    """A command that cannot be sent; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes) -> None: ...


_SELECT = """
SELECT id, gateway_id, device_id, kind, params, actor, reason, created_at, expires_at,
       CASE WHEN state IN ('pending', 'sent') AND expires_at < now() THEN 'expired'
            ELSE state END AS state,
       sent_at, result_at, result_time, error
FROM commands
"""


async def send_command(
    conn: psycopg.AsyncConnection[Any],
    publisher: Publisher,
    *,
    device_id: str,
    gateway_id: str | None,
    kind: CommandKind,
    params: dict[str, Any],
    actor: str,
    reason: str | None,
    ttl_s: int,
) -> dict[str, Any]:
    """Check, record and publish one command; return it as the API shows it."""
    gateway_id, device_type = await _locate(conn, device_id, gateway_id)
    if device_type not in DEVICE_TYPES_FOR[kind] and not (
        kind == "test_alarm" and device_id == gateway_id
    ):
        raise CommandError(
            f"a {device_type} cannot be sent '{kind}'", status=422
        )
    now = datetime.now(UTC)
    command = GatewayCommand(
        command_id=uuid7(), kind=kind, device_id=device_id, params=params,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    await conn.execute(
        "INSERT INTO commands (id, gateway_id, device_id, kind, params, actor, reason,"
        " created_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [command.command_id, gateway_id, device_id, kind, Jsonb(params), actor, reason, now,
         command.expires_at],
    )
    try:
        await publisher.publish(
            COMMANDS_TOPIC.format(gateway_id=gateway_id), command.model_dump_json().encode()
        )
    except Exception as exc:
        await conn.execute(
            "UPDATE commands SET state = 'failed', error = %s, result_at = now() WHERE id = %s",
            [f"not sent: {exc}", command.command_id],
        )
        raise CommandError(f"the command could not be sent to the gateway: {exc}",
                           status=503) from exc
    await conn.execute(
        "UPDATE commands SET state = 'sent', sent_at = now() WHERE id = %s AND state = 'pending'",
        [command.command_id],
    )
    found = await get_command(conn, command.command_id)
    assert found is not None  # noqa: S101 - just written
    return found


async def _locate(
    conn: psycopg.AsyncConnection[Any], device_id: str, gateway_id: str | None
) -> tuple[str, str]:
    if gateway_id is not None and device_id == gateway_id:
        cur = await conn.execute("SELECT id FROM gateways WHERE id = %s", [gateway_id])
        if await cur.fetchone():
            return gateway_id, DeviceType.GATEWAY.value
    cur = await conn.execute(
        "SELECT gateway_id, device_type FROM devices WHERE id = %s"
        " AND (%s::text IS NULL OR gateway_id = %s)",
        [device_id, gateway_id, gateway_id],
    )
    rows = await cur.fetchall()
    if not rows:
        raise CommandError(f"no device {device_id!r} is registered"
                           + (f" behind gateway {gateway_id!r}" if gateway_id else ""),
                           status=404)
    if len(rows) > 1:
        raise CommandError(f"device id {device_id!r} exists behind several gateways:"
                           " give gateway_id", status=422)
    return str(rows[0][0]), str(rows[0][1])


async def get_command(
    conn: psycopg.AsyncConnection[Any], command_id: UUID
) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SELECT + " WHERE id = %s", [command_id])
        return await cur.fetchone()


async def list_commands(
    conn: psycopg.AsyncConnection[Any], *, device_id: str | None, limit: int
) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            _SELECT + " WHERE (%s::text IS NULL OR device_id = %s)"
            " ORDER BY created_at DESC LIMIT %s",
            [device_id, device_id, limit],
        )
        return await cur.fetchall()


async def record_results(
    conn: psycopg.AsyncConnection[Any], results: list[tuple[str, CommandResult]]
) -> int:
    """Store results (gateway, result); a result for another gateway's command is ignored.

    Returns how many matched a command. The first result wins: a redelivered result
    changes nothing.
    """
    matched = 0
    for gateway_id, result in results:
        cur = await conn.execute(
            "UPDATE commands SET state = %s, error = %s, result_time = %s, result_at = now()"
            " WHERE id = %s AND gateway_id = %s AND state IN ('pending', 'sent')",
            ["succeeded" if result.ok else "failed", result.error, result.time,
             result.command_id, gateway_id],
        )
        matched += cur.rowcount
    return matched

