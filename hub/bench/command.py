"""The ``telecare bench`` command: one run from services to the written report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psycopg

from hub.bench.edge import run_edge_part
from hub.bench.edge_report import EdgeReport, edge_summary, render_edge, write_edge_report
from hub.bench.machine import _hub_settings, machine_facts
from hub.bench.phases import Bench
from hub.bench.report import DEFAULT_OUTPUT, render, write_report
from hub.bench.results import Report
from hub.bench.services import resolve_services
from hub.settings import HubSettings


def _command(quick: bool, output: Path) -> str:
    parts = ["telecare bench"]
    if quick:
        parts.append("--quick")
    if output != DEFAULT_OUTPUT:
        parts.append(f"--output {output}")
    env = " ".join(
        f"{k}={v}" for k, v in sorted(os.environ.items())
        if k.startswith("TELECARE_") and k not in {"TELECARE_DATABASE_URL", "TELECARE_MQTT_URL"}
    )  # fmt: skip
    return f"{env} {' '.join(parts)}".strip()


async def _run(settings: HubSettings, *, quick: bool, output: Path) -> int:
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="telecare-bench-"))
    bench = Bench(settings, quick=quick, scratch=scratch)
    report = bench.report
    report.machine.update(machine_facts())
    status = 0
    edge: EdgeReport | None = None
    with contextlib.ExitStack() as stack:
        try:
            services = await asyncio.to_thread(resolve_services, settings, scratch, stack)
            report.services["database"] = services.database_label
            report.services["broker"] = services.broker_label
            bench.services = services
            report.settings.update(_hub_settings(settings, bench))
            print(f"telecare bench: {services.database_label}; {services.broker_label}")
            await bench.run(services)
            print("telecare bench: the edge part (edge daemons on the same services)")
            edge, edge_ran = await run_edge_part(bench, services)
            status = status or int(not edge_ran)
        except Exception as exc:
            status = 1
            report.notes.append(f"the run failed: {type(exc).__name__}: {exc}")
            print(f"telecare bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc()
            if bench.hub is not None:
                print(bench.hub.log_tail(), file=sys.stderr)
        finally:
            await bench.close()
            with contextlib.suppress(psycopg.Error):
                await bench.drop_database()
            shutil.rmtree(scratch, ignore_errors=True)
    if report.single is None:
        return status or 1
    lost = any(t is not None and t.missing for t in (report.single, report.envelopes))
    status = status or int(lost)
    load = os.getloadavg()
    report.machine["load average at end"] = f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    report.seconds = time.monotonic() - started
    write_report(output, render(report, _command(quick, output)))
    _print_summary(report, output)
    if edge is not None:
        write_edge_report(output, render_edge(edge, _command(quick, output)))
        print(f"telecare bench: edge: {edge_summary(edge)}")
    return status


def _print_summary(report: Report, output: Path) -> None:
    parts = []
    if report.single:
        parts.append(f"single {report.single.rate:,.0f} msg/s")
    if report.envelopes:
        parts.append(f"envelopes {report.envelopes.rate:,.0f} events/s")
    if report.telemetry:
        parts.append(f"publish→commit p99 {report.telemetry.ms(99):.1f} ms")
    if report.alarm:
        parts.append(f"press→alarm p99 {report.alarm.ms(99):.1f} ms")
    print(f"telecare bench: {'; '.join(parts)}; written to {output}")


def run_bench(settings: HubSettings, *, quick: bool, output: Path) -> int:
    """Run the benchmark and write ``output``; 0 if it ran and lost nothing, else 1."""
    return asyncio.run(_run(settings, quick=quick, output=output))
