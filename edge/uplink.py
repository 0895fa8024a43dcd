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

Publishing goes through ``edge.mqtt_client.AckingClient``, which keeps each PUBACK's
reason code (its docstring says why ``aiomqtt.Client.publish`` is not enough).
Commands are decided, executed and answered by ``edge.commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import aiomqtt
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from devices.events import MAX_EVENTS_PER_ENVELOPE, is_identifier, make_event
from devices.gateway import CommandResult, GatewayCommand, GatewayStatus
from edge.commands import (
    COMMANDS_WAITING,
    RESULTS_KEPT,
    SEEN_COMMANDS,
    CommandDecision,
    CommandWorker,
    ResultsOutbox,
    decide_command,
)
from edge.errors import QueueError
from edge.mqtt_client import (
    AckingClient,
    Backoff,
    BrokerAddress,
    PublishRefusedError,
    persistent_session,
)
from edge.queue import AsyncEdgeQueue, Priority, QueuedEvent

__all__ = [
    "ALARM_SLOTS",
    "COMMANDS_WAITING",
    "COUNTERS",
    "IDLE_POLL_S",
    "MAX_ENVELOPE_BYTES",
    "MAX_INFLIGHT_BYTES",
    "RESULTS_KEPT",
    "SEEN_COMMANDS",
    "STABLE_SESSION_S",
    "Backoff",
    "BrokerAddress",
    "CommandDecision",
    "Topics",
    "Uplink",
    "build_envelope",
    "decide_command",
]

ALARM_SLOTS = 2
"""Envelopes in flight beyond ``window``, usable by alarm envelopes only."""
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_INFLIGHT_BYTES = 128 * 1024
"""Telemetry bytes awaiting PUBACK (one envelope more may start): what an alarm may find
ahead of it on a slow link. 192 KiB at 1 Mbit/s is 1.6 s; docs/edge-queue.md has more."""
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


# --- pure helpers ---------------------------------------------------------------------


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
        self._results = ResultsOutbox(counters=self.counters, log=self._log)
        self._commands = CommandWorker(
            on_command=on_command, outbox=self._results, counters=self.counters, log=self._log
        )
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
            tasks.create_task(self._commands.run())
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

    def _make_client(self) -> AckingClient:
        kwargs = persistent_session(self._protocol, self._session_expiry_s)
        return AckingClient(
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

    async def _goodbye(self, client: AckingClient) -> None:
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
            raise PublishRefusedError(f"the broker refused {what}: {code}")

    async def _drain(self, client: AckingClient, tasks: asyncio.TaskGroup) -> None:
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
        client: AckingClient,
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

    async def _publish_statuses(self, client: AckingClient) -> None:
        while True:
            await self._status_due.wait()
            self._status_due.clear()
            payload = await self._status_payload("online")
            future = client.publish_start(self.topics.status, payload, retain=True)
            await self._confirmed(future, "the status")
            self.counters["status_published"] += 1

    async def _publish_results(self, client: AckingClient) -> None:
        while True:
            for command_id, result in self._results.pending():
                payload = result.model_dump_json().encode()
                await self._confirmed(
                    client.publish_start(self.topics.results, payload), "a command result"
                )
                self._results.sent(command_id, result)
                self.counters["results_published"] += 1
            await self._results.wait()

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

    async def _receive(self, client: AckingClient) -> None:
        await client.subscribe(self.topics.commands, qos=1)
        self._connected = True
        async for message in client.messages:  # raises MqttError when the connection ends
            if not message.topic.matches(self.topics.commands):
                # Only a broker at fault sends anything else (amqtt 0.12 did); never read
                # another topic's payload as a command.
                self.counters["foreign_messages"] = self.counters.get("foreign_messages", 0) + 1
                continue
            raw = message.payload
            self._commands.received(bytes(raw) if isinstance(raw, bytes | bytearray) else b"")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _describe(exc: BaseException) -> str:
    return "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in _leaves(exc)))


def _expected(exc: BaseException) -> bool:
    """Outages and refusals, logged without a traceback; anything else is a bug."""
    return all(isinstance(e, aiomqtt.MqttError | QueueError | OSError) for e in _leaves(exc))
