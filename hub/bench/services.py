"""The services a run uses: PostgreSQL, the broker (a private Mosquitto when installed),
and the hub as its own process with its /metrics read over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil  # type: ignore[import-untyped]

from hub.bench.plan import PROGRESS_POLL_S
from hub.bench.prometheus import parse_metrics
from hub.settings import HubSettings, MqttEndpoint

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


# --- the services of the run ----------------------------------------------------------


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
