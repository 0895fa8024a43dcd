"""The ``telecare`` command.

    telecare hub                 run the hub (ingest, alarms, HTTP API)
    telecare db migrate          apply database migrations
    telecare admin import FILE   import the registry from YAML or JSON (idempotent)
    telecare demo                the hub on embedded services with 20 simulated homes
    telecare bench               measure ingest and alarm latency; writes docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg
import structlog
import uvicorn

from devices.errors import TelecareError
from hub.logs import configure_logging
from hub.settings import HubSettings

log = structlog.get_logger(__name__)


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
    demo.add_argument("--homes", type=int, default=20)
    demo.add_argument("--press-every", type=float, default=90.0,
                      help="mean seconds between pendant presses across all homes")
    bench = sub.add_parser("bench", help="run the benchmarks and write docs/benchmarks.md")
    bench.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    bench.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    return parser


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


def _dispatch(args: argparse.Namespace, settings: HubSettings) -> int:
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

        return run_demo(settings, homes=args.homes, press_every_s=args.press_every)
    if args.command == "bench":
        from hub.bench import run_bench

        return run_bench(settings, quick=args.quick, output=args.output)
    raise AssertionError(args.command)  # argparse allows nothing else


def run_hub(settings: HubSettings) -> int:
    """Serve the API with the runtime in its lifespan, until SIGINT or SIGTERM."""
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
