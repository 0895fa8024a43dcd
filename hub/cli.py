"""The ``telecare`` command.

    telecare hub                 run the hub (ingest, alarms, HTTP API)
    telecare db migrate          apply database migrations
    telecare admin import FILE   import the registry from YAML or JSON (idempotent)
    telecare demo                the hub on embedded services with simulated homes on edge daemons
    telecare simulate            simulated homes on real edge daemons, to TELECARE_MQTT_URL
    telecare bench               measure ingest and alarm latency; writes docs/benchmarks.md
    telecare edge --config FILE  run an edge gateway daemon (edge/; see docs/deploy/)

The edge daemon runs on a gateway, not on the hub; it shares this command so that one
installed package serves both. Only its logging set-up comes from ``hub``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import structlog

from devices.errors import TelecareError
from devices.events import is_identifier
from hub.logs import configure_logging
from hub.settings import HubSettings

log = structlog.get_logger(__name__)


# psycopg and uvicorn are imported where they are used: `telecare edge` runs on small
# gateways and must not carry the hub's libraries in memory (docs/benchmarks.md, RSS).


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telecare", description="Telecare hub.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("hub", help="run the hub: ingest, alarms and the HTTP API")
    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("migrate", help="apply pending migrations")
    admin = sub.add_parser("admin", help="registry administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    imp = admin_sub.add_parser("import", help="import districts, sites, residents, gateways,"
                               " devices from a YAML or JSON file")
    imp.add_argument("file", type=Path)
    demo = sub.add_parser("demo", help="run the hub with simulated homes")
    demo.add_argument("--homes", type=_count, default=20)
    demo.add_argument("--care-homes", type=_count, default=1, help="care homes of 10 rooms")
    demo.add_argument("--press-every", type=float, default=90.0,
                      help="mean seconds between extra pendant presses across all homes"
                      " (0: none)")
    simulate = sub.add_parser("simulate", help="simulated homes and care homes on real edge"
                              " daemons, against the hub broker of TELECARE_MQTT_URL")
    simulate.add_argument("--homes", type=_count, default=20)
    simulate.add_argument("--care-homes", type=_count, default=0)
    simulate.add_argument("--speed", type=_positive, default=1.0,
                          help="simulated seconds per real second")
    simulate.add_argument("--seed", type=int, default=1)
    simulate.add_argument("--days", type=_positive, default=None,
                          help="simulated days to run (default: until Ctrl+C)")
    simulate.add_argument("--start", type=_aware_datetime, default=None,
                          help="simulated start, ISO 8601 with an offset (default: now)")
    simulate.add_argument("--registry-out", type=Path, default=None,
                          help="where to write the registry (default: WORK_DIR/registry.json)")
    simulate.add_argument("--work-dir", type=Path, default=None,
                          help="edge configs, queues and labels"
                          " (default: TELECARE_DATA_DIR/simulation)")
    simulate.add_argument("--prefix", type=_prefix, default="sim", help="id prefix of the world")
    bench = sub.add_parser("bench", help="run the benchmarks and write docs/benchmarks.md")
    bench.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    bench.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    bench.add_argument("--edge-only", action="store_true",
                       help="only the edge part (writes only its block of the report)")
    edge = sub.add_parser("edge", help="run an edge gateway daemon from its TOML config")
    edge.add_argument("--config", type=Path, required=True, help="edge.toml")
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _aware_datetime(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError("needs a UTC offset, e.g. 2025-03-10T06:00+01:00")
    return value


def _prefix(text: str) -> str:
    if not is_identifier(f"{text}-home-0001") or len(text) > 40:
        raise argparse.ArgumentTypeError("letters, digits, '-' and '_', starting with one")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = HubSettings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        return _dispatch(args, settings)
    except TelecareError as exc:
        print(f"telecare: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(  # noqa: PLR0911 - one return per subcommand
    args: argparse.Namespace, settings: HubSettings
) -> int:
    if args.command == "hub":
        return run_hub(settings)
    if args.command == "db":
        asyncio.run(_migrate_only(settings))
        return 0
    if args.command == "admin":
        asyncio.run(_admin_import(settings, args.file))
        return 0
    if args.command == "demo":
        from hub.demo import run_demo

        return run_demo(
            settings, homes=args.homes, care_homes=args.care_homes, press_every_s=args.press_every
        )
    if args.command == "simulate":
        from hub.demo import run_simulate

        return run_simulate(
            settings, homes=args.homes, care_homes=args.care_homes, speed=args.speed,
            seed=args.seed, days=args.days, registry_out=args.registry_out,
            work_dir=args.work_dir, start=args.start, prefix=args.prefix,
        )
    if args.command == "bench":
        if args.edge_only:
            from hub.bench.edge import run_edge_only

            return asyncio.run(run_edge_only(settings, quick=args.quick, output=args.output))
        from hub.bench import run_bench

        return run_bench(settings, quick=args.quick, output=args.output)
    if args.command == "edge":
        from edge.config import load_config
        from edge.daemon import run_edge

        return run_edge(load_config(args.config))
    raise AssertionError(args.command)  # argparse allows nothing else


def run_hub(settings: HubSettings) -> int:
    """Serve the API with the runtime in its lifespan, until SIGINT or SIGTERM."""
    import uvicorn

    from hub.api.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


async def _migrate_only(settings: HubSettings) -> None:
    from hub.runtime import HubRuntime

    async with HubRuntime(settings, run_ingest=False) as runtime:
        log.info("database_migrated", database=_where(runtime.database_url))


async def _admin_import(settings: HubSettings, path: Path) -> None:
    import psycopg

    from hub.admin import import_registry, load_registry
    from hub.runtime import HubRuntime

    registry = load_registry(path)
    async with (
        HubRuntime(settings, run_ingest=False) as runtime,
        await psycopg.AsyncConnection.connect(runtime.database_url) as conn,
    ):
        counts = await import_registry(conn, registry)
    print("imported: " + ", ".join(f"{n} {table}" for table, n in counts.items()))


def _where(url: str) -> str:
    """A database URL without its credentials, for logs."""
    return url.rsplit("@", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
