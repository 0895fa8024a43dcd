"""The edge's Zigbee2MQTT driver: sensors and door locks on the home's local broker.

``Zigbee2MqttDriver.run()`` connects to the local broker (usually Mosquitto on the
gateway, which Zigbee2MQTT publishes to), subscribes to ``<base_topic>/#`` at QoS 1 and
feeds every message to ``devices.zigbee2mqtt.Zigbee2MqttTranslator``. The events it
returns are handed to ``sink`` (the durable queue), in the order they were made. If the
sink raises, the error is logged and re-raised out of ``run()``: losing events silently
is worse than a restart. A malformed message is counted under its reason, logged at
warning without its payload (it may hold personal data) and skipped.

Choices:

- **Session.** A fixed client id and a persistent session (``clean_session=False``, or
  MQTT 5 ``clean_start=False`` with a session expiry), so QoS 1 messages the bridge
  publishes while the edge is briefly away are kept by the broker and delivered on
  reconnect. Reconnects use exponential backoff with jitter.
- **Signs of life.** ``on_seen(device_id, now)`` is called for a live state message and a
  live availability ``online`` from a bound device, after its events are stored. Not for
  a retained message (the broker replays it on every subscribe; it may be hours old) and
  not for availability ``offline`` (the bridge saying a device is gone is no sign of
  life). Like the sink, an ``on_seen`` that raises ends ``run()``.
- **The bridge.** ``<base>/bridge/state`` (``{"state": "offline"}`` or plain ``offline``,
  often the bridge's last will) makes every bound device that is not already reported
  offline ``device_offline`` (once); ``online`` brings those same devices back with
  ``device_online``. Availability events are de-duplicated per device, so the bridge's
  and the devices' own availability reports never contradict each other.
- **Lock commands.** ``execute(command)`` publishes ``{"state": "UNLOCK"}`` (or ``LOCK``)
  and waits for the lock to report that position, or for ``min(expires_at, now +
  timeout_s)``. The ``locked`` / ``unlocked`` event that confirms it carries the
  command's id in ``payload.command_id`` (only when its source is ``remote`` or
  ``unknown``: a keypad unlock at the same moment is someone else's). A jam, or an
  ``unlock_failed`` from a remote source, fails the command at once. The confirmation
  logic is in ``edge.drivers.zigbee2mqtt_commands``.

``counters`` adds the translator's counts (per parse-error reason, ``unknown_device``,
``ignored_*``) to the driver's: ``messages``, ``retained_messages``, ``events``,
``sink_errors``, ``internal_errors``, ``connects``, ``reconnects``, ``connect_failures``,
``disconnects``, ``bridge_offline``, ``bridge_online``, ``invalid_bridge_state``,
``duplicate_availability``, ``commands``, ``commands_confirmed``, ``commands_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import aiomqtt
import structlog

from devices.events import DeviceEvent, DeviceType, EventKind, parse_event
from devices.gateway import CommandResult, GatewayCommand
from devices.ids import uuid7
from devices.zigbee2mqtt import (
    DeviceBinding,
    Zigbee2MqttError,
    Zigbee2MqttTranslator,
    lock_command,
    parse_topic,
)
from devices.zigbee2mqtt.codec import DeviceTopic, parse_availability, parse_state
from devices.zigbee2mqtt.translator import DEFAULT_JAM_AFTER
from edge.config_devices import Zigbee2MqttConfig
from edge.drivers.zigbee2mqtt_commands import ACTIONS, Pending, Position, Settle, confirm
from edge.mqtt_client import Backoff, persistent_session

__all__ = [
    "NOT_CONNECTED",
    "STABLE_SESSION_S",
    "MqttProtocol",
    "Position",
    "Sink",
    "Zigbee2MqttDriver",
]

log = structlog.get_logger(__name__)

Sink = Callable[[list[DeviceEvent]], Awaitable[None]]
"""Stores events durably; returns only once they are stored, raises if they are not."""

MqttProtocol = Literal["3.1.1", "5"]

STABLE_SESSION_S = 30.0
"""A session that lasted this long resets the reconnect backoff."""

NOT_CONNECTED = "not connected to the local Zigbee2MQTT broker"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Zigbee2MqttDriver:
    """One Zigbee2MQTT bridge on the home's local broker; see the module docstring."""

    def __init__(
        self,
        config: Zigbee2MqttConfig,
        *,
        gateway_id: str,
        sink: Sink,
        on_seen: Callable[[str, datetime], None] | None = None,
        clock: Callable[[], datetime] = _utc_now,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        protocol: MqttProtocol = "3.1.1",
        timeout_s: float = 15.0,
        tick_interval_s: float = 5.0,
        keepalive_s: int = 30,
        connect_timeout_s: float = 10.0,
        session_expiry_s: int = 86_400,
        jam_after: timedelta = DEFAULT_JAM_AFTER,
        client_id: str | None = None,
    ) -> None:
        if timeout_s <= 0 or tick_interval_s <= 0 or keepalive_s < 1:
            raise ValueError("timeout_s, tick_interval_s and keepalive_s must be positive")
        self._config = config
        self._base = config.base_topic
        self._bindings = {
            device.friendly_name: DeviceBinding(device.device_id, device.device_type, device.room)
            for device in config.devices
        }
        self._names = {binding.device_id: name for name, binding in self._bindings.items()}
        self._translator = Zigbee2MqttTranslator(
            gateway_id, self._bindings, base_topic=self._base, jam_after=jam_after
        )
        self.gateway_id = gateway_id
        self._sink = sink
        self._on_seen = on_seen
        self._clock = clock
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self._protocol: MqttProtocol = protocol
        self.timeout_s = timeout_s
        self.tick_interval_s = tick_interval_s
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._session_expiry_s = session_expiry_s
        self._client_id = client_id or f"telecare-edge-{gateway_id}-zigbee2mqtt"
        self._counts: Counter[str] = Counter()
        self._client: aiomqtt.Client | None = None
        self._order = asyncio.Lock()
        self._pending: dict[str, Pending] = {}
        self._last_heard: dict[str, datetime] = {}
        self._reported_offline: set[str] = set()
        self._offline_by_bridge: set[str] = set()
        self._bridge_online: bool | None = None

    # --- public surface ---------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """The translator's counts and the driver's, in one dict."""
        return {**self._translator.counters, **self._counts}

    @property
    def connected(self) -> bool:
        """True while a session with the local broker is up and subscribed."""
        return self._client is not None

    def handles(self, device_id: str) -> bool:
        """Is this device bound to a friendly name on this bridge?"""
        return device_id in self._names

    async def run(self) -> None:
        """Serve the bridge until cancelled; raises what the sink raised."""
        tasks = {asyncio.create_task(self._sessions()), asyncio.create_task(self._ticks())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def execute(self, command: GatewayCommand) -> CommandResult:
        """Carry out a ``lock`` / ``unlock`` command and wait for the lock to confirm it."""
        self._counts["commands"] += 1
        error = await self._execute(command)
        self._counts["commands_failed" if error else "commands_confirmed"] += 1
        log.info(
            "zigbee2mqtt_command_done",
            command_id=str(command.command_id),
            kind=command.kind,
            device_id=command.device_id,
            ok=error is None,
            error=error,
        )
        return CommandResult(
            command_id=command.command_id, ok=error is None, error=error, time=self._clock()
        )

    # --- commands ---------------------------------------------------------------------

    def _refusal(self, command: GatewayCommand, now: datetime) -> str | None:
        if command.expires_at <= now:
            return "expired"
        if command.kind not in ACTIONS:
            return "not a Zigbee2MQTT command"
        name = self._names.get(command.device_id)
        if name is None or self._bindings[name].device_type is not DeviceType.DOOR_LOCK:
            return f"device {command.device_id} is not a door lock on this gateway"
        return None

    async def _execute(self, command: GatewayCommand) -> str | None:
        """None if the lock confirmed, else why not."""
        now = self._clock()
        refusal = self._refusal(command, now)
        if refusal is not None:
            return refusal
        client = self._client
        if client is None:
            return NOT_CONNECTED
        action, position = ACTIONS[command.kind]
        limit = timedelta(seconds=self.timeout_s)
        expires_first = command.expires_at < now + limit
        wait_s = ((command.expires_at - now) if expires_first else limit).total_seconds()
        outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        pending = Pending(command.command_id, position, outcome)
        earlier = self._pending.get(command.device_id)
        if earlier is not None and not earlier.outcome.done():
            earlier.outcome.set_result(f"superseded by command {command.command_id}")
        self._pending[command.device_id] = pending
        topic, payload = lock_command(self._names[command.device_id], action, self._base)
        try:
            async with asyncio.timeout(wait_s):
                await client.publish(topic, payload, qos=1)
                return await outcome
        except aiomqtt.MqttError as exc:
            return f"{NOT_CONNECTED} ({exc})"[:500]
        except TimeoutError:
            if expires_first:
                return "no confirmation from the lock before the command expired"
            return f"no confirmation from the lock within {self.timeout_s:g} s"
        finally:
            if self._pending.get(command.device_id) is pending:
                del self._pending[command.device_id]

    # --- the connection ---------------------------------------------------------------

    async def _sessions(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                reason = str(exc) or type(exc).__name__
            else:  # pragma: no cover - a session ends only by an exception
                reason = "session ended"
            if loop.time() - started >= STABLE_SESSION_S:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.warning(
                "zigbee2mqtt_broker_down",
                broker=f"{self._config.host}:{self._config.port}",
                reason=reason,
                retry_in_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        client = self._make_client()
        try:
            await client.__aenter__()
        except aiomqtt.MqttError:
            self._counts["connect_failures"] += 1
            raise
        try:
            await client.subscribe(f"{self._base}/#", qos=1)
            if self._counts["connects"]:
                self._counts["reconnects"] += 1
            self._counts["connects"] += 1
            self._client = client
            log.info("zigbee2mqtt_connected", broker=f"{self._config.host}:{self._config.port}")
            async for message in client.messages:  # raises MqttError when the link ends
                await self._message_received(message)
        except aiomqtt.MqttError:
            self._counts["disconnects"] += 1
            raise
        finally:
            self._client = None
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    def _make_client(self) -> aiomqtt.Client:
        kwargs = persistent_session(self._protocol, self._session_expiry_s)
        password = self._config.password
        return aiomqtt.Client(
            self._config.host,
            self._config.port,
            username=self._config.username,
            password=password.get_secret_value() if password is not None else None,
            tls_params=aiomqtt.TLSParameters() if self._config.tls else None,
            identifier=self._client_id,
            keepalive=self._keepalive_s,
            timeout=self._connect_timeout_s,
            **kwargs,
        )

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval_s)
            async with self._order:
                await self._deliver(self._translator.tick(self._clock()))

    # --- messages ---------------------------------------------------------------------

    async def _message_received(self, message: aiomqtt.Message) -> None:
        raw = message.payload
        payload = bytes(raw) if isinstance(raw, bytes | bytearray) else b""  # paho: bytes
        topic = message.topic.value
        self._counts["messages"] += 1
        if message.retain:
            self._counts["retained_messages"] += 1
        async with self._order:
            now = self._clock()
            if topic == f"{self._base}/bridge/state":
                await self._bridge_state(payload, now)
                return
            try:
                events, alive, settle = self._translate(topic, payload, now)
            except Zigbee2MqttError as exc:  # counted by the translator under its reason
                device_id = self._device_of(topic)
                log.warning("zigbee2mqtt_message_rejected", reason=exc.reason, device_id=device_id)
                return
            except Exception as exc:  # a bug must not stop the alarms of every other device
                self._counts["internal_errors"] += 1
                log.error("zigbee2mqtt_message_failed", error=type(exc).__name__, exc_info=exc)
                return
            await self._deliver(events)
        if settle is not None and not settle.pending.outcome.done():
            settle.pending.outcome.set_result(settle.error)
        if alive is not None and not message.retain:  # a replayed message may be hours old
            self._last_heard[alive] = now
            if self._on_seen is not None:
                self._on_seen(alive, now)

    def _translate(
        self, topic: str, payload: bytes, now: datetime
    ) -> tuple[list[DeviceEvent], str | None, Settle | None]:
        """The message's events, the device it shows alive (if any), a command it settles."""
        events = self._translator.handle(topic, payload, now)
        route = parse_topic(topic, base_topic=self._base)  # it parsed in handle()
        if not isinstance(route, DeviceTopic) or not payload:
            return self._availability(events), None, None
        binding = self._bindings.get(route.friendly_name)
        if binding is None:
            return self._availability(events), None, None
        alive, settle = True, None
        if route.kind == "availability":
            alive = parse_availability(payload)[0]
        elif binding.device_type is DeviceType.DOOR_LOCK:
            settle = confirm(self._pending.get(binding.device_id), parse_state(payload), events)
        return self._availability(events), binding.device_id if alive else None, settle

    def _device_of(self, topic: str) -> str | None:
        try:
            route = parse_topic(topic, base_topic=self._base)
        except Zigbee2MqttError:
            return None
        if not isinstance(route, DeviceTopic) or route.friendly_name not in self._bindings:
            return None
        return self._bindings[route.friendly_name].device_id

    async def _deliver(self, events: list[DeviceEvent]) -> None:
        if not events:
            return
        try:
            await self._sink(events)
        except Exception as exc:
            self._counts["sink_errors"] += 1
            log.error("zigbee2mqtt_sink_failed", error=type(exc).__name__, events=len(events))
            raise
        self._counts["events"] += len(events)

    # --- availability and the bridge --------------------------------------------------

    def _availability(self, events: list[DeviceEvent]) -> list[DeviceEvent]:
        """Drop a device_offline / device_online that repeats what was already reported."""
        kept = []
        for event in events:
            if event.kind in (EventKind.DEVICE_OFFLINE, EventKind.DEVICE_ONLINE):
                offline = event.kind == EventKind.DEVICE_OFFLINE
                self._offline_by_bridge.discard(event.device_id)
                if offline == (event.device_id in self._reported_offline):
                    self._counts["duplicate_availability"] += 1
                    continue
                if offline:
                    self._reported_offline.add(event.device_id)
                else:
                    self._reported_offline.discard(event.device_id)
            kept.append(event)
        return kept

    async def _bridge_state(self, payload: bytes, now: datetime) -> None:
        if not payload:
            return  # a retained state being cleared
        try:
            online = parse_availability(payload)[0]
        except Zigbee2MqttError:
            self._counts["invalid_bridge_state"] += 1
            log.warning("zigbee2mqtt_bridge_state_invalid")
            return
        previous, self._bridge_online = self._bridge_online, online
        if online == previous or (online and previous is None):
            return
        self._counts["bridge_online" if online else "bridge_offline"] += 1
        log.warning("zigbee2mqtt_bridge_online" if online else "zigbee2mqtt_bridge_offline")
        if online:
            affected = self._offline_by_bridge & self._reported_offline
            self._reported_offline -= affected
            self._offline_by_bridge.clear()
            kind = EventKind.DEVICE_ONLINE
        else:
            affected = set(self._names) - self._reported_offline
            self._reported_offline |= affected
            self._offline_by_bridge = set(affected)
            kind = EventKind.DEVICE_OFFLINE
        events = [self._supervision_event(kind, device_id, now) for device_id in sorted(affected)]
        await self._deliver(events)

    def _supervision_event(self, kind: EventKind, device_id: str, now: datetime) -> DeviceEvent:
        binding = self._bindings[self._names[device_id]]
        return parse_event(
            {
                "id": uuid7(),
                "time": now,
                "gateway_time": now,
                "gateway_id": self.gateway_id,
                "device_id": device_id,
                "device_type": binding.device_type.value,
                "kind": kind.value,
                "payload": {"last_seen": self._last_heard.get(device_id)},
            }
        )
