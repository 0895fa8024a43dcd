"""One site of a live simulation: its transports, devices, edge daemon and player.

``SiteRun`` is what ``simulators.run.SimulationRun`` runs for each site (one gateway); the
docstring of ``simulators.run`` tells how devices are reached, how faults are carried out
and how the simulated clock maps to real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import timedelta
from operator import attrgetter
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import aiomqtt
import structlog

from devices.errors import TelecareError
from devices.events import DeviceType, EventKind, make_event
from devices.zigbee2mqtt import Zigbee2MqttError
from edge.config import EdgeConfig, load_config
from edge.daemon import EdgeDaemon
from edge.mqtt_client import BrokerAddress
from simulators.day import RoutineConfig
from simulators.devices import (
    AlarmUnitError,
    SimAlarmUnit,
    SimDispenser,
    SimNurseCallCentral,
    SimSerialPort,
    SimZigbeeBridge,
)
from simulators.injection import AnomalyType
from simulators.registry import edge_toml, wire, zigbee_messages
from simulators.simulation import FaultEdge, fault_edges
from simulators.world import Action, CallDetail, DoseDetail, Site

if TYPE_CHECKING:
    from simulators.run import SimulationRun

log = structlog.get_logger(__name__)

READY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 30.0
RESET_AFTER = timedelta(minutes=10)
"""Simulated time after which a smoke, leak or fall sensor reports normal again."""
BATTERY_LOW = RoutineConfig().battery_low

_MOVES = frozenset({EventKind.LOCKED, EventKind.UNLOCKED})
_ZIGBEE_ERRORS = (aiomqtt.MqttError, TimeoutError, Zigbee2MqttError)


class SimulationError(TelecareError):
    """The simulation cannot run (the broker cannot be reached)."""


class SiteRun:
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
        await cancel_task(self._daemon_task)
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


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None or done: nothing to do) and wait until it has ended."""
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
