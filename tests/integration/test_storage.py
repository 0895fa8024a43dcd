"""Migrations, partitions and the registry import against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from devices.events import make_event
from hub.admin import RegistryFile, import_registry, load_registry
from hub.db import migrate as migrate_module
from hub.db.migrate import Migration, migrate
from hub.db.partitions import maintain, partition_name
from hub.errors import ConfigurationError, MigrationError
from hub.store.writer import SMALL_BATCH_ROWS, EventWriter, FlushRequest
from tests.support import ROOT, home_registry, register

pytestmark = pytest.mark.integration


async def test_migrations_are_recorded_once_even_when_two_processes_race(
    database_url: str,
) -> None:
    # database_url is migrated already; two more concurrent runs apply nothing.
    assert await asyncio.gather(migrate(database_url), migrate(database_url)) == [[], []]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT version, variant FROM schema_migrations ORDER BY 1")
        rows = await cur.fetchall()
        cur = await conn.execute("SELECT value FROM telecare_meta WHERE key='storage_backend'")
        backend = await cur.fetchone()
    shipped = [m.version for m in migrate_module.load_migrations("native")]
    assert len(shipped) >= 6  # registry, events, quarantine, alarms, supervision, commands
    assert [v for v, _ in rows] == shipped
    assert backend == ("native",)  # this PostgreSQL has no TimescaleDB
    assert dict(rows)[2] == "native"


async def test_an_edited_applied_migration_stops_the_hub(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = migrate_module.load_migrations

    def edited(backend: migrate_module.Backend) -> list[Migration]:
        found = original(backend)
        first = found[0]
        return [Migration(first.version, first.name, first.variant, first.sql + "\n-- x"),
                *found[1:]]

    monkeypatch.setattr(migrate_module, "load_migrations", edited)
    with pytest.raises(MigrationError, match="was changed after it was applied"):
        await migrate(database_url)


async def test_asking_for_timescaledb_where_it_is_missing_is_a_clear_error(
    pg_admin_url: str,
) -> None:
    name = "telecare_t_no_timescale"
    async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"'.encode())
        await conn.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        with pytest.raises(MigrationError, match="TimescaleDB was asked for"):
            await migrate(pg_admin_url.rsplit("/", 1)[0] + "/" + name,
                          backend_choice="timescaledb")
    finally:
        async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as c:
            await c.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


async def _partitions(conn: psycopg.AsyncConnection[object]) -> set[str]:
    cur = await conn.execute(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'events'::regclass"
    )
    return {row[0] for row in await cur.fetchall()}


async def test_partitions_are_made_ahead_stragglers_move_in_and_old_days_are_dropped(
    database_url: str,
) -> None:
    gateway = "gw-part"
    await register(database_url, home_registry(gateway))
    today = date(2030, 6, 15)
    straggler_time = datetime(2030, 6, 20, 12, tzinfo=UTC)  # beyond the partitions made
    straggler = make_event("motion", gateway_id=gateway, device_id="m", time=straggler_time,
                           device_type="motion_sensor")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await maintain(conn, today=today, ahead_days=2, retention_days=30)
        assert {partition_name(today + timedelta(days=d)) for d in (-1, 0, 1, 2)} <= (
            await _partitions(conn)
        )
        result = await EventWriter().write(
            conn, FlushRequest(events=[(straggler, datetime.now(UTC))])
        )
        assert result.inserted == 1
        cur = await conn.execute("SELECT count(*) FROM events_default")
        assert await cur.fetchone() == (1,)

        report = await maintain(conn, today=today + timedelta(days=5), ahead_days=2,
                                retention_days=30)
        assert partition_name(straggler_time.date()) in report.created
        assert report.moved_from_default == 1
        cur = await conn.execute("SELECT tableoid::regclass::text FROM events WHERE id = %s",
                                 (straggler.id,))
        assert await cur.fetchone() == (partition_name(straggler_time.date()),)

        # The same event again is a duplicate, also after it moved partitions.
        again = await EventWriter().write(
            conn, FlushRequest(events=[(straggler, datetime.now(UTC))])
        )
        assert (again.inserted, again.duplicates) == (0, 1)

        report = await maintain(conn, today=today + timedelta(days=40), ahead_days=1,
                                retention_days=30)
        assert partition_name(today) in report.dropped
        assert partition_name(today) not in await _partitions(conn)
        cur = await conn.execute("SELECT count(*) FROM events WHERE id = %s", (straggler.id,))
        assert await cur.fetchone() == (0,)  # past retention


@pytest.mark.parametrize("size", [5, 5 * SMALL_BATCH_ROWS])  # one INSERT; COPY
async def test_duplicates_inside_one_batch_and_across_batches_are_counted_not_stored(
    database_url: str, size: int
) -> None:
    await register(database_url, home_registry("gw-dup"))
    events = [make_event("motion", gateway_id="gw-dup", device_id="m",
                         device_type="motion_sensor") for _ in range(size)]
    now = datetime.now(UTC)
    head = events[: size // 2]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        first = await EventWriter().write(
            conn, FlushRequest(events=[(e, now) for e in [*head, head[0]]])
        )
        second = await EventWriter().write(conn, FlushRequest(events=[(e, now) for e in events]))
        cur = await conn.execute("SELECT count(*) FROM events WHERE gateway_id = 'gw-dup'")
        assert await cur.fetchone() == (size,)
    assert (first.inserted, first.duplicates) == (len(head), 1)
    assert (second.inserted, second.duplicates) == (size - len(head), len(head))


async def test_registry_import_is_idempotent_and_updates_changed_rows(database_url: str) -> None:
    registry = home_registry("gw-imp", devices=[("pendant", "safety_alarm")])
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await import_registry(conn, RegistryFile.model_validate(registry))
        await import_registry(conn, RegistryFile.model_validate(registry))
        registry["residents"][0]["room"] = "12B"
        await import_registry(conn, RegistryFile.model_validate(registry))
        cur = await conn.execute("SELECT count(*), max(room) FROM residents")
        assert await cur.fetchone() == (1, "12B")
        cur = await conn.execute("SELECT count(*) FROM devices")
        assert await cur.fetchone() == (1,)


async def test_registry_import_refuses_a_dangling_reference_and_writes_nothing(
    database_url: str,
) -> None:
    registry = home_registry("gw-bad")
    registry["gateways"].append({"id": "gw-orphan", "site_id": "no-such-site"})
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        with pytest.raises(ConfigurationError, match="no-such-site"):
            await import_registry(conn, RegistryFile.model_validate(registry))
        cur = await conn.execute("SELECT count(*) FROM districts")
        assert await cur.fetchone() == (0,)


def test_import_file_errors_name_the_entry_and_field(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text("devices:\n  - {id: p1, gateway_id: gw, device_type: toaster}\n")
    with pytest.raises(ConfigurationError, match=r"devices\.0\.device_type"):
        load_registry(path)
    path.write_text("sites: [unclosed\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_registry(path)


def test_admin_import_command_reports_a_bad_file_with_exit_code_2(
    tmp_path: Path, database_url: str
) -> None:
    path = tmp_path / "registry.json"
    path.write_text('{"gateways": [{"id": "gw/1", "site_id": "s"}]}')
    env = {"PATH": "/usr/bin:/bin", "TELECARE_DATABASE_URL": database_url,
           "TELECARE_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "hub", "admin", "import", str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2
    assert "gateways.0.id" in done.stderr
