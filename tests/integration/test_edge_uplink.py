"""The edge uplink against a real broker, through a proxy that tests cut and restore.

An outage with 10,000 events queued: every event arrives, alarms first, and the queue
ends empty. A connection lost with envelopes in flight: nothing is lost. The retained
status is online while connected and the will says offline when the path dies. A
command round trip, and an expired command answered ``expired`` without being run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import pytest

from devices.events import DeviceEvent, make_event, parse_envelope
from devices.gateway import CommandResult, GatewayCommand
from devices.ids import uuid7
from edge.queue import AsyncEdgeQueue
from edge.uplink import Uplink
from tests.support import (
    REAL_MQTT_URL,
    free_port,
    mqtt_client,
    reachable,
    wait_until,
    wait_until_async,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass
class Recorder:
    """A client on the broker itself (not through the proxy) that records what arrives."""

    events: list[DeviceEvent] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    envelopes: int = 0

    def received_ids(self) -> list[str]:
        return [str(event.id) for event in self.events]

    async def record(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            topic = str(message.topic)
            if topic.endswith("/events"):
                self.envelopes += 1
                self.events.extend(parse_envelope(bytes(payload)).events)
            elif topic.endswith("/status"):
                self.statuses.append(json.loads(payload))
            elif topic.endswith("/command-results"):
                self.results.append(json.loads(payload))


@contextlib.asynccontextmanager
async def recording(url: str, gateway: str) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    async with mqtt_client(url) as client:
        for suffix in ("events", "status", "command-results"):
            await client.subscribe(f"telecare/v1/{gateway}/{suffix}", qos=1)
        task = asyncio.create_task(recorder.record(client))
        try:
            yield recorder
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class Edge:
    gateway: str
    queue: AsyncEdgeQueue
    uplink: Uplink
    proxy: TcpProxy
    commands: list[GatewayCommand]


@contextlib.asynccontextmanager
async def edge(
    tmp_path: Path, mqtt_url: str, gateway: str, *, keepalive_s: int = 5, **options: Any
) -> AsyncIterator[Edge]:
    """A queue, an uplink connected through a proxy, and a fake command handler."""
    broker = urlsplit(mqtt_url)
    commands: list[GatewayCommand] = []

    async def on_command(command: GatewayCommand) -> CommandResult:
        commands.append(command)
        return CommandResult(command_id=command.command_id, ok=True, time=datetime.now(UTC))

    async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 1883) as proxy:
        queue = await AsyncEdgeQueue.open(tmp_path / f"{gateway}.db")
        uplink = Uplink(
            gateway_id=gateway,
            mqtt_url=proxy.url,
            queue=queue,
            version="test-1.0",
            on_command=on_command,
            # The embedded amqtt broker speaks MQTT 3.1.1 only.
            protocol="5" if mqtt_url == REAL_MQTT_URL else "3.1.1",
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            keepalive_s=keepalive_s,
            connect_timeout_s=3,
            session_expiry_s=60,
            **options,
        )
        task = asyncio.create_task(uplink.run())
        try:
            yield Edge(gateway, queue, uplink, proxy, commands)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await queue.close()


def new_gateway() -> str:
    return f"gw-{uuid.uuid4().hex[:10]}"


async def until(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    async def check() -> bool:
        return bool(predicate())

    await wait_until_async(check, timeout=timeout, what=what)


def outage_events(gateway: str, count: int, alarm_every: int) -> list[DeviceEvent]:
    return [
        make_event(
            "button_pressed", gateway_id=gateway, device_id="pendant-1", device_type="safety_alarm"
        )
        if i % alarm_every == alarm_every // 2
        else make_event(
            "motion",
            gateway_id=gateway,
            device_id=f"motion-{i % 4}",
            device_type="motion_sensor",
            payload={"room": "stue"},
        )
        for i in range(count)
    ]


async def test_ten_thousand_events_queued_in_an_outage_all_arrive_alarms_first(
    tmp_path: Path, mqtt_url: str
) -> None:
    gateway = new_gateway()
    async with (  # the recorder first: the embedded broker trips over concurrent changes
        recording(mqtt_url, gateway) as seen,
        edge(tmp_path, mqtt_url, gateway, heartbeat_s=3600) as e,
    ):
        await until(lambda: e.uplink.counters["status_published"], "a working session")
        await e.proxy.cut()
        await until(lambda: not e.uplink.connected, "the uplink to notice the cut")

        events = outage_events(e.gateway, 10_000, alarm_every=97)
        for start in range(0, len(events), 250):
            await e.queue.put(events[start : start + 250])
            e.uplink.notify()
        await asyncio.sleep(0.5)  # a few refused reconnects
        assert seen.events == []
        assert e.uplink.counters["connect_failures"] >= 1

        await e.proxy.restore()
        await until(lambda: len(set(seen.received_ids())) >= len(events), "every event", 60)
        await until(lambda: e.uplink.counters["events_acked"] >= len(events), "the PUBACKs")
        depth = await e.queue.depth()

    received = seen.received_ids()
    assert set(received) == {str(event.id) for event in events}
    # No PUBACK was lost (the cut came before any event was sent), so no duplicates.
    assert len(received) == len(events)
    assert depth.total == 0
    assert e.uplink.counters["reconnects"] >= 1
    alarms = [i for i, event in enumerate(seen.events) if event.alarm_relevant]
    telemetry = [i for i, event in enumerate(seen.events) if not event.alarm_relevant]
    assert len(alarms) == sum(1 for event in events if event.alarm_relevant) > 0
    assert max(alarms) < min(telemetry)
    assert seen.envelopes <= len(events) // 100  # batched: 64 KiB envelopes
    # Within each priority, oldest first.
    order = {str(event.id): n for n, event in enumerate(events)}
    assert [order[received[i]] for i in telemetry] == sorted(order[received[i]] for i in telemetry)


async def test_a_connection_lost_with_envelopes_in_flight_loses_nothing(
    tmp_path: Path, mqtt_url: str
) -> None:
    gateway = new_gateway()
    async with (  # the recorder first: the embedded broker trips over concurrent changes
        recording(mqtt_url, gateway) as seen,
        edge(tmp_path, mqtt_url, gateway, heartbeat_s=3600, keepalive_s=1) as e,
    ):
        await until(lambda: e.uplink.counters["status_published"], "a working session")
        e.proxy.blackhole()  # bytes vanish: PUBLISHes sent but never PUBACKed
        events = outage_events(e.gateway, 3_000, alarm_every=50)
        await e.queue.put(events)
        e.uplink.notify()
        await until(lambda: e.uplink.counters["published"] >= 2, "envelopes in flight")
        assert e.uplink.counters["acked"] == 0
        await until(lambda: not e.uplink.connected, "the keepalive to notice", 10)
        await e.proxy.restore()
        await until(lambda: len(set(seen.received_ids())) >= len(events), "every event", 60)
        await until(lambda: e.uplink.counters["events_acked"] >= len(events), "the PUBACKs")
        depth = await e.queue.depth()

    assert set(seen.received_ids()) == {str(event.id) for event in events}
    assert depth.total == 0
    assert e.uplink.counters["reconnects"] >= 1


async def test_an_alarm_does_not_wait_for_the_telemetry_pubacks(
    tmp_path: Path, mqtt_url: str
) -> None:
    gateway = new_gateway()
    async with (  # the recorder first: the embedded broker trips over concurrent changes
        recording(mqtt_url, gateway) as seen,
        edge(tmp_path, mqtt_url, gateway, heartbeat_s=3600, window=1) as e,
    ):
        await until(lambda: e.uplink.counters["status_published"], "a working session")
        e.proxy.hold_replies()  # the broker's PUBACKs are late: the window stays full
        backlog = outage_events(e.gateway, 3_000, alarm_every=10**9)
        await e.queue.put(backlog)
        e.uplink.notify()
        await until(lambda: seen.envelopes >= 1, "the first telemetry envelope")
        await asyncio.sleep(0.3)
        assert seen.envelopes == 1, "a window of 1 sent a second envelope before a PUBACK"

        pendant = make_event(
            "button_pressed",
            gateway_id=e.gateway,
            device_id="pendant-1",
            device_type="safety_alarm",
        )
        await e.queue.put([pendant])
        e.uplink.notify()
        await until(lambda: str(pendant.id) in seen.received_ids(), "the alarm", 3)
        assert e.uplink.counters["acked"] == 0  # no PUBACK has come through yet

        e.proxy.release_replies()
        await until(lambda: len(seen.events) >= len(backlog) + 1, "the rest of the backlog")
        await until(lambda: e.uplink.counters["events_acked"] >= len(backlog) + 1, "the acks")
        depth = await e.queue.depth()

    assert seen.received_ids().index(str(pendant.id)) < len(backlog)
    assert depth.total == 0


@pytest.mark.parametrize("outage", ["cut", pytest.param("blackhole", marks=pytest.mark.slow)])
async def test_status_is_online_while_connected_and_the_will_says_offline(
    tmp_path: Path, mqtt_url: str, outage: str
) -> None:
    if outage == "blackhole" and mqtt_url != REAL_MQTT_URL:
        pytest.skip(
            "amqtt 0.12 never times out a silent client (its handle_read_timeout is a no-op)"
        )
    async with edge(tmp_path, mqtt_url, new_gateway(), keepalive_s=1, heartbeat_s=0.5) as e:
        await until(lambda: e.uplink.counters["status_published"], "a working session")
        await until(lambda: e.uplink.counters["heartbeats"] >= 1, "a heartbeat")
        async with recording(mqtt_url, e.gateway) as seen:  # retained: arrives at once
            await until(lambda: seen.statuses, "the retained status")
            online = seen.statuses[-1]
            assert online["state"] == "online"
            assert online["version"] == "test-1.0"
            assert isinstance(online["queue_depth"], int)
            datetime.fromisoformat(online["time"])
            await until(lambda: seen.events, "a heartbeat event")
            heartbeat = seen.events[0]
            assert (heartbeat.kind, heartbeat.device_type) == ("heartbeat", "gateway")
            assert heartbeat.device_id == e.gateway
            assert set(heartbeat.payload.model_dump()) == {"uptime_s", "queue_depth"}

            if outage == "cut":  # the broker sees the connection reset: the will at once
                await e.proxy.cut()
            else:  # the broker hears nothing; 1.5 keepalives later, the will
                e.proxy.blackhole()
            await until(lambda: seen.statuses[-1] == {"state": "offline"}, "the will", 15)
            await e.proxy.restore()
            await until(lambda: seen.statuses[-1]["state"] == "online", "online again", 15)
        # A fresh subscriber sees the retained status: online.
        async with recording(mqtt_url, e.gateway) as fresh:
            await until(lambda: fresh.statuses, "the retained status")
            assert fresh.statuses[-1]["state"] == "online"
    # A clean stop publishes offline itself (a clean DISCONNECT does not fire the will).
    async with recording(mqtt_url, e.gateway) as after:
        await until(lambda: after.statuses, "the retained status")
        assert after.statuses[-1]["state"] == "offline"
        assert "time" in after.statuses[-1]


async def test_commands_round_trip_and_expired_ones_are_not_executed(
    tmp_path: Path, mqtt_url: str
) -> None:
    gateway = new_gateway()
    async with (  # the recorder first: the embedded broker trips over concurrent changes
        recording(mqtt_url, gateway) as seen,
        edge(tmp_path, mqtt_url, gateway, heartbeat_s=3600) as e,
    ):
        await until(lambda: e.uplink.connected, "the commands subscription")
        now = datetime.now(UTC)
        fresh = _command(expires_at=now + timedelta(minutes=1))
        stale = _command(expires_at=now - timedelta(seconds=1))
        broken = {**_command(expires_at=now + timedelta(minutes=1)), "kind": "explode"}
        topic = f"telecare/v1/{e.gateway}/commands"
        async with mqtt_client(mqtt_url) as hub:
            for command in (fresh, stale, broken, fresh):  # fresh twice: run once
                await hub.publish(topic, json.dumps(command), qos=1)
            await hub.publish(topic, b"\xff not json", qos=1)
        await until(lambda: len(seen.results) >= 3, "three results")
        await until(lambda: e.uplink.counters["invalid_commands"] >= 2, "both invalid counted")
        await asyncio.sleep(0.3)  # room for a wrong extra result to show up

    results = {r["command_id"]: r for r in seen.results}
    assert len(seen.results) == 3
    assert results[fresh["command_id"]]["ok"] is True
    assert results[stale["command_id"]] | {"time": None} == {
        "command_id": stale["command_id"],
        "ok": False,
        "error": "expired",
        "time": None,
    }
    assert results[broken["command_id"]]["ok"] is False
    assert "kind" in results[broken["command_id"]]["error"]
    assert [str(c.command_id) for c in e.commands] == [fresh["command_id"]]
    assert e.uplink.counters["commands_expired"] == 1
    assert e.uplink.counters["duplicate_commands"] == 1


MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")


@contextlib.contextmanager
def refusing_broker(tmp_path: Path) -> Iterator[str]:
    """A private Mosquitto whose ACL refuses the events topic (and allows the status)."""
    if MOSQUITTO is None:
        pytest.skip("needs the mosquitto binary")
    port = free_port()
    acl = tmp_path / "acl"
    acl.write_text("".join(f"topic readwrite telecare/v1/+/{t}\n" for t in ("status", "commands")))
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {acl}\npersistence false\n"
        # As root, Mosquitto would switch to the mosquitto user, who cannot read tmp_path.
        "user root\n"
    )
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: reachable("127.0.0.1", port), timeout=10, what="mosquitto")
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        broker.terminate()
        broker.wait(timeout=10)


async def test_events_the_broker_refuses_stay_in_the_queue(tmp_path: Path) -> None:
    """MQTT 5: a PUBACK with "not authorised" is not a delivery (aiomqtt would say it is)."""
    with refusing_broker(tmp_path) as url:
        queue = await AsyncEdgeQueue.open(tmp_path / "q.db")
        gateway = new_gateway()
        events = outage_events(gateway, 10, alarm_every=3)
        await queue.put(events)

        async def on_command(command: GatewayCommand) -> CommandResult:
            raise AssertionError("no command expected")

        uplink = Uplink(
            gateway_id=gateway,
            mqtt_url=url,
            queue=queue,
            version="test-1.0",
            on_command=on_command,
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
        )
        task = asyncio.create_task(uplink.run())
        try:
            await until(lambda: uplink.counters["publishes_refused"] >= 3, "three refusals")
            assert (await queue.depth()).total == len(events)
            assert uplink.counters["acked"] == 0
            assert uplink.counters["reconnects"] >= 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await queue.close()


def _command(*, expires_at: datetime) -> dict[str, Any]:
    return {
        "command_id": str(uuid7()),
        "kind": "unlock",
        "device_id": "lock-1",
        "expires_at": expires_at.isoformat(),
    }
