"""``telecare bench``: ingest throughput and alarm latency, with baselines from the same run.

One run measures, on the configured services (or the real PostgreSQL and Mosquitto on
127.0.0.1 when they answer, else embedded ones):

* sustained ingest of single-event messages and of 500-event envelopes: rows committed
  over time, read from the hub's own ``telecare_events_ingested_total``, from the first
  publish to the last commit;
* telemetry publish → committed latency, and pendant press → alarm row latency, under a
  paced background of 2,000 events/s;
* baselines in the same run, with the same publisher and payloads: publish-only to the
  broker (the publisher's ceiling), a bare aiomqtt subscriber that only counts, the MQTT
  hop latency at 2,000 msg/s, and PostgreSQL COPY binary of event rows;
* where the time goes: CPU per event of every process involved, the hub's histograms,
  and a py-spy profile of the hub when ``py-spy`` is installed;
* how the broker treats the hub's MQTT 5 Receive Maximum and manual acknowledgement.

The hub runs as its own process (``python -m hub hub``) on a scratch database
``telecare_bench_<random>``, dropped at the end, so the publisher and the hub never share
an event loop or a GIL. The results are written between two markers in the output file
(docs/benchmarks.md); whatever else that file holds is kept.

Flow control: Mosquitto keeps at most ``max_queued_messages`` (1,000 by default) QoS 1
messages per client beyond those in flight and silently drops the rest, while the
publisher still gets its PUBACK. An open-loop publisher faster than the hub would lose
events, so throughput runs are closed-loop: the publisher keeps at most a window of
messages ahead of what the subscriber (the hub, or the bare baseline subscriber) has
taken, and the fraction of time it waited for that window says who set the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import aiomqtt
import psutil  # type: ignore[import-untyped]
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg.types.json import Jsonb

from devices.events import parse_envelope
from devices.ids import uuid7
from hub.settings import HubSettings, MqttEndpoint

DEFAULT_OUTPUT = Path("docs/benchmarks.md")
RESULTS_START = "<!-- telecare bench: results start (generated, overwritten by each run) -->"
RESULTS_END = "<!-- telecare bench: results end -->"

TARGET_SINGLE_MSG_S = 15_000.0
TARGET_ENVELOPE_EVENTS_S = 80_000.0
TARGET_ALARM_P99_MS = 25.0
BACKGROUND_EVENTS_S = 2_000.0
PROBE_RATE_S = 20.0
ENVELOPE_EVENTS = 500
GATEWAYS = 50

PROGRESS_POLL_S = 0.1
"""How often the hub's /metrics is read during throughput phases (each read costs the hub
a few ms of CPU: at 20 Hz that was ~7 % of its CPU in the single-event phase)."""
PROBE_POLL_S = 0.001
"""Pause between two visibility queries while a latency probe is outstanding."""
BROKER_WINDOW = 100
"""Publishes awaiting the broker's PUBACK at once (paho's own queue stays empty)."""
ENVELOPE_WINDOW = 100
"""Envelopes ahead of the hub: 50,000 events, the hub's default max_pending_events."""
MOSQUITTO_QUEUE_SLACK = 500
"""Under Mosquitto's default max_queued_messages (1,000) on top of the inflight window."""
STALL_S = 10.0
"""A phase ends when nothing was delivered for this long."""
WARMUP_S = 1.0
PROBE_TIMEOUT_S = 5.0

# Telemetry kinds that no alarm rule acts on, so they wait for the batch window.
_TELEMETRY = (
    ("motion", "motion_sensor", "motion", '{"room":"living_room"}'),
    ("bed", "bed_sensor", "bed_entered", "{}"),
    ("door", "door_sensor", "battery_level", '{"level_percent":87,"voltage":2.95}'),
    ("door", "door_sensor", "closed", '{"room":"front_door"}'),
    ("gw", "gateway", "heartbeat", '{"uptime_s":86400,"queue_depth":0}'),
)
_DISTRICT = "bench-district"
_ALARM_GATEWAY = "bench-gw-alarm"
_PROBE_GATEWAY = "bench-gw-probe"


@dataclass(frozen=True, slots=True)
class Plan:
    single_messages: int
    envelope_events: int
    baseline_messages: int
    copy_rows: int
    latency_s: float
    hop_s: float
    phase_timeout_s: float


FULL = Plan(100_000, 1_000_000, 100_000, 500_000, 20.0, 5.0, 90.0)
QUICK = Plan(10_000, 100_000, 10_000, 100_000, 4.0, 1.5, 20.0)


# --- small helpers ----------------------------------------------------------------------


def _reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listeners(port: int) -> list[int]:
    """Processes listening on a local TCP port (the broker, for CPU accounting)."""
    return [
        c.pid for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    ]  # fmt: skip


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or ''}".rstrip(":")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def telemetry_json(index: int, gateway: str, time_iso: str) -> str:
    """One telemetry event as the edge sends it (about 300 bytes)."""
    slug, device_type, kind, payload = _TELEMETRY[index % len(_TELEMETRY)]
    return (
        f'{{"id":"{uuid7()}","time":"{time_iso}","gateway_time":"{time_iso}",'
        f'"gateway_id":"{gateway}","device_id":"{gateway}.{slug}-{index % 4}",'
        f'"device_type":"{device_type}","kind":"{kind}","payload":{payload}}}'
    )


def _envelope(events: Iterable[str]) -> bytes:
    return ('{"events":[' + ",".join(events) + "]}").encode()


def _topic(gateway: str) -> str:
    return f"telecare/v1/{gateway}/events"


def _gateway(index: int) -> str:
    return f"bench-gw-{index % GATEWAYS:03d}"


def single_messages(count: int) -> list[tuple[str, bytes]]:
    """``count`` single-event messages, round robin over the bench gateways."""
    out: list[tuple[str, bytes]] = []
    time_iso = _now_iso()
    for i in range(count):
        if i % 1000 == 0:
            time_iso = _now_iso()
        gateway = _gateway(i)
        out.append((_topic(gateway), _envelope([telemetry_json(i, gateway, time_iso)])))
    return out


def envelope_messages(events: int) -> list[tuple[str, bytes]]:
    """Envelopes of ``ENVELOPE_EVENTS`` events, each from one gateway."""
    out: list[tuple[str, bytes]] = []
    for n in range(math.ceil(events / ENVELOPE_EVENTS)):
        gateway = _gateway(n)
        time_iso = _now_iso()
        size = min(ENVELOPE_EVENTS, events - n * ENVELOPE_EVENTS)
        out.append(
            (_topic(gateway), _envelope(telemetry_json(i, gateway, time_iso) for i in range(size)))
        )
    return out


def _check_payloads() -> None:
    """The generated events must be valid, or the bench measures quarantine."""
    for topic, payload in single_messages(len(_TELEMETRY)) + envelope_messages(3):
        gateway = topic.split("/")[2]
        for event in parse_envelope(payload).events:
            if event.alarm_relevant or event.gateway_id != gateway:
                raise AssertionError(f"bench payload unfit: {event.kind}")
    press, _ = _press(0)
    if not parse_envelope(press).events[0].alarm_relevant:
        raise AssertionError("bench pendant press is not alarm relevant")


def _press(index: int) -> tuple[bytes, UUID]:
    event_id = uuid7()
    body = (
        f'{{"id":"{event_id}","time":"{_now_iso()}","gateway_id":"{_ALARM_GATEWAY}",'
        f'"device_id":"bench-pendant-{index:04d}","device_type":"safety_alarm",'
        f'"kind":"button_pressed","payload":{{"button":"pendant"}}}}'
    )
    return _envelope([body]), event_id


def _probe_event() -> tuple[bytes, UUID]:
    event_id = uuid7()
    body = (
        f'{{"id":"{event_id}","time":"{_now_iso()}","gateway_id":"{_PROBE_GATEWAY}",'
        f'"device_id":"{_PROBE_GATEWAY}.motion-0","device_type":"motion_sensor",'
        f'"kind":"motion","payload":{{"room":"hall"}}}}'
    )
    return _envelope([body]), event_id


def registry(alarm_devices: int) -> dict[str, list[dict[str, Any]]]:
    """Gateways for the load, one probe gateway, and a care home of pendants."""
    sites = [
        {"id": f"bench-site-{i:03d}", "district_id": _DISTRICT, "kind": "home",
         "name": f"Bench home {i}"}
        for i in range(GATEWAYS)
    ]  # fmt: skip
    sites.append(
        {"id": "bench-care-home", "district_id": _DISTRICT, "kind": "care_home",
         "name": "Bench care home"}
    )  # fmt: skip
    gateways = [{"id": _gateway(i), "site_id": f"bench-site-{i:03d}"} for i in range(GATEWAYS)]
    gateways += [
        {"id": _PROBE_GATEWAY, "site_id": "bench-site-000"},
        {"id": _ALARM_GATEWAY, "site_id": "bench-care-home"},
    ]
    residents = [
        {"id": f"bench-res-{i:04d}", "site_id": "bench-care-home", "display_name": f"R{i}"}
        for i in range(alarm_devices)
    ]
    devices = [
        {"id": f"bench-pendant-{i:04d}", "gateway_id": _ALARM_GATEWAY,
         "device_type": "safety_alarm", "resident_id": f"bench-res-{i:04d}"}
        for i in range(alarm_devices)
    ]  # fmt: skip
    return {
        "districts": [{"id": _DISTRICT, "name": "Bench"}],
        "sites": sites,
        "residents": residents,
        "gateways": gateways,
        "devices": devices,
    }


# --- MQTT -----------------------------------------------------------------------------


def _mqtt_client(
    endpoint: MqttEndpoint,
    identifier: str,
    *,
    v5: bool,
    receive_maximum: int | None = None,
    session_expiry_s: int = 0,
    max_inflight: int | None = None,
) -> aiomqtt.Client:
    """A clean-session client; nothing of it stays on the broker after it disconnects."""
    kwargs: dict[str, Any] = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        kwargs.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, properties=props)
    else:
        kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=True)
    if max_inflight is not None:
        kwargs["max_inflight_messages"] = max_inflight
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=identifier,
        username=endpoint.username,
        password=endpoint.password.get_secret_value() if endpoint.password else None,
        tls_params=aiomqtt.TLSParameters() if endpoint.tls else None,
        keepalive=30,
        timeout=10,
        **kwargs,
    )


class Publisher:
    """QoS 1 publishing without a task or an event per message.

    ``aiomqtt.Client.publish`` waits for each PUBACK with its own ``asyncio.Event`` and
    ``wait_for``; at tens of thousands of messages a second that bookkeeping would make
    the publisher the bottleneck. This keeps aiomqtt for the connection and its socket
    callbacks, calls paho's ``publish`` directly and counts PUBACKs in ``on_publish``,
    with at most ``window`` messages unacknowledged by the broker.
    """

    def __init__(self, endpoint: MqttEndpoint, *, window: int = BROKER_WINDOW) -> None:
        self.window = window
        self.client = _mqtt_client(
            endpoint, f"bench-pub-{secrets.token_hex(4)}", v5=False, max_inflight=window
        )
        self._paho: Any = self.client._client
        self.sent = 0
        self.acked = 0
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()

    async def __aenter__(self) -> Publisher:
        await self.client.__aenter__()
        self._paho.on_publish = self._on_publish
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(aiomqtt.MqttError, asyncio.CancelledError):
            await asyncio.wait_for(self.drain(), 10)
        await self.client.__aexit__(None, None, None)

    def _on_publish(self, _client: Any, _userdata: Any, _mid: int, *_rest: Any) -> None:
        self.acked += 1
        if self.sent - self.acked < self.window:
            self._room.set()
        if self.acked >= self.sent:
            self._drained.set()

    async def publish(self, topic: str, payload: bytes) -> None:
        while self.sent - self.acked >= self.window:
            self._room.clear()
            await asyncio.wait_for(self._room.wait(), 30)
        info = self._paho.publish(topic, payload, qos=1)
        if info.rc != 0:
            raise aiomqtt.MqttCodeError(info.rc, "could not publish")
        self.sent += 1
        self._drained.clear()

    async def drain(self) -> None:
        """Until the broker has acknowledged everything sent."""
        while self.acked < self.sent:
            self._drained.clear()
            await self._drained.wait()


# The baseline subscriber runs in its own process, like the hub. Shared memory slots:
_READY, _COUNT, _FIRST, _LAST = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    endpoint: MqttEndpoint
    topic: str
    v5: bool
    receive_maximum: int


def _subscriber_main(config: SubscriberConfig, shared: Any, lat: Any) -> None:
    """A bare aiomqtt subscriber: counts (and times, for the hop baseline); auto-ack."""
    asyncio.run(_subscriber(config, shared, lat))


async def _subscriber(config: SubscriberConfig, shared: Any, lat: Any) -> None:
    topic = config.topic
    client = _mqtt_client(
        config.endpoint, f"bench-sub-{secrets.token_hex(4)}", v5=config.v5,
        receive_maximum=config.receive_maximum,
    )  # fmt: skip
    timing = len(lat) > 1
    async with client:
        await client.subscribe(topic, qos=1)
        shared[_READY] = 1.0
        count = 0
        async for message in client.messages:
            now = time.monotonic()
            if count == 0:
                shared[_FIRST] = now
            if timing and count < len(lat):
                payload = message.payload
                if isinstance(payload, bytes):
                    lat[count] = now - float(payload.split(b" ", 1)[0])
            count += 1
            shared[_COUNT] = float(count)
            shared[_LAST] = now


class BaselineSubscriber:
    """The bare subscriber process; ``count``, ``first`` and ``last`` read shared memory."""

    def __init__(
        self, endpoint: MqttEndpoint, topic: str, *, v5: bool, receive_maximum: int,
        timings: int = 0,
    ) -> None:  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        self.shared: Any = ctx.RawArray("d", 4)
        self.lat: Any = ctx.RawArray("d", max(1, timings))
        self.process = ctx.Process(
            target=_subscriber_main,
            args=(SubscriberConfig(endpoint, topic, v5, receive_maximum), self.shared, self.lat),
            daemon=True,
        )

    async def start(self, limit_s: float = 20) -> BaselineSubscriber:
        self.process.start()
        deadline = time.monotonic() + limit_s
        while self.shared[_READY] < 1:
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the baseline subscriber did not start")
            await asyncio.sleep(0.02)
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def count(self) -> int:
        return int(self.shared[_COUNT])

    @property
    def last(self) -> float:
        return float(self.shared[_LAST])

    def latencies(self) -> list[float]:
        return [float(self.lat[i]) for i in range(min(self.count, len(self.lat)))]

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


async def broker_facts(endpoint: MqttEndpoint) -> dict[str, str]:
    """Mosquitto's retained ``$SYS`` topics: version, sessions, subscriptions."""
    facts: dict[str, str] = {}
    client = _mqtt_client(endpoint, f"bench-sys-{secrets.token_hex(4)}", v5=False)
    with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
        async with client:
            await client.subscribe("$SYS/broker/#")
            async with asyncio.timeout(1.5):
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes):
                        facts[message.topic.value.removeprefix("$SYS/broker/")] = payload.decode(
                            errors="replace"
                        )
    return facts


@dataclass(slots=True)
class InflightFinding:
    receive_maximum: int
    granted_v5: int | None = None
    granted_v311: int | None = None
    published: int = 0
    delivered_after_ack: int = 0
    note: str = ""

    @property
    def queued_beyond_inflight(self) -> int:
        return self.delivered_after_ack - (self.granted_v5 or 0)

    @property
    def dropped(self) -> int:
        return self.published - self.delivered_after_ack


async def _count_until_quiet(counter: Callable[[], int], quiet_s: float, limit_s: float) -> int:
    deadline = time.monotonic() + limit_s
    last, since = counter(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now_count = counter()
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


async def _held_client(
    endpoint: MqttEndpoint, topic: str, *, v5: bool, receive_maximum: int, publish: int
) -> tuple[int, int]:
    """Subscribe with manual ack, let ``publish`` messages arrive unacknowledged, count
    them, then acknowledge everything and count again. Returns (unacked, total)."""
    client = _mqtt_client(
        endpoint, f"bench-inflight-{secrets.token_hex(4)}", v5=v5, receive_maximum=receive_maximum
    )
    paho: Any = client._client
    paho.manual_ack_set(True)
    held: list[int] = []
    acking = False
    count = 0

    async def consume() -> None:
        nonlocal count
        async for message in client.messages:
            count += 1
            if acking:
                paho.ack(message.mid, message.qos)
            else:
                held.append(message.mid)

    async with client:
        await client.subscribe(topic, qos=1)
        reader = asyncio.create_task(consume())
        try:
            async with Publisher(endpoint) as publisher:
                for i in range(publish):
                    await publisher.publish(topic, f"{i}".encode())
                await publisher.drain()
            unacked = await _count_until_quiet(lambda: count, 0.5, 5)
            acking = True
            for mid in held:
                paho.ack(mid, 1)
            total = await _count_until_quiet(lambda: count, 0.7, 10)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return unacked, total


async def check_inflight(endpoint: MqttEndpoint, receive_maximum: int) -> InflightFinding:
    """How many unacknowledged QoS 1 messages the broker lets a subscriber hold (MQTT 5
    with the hub's Receive Maximum, and 3.1.1), and what happens beyond that window."""
    finding = InflightFinding(receive_maximum)
    topic = f"telecare-bench/{secrets.token_hex(4)}/inflight"
    finding.published = receive_maximum + 1500
    finding.granted_v5, finding.delivered_after_ack = await _held_client(
        endpoint, topic, v5=True, receive_maximum=receive_maximum, publish=finding.published
    )
    finding.granted_v311, _ = await _held_client(
        endpoint, topic, v5=False, receive_maximum=receive_maximum, publish=200
    )
    return finding


async def forget_session(endpoint: MqttEndpoint, client_id: str, *, v5: bool) -> None:
    """End the hub's persistent session, so the broker stops queueing for it."""
    with contextlib.suppress(aiomqtt.MqttError):
        async with _mqtt_client(endpoint, client_id, v5=v5, session_expiry_s=0):
            pass


# --- the hub process and its /metrics -------------------------------------------------


class Http:
    """A tiny keep-alive HTTP/1.1 GET client for the hub's /metrics and /health."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def get(self, path: str, limit_s: float = 10) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                return await asyncio.wait_for(self._get(path), limit_s)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _get(self, path: str) -> tuple[int, bytes]:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        await self._writer.drain()
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")  # keep-alive ended
        status = int(status_line.split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


INGESTED = "telecare_events_ingested_total"


class HubProcess:
    """``python -m hub hub`` with its own port, client id and data directory."""

    def __init__(
        self, settings: HubSettings, *, database_url: str, mqtt_url: str, scratch: Path,
        protocol: str,
    ) -> None:  # fmt: skip
        self.port = _free_port()
        self.client_id = f"bench-hub-{secrets.token_hex(4)}"
        self.log_path = scratch / "hub.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELECARE_")}
        for group, model in (("INGEST", settings.ingest), ("STORAGE", settings.storage)):
            for key, value in model.model_dump().items():
                if value is not None:
                    env[f"TELECARE_{group}__{key.upper()}"] = str(value)
        env.update(
            TELECARE_DATABASE_URL=database_url,
            TELECARE_MQTT_URL=mqtt_url,
            TELECARE_HTTP_HOST="127.0.0.1",
            TELECARE_HTTP_PORT=str(self.port),
            TELECARE_DATA_DIR=str(scratch / "hub-data"),
            TELECARE_INGEST__CLIENT_ID=self.client_id,
            TELECARE_INGEST__PROTOCOL=protocol,
            TELECARE_LOG_FORMAT="json",
            TELECARE_LOG_LEVEL=settings.log_level,
            TELECARE_ENVIRONMENT=settings.environment,
        )
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.http = Http("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101 - only after start
        return self.process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", "hub", "hub"],
                env=self.env, stdout=log_file, stderr=log_file, cwd=self.log_path.parent,
            )  # fmt: skip

    async def start(self, limit_s: float = 90) -> None:
        self.process = process = self._spawn()
        deadline = time.monotonic() + limit_s
        errors = (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the hub exited while starting:\n{self.log_tail()}")
            with contextlib.suppress(*errors):
                status, body = await self.http.get("/health", limit_s=2)
                if status == 200 and b'"broker":"ok"' in body.replace(b" ", b""):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hub was not healthy after {limit_s}s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    async def metrics(self) -> dict[str, float]:
        _, body = await self.http.get("/metrics")
        return parse_metrics(body.decode())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        await self.http.close()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)


class Progress:
    """Reads the hub's committed-events counter every ``PROGRESS_POLL_S``."""

    def __init__(self, hub: HubProcess) -> None:
        self.hub = hub
        self.value = 0.0
        self.timeline: list[tuple[float, float]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Progress:
        self.value = (await self.hub.metrics()).get(INGESTED, 0.0)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        errors = (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError)
        while True:
            with contextlib.suppress(*errors):
                value = (await self.hub.metrics()).get(INGESTED, self.value)
                self.timeline.append((time.monotonic(), value))
                if value != self.value:
                    self.value = value
                    self._changed.set()
            await asyncio.sleep(PROGRESS_POLL_S)

    async def wait(self) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), 0.5)

    def reached(self, value: float) -> float | None:
        """When the counter was first seen at or above ``value``."""
        return next((t for t, v in self.timeline if v >= value), None)


# --- CPU accounting -------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(times.user + times.system)


@dataclass(slots=True)
class CpuSample:
    wall: float
    per_pid: dict[int, tuple[str, float]]
    busy: float
    total: float


@dataclass(slots=True)
class CpuUsage:
    wall: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0
    """Fraction of all cores busy."""


class CpuMeter:
    """CPU seconds per process group between two samples."""

    def __init__(self, *, broker_pids: list[int]) -> None:
        self.groups: dict[str, list[int]] = {"bench (publisher, probes)": [os.getpid()]}
        if broker_pids:
            self.groups["mosquitto"] = broker_pids
        self.scratch_pids: list[int] = []

    def _named(self, name: str) -> list[int]:
        found = []
        for proc in psutil.process_iter(["name"]):
            if proc.info.get("name") == name:
                found.append(proc.pid)
        return found

    def sample(self) -> CpuSample:
        groups = dict(self.groups)
        postgres = self._named("postgres")
        scratch = [pid for pid in self.scratch_pids if pid in postgres]
        groups["postgres: this database's backends"] = scratch
        groups["postgres: all other processes"] = [p for p in postgres if p not in scratch]
        per_pid: dict[int, tuple[str, float]] = {}
        for group, pids in groups.items():
            for pid in pids:
                seconds = _cpu_seconds(pid)
                if seconds is not None:
                    per_pid[pid] = (group, seconds)
        cpu = psutil.cpu_times()
        total = float(sum(cpu))
        idle = float(cpu.idle + getattr(cpu, "iowait", 0.0))
        return CpuSample(time.monotonic(), per_pid, total - idle, total)

    @staticmethod
    def usage(before: CpuSample, after: CpuSample) -> CpuUsage:
        usage = CpuUsage(wall=after.wall - before.wall)
        for pid, (group, seconds) in after.per_pid.items():
            start = before.per_pid.get(pid, (group, 0.0))[1]
            usage.seconds[group] = usage.seconds.get(group, 0.0) + max(0.0, seconds - start)
        total = after.total - before.total
        usage.machine_busy = (after.busy - before.busy) / total if total > 0 else math.nan
        return usage


# --- py-spy ---------------------------------------------------------------------------


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


_CATEGORIES = (
    ("paho-mqtt", ("paho/",)),
    ("aiomqtt", ("aiomqtt/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("psycopg", ("psycopg/", "psycopg_pool/", "psycopg_binary/")),
    (
        "prometheus/HTTP",
        ("prometheus_client/", "uvicorn/protocols", "starlette/", "fastapi/", "h11/"),
    ),
    ("logging", ("structlog/", "logging/")),
    ("hub & devices code", ("hub/", "devices/", "alarms/")),
)
_INCLUSIVE = (
    ("MQTT receive (paho loop_read)", re.compile(r"^loop_read \(paho/")),
    ("parse + validate (Ingest.parse)", re.compile(r"^Ingest\.parse \(")),
    ("DB flush (Ingest._flush)", re.compile(r"^Ingest\._flush \(")),
    ("acks (ingest.ack)", re.compile(r"^ack \(hub/ingest")),
    ("HTTP server and /metrics", re.compile(r"\((prometheus_client|uvicorn/protocols|h11)/")),
)


_PG_SCRATCH = "postgres: this database's backends"
_LOOP_FRAME = re.compile(r"^(Handle\._run|BaseEventLoop\._run_once) \(asyncio/")


@dataclass(slots=True)
class Profile:
    samples: int = 0
    self_time: dict[str, int] = field(default_factory=dict)
    inclusive: dict[str, int] = field(default_factory=dict)
    top_frames: list[tuple[str, int]] = field(default_factory=list)


def parse_profile(text: str) -> Profile:
    """py-spy ``--format raw`` (collapsed stacks) → time by library and by activity."""
    profile = Profile()
    leaves: dict[str, int] = {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        profile.samples += count
        category = "event loop & stdlib"
        for frame in reversed(frames):
            if _LOOP_FRAME.match(frame):
                break  # above the event loop: the server's plumbing, not this work
            found = next((n for n, keys in _CATEGORIES if any(k in frame for k in keys)), None)
            if found is not None:
                category = found
                break
        profile.self_time[category] = profile.self_time.get(category, 0) + count
        for name, pattern in _INCLUSIVE:
            if any(pattern.search(frame) for frame in frames):
                profile.inclusive[name] = profile.inclusive.get(name, 0) + count
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + count
    profile.top_frames = sorted(leaves.items(), key=lambda kv: -kv[1])[:8]
    return profile


class Profiler:
    """``py-spy record`` on the hub for one phase, stopped with SIGINT at its end."""

    def __init__(self, exe: str | None, pid: int, out: Path) -> None:
        self.exe, self.pid, self.out = exe, pid, out
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.exe is None:
            return
        self.process = subprocess.Popen(  # noqa: S603 - py-spy from the venv or PATH
            [self.exe, "record", "--pid", str(self.pid), "--rate", "100", "--nonblocking",
             "--format", "raw", "--output", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def own_pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def stop(self) -> Profile | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.process.wait, 15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 5)
        if not self.out.exists():
            return None
        return parse_profile(self.out.read_text(errors="replace"))


# --- results --------------------------------------------------------------------------


@dataclass(slots=True)
class Throughput:
    name: str
    unit: str
    expected: int
    delivered: int = 0
    messages: int = 0
    seconds: float = math.nan
    blocked_s: float = 0.0
    cpu: CpuUsage = field(default_factory=CpuUsage)
    hub: dict[str, float] = field(default_factory=dict)
    profile: Profile | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else math.nan

    @property
    def missing(self) -> int:
        return self.expected - self.delivered


@dataclass(slots=True)
class Latency:
    name: str
    samples: list[float] = field(default_factory=list)
    by_probe: dict[int, float] = field(default_factory=dict)
    lost: int = 0
    background_rate: float = math.nan
    cpu: CpuUsage = field(default_factory=CpuUsage)
    hub: dict[str, float] = field(default_factory=dict)
    events: int = 0

    def ms(self, q: float) -> float:
        return percentile(self.samples, q) * 1000

    def slowest(self, n: int = 3) -> str:
        worst = sorted(self.by_probe.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"#{i + 1} {v * 1000:.0f} ms" for i, v in worst)


@dataclass(slots=True)
class Report:
    started: datetime
    quick: bool
    plan: Plan
    services: dict[str, str] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inflight: InflightFinding | None = None
    publish_only: Throughput | None = None
    raw_sub: list[Throughput] = field(default_factory=list)
    raw_sub_other: Throughput | None = None
    """The bare subscriber on MQTT 3.1.1, to show what MQTT 5 costs the client."""
    copy: list[Throughput] = field(default_factory=list)
    hop: Latency | None = None
    single: Throughput | None = None
    envelopes: Throughput | None = None
    telemetry: Latency | None = None
    alarm: Latency | None = None
    seconds: float = 0.0
    message_bytes: int = 0
    envelope_bytes: int = 0


# --- the run --------------------------------------------------------------------------


class PrivateMosquitto:
    """The installed Mosquitto, as a private instance on a free loopback port.

    The hub's topic is fixed (``telecare/v1/+/events``), so on a shared broker every
    other hub subscribed there (test runs of other sessions) would take the bench's load,
    and the bench theirs. Same binary, same default limits (max_inflight_messages 20,
    max_queued_messages 1000), no persistence.
    """

    def __init__(self, exe: str, scratch: Path) -> None:
        self.exe = exe
        self.port = _free_port()
        self.conf = scratch / "mosquitto.conf"
        self.log = scratch / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        )
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 - the installed mosquitto
                [self.exe, "-c", str(self.conf)], stdout=log_file, stderr=log_file
            )
        deadline = time.monotonic() + 10
        while not _reachable("127.0.0.1", self.port, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-500:]}")
            time.sleep(0.05)
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass(slots=True)
class Services:
    admin_url: str
    mqtt_url: str
    endpoint: MqttEndpoint
    database_label: str
    broker_label: str
    embedded_broker: bool
    broker_pids: list[int]


def resolve_services(settings: HubSettings, scratch: Path, stack: contextlib.ExitStack) -> Services:
    """Configured services; else the real PostgreSQL on 127.0.0.1:5432 and a private
    instance of the installed Mosquitto (the one on :1883 with TELECARE_BENCH_BROKER=shared);
    else the real ones on 127.0.0.1 when they answer; else embedded ones."""
    if settings.database_url is not None:
        admin_url = settings.database_url.get_secret_value()
        db_label = f"PostgreSQL from TELECARE_DATABASE_URL ({_where(admin_url)})"
    elif _reachable("127.0.0.1", 5432):
        admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
        db_label = "real PostgreSQL at 127.0.0.1:5432 (TELECARE_DATABASE_URL unset, reachable)"
    else:
        from hub.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(scratch / "postgres")
        admin_url = server.start()
        stack.callback(server.stop)
        db_label = "embedded PostgreSQL (nothing at 127.0.0.1:5432)"
    embedded = False
    broker_pids: list[int] = []
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    shared = os.environ.get("TELECARE_BENCH_BROKER") == "shared"
    if settings.mqtt_url is not None:
        mqtt_url = settings.mqtt_url.get_secret_value()
        mqtt_label = f"broker from TELECARE_MQTT_URL ({_where(mqtt_url)})"
    elif exe is not None and not shared:
        private = PrivateMosquitto(exe, scratch)
        mqtt_url = private.start()
        stack.callback(private.stop)
        broker_pids = [private.process.pid] if private.process else []
        mqtt_label = (
            f"real Mosquitto ({exe}), a private instance on 127.0.0.1:{private.port} with the"
            " default limits: the shared one on :1883 also feeds other sessions' test hubs,"
            " which subscribe to the same topic (TELECARE_BENCH_BROKER=shared to use it)"
        )
    elif _reachable("127.0.0.1", 1883):
        mqtt_url = "mqtt://127.0.0.1:1883"
        mqtt_label = "real Mosquitto at 127.0.0.1:1883 (TELECARE_MQTT_URL unset, reachable)"
    else:
        from hub.embedded import EmbeddedBrokerThread

        broker = EmbeddedBrokerThread()
        mqtt_url = broker.start()
        stack.callback(broker.stop)
        mqtt_label = "embedded amqtt broker in the bench process (nothing at 127.0.0.1:1883)"
        embedded = True
    endpoint = MqttEndpoint.from_url(mqtt_url)
    if not broker_pids and not embedded and endpoint.host in {"127.0.0.1", "localhost"}:
        with contextlib.suppress(psutil.Error):
            broker_pids = _listeners(endpoint.port)
    return Services(admin_url, mqtt_url, endpoint, db_label, mqtt_label, embedded, broker_pids)


class Bench:
    def __init__(self, settings: HubSettings, *, quick: bool, scratch: Path) -> None:
        self.settings = settings
        self.plan = QUICK if quick else FULL
        self.scratch = scratch
        self.report = Report(started=datetime.now(UTC), quick=quick, plan=self.plan)
        self.services: Services | None = None
        self.database_url = ""
        self.hub: HubProcess | None = None
        self.cpu: CpuMeter | None = None
        self.conn: psycopg.AsyncConnection[Any] | None = None

    @property
    def endpoint(self) -> MqttEndpoint:
        assert self.services is not None  # noqa: S101
        return self.services.endpoint

    @property
    def v5(self) -> bool:
        protocol = self.settings.ingest.protocol
        embedded = self.services is not None and self.services.embedded_broker
        return protocol == "5" or (protocol == "auto" and not embedded)

    @property
    def hub_inflight(self) -> int:
        return self.settings.ingest.receive_maximum if self.v5 else 20

    # -- set-up --

    async def setup(self, services: Services) -> None:
        self.services = services
        self.cpu = CpuMeter(broker_pids=services.broker_pids)
        name = f"telecare_bench_{secrets.token_hex(5)}"
        async with await psycopg.AsyncConnection.connect(services.admin_url, autocommit=True) as c:
            await c.execute(f'CREATE DATABASE "{name}"'.encode())
            cur = await c.execute("SHOW server_version")
            row = await cur.fetchone()
            self.report.machine["PostgreSQL"] = str(row[0]) if row else "?"
        self.database_url = _with_database(services.admin_url, name)
        self.report.services["scratch database"] = name

    async def drop_database(self) -> None:
        if self.services is None or not self.database_url:
            return
        name = self.database_url.rsplit("/", 1)[1].split("?")[0]
        async with await psycopg.AsyncConnection.connect(
            self.services.admin_url, autocommit=True
        ) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    async def prepare_database(self) -> None:
        from hub.admin import RegistryFile, import_registry
        from hub.db.migrate import migrate

        await migrate(self.database_url, backend_choice=self.settings.storage.backend)
        self.conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        presses = int(self.plan.latency_s * PROBE_RATE_S) + 50
        await import_registry(self.conn, RegistryFile.model_validate(registry(presses)))
        cur = await self.conn.execute(
            "SELECT value FROM telecare_meta WHERE key = 'storage_backend'"
        )
        row = await cur.fetchone()
        self.report.services["event storage"] = str(row[0]) if row else "?"
        await self._refresh_scratch_pids()

    async def _refresh_scratch_pids(self) -> None:
        if self.conn is None or self.cpu is None:
            return
        cur = await self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
        self.cpu.scratch_pids = [int(r[0]) for r in await cur.fetchall()]

    async def sample_cpu(self) -> CpuSample:
        assert self.cpu is not None  # noqa: S101
        await self._refresh_scratch_pids()
        return self.cpu.sample()

    async def usage_since(self, before: CpuSample) -> CpuUsage:
        assert self.cpu is not None  # noqa: S101
        return CpuMeter.usage(before, await self.sample_cpu())

    # -- baselines --

    async def publish_only(self, messages: Sequence[tuple[str, bytes]]) -> Throughput:
        """The publisher alone, to a topic nobody subscribes to: its ceiling."""
        result = Throughput("publish-only (no subscriber)", "msg", len(messages))
        topic = f"telecare-bench/{secrets.token_hex(4)}/nobody"
        before = await self.sample_cpu()
        async with Publisher(self.endpoint) as publisher:
            start = time.monotonic()
            for _, payload in messages:
                await publisher.publish(topic, payload)
            await publisher.drain()
            result.seconds = time.monotonic() - start
        result.cpu = await self.usage_since(before)
        result.delivered = result.messages = len(messages)
        return result

    async def raw_subscriber(
        self, messages: Sequence[tuple[str, bytes]], label: str, *, v5: bool | None = None
    ) -> Throughput:
        """The same publisher and messages into a bare aiomqtt subscriber that counts, on
        the hub's protocol unless ``v5`` says otherwise."""
        v5 = self.v5 if v5 is None else v5
        name = f"bare aiomqtt subscriber, MQTT {'5' if v5 else '3.1.1'} ({label})"
        result = Throughput(name, "msg", len(messages))
        sub = await BaselineSubscriber(
            self.endpoint, "telecare/v1/+/events", v5=v5,
            receive_maximum=self.settings.ingest.receive_maximum,
        ).start()  # fmt: skip
        assert self.cpu is not None  # noqa: S101
        self.cpu.groups["bare subscriber (baseline)"] = [sub.pid or 0]
        try:
            before = await self.sample_cpu()
            inflight = self.settings.ingest.receive_maximum if v5 else 20
            window = min(2000, inflight + MOSQUITTO_QUEUE_SLACK)

            async def wait() -> None:
                await asyncio.sleep(0.001)

            start = time.monotonic()
            result.blocked_s = await self._drive(
                messages, delivered=lambda: sub.count, wait=wait, window=window
            )
            await self._settle(lambda: float(sub.count), float(len(messages)), wait)
            result.delivered = result.messages = sub.count
            result.seconds = sub.last - start
            result.cpu = await self.usage_since(before)
        finally:
            sub.stop()
            self.cpu.groups.pop("bare subscriber (baseline)", None)
        return result

    async def hop_latency(self) -> Latency:
        """MQTT hop publish → bare subscriber at the background rate."""
        result = Latency("MQTT hop (publisher → bare subscriber)")
        count = int(self.plan.hop_s * BACKGROUND_EVENTS_S)
        sub = await BaselineSubscriber(
            self.endpoint, "telecare/v1/+/events", v5=self.v5,
            receive_maximum=self.settings.ingest.receive_maximum, timings=count,
        ).start()  # fmt: skip
        try:
            pad = b" " * max(0, self.report.message_bytes - 20)
            topic = _topic("bench-gw-hop")
            async with Publisher(self.endpoint) as publisher:
                start = time.monotonic()
                for i in range(count):
                    due = start + i / BACKGROUND_EVENTS_S
                    if due > time.monotonic():
                        await asyncio.sleep(due - time.monotonic())
                    await publisher.publish(topic, f"{time.monotonic():.6f}".encode() + pad)
                await publisher.drain()
            await self._settle(lambda: float(sub.count), float(count), lambda: asyncio.sleep(0.01))
            result.samples = sub.latencies()
            result.lost = count - sub.count
        finally:
            sub.stop()
        return result

    async def copy_baseline(self, rows: int, label: str) -> Throughput:
        """COPY binary of event rows into a table like ``events`` (same keys and indexes),
        in transactions of ``batch_max_events`` rows: the database's ceiling."""
        from hub.store.writer import _EVENT_TYPES, EVENT_COLUMNS

        result = Throughput(f"PostgreSQL COPY binary ({label})", "row", rows)
        batch = self.settings.ingest.batch_max_events
        data = _copy_rows(rows)
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as c:
            await c.execute(
                "CREATE TABLE IF NOT EXISTS bench_copy_baseline (LIKE events INCLUDING ALL)"
            )
            await c.execute("TRUNCATE bench_copy_baseline")
            statement = f"COPY bench_copy_baseline ({EVENT_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            before = await self.sample_cpu()
            start = time.monotonic()
            for offset in range(0, rows, batch):
                async with c.transaction(), c.cursor().copy(statement) as copy:
                    copy.set_types(_EVENT_TYPES)
                    for row in data[offset : offset + batch]:
                        await copy.write_row(row)
            result.seconds = time.monotonic() - start
            result.cpu = await self.usage_since(before)
            await c.execute("TRUNCATE bench_copy_baseline")
        result.delivered = rows
        return result

    # -- driving load --

    async def _drive(
        self,
        messages: Sequence[tuple[str, bytes]],
        *,
        delivered: Callable[[], float],
        wait: Callable[[], Awaitable[None]],
        window: int,
    ) -> float:
        """Publish all, never more than ``window`` messages ahead of ``delivered()``
        (in messages). Returns the seconds spent waiting for the window."""
        blocked = 0.0
        deadline = time.monotonic() + self.plan.phase_timeout_s
        async with Publisher(self.endpoint) as publisher:
            for sent, (topic, payload) in enumerate(messages):
                if sent - delivered() >= window:
                    t = time.monotonic()
                    while sent - delivered() >= window and time.monotonic() < deadline:
                        await wait()
                    blocked += time.monotonic() - t
                if time.monotonic() >= deadline:
                    self.report.notes.append(
                        f"publishing stopped at the {self.plan.phase_timeout_s:.0f} s phase limit"
                        f" after {sent} of {len(messages)} messages"
                    )
                    break
                await publisher.publish(topic, payload)
        return blocked

    async def _settle(
        self, delivered: Callable[[], float], target: float, wait: Callable[[], Awaitable[None]]
    ) -> None:
        """Until ``delivered()`` reaches ``target``, or nothing moves for ``STALL_S``."""
        last, since = delivered(), time.monotonic()
        hard = time.monotonic() + self.plan.phase_timeout_s
        while delivered() < target and time.monotonic() < hard:
            await wait()
            if delivered() != last:
                last, since = delivered(), time.monotonic()
            elif time.monotonic() - since > STALL_S:
                break

    # -- hub phases --

    async def hub_throughput(
        self, name: str, messages: Sequence[tuple[str, bytes]], events_per_message: int,
        events: int, window: int,
    ) -> Throughput:  # fmt: skip
        assert self.hub is not None  # noqa: S101
        result = Throughput(name, "event", events, messages=len(messages))
        metrics_before = await self.hub.metrics()
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
        profiler = Profiler(_py_spy(), self.hub.pid, self.scratch / f"profile-{slug}.txt")
        async with Progress(self.hub) as progress:
            base = progress.value
            before = await self.sample_cpu()
            profiler.start()
            if profiler.own_pid is not None and self.cpu is not None:
                self.cpu.groups["py-spy (profiling the hub)"] = [profiler.own_pid]
            start = time.monotonic()
            result.blocked_s = await self._drive(
                messages,
                delivered=lambda: (progress.value - base) / events_per_message,
                wait=progress.wait, window=window,
            )  # fmt: skip
            await self._settle(lambda: progress.value - base, events, progress.wait)
            final = progress.value
            done = progress.reached(final) or time.monotonic()
            result.cpu = await self.usage_since(before)
            result.profile = await profiler.stop()
            if self.cpu is not None:
                self.cpu.groups.pop("py-spy (profiling the hub)", None)
        result.delivered = int(final - base)
        result.seconds = done - start
        result.hub = _delta(metrics_before, await self.hub.metrics())
        return result

    async def settle_database(self) -> None:
        """After the bulk phases: CHECKPOINT and VACUUM ANALYZE, so the latency phases
        measure a steady 2,000 events/s rather than the aftermath of a million-row load
        (a checkpoint or an autovacuum of ``events`` starting in the middle of them)."""
        assert self.conn is not None  # noqa: S101
        start = time.monotonic()
        done = []
        for statement in ("CHECKPOINT", "VACUUM (ANALYZE) events"):
            try:
                await self.conn.execute(statement)
                done.append(statement)
            except psycopg.Error as exc:
                self.report.notes.append(f"{statement} before the latency phases: {exc}")
        self.report.notes.append(
            f"before the latency phases: {' and '.join(done) or 'nothing'}"
            f" ({time.monotonic() - start:.1f} s), then {self.warmup_s:.0f} s of background"
            " before the first probe"
        )

    @property
    def warmup_s(self) -> float:
        return WARMUP_S if self.report.quick else 3 * WARMUP_S

    async def _background(
        self, publisher: Publisher, stop: asyncio.Event, messages: Sequence[tuple[str, bytes]]
    ) -> tuple[int, float]:
        """Single-event telemetry at ``BACKGROUND_EVENTS_S`` until ``stop``, from messages
        made beforehand (then made on the fly, should the phase run long)."""
        start = time.monotonic()
        sent = 0
        while not stop.is_set() and time.monotonic() - start < 120:
            due = int((time.monotonic() - start) * BACKGROUND_EVENTS_S)
            while sent < due:
                if sent < len(messages):
                    topic, payload = messages[sent]
                else:
                    topic, payload = single_messages(1)[0]
                await publisher.publish(topic, payload)
                sent += 1
            await asyncio.sleep(0.002)
        return sent, time.monotonic() - start

    async def latency_phase(self, *, alarm: bool) -> Latency:
        """Probes at ``PROBE_RATE_S`` within the background; each probe's publish time
        against the first visibility query that finds its row (events, or alarm_triggers
        for a pendant press; every press is from another resident, so each raises an alarm
        of its own). A query runs every ``PROBE_POLL_S`` while a probe is outstanding; the
        figure includes up to one poll period and one query round trip."""
        assert self.hub is not None  # noqa: S101
        assert self.conn is not None  # noqa: S101
        name = "pendant press → alarm row" if alarm else "telemetry publish → committed"
        result = Latency(name)
        sql = (
            "SELECT event_id FROM alarm_triggers WHERE event_id = ANY(%s)"
            if alarm
            else "SELECT id FROM events WHERE id = ANY(%s)"
        )
        probes = int(self.plan.latency_s * PROBE_RATE_S)
        pending: dict[UUID, tuple[int, float]] = {}
        wake, stop_bg, probes_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        background_msgs = single_messages(
            int(BACKGROUND_EVENTS_S * (self.warmup_s + self.plan.latency_s + PROBE_TIMEOUT_S + 2))
        )
        metrics_before = await self.hub.metrics()
        before = await self.sample_cpu()
        async with Publisher(self.endpoint) as publisher:
            background = asyncio.create_task(self._background(publisher, stop_bg, background_msgs))
            await asyncio.sleep(self.warmup_s)
            poller = asyncio.create_task(
                self._poll(self.conn, sql, pending, result=result, wake=wake, done=probes_done)
            )
            start = time.monotonic()
            for i in range(probes):
                due = start + i / PROBE_RATE_S
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                payload, event_id = _press(i) if alarm else _probe_event()
                topic = _topic(_ALARM_GATEWAY if alarm else _PROBE_GATEWAY)
                pending[event_id] = (i, time.monotonic())
                await publisher.publish(topic, payload)
                wake.set()
            probes_done.set()
            wake.set()
            await poller
            stop_bg.set()
            sent, seconds = await background
        result.background_rate = sent / seconds
        result.events = sent + probes
        result.cpu = await self.usage_since(before)
        result.hub = _delta(metrics_before, await self.hub.metrics())
        return result

    @staticmethod
    async def _poll(
        conn: psycopg.AsyncConnection[Any], sql: str, pending: dict[UUID, tuple[int, float]], *,
        result: Latency, wake: asyncio.Event, done: asyncio.Event,
    ) -> None:  # fmt: skip
        while not (done.is_set() and not pending):
            if not pending:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.1)
                continue
            cur = await conn.execute(sql, (list(pending),))
            rows = await cur.fetchall()
            now = time.monotonic()
            for (event_id,) in rows:
                index, published = pending.pop(event_id)
                result.samples.append(now - published)
                result.by_probe[index] = now - published
            for event_id, (_, published) in list(pending.items()):
                if now - published > PROBE_TIMEOUT_S:
                    del pending[event_id]
                    result.lost += 1
            await asyncio.sleep(PROBE_POLL_S)

    # -- the whole run --

    async def run(self, services: Services) -> None:
        report = self.report
        await self.setup(services)
        await self.prepare_database()
        _check_payloads()
        if not services.embedded_broker:
            facts = await broker_facts(self.endpoint)
            report.machine["Mosquitto"] = facts.get("version", "?").removeprefix(
                "mosquitto version "
            )
            report.inflight = await check_inflight(
                self.endpoint, self.settings.ingest.receive_maximum
            )
        plan = self.plan
        t = time.monotonic()
        singles = single_messages(max(plan.single_messages, plan.baseline_messages))
        envelopes = envelope_messages(plan.envelope_events)
        report.message_bytes = round(sum(len(p) for _, p in singles[:1000]) / 1000)
        report.envelope_bytes = round(sum(len(p) for _, p in envelopes) / len(envelopes))
        report.notes.append(f"payload generation took {time.monotonic() - t:.1f} s (not timed)")
        baseline_msgs = singles[: plan.baseline_messages]
        report.publish_only = await self.publish_only(baseline_msgs)
        report.raw_sub.append(await self.raw_subscriber(baseline_msgs, "before the hub"))
        if self.v5:
            report.raw_sub_other = await self.raw_subscriber(
                baseline_msgs, "before the hub", v5=False
            )
        report.hop = await self.hop_latency()
        report.copy.append(await self.copy_baseline(plan.copy_rows, "before the hub"))

        self.hub = HubProcess(
            self.settings, database_url=self.database_url, mqtt_url=services.mqtt_url,
            scratch=self.scratch, protocol="5" if self.v5 else "3.1.1",
        )  # fmt: skip
        await self.hub.start()
        assert self.cpu is not None  # noqa: S101
        self.cpu.groups["hub"] = [self.hub.pid]
        try:
            window = min(2000, self.hub_inflight + MOSQUITTO_QUEUE_SLACK)
            report.single = await self.hub_throughput(
                "single-event messages", singles[: plan.single_messages], 1,
                plan.single_messages, window,
            )  # fmt: skip
            report.envelopes = await self.hub_throughput(
                f"{ENVELOPE_EVENTS}-event envelopes", envelopes, ENVELOPE_EVENTS,
                plan.envelope_events, ENVELOPE_WINDOW,
            )  # fmt: skip
            await self.settle_database()
            report.telemetry = await self.latency_phase(alarm=False)
            report.alarm = await self.latency_phase(alarm=True)
        finally:
            await self.hub.stop()
            self.cpu.groups.pop("hub", None)
            await forget_session(self.endpoint, self.hub.client_id, v5=self.v5)
        report.raw_sub.append(await self.raw_subscriber(baseline_msgs, "after the hub"))
        report.copy.append(await self.copy_baseline(plan.copy_rows, "after the hub"))

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def _copy_rows(count: int) -> list[tuple[object, ...]]:
    now = datetime.now(UTC)
    rows: list[tuple[object, ...]] = []
    for i in range(count):
        slug, device_type, kind, payload = _TELEMETRY[i % len(_TELEMETRY)]
        gateway = _gateway(i)
        rows.append(
            (uuid7(), now, now, now, gateway, f"{gateway}.{slug}-{i % 4}", device_type, kind,
             Jsonb(payload, dumps=_identity))
        )  # fmt: skip
    return rows


def _identity(text: str) -> str:
    return text


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def hist_quantile(metrics: dict[str, float], name: str, q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` (from cumulative deltas)."""
    buckets: list[tuple[float, float]] = []
    for key, value in metrics.items():
        if key.startswith(f"{name}_bucket{{"):
            bound = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if bound == "+Inf" else float(bound), value))
    buckets.sort()
    total = metrics.get(f"{name}_count", 0.0)
    if total <= 0:
        return math.nan
    return next((bound for bound, cum in buckets if cum >= q * total), math.inf)


# --- the report -----------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "CPU": model,
        "cores": f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False)} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "load average at start": f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
    }


def _fmt(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ms"


def _mean(values: Iterable[float]) -> float:
    items = [v for v in values if not math.isnan(v)]
    return sum(items) / len(items) if items else math.nan


def _ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}×"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**pass**" if ok else "**FAIL**")


def render(report: Report, command: str) -> str:
    """The generated block of docs/benchmarks.md."""
    lines: list[str] = [RESULTS_START, ""]
    lines += _render_header(report, command)
    lines += _render_results(report)
    lines += _render_baselines(report)
    lines += _render_time(report)
    lines += _render_findings(report)
    lines += _render_inflight(report)
    if report.notes:
        lines += ["### Notes from this run", ""]
        lines += [f"- {note}" for note in report.notes]
        lines.append("")
    lines.append(RESULTS_END)
    return "\n".join(lines) + "\n"


def _render_header(report: Report, command: str) -> list[str]:
    run = "quick (smoke) run" if report.quick else "full run"
    lines = [
        f"## Results ({run}, {report.started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{command}` — took {report.seconds:.0f} s. Generated by `hub/bench.py`;"
        " this section is rewritten by every run, the rest of the file is kept.",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in report.machine.items()]
    lines += ["", "| services and settings | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in report.services.items()]
    lines += [f"| {k} | {v} |" for k, v in report.settings.items()]
    lines += [
        f"| payloads | single-event message ≈{report.message_bytes} bytes;"
        f" envelope of {ENVELOPE_EVENTS} ≈{report.envelope_bytes / 1000:.0f} kB |",
        "",
    ]
    return lines


def _render_results(report: Report) -> list[str]:
    raw = _mean(r.rate for r in report.raw_sub)
    copy = _mean(r.rate for r in report.copy)
    hop = report.hop
    lines = [
        "### Results against the targets",
        "",
        "Ratios are to baselines measured in the same run (the mean of the runs before and"
        " after the hub), because these machines are noisy.",
        "",
        "| measure | target | measured | baseline, same run | ratio | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    single = report.single
    if single is not None:
        ok = single.missing == 0 and single.rate >= TARGET_SINGLE_MSG_S
        lines.append(
            f"| single-event messages, sustained ({single.expected:,} messages) |"
            f" ≥ {TARGET_SINGLE_MSG_S:,.0f} msg/s | {_fmt(single.rate)} msg/s |"
            f" bare aiomqtt subscriber {_fmt(raw)} msg/s | {_ratio(single.rate, raw)} |"
            f" {_verdict(ok)} |"
        )
    env = report.envelopes
    if env is not None:
        ok = env.missing == 0 and env.rate >= TARGET_ENVELOPE_EVENTS_S
        lines.append(
            f"| events in {ENVELOPE_EVENTS}-event envelopes ({env.expected:,} events) |"
            f" ≥ {TARGET_ENVELOPE_EVENTS_S:,.0f} events/s | {_fmt(env.rate)} events/s |"
            f" COPY binary {_fmt(copy)} rows/s | {_ratio(env.rate, copy)} | {_verdict(ok)} |"
        )
    hop_p99 = hop.ms(99) if hop else math.nan
    hop_text = f"MQTT hop {_ms(hop.ms(50))} / {_ms(hop_p99)}" if hop else "n/a"
    for lat, target in ((report.telemetry, None), (report.alarm, TARGET_ALARM_P99_MS)):
        if lat is None:
            continue
        passed = None if target is None else (lat.lost == 0 and lat.ms(99) <= target)
        lines.append(
            f"| {lat.name}, p50 / p99, at {_fmt(lat.background_rate)} events/s background"
            f" ({len(lat.samples)} probes) | {f'p99 ≤ {target:.0f} ms' if target else '—'} |"
            f" {_ms(lat.ms(50))} / {_ms(lat.ms(99))} (p95 {_ms(lat.ms(95))},"
            f" max {_ms(lat.ms(100))}) | {hop_text} |"
            f" p99 {_ratio(lat.ms(99), hop_p99)} | {_verdict(passed)} |"
        )
    lines.append("")
    if not math.isnan(raw) and not math.isnan(copy):
        lines.append(
            "The targets were set against shared/PERFORMANCE.md's limits. Scaled by this"
            f" run's baselines, they correspond here to ≈{_fmt(15_000 * raw / 18_500)} msg/s"
            f" (15,000 × bare subscriber now / 18,500) and ≈{_fmt(80_000 * copy / 180_000)}"
            " events/s (80,000 × COPY now / ≈180,000, the middle of its 140-220k)."
        )
        lines.append("")
    for t in (single, env):
        if t is not None and t.missing:
            lines.append(
                f"**{t.missing:,} of {t.expected:,} events were not committed** ({t.name})."
            )
    for lat in (report.telemetry, report.alarm):
        if lat is not None and lat.lost:
            lines.append(f"**{lat.lost} probes never became visible** ({lat.name}).")
        if lat is not None and lat.samples:
            lines.append(
                f"Slowest probes of {lat.name} (numbered in publishing order, one every"
                f" {1000 / PROBE_RATE_S:.0f} ms): {lat.slowest()}."
            )
    lines.append("")
    return lines


def _render_baselines(report: Report) -> list[str]:
    lines = [
        "### Baselines (same run, same publisher and payloads)",
        "",
        "| baseline | measured | for reference (shared/PERFORMANCE.md) |",
        "| --- | --- | --- |",
    ]
    if report.publish_only is not None:
        p = report.publish_only
        lines.append(
            f"| publish-only, QoS 1, nobody subscribed: the publisher's ceiling |"
            f" {_fmt(p.rate)} msg/s | Mosquitto with C clients ≈37k msg/s |"
        )
    others = [report.raw_sub_other] if report.raw_sub_other else []
    for r in [*report.raw_sub, *others]:
        lost = f" ({r.missing:,} missing)" if r.missing else ""
        lines.append(
            f"| {r.name}, QoS 1, auto-ack, publisher in another process |"
            f" {_fmt(r.rate)} msg/s{lost} | ≈18.5k msg/s (≈17.5k from an aiomqtt publisher) |"
        )
    if report.hop is not None:
        h = report.hop
        lines.append(
            f"| MQTT hop latency at {BACKGROUND_EVENTS_S:,.0f} msg/s, p50 / p99 |"
            f" {_ms(h.ms(50))} / {_ms(h.ms(99))} | p50 0.5 ms, p99 1.1 ms |"
        )
    for c in report.copy:
        lines.append(
            f"| {c.name}, {c.expected:,} rows in transactions of"
            f" {report.settings.get('batch_max_events', '?')} | {_fmt(c.rate)} rows/s |"
            " ≈140k (1,000) to ≈220k (10,000) rows/s |"
        )
    lines.append("")
    return lines


def _cpu_row(name: str, cpu: CpuUsage, per: int, unit: str, groups: Sequence[str]) -> str:
    cells = []
    for group in groups:
        seconds = cpu.seconds.get(group)
        cells.append("—" if seconds is None or per <= 0 else f"{seconds / per * 1e6:,.1f}")
    busy = "n/a" if math.isnan(cpu.machine_busy) else f"{cpu.machine_busy * 100:.0f} %"
    return f"| {name} | {per:,} {unit}s in {cpu.wall:.1f} s | {busy} | " + " | ".join(cells) + " |"


def _render_time(report: Report) -> list[str]:
    groups = [
        "hub", "bench (publisher, probes)", "bare subscriber (baseline)", "mosquitto",
        "postgres: this database's backends", "postgres: all other processes",
        "py-spy (profiling the hub)",
    ]  # fmt: skip
    lines = [
        "### Where the time goes",
        "",
        "CPU µs per event or message (= CPU ms per 1,000) for each process, measured with"
        " psutil over each phase. Machine busy = all cores; 100 % means both cores were"
        " saturated, so the processes were competing for CPU.",
        "",
        "| phase | work | machine busy | " + " | ".join(groups) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in groups) + " |",
    ]
    phases = [
        report.publish_only, *report.raw_sub, report.raw_sub_other, *report.copy,
        report.single, report.envelopes,
    ]  # fmt: skip
    for t in phases:
        if t is not None:
            lines.append(_cpu_row(t.name, t.cpu, t.delivered, t.unit, groups))
    for lat in (report.telemetry, report.alarm):
        if lat is not None:
            lines.append(_cpu_row(lat.name, lat.cpu, lat.events, "event", groups))
    lines.append("")
    lines += _render_hub_internals(report)
    lines += _render_profiles(report)
    return lines


def _render_hub_internals(report: Report) -> list[str]:
    lines = [
        "The hub's own view (deltas of its /metrics over each phase; histogram quantiles are"
        " bucket upper bounds):",
        "",
        "| phase | rate | hub CPU (share of one core) | publisher waited for the hub |"
        " transactions | events / transaction | receive → commit p50 / p99 / max |"
        " quarantined |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    phases: list[tuple[str, float, CpuUsage, float, dict[str, float]]] = []
    for t in (report.single, report.envelopes):
        if t is not None:
            waited = t.blocked_s / t.seconds if t.seconds > 0 else math.nan
            phases.append((t.name, t.rate, t.cpu, waited, t.hub))
    for lat in (report.telemetry, report.alarm):
        if lat is not None:
            phases.append((lat.name, lat.background_rate, lat.cpu, math.nan, lat.hub))
    for name, rate, cpu, waited, hub in phases:
        batches = hub.get("telecare_ingest_batch_events_count", 0.0)
        per_batch = hub.get("telecare_ingest_batch_events_sum", 0.0) / batches if batches else 0
        quarantined = sum(
            v for k, v in hub.items() if k.startswith("telecare_messages_quarantined_total")
        )
        lag50 = hist_quantile(hub, "telecare_ingest_lag_seconds", 0.5) * 1000
        lag99 = hist_quantile(hub, "telecare_ingest_lag_seconds", 0.99) * 1000
        lag_max = hist_quantile(hub, "telecare_ingest_lag_seconds", 1.0) * 1000
        share = cpu.seconds.get("hub", math.nan) / cpu.wall if cpu.wall else math.nan
        lines.append(
            f"| {name} | {_fmt(rate)} events/s | {_fmt(share * 100)} % |"
            f" {'—' if math.isnan(waited) else f'{waited * 100:.0f} % of the time'} |"
            f" {batches:,.0f} | {per_batch:,.0f} | ≤ {lag50:g} / ≤ {lag99:g} / ≤ {lag_max:g} ms |"
            f" {quarantined:,.0f} |"
        )
    lines.append("")
    return lines


def _render_profiles(report: Report) -> list[str]:
    profiled = [t for t in (report.single, report.envelopes) if t is not None and t.profile]
    if not profiled:
        return [
            "No profile: install py-spy (`.venv/bin/pip install py-spy`) for a breakdown of"
            " the hub's CPU by library.",
            "",
        ]
    lines = [
        "The hub's CPU by library (py-spy, 100 Hz, `--nonblocking`, whole phase; each sample"
        " goes to the innermost frame of a named library, else to the event loop & stdlib),"
        " and by activity (inclusive: a sample counts for every activity on its stack):",
        "",
    ]
    for t in profiled:
        profile = t.profile
        assert profile is not None  # noqa: S101
        n = max(1, profile.samples)
        by_lib = ", ".join(
            f"{name} {count / n * 100:.0f} %"
            for name, count in sorted(profile.self_time.items(), key=lambda kv: -kv[1])
        )
        by_activity = ", ".join(
            f"{name} {count / n * 100:.0f} %"
            for name, count in sorted(profile.inclusive.items(), key=lambda kv: -kv[1])
        )
        top = "; ".join(
            f"`{frame}` {count / n * 100:.0f} %" for frame, count in profile.top_frames[:5]
        )
        lines += [
            f"- **{t.name}** ({profile.samples:,} samples). By library: {by_lib}.",
            f"  By activity: {by_activity or 'n/a'}.",
            f"  Hottest frames: {top}.",
        ]
    lines.append("")
    return lines


def _per_event_us(cpu: CpuUsage, group: str, count: int) -> float:
    seconds = cpu.seconds.get(group)
    return math.nan if seconds is None or count <= 0 else seconds / count * 1e6


def _render_findings(report: Report) -> list[str]:
    """Plain sentences from this run's numbers (the analysis is the reader's)."""
    lines = ["In short, from this run's numbers:", ""]
    single, env = report.single, report.envelopes
    raw = [r for r in report.raw_sub if r.delivered]
    if single is not None and single.seconds > 0:
        hub_us = _per_event_us(single.cpu, "hub", single.delivered)
        share = single.cpu.seconds.get("hub", math.nan) / single.cpu.wall
        waited = single.blocked_s / single.seconds
        sub_us = _mean(_per_event_us(r.cpu, "bare subscriber (baseline)", r.delivered) for r in raw)
        lines.append(
            f"- Single-event messages: the hub used {_fmt(hub_us)} µs of CPU per event and"
            f" {_fmt(share * 100)} % of one core; the publisher waited for the hub"
            f" {waited * 100:.0f} % of the time"
            + (", so the hub set the pace." if waited > 0.2 else ", so the publisher may have.")
            + f" A bare aiomqtt subscriber on the same protocol (aiomqtt's queue and"
            f" iterator, counting only) cost {_fmt(sub_us)} µs per message in this run: the"
            " MQTT client stack alone, before any of the hub's own work."
        )
        other = report.raw_sub_other
        if other is not None and other.delivered:
            v3_us = _per_event_us(other.cpu, "bare subscriber (baseline)", other.delivered)
            lines.append(
                f"- The same bare subscriber on MQTT 3.1.1 costs {_fmt(v3_us)} µs per message:"
                " the difference is paho's MQTT 5 handling (a `Properties` object built per"
                " PUBLISH, among others)."
            )
    if env is not None and env.seconds > 0:
        hub_us = _per_event_us(env.cpu, "hub", env.delivered)
        copy_us = _mean(_per_event_us(c.cpu, _PG_SCRATCH, c.delivered) for c in report.copy)
        pg_us = _per_event_us(env.cpu, _PG_SCRATCH, env.delivered)
        lines.append(
            f"- Envelopes: the hub used {_fmt(hub_us, 1)} µs of CPU per event; PostgreSQL"
            f" spent {_fmt(pg_us, 1)} µs per row (COPY alone: {_fmt(copy_us, 1)} µs). The"
            " hub's Python work per event, not the database, sets this rate; see the"
            " profile above for its parts."
        )
    alarm, hop = report.alarm, report.hop
    if alarm is not None and hop is not None and alarm.samples:
        lag = hist_quantile(alarm.hub, "telecare_ingest_lag_seconds", 0.99) * 1000
        lines.append(
            f"- Pendant press → alarm row p99 {_ms(alarm.ms(99))}, against an MQTT hop p99 of"
            f" {_ms(hop.ms(99))} on the same machine at the same moment; the hub's own"
            f" receive → commit p99 was ≤ {lag:g} ms. The rest lies outside that span:"
            " broker delivery, the hub's socket and MQTT client before it parses the message,"
            " scheduling on a machine whose two cores are shared by every process here (and"
            " other sessions': see the load average), and the bench's ~1 ms polling."
        )
    lines.append("")
    return lines


def _render_inflight(report: Report) -> list[str]:
    f = report.inflight
    if f is None:
        return ["MQTT 5 inflight behaviour: not checked (embedded broker, MQTT 3.1.1 only).", ""]
    return [
        "### The broker's inflight window for the hub",
        "",
        f"A subscriber with manual acknowledgement, like the hub, was sent {f.published:,}"
        " QoS 1 messages and acknowledged none of them at first:",
        "",
        f"- MQTT 5 with Receive Maximum {f.receive_maximum:,} (the hub's setting): the broker"
        f" delivered **{f.granted_v5:,}** unacknowledged"
        + (
            " — it honours the client's Receive Maximum, not its own max_inflight_messages."
            if f.granted_v5 == f.receive_maximum
            else "."
        ),
        f"- MQTT 3.1.1: **{f.granted_v311}** unacknowledged (the broker's"
        " max_inflight_messages); a hub on 3.1.1 with manual acks would get 20 messages per"
        " commit.",
        f"- After acknowledging everything, {f.delivered_after_ack:,} had arrived in all:"
        f" the broker had queued {f.queued_beyond_inflight:,} beyond the inflight window and"
        f" **dropped {f.dropped:,}** (max_queued_messages), although the publisher got a"
        " PUBACK for every one. A hub that falls behind by more than inflight +"
        " max_queued_messages loses events unless the broker's max_queued_messages is"
        " raised (0 = no limit); the bench's publisher stays within that window.",
        "",
    ]


def write_report(output: Path, block: str) -> None:
    """Replace the generated block of ``output``; keep everything else in the file."""
    old = output.read_text(encoding="utf-8") if output.exists() else ""
    if RESULTS_START in old and RESULTS_END in old:
        head, rest = old.split(RESULTS_START, 1)
        tail = rest.split(RESULTS_END, 1)[1].removeprefix("\n")
        text = head + block + tail
    elif old.strip():
        first, _, others = old.partition("\n")
        text = f"{first}\n\n{block}\n{others.lstrip()}" if first.startswith("# ") else block + old
    else:
        text = (
            "# Benchmarks\n\n"
            "Measured by `telecare bench` (`hub/bench.py`): ingest throughput and latency of"
            " one hub process, with baselines from the same run. See shared/PERFORMANCE.md"
            " for the measured limits of the components alone.\n\n" + block
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")


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


def _hub_settings(settings: HubSettings, bench: Bench) -> dict[str, str]:
    from hub.ingest import make_client

    ingest = settings.ingest
    client = make_client(MqttEndpoint(host="127.0.0.1", port=1), ingest, embedded=not bench.v5)
    manual = bool(getattr(client._client, "_manual_ack", False))
    skip = {"client_id", "protocol", "session_expiry_s", "quarantine_raw_max_bytes"}
    skip |= {"reconnect_min_s", "reconnect_max_s"}
    tuning = ", ".join(
        f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
        for key, value in ingest.model_dump().items()
        if key not in skip and value is not None
    )
    out = {
        "hub ingest": f"MQTT {'5' if bench.v5 else '3.1.1'}; {tuning}",
        "hub acknowledgement": "manual, PUBACK after COMMIT"
        if manual
        else "**automatic (paho acks on receipt): hub/ingest.py as found does not enable"
        " manual acknowledgement**",
        "batch_max_events": f"{ingest.batch_max_events:,}",
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=root, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "hub", "devices",  # noqa: S607
             "alarms"],
            cwd=root, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.split()  # fmt: skip
        changed = [p for p in dirty if "/" in p and p != "hub/bench.py"]
        if head:
            out["code"] = f"commit {head}" + (
                f", with uncommitted changes in {', '.join(changed)}" if changed else ""
            )
    return out


async def _run(settings: HubSettings, *, quick: bool, output: Path) -> int:
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="telecare-bench-"))
    bench = Bench(settings, quick=quick, scratch=scratch)
    report = bench.report
    report.machine.update(machine_facts())
    status = 0
    with contextlib.ExitStack() as stack:
        try:
            services = await asyncio.to_thread(resolve_services, settings, scratch, stack)
            report.services["database"] = services.database_label
            report.services["broker"] = services.broker_label
            bench.services = services
            report.settings.update(_hub_settings(settings, bench))
            print(f"telecare bench: {services.database_label}; {services.broker_label}")
            await bench.run(services)
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
