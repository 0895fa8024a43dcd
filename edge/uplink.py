"""The edge's uplink: drains the durable queue to the hub broker, and takes commands.

Topics (ARCHITECTURE.md), for gateway ``gw``:

- ``telecare/v1/gw/events``: ``{"events": [...]}`` envelopes of 1 to 500 events, QoS 1.
  Events are deleted from the queue only after the PUBACK of the envelope that carried
  them; on reconnect everything not deleted is sent again (the hub de-duplicates on id).
- ``telecare/v1/gw/status``: retained ``GatewayStatus``: ``online`` at connect and on each
  heartbeat; the last will is ``{"state":"offline"}``, retained.
- ``telecare/v1/gw/commands`` in, ``telecare/v1/gw/command-results`` out, QoS 1.

Draining: envelopes hold events of one priority only, alarms ahead of telemetry, oldest
first. Up to ``window`` telemetry envelopes (and about ``max_inflight_bytes``) are in
flight at once, and ``ALARM_SLOTS`` more are kept for alarm envelopes, so an alarm put
during a long telemetry drain goes out in the next publish without waiting for any
telemetry PUBACK, behind at most that many bytes.

Why not ``aiomqtt.Client.publish``: it does return only after the PUBACK for QoS 1 (it
waits for paho's ``on_publish``, which paho calls on PUBACK for QoS > 0), but it drops
the PUBACK's reason code. Under MQTT 5 a broker that refuses a message (not authorised,
quota exceeded) still answers with a PUBACK, and an edge that took that as delivery
would delete events the broker threw away. ``_AckingClient`` below keeps the reason
code; it and ``hub.ingest`` are the places that reach into aiomqtt's private parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Self
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import UUID7, TypeAdapter, ValidationError

from devices.events import (
    MAX_EVENTS_PER_ENVELOPE,
    describe_validation_error,
    is_identifier,
    make_event,
)
from devices.gateway import CommandResult, GatewayCommand, GatewayStatus
from edge.queue import AsyncEdgeQueue, Priority, QueuedEvent, QueueError

ALARM_SLOTS = 2
"""Envelopes in flight beyond ``window``, usable by alarm envelopes only."""
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_INFLIGHT_BYTES = 128 * 1024
"""Telemetry bytes awaiting PUBACK (one envelope more may start): what an alarm may find
ahead of it on a slow link. 192 KiB at 1 Mbit/s is 1.6 s; docs/edge-queue.md has more."""
RESULTS_KEPT = 1_000
"""Command results waiting for a connection; beyond this the oldest is dropped."""
COMMANDS_WAITING = 64
SEEN_COMMANDS = 1_024
IDLE_POLL_S = 1.0
"""The drain looks at the queue at least this often, even if nobody calls notify()."""
STABLE_SESSION_S = 30.0
"""A session that lasted this long resets the reconnect backoff."""

# fmt: off
COUNTERS = (
    "connects", "reconnects", "connect_failures", "published", "events_published", "acked",
    "events_acked", "publishes_refused", "publish_timeouts", "status_published", "heartbeats",
    "commands_received", "commands_executed", "commands_failed", "commands_expired",
    "invalid_commands", "duplicate_commands", "commands_busy", "results_published",
    "results_dropped",
)
# fmt: on
"""The keys of ``Uplink.counters``: envelopes (published, acked) and events are both counted."""

_OFFLINE = GatewayStatus(state="offline").model_dump_json(exclude_none=True).encode()
_UUID7: TypeAdapter[Any] = TypeAdapter(UUID7)


# --- pure helpers ---------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class Topics:
    events: str
    status: str
    commands: str
    results: str

    @classmethod
    def of(cls, gateway_id: str) -> Topics:
        base = f"telecare/v1/{gateway_id}"
        return cls(
            f"{base}/events", f"{base}/status", f"{base}/commands", f"{base}/command-results"
        )


def build_envelope(
    batch: Sequence[QueuedEvent], *, max_bytes: int = MAX_ENVELOPE_BYTES
) -> tuple[bytes, list[QueuedEvent]]:
    """The next envelope from the head of ``batch``: one priority, at most 500 events and
    (unless a single event is larger) ``max_bytes``. Returns the payload and its events."""
    if not batch:
        raise ValueError("no events for an envelope")
    chosen: list[QueuedEvent] = []
    size = len(b'{"events":[]}')
    for item in batch[:MAX_EVENTS_PER_ENVELOPE]:
        if item.priority != batch[0].priority or (chosen and size + item.size + 1 > max_bytes):
            break
        chosen.append(item)
        size += item.size + 1
    payload = b'{"events":[' + b",".join(item.body.encode() for item in chosen) + b"]}"
    return payload, chosen


@dataclass(frozen=True, slots=True)
class CommandDecision:
    """What to do with one message on the commands topic."""

    command: GatewayCommand | None = None
    """Set if the command is to be executed."""
    result: CommandResult | None = None
    """Set if the edge answers at once (invalid or expired)."""
    reason: Literal["invalid", "expired"] | None = None
    error: str | None = None


def decide_command(raw: bytes, *, now: datetime) -> CommandDecision:
    """Validate a command and check its expiry. Pure: ``now`` is the gateway's clock."""
    try:
        command = GatewayCommand.model_validate_json(raw)
    except ValidationError as exc:
        error = describe_validation_error(exc)[:500]
        command_id = _readable_command_id(raw)
        result = None
        if command_id is not None:
            result = CommandResult(command_id=command_id, ok=False, error=error, time=now)
        return CommandDecision(result=result, reason="invalid", error=error)
    if command.expires_at <= now:
        result = CommandResult(command_id=command.command_id, ok=False, error="expired", time=now)
        return CommandDecision(result=result, reason="expired", error="expired")
    return CommandDecision(command=command)


def _readable_command_id(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
        return _UUID7.validate_python(data.get("command_id")) if isinstance(data, dict) else None
    except (ValueError, RecursionError):  # ValidationError is a ValueError
        return None


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


# --- the MQTT client ------------------------------------------------------------------


class _PublishRefusedError(aiomqtt.MqttError):
    """The broker answered a PUBACK with a failure reason code (MQTT 5)."""


class _AckingClient(aiomqtt.Client):
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


@dataclass(slots=True)
class _Flight:
    """Envelopes of one session awaiting their PUBACK."""

    seqs: set[int] = field(default_factory=set)
    alarm: int = 0
    telemetry: int = 0
    telemetry_bytes: int = 0

    def change(self, seqs: list[int], *, alarm: bool, size: int, sign: Literal[1, -1]) -> None:
        if sign > 0:
            self.seqs.update(seqs)
        else:
            self.seqs.difference_update(seqs)
        if alarm:
            self.alarm += sign
        else:
            self.telemetry += sign
            self.telemetry_bytes += sign * size


# --- the uplink -----------------------------------------------------------------------


class Uplink:
    """Forwards the queue to the hub broker and executes the hub's commands.

    ``run()`` runs until cancelled, reconnecting with exponential backoff and jitter.
    ``notify()`` (call it from the event loop's thread after a ``put``) wakes the drain.
    ``counters`` counts what happened; ``connected`` says whether a session is up (and
    subscribed to the commands topic).
    """

    def __init__(
        self,
        *,
        gateway_id: str,
        mqtt_url: str,
        queue: AsyncEdgeQueue,
        version: str,
        on_command: Callable[[GatewayCommand], Awaitable[CommandResult]],
        protocol: Literal["5", "3.1.1"] = "5",
        window: int = 8,
        heartbeat_s: float = 30.0,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        keepalive_s: int = 30,
        connect_timeout_s: float = 10.0,
        publish_timeout_s: float = 60.0,
        session_expiry_s: int = 86_400,
        max_envelope_bytes: int = MAX_ENVELOPE_BYTES,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        client_id: str | None = None,
    ) -> None:
        if not is_identifier(gateway_id):
            raise ValueError(f"gateway_id {gateway_id!r} is not a valid identifier")
        if window < 1 or heartbeat_s <= 0 or keepalive_s < 1:
            raise ValueError("window, heartbeat_s and keepalive_s must be positive")
        GatewayStatus(state="online", version=version)  # refuses a version too long
        self.gateway_id = gateway_id
        self._broker = BrokerAddress.from_url(mqtt_url)
        self._queue = queue
        self._version = version
        self._on_command = on_command
        self._protocol = protocol
        self._window = window
        self._heartbeat_s = heartbeat_s
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._session_expiry_s = session_expiry_s
        self._max_envelope_bytes = max_envelope_bytes
        self._max_inflight_bytes = max_inflight_bytes
        self._client_id = client_id or f"telecare-edge-{gateway_id}"
        self.topics = Topics.of(gateway_id)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._log = structlog.get_logger().bind(gateway_id=gateway_id)
        self._wake = asyncio.Event()
        self._status_due = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._results: OrderedDict[Any, CommandResult] = OrderedDict()
        self._seen_commands: OrderedDict[Any, None] = OrderedDict()
        self._commands: asyncio.Queue[GatewayCommand] = asyncio.Queue(COMMANDS_WAITING)
        self._connected = False
        self._started = time.monotonic()

    @property
    def connected(self) -> bool:
        return self._connected

    def notify(self) -> None:
        """Wake the drain loop: new events are in the queue."""
        self._wake.set()

    async def run(self) -> None:
        self._started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._heartbeats())
            tasks.create_task(self._execute_commands())
            tasks.create_task(self._sessions())

    # --- connection lifecycle ---------------------------------------------------------

    async def _sessions(self) -> None:
        this = asyncio.current_task()
        while True:
            started, reason = time.monotonic(), "session ended"
            # Its own task: on 3.11 a TaskGroup whose child fails while the group is already
            # exiting leaves its task's cancelling() count raised, so only this outer task's
            # count says reliably whether *we* were cancelled.
            session = asyncio.create_task(self._session())
            try:
                await session
            except Exception as exc:  # every failure ends in a reconnect
                if this is not None and this.cancelling():
                    raise asyncio.CancelledError from exc  # cancelled as the session failed
                reason = _describe(exc)
                if not _expected(exc):
                    self._log.error("uplink_session_failed", reason=reason, exc_info=exc)
            if time.monotonic() - started >= STABLE_SESSION_S:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            self._log.warning("uplink_down", reason=reason, retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        client = self._make_client()
        try:
            await client.__aenter__()
        except aiomqtt.MqttError:
            self.counters["connect_failures"] += 1
            raise
        try:
            self._begin_session()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive(client))
                tasks.create_task(self._drain(client, tasks))
                tasks.create_task(self._publish_statuses(client))
                tasks.create_task(self._publish_results(client))
        except asyncio.CancelledError:
            await self._goodbye(client)
            raise
        except BaseException:
            await client.drop()  # no DISCONNECT: the broker publishes our will
            raise
        finally:
            self._connected = False
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    def _begin_session(self) -> None:
        if self.counters["connects"]:
            self.counters["reconnects"] += 1
        self.counters["connects"] += 1
        self._status_due.set()
        self._wake.set()
        self._log.info("uplink_connected", broker=f"{self._broker.host}:{self._broker.port}")

    def _make_client(self) -> _AckingClient:
        kwargs: dict[str, Any]
        if self._protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry_s
            kwargs = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": False,
                "properties": props,
            }
        else:
            kwargs = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
        return _AckingClient(
            self._broker.host,
            self._broker.port,
            username=self._broker.username,
            password=self._broker.password,
            tls_params=aiomqtt.TLSParameters() if self._broker.tls else None,
            identifier=self._client_id,
            keepalive=self._keepalive_s,
            timeout=self._connect_timeout_s,
            will=aiomqtt.Will(self.topics.status, _OFFLINE, qos=1, retain=True),
            max_inflight_messages=self._window + ALARM_SLOTS + 4,
            max_queued_incoming_messages=1_000,
            **kwargs,
        )

    async def _goodbye(self, client: _AckingClient) -> None:
        """On shutdown: say offline ourselves, since a clean DISCONNECT skips the will."""
        with contextlib.suppress(Exception):
            payload = await self._status_payload("offline")
            await asyncio.wait_for(
                client.publish_start(self.topics.status, payload, retain=True), timeout=2.0
            )

    # --- publishing -------------------------------------------------------------------

    async def _confirmed(self, future: asyncio.Future[ReasonCode], what: str) -> None:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self._publish_timeout_s):
                code = await future
        except TimeoutError:
            self.counters["publish_timeouts"] += 1
            raise aiomqtt.MqttError(f"no PUBACK for {what} in {self._publish_timeout_s}s") from None
        if code.is_failure:
            self.counters["publishes_refused"] += 1
            self._log.error("uplink_publish_refused", what=what, reason_code=str(code))
            raise _PublishRefusedError(f"the broker refused {what}: {code}")

    async def _drain(self, client: _AckingClient, tasks: asyncio.TaskGroup) -> None:
        flight = _Flight()
        while True:
            self._wake.clear()
            if flight.alarm + flight.telemetry < self._window + ALARM_SLOTS:
                batch = await self._queue.peek(MAX_EVENTS_PER_ENVELOPE, exclude=flight.seqs)
                telemetry_may_go = (
                    flight.telemetry < self._window
                    and flight.telemetry_bytes < self._max_inflight_bytes
                )
                if batch and (batch[0].priority == Priority.ALARM or telemetry_may_go):
                    self._start_envelope(client, tasks, flight, batch)
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL_S):
                    await self._wake.wait()

    def _start_envelope(
        self,
        client: _AckingClient,
        tasks: asyncio.TaskGroup,
        flight: _Flight,
        batch: list[QueuedEvent],
    ) -> None:
        payload, events = build_envelope(batch, max_bytes=self._max_envelope_bytes)
        future = client.publish_start(self.topics.events, payload)
        seqs = [item.seq for item in events]
        alarm = events[0].priority == Priority.ALARM
        flight.change(seqs, alarm=alarm, size=len(payload), sign=1)
        self.counters["published"] += 1
        self.counters["events_published"] += len(seqs)
        tasks.create_task(self._settle(future, flight, seqs, alarm=alarm, size=len(payload)))

    async def _settle(
        self,
        future: asyncio.Future[ReasonCode],
        flight: _Flight,
        seqs: list[int],
        *,
        alarm: bool,
        size: int,
    ) -> None:
        await self._confirmed(future, f"an envelope of {len(seqs)} events")
        self.counters["acked"] += 1
        self.counters["events_acked"] += len(seqs)
        await self._queue.delete(seqs)  # before leaving the flight, so no peek resends them
        flight.change(seqs, alarm=alarm, size=size, sign=-1)
        self._wake.set()

    async def _status_payload(self, state: Literal["online", "offline"]) -> bytes:
        depth = await self._queue.depth()
        status = GatewayStatus(
            state=state, time=datetime.now(UTC), version=self._version, queue_depth=depth.total
        )
        return status.model_dump_json(exclude_none=True).encode()

    async def _publish_statuses(self, client: _AckingClient) -> None:
        while True:
            await self._status_due.wait()
            self._status_due.clear()
            payload = await self._status_payload("online")
            future = client.publish_start(self.topics.status, payload, retain=True)
            await self._confirmed(future, "the status")
            self.counters["status_published"] += 1

    async def _publish_results(self, client: _AckingClient) -> None:
        while True:
            self._results_ready.clear()
            for command_id, result in list(self._results.items()):
                payload = result.model_dump_json().encode()
                await self._confirmed(
                    client.publish_start(self.topics.results, payload), "a command result"
                )
                if self._results.get(command_id) is result:
                    del self._results[command_id]
                self.counters["results_published"] += 1
            if not self._results:
                await self._results_ready.wait()

    # --- heartbeats -------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                depth = await self._queue.depth()
                now = datetime.now(UTC)
                event = make_event(
                    "heartbeat",
                    gateway_id=self.gateway_id,
                    device_id=self.gateway_id,
                    device_type="gateway",
                    time=now,
                    gateway_time=now,
                    payload={
                        "uptime_s": int(time.monotonic() - self._started),
                        "queue_depth": depth.total,
                    },
                )
                await self._queue.put([event])
            except QueueError as exc:
                self._log.error("heartbeat_not_queued", error=str(exc))
            else:
                self.counters["heartbeats"] += 1
            self.notify()
            self._status_due.set()

    # --- commands ---------------------------------------------------------------------

    async def _receive(self, client: _AckingClient) -> None:
        await client.subscribe(self.topics.commands, qos=1)
        self._connected = True
        async for message in client.messages:  # raises MqttError when the connection ends
            raw = message.payload
            self._command_received(bytes(raw) if isinstance(raw, bytes | bytearray) else b"")

    def _command_received(self, raw: bytes) -> None:
        self.counters["commands_received"] += 1
        decision = decide_command(raw, now=datetime.now(UTC))
        if decision.reason is not None:
            key = "invalid_commands" if decision.reason == "invalid" else "commands_expired"
            self.counters[key] += 1
            command_id = decision.result.command_id if decision.result else None
            self._log.warning(
                f"command_{decision.reason}", command_id=str(command_id), error=decision.error
            )
        if decision.result is not None:
            self._answer(decision.result)
        command = decision.command
        if command is None:
            return
        if command.command_id in self._seen_commands:
            self.counters["duplicate_commands"] += 1
            return
        self._seen_commands[command.command_id] = None
        if len(self._seen_commands) > SEEN_COMMANDS:
            self._seen_commands.popitem(last=False)
        try:
            self._commands.put_nowait(command)
        except asyncio.QueueFull:
            self.counters["commands_busy"] += 1
            self._refuse(command, "busy")

    async def _execute_commands(self) -> None:
        """One at a time, outside any session: a lost connection never cancels a command."""
        while True:
            command = await self._commands.get()
            if command.expires_at <= datetime.now(UTC):  # it waited behind others
                self.counters["commands_expired"] += 1
                self._refuse(command, "expired")
                continue
            log = self._log.bind(command_id=str(command.command_id), kind=command.kind)
            try:
                result = await self._on_command(command)
            except Exception as exc:  # a failing handler is answered, not fatal
                self.counters["commands_failed"] += 1
                log.error("command_failed", error_type=type(exc).__name__, exc_info=exc)
                self._refuse(command, f"{type(exc).__name__}: {exc}")
            else:
                self.counters["commands_executed"] += 1
                log.info("command_executed", ok=result.ok)
                self._answer(result)

    def _refuse(self, command: GatewayCommand, error: str) -> None:
        self._answer(
            CommandResult(
                command_id=command.command_id, ok=False, error=error[:500], time=datetime.now(UTC)
            )
        )

    def _answer(self, result: CommandResult) -> None:
        self._results[result.command_id] = result
        if len(self._results) > RESULTS_KEPT:
            dropped, _ = self._results.popitem(last=False)
            self.counters["results_dropped"] += 1
            self._log.warning("command_result_dropped", command_id=str(dropped))
        self._results_ready.set()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _describe(exc: BaseException) -> str:
    return "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in _leaves(exc)))


def _expected(exc: BaseException) -> bool:
    """Outages and refusals, logged without a traceback; anything else is a bug."""
    return all(isinstance(e, aiomqtt.MqttError | QueueError | OSError) for e in _leaves(exc))
