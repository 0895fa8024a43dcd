"""A simulated world played live through real edge daemons to a hub's broker.

``SimulationRun(world, hub_mqtt_url=..., ...)`` gives every site (one gateway) what a real
installation has (``simulators.registry.wire``): a ``SimSerialPort`` per dispenser and
nurse-call central (symlinks under ``<work_dir>/<gateway>/dev``), an SIA DC-09 receiver
port on loopback for the alarm unit, and the Zigbee2MQTT base topic ``z2m-<gateway>`` on
the hub's broker, standing in for the home's own. It writes ``<gateway>/edge.toml``,
runs a real ``EdgeDaemon`` on it in this process (one task per site, restarted after a
crash as systemd would), starts the simulated devices and plays the site's actions
(``Simulation.site_actions``) on them, each at its time on the simulated clock (``start``
or now, running ``speed`` times real time).

Faults are carried out: a power loss stops the site's daemon for the window (back, the
gateway reports ``power_restored``); an uplink outage runs it with its uplink pointed at
a closed local port, so events queue on the edge and arrive late; a silent dispenser or
nurse-call central is switched off (its line goes down); other silent devices stop their
check-ins. Devices check in every ``keepalive_s`` real seconds (Zigbee reports, SIA link
tests; dispensers send heartbeats), so supervision sees them alive at any speed.

The edge stamps events with the real time, as it would: at speed 1 from now that is the
simulated time; otherwise ``run.json`` maps one to the other (labels are simulated time).
Labels of what was played go to ``labels.jsonl``. A run of ``days`` plays one
``Simulation``, the same as ``simulate(world, start=<the start's local date>, ...)``; an
open-ended run plays 7-day periods, period ``k`` with seed ``seed + k`` (batteries start
afresh each period). On stop it removes what it left for the Zigbee2MQTT stand-ins on
the broker (retained topics, the edge's session there).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import random
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import count
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import aiomqtt
import structlog

from devices.errors import TelecareError
from devices.events import DeviceType, EventKind, make_event
from devices.zigbee2mqtt import Zigbee2MqttError
from edge.config import EdgeConfig, load_config
from edge.daemon import EdgeDaemon
from edge.mqtt_client import BrokerAddress
from simulators.anomalies import (
    AnomalyType,
    Injection,
    Label,
    Simulation,
    plan_anomalies,
    write_labels,
)
from simulators.devices import (
    AlarmUnitError,
    SimAlarmUnit,
    SimDispenser,
    SimNurseCallCentral,
    SimSerialPort,
    SimZigbeeBridge,
)
from simulators.registry import edge_toml, registry, wire, zigbee_messages
from simulators.routine import RoutineConfig
from simulators.world import Action, CallDetail, DoseDetail, Site, World

log = structlog.get_logger(__name__)

PERIOD_DAYS = 7
KEEPALIVE_S = 900.0
"""Real seconds between check-ins (the edge's supervision wants one per 1 to 2 hours)."""
READY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 30.0
RESET_AFTER = timedelta(minutes=10)
"""Simulated time after which a smoke, leak or fall sensor reports normal again."""
BATTERY_LOW = RoutineConfig().battery_low

_ACTED = frozenset({AnomalyType.POWER_LOSS, AnomalyType.UPLINK_OUTAGE, AnomalyType.SILENT_DEVICE})
_MOVES = frozenset({EventKind.LOCKED, EventKind.UNLOCKED})
_ZIGBEE_ERRORS = (aiomqtt.MqttError, TimeoutError, Zigbee2MqttError)


class SimulationError(TelecareError):
    """The simulation cannot run (the broker cannot be reached)."""


@dataclass(frozen=True, slots=True)
class SimClock:
    """The simulated wall clock: ``start`` at loop time ``origin``, ``speed`` times real."""

    start: datetime
    speed: float
    origin: float

    def at(self, loop_time: float) -> datetime:
        return self.start + timedelta(seconds=(loop_time - self.origin) * self.speed)

    def loop_time(self, moment: datetime) -> float:
        """The loop time at which the simulated clock shows ``moment``."""
        return self.origin + (moment - self.start).total_seconds() / self.speed


@dataclass(frozen=True, slots=True)
class FaultEdge:
    """The beginning or the end of a fault window, in a site's timeline."""

    time: datetime
    injection: Injection
    begins: bool


def fault_edges(
    simulation: Simulation, injections: Sequence[Injection], site_id: str
) -> list[FaultEdge]:
    """The windows of the faults carried out at ``site_id``, placed as ``Simulation``
    places them (it drops the actions inside them)."""
    edges = []
    for injection in injections:
        if injection.site_id == site_id and injection.type in _ACTED:
            day = simulation.days[injection.day]
            start = day.at(day.elapsed(injection.minute))
            end = start + timedelta(seconds=round(injection.duration * 60))
            edges += [FaultEdge(start, injection, True), FaultEdge(end, injection, False)]
    return sorted(edges, key=attrgetter("time"))


class SimulationRun:
    """A world's sites live against a hub broker; see the module docstring.

    ``counters``: ``actions_played``, ``actions_skipped`` (no transport carries them: a
    pendant's battery level over SIA), ``late_actions`` (over a second late),
    ``sia_failed``, ``zigbee_failed``, ``daemon_restarts``, ``faults_<type>``,
    ``demo_presses``. ``demo_presses`` lists ``(gateway_id, pendant)`` of the demo option's
    presses. ``started`` is set once every daemon is up and the clock runs.
    """

    def __init__(
        self,
        world: World,
        *,
        hub_mqtt_url: str,
        hub_protocol: Literal["5", "3.1.1"],
        work_dir: Path,
        seed: int,
        speed: float = 1.0,
        start: datetime | None = None,
        days: float | None = None,
        press_every_s: float | None = None,
        counts: Mapping[AnomalyType, int] | None = None,
        rates: Mapping[AnomalyType, float] | None = None,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        """``days``: simulated days (None: until cancelled). ``press_every_s``: the demo
        option, an extra pendant press every so many real seconds on average, across all
        homes. ``counts`` / ``rates``: anomalies, as for ``plan_anomalies``."""
        if speed <= 0 or keepalive_s <= 0 or (days is not None and days <= 0):
            raise ValueError("speed, keepalive_s and days must be positive")
        if press_every_s is not None and press_every_s <= 0:
            raise ValueError("press_every_s must be positive")
        if start is not None and start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        self.world, self.seed, self.speed, self.days = world, seed, speed, days
        self.hub_mqtt_url = hub_mqtt_url
        self.hub_protocol: Literal["5", "3.1.1"] = hub_protocol
        self.work_dir = Path(work_dir).absolute()
        self.press_every_s, self.keepalive_s = press_every_s, keepalive_s
        self.counts, self.rates = counts, rates
        self._requested_start = start
        self.start: datetime | None = None
        self.clock: SimClock | None = None
        self.offline_url = ""
        self.counters: Counter[str] = Counter()
        self.labels: list[Label] = []
        self.demo_presses: list[tuple[str, str]] = []
        self.started = asyncio.Event()
        self._plans: dict[int, list[Injection]] = {}

    def registry(self) -> dict[str, Any]:
        """The world for ``telecare admin import`` (``hub.admin.RegistryFile``)."""
        return registry(self.world, seed=self.seed)

    @property
    def end(self) -> datetime | None:
        if self.start is None or self.days is None:
            return None
        return self.start + timedelta(days=self.days)

    def periods(self) -> Iterator[tuple[int, date, int]]:
        """(index, first local date, days) of each ``Simulation`` to play."""
        assert self.start is not None  # noqa: S101 - set when the run starts
        zone = ZoneInfo(self.world.timezone)
        first, end = self.start.astimezone(zone).date(), self.end
        if end is not None:
            last = (end - timedelta(microseconds=1)).astimezone(zone).date()
            yield 0, first, (last - first).days + 1
            return
        for k in count():
            yield k, first + timedelta(days=PERIOD_DAYS * k), PERIOD_DAYS

    def simulation(self, index: int, first: date, days: int) -> tuple[Simulation, list[Injection]]:
        """Period ``index``'s simulation and its anomalies (planned once for all sites)."""
        seed = self.seed + index
        if index not in self._plans:
            self._plans[index] = plan_anomalies(
                self.world, days=days, seed=seed, counts=self.counts, rates=self.rates
            )
        plan = self._plans[index]
        return Simulation(self.world, start=first, days=days, seed=seed, injections=plan), plan

    def sim_now(self) -> datetime:
        if self.clock is None:
            return self.start or datetime.now(UTC)
        return self.clock.at(asyncio.get_running_loop().time())

    def add_labels(self, labels: Sequence[Label], *, until: datetime) -> None:
        """Keep the labels of what was played (before ``until``); rewrite the file."""
        start, stop = self.start or until, min(until, self.end or until)
        self.labels += [label for label in labels if label.end > start and label.start < stop]
        self.labels.sort(key=attrgetter("start", "site_id"))
        write_labels(self.work_dir / "labels.jsonl", self.labels)

    async def run(self) -> None:
        """Set every site up, play until ``days`` have passed (or until cancelled), wait
        for what is in flight to reach the hub's broker, and tear it all down."""
        if self._requested_start is not None:
            self.start = self._requested_start.astimezone(UTC).replace(microsecond=0)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        sites = [_Site(self, site) for site in self.world.sites]
        presses: asyncio.Task[None] | None = None
        with socket.socket() as refusing:  # bound, never listening: connections are refused
            refusing.bind(("127.0.0.1", 0))
            self.offline_url = f"mqtt://127.0.0.1:{refusing.getsockname()[1]}"
            try:
                for site in sites:  # one at a time: amqtt 0.12 fails connections in a crowd
                    await site.setup()
                self.start = self.start or datetime.now(UTC).replace(microsecond=0)  # "now"
                self.clock = SimClock(self.start, self.speed, asyncio.get_running_loop().time())
                self._write_run_info()
                self.started.set()
                log.info(
                    "simulation_started",
                    sites=len(sites),
                    speed=self.speed,
                    start=self.start.isoformat(),
                    days=self.days,
                )
                if self.press_every_s is not None:
                    presses = asyncio.create_task(self._demo_presses(sites))
                async with asyncio.TaskGroup() as group:
                    for site in sites:
                        group.create_task(site.play(), name=f"sim-{site.gateway_id}")
                await _cancel(presses)
                await asyncio.gather(*(site.drain() for site in sites))
                log.info("simulation_finished", **self.counters)
            finally:
                await _cancel(presses)
                closed = await asyncio.gather(*(s.close() for s in sites), return_exceptions=True)
                for result in closed:
                    if isinstance(result, Exception):
                        log.error("sim_site_close_failed", error=repr(result))
                write_labels(self.work_dir / "labels.jsonl", self.labels)

    def _write_run_info(self) -> None:
        assert self.start is not None  # noqa: S101 - set by run()
        info = {
            "start": self.start.isoformat(),
            "real_start": datetime.now(UTC).isoformat(),
            "speed": self.speed,
            "days": self.days,
            "seed": self.seed,
            "note": "real time = real_start + (simulated time - start) / speed",
        }
        (self.work_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    async def _demo_presses(self, sites: Sequence[_Site]) -> None:
        """The demo option: a pendant press every ``press_every_s`` on average (Poisson)."""
        assert self.press_every_s is not None  # noqa: S101 - checked by the caller
        rng = random.Random(f"demo-presses:{self.seed}")
        homes = [site for site in sites if site.wiring.zones]
        while homes:
            await asyncio.sleep(rng.expovariate(1.0 / self.press_every_s))
            site = rng.choice(homes)
            pendant = site.demo_press()
            if pendant is not None:
                self.counters["demo_presses"] += 1
                self.demo_presses.append((site.gateway_id, pendant))
                log.info("simulated_pendant_press", gateway_id=site.gateway_id, device_id=pendant)


class _Site:
    """One site: its transports, devices, edge daemon and player."""

    def __init__(self, run: SimulationRun, site: Site) -> None:
        self.run, self.site, self.wiring = run, site, wire(site)
        self.gateway_id = site.gateway_id
        self.dir = run.work_dir / site.gateway_id
        self.types = {device.device_id: device.device_type for device in site.devices}
        self.zone = ZoneInfo(run.world.timezone)
        self.config: EdgeConfig | None = None
        self.daemon: EdgeDaemon | None = None
        self.bridge: SimZigbeeBridge | None = None
        self.unit: SimAlarmUnit | None = None
        self.serial: dict[str, SimDispenser | SimNurseCallCentral] = {}
        """Dispensers and the nurse-call central by device id."""
        self.powered = self.up = False
        self.silent: set[str] = set()
        self._daemon_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sends: set[asyncio.Task[Any]] = set()
        self._locked = True
        self._baselined = False
        self._published_base = 0
        self._rng = random.Random(f"site:{run.seed}:{site.gateway_id}")

    # --- life cycle -------------------------------------------------------------------

    async def setup(self) -> None:
        w, run, dev = self.wiring, self.run, self.dir / "dev"
        dev.mkdir(parents=True, exist_ok=True)
        sia_port = _free_port() if w.alarm_unit else None
        path = self.dir / "edge.toml"
        path.write_text(
            edge_toml(
                self.site,
                w,
                hub_url=run.hub_mqtt_url,
                hub_protocol=run.hub_protocol,
                data_dir=self.dir / "data",
                dev_dir=dev,
                sia_port=sia_port,
                time_zone=run.world.timezone,
            ),
            encoding="utf-8",
        )
        path.chmod(0o600)  # it may hold the broker's password
        self.config = load_config(path)
        await self._clean_local_broker()
        for device_id, port in w.dispensers.items():
            rng = random.Random(f"{run.seed}:{device_id}")
            self.serial[device_id] = SimDispenser(SimSerialPort(dev / port), rng=rng)
        if w.central is not None:
            line = SimSerialPort(dev / "nursecall")
            self.serial[w.central] = SimNurseCallCentral(line, clock=run.sim_now)
        for device in self.serial.values():
            await device.start()
        if sia_port is not None:
            self.unit = SimAlarmUnit("127.0.0.1", sia_port, account=w.account)
        self.powered = True
        self._daemon_task = asyncio.create_task(self._daemon(self.config))
        if w.zigbee:
            occupancy_s = min(max(90.0 / run.speed, 1.0), 90.0)  # the bridge's timeout
            for attempt in range(3):
                self.bridge = SimZigbeeBridge(
                    run.hub_mqtt_url,
                    base_topic=w.base_topic,
                    qos=1,
                    occupancy_timeout_s=occupancy_s,
                    connect_timeout=CONNECT_TIMEOUT_S,
                )
                try:
                    await self.bridge.start()
                    break
                except TimeoutError:
                    log.warning("sim_zigbee_bridge_start_failed", gateway_id=self.gateway_id)
                    if attempt == 2:
                        where = BrokerAddress.from_url(run.hub_mqtt_url)
                        raise SimulationError(
                            f"cannot reach the broker at {where.host}:{where.port}"
                        ) from None
        await self._ready()

    async def play(self) -> None:
        """Play each period; record its labels once its stream is consumed."""
        for index, first, days in self.run.periods():
            simulation, plan = self.run.simulation(index, first, days)
            edges = fault_edges(simulation, plan, self.site.site_id)
            timeline: Iterator[Action | FaultEdge] = heapq.merge(
                edges, simulation.site_actions(self.site), key=attrgetter("time")
            )  # at a tie the fault edge comes first: a restart precedes power_restored
            try:
                ended = await self._play(timeline)
            finally:  # labels need the whole stream: the rest is generated, not played
                until = self.run.sim_now()
                for _ in timeline:
                    pass
                self.run.add_labels(simulation.labels, until=until)
            if ended:
                return

    async def drain(self) -> None:
        """Wait (bounded) until what the devices sent is on the hub's broker."""
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await asyncio.gather(*self._sends, return_exceptions=True)
                for device_id, device in self.serial.items():
                    if device_id not in self.silent:
                        await device.drained(DRAIN_TIMEOUT_S)
                while True:  # the uplink empties the queue as the broker acknowledges
                    if await self._edge_drained():
                        break
                    await asyncio.sleep(0.1)
        except TimeoutError:
            log.warning("sim_drain_timed_out", gateway_id=self.gateway_id)

    async def close(self) -> None:
        for task in [*self._tasks, *self._sends]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._sends, return_exceptions=True)
        await self._stop_daemon()
        await self._clean_local_broker(retained=False)  # before the bridge says "offline"
        for device in [*self.serial.values(), self.unit, self.bridge]:
            if device is not None:
                await device.stop()
        await self._clean_local_broker()

    # --- the edge daemon --------------------------------------------------------------

    async def _daemon(self, config: EdgeConfig) -> None:
        while True:  # restarted after a failure, as systemd's Restart=on-failure does
            self.daemon = EdgeDaemon(config)
            try:
                await self.daemon.run()
            except Exception:
                log.exception("sim_edge_daemon_failed", gateway_id=self.gateway_id)
                self.run.counters["daemon_restarts"] += 1
            await asyncio.sleep(1.0)

    async def _stop_daemon(self) -> None:
        self.up = False
        if self.unit is not None:  # the unit's connection first: it reconnects by itself
            await self.unit.stop()
        await _cancel(self._daemon_task)
        self._daemon_task = self.daemon = None

    async def _restart(self, config: EdgeConfig | None) -> None:
        await self._stop_daemon()
        if config is not None:
            self._daemon_task = asyncio.create_task(self._daemon(config))
            await self._ready()

    async def _ready(self) -> None:
        """Wait until the daemon runs and its Zigbee2MQTT driver is subscribed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while loop.time() < deadline:
            daemon = self.daemon
            z2m = daemon.drivers.get("zigbee2mqtt") if daemon is not None else None
            if daemon is not None and daemon.started.is_set() and (z2m is None or z2m.connected):
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("sim_edge_not_ready", gateway_id=self.gateway_id, waited_s=READY_TIMEOUT_S)
        self._published_base = self.bridge.counters["published"] if self.bridge else 0
        self.up = True

    async def _edge_drained(self) -> bool:
        daemon = self.daemon
        if daemon is None or daemon.queue is None:
            return True  # powered off: nothing moves
        z2m = daemon.drivers.get("zigbee2mqtt")
        if z2m is not None and self.bridge is not None:
            published = self.bridge.counters["published"] - self._published_base
            if z2m.counters.get("messages", 0) < published:
                return False
        for _ in range(2):  # twice: a message just taken may be on its way to the queue
            depth = await daemon.queue.depth()
            if depth.alarm + depth.telemetry:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _clean_local_broker(self, *, retained: bool = True) -> None:
        """End the edge's session on the stand-in local broker (queued messages of a past
        run) and remove our retained Zigbee2MQTT topics. Never while the edge runs."""
        if not self.wiring.zigbee:
            return
        broker, base = BrokerAddress.from_url(self.run.hub_mqtt_url), self.wiring.base_topic
        names = self.wiring.zigbee.values()
        topics = [f"{base}/bridge/state", *(f"{base}/{name}/availability" for name in names)]
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            username=broker.username,
            password=broker.password,
            tls_params=aiomqtt.TLSParameters() if broker.tls else None,
            timeout=CONNECT_TIMEOUT_S,
            identifier=f"telecare-edge-{self.gateway_id}-zigbee2mqtt",
            clean_session=True,
        )
        try:
            async with client:
                for topic in topics if retained else ():
                    await client.publish(topic, b"", qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.info("sim_local_broker_cleanup_failed", gateway_id=self.gateway_id, error=str(exc))

    # --- playing ----------------------------------------------------------------------

    async def _play(self, timeline: Iterator[Action | FaultEdge]) -> bool:
        """Play until the timeline ends (False) or the run's end is reached (True)."""
        run, end, loop = self.run, self.run.end, asyncio.get_running_loop()
        assert run.start is not None  # noqa: S101 - run() sets it
        assert run.clock is not None  # noqa: S101 - run() sets it
        for item in timeline:
            if item.time < run.start:
                if (
                    isinstance(item, Action)
                    and item.kind in _MOVES
                    and item.device_id == self.site.lock
                ):
                    self._locked = item.kind is EventKind.LOCKED
                continue
            if end is not None and item.time >= end:
                return True
            if not self._baselined:
                await self._baseline()
            delay = run.clock.loop_time(item.time) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                run.counters["late_actions"] += 1
            if isinstance(item, FaultEdge):
                await self._fault(item)
            else:
                played = await self._act(item)
                run.counters["actions_played" if played else "actions_skipped"] += 1
        return False

    async def _baseline(self) -> None:
        """Every Zigbee device reports once (the lock its position); check-ins start."""
        self._baselined = True
        for device_id in self.wiring.zigbee:
            if device_id == self.site.lock:
                await self._bridge(device_id, lambda b, n: b.add_lock(n, locked=self._locked))
            else:
                await self._zigbee(device_id, linkquality=self._rng.randint(30, 200))
        _spawn(self._keepalive(), self._tasks, f"keepalive-{self.gateway_id}")

    async def _keepalive(self) -> None:
        period = self.run.keepalive_s
        await asyncio.sleep(period * self._rng.uniform(0.2, 1.0))
        while True:
            if self.up and self.powered:
                for device_id in self.wiring.zigbee:
                    if device_id not in self.silent:
                        fields: dict[str, Any] = {"linkquality": self._rng.randint(30, 200)}
                        if self.types[device_id] is DeviceType.MOTION_SENSOR:
                            fields["occupancy"] = False  # a report, not motion
                        await self._zigbee(device_id, **fields)
                self._sia("link_test", lambda unit: unit.link_test())
            await asyncio.sleep(period * self._rng.uniform(0.8, 1.2))

    async def _fault(self, edge: FaultEdge) -> None:
        inj, begins = edge.injection, edge.begins
        log.info(
            "sim_fault_started" if begins else "sim_fault_ended",
            gateway_id=self.gateway_id,
            type=inj.type.value,
            device_id=inj.device_id,
        )
        self.run.counters[f"faults_{inj.type.value}"] += begins
        assert self.config is not None  # noqa: S101 - set by setup()
        if inj.type is AnomalyType.POWER_LOSS:
            self.powered = not begins
            await self._restart(None if begins else self.config)
        elif inj.type is AnomalyType.UPLINK_OUTAGE:
            hub = self.config.hub.model_copy(update={"mqtt_url": self.run.offline_url})
            await self._restart(
                self.config.model_copy(update={"hub": hub}) if begins else self.config
            )
        elif inj.device_id is not None:  # a silent device
            (self.silent.add if begins else self.silent.discard)(inj.device_id)
            serial = self.serial.get(inj.device_id)
            if serial is not None:  # switched off: its serial line goes away
                await (serial.stop() if begins else serial.start())

    def demo_press(self) -> str | None:
        """A pendant press now (the demo option): the pendant, or None if powered off."""
        if not self.powered or not self.wiring.zones:
            return None
        pendant, zone = next(iter(self.wiring.zones.items()))
        self._sia("demo_press", lambda unit: unit.pendant_press(zone))
        return pendant

    async def _act(self, a: Action) -> bool:
        """Play one action on the device it belongs to; False if nothing carries it."""
        device = self.serial.get(a.device_id)
        detail = a.detail
        if a.device_id in self.wiring.zigbee:
            return await self._zigbee_action(a)
        if a.device_id in self.wiring.zones:
            report = self.wiring.sia_report(a)
            return report is not None and self._sia(report[0], lambda u: u.report(*report))
        if isinstance(device, SimDispenser) and isinstance(detail, DoseDetail):
            send = {
                EventKind.DOSE_DUE: device.dose_due,
                EventKind.DOSE_TAKEN: device.dose_taken,
                EventKind.DOSE_MISSED: device.dose_missed,
            }.get(a.kind)
            if send is not None:
                send(detail.dose_id, detail.scheduled_for)
            return send is not None
        central = self.serial.get(self.wiring.central or "")
        if isinstance(central, SimNurseCallCentral) and isinstance(detail, CallDetail):
            # ESPA has no sequence numbers: the edge takes a block identical to the last
            # one within seconds for a resend. Centrals show the time, which tells apart
            # two calls from one room that a fast world puts seconds apart.
            local = a.time.astimezone(self.zone)
            text = f"Rom {detail.address} {local:%H:%M}"
            if a.kind is EventKind.NURSE_CALL_CLEARED:
                central.clear(detail.address, message=text)
            else:
                central.call(
                    detail.address, text, priority=detail.priority, call_type=detail.call_type
                )
            return True
        if a.kind is EventKind.POWER_RESTORED and self.daemon is not None:
            gw = self.gateway_id  # the gateway, back on power, says so
            event = make_event(a.kind, gateway_id=gw, device_id=gw, device_type=DeviceType.GATEWAY)
            _spawn(self.daemon.sink([event]), self._sends, f"power-restored-{gw}")
            return True
        return False

    # --- transports -------------------------------------------------------------------

    async def _zigbee_action(self, a: Action) -> bool:
        now, after = zigbee_messages(a, battery_low=BATTERY_LOW)
        if a.kind is EventKind.MOTION:  # the bridge clears occupancy after its timeout
            return await self._bridge(a.device_id, lambda b, n: b.occupancy(n))
        for fields in now:
            await self._zigbee(a.device_id, **fields)
        if after is not None:

            async def later(fields: dict[str, Any]) -> None:
                await asyncio.sleep(RESET_AFTER.total_seconds() / self.run.speed)
                await self._zigbee(a.device_id, **fields)

            _spawn(later(after), self._tasks, f"reset-{a.device_id}")
        return bool(now)

    async def _bridge(
        self, device_id: str, op: Callable[[SimZigbeeBridge, str], Awaitable[None]]
    ) -> bool:
        name = self.wiring.zigbee.get(device_id)
        if name is None or self.bridge is None:
            return False
        try:
            await op(self.bridge, name)
        except _ZIGBEE_ERRORS as exc:
            self.run.counters["zigbee_failed"] += 1
            log.warning("sim_zigbee_publish_failed", gateway_id=self.gateway_id, error=str(exc))
        return True

    async def _zigbee(self, device_id: str, **fields: Any) -> bool:
        return await self._bridge(device_id, lambda b, n: b.update(n, **fields))

    def _sia(self, what: str, send: Callable[[SimAlarmUnit], Awaitable[object]]) -> bool:
        """Send through the alarm unit in the background, in call order (the unit queues)."""
        unit = self.unit
        if unit is None or self.wiring.alarm_unit in self.silent:
            return False

        async def sending() -> None:
            try:
                await send(unit)
            except AlarmUnitError as exc:
                self.run.counters["sia_failed"] += 1
                log.warning(
                    "sim_alarm_unit_gave_up",
                    gateway_id=self.gateway_id,
                    report=what,
                    error=str(exc),
                )

        _spawn(sending(), self._sends, f"sia-{what}")
        return True


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _spawn(coro: Coroutine[Any, Any, object], into: set[asyncio.Task[Any]], name: str) -> None:
    """A background task kept in ``into`` until done; an unexpected error is logged."""
    task = asyncio.create_task(coro, name=name)
    into.add(task)

    def finished(done: asyncio.Task[Any]) -> None:
        into.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.error("sim_task_failed", task=done.get_name(), error=repr(done.exception()))

    task.add_done_callback(finished)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
