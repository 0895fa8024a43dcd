"""A small simulated population: homes whose gateways publish canonical events to MQTT.

Until the edge daemon lands, each simulated gateway publishes ``DeviceEvent`` envelopes
straight to ``telecare/v1/{gateway_id}/events`` (and its retained status), the way a
real gateway will: motion through the day, the front door lock, the medicine dispenser's
doses, heartbeats, and now and then a pendant press. Names are invented.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import structlog

from devices.events import DeviceEvent, envelope_json, make_event

log = structlog.get_logger(__name__)

_FIRST = ["Kari", "Ola", "Ingrid", "Per", "Solveig", "Arne", "Astrid", "Knut", "Randi", "Odd"]
_LAST = ["Hansen", "Johansen", "Olsen", "Larsen", "Andersen", "Pedersen", "Nilsen", "Berg"]
_STREETS = ["Storgata", "Kirkeveien", "Skolegata", "Fjordveien", "Bakkeveien", "Elvegata"]
_ROOMS = ["stue", "kjokken", "soverom", "bad", "gang"]  # ids: ASCII only


@dataclass(frozen=True)
class SimulatedHome:
    index: int
    gateway_id: str
    site_id: str
    resident_id: str

    @property
    def pendant(self) -> str:
        return f"{self.gateway_id}-pendant"

    @property
    def dispenser(self) -> str:
        return f"{self.gateway_id}-dispenser"

    @property
    def lock(self) -> str:
        return f"{self.gateway_id}-lock"

    def motion(self, room: str) -> str:
        return f"{self.gateway_id}-motion-{room}"


def demo_homes(count: int) -> list[SimulatedHome]:
    return [
        SimulatedHome(i, f"demo-gw-{i:03d}", f"demo-home-{i:03d}", f"demo-res-{i:03d}")
        for i in range(1, count + 1)
    ]


def demo_registry(homes: list[SimulatedHome], *, seed: int = 7) -> dict[str, Any]:
    """The registry for ``homes``, in the ``telecare admin import`` format."""
    rng = random.Random(seed)
    devices: list[dict[str, Any]] = []
    for home in homes:
        r = home.resident_id
        devices += [
            {"id": home.pendant, "gateway_id": home.gateway_id, "device_type": "safety_alarm",
             "resident_id": r, "label": "Trygghetsalarm"},
            {"id": home.dispenser, "gateway_id": home.gateway_id,
             "device_type": "medicine_dispenser", "resident_id": r, "label": "Medisindispenser"},
            {"id": home.lock, "gateway_id": home.gateway_id, "device_type": "door_lock",
             "resident_id": r, "label": "Ytterdør"},
        ]
        devices += [
            {"id": home.motion(room), "gateway_id": home.gateway_id,
             "device_type": "motion_sensor", "resident_id": r, "label": f"Bevegelse {room}"}
            for room in _ROOMS
        ]
    return {
        "districts": [{"id": "demo-sentrum", "name": "Sentrum hjemmetjeneste"}],
        "sites": [
            {"id": h.site_id, "district_id": "demo-sentrum", "kind": "home",
             "name": f"Hjemme hos {h.resident_id}",
             "address": f"{rng.choice(_STREETS)} {rng.randint(1, 120)}"}
            for h in homes
        ],
        "residents": [
            {"id": h.resident_id, "site_id": h.site_id,
             "display_name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"}
            for h in homes
        ],
        "gateways": [{"id": h.gateway_id, "site_id": h.site_id} for h in homes],
        "devices": devices,
    }


def _routine_event(home: SimulatedHome, rng: random.Random) -> DeviceEvent:
    """One everyday event: mostly motion, sometimes the door or the dispenser."""
    roll = rng.random()
    gw = home.gateway_id
    if roll < 0.75:
        room = rng.choice(_ROOMS)
        return make_event("motion", gateway_id=gw, device_id=home.motion(room),
                          device_type="motion_sensor", payload={"room": room})
    if roll < 0.85:
        kind = rng.choice(["unlocked", "locked"])
        return make_event(kind, gateway_id=gw, device_id=home.lock, device_type="door_lock",
                          payload={"source": rng.choice(["keypad", "rf_tag", "manual"])})
    if roll < 0.95:
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        return make_event(rng.choice(["dose_due", "dose_taken"]), gateway_id=gw,
                          device_id=home.dispenser, device_type="medicine_dispenser",
                          payload={"dose_id": f"{now:%Y%m%d}-{now:%H}", "scheduled_for": now})
    return make_event("heartbeat", gateway_id=gw, device_id=gw, device_type="gateway",
                      payload={"queue_depth": 0})


def _press(home: SimulatedHome) -> DeviceEvent:
    return make_event("button_pressed", gateway_id=home.gateway_id, device_id=home.pendant,
                      device_type="safety_alarm")


async def run_population(
    mqtt_url: str,
    homes: list[SimulatedHome],
    *,
    events_per_home_per_min: float = 6.0,
    press_every_s: float = 90.0,
    seed: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Publish the homes' events until ``stop`` is set (or forever); reconnects by itself."""
    rng = random.Random(seed)
    stop = stop or asyncio.Event()
    parts = urlsplit(mqtt_url)
    while not stop.is_set():
        try:
            async with aiomqtt.Client(
                parts.hostname or "127.0.0.1", parts.port or 1883,
                username=parts.username, password=parts.password,
                identifier="telecare-demo-simulator", protocol=aiomqtt.ProtocolVersion.V311,
            ) as client:
                await _announce(client, homes)
                await _publish_until(
                    client, homes, rng=rng, stop=stop,
                    events_per_home_per_min=events_per_home_per_min, press_every_s=press_every_s,
                )
        except aiomqtt.MqttError as exc:
            log.warning("simulator_disconnected", error=str(exc))
            await asyncio.sleep(1.0)


async def _announce(client: aiomqtt.Client, homes: list[SimulatedHome]) -> None:
    for home in homes:
        status = {"state": "online", "time": datetime.now(UTC).isoformat(), "version": "sim-1"}
        await client.publish(f"telecare/v1/{home.gateway_id}/status",
                             json.dumps(status), qos=1, retain=True)


async def _publish_until(
    client: aiomqtt.Client,
    homes: list[SimulatedHome],
    *,
    rng: random.Random,
    stop: asyncio.Event,
    events_per_home_per_min: float,
    press_every_s: float,
) -> None:
    tick = 1.0
    routine_per_tick = events_per_home_per_min / 60 * tick
    while not stop.is_set():
        # Presses arrive across the population as a Poisson process of the given mean gap.
        pressing = rng.choice(homes) if rng.random() < tick / press_every_s else None
        for home in homes:
            events = [_routine_event(home, rng) for _ in range(_poisson(rng, routine_per_tick))]
            if home is pressing:
                events.append(_press(home))
                log.info("simulated_pendant_press", gateway_id=home.gateway_id)
            if events:
                await client.publish(f"telecare/v1/{home.gateway_id}/events",
                                     envelope_json(events), qos=1)
        try:
            await asyncio.wait_for(stop.wait(), tick)
        except TimeoutError:
            continue


def _poisson(rng: random.Random, mean: float) -> int:
    """A small Poisson draw (Knuth), enough for a simulator."""
    limit, k, p = pow(2.718281828459045, -mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1
