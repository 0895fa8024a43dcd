"""``telecare demo`` and ``telecare simulate``: simulated homes on real edge daemons.

``demo`` runs the hub on embedded services (unless configured), imports the registry of
a small simulated world and plays it live at real speed (``simulators.run``): every home
and care home has a real ``EdgeDaemon`` fed by simulated devices over their own
protocols. The behaviour model's pendant presses are rare (a few a month per resident),
so the demo adds one every ``press_every_s`` on average across the homes, for a visitor
to see an alarm within minutes.

``simulate`` plays a world of any size against the hub broker of ``TELECARE_MQTT_URL``
(the hub runs elsewhere) and writes the registry for ``telecare admin import``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Literal

import psycopg
import structlog
import uvicorn

from hub.admin import RegistryFile, import_registry
from hub.api.app import create_app
from hub.errors import ConfigurationError
from hub.runtime import HubRuntime
from hub.settings import HubSettings
from simulators.run import SimulationRun
from simulators.world import WorldConfig, build_world

log = structlog.get_logger(__name__)

DEMO_SEED = 7
DEMO_CARE_HOME_ROOMS = 10


def run_demo(
    settings: HubSettings, *, homes: int, care_homes: int = 1, press_every_s: float = 90.0
) -> int:
    settings = settings.model_copy(update={"environment": "demo"})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _demo(settings, homes=homes, care_homes=care_homes, press_every_s=press_every_s)
        )
    return 0


def _hub_protocol(settings: HubSettings, *, embedded: bool) -> Literal["5", "3.1.1"]:
    """What the edges speak to the hub's broker (the embedded one speaks 3.1.1 only)."""
    return "3.1.1" if embedded or settings.ingest.protocol == "3.1.1" else "5"


async def _demo(
    settings: HubSettings, *, homes: int, care_homes: int, press_every_s: float
) -> None:
    rooms = (DEMO_CARE_HOME_ROOMS, DEMO_CARE_HOME_ROOMS)
    config = WorldConfig(homes=homes, care_homes=care_homes, care_home_rooms=rooms, prefix="demo")
    world = build_world(config, seed=DEMO_SEED)
    async with HubRuntime(settings) as runtime:
        simulation = SimulationRun(
            world,
            hub_mqtt_url=runtime.mqtt_url,
            hub_protocol=_hub_protocol(settings, embedded=settings.mqtt_url is None),
            work_dir=settings.data_dir / "simulation",
            seed=DEMO_SEED,
            press_every_s=press_every_s if press_every_s > 0 else None,
        )
        async with await psycopg.AsyncConnection.connect(runtime.database_url) as conn:
            await import_registry(conn, RegistryFile.model_validate(simulation.registry()))
        simulator = asyncio.create_task(simulation.run())
        simulator.add_done_callback(_simulation_ended)
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
            _print_banner(settings, runtime, homes, care_homes, simulation.work_dir)
        try:
            await serving
        finally:
            simulator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await simulator


def _simulation_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("demo_simulation_failed", error=repr(task.exception()))


def run_simulate(
    settings: HubSettings,
    *,
    homes: int,
    care_homes: int,
    speed: float,
    seed: int,
    days: float | None,
    registry_out: Path | None,
    work_dir: Path | None,
    start: datetime | None,
    prefix: str,
) -> int:
    """``telecare simulate``: until Ctrl-C (or ``days`` simulated days)."""
    if settings.mqtt_url is None:
        raise ConfigurationError(
            "telecare simulate needs TELECARE_MQTT_URL: the hub's broker the simulated "
            "gateways publish to (for example mqtt://127.0.0.1:1883)"
        )
    world = build_world(WorldConfig(homes=homes, care_homes=care_homes, prefix=prefix), seed=seed)
    simulation = SimulationRun(
        world,
        hub_mqtt_url=settings.mqtt_url.get_secret_value(),
        hub_protocol=_hub_protocol(settings, embedded=False),
        work_dir=work_dir or settings.data_dir / "simulation",
        seed=seed,
        speed=speed,
        start=start,
        days=days,
    )
    registry = RegistryFile.model_validate(simulation.registry())  # refuses a bad id early
    out = registry_out or simulation.work_dir / "registry.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(registry.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    print(
        f"Registry of {len(world.sites)} sites written to {out}; import it into the hub with\n"
        f"  telecare admin import {out}\n"
        f"Edge configs, queues and labels.jsonl are in {simulation.work_dir}. Stop with Ctrl+C.",
        file=sys.stderr,
        flush=True,
    )

    async def main() -> None:
        task = asyncio.ensure_future(simulation.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return 0


def _print_banner(
    settings: HubSettings, runtime: HubRuntime, homes: int, care_homes: int, work_dir: Path
) -> None:
    base = f"http://{settings.http_host}:{settings.http_port}"
    database = "embedded PostgreSQL" if settings.database_url is None else "external PostgreSQL"
    broker = (
        f"embedded MQTT broker at {runtime.mqtt_url}"
        if settings.mqtt_url is None
        else ("external MQTT broker")
    )
    sites = f"{homes} simulated homes"
    if care_homes:
        rooms = DEMO_CARE_HOME_ROOMS
        sites += f" and {care_homes} care home{'s' if care_homes > 1 else ''} ({rooms} rooms)"
    print(
        f"""
Telecare demo is running with {sites} ({database}, {broker}).
Each home runs a real edge daemon, fed by simulated devices over their own protocols ({work_dir}).

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
