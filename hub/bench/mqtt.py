"""MQTT clients of the bench: the publisher, the bare baseline subscriber, the broker's
``$SYS`` facts and the inflight-window check."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hub.bench.plan import BROKER_WINDOW
from hub.settings import MqttEndpoint


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
