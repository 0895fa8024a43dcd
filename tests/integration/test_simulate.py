"""The simulation played through real edge daemons into a real hub.

Two homes and a ten-room care home live a morning at 1200 times real speed; every action
the model makes reaches the hub's event store exactly once through the device's own
protocol (Zigbee2MQTT, SIA DC-09, the dispenser and ESPA 4.4.4 serial lines) and the
site's ``EdgeDaemon``; a pendant press of the demo option becomes an alarm in the hub's
API. ``telecare simulate`` writes a registry that ``telecare admin import`` accepts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections import Counter
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from devices.events import DeviceType, EventKind
from edge.config import load_config
from hub.admin import RegistryFile
from simulators.anomalies import simulate
from simulators.registry import edge_toml, user_slot, wire, zigbee_messages
from simulators.run import SimClock, SimulationRun
from simulators.world import Action, LockDetail, World, WorldConfig, build_world
from tests.support import (
    REAL_MQTT_URL,
    ROOT,
    HubProcess,
    count_rows,
    register,
    stop_quietly,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

OSLO = ZoneInfo("Europe/Oslo")
SEED = 5
MORNING = (time(6, 0), time(11, 0))
K = EventKind
COMPARED = frozenset(
    {
        K.MOTION,
        K.OPENED,
        K.CLOSED,
        K.LOCKED,
        K.UNLOCKED,
        K.BED_ENTERED,
        K.BED_EXITED,
        K.DOSE_DUE,
        K.DOSE_TAKEN,
        K.DOSE_MISSED,
        K.NURSE_CALL,
        K.NURSE_CALL_CLEARED,
        K.BUTTON_PRESSED,
        K.ALARM_CANCELLED,
    }
)
"""Kinds whose every action makes exactly one event (battery levels are sent on change)."""
WANTED = {
    DeviceType.MOTION_SENSOR,
    DeviceType.DOOR_SENSOR,
    DeviceType.DOOR_LOCK,
    DeviceType.MEDICINE_DISPENSER,
    DeviceType.NURSE_CALL,
}


def small_world() -> World:
    prefix = f"t{uuid.uuid4().hex[:6]}"  # its own ids: nothing shared with other runs
    config = WorldConfig(homes=2, care_homes=1, care_home_rooms=(10, 10), prefix=prefix)
    return build_world(config, seed=SEED)


def morning_actions(world: World, day: date) -> list[Action]:
    """What the model makes that morning with no anomalies: a run of ``days`` plays
    exactly ``simulate`` of the start's local date."""
    simulation = simulate(world, start=day, days=1, seed=SEED, counts={})
    start, end = (datetime.combine(day, t, OSLO) for t in MORNING)
    return [a for a in simulation.actions() if start <= a.time < end]


def a_lively_morning(world: World) -> tuple[date, list[Action]]:
    """The first weekday morning from a fixed Monday on which every wanted device acts."""
    for offset in range(21):
        day = date(2025, 3, 10) + timedelta(days=offset)
        actions = morning_actions(world, day)
        if day.weekday() < 5 and {a.device_type for a in actions} >= WANTED:
            return day, actions
    raise AssertionError("no morning in three weeks with doors, locks, doses and calls")


async def stored_counts(database_url: str, gateways: list[str]) -> Counter[tuple[str, str]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT device_id, kind, count(*) FROM events WHERE gateway_id = ANY(%s)"
            " GROUP BY device_id, kind",
            [gateways],
        )
        return Counter({(d, k): n for d, k, n in await cur.fetchall()})


async def test_a_simulated_morning_reaches_the_hub_through_real_edge_daemons(
    tmp_path: Path, data_dir: Path, database_url: str, mqtt_url: str
) -> None:
    world = small_world()
    day, actions = a_lively_morning(world)
    gateways = [site.gateway_id for site in world.sites]
    run = SimulationRun(
        world,
        hub_mqtt_url=mqtt_url,
        hub_protocol="5" if mqtt_url == REAL_MQTT_URL else "3.1.1",
        work_dir=tmp_path / "sim",
        seed=SEED,
        speed=1200,
        start=datetime.combine(day, MORNING[0], OSLO),
        days=(MORNING[1].hour - MORNING[0].hour) / 24,
        press_every_s=3.0,
        counts={},
    )
    await register(database_url, run.registry())
    hub = HubProcess(
        data_dir=data_dir,
        database_url=database_url,
        mqtt_url=mqtt_url,
        client_id=f"test-sim-{uuid.uuid4().hex[:8]}",
    ).start()
    try:
        await asyncio.wait_for(run.run(), timeout=150)
        assert run.demo_presses, "the demo option pressed no pendant"
        expected = Counter((a.device_id, a.kind.value) for a in actions if a.kind in COMPARED)
        for _, pendant in run.demo_presses:
            expected[pendant, K.BUTTON_PRESSED.value] += 1

        devices = {d.device_id: (s.gateway_id, d) for s in world.sites for d in s.devices}
        found = await stored_counts(database_url, gateways)
        for _ in range(300):  # the hub writes what the broker has (a few seconds at most)
            if all(found[key] >= n for key, n in expected.items()):
                break
            await asyncio.sleep(0.1)
            found = await stored_counts(database_url, gateways)
        assert {key: found[key] for key in expected} == dict(expected)  # exactly once each
        seen = {devices[d] for d, _ in found if d in devices}
        assert {d.device_type for _, d in seen} >= WANTED
        assert {gateway for gateway, _ in seen} == set(gateways)

        pendants = {d for d, (_, x) in devices.items() if x.device_type is DeviceType.SAFETY_ALARM}
        unsent = [a for a in actions if a.device_id in pendants and a.kind is K.BATTERY_LEVEL]
        assert run.counters["actions_skipped"] == len(unsent)  # SIA carries no battery level
        assert run.counters["actions_played"] == len(actions) - len(unsent)
        assert run.counters["sia_failed"] == run.counters["zigbee_failed"] == 0

        alarms = httpx.get(f"{hub.base_url}/api/v1/alarms", timeout=10).json()
        raised = {
            (a["site_id"], a["device_id"], a["resident_id"])
            for a in alarms
            if a["category"] == "assistance"
        }
        for _, pendant in run.demo_presses:
            gateway, device = devices[pendant]
            site = next(s for s in world.sites if s.gateway_id == gateway)
            assert (site.site_id, pendant, device.resident_id) in raised
        assert (tmp_path / "sim" / "labels.jsonl").exists()
    finally:
        stop_quietly(hub)


# --- the command ----------------------------------------------------------------------


def telecare(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hub", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELECARE_")}
    env.update(TELECARE_DATA_DIR=str(tmp_path / "telecare"), TELECARE_LOG_FORMAT="json", **extra)
    return env


async def test_telecare_simulate_writes_a_registry_that_admin_import_accepts(
    tmp_path: Path, database_url: str, mqtt_url: str
) -> None:
    out = tmp_path / "registry.json"
    env = clean_env(tmp_path, TELECARE_MQTT_URL=mqtt_url)
    if mqtt_url != REAL_MQTT_URL:
        env["TELECARE_INGEST__PROTOCOL"] = "3.1.1"
    prefix = f"c{uuid.uuid4().hex[:6]}"
    done = await asyncio.to_thread(
        telecare,
        "simulate",
        "--homes",
        "2",
        "--care-homes",
        "1",
        "--speed",
        "600",
        "--days",
        "0.01",
        "--seed",
        "3",
        "--prefix",
        prefix,
        "--registry-out",
        str(out),
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    registry = RegistryFile.model_validate_json(out.read_text())
    assert len(registry.gateways) == 3
    assert all(g.id.startswith(prefix) for g in registry.gateways)

    imported = await asyncio.to_thread(
        telecare,
        "admin",
        "import",
        str(out),
        env=clean_env(tmp_path, TELECARE_DATABASE_URL=database_url),
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "3 gateways" in imported.stdout
    assert await count_rows(database_url, "SELECT count(*) FROM residents") == len(
        registry.residents
    )


def test_telecare_simulate_without_a_broker_says_what_is_missing(tmp_path: Path) -> None:
    done = telecare("simulate", "--homes", "1", env=clean_env(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "TELECARE_MQTT_URL" in done.stderr


# --- the pieces, without a broker -----------------------------------------------------


def test_every_site_config_loads_and_binds_every_device_once(tmp_path: Path) -> None:
    world = build_world(WorldConfig(homes=6, care_homes=1, couples=0.5), seed=2)
    for site in world.sites:
        wiring = wire(site)
        text = edge_toml(
            site,
            wiring,
            hub_url="mqtt://user:pw@127.0.0.1:1883",
            hub_protocol="5",
            data_dir=tmp_path / "data",
            dev_dir=tmp_path / "dev",
            sia_port=12128,
            time_zone=world.timezone,
        )
        path = tmp_path / f"{site.gateway_id}.toml"
        path.write_text(text)
        config = load_config(path)
        bound = {z.device_id for z in config.zigbee2mqtt.devices} if config.zigbee2mqtt else set()
        for port in config.serial:
            bound |= set(port.device_ids)
        for account in config.sia.accounts if config.sia else ():
            bound |= {account.device_id, *(zone.device_id for zone in account.zones.values())}
        assert bound == {d.device_id for d in site.devices} | (
            {wiring.alarm_unit} if wiring.alarm_unit else set()
        )
        assert config.hub.password is not None  # taken out of the URL, kept secret


def test_the_registry_is_importable_and_names_nobody_real() -> None:
    world = build_world(WorldConfig(homes=3, care_homes=1), seed=4)
    data: dict[str, Any] = SimulationRun(
        world, hub_mqtt_url=REAL_MQTT_URL, hub_protocol="5", work_dir=Path("x"), seed=4
    ).registry()
    registry = RegistryFile.model_validate(data)
    assert {r.id for r in registry.residents} == {r.resident_id for r in world.residents}
    assert all(site.address is None for site in registry.sites)
    devices = {d.id for d in registry.devices}
    assert {d.device_id for s in world.sites for d in s.devices} < devices  # + alarm units


def test_a_lock_reports_who_operated_it_then_its_position() -> None:
    action = Action(
        datetime(2025, 3, 10, 9, tzinfo=OSLO),
        "s",
        "gw",
        None,
        "gw-lock",
        DeviceType.DOOR_LOCK,
        K.UNLOCKED,
        detail=LockDetail("rf_tag", "staff-007"),
    )
    now, after = zigbee_messages(action, battery_low=15)
    assert now == [
        {"action": "unlock", "action_details": {"action_user": 107, "action_source_name": "rfid"}},
        {"lock_state": "unlocked", "state": "UNLOCK"},
    ]
    assert after is None
    assert (user_slot("slot-9"), user_slot(None)) == (9, 0xFFFF)


def test_the_simulated_clock_runs_at_its_speed() -> None:
    start = datetime(2025, 3, 10, 6, tzinfo=OSLO)
    clock = SimClock(start, speed=600, origin=100.0)
    assert clock.at(106.0) == start + timedelta(hours=1)
    assert clock.loop_time(start + timedelta(minutes=30)) == pytest.approx(103.0)
