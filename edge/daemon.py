"""The edge daemon: a home's (or care home's) devices in, the hub's broker out.

``telecare edge --config edge.toml`` runs one ``EdgeDaemon``. It composes:

* the durable queue (edge/queue.py): every event is written there, fsynced, before
  anything else happens to it, and before the device that sent it is acknowledged;
* the uplink (edge/uplink.py): drains the queue to the hub at QoS 1, deletes on PUBACK,
  alarm events first; retained status and last will; heartbeats; the hub's commands;
* the drivers, each optional, from the config: Zigbee2MQTT on the home's local broker,
  serial lines (medicine dispensers, an ESPA 4.4.4 nurse-call central) through
  ``SerialLink`` with reconnect, and a SIA DC-09 receiver for alarm units on the LAN;
* device supervision (edge/supervision.py): a device silent past its check-in interval
  becomes ``device_offline``; its next sign of life, ``device_online``; a serial line that
  goes away takes its devices offline at once.

Every driver hands events to ``sink()``, which stores them and wakes the uplink; a sink
that fails propagates to the driver, which then does not acknowledge the device (it
retries). The daemon ends only when cancelled (SIGTERM/SIGINT from ``main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote
from zoneinfo import ZoneInfo

import structlog

from devices.events import DeviceEvent, DeviceType, EventKind, parse_event
from devices.gateway import CommandResult, GatewayCommand
from devices.ids import uuid7
from edge.config import DispenserPort, EdgeConfig, EspaPort, HubConfig, SerialPort
from edge.queue import AsyncEdgeQueue
from edge.serial_port import SerialLink
from edge.supervision import Supervisor
from edge.uplink import Uplink

log = structlog.get_logger(__name__)

SUPERVISION_TICK_S = 1.0
REPORT_S = 10.0
"""How often the daemon writes ``status.json`` and logs newly rejected input."""

REJECT_MARKERS = (
    "bad",
    "garbage",
    "overflow",
    "invalid",
    "unknown",
    "malformed",
    "rejected",
    "naks_sent",
    "unmappable",
    "mapping_failures",
    "oversize",
)
"""Counter names that count input the daemon refused (a frame, a payload, a message)."""


class CommandTarget(Protocol):
    """A driver that can carry out the hub's commands for some devices."""

    def handles(self, device_id: str) -> bool: ...

    async def execute(self, command: GatewayCommand) -> CommandResult: ...


def edge_version() -> str:
    try:
        return f"telecare-edge {version('telecare-hub')}"
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "telecare-edge (source)"


def hub_url(hub: HubConfig) -> str:
    """The uplink's URL, credentials included (they never reach a log)."""
    auth = ""
    if hub.username:
        auth = quote(hub.username, safe="")
        if hub.password is not None:
            auth += ":" + quote(hub.password.get_secret_value(), safe="")
        auth += "@"
    return f"{'mqtts' if hub.tls else 'mqtt'}://{auth}{hub.host}:{hub.port}"


class SteadyClock:
    """Wall time at start plus monotonic time since: a clock that never jumps.

    A gateway without a battery-backed clock steps its time at the first NTP sync;
    supervision measured on the wall clock would then see every device silent for
    years at once. Events keep the real wall clock for their timestamps.
    """

    def __init__(self) -> None:
        self._wall = datetime.now(UTC)
        self._mono = time.monotonic()

    def __call__(self) -> datetime:
        return self._wall + timedelta(seconds=time.monotonic() - self._mono)


class EdgeDaemon:
    """One gateway's daemon. ``run()`` until cancelled; ``counters()`` for a status view."""

    def __init__(self, config: EdgeConfig, *, version: str | None = None) -> None:
        self.config = config
        self.version = version or edge_version()
        self.steady = SteadyClock()
        self.supervisor = Supervisor(
            config.gateway_id, config.supervised_devices(), now=self.steady()
        )
        self.queue: AsyncEdgeQueue | None = None
        self.uplink: Uplink | None = None
        self.targets: list[CommandTarget] = []
        self.drivers: dict[str, Any] = {}
        self.links: dict[str, SerialLink] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.started = asyncio.Event()

    # --- the sink every driver writes to ----------------------------------------------

    async def sink(self, events: list[DeviceEvent]) -> None:
        """Store events durably, note their devices as alive, wake the uplink."""
        if not events:
            return
        assert self.queue is not None  # noqa: S101 - set before any driver starts
        now = self.steady()
        revived: list[DeviceEvent] = []
        for event in events:
            if event.kind not in (EventKind.DEVICE_OFFLINE, EventKind.DEVICE_ONLINE):
                revived.extend(self.supervisor.seen(event.device_id, now))
        await self.queue.put([*revived, *events])
        self._wake_uplink()

    def seen(self, device_id: str, now: datetime | None = None) -> None:
        """A sign of life that is not an event (a link test, a heartbeat frame)."""
        del now  # the drivers pass their wall clock; supervision runs on the steady one
        self._store_later(self.supervisor.seen(device_id, self.steady()))

    def link_down(self, device_ids: tuple[str, ...]) -> None:
        self._store_later(self.supervisor.link_down(device_ids, self.steady()))

    def _store_later(self, events: list[DeviceEvent]) -> None:
        if events:
            self._spawn(self.sink(events), "supervision-events")

    def _wake_uplink(self) -> None:
        if self.uplink is not None:
            self.uplink.notify()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("edge_task_failed", task=task.get_name(), error=str(task.exception()))

    # --- commands from the hub --------------------------------------------------------

    async def on_command(self, command: GatewayCommand) -> CommandResult:
        log.info(
            "command_received",
            command_id=str(command.command_id),
            kind=command.kind,
            device_id=command.device_id,
        )
        if command.kind == "test_alarm" and command.device_id == self.config.gateway_id:
            await self.sink([self._gateway_event(EventKind.TEST_ALARM)])
            return CommandResult(command_id=command.command_id, ok=True, time=datetime.now(UTC))
        for target in self.targets:
            if target.handles(command.device_id):
                return await target.execute(command)
        return CommandResult(
            command_id=command.command_id,
            ok=False,
            error=f"device {command.device_id!r} is not behind gateway {self.config.gateway_id!r}",
            time=datetime.now(UTC),
        )

    def _gateway_event(self, kind: EventKind) -> DeviceEvent:
        now = datetime.now(UTC)
        return parse_event(
            {
                "id": uuid7(),
                "time": now,
                "gateway_time": now,
                "gateway_id": self.config.gateway_id,
                "device_id": self.config.gateway_id,
                "device_type": DeviceType.GATEWAY,
                "kind": kind,
            }
        )

    # --- running ----------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.queue = await AsyncEdgeQueue.open(
            cfg.queue_path, max_events=cfg.queue.max_events, max_bytes=cfg.queue.max_bytes
        )
        try:
            self.uplink = Uplink(
                gateway_id=cfg.gateway_id,
                mqtt_url=hub_url(cfg.hub),
                queue=self.queue,
                version=self.version,
                on_command=self.on_command,
                protocol=cfg.hub.protocol,
                heartbeat_s=cfg.hub.heartbeat_s,
                reconnect_min_s=cfg.hub.reconnect_min_s,
                reconnect_max_s=max(cfg.hub.reconnect_min_s, cfg.hub.reconnect_max_s),
            )
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.uplink.run(), name="uplink")
                tasks.create_task(self._supervise(), name="supervision")
                tasks.create_task(self._report(), name="report")
                names = []
                for name, runner in self._drivers():
                    tasks.create_task(runner, name=name)
                    names.append(name)
                log.info(
                    "edge_started",
                    gateway_id=cfg.gateway_id,
                    version=self.version,
                    drivers=names,
                )
                self.started.set()
        finally:
            for task in list(self._background):
                task.cancel()
            await self.queue.close()

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISION_TICK_S)
            events = self.supervisor.tick(self.steady())
            if events:
                for event in events:
                    log.warning("device_offline", device_id=event.device_id)
                await self.sink(events)

    async def _report(self) -> None:
        """Every few seconds: ``status.json`` for operators, and a warning for input the
        drivers refused since the last report (which driver, which reason, how many; the
        bytes themselves are never logged: they may hold health data)."""
        previous: dict[tuple[str, str], int] = {}
        path = self.config.data_dir / "status.json"
        while True:
            await asyncio.sleep(REPORT_S)
            counters = await self.counters()
            for part, values in counters.items():
                if not isinstance(values, dict) or part in ("queue_depth", "uplink"):
                    continue
                for name, value in values.items():
                    if not isinstance(value, int) or not any(m in name for m in REJECT_MARKERS):
                        continue
                    new = value - previous.get((part, name), 0)
                    previous[(part, name)] = value
                    if new > 0:
                        log.warning(
                            "edge_input_rejected", part=part, reason=name, count=new, total=value
                        )
            status = {
                "gateway_id": self.config.gateway_id,
                "version": self.version,
                "time": datetime.now(UTC).isoformat(),
                "uplink_connected": bool(self.uplink and self.uplink.connected),
                "offline_devices": sorted(self.supervisor.offline),
                **counters,
            }
            await asyncio.to_thread(_write_atomically, path, json.dumps(status, indent=1))

    def _drivers(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        cfg = self.config
        runners: list[tuple[str, Coroutine[Any, Any, None]]] = []
        if cfg.zigbee2mqtt is not None and cfg.zigbee2mqtt.devices:
            from edge.drivers.zigbee2mqtt import Zigbee2MqttDriver

            z2m = Zigbee2MqttDriver(
                cfg.zigbee2mqtt, gateway_id=cfg.gateway_id, sink=self.sink, on_seen=self.seen
            )
            self.drivers["zigbee2mqtt"] = z2m
            self.targets.append(z2m)
            runners.append(("zigbee2mqtt", z2m.run()))
        for port in cfg.serial:
            runners.append((f"serial:{port.path}", self._serial(port)))
        if cfg.sia is not None and cfg.sia.accounts:
            runners.append(("sia", self._sia()))
        return runners

    async def _serial(self, port: SerialPort) -> None:
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
        if isinstance(port, EspaPort):
            from edge.drivers.espa import EspaDriver

            espa = EspaDriver(
                sink=self.sink,
                gateway_id=self.config.gateway_id,
                central_device_id=port.central_device_id,
                addresses=port.addresses,
                cleared_statuses=frozenset(port.cleared_statuses),
                on_heard=lambda: self.seen(port.central_device_id),
            )
            self.drivers[f"espa:{port.path}"] = espa
            handler = espa.run
        else:
            assert isinstance(port, DispenserPort)  # noqa: S101 - the config's union
            from edge.drivers.dispenser import DispenserDriver

            dispenser = DispenserDriver(
                sink=self.sink,
                gateway_id=self.config.gateway_id,
                device_id=port.device_id,
                zone=ZoneInfo(port.time_zone),
                on_heard=lambda: self.seen(port.device_id),
            )
            self.drivers[f"dispenser:{port.path}"] = dispenser
            self.targets.append(dispenser)
            handler = dispenser.run
        link = SerialLink(
            port.path,
            baudrate=port.baudrate,
            bytesize=port.bytesize,
            parity=port.parity,
            stopbits=port.stopbits,
            on_up=lambda: log.info("serial_link_up", path=port.path),
            on_down=lambda: self.link_down(port.device_ids),
        )
        self.links[port.path] = link
        await link.run(handler)

    async def _sia(self) -> None:
        from devices.sia import SiaAccountBinding
        from edge.drivers.sia import SiaReceiver

        sia = self.config.sia
        assert sia is not None  # noqa: S101 - checked by the caller
        bindings = [
            SiaAccountBinding(
                account=account.account,
                gateway_id=self.config.gateway_id,
                device_id=account.device_id,
                device_type=account.device_type,
                zones={str(n): (z.device_id, z.device_type) for n, z in account.zones.items()},
            )
            for account in sia.accounts
        ]
        receiver = SiaReceiver(
            sia.host, sia.port, bindings=bindings, sink=self.sink, on_seen=self.seen
        )
        self.drivers["sia"] = receiver
        async with receiver:
            await asyncio.Event().wait()  # serve until cancelled

    async def counters(self) -> dict[str, Any]:
        """Everything counted, by part: for logs, a status file or tests."""
        out: dict[str, Any] = {}
        if self.queue is not None:
            out["queue"] = await self.queue.counters()
            depth = await self.queue.depth()
            out["queue_depth"] = {"alarm": depth.alarm, "telemetry": depth.telemetry}
        if self.uplink is not None:
            out["uplink"] = dict(self.uplink.counters)
        for name, driver in self.drivers.items():
            out[name] = dict(driver.counters)
        for path, link in self.links.items():
            out[f"link:{path}"] = dict(link.counters)
        out["supervision"] = dict(self.supervisor.counters)
        return out


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_edge(config: EdgeConfig) -> int:
    """Run until SIGTERM or SIGINT; the exit status for the CLI."""

    async def main() -> None:
        daemon = EdgeDaemon(config)
        task = asyncio.ensure_future(daemon.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("edge_stopped", gateway_id=config.gateway_id)

    asyncio.run(main())
    return 0
