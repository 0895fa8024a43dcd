"""``telecare demo``: the hub on embedded services (unless configured) with simulated homes."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import psycopg
import structlog
import uvicorn

from hub.admin import RegistryFile, import_registry
from hub.api.app import create_app
from hub.runtime import HubRuntime
from hub.settings import HubSettings
from simulators.population import demo_homes, demo_registry, run_population

log = structlog.get_logger(__name__)


def run_demo(settings: HubSettings, *, homes: int, press_every_s: float) -> int:
    settings = settings.model_copy(update={"environment": "demo"})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(settings, homes=homes, press_every_s=press_every_s))
    return 0


async def _demo(settings: HubSettings, *, homes: int, press_every_s: float) -> None:
    population = demo_homes(homes)
    async with HubRuntime(settings) as runtime:
        async with await psycopg.AsyncConnection.connect(runtime.database_url) as conn:
            await import_registry(conn, RegistryFile.model_validate(demo_registry(population)))
        stop = asyncio.Event()
        simulator = asyncio.create_task(
            run_population(runtime.mqtt_url, population, press_every_s=press_every_s, stop=stop)
        )
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, runtime=runtime),
                host=settings.http_host,
                port=settings.http_port,
                log_config=None,
                access_log=False,
            )
        )
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.05)
        if server.started:
            _print_banner(settings, runtime, homes)
        try:
            await serving
        finally:
            stop.set()
            simulator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await simulator


def _print_banner(settings: HubSettings, runtime: HubRuntime, homes: int) -> None:
    base = f"http://{settings.http_host}:{settings.http_port}"
    database = "embedded PostgreSQL" if settings.database_url is None else "external PostgreSQL"
    broker = f"embedded MQTT broker at {runtime.mqtt_url}" if settings.mqtt_url is None else (
        "external MQTT broker"
    )
    print(
        f"""
Telecare demo is running with {homes} simulated homes ({database}, {broker}).

  Status page (alarms, gateways):  {base}/
  API documentation:               {base}/api/v1/docs
  Open alarms (JSON):              {base}/api/v1/alarms?open=true
  Health / metrics:                {base}/health  {base}/metrics

Demo log-ins: none yet. Log-in and roles arrive with the alarm console; until then the
API is open on 127.0.0.1 only and each alarm action names its actor in the request body,
for example:
  curl -X POST {base}/api/v1/alarms/<id>/acknowledge \\
       -H 'content-type: application/json' -d '{{"actor": "demo-operator"}}'

Data is kept in {settings.data_dir.resolve()}. Stop with Ctrl+C.
""",
        file=sys.stderr,
        flush=True,
    )
