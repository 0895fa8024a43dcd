"""MQTT pieces the edge's connections share: broker addresses, backoff, an acking client.

Why not ``aiomqtt.Client.publish``: it does return only after the PUBACK for QoS 1 (it
waits for paho's ``on_publish``, which paho calls on PUBACK for QoS > 0), but it drops
the PUBACK's reason code. Under MQTT 5 a broker that refuses a message (not authorised,
quota exceeded) still answers with a PUBACK, and an edge that took that as delivery
would delete events the broker threw away. ``AckingClient`` below keeps the reason
code; it and ``hub.ingest`` are the places that reach into aiomqtt's private parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        """``mqtt://[user:password@]host[:port]`` or ``mqtts://`` (TLS, port 8883)."""
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
            raise ValueError("the MQTT URL must look like mqtt://[user:pass@]host[:port]")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )


class Backoff:
    """Exponential backoff with jitter: the n-th delay is uniform in [d/2, d], d = min·2ⁿ."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        self._min_s, self._max_s = min_s, max_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._max_s, self._min_s * 2 ** min(self._attempt, 60))
        self._attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class PublishRefusedError(aiomqtt.MqttError):
    """The broker answered a PUBACK with a failure reason code (MQTT 5)."""


class AckingClient(aiomqtt.Client):
    """aiomqtt's client plus a publish whose future carries the PUBACK reason code, and a
    way to drop the connection without DISCONNECT (so the broker sends our will)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        # We learn of a lost connection from the message iterator or a failed publish; this
        # marks the disconnection's error as seen, so asyncio never logs it as unretrieved.
        self._disconnected.add_done_callback(
            lambda future: None if future.cancelled() else future.exception()
        )
        return self

    def publish_start(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> asyncio.Future[ReasonCode]:
        """Hand a QoS 1 PUBLISH to paho now (so calls go out in call order); the future
        resolves at its PUBACK. paho reads only in the loop's reader callback, so the
        PUBACK cannot be processed before the future is registered."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        future: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
        mid = info.mid
        self._acks[mid] = future
        future.add_done_callback(lambda done: self._forget(mid, done))
        return future

    def _forget(self, mid: int, future: asyncio.Future[ReasonCode]) -> None:
        if self._acks.get(mid) is future:  # a cancelled wait; the PUBACK already popped it
            del self._acks[mid]

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def drop(self) -> None:
        """Shut the socket down without DISCONNECT and wait (≤ 1 s) for paho to notice."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _ in range(40):
            if self._disconnected.done():
                break
            await asyncio.sleep(0.025)


def persistent_session(protocol: str, session_expiry_s: int) -> dict[str, Any]:
    """aiomqtt.Client keyword arguments for a session the broker keeps across reconnects:
    MQTT 5 without clean start and with a session expiry, or 3.1.1 without clean session."""
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        return {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": False, "properties": props}
    return {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
