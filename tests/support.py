"""Helpers for integration and end-to-end tests: a hub process, a publisher, polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import httpx
import psycopg

from devices.events import DeviceEvent, envelope_json, make_event
from hub.admin import RegistryFile, import_registry

ROOT = Path(__file__).resolve().parent.parent
REAL_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REAL_MQTT_URL = "mqtt://127.0.0.1:1883"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], Awaitable[Any]], *, timeout: float, interval: float = 0.05,
    what: str = "",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def settled(value: Any) -> Any:
    """``value`` as an awaitable, for ``wait_until_async(lambda: settled(check()))``."""
    return value


class ChildProcess:
    """A product command in a child process: ``process`` and ``log_path`` set by the subclass."""

    process: subprocess.Popen[bytes] | None
    log_path: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class HubProcess(ChildProcess):
    """``python -m hub hub`` in a child process, as an operator would run it."""

    def __init__(
        self,
        *,
        data_dir: Path,
        database_url: str | None,
        mqtt_url: str | None,
        client_id: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / f"hub-{client_id}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TELECARE_")}
        self.env.update(
            TELECARE_HTTP_PORT=str(self.port),
            TELECARE_DATA_DIR=str(data_dir),
            TELECARE_INGEST__CLIENT_ID=client_id,
            TELECARE_LOG_FORMAT="json",
        )
        if database_url:
            self.env["TELECARE_DATABASE_URL"] = database_url
        if mqtt_url:
            self.env["TELECARE_MQTT_URL"] = mqtt_url
            if mqtt_url != REAL_MQTT_URL:  # the embedded amqtt broker speaks 3.1.1 only
                self.env["TELECARE_INGEST__PROTOCOL"] = "3.1.1"
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> HubProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hub", "hub"], env=self.env, stdout=log, stderr=log, cwd=ROOT
        )
        log.close()

        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"hub exited: {self.log_path.read_text()[-3000:]}")
            try:
                report = httpx.get(f"{self.base_url}/health", timeout=1).json()
            except httpx.HTTPError:
                return False
            return bool(report.get("database") == "ok" and report.get("broker") == "ok")

        try:
            wait_until(healthy, timeout=timeout, interval=0.1, what="the hub to be healthy")
        except BaseException:
            self.kill()
            raise
        return self

    def metric(self, name: str) -> float:
        """A counter from ``/metrics`` (summed over labels)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total


async def register(database_url: str, registry: dict[str, Any]) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await import_registry(conn, RegistryFile.model_validate(registry))


def home_registry(gateway_id: str, *, devices: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """One district, one home with one resident, one gateway and the given devices."""
    site = f"site-{gateway_id}"
    resident = f"res-{gateway_id}"
    return {
        "districts": [{"id": "d-test", "name": "Testbydel"}],
        "sites": [{"id": site, "district_id": "d-test", "kind": "home", "name": "Testhjem"}],
        "residents": [{"id": resident, "site_id": site, "display_name": "Test Person"}],
        "gateways": [{"id": gateway_id, "site_id": site}],
        "devices": [
            {"id": d, "gateway_id": gateway_id, "device_type": t, "resident_id": resident}
            for d, t in devices
        ],
    }


def motion_events(gateway_id: str, count: int) -> list[DeviceEvent]:
    return [
        make_event(
            "motion", gateway_id=gateway_id, device_id=f"motion-{i % 5}",
            device_type="motion_sensor", payload={"room": "stue"},
        )
        for i in range(count)
    ]


def mqtt_client(url: str, identifier: str | None = None) -> aiomqtt.Client:
    parts = urlsplit(url)
    return aiomqtt.Client(
        parts.hostname or "127.0.0.1", parts.port or 1883, identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V311,
    )


async def publish(
    url: str, topic: str, payloads: Iterable[bytes], *, window: int = 100, retain: bool = False
) -> int:
    """Publish at QoS 1, ``window`` at a time; returns how many the broker acknowledged."""
    done = 0
    async with mqtt_client(url) as client:
        batch: list[Awaitable[None]] = []
        for payload in payloads:
            batch.append(client.publish(topic, payload, qos=1, retain=retain))
            if len(batch) >= window:
                await asyncio.gather(*batch)
                done += len(batch)
                batch = []
        if batch:
            await asyncio.gather(*batch)
            done += len(batch)
    return done


def envelopes(events: list[DeviceEvent], size: int) -> list[bytes]:
    return [envelope_json(events[i : i + size]) for i in range(0, len(events), size)]


async def count_rows(database_url: str, sql: str, *params: Any) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(sql.encode(), params)
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def events_stored(database_url: str, gateway_id: str) -> int:
    return await count_rows(
        database_url, "SELECT count(*) FROM events WHERE gateway_id = %s", gateway_id
    )


async def stored_exactly(database_url: str, gateway_id: str, expected: int) -> bool:
    """True once ``expected`` events of the gateway are stored; fails at once on more."""
    found = await events_stored(database_url, gateway_id)
    assert found <= expected, f"{found} rows, more than the {expected} published"
    return found == expected


def stop_quietly(hub: HubProcess) -> None:
    with contextlib.suppress(Exception):
        hub.stop()
