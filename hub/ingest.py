"""MQTT ingest: from ``telecare/v1/+/events`` to committed rows, at least once, end to end.

The subscriber keeps a persistent session (a fixed client id, no clean start) and turns
off automatic acknowledgement: a message is acknowledged (PUBACK) only after the
transaction holding its events has committed. If the hub dies in between, the broker
redelivers the message, and the writer's idempotency on the event id keeps the store
exact. Messages are parsed as they arrive and written in batches bounded by size and by
a short window; a message with an alarm-relevant event flushes at once.

Anything that cannot be stored as an event (bad JSON, an unknown kind, a topic whose
gateway does not match the events, an unregistered gateway) is written to the
quarantine table with the reason and acknowledged like any other message: it is kept,
counted, and never stops the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import psycopg
import psycopg_pool
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from devices.errors import InvalidEventError
from devices.events import DeviceEvent, describe_validation_error, is_identifier, parse_envelope
from devices.events import parse_event as _parse_event
from devices.gateway import CommandResult, GatewayStatus
from hub.metrics import HubMetrics
from hub.settings import IngestSettings, MqttEndpoint
from hub.store.writer import (
    EventWriter,
    FlushRequest,
    FlushResult,
    QuarantineRecord,
    StatusUpdate,
)

log = structlog.get_logger(__name__)

EVENTS_TOPIC = "telecare/v1/+/events"
STATUS_TOPIC = "telecare/v1/+/status"
RESULTS_TOPIC = "telecare/v1/+/command-results"


@dataclass(slots=True)
class Inbound:
    """One MQTT message, parsed, waiting for its flush and then its PUBACK."""

    mid: int
    qos: int
    generation: int
    received_mono: float
    events: list[tuple[DeviceEvent, datetime]] = field(default_factory=list)
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    command_results: list[tuple[str, CommandResult]] = field(default_factory=list)
    urgent: bool = False
    gateway_id: str | None = None
    """The gateway of the topic; every event kept in ``events`` names it."""


def enable_manual_ack(client: aiomqtt.Client) -> None:
    """Turn off paho's automatic PUBACK on an aiomqtt client, before it connects.

    aiomqtt 2.5 has no public way to do this (empicano/aiomqtt#345, PR #346 unmerged);
    paho 2.x has ``manual_ack_set``/``ack``. This function and ``ack`` below are the only
    places that reach into aiomqtt's private paho client.
    """
    client._client.manual_ack_set(True)


def take_messages(client: aiomqtt.Client, handler: Callable[[paho.MQTTMessage], None]) -> None:
    """Have paho hand every message to ``handler`` as it is read off the socket.

    This bypasses aiomqtt's queue and its per-message ``asyncio.wait``, which cost about a
    third of a subscriber's CPU per message (shared/PERFORMANCE.md). ``handler`` runs in
    the event loop's thread, inside the socket read callback, so it must not block.
    """

    def on_message(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        handler(message)

    client._client.on_message = on_message


def ack(client: aiomqtt.Client, mid: int, qos: int) -> None:
    """Send the PUBACK for one received message (QoS 1) or PUBREC (QoS 2)."""
    if qos > 0:
        client._client.ack(mid, qos)


def make_client(
    endpoint: MqttEndpoint, settings: IngestSettings, *, embedded: bool
) -> aiomqtt.Client:
    """An aiomqtt client with a persistent session and manual acknowledgement."""
    use_v5 = settings.protocol == "5" or (settings.protocol == "auto" and not embedded)
    kwargs: dict[str, Any] = {}
    if use_v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = settings.session_expiry_s
        props.ReceiveMaximum = settings.receive_maximum
        kwargs.update(
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props
        )
    else:
        kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=False)
    client = aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=settings.client_id,
        username=endpoint.username,
        password=endpoint.password.get_secret_value() if endpoint.password else None,
        tls_params=aiomqtt.TLSParameters() if endpoint.tls else None,
        keepalive=30,
        timeout=10,
        **kwargs,
    )
    enable_manual_ack(client)
    return client


class Ingest:
    """The subscriber, the batcher and the flusher of one hub process."""

    def __init__(
        self,
        *,
        endpoint: MqttEndpoint,
        settings: IngestSettings,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        metrics: HubMetrics,
        embedded_broker: bool = False,
        writer: EventWriter | None = None,
        on_flush: Callable[[FlushResult], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._embedded = embedded_broker
        self._writer = writer or EventWriter()
        self._on_flush = on_flush
        # Two lanes, each one transaction at a time: telemetry waits up to the batch
        # window to share a commit; a message with an alarm-relevant event is written at
        # once in its own lane, never behind a telemetry batch.
        self._telemetry = _Lane(settings.batch_window_ms / 1000, settings.batch_max_events,
                                self._flush)
        self._alarms = _Lane(0.0, settings.batch_max_events, self._flush)
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self.connected = asyncio.Event()

    # --- the subscriber -------------------------------------------------------------

    async def run(self) -> None:
        """Consume until cancelled; reconnect with backoff when the broker goes away."""
        flushers = [
            asyncio.create_task(self._telemetry.run(), name="ingest-telemetry"),
            asyncio.create_task(self._alarms.run(), name="ingest-alarms"),
        ]
        try:
            await self._consume_forever()
        finally:
            for flusher in flushers:
                flusher.cancel()
            for flusher in flushers:
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher

    async def _consume_forever(self) -> None:
        delay = self._settings.reconnect_min_s
        while True:
            client = make_client(self._endpoint, self._settings, embedded=self._embedded)
            # The handler goes in before CONNECT: a persistent session's queued messages
            # arrive straight after CONNACK, before any SUBSCRIBE.
            self._generation += 1
            self._client = client
            take_messages(client, self._handler(self._generation))
            try:
                async with client:
                    await self._subscribed(client)
                    delay = self._settings.reconnect_min_s
                    # Messages arrive through the handler; this only waits for the
                    # connection to end, which the iterator reports by raising MqttError.
                    # Backpressure is the broker's: it sends at most Receive Maximum
                    # messages that are not yet acknowledged.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                self._disconnected()
                self._metrics.mqtt_reconnects.inc()
                log.warning("mqtt_disconnected", error=str(exc), retry_in_s=round(delay, 2))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, self._settings.reconnect_max_s)

    async def _subscribed(self, client: aiomqtt.Client) -> None:
        events_topic = EVENTS_TOPIC
        if self._settings.shared_group:
            events_topic = f"$share/{self._settings.shared_group}/{EVENTS_TOPIC}"
        results_topic = RESULTS_TOPIC
        if self._settings.shared_group:
            results_topic = f"$share/{self._settings.shared_group}/{RESULTS_TOPIC}"
        await client.subscribe([(events_topic, 1), (STATUS_TOPIC, 1), (results_topic, 1)])
        self.connected.set()
        self._metrics.mqtt_connected.set(1)
        log.info("mqtt_subscribed", topic=events_topic, generation=self._generation)

    def _disconnected(self) -> None:
        self._client = None
        self.connected.clear()
        self._metrics.mqtt_connected.set(0)

    def _handler(self, generation: int) -> Callable[[paho.MQTTMessage], None]:
        received = self._metrics.messages_received

        def handle(message: paho.MQTTMessage) -> None:
            received.inc()
            payload = message.payload
            raw = payload if isinstance(payload, bytes) else bytes(payload)
            self._accept(
                self.parse(message.topic, raw, mid=message.mid, qos=message.qos,
                           generation=generation)
            )

        return handle

    # --- parsing --------------------------------------------------------------------

    def parse(self, topic: str, raw: bytes, *, mid: int, qos: int, generation: int) -> Inbound:
        """Turn one message into what it asks to be written. Never raises."""
        inbound = Inbound(mid=mid, qos=qos, generation=generation,
                          received_mono=time.monotonic())
        parts = topic.split("/")
        if len(parts) != 4 or parts[:2] != ["telecare", "v1"] or not is_identifier(parts[2]):
            self._reject(inbound, topic, raw, "bad_topic", f"unexpected topic {topic!r}")
        elif parts[3] == "events":
            inbound.gateway_id = parts[2]
            self._parse_events(inbound, topic, parts[2], raw)
        elif parts[3] == "status":
            self._parse_status(inbound, topic, parts[2], raw)
        elif parts[3] == "command-results":
            self._parse_result(inbound, topic, parts[2], raw)
        else:
            self._reject(inbound, topic, raw, "bad_topic", f"unexpected topic {topic!r}")
        return inbound

    def _parse_events(self, inbound: Inbound, topic: str, gateway_id: str, raw: bytes) -> None:
        now = datetime.now(UTC)
        try:
            events = parse_envelope(raw).events
        except InvalidEventError as exc:
            if exc.reason in {"invalid_json", "envelope_size"}:
                self._reject(inbound, topic, raw, exc.reason, str(exc), gateway_id)
                return
            events = self._salvage(inbound, topic, gateway_id, raw, exc)
        for event in events:
            if event.gateway_id != gateway_id:
                self._reject(
                    inbound, topic, event.model_dump_json().encode(), "gateway_mismatch",
                    f"event {event.id} names gateway {event.gateway_id!r} but came on the"
                    f" topic of {gateway_id!r}; a gateway may publish only its own events",
                    gateway_id,
                )
                continue
            inbound.events.append((event, now))
            inbound.urgent = inbound.urgent or event.alarm_relevant

    def _salvage(
        self, inbound: Inbound, topic: str, gateway_id: str, raw: bytes, error: InvalidEventError
    ) -> list[DeviceEvent]:
        """An envelope with some bad events: keep the good ones, quarantine each bad one."""
        document = json.loads(raw)  # parse_envelope got past the JSON syntax
        items = document.get("events") if isinstance(document, dict) else None
        if not isinstance(items, list):
            self._reject(inbound, topic, raw, error.reason, str(error), gateway_id)
            return []
        good: list[DeviceEvent] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                self._reject(inbound, topic, json.dumps(item).encode(), "invalid_event",
                             f"events.{index}: an event must be a JSON object", gateway_id)
                continue
            try:
                good.append(_parse_event(item))
            except InvalidEventError as exc:
                self._reject(
                    inbound, topic, json.dumps(item).encode(), exc.reason,
                    f"events.{index}: {exc}", gateway_id,
                )
        return good

    def _parse_status(self, inbound: Inbound, topic: str, gateway_id: str, raw: bytes) -> None:
        if not raw:
            return  # a retained status being cleared: nothing to record
        try:
            status = GatewayStatus.model_validate_json(raw)
        except ValidationError as exc:
            self._reject(
                inbound, topic, raw, "invalid_status", describe_validation_error(exc), gateway_id
            )
            return
        inbound.statuses.append(StatusUpdate(gateway_id, status))

    def _parse_result(self, inbound: Inbound, topic: str, gateway_id: str, raw: bytes) -> None:
        try:
            result = CommandResult.model_validate_json(raw)
        except ValidationError as exc:
            self._reject(
                inbound, topic, raw, "invalid_command_result", describe_validation_error(exc),
                gateway_id,
            )
            return
        inbound.command_results.append((gateway_id, result))
        inbound.urgent = True  # somebody may be waiting at a door for this

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 on the ingest's connection (commands to gateways)."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise ConnectionError("the hub is not connected to the MQTT broker")
        await client.publish(topic, payload, qos=1)

    def _reject(  # noqa: PLR0917 - called a dozen times, always in this order
        self,
        inbound: Inbound,
        topic: str,
        raw: bytes,
        reason: str,
        detail: str,
        gateway_id: str | None = None,
    ) -> None:
        limit = self._settings.quarantine_raw_max_bytes
        inbound.quarantine.append(
            QuarantineRecord(
                topic=topic[:512], reason=reason, detail=detail[:2000],
                payload=raw[:limit], payload_size=len(raw), gateway_id=gateway_id,
            )
        )

    # --- batching and flushing ------------------------------------------------------

    def _accept(self, inbound: Inbound) -> None:
        (self._alarms if inbound.urgent else self._telemetry).add(inbound)
        self._metrics.pending_events.set(self._telemetry.events + self._alarms.events)

    async def _flush(self, batch: list[Inbound]) -> None:
        results = await self._write_with_retry(batch)
        committed, committed_wall = time.monotonic(), datetime.now(UTC)
        client, generation = self._client, self._generation
        for inbound in batch:
            self._metrics.ingest_lag.observe(committed - inbound.received_mono)
            if inbound.events:  # per message, by its first event: cheap enough at any rate
                age = committed_wall - inbound.events[0][0].time
                self._metrics.event_age.observe(age.total_seconds())
            # A message from an earlier connection cannot be acknowledged on this one (its
            # packet id may now name another message); the broker redelivers it and the
            # writer counts it as a duplicate.
            if client is not None and inbound.generation == generation:
                try:
                    ack(client, inbound.mid, inbound.qos)
                except Exception as exc:
                    log.warning("mqtt_ack_failed", error=str(exc))
        for result in results:
            self._record(result)

    def _record(self, result: FlushResult) -> None:
        m = self._metrics
        m.events_ingested.inc(result.inserted)
        m.events_duplicate.inc(result.duplicates)
        m.batch_events.observe(result.inserted + result.duplicates)
        for record in result.quarantined:
            m.messages_quarantined.labels(reason=record.reason).inc()
            log.warning(
                "message_quarantined", reason=record.reason, topic=record.topic,
                gateway_id=record.gateway_id,
            )
        for alarm in result.alarms:
            if alarm.new:
                m.alarms_raised.labels(priority=alarm.priority).inc()
                log.info("alarm_raised", alarm_id=str(alarm.alarm_id), priority=alarm.priority)
            else:
                m.alarm_triggers_joined.inc()
        if self._on_flush is not None:
            self._on_flush(result)

    async def _write_with_retry(self, batch: list[Inbound]) -> list[FlushResult]:
        """Write the batch; retry while the database is away; isolate poison messages."""
        delay = 0.1
        while True:
            try:
                return [await self._write(batch)]
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                log.error("ingest_batch_rejected", error=str(exc), messages=len(batch))
                return [await self._write_alone(inbound) for inbound in batch]
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                self._metrics.flush_errors.inc()
                log.error("ingest_flush_failed", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write(self, batch: list[Inbound]) -> FlushResult:
        request = FlushRequest()
        for inbound in batch:
            request.events.extend(inbound.events)
            if inbound.events and inbound.gateway_id:
                request.gateways.add(inbound.gateway_id)
            request.quarantine.extend(inbound.quarantine)
            request.statuses.extend(inbound.statuses)
            request.command_results.extend(inbound.command_results)
        async with self._pool.connection() as conn:
            return await self._writer.write(conn, request)

    async def _write_alone(self, inbound: Inbound) -> FlushResult:
        """One message in its own transaction; if the database refuses it, quarantine it."""
        while True:
            try:
                return await self._write([inbound])
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                rejected = Inbound(inbound.mid, inbound.qos, inbound.generation, 0.0)
                for event, _ in inbound.events:
                    self._reject(
                        rejected, f"telecare/v1/{event.gateway_id}/events",
                        event.model_dump_json().encode(), "rejected_by_database",
                        str(exc), event.gateway_id,
                    )
                rejected.quarantine.extend(inbound.quarantine)
                inbound = rejected
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                self._metrics.flush_errors.inc()
                log.error("ingest_flush_failed", error=str(exc), retry_in_s=1.0)
                await asyncio.sleep(1.0)


class _Lane:
    """Messages waiting for their transaction, and the loop that writes them in turn.

    A batch is flushed when it holds ``max_events``, or when its oldest message has
    waited ``window_s`` (0: at once). One flush at a time per lane.
    """

    def __init__(
        self,
        window_s: float,
        max_events: int,
        flush: Callable[[list[Inbound]], Awaitable[None]],
    ) -> None:
        self._window = window_s
        self._max_events = max_events
        self._flush = flush
        self._pending: list[Inbound] = []
        self.events = 0
        self._has_work = asyncio.Event()
        self._full = asyncio.Event()

    def add(self, inbound: Inbound) -> None:
        self._pending.append(inbound)
        self.events += len(inbound.events)
        self._has_work.set()
        if self.events >= self._max_events:
            self._full.set()

    async def run(self) -> None:
        while True:
            await self._has_work.wait()
            delay = self._window - (time.monotonic() - self._pending[0].received_mono)
            if delay > 0 and not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), delay)
            batch, self._pending = self._pending, []
            self.events = 0
            self._has_work.clear()
            self._full.clear()
            await self._flush(batch)
