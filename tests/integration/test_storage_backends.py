"""The event store on every backend: PostgreSQL with native daily partitions (the real
server on 127.0.0.1:5432, else the embedded one again), the embedded PostgreSQL, and
TimescaleDB (PGlite with the TimescaleDB extension, in Node: tests/timescale_fixture.py).

The same events written through ``EventWriter`` must give the same answers everywhere;
the TimescaleDB-only tests cover the hypertable, compression, the policies set from
settings and a continuous aggregate. PGlite serves one connection at a time and has no
COPY FROM STDIN over its socket, so its runs hold one connection and write with
``EventWriter(copy=False)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
from pydantic import SecretStr

from devices.events import DeviceEvent, envelope_json, make_event
from hub.db import migrate as migrate_module
from hub.db.migrate import Migration, detect_backend, migrate
from hub.db.partitions import maintain, partition_name
from hub.errors import MigrationError
from hub.ingest import Ingest
from hub.metrics import HubMetrics
from hub.runtime import HubRuntime
from hub.settings import HubSettings, IngestSettings, MqttEndpoint, StorageSettings
from hub.store.writer import EventWriter, FlushRequest, FlushResult
from tests.conftest import drop_database, fresh_database
from tests.support import (
    REAL_MQTT_URL,
    envelopes,
    home_registry,
    publish,
    register,
    wait_until_async,
)

pytestmark = pytest.mark.integration

GATEWAY = "gw-store"
PENDANT = "pendant-1"
DAY = date(2030, 6, 14)
MIGRATIONS = [1, 2, 3, 4, 5, 6]


@dataclass(frozen=True)
class Backend:
    url: str
    storage: str
    """What ``telecare_meta`` must record: native or timescaledb."""


@pytest.fixture
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A migrated database on the backend named by the test's parameter."""
    name = str(request.param)
    if name == "timescaledb":
        url = str(request.getfixturevalue("timescale_url"))
        await migrate(url)  # "auto": the extension is there, so it must be chosen
        yield Backend(url, "timescaledb")
        return
    # "postgresql" is the configured server: the real one on 5432 if it is there.
    fixture = "pg_admin_url" if name == "postgresql" else "embedded_pg_admin_url"
    admin = str(request.getfixturevalue(fixture))
    url = await fresh_database(admin)
    try:
        yield Backend(url, "native")
    finally:
        await drop_database(admin, url)


BACKENDS = ["postgresql", "embedded", "timescaledb"]
# (backend, COPY on): PGlite has no COPY FROM STDIN, and the INSERT-only writer must give
# the same answers on PostgreSQL too.
WRITE_MODES = [
    ("postgresql", True),
    ("postgresql", False),
    ("embedded", True),
    ("timescaledb", False),
]


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def fetch(
    conn: psycopg.AsyncConnection[Any], sql: str, *params: Any
) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql.encode(), params or None)
    return list(await cur.fetchall())


# (kind, device, device type, payload), taken in turn.
_SENSORS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("motion", "motion-0", "motion_sensor", {"room": "stue"}),
    ("motion", "motion-1", "motion_sensor", {"room": "kjøkken"}),
    ("opened", "door-1", "door_sensor", None),
]


def telemetry(count: int, *, start: datetime, step: timedelta) -> list[DeviceEvent]:
    """Motion and door events, ``step`` apart from ``start``."""
    sensors = [_SENSORS[i % len(_SENSORS)] for i in range(count)]
    return [
        make_event(
            kind, gateway_id=GATEWAY, device_id=d, device_type=t, time=start + i * step, payload=p
        )
        for i, (kind, d, t, p) in enumerate(sensors)
    ]


def press(at: datetime) -> DeviceEvent:
    return make_event(
        "button_pressed", gateway_id=GATEWAY, device_id=PENDANT, device_type="safety_alarm", time=at
    )


async def write(
    conn: psycopg.AsyncConnection[Any], writer: EventWriter, events: Sequence[DeviceEvent]
) -> FlushResult:
    received = datetime.now(UTC)
    return await writer.write(conn, FlushRequest(events=[(e, received) for e in events]))


async def register_home(url: str) -> None:
    await register(url, home_registry(GATEWAY, devices=[(PENDANT, "safety_alarm")]))


# --- every backend --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_migrations_are_applied_recorded_and_the_backend_kept(backend: Backend) -> None:
    assert await migrate(backend.url) == []  # already applied by the fixture
    async with await connect(backend.url) as conn:
        applied = await fetch(conn, "SELECT version, variant FROM schema_migrations ORDER BY 1")
        recorded = await fetch(
            conn, "SELECT value FROM telecare_meta WHERE key = 'storage_backend'"
        )
        # The tables are where the hub looks for them, whatever the server's search_path.
        schemas = await fetch(
            conn,
            "SELECT relnamespace::regnamespace::text FROM pg_class"
            " WHERE relname IN ('events', 'alarms', 'gateways') AND relkind IN ('r', 'p')",
        )
    assert [version for version, _ in applied] == MIGRATIONS
    assert dict(applied)[2] == backend.storage
    assert recorded == [(backend.storage,)]
    assert schemas == [("public",)] * 3


@pytest.mark.parametrize(("backend", "use_copy"), WRITE_MODES, indirect=["backend"])
async def test_the_same_events_give_the_same_answers_on_every_backend(
    backend: Backend, use_copy: bool
) -> None:
    await register_home(backend.url)
    start = datetime(2030, 6, 13, 1, tzinfo=UTC)
    first = telemetry(45, start=start, step=timedelta(minutes=97))  # over 20: COPY
    later = telemetry(25, start=start + timedelta(days=3), step=timedelta(minutes=61))
    alarm = press(datetime(2030, 6, 14, 3, 12, tzinfo=UTC))
    writer = EventWriter(copy=use_copy)
    async with await connect(backend.url) as conn:
        report = await maintain(conn, today=DAY, ahead_days=2, retention_days=3650)
        assert report.backend == backend.storage
        results = [
            await write(conn, writer, first),
            await write(conn, writer, [alarm]),
            # A redelivery of part of the first batch with new events: the staging path.
            await write(conn, writer, [*first[:10], *later]),
            await write(conn, writer, [alarm]),  # the pendant press again: no second alarm
        ]
        by_kind = await fetch(conn, "SELECT kind, count(*) FROM events GROUP BY 1 ORDER BY 1")
        by_day = await fetch(
            conn,
            "SELECT (time AT TIME ZONE 'UTC')::date, count(*) FROM events GROUP BY 1 ORDER BY 1",
        )
        alarms = await fetch(
            conn, "SELECT category, priority, state, trigger_count, trigger_event_id FROM alarms"
        )
        triggers = await fetch(conn, "SELECT event_id FROM alarm_triggers")
    stored = [*first, alarm, *later]
    assert [(r.inserted, r.duplicates) for r in results] == [(45, 0), (1, 0), (25, 10), (0, 1)]
    assert [len(r.alarms) for r in results] == [0, 1, 0, 0]
    assert by_kind == sorted(Counter(str(e.kind) for e in stored).items())
    assert by_day == sorted(Counter(e.time.astimezone(UTC).date() for e in stored).items())
    assert alarms == [("assistance", "critical", "raised", 1, alarm.id)]
    assert triggers == [(alarm.id,)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_two_hubs_maintaining_at_once_both_succeed(backend: Backend) -> None:
    # Both hubs of a pair run maintenance at start; without the lock both created the same
    # partition and one failed to start. (PGlite makes the second connection wait.)
    async def hub() -> list[str]:
        async with await connect(backend.url) as conn:
            report = await maintain(conn, today=DAY, ahead_days=3, retention_days=30)
            return report.created

    first, second = await asyncio.gather(hub(), hub())
    if backend.storage == "native":
        assert sorted([*first, *second]) == [
            partition_name(DAY + timedelta(days=d)) for d in range(-1, 4)
        ]
    else:
        async with await connect(backend.url) as conn:
            retention = (await jobs(conn))["policy_retention"]
        assert (first, second) == ([], [])
        assert [c["drop_after"] for c in retention] == ["30 days"]


# --- TimescaleDB ----------------------------------------------------------------------


@pytest.fixture
async def timescale(timescale_url: str) -> str:
    """A migrated PGlite with TimescaleDB and the test home registered."""
    assert await migrate(timescale_url, backend_choice="timescaledb") == MIGRATIONS
    await register_home(timescale_url)
    return timescale_url


async def jobs(conn: psycopg.AsyncConnection[Any]) -> dict[str, list[dict[str, Any]]]:
    """The policies on ``events``, by procedure name: their configs, with ``job_id``."""
    found: dict[str, list[dict[str, Any]]] = {}
    for proc, job_id, config in await fetch(
        conn,
        "SELECT proc_name, job_id, config FROM timescaledb_information.jobs"
        " WHERE hypertable_name = 'events' ORDER BY job_id",
    ):
        found.setdefault(proc, []).append({**config, "job_id": job_id})
    return found


async def test_events_is_a_hypertable_with_compression_and_retention_from_settings(
    timescale: str,
) -> None:
    async with await connect(timescale) as conn:
        hypertables = await fetch(
            conn,
            "SELECT hypertable_schema, compression_enabled"
            " FROM timescaledb_information.hypertables WHERE hypertable_name = 'events'",
        )
        dimensions = await fetch(
            conn,
            "SELECT column_name, time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_name = 'events'",
        )
        compression = await fetch(
            conn,
            "SELECT attname, segmentby_column_index, orderby_column_index, orderby_asc"
            " FROM timescaledb_information.compression_settings"
            " WHERE hypertable_name = 'events' ORDER BY attname",
        )
        before = await jobs(conn)
        await maintain(conn, today=DAY, ahead_days=7, retention_days=30)
        first = await jobs(conn)
        await maintain(conn, today=DAY + timedelta(days=1), ahead_days=7, retention_days=30)
        unchanged = await jobs(conn)
        report = await maintain(conn, today=DAY, ahead_days=7, retention_days=90)
        second = await jobs(conn)
    assert hypertables == [("public", True)]
    assert dimensions == [("time", timedelta(days=1))]
    assert compression == [
        ("device_id", 2, None, None),
        ("gateway_id", 1, None, None),
        ("id", None, 2, True),
        ("time", None, 1, False),
    ]
    assert [c["compress_after"] for c in before["policy_compression"]] == ["7 days"]
    assert "policy_retention" not in before
    assert [c["drop_after"] for c in first["policy_retention"]] == ["30 days"]
    # The hourly maintenance leaves an unchanged policy alone (same job, same schedule).
    assert unchanged["policy_retention"] == first["policy_retention"]
    # A changed setting replaces the policy: one policy, the new age.
    assert report.backend == "timescaledb"
    assert (report.created, report.dropped) == ([], [])
    assert [c["drop_after"] for c in second["policy_retention"]] == ["90 days"]


async def chunks(conn: psycopg.AsyncConnection[Any]) -> list[tuple[datetime, bool]]:
    return [
        (start, compressed)
        for start, compressed in await fetch(
            conn,
            "SELECT range_start, is_compressed FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'events' ORDER BY range_start",
        )
    ]


async def test_a_compressed_chunk_stays_readable_and_still_refuses_a_redelivery(
    timescale: str,
) -> None:
    start = datetime(2030, 6, 13, 0, 30, tzinfo=UTC)
    events = telemetry(48, start=start, step=timedelta(hours=1))  # two daily chunks
    writer = EventWriter(copy=False)
    async with await connect(timescale) as conn:
        assert (await write(conn, writer, events)).inserted == 48
        compressed = await fetch(
            conn,
            "SELECT compress_chunk(c)::text FROM show_chunks('events', older_than => %s) c",
            datetime(2030, 6, 14, tzinfo=UTC),
        )
        assert len(compressed) == 1
        assert [c for _, c in await chunks(conn)] == [True, False]
        # Every row reads back, by key and by range, from the compressed chunk too.
        rows = await fetch(conn, "SELECT id, time, kind FROM events ORDER BY time")
        by_id = await fetch(conn, "SELECT kind FROM events WHERE id = %s", events[3].id)
        # A redelivery into the compressed chunk is a duplicate; a late event is stored.
        late = press(datetime(2030, 6, 13, 7, 15, tzinfo=UTC))
        again = await write(conn, writer, [events[0], events[5], late])
        count = await fetch(conn, "SELECT count(*) FROM events")
        alarms = await fetch(conn, "SELECT trigger_event_id FROM alarms")
    assert rows == [(e.id, e.time, str(e.kind)) for e in events]
    assert by_id == [(str(events[3].kind),)]
    assert (again.inserted, again.duplicates) == (1, 2)
    assert count == [(49,)]
    assert alarms == [(late.id,)]


async def test_the_compression_and_retention_policies_do_their_work_when_run(
    timescale: str,
) -> None:
    # The policies are background jobs; PGlite has no background workers, so the test
    # runs each job once, as the scheduler would. They judge age by now().
    now = datetime.now(UTC)
    ages = {"old": timedelta(days=40), "week": timedelta(days=10), "new": timedelta(hours=1)}
    events = {
        label: telemetry(6, start=now - age, step=timedelta(minutes=5))
        for label, age in ages.items()
    }
    writer = EventWriter(copy=False)
    async with await connect(timescale) as conn:
        for batch in events.values():
            await write(conn, writer, batch)
        await maintain(conn, today=now.date(), ahead_days=7, retention_days=30)
        ids = dict(
            await fetch(
                conn,
                "SELECT proc_name, job_id FROM timescaledb_information.jobs"
                " WHERE hypertable_name = 'events'",
            )
        )
        await conn.execute(b"CALL run_job(%s)", (ids["policy_compression"],))
        after_compression = await chunks(conn)
        await conn.execute(b"CALL run_job(%s)", (ids["policy_retention"],))
        left = await fetch(conn, "SELECT id FROM events")
        after_retention = await chunks(conn)
    cutoff = now - timedelta(days=7)
    assert after_compression, "no chunks"
    assert all(
        compressed == (start < cutoff - timedelta(days=1))
        for start, compressed in after_compression
    )
    assert any(compressed for _, compressed in after_compression)
    assert {row[0] for row in left} == {e.id for e in [*events["week"], *events["new"]]}
    assert all(start > now - timedelta(days=32) for start, _ in after_retention)


async def test_a_continuous_aggregate_counts_events_per_day(timescale: str) -> None:
    start = datetime(2030, 6, 13, 2, tzinfo=UTC)
    events = telemetry(30, start=start, step=timedelta(hours=2))
    extra = telemetry(7, start=start + timedelta(days=3), step=timedelta(hours=1))
    writer = EventWriter(copy=False)
    daily = "SELECT day, kind, events FROM events_daily ORDER BY day, kind"
    async with await connect(timescale) as conn:
        await write(conn, writer, events)
        await conn.execute(
            b"CREATE MATERIALIZED VIEW events_daily WITH (timescaledb.continuous) AS"
            b" SELECT time_bucket(INTERVAL '1 day', time) AS day, kind, count(*) AS events"
            b" FROM events GROUP BY day, kind WITH NO DATA"
        )
        await conn.execute(b"CALL refresh_continuous_aggregate('events_daily', NULL, NULL)")
        first = await fetch(conn, daily)
        await write(conn, writer, extra)
        stale = await fetch(conn, daily)
        await conn.execute(
            b"CALL refresh_continuous_aggregate('events_daily', %s, %s)",
            (start, start + timedelta(days=5)),
        )
        second = await fetch(conn, daily)

    def expected(batch: list[DeviceEvent]) -> list[tuple[Any, ...]]:
        counts = Counter(
            (datetime.combine(e.time.date(), datetime.min.time(), UTC), str(e.kind)) for e in batch
        )
        return [(day, kind, n) for (day, kind), n in sorted(counts.items())]

    assert first == expected(events)
    assert stale == first  # materialized only: new rows wait for the refresh
    assert second == expected([*events, *extra])


async def test_the_hub_runtime_runs_on_timescaledb_with_one_connection(
    timescale_url: str, tmp_path: Path
) -> None:
    settings = HubSettings(
        database_url=SecretStr(timescale_url),
        mqtt_url=SecretStr("mqtt://127.0.0.1:9"),  # never dialled: the runtime runs without ingest
        data_dir=tmp_path,
        storage=StorageSettings(
            backend="timescaledb",
            events_retention_days=45,
            use_copy=False,
            pool_min_size=1,
            pool_max_size=1,
        ),
    )
    async with HubRuntime(settings, run_ingest=False) as runtime:
        health = await runtime.health()
        assert runtime.pool is not None
        async with runtime.pool.connection() as conn:
            retention = (await jobs(conn))["policy_retention"]
    assert health["database"] == "ok"
    assert [c["drop_after"] for c in retention] == ["45 days"]


async def test_a_failed_timescaledb_migration_records_nothing_so_native_can_follow(
    timescale_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The extension can be created and the events migration still fail (a lost
    # connection, a full disk). The backend used to be recorded before the migrations
    # ran, so the database was stuck as "timescaledb" with no events table, and the
    # operator's TELECARE_STORAGE__BACKEND=native was refused.
    original = migrate_module.load_migrations

    def failing(backend: migrate_module.Backend) -> list[Migration]:
        return [
            Migration(m.version, m.name, m.variant, m.sql + "\nSELECT 1 / 0;")
            if m.variant == "timescaledb"
            else m
            for m in original(backend)
        ]

    monkeypatch.setattr(migrate_module, "load_migrations", failing)
    with pytest.raises(MigrationError, match="0002_events failed"):
        await migrate(timescale_url)
    monkeypatch.setattr(migrate_module, "load_migrations", original)
    assert await migrate(timescale_url, backend_choice="native") == MIGRATIONS[1:]
    async with await connect(timescale_url) as conn:
        recorded = await fetch(
            conn, "SELECT value FROM telecare_meta WHERE key = 'storage_backend'"
        )
        partitioned = await fetch(
            conn, "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'events'::regclass"
        )
    assert recorded == [("native",)]
    assert partitioned == [(1,)]


async def test_auto_falls_back_to_native_where_timescaledb_cannot_be_created(
    timescale_url: str,
) -> None:
    # Listed in pg_available_extensions but not creatable (not preloaded, no privilege):
    # here a read-only session stands in for that. "auto" must not choose it, or the
    # first start fails in the events migration.
    async with await connect(timescale_url) as conn:
        await conn.execute(b"SET default_transaction_read_only = on")
        assert await detect_backend(conn, "auto") == "native"
        with pytest.raises(MigrationError, match="TimescaleDB was asked for but CREATE"):
            await detect_backend(conn, "timescaledb")
        assert await fetch(conn, "SELECT extname FROM pg_extension") == [("plpgsql",)]
        await conn.execute(b"SET default_transaction_read_only = off")
        assert await detect_backend(conn, "auto") == "timescaledb"
        extensions = await fetch(conn, "SELECT extname FROM pg_extension ORDER BY 1")
    assert extensions == [("plpgsql",), ("timescaledb",)]
    assert await migrate(timescale_url) == MIGRATIONS  # and the migrations go on from there


async def test_the_ingest_stores_into_timescaledb_with_copy_off(
    timescale: str, mqtt_url: str
) -> None:
    # The hub's own ingest on one PGlite connection: batches of 50 events (COPY territory)
    # go in as INSERTs, a redelivered envelope is counted, the pendant press raises.
    embedded = mqtt_url != REAL_MQTT_URL
    results: list[FlushResult] = []
    pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        timescale, min_size=1, max_size=1, open=False, kwargs={"autocommit": True}
    )
    ingest = Ingest(
        endpoint=MqttEndpoint.from_url(mqtt_url),
        settings=IngestSettings(
            client_id=f"pglite-{uuid.uuid4().hex[:8]}", protocol="3.1.1" if embedded else "auto"
        ),
        pool=pool,
        metrics=HubMetrics(),
        embedded_broker=embedded,
        writer=EventWriter(copy=False),
        on_flush=results.append,
    )
    now = datetime.now(UTC)
    events = telemetry(150, start=now - timedelta(hours=3), step=timedelta(minutes=1))
    alarm = press(now)
    messages = [*envelopes(events, 50), envelope_json([alarm]), envelopes(events, 50)[1]]

    async def stored() -> list[tuple[Any, ...]]:
        async with pool.connection() as conn:
            return await fetch(conn, "SELECT count(*) FROM events")

    await pool.open(wait=True, timeout=30)
    task = asyncio.create_task(ingest.run())
    try:
        await asyncio.wait_for(ingest.connected.wait(), timeout=30)
        assert await publish(mqtt_url, f"telecare/v1/{GATEWAY}/events", messages) == 5
        await wait_until_async(
            lambda: _flushed(results, 201), timeout=30, what="every event written"
        )
        assert await stored() == [(151,)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()
    assert sum(r.inserted for r in results) == 151
    assert sum(r.duplicates for r in results) == 50
    assert [a.event_id for r in results for a in r.alarms] == [alarm.id]


async def _flushed(results: list[FlushResult], events: int) -> bool:
    return sum(r.inserted + r.duplicates for r in results) >= events
