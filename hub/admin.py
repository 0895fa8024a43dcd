"""``telecare admin import FILE``: the registry from one YAML or JSON file, idempotent.

Rows are upserted by id, so importing the same file twice changes nothing, and an edited
file updates what changed. Nothing is deleted by an import. Staff, teams, shifts,
contacts and escalation policies join the format with the issues that use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import psycopg
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from devices.events import DeviceType, Identifier, describe_validation_error
from hub.errors import ConfigurationError


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistrictIn(_Row):
    id: Identifier
    name: str = Field(min_length=1)
    timezone: str = "Europe/Oslo"


class SiteIn(_Row):
    id: Identifier
    district_id: Identifier
    kind: Literal["home", "care_home"]
    name: str = Field(min_length=1)
    address: str | None = None


class ResidentIn(_Row):
    id: Identifier
    site_id: Identifier
    display_name: str = Field(min_length=1)
    room: str | None = None


class GatewayIn(_Row):
    id: Identifier
    site_id: Identifier


class DeviceIn(_Row):
    id: Identifier
    gateway_id: Identifier
    device_type: DeviceType
    resident_id: Identifier | None = None
    label: str | None = None


class RegistryFile(_Row):
    districts: list[DistrictIn] = []
    sites: list[SiteIn] = []
    residents: list[ResidentIn] = []
    gateways: list[GatewayIn] = []
    devices: list[DeviceIn] = []


# table, key columns, other columns; in dependency order.
_TABLES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("districts", "districts", ("id",), ("name", "timezone")),
    ("sites", "sites", ("id",), ("district_id", "kind", "name", "address")),
    ("residents", "residents", ("id",), ("site_id", "display_name", "room")),
    ("gateways", "gateways", ("id",), ("site_id",)),
    ("devices", "devices", ("gateway_id", "id"), ("device_type", "resident_id", "label")),
]


def load_registry(path: Path) -> RegistryFile:
    """Read and validate an import file; errors say which entry and field is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigurationError(f"{path} is not valid {kind}: {exc}") from None
    try:
        return RegistryFile.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigurationError(f"{path}: {describe_validation_error(exc)}") from None


async def import_registry(
    conn: psycopg.AsyncConnection[Any], registry: RegistryFile
) -> dict[str, int]:
    """Upsert every row in one transaction. Returns rows written per table."""
    counts: dict[str, int] = {}
    try:
        async with conn.transaction():
            for attribute, table, keys, others in _TABLES:
                rows: list[_Row] = getattr(registry, attribute)
                counts[table] = await _upsert(conn, table, keys, others, rows)
    except psycopg.errors.ForeignKeyViolation as exc:
        detail = exc.diag.message_detail or str(exc)
        raise ConfigurationError(f"import refused, a reference is missing: {detail}") from None
    return counts


async def _upsert(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    keys: tuple[str, ...],
    others: tuple[str, ...],
    rows: list[_Row],
) -> int:
    if not rows:
        return 0
    columns = keys + others
    updates = ", ".join(f"{c} = excluded.{c}" for c in others)
    changed = " OR ".join(f"{table}.{c} IS DISTINCT FROM excluded.{c}" for c in others)
    statement = (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
        f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}, updated_at = now()"
        f" WHERE {changed}"
    )
    async with conn.cursor() as cur:
        await cur.executemany(
            statement.encode(),
            [tuple(row.model_dump(mode="json")[c] for c in columns) for row in rows],
        )
    return len(rows)
