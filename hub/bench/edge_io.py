"""What the edge part of ``telecare bench`` runs and measures with: the edge daemon as a
process, a dispenser's port that times frames, the relay that ends an outage, a plain
subscriber and publisher, baselines (pty round trip, queue ``put``, RSS of interpreters),
readings of a process from /proc, and the events and envelopes it sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiomqtt
import psutil  # type: ignore[import-untyped]

from devices.dispenser.codec import Ack, DispenserDecoder, DoseDue, DoseTaken, Frame
from devices.events import MAX_EVENTS_PER_ENVELOPE, DeviceEvent, make_event
from edge.queue import AsyncEdgeQueue
from edge.uplink import MAX_ENVELOPE_BYTES, build_envelope
from hub.bench.mqtt import _mqtt_client
from hub.bench.services import _free_port
from hub.settings import MqttEndpoint
from simulators.devices import SimSerialPort

PUBLISH_WINDOW = 10
"""The plain publisher's unacknowledged publishes: the edge's window of 8 + 2 alarm slots."""
ZIGBEE = (
    ("front_door", "door_sensor"), ("back_door", "door_sensor"),
    ("kitchen_motion", "motion_sensor"), ("hall_motion", "motion_sensor"),
    ("bed", "bed_sensor"), ("kitchen_smoke", "smoke_detector"),
    ("bath_leak", "water_leak_sensor"), ("front_lock", "door_lock"),
)  # fmt: skip
RSS_PROBES = {
    "bare interpreter": "",
    "the edge's modules": "import edge.daemon, edge.drivers.dispenser, edge.drivers.zigbee2mqtt",
    "the edge's modules and psycopg": "import edge.daemon, edge.drivers.dispenser,"
    " edge.drivers.zigbee2mqtt, psycopg",
    "what `telecare edge` imports": "import hub.cli, edge.config, edge.daemon,"
    " edge.drivers.dispenser, edge.drivers.zigbee2mqtt",
}
_TELEMETRY: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("motion", "motion_sensor", "motion", {"room": "living_room"}),
    ("bed", "bed_sensor", "bed_entered", {}),
    ("door", "door_sensor", "battery_level", {"level_percent": 87, "voltage": 2.95}),
    ("door", "door_sensor", "closed", {"room": "front_door"}),
)


# --- processes, ports and clients -----------------------------------------------------


class EdgeProcess:
    """``python -m hub edge --config FILE`` in its own process, as systemd runs it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.with_name("edge.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101 - only after start
        return self.process.pid

    def start(self) -> EdgeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELECARE_")}
        env["TELECARE_LOG_FORMAT"] = "json"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
                [sys.executable, "-m", "hub", "edge", "--config", str(self.config)],
                env=env, stdout=log, stderr=log, cwd=self.config.parent,
            )  # fmt: skip
        return self

    async def logged(self, event: str, limit_s: float = 60) -> None:
        """Until the daemon's log has ``event`` (it logs JSON lines)."""
        deadline = time.monotonic() + limit_s
        while event not in self.log_path.read_text(errors="replace"):
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the edge daemon did not log {event} within {limit_s} s")
            await asyncio.sleep(0.05)

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the edge daemon exited ({self.process.returncode}):\n{tail}")

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)


class TimedPort(SimSerialPort):
    """The device's end of the line; times each dose report's first frame as the device
    writes it, and the gateway's ACK of that frame as the device reads it."""

    def __init__(self, link_path: Path) -> None:
        super().__init__(link_path)
        self.written: dict[str, tuple[float, float, str]] = {}
        """dose_id -> (monotonic, wall clock, event kind) of its first frame."""
        self.acked: dict[str, float] = {}
        self._by_seq: dict[int, str] = {}
        self._out, self._in = DispenserDecoder(), DispenserDecoder()

    def write_nowait(self, data: bytes) -> None:
        super().write_nowait(data)
        now, wall = time.monotonic(), time.time()
        for frame in self._out.feed(data):
            if isinstance(frame, Frame) and isinstance(frame.message, DoseDue | DoseTaken):
                kind = "dose_due" if isinstance(frame.message, DoseDue) else "dose_taken"
                self._by_seq[frame.seq] = frame.message.dose_id
                self.written.setdefault(frame.message.dose_id, (now, wall, kind))

    async def read(self, max_bytes: int = 4096) -> bytes:
        data = await super().read(max_bytes)
        now = time.monotonic()
        for frame in self._in.feed(data):
            if isinstance(frame, Frame) and isinstance(frame.message, Ack):
                dose_id = self._by_seq.get(frame.seq)
                if dose_id is not None:
                    self.acked.setdefault(dose_id, now)
        return data


class Relay:
    """Forwards a loopback port to the broker from ``open()`` on. Before, nothing listens
    there and every connect is refused, as when a gateway's uplink is down."""

    def __init__(self, target: MqttEndpoint) -> None:
        self.port = _free_port()
        self.target = target
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[Any]] = set()

    def endpoint(self) -> MqttEndpoint:
        return self.target.model_copy(update={"host": "127.0.0.1", "port": self.port})

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._links:
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - a handler runs in a task
        self._links.add(task)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._links.discard(task)
            writer.close()
            up_writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 18):
            writer.write(data)
            await writer.drain()
    writer.close()


class Arrivals:
    """A plain subscriber to one gateway's events: when expected events first arrive."""

    def __init__(self, endpoint: MqttEndpoint, gateway: str, expected: set[str]) -> None:
        self.endpoint, self.topic = endpoint, f"telecare/v1/{gateway}/events"
        self.remaining = set(expected)
        self.first = self.last = math.nan
        self.ready, self.done = asyncio.Event(), asyncio.Event()

    async def run(self) -> None:
        client = _mqtt_client(self.endpoint, f"bench-edge-sub-{secrets.token_hex(4)}", v5=False)
        async with client:
            await client.subscribe(self.topic, qos=1)
            self.ready.set()
            async for message in client.messages:
                now = time.monotonic()
                if not isinstance(message.payload, bytes):
                    continue
                ids = {str(e.get("id")) for e in json.loads(message.payload).get("events", [])}
                if ids & self.remaining:
                    self.first = now if math.isnan(self.first) else self.first
                    self.last = now
                    self.remaining -= ids
                if not self.remaining:
                    self.done.set()


def hub_url(endpoint: MqttEndpoint, port: int | None = None) -> str:
    auth = ""
    if endpoint.username:
        auth = quote(endpoint.username, safe="")
        if endpoint.password is not None:
            auth += ":" + quote(endpoint.password.get_secret_value(), safe="")
        auth += "@"
    host = "127.0.0.1" if port else endpoint.host
    return f"mqtt://{auth}{host}:{port or endpoint.port}"


def edge_toml(
    *, gateway: str, data_dir: Path, hub_url: str, protocol: str, heartbeat_s: int,
    dispensers: Sequence[tuple[Path, str]] = (), z2m: tuple[str, str] | None = None,
) -> Path:  # fmt: skip
    q = json.dumps
    lines = [
        f"gateway_id = {q(gateway)}",
        f"data_dir = {q(str(data_dir))}",
        "[hub]",
        f"mqtt_url = {q(hub_url)}",
        f"protocol = {q(protocol)}",
        f"heartbeat_s = {heartbeat_s}",
        "reconnect_min_s = 0.2",
        "reconnect_max_s = 0.5",
    ]
    if z2m is not None:
        lines += ["[zigbee2mqtt]", f"mqtt_url = {q(z2m[0])}", f"base_topic = {q(z2m[1])}"]
        for name, device_type in ZIGBEE:
            lines += [
                "[[zigbee2mqtt.devices]]",
                f"friendly_name = {q(name)}",
                f"device_id = {q(f'{gateway}.{name}')}",
                f"device_type = {q(device_type)}",
            ]
    for path, device_id in dispensers:
        lines += [
            "[[serial]]",
            'protocol = "dispenser"',
            f"path = {q(str(path))}",
            f"device_id = {q(device_id)}",
        ]
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def running(coro: Awaitable[None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


async def publish_plain(
    endpoint: MqttEndpoint, topic: str, payloads: list[bytes]
) -> tuple[float, float]:
    """Publish at QoS 1, at most ``PUBLISH_WINDOW`` awaiting their PUBACK. Returns when
    the first publish went out (connected) and when the last PUBACK came."""
    room = asyncio.Semaphore(PUBLISH_WINDOW)
    client = _mqtt_client(
        endpoint, f"bench-edge-pub-{secrets.token_hex(4)}", v5=False, max_inflight=PUBLISH_WINDOW
    )

    async def one(payload: bytes) -> None:
        try:
            await client.publish(topic, payload, qos=1, timeout=60)
        finally:
            room.release()

    async with client:
        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            for payload in payloads:
                await room.acquire()
                tasks.create_task(one(payload))
        return started, time.monotonic()


async def clear_retained(endpoint: MqttEndpoint, topics: list[str]) -> None:
    with contextlib.suppress(aiomqtt.MqttError):
        async with _mqtt_client(
            endpoint, f"bench-edge-clean-{secrets.token_hex(4)}", v5=False
        ) as c:
            for topic in topics:
                await c.publish(topic, b"", qos=1, retain=True)


# --- baselines and measurements of a process --------------------------------------------


def pty_round_trips(count: int) -> list[float]:
    """A 32-byte frame through a raw pty and back, both ends in this thread."""
    master, slave = os.openpty()
    out: list[float] = []
    try:
        tty.setraw(slave)
        frame = bytes(range(32))
        for _ in range(count):
            start = time.perf_counter()
            os.write(master, frame)
            _read(slave, len(frame))
            os.write(slave, frame)
            _read(master, len(frame))
            out.append(time.perf_counter() - start)
    finally:
        os.close(master)
        os.close(slave)
    return out


def _read(fd: int, size: int) -> None:
    got = 0
    while got < size:
        got += len(os.read(fd, size - got))


async def queue_puts(path: Path, gateway: str, count: int) -> list[float]:
    """One event per ``put`` (one fsynced transaction each), as a serial driver stores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    queue = await AsyncEdgeQueue.open(path)
    out: list[float] = []
    try:
        for event in telemetry(gateway, count):
            start = time.perf_counter()
            await queue.put([event])
            out.append(time.perf_counter() - start)
    finally:
        await queue.close()
    return out


async def queue_alone(path: Path, events: list[DeviceEvent]) -> tuple[float, float]:
    """The queue's part of a drain without the network: put ``events`` in transactions of
    1,000, then peek, build an envelope and delete it, one after another, as the uplink
    does for each envelope. Returns the seconds to fill and to empty the queue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    queue = await AsyncEdgeQueue.open(path)
    try:
        start = time.monotonic()
        for offset in range(0, len(events), 1000):
            await queue.put(events[offset : offset + 1000])
        filled = time.monotonic()
        while batch := await queue.peek(MAX_EVENTS_PER_ENVELOPE):
            _, sent = build_envelope(batch)
            await queue.delete([item.seq for item in sent])
        return filled - start, time.monotonic() - filled
    finally:
        await queue.close()


async def rss_of(code: str) -> int:
    """The RSS of a fresh interpreter that ran ``code`` and waits."""
    script = f"{code}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None  # noqa: S101 - piped above
    assert proc.stdin is not None  # noqa: S101
    try:
        if await asyncio.wait_for(proc.stdout.readline(), 60) != b"ready\n":
            raise RuntimeError(f"the RSS probe failed: {code!r}")
        return int(psutil.Process(proc.pid).memory_info().rss)
    finally:
        proc.stdin.close()
        await proc.wait()


def switches(pid: int) -> int:
    """Context switches of all the threads of ``pid`` (each one is a wake-up or a preemption)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def peak_rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def filesystem(path: Path) -> str:
    resolved = str(path.resolve())
    mounts = [p for p in psutil.disk_partitions(all=True) if resolved.startswith(p.mountpoint)]
    best = max(mounts, key=lambda p: len(p.mountpoint), default=None)
    return f"{best.fstype} ({best.device} on {best.mountpoint})" if best else "?"


def telemetry(gateway: str, count: int) -> list[DeviceEvent]:
    """Telemetry as the Zigbee driver would have queued it, 10 ms apart, ending now."""
    start = datetime.now(UTC) - timedelta(milliseconds=10 * count)
    events = []
    for i in range(count):
        slug, device_type, kind, payload = _TELEMETRY[i % len(_TELEMETRY)]
        events.append(make_event(
            kind, gateway_id=gateway, device_id=f"{gateway}.{slug}-{i % 4}",
            device_type=device_type, time=start + timedelta(milliseconds=10 * i), payload=payload,
        ))  # fmt: skip
    return events


def envelopes(events: list[DeviceEvent]) -> list[bytes]:
    """Envelopes as the edge's uplink makes them: at most 500 events and 64 KiB."""
    out: list[bytes] = []
    chunk: list[bytes] = []
    empty = len(b'{"events":[]}')
    size = empty
    for event in events:
        body = event.model_dump_json(exclude_none=True).encode()
        if chunk and (
            len(chunk) == MAX_EVENTS_PER_ENVELOPE or size + len(body) + 1 > MAX_ENVELOPE_BYTES
        ):
            out.append(b'{"events":[' + b",".join(chunk) + b"]}")
            chunk, size = [], empty
        chunk.append(body)
        size += len(body) + 1
    if chunk:
        out.append(b'{"events":[' + b",".join(chunk) + b"]}")
    return out


ZIGBEE_STATE: dict[str, dict[str, Any]] = {
    "door_sensor": {"contact": True},
    "motion_sensor": {"occupancy": False},
    "bed_sensor": {"occupancy": False},
    "smoke_detector": {"smoke": False},
    "water_leak_sensor": {"water_leak": False},
}
