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
the broker (retained topics, the edge's session there). One site's transports, devices,
edge daemon and player are a ``simulators.site.SiteRun``.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import count
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import structlog

from simulators.anomalies import plan_anomalies
from simulators.injection import AnomalyType, Injection, Label, write_labels
from simulators.registry import registry
from simulators.simulation import FaultEdge, Simulation, fault_edges
from simulators.site import (
    BATTERY_LOW,
    CONNECT_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    READY_TIMEOUT_S,
    RESET_AFTER,
    SimulationError,
    SiteRun,
    cancel_task,
)
from simulators.world import World

__all__ = [
    "BATTERY_LOW",
    "CONNECT_TIMEOUT_S",
    "DRAIN_TIMEOUT_S",
    "KEEPALIVE_S",
    "PERIOD_DAYS",
    "READY_TIMEOUT_S",
    "RESET_AFTER",
    "FaultEdge",
    "SimClock",
    "SimulationError",
    "SimulationRun",
    "fault_edges",
]

log = structlog.get_logger(__name__)

PERIOD_DAYS = 7
KEEPALIVE_S = 900.0
"""Real seconds between check-ins (the edge's supervision wants one per 1 to 2 hours)."""


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
        sites = [SiteRun(self, site) for site in self.world.sites]
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
                await cancel_task(presses)
                await asyncio.gather(*(site.drain() for site in sites))
                log.info("simulation_finished", **self.counters)
            finally:
                await cancel_task(presses)
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

    async def _demo_presses(self, sites: Sequence[SiteRun]) -> None:
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
