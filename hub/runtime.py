"""The running hub: database, broker, migrations, the ingest and the maintenance task.

``HubRuntime`` is an async context manager. With ``TELECARE_DATABASE_URL`` unset it starts
a private PostgreSQL under ``TELECARE_DATA_DIR``; with ``TELECARE_MQTT_URL`` unset it runs
an in-process MQTT broker. Either way the rest of the hub sees a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import psycopg
import psycopg_pool
import structlog

from hub.db.migrate import migrate
from hub.db.partitions import maintain
from hub.ingest import Ingest
from hub.metrics import HubMetrics
from hub.settings import HubSettings, MqttEndpoint
from hub.store.writer import EventWriter
from hub.supervision import GatewaySupervisor

log = structlog.get_logger(__name__)


class HubRuntime:
    """Everything one hub process runs besides the HTTP server."""

    def __init__(self, settings: HubSettings, *, run_ingest: bool = True) -> None:
        self.settings = settings
        self.metrics = HubMetrics()
        self.run_ingest = run_ingest
        self.database_url = ""
        self.mqtt_url = ""
        self.pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self.ingest: Ingest | None = None
        self.supervisor: GatewaySupervisor | None = None
        self._embedded_pg: Any = None
        self._embedded_broker: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> HubRuntime:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = await self._database()
        self.mqtt_url = await self._broker()
        await migrate(self.database_url, backend_choice=s.storage.backend)
        self.pool = psycopg_pool.AsyncConnectionPool(
            self.database_url,
            min_size=s.storage.pool_min_size,
            max_size=s.storage.pool_max_size,
            open=False,
            name="hub",
            kwargs={"autocommit": True},  # transactions are explicit: conn.transaction()
        )
        await self.pool.open(wait=True, timeout=30)
        await self.maintain()
        self._tasks.append(asyncio.create_task(self._maintenance_loop(), name="maintenance"))
        if self.run_ingest:
            self.ingest = Ingest(
                endpoint=MqttEndpoint.from_url(self.mqtt_url),
                settings=s.ingest,
                pool=self.pool,
                metrics=self.metrics,
                embedded_broker=self._embedded_broker is not None,
                writer=EventWriter(copy=s.storage.use_copy),
            )
            self._tasks.append(asyncio.create_task(self.ingest.run(), name="ingest"))
            self.supervisor = GatewaySupervisor(self.pool, s.supervision)
            self._tasks.append(asyncio.create_task(self.supervisor.run(), name="supervision"))
        log.info(
            "hub_started",
            database="embedded" if self._embedded_pg else "external",
            broker="embedded" if self._embedded_broker else "external",
        )

    async def _database(self) -> str:
        if self.settings.database_url is not None:
            return self.settings.database_url.get_secret_value()
        from hub.embedded import EmbeddedPostgres

        self._embedded_pg = EmbeddedPostgres(
            self.settings.data_dir / "postgres", port=self.settings.embedded_pg_port
        )
        url: str = await asyncio.to_thread(self._embedded_pg.start)
        return url

    async def _broker(self) -> str:
        if self.settings.mqtt_url is not None:
            return self.settings.mqtt_url.get_secret_value()
        from hub.embedded import EmbeddedBroker

        self._embedded_broker = EmbeddedBroker(port=self.settings.embedded_mqtt_port)
        url: str = await self._embedded_broker.start()
        return url

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.pool is not None:
            await self.pool.close()
        if self._embedded_broker is not None:
            await self._embedded_broker.stop()
        if self._embedded_pg is not None:
            await asyncio.to_thread(self._embedded_pg.stop)

    async def maintain(self) -> None:
        """Create partitions ahead and drop those past retention."""
        assert self.pool is not None  # noqa: S101 - only called after start
        async with self.pool.connection() as conn:
            await maintain(
                conn,
                today=datetime.now(UTC).date(),
                ahead_days=self.settings.storage.partitions_ahead_days,
                retention_days=self.settings.storage.events_retention_days,
            )

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.storage.maintenance_interval_s)
            try:
                await self.maintain()
            except psycopg.Error as exc:
                log.error("maintenance_failed", error=str(exc))

    async def health(self) -> dict[str, Any]:
        """Database and broker connectivity, as ``/health`` reports it."""
        database = "ok"
        try:
            assert self.pool is not None  # noqa: S101
            async with self.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except (psycopg.Error, psycopg_pool.PoolTimeout, AssertionError) as exc:
            database = f"error: {type(exc).__name__}"
        broker = "disabled"
        if self.ingest is not None:
            broker = "ok" if self.ingest.connected.is_set() else "disconnected"
        ok = database == "ok" and broker in {"ok", "disabled"}
        return {"status": "ok" if ok else "degraded", "database": database, "broker": broker}
