"""The edge part of ``telecare bench``: a real edge daemon (``python -m hub edge``, what
``telecare edge`` runs on a gateway) against the broker, hub and database of the run.

Phases (``EdgeBench.run``), after the hub's, with a hub process of their own:

* idle: a daemon with ten devices (two medicine dispensers on pseudo-terminals, eight
  Zigbee devices behind a simulated Zigbee2MQTT bridge on the run's broker, standing in
  for the home's), connected and quiet: its RSS, CPU share and wake-ups over a window.
  Baseline: the RSS of interpreters that only import (nothing, the edge's modules, what
  ``telecare edge`` imports).
* serial latency: one of those dispensers sends dose reports at a steady rate. The
  device's port decodes what the device writes, so each report is timed when its frame
  is written to the pty; then when the edge's ACK comes back (stored durably), when the
  hub received it (``events.received_at``; one machine, one wall clock), and when a query
  finds its row (polled every ms while a report is outstanding, as the hub's probes are).
  Baselines: a pty round trip and one fsynced queue ``put``, measured here, and the MQTT
  hop of the hub's part.
* drain: events are put into the queue of a second daemon, which is then started with
  its uplink pointed at a loopback port where nothing listens (the outage: every connect
  is refused; the reconnect backoff is capped at 0.5 s for the bench). The outage ends
  when a relay starts listening on that port and forwards to the broker; measured from
  then until a plain subscriber has every event, and until the hub's ingested counter
  has them all. Baseline: the same events in the same envelopes, published by a plain
  aiomqtt publisher at QoS 1 through a relay of its own (the same path).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg
import structlog

from edge.config import load_config
from edge.queue import AsyncEdgeQueue
from hub.bench.edge_io import (
    RSS_PROBES,
    ZIGBEE,
    ZIGBEE_STATE,
    Arrivals,
    EdgeProcess,
    Relay,
    TimedPort,
    clear_retained,
    edge_toml,
    envelopes,
    filesystem,
    hub_url,
    peak_rss,
    pty_round_trips,
    publish_plain,
    queue_alone,
    queue_puts,
    rss_of,
    running,
    switches,
    telemetry,
)
from hub.bench.edge_report import (
    EDGE,
    EDGE_FULL,
    EDGE_QUICK,
    Drain,
    EdgeIdle,
    EdgeReport,
    SerialLatency,
    SerialSample,
    lost_anything,
    render_edge,
    write_edge_report,
)
from hub.bench.machine import machine_facts
from hub.bench.mqtt import _mqtt_client, forget_session
from hub.bench.phases import Bench
from hub.bench.plan import PROBE_POLL_S
from hub.bench.services import HubProcess, Progress, Services, resolve_services
from hub.settings import HubSettings
from simulators.devices import SimDispenser, SimZigbeeBridge

log = structlog.get_logger(__name__)

REPORT_RATE_S = 20.0
REPORT_TIMEOUT_S = 10.0


# --- the phases -------------------------------------------------------------------------


class EdgeBench:
    """The edge phases of one run, on the services and scratch database of ``bench``."""

    def __init__(self, bench: Bench, services: Services) -> None:
        self.bench, self.services = bench, services
        self.endpoint = services.endpoint
        self.plan = EDGE_QUICK if bench.report.quick else EDGE_FULL
        self.report = EdgeReport(started=datetime.now(UTC), quick=bench.report.quick,
                                 plan=self.plan)  # fmt: skip
        self.scratch = bench.scratch / "edge"
        tag = secrets.token_hex(3)
        self.home, self.drain_gw, self.base_gw = (
            f"bench-edge-{name}-{tag}" for name in ("home", "drain", "base")
        )
        self.protocol = "5" if bench.v5 else "3.1.1"
        self.hub: HubProcess | None = None
        self.rss_baselines: dict[str, int] = {}
        self.pty_rtt: list[float] = []
        self.queue_put: list[float] = []
        self.sessions: list[str] = []
        self.retained: list[str] = []

    async def run(self) -> EdgeReport:
        """Every phase; what was measured stays in ``report`` even if a later one fails."""
        started = time.monotonic()
        report = self.report
        report.machine.update(
            {k: v for k, v in self.bench.report.machine.items() if not k.startswith("load")}
        )
        report.machine["load average at the edge part's start"] = _load()
        report.hop = self.bench.report.hop
        report.hub_telemetry = self.bench.report.telemetry
        try:
            await self._prepare()
            await self._home()
            await self._drain()
        finally:
            await self._cleanup()
            report.machine["load average at the edge part's end"] = _load()
            report.seconds = time.monotonic() - started
        return report

    async def _prepare(self) -> None:
        from hub.admin import RegistryFile, import_registry

        assert self.bench.conn is not None  # noqa: S101 - set up by the hub's part
        assert self.bench.cpu is not None  # noqa: S101
        self.scratch.mkdir(parents=True, exist_ok=True)
        setup = self.report.setup
        setup.update(self.bench.report.services)
        setup.pop("scratch database", None)
        setup["edge data directory"] = (
            f"{filesystem(self.scratch)}; the queue fsyncs every commit there"
        )
        setup["edge daemons"] = (
            f"`python -m hub edge --config …` (what `telecare edge` runs), MQTT"
            f" {self.protocol} to the broker, reconnect backoff 0.2-0.5 s"
        )
        await import_registry(self.bench.conn, RegistryFile.model_validate(self._registry()))
        for label, code in RSS_PROBES.items():
            self.rss_baselines[label] = await rss_of(code)
        self.pty_rtt = await asyncio.to_thread(pty_round_trips, 200)
        self.queue_put = await queue_puts(self.scratch / "put" / "q.sqlite3", self.home, 200)
        self.hub = HubProcess(
            self.bench.settings, database_url=self.bench.database_url,
            mqtt_url=self.services.mqtt_url, scratch=self.bench.scratch, protocol=self.protocol,
        )  # fmt: skip
        await self.hub.start()
        self.bench.cpu.groups["hub"] = [self.hub.pid]

    def _registry(self) -> dict[str, Any]:
        site = f"{self.home}-site"
        devices = [
            {"id": f"{self.home}.{name}", "gateway_id": self.home, "device_type": device_type}
            for name, device_type in ZIGBEE
        ] + [
            {"id": f"{self.home}.dispenser-{i}", "gateway_id": self.home,
             "device_type": "medicine_dispenser"}
            for i in (1, 2)
        ]  # fmt: skip
        return {
            "districts": [{"id": "bench-district", "name": "Bench"}],
            "sites": [{"id": site, "district_id": "bench-district", "kind": "home",
                       "name": "Bench edge home"}],
            "gateways": [{"id": g, "site_id": site}
                         for g in (self.home, self.drain_gw, self.base_gw)],
            "devices": devices,
        }  # fmt: skip

    async def _cleanup(self) -> None:
        if self.hub is not None:
            await self.hub.stop()
            if self.bench.cpu is not None:
                self.bench.cpu.groups.pop("hub", None)
            await forget_session(self.endpoint, self.hub.client_id, v5=self.bench.v5)
        for client_id in self.sessions:
            await forget_session(self.endpoint, client_id, v5=self.protocol == "5")
        await clear_retained(self.endpoint, self.retained)

    async def _start_edge(self, config: Path, gateway: str) -> EdgeProcess:
        self.sessions.append(f"telecare-edge-{gateway}")
        self.retained.append(f"telecare/v1/{gateway}/status")
        edge = EdgeProcess(config).start()
        assert self.bench.cpu is not None  # noqa: S101 - set up by the hub's part
        self.bench.cpu.groups[EDGE] = [edge.pid]
        return edge

    async def _stop_edge(self, edge: EdgeProcess) -> None:
        if self.bench.cpu is not None:
            self.bench.cpu.groups.pop(EDGE, None)
        await edge.stop()

    # -- a home: idle, then serial latency --

    async def _home(self) -> None:
        work = self.scratch / self.home
        (work / "dev").mkdir(parents=True)
        ports = [TimedPort(work / "dev" / f"dispenser-{i}") for i in (1, 2)]
        ids = [f"{self.home}.dispenser-{i}" for i in (1, 2)]
        base = f"z2m-{self.home}"
        self.retained += [f"{base}/bridge/state", *(f"{base}/{n}/availability" for n, _ in ZIGBEE)]
        config = edge_toml(
            gateway=self.home, data_dir=work, hub_url=hub_url(self.endpoint),
            protocol=self.protocol, heartbeat_s=30, z2m=(self.services.mqtt_url, base),
            dispensers=[(p.link_path, i) for p, i in zip(ports, ids, strict=True)],
        )  # fmt: skip
        sims = [SimDispenser(port, heartbeat_s=60.0) for port in ports]
        bridge = SimZigbeeBridge(self.services.mqtt_url, base_topic=base)
        async with contextlib.AsyncExitStack() as stack:
            for sim in sims:
                await sim.start()
                stack.push_async_callback(sim.stop)
            await bridge.start()
            stack.push_async_callback(bridge.stop)
            edge = await self._start_edge(config, self.home)
            stack.push_async_callback(self._stop_edge, edge)
            await self._online(self.home, edge)
            for name, device_type in ZIGBEE:
                if device_type == "door_lock":
                    await bridge.add_lock(name)
                else:
                    await bridge.update(name, battery=95, **ZIGBEE_STATE[device_type])
            await self._warm_up(sims[0], ids[0], edge)
            await asyncio.sleep(self.plan.settle_s)
            edge.check()
            self.report.idle = await self._idle(edge)
            self.report.serial = await self._serial(sims[0], ports[0], ids[0])

    async def _online(self, gateway: str, edge: EdgeProcess) -> None:
        client = _mqtt_client(self.endpoint, f"bench-edge-status-{secrets.token_hex(4)}", v5=False)
        try:
            async with client, asyncio.timeout(60):
                await client.subscribe(f"telecare/v1/{gateway}/status", qos=1)
                async for message in client.messages:
                    if isinstance(message.payload, bytes) and b'"online"' in message.payload:
                        return
        except TimeoutError:
            edge.check()
            raise RuntimeError("the edge daemon did not come online within 60 s") from None

    async def _warm_up(self, sim: SimDispenser, device_id: str, edge: EdgeProcess) -> None:
        """One report through the whole path: the line is open and the uplink is up."""
        dose_id = f"warm-{secrets.token_hex(3)}"
        sim.dose_due(dose_id, datetime.now(UTC))
        deadline = time.monotonic() + 60
        while not await self._doses(device_id, [dose_id]):
            edge.check()
            if time.monotonic() > deadline:
                raise RuntimeError("a dose report did not reach the database within 60 s")
            await asyncio.sleep(0.1)

    async def _doses(self, device_id: str, dose_ids: list[str]) -> list[tuple[str, datetime]]:
        assert self.bench.conn is not None  # noqa: S101 - set up by the hub's part
        cur = await self.bench.conn.execute(
            "SELECT payload->>'dose_id', received_at FROM events WHERE gateway_id = %s"
            " AND device_id = %s AND payload->>'dose_id' = ANY(%s)",
            (self.home, device_id, dose_ids),
        )
        return [(str(row[0]), row[1]) for row in await cur.fetchall()]

    async def _idle(self, edge: EdgeProcess) -> EdgeIdle:
        result = EdgeIdle(devices=len(ZIGBEE) + 2, baselines=self.rss_baselines)
        woken = switches(edge.pid)
        before = await self.bench.sample_cpu()
        await asyncio.sleep(self.plan.idle_s)
        result.cpu = await self.bench.usage_since(before)
        result.switches = switches(edge.pid) - woken
        result.seconds = result.cpu.wall
        result.cpu_s = result.cpu.seconds.get(EDGE, math.nan)
        process = psutil.Process(edge.pid)
        memory = process.memory_full_info()
        result.rss, result.uss = int(memory.rss), int(memory.uss)
        result.peak_rss, result.threads = peak_rss(edge.pid), int(process.num_threads())
        return result

    async def _serial(self, sim: SimDispenser, port: TimedPort, device_id: str) -> SerialLatency:
        result = SerialLatency(rate=REPORT_RATE_S, pty_rtt=self.pty_rtt, queue_put=self.queue_put)
        result.sent = count = int(self.plan.latency_s * REPORT_RATE_S)
        tag = secrets.token_hex(3)
        scheduled = datetime.now(UTC)
        before = await self.bench.sample_cpu()
        start = time.monotonic()
        poller = asyncio.create_task(self._poll(port, tag, device_id, result))
        for i in range(count):
            delay = start + i / REPORT_RATE_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            report = sim.dose_due if i % 2 == 0 else sim.dose_taken
            report(f"{tag}-{i:05d}", scheduled)
        await poller
        result.cpu = await self.bench.usage_since(before)
        result.lost = count - len(result.samples)
        return result

    async def _poll(self, port: TimedPort, tag: str, device_id: str, out: SerialLatency) -> None:
        """Query for every written, unresolved report every ``PROBE_POLL_S``; a report not
        found within ``REPORT_TIMEOUT_S`` of its frame is given up (counted lost)."""
        done: set[str] = set()
        last_progress = time.monotonic()
        while len(done) < out.sent and time.monotonic() - last_progress < REPORT_TIMEOUT_S:
            pending = [d for d in port.written if d.startswith(tag) and d not in done]
            if not pending:
                await asyncio.sleep(PROBE_POLL_S)
                continue
            rows = await self._doses(device_id, pending)
            seen = time.monotonic()
            for dose_id, received_at in rows:
                written, wall, kind = port.written[dose_id]
                acked = port.acked.get(dose_id, math.nan) - written
                out.samples.append(
                    SerialSample(kind, acked, received_at.timestamp() - wall, seen - written)
                )
                done.add(dose_id)
                last_progress = seen
            for dose_id in pending:
                if dose_id not in done and seen - port.written[dose_id][0] > REPORT_TIMEOUT_S:
                    done.add(dose_id)
            await asyncio.sleep(PROBE_POLL_S)

    # -- a drain after an outage --

    async def _drain(self) -> None:
        n = self.plan.drain_events
        result = self.report.drain = Drain(events=n)
        base_events = telemetry(self.base_gw, n)
        payloads = envelopes(base_events)
        result.envelopes = len(payloads)
        result.fill_s, result.queue_s = await queue_alone(
            self.scratch / "alone" / "q.sqlite3", base_events
        )
        relay = Relay(self.endpoint)
        await relay.open()
        try:
            await self._drain_baseline(result, {str(e.id) for e in base_events}, payloads, relay)
        finally:
            await relay.close()
        await self._drain_edge(result)
        result.stored, result.distinct = await self._stored(self.drain_gw)

    async def _drain_baseline(
        self, result: Drain, ids: set[str], payloads: list[bytes], relay: Relay
    ) -> None:
        assert self.hub is not None  # noqa: S101 - started in _prepare
        arrivals = Arrivals(self.endpoint, self.base_gw, ids)
        async with running(arrivals.run()), Progress(self.hub) as progress:
            await asyncio.wait_for(arrivals.ready.wait(), 30)
            base = progress.value
            before = await self.bench.sample_cpu()
            topic = f"telecare/v1/{self.base_gw}/events"
            start, acked = await publish_plain(relay.endpoint(), topic, payloads)
            result.base_acked_s = acked - start
            await self._settle(lambda: len(ids) - len(arrivals.remaining), len(ids))
            result.base_broker_s = arrivals.last - start if arrivals.done.is_set() else math.nan
            await self._settle(lambda: progress.value - base, len(ids), progress.wait)
            result.base_hub_s = (progress.reached(base + len(ids)) or math.nan) - start
            result.base_cpu = await self.bench.usage_since(before)

    async def _drain_edge(self, result: Drain) -> None:
        assert self.hub is not None  # noqa: S101 - started in _prepare
        n = result.events
        events = telemetry(self.drain_gw, n)
        relay = Relay(self.endpoint)
        config = edge_toml(
            gateway=self.drain_gw, data_dir=self.scratch / self.drain_gw, protocol=self.protocol,
            hub_url=hub_url(self.endpoint, relay.port), heartbeat_s=3600,
        )  # fmt: skip
        queue = await AsyncEdgeQueue.open(load_config(config).queue_path)
        try:
            for offset in range(0, n, 1000):
                await queue.put(events[offset : offset + 1000])
        finally:
            await queue.close()
        arrivals = Arrivals(self.endpoint, self.drain_gw, {str(e.id) for e in events})
        edge = await self._start_edge(config, self.drain_gw)
        try:
            async with running(arrivals.run()), Progress(self.hub) as progress:
                await asyncio.wait_for(arrivals.ready.wait(), 30)
                base = progress.value
                await edge.logged("edge_started")
                await asyncio.sleep(self.plan.outage_s)
                edge.check()
                result.outage_s = self.plan.outage_s
                if not math.isnan(arrivals.first) or progress.value != base:
                    self.report.notes.append("events arrived during the outage: check the relay")
                before = await self.bench.sample_cpu()
                restored = time.monotonic()
                await relay.open()
                await self._settle(lambda: n - len(arrivals.remaining), n)
                result.first_s = arrivals.first - restored
                result.broker_s = arrivals.last - restored if arrivals.done.is_set() else math.nan
                await self._settle(lambda: progress.value - base, n, progress.wait)
                result.hub_s = (progress.reached(base + n) or math.nan) - restored
                result.cpu = await self.bench.usage_since(before)
                result.peak_rss = peak_rss(edge.pid)
        finally:
            await self._stop_edge(edge)
            await relay.close()

    async def _settle(
        self, value: Callable[[], float], target: float,
        wait: Callable[[], Awaitable[None]] | None = None,
    ) -> None:  # fmt: skip
        await self.bench._settle(value, target, wait or (lambda: asyncio.sleep(0.005)))

    async def _stored(self, gateway: str) -> tuple[int, int]:
        assert self.bench.conn is not None  # noqa: S101 - set up by the hub's part
        cur = await self.bench.conn.execute(
            "SELECT count(*), count(DISTINCT id) FROM events WHERE gateway_id = %s"
            " AND kind <> 'heartbeat'", (gateway,),
        )  # fmt: skip
        row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)


def _load() -> str:
    load = os.getloadavg()
    return f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"


async def run_edge_part(bench: Bench, services: Services) -> tuple[EdgeReport, bool]:
    """The edge phases after the hub's: the report, and whether they all ran and every
    event and report reached the database."""
    edge = EdgeBench(bench, services)
    if services.endpoint.tls:
        edge.report.notes.append("not run: the edge part needs a plain mqtt:// broker")
        return edge.report, False
    try:
        await edge.run()
    except Exception as exc:
        edge.report.notes.append(f"the edge part failed: {type(exc).__name__}: {exc}")
        log.exception("bench_edge_failed")
        return edge.report, False
    return edge.report, not lost_anything(edge.report)


async def run_edge_only(settings: HubSettings, *, quick: bool, output: Path) -> int:
    """The edge part alone (with the MQTT hop baseline it compares with): for a smoke
    test, and for working on the edge. Writes only the edge block of ``output``."""
    scratch = Path(tempfile.mkdtemp(prefix="telecare-bench-edge-"))
    bench = Bench(settings, quick=quick, scratch=scratch)
    bench.report.machine.update(machine_facts())
    ok = False
    plan = EDGE_QUICK if quick else EDGE_FULL
    report = EdgeReport(started=datetime.now(UTC), quick=quick, plan=plan)
    with contextlib.ExitStack() as stack:
        try:
            services = await asyncio.to_thread(resolve_services, settings, scratch, stack)
            bench.report.services.update(database=services.database_label,
                                         broker=services.broker_label)  # fmt: skip
            await bench.setup(services)
            await bench.prepare_database()
            bench.report.hop = await bench.hop_latency()
            report, ok = await run_edge_part(bench, services)
        finally:
            await bench.close()
            with contextlib.suppress(psycopg.Error):
                await bench.drop_database()
            shutil.rmtree(scratch, ignore_errors=True)
    mode = " --quick" if quick else ""
    write_edge_report(output, render_edge(report, f"run_edge_only(quick={quick}){mode}"))
    return 0 if ok else 1
