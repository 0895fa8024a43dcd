"""A simulated Zigbee2MQTT bridge: sensors and door locks on a home's local MQTT broker.

``SimZigbeeBridge(mqtt_url, base_topic=...)`` publishes what a real bridge publishes
(``devices.zigbee2mqtt`` builds the payloads), so the edge's driver cannot tell it apart:

- ``<base>/<name>``: the device's *whole* state on every change, as the bridge does from
  its cache; the bridge keeps each device's last values here too. ``action`` is sent
  once with the change it belongs to and never cached (the bridge's
  ``dontCacheProperties``);
- ``<base>/<name>/availability``, retained: ``{"state":"online"}`` (``legacy=True``:
  plain ``online`` / ``offline``, Zigbee2MQTT 1.x);
- ``<base>/bridge/state``, retained: ``{"state":"online"}`` on connect; the MQTT last will
  and a clean stop publish ``offline``.

Door locks answer ``<base>/<name>/set`` ``{"state": "UNLOCK" | "LOCK"}`` as a lock behind
the real bridge does (``tests/fixtures/zigbee2mqtt/datek_0402946_id_lock_150.jsonl``): an
operation event (``action: unlock``, ``action_source_name: rf``, ``action_user`` 65535)
published with the *cached*, old position, then the new ``lock_state`` / ``state``.
``lock_behaviour(name, "jam")`` makes the next commands fail with ``error_jammed`` and
``not_fully_locked`` (the Yale report in ``yale_jammed.jsonl``); ``"ignore"`` makes the
lock answer nothing (out of radio range). ``staff_unlock`` and ``manual_lock`` are the
keypad, tag and thumb-turn.

While a device is offline (``go_offline``) its state changes are kept but not published
(nobody hears it) and it answers no command. Publishing waits up to ``connect_timeout``
for the broker; a lost broker connection is re-opened with backoff, and on reconnect the
bridge publishes ``bridge/state`` and every device's availability again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt
import structlog

from devices.zigbee2mqtt import (
    DEFAULT_BASE_TOPIC,
    Zigbee2MqttError,
    availability_payload,
    friendly_name_problem,
    parse_set,
    state_payload,
)
from devices.zigbee2mqtt.locks import NO_USER
from edge.uplink import BrokerAddress

log = structlog.get_logger(__name__)

LockBehaviour = Literal["normal", "jam", "ignore"]
TagSource = Literal["keypad", "rfid"]


@dataclass(slots=True)
class _Device:
    state: dict[str, Any] = field(default_factory=dict)
    online: bool = True
    announced: bool = False
    """True once its availability was published."""
    lock: LockBehaviour | None = None
    """Set for a door lock: how it answers commands."""


class SimZigbeeBridge:
    """One simulated bridge; see the module docstring.

    ``counters``: ``published``, ``unheard`` (changes of an offline device),
    ``set_requests``, ``lock_commands``, ``lock_jammed``, ``lock_ignored``,
    ``bad_set_requests``, ``connects``, ``connection_lost``, ``internal_errors``.
    """

    def __init__(
        self,
        mqtt_url: str,
        *,
        base_topic: str = DEFAULT_BASE_TOPIC,
        client_id: str | None = None,
        legacy_availability: bool = False,
        qos: int = 0,
        occupancy_timeout_s: float | None = 90.0,
        connect_timeout: float = 10.0,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self._broker = BrokerAddress.from_url(mqtt_url)
        self.base_topic = base_topic
        self._client_id = client_id
        self.legacy_availability = legacy_availability
        self.qos = qos
        self.occupancy_timeout_s = occupancy_timeout_s
        self.connect_timeout = connect_timeout
        self._reconnect_max_s = reconnect_max_s
        self.counters: Counter[str] = Counter()
        self._devices: dict[str, _Device] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._order = asyncio.Lock()
        self._resets: dict[str, asyncio.Task[None]] = {}

    # --- life cycle -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        """Connect (waits up to ``connect_timeout`` for the first connection)."""
        if self._task is None:
            self._task = asyncio.create_task(self._sessions(), name="sim-zigbee-bridge")
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._connected.wait()
        except TimeoutError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Publish ``bridge/state`` offline, as the bridge does on a clean stop, and leave."""
        if self._client is not None and self._connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._client.publish(
                        self._topic("bridge/state"), self._bridge_state(False), qos=1, retain=True
                    )
        tasks = list(self._resets.values())
        self._resets.clear()
        task, self._task = self._task, None
        if task is not None:
            tasks.append(task)
        for pending in tasks:
            pending.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> SimZigbeeBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- devices ----------------------------------------------------------------------

    def state(self, name: str) -> Mapping[str, Any]:
        """The bridge's cached state of a device (what it republishes); ``KeyError`` if
        the bridge has never heard of it."""
        return dict(self._devices[name].state)

    async def update(
        self,
        name: str,
        *,
        action: str | None = None,
        action_details: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Change some of a device's fields and publish its whole state.

        ``action`` and ``action_details`` (``action_source_name``, ``action_user``) go
        out with this message only: the bridge never caches them. A device heard for the
        first time is announced online first.
        """
        device = self._device(name)
        device.state.update(fields)
        if not device.online:
            self.counters["unheard"] += 1
            return
        if not device.announced:
            await self._publish_availability(name, device)
        message = dict(device.state)
        if action is not None:
            message.update(action_details or {}, action=action)
        await self._publish(self._topic(name), state_payload(message))

    async def contact(self, name: str, open: bool) -> None:
        """A door or window sensor: ``contact: true`` is closed."""
        await self.update(name, contact=not open)

    async def occupancy(self, name: str, occupied: bool = True) -> None:
        """A motion sensor saw someone. As the bridge does (``occupancy_timeout``), it
        publishes ``occupancy: false`` once no motion was seen for
        ``occupancy_timeout_s``, so a later report (a battery reading) is not motion."""
        await self.update(name, occupancy=occupied)
        previous = self._resets.pop(name, None)
        if previous is not None:
            previous.cancel()
        if occupied and self.occupancy_timeout_s is not None:
            self._resets[name] = asyncio.create_task(self._reset_occupancy(name))

    async def _reset_occupancy(self, name: str) -> None:
        assert self.occupancy_timeout_s is not None  # noqa: S101 - checked by the caller
        await asyncio.sleep(self.occupancy_timeout_s)
        self._resets.pop(name, None)
        try:
            await self.update(name, occupancy=False)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.info("sim_zigbee_bridge_publish_failed", error=str(exc))

    async def smoke(self, name: str, on: bool) -> None:
        await self.update(name, smoke=on)

    async def water_leak(self, name: str, on: bool) -> None:
        await self.update(name, water_leak=on)

    async def vibration(self, name: str, action: str = "vibration") -> None:
        """Aqara vibration sensor: ``vibration``, ``tilt`` or ``drop`` (an action)."""
        await self.update(name, action=action)

    async def battery(self, name: str, percent: int, *, low: bool | None = None) -> None:
        """A battery report; ``battery_low`` defaults to ``percent <= 20``."""
        await self.update(name, battery=percent, battery_low=percent <= 20 if low is None else low)

    async def tamper(self, name: str, on: bool = True) -> None:
        await self.update(name, tamper=on)

    async def go_offline(self, name: str) -> None:
        """The bridge marks the device offline (retained availability)."""
        device = self._device(name)
        device.online = False
        await self._publish_availability(name, device)

    async def come_online(self, name: str) -> None:
        device = self._device(name)
        device.online = True
        await self._publish_availability(name, device)

    # --- door locks -------------------------------------------------------------------

    async def add_lock(self, name: str, *, locked: bool = True, battery: int = 90) -> None:
        """A door lock: announce it and publish its position (a baseline, not an event)."""
        device = self._device(name)
        device.lock = device.lock or "normal"
        device.state.update(_position(locked), battery=battery)
        await self.update(name)

    def lock_behaviour(self, name: str, behaviour: LockBehaviour) -> None:
        """How the lock answers commands from now on: ``normal``, ``jam`` or ``ignore``."""
        if behaviour not in ("normal", "jam", "ignore"):
            raise ValueError(f"lock behaviour must be normal, jam or ignore, not {behaviour!r}")
        self._device(name).lock = behaviour

    async def staff_unlock(self, name: str, user: int, *, source: TagSource = "rfid") -> None:
        """Staff open the door with their tag (``rfid``) or code (``keypad``), user slot
        ``user``."""
        await self._operate(name, "unlock", source=source, user=user)

    async def manual_lock(self, name: str) -> None:
        """Locked from inside with the thumb-turn."""
        await self._operate(name, "manual_lock", source="manual", user=NO_USER)

    async def _operate(self, name: str, action: str, *, source: str, user: int) -> None:
        device = self._device(name)
        device.lock = device.lock or "normal"
        locked = action.endswith("lock") and not action.endswith("unlock")
        details = {"action_source_name": source, "action_user": user}
        await self.update(name, action=action, action_details=details)  # the cached position
        await self.update(name, **_position(locked))

    async def _set_received(self, topic: str, payload: bytes) -> None:
        try:
            request = parse_set(topic, payload, base_topic=self.base_topic)
        except Zigbee2MqttError:
            self.counters["bad_set_requests"] += 1
            return
        self.counters["set_requests"] += 1
        device = self._devices.get(request.friendly_name)
        action = request.lock_action
        if device is None or device.lock is None or action is None or not device.online:
            return  # the real bridge logs an error; nothing moves
        self.counters["lock_commands"] += 1
        if device.lock == "ignore":
            self.counters["lock_ignored"] += 1
            return
        if device.lock == "jam":
            self.counters["lock_jammed"] += 1
            await self.update(request.friendly_name, action="error_jammed")
            await self.update(request.friendly_name, lock_state="not_fully_locked")
            return
        await self._operate(request.friendly_name, action, source="rf", user=NO_USER)

    # --- MQTT -------------------------------------------------------------------------

    def _device(self, name: str) -> _Device:
        device = self._devices.get(name)
        if device is None:
            problem = friendly_name_problem(name)
            if problem is not None:
                raise ValueError(f"friendly name {name!r} {problem}")
            device = self._devices[name] = _Device()
        return device

    def _bridge_state(self, online: bool) -> bytes:
        return availability_payload(online, self.legacy_availability)

    def _topic(self, suffix: str) -> str:
        return f"{self.base_topic}/{suffix}"

    async def _publish_availability(self, name: str, device: _Device) -> None:
        payload = availability_payload(device.online, self.legacy_availability)
        await self._publish(self._topic(f"{name}/availability"), payload, retain=True)
        device.announced = True

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish in call order once connected; raises ``aiomqtt.MqttError`` or
        ``TimeoutError`` if the broker cannot be reached within ``connect_timeout``."""
        async with self._order:
            async with asyncio.timeout(self.connect_timeout):
                await self._connected.wait()
            assert self._client is not None  # noqa: S101 - set whenever connected
            await self._client.publish(topic, payload, qos=self.qos, retain=retain)
            self.counters["published"] += 1

    def _make_client(self) -> aiomqtt.Client:
        broker = self._broker
        return aiomqtt.Client(
            broker.host,
            broker.port,
            username=broker.username,
            password=broker.password,
            identifier=self._client_id,
            tls_params=aiomqtt.TLSParameters() if broker.tls else None,
            will=aiomqtt.Will(self._topic("bridge/state"), self._bridge_state(False), 1, True),
            timeout=self.connect_timeout,
        )

    async def _sessions(self) -> None:
        delay = 0.1
        while True:
            try:
                async with self._make_client() as client:
                    delay = 0.1
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.counters["connection_lost"] += 1
                log.info("sim_zigbee_bridge_disconnected", error=str(exc))
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_s)

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self._topic("#"), qos=1)
        await client.publish(
            self._topic("bridge/state"), self._bridge_state(True), qos=1, retain=True
        )
        for name, device in list(self._devices.items()):
            payload = availability_payload(device.online, self.legacy_availability)
            await client.publish(self._topic(f"{name}/availability"), payload, qos=1, retain=True)
            device.announced = True
        self.counters["connects"] += 1
        self._client = client
        self._connected.set()
        async for message in client.messages:
            topic = message.topic.value
            if not (topic.endswith("/set") or "/set/" in topic):
                continue  # our own publications, echoed by the broker
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
            try:
                await self._set_received(topic, payload)
            except aiomqtt.MqttError:
                raise  # the session is gone: reconnect
            except Exception:  # a simulator bug must not end the bridge
                self.counters["internal_errors"] += 1
                log.exception("sim_zigbee_bridge_answer_failed")


def _position(locked: bool) -> dict[str, Any]:
    if locked:
        return {"lock_state": "locked", "state": "LOCK"}
    return {"lock_state": "unlocked", "state": "UNLOCK"}
