"""Simulated residents' days: deterministic, well-formed, and living the configured routine."""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.events import DeviceType, EventKind, is_identifier
from simulators.anomalies import Simulation
from simulators.routine import NORMAL_DAY, SiteRoutine
from simulators.world import (
    HOME_ROOMS,
    Action,
    Actor,
    DoseDetail,
    LockDetail,
    SiteKind,
    World,
    WorldConfig,
    build_world,
    local_days,
)

OSLO = ZoneInfo("Europe/Oslo")
START = date(2025, 3, 24)  # spans the change to summer time on 30 March
PROPERTY = settings(max_examples=15, deadline=None, database=None)


def _world(seed: int = 3, *, homes: int = 10, couples: float = 0.2) -> World:
    config = WorldConfig(homes=homes, care_homes=1, care_home_rooms=(10, 12), couples=couples)
    return build_world(config, seed=seed)


def _run(world: World, *, days: int, seed: int = 11) -> list[Action]:
    return list(Simulation(world, start=START, days=days, seed=seed).actions())


@pytest.fixture(scope="module")
def world() -> World:
    return _world()


@pytest.fixture(scope="module")
def actions(world: World) -> list[Action]:
    return _run(world, days=21)


def _wall_minute(moment: datetime) -> float:
    local = moment.astimezone(OSLO)
    return local.hour * 60 + local.minute + local.second / 60


# --- the world ---------------------------------------------------------------------------


def test_world_has_the_devices_each_kind_of_site_needs(world: World) -> None:
    for site in world.sites:
        types = {d.device_type for d in site.devices}
        assert len({d.device_id for d in site.devices}) == len(site.devices)
        assert all(is_identifier(i) for i in (site.site_id, site.gateway_id))
        assert all(is_identifier(d.device_id) for d in site.devices)
        if site.kind is SiteKind.HOME:
            assert {
                DeviceType.DOOR_LOCK,
                DeviceType.DOOR_SENSOR,
                DeviceType.SMOKE_DETECTOR,
            } <= types
            assert 4 <= len(site.motion) <= 6
            assert set(site.motion) <= {*HOME_ROOMS, "gjesterom"}
            assert all(r.pendant for r in site.residents)
        else:
            assert 10 <= len(site.residents) <= 12
            assert site.nurse_call_central in {d.device_id for d in site.devices}
            for resident in site.residents:
                assert resident.address
                assert re.fullmatch(r"\d-\d{3}", resident.address)
                assert resident.call_point
                assert resident.bed_sensor
                assert resident.address in site.motion


def test_the_same_seed_builds_the_same_world() -> None:
    assert _world(5) == _world(5)
    assert _world(5) != _world(6)


# --- the stream --------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_actions(world: World) -> None:
    first = _run(world, days=4, seed=2)
    assert first == _run(world, days=4, seed=2)
    assert first != _run(world, days=4, seed=3)


def test_times_never_go_back(actions: list[Action]) -> None:
    assert all(a.time <= b.time for a, b in pairwise(actions))
    end = datetime.combine(START + timedelta(days=21), datetime.min.time(), tzinfo=OSLO)
    assert actions[0].time >= datetime.combine(START, datetime.min.time(), tzinfo=OSLO)
    assert actions[-1].time < end


def test_every_action_belongs_to_its_site_and_resident(world: World, actions: list[Action]) -> None:
    for action in actions:
        site = world.site(action.site_id)
        assert action.gateway_id == site.gateway_id
        device = site.device(action.device_id)
        assert device.device_type is action.device_type
        if action.resident_id is not None:
            assert action.resident_id in {r.resident_id for r in site.residents}
        if device.resident_id is not None:  # a personal device speaks for its owner
            assert action.resident_id == device.resident_id


def test_a_residents_wake_time_stays_in_the_configured_range(
    world: World, actions: list[Action]
) -> None:
    """Waking is the first bed exit of the day not followed by a return within 30 minutes."""
    checked = 0
    for site in world.sites:
        for resident in site.residents:
            if not resident.bed_sensor or site.kind is not SiteKind.HOME:
                continue
            bed = [a for a in actions if a.device_id == resident.bed_sensor]
            wakes: dict[date, float] = {}
            for i, action in enumerate(bed):
                back = next((b for b in bed[i + 1 :] if b.kind is EventKind.BED_ENTERED), None)
                stays_up = back is None or back.time - action.time > timedelta(minutes=30)
                day = action.time.astimezone(OSLO).date()
                if action.kind is EventKind.BED_EXITED and stays_up and day not in wakes:
                    wakes[day] = _wall_minute(action.time)
            low, high = resident.profile.wake_range
            assert len(wakes) >= 20
            assert all(low - 0.5 <= w <= high + 0.5 for w in wakes.values()), wakes
            assert statistics.pstdev(wakes.values()) > 1  # it varies from day to day
            assert abs(statistics.median(wakes.values()) - resident.profile.wake) < 60
            checked += 1
    assert checked >= 3


def test_no_motion_while_the_resident_is_out(world: World, actions: list[Action]) -> None:
    """Out: from locking the door with the keypad code to unlocking it with the code."""
    outings = 0
    for site in world.sites:
        if site.kind is not SiteKind.HOME or len(site.residents) != 1:
            continue
        slot, out = site.residents[0].lock_slot, False
        for action in (a for a in actions if a.site_id == site.site_id):
            lock = action.detail if isinstance(action.detail, LockDetail) else None
            if lock and lock.source == "keypad" and lock.user_ref == slot:
                out = action.kind is EventKind.LOCKED
                outings += out
            assert not (out and action.kind is EventKind.MOTION), action
    assert outings >= 10


def test_staff_open_with_their_key_tag_and_lock_when_they_leave(
    world: World, actions: list[Action]
) -> None:
    staff = [a for a in actions if a.actor is Actor.STAFF and a.device_type is DeviceType.DOOR_LOCK]
    assert staff
    for action in staff:
        assert isinstance(action.detail, LockDetail)
        assert action.detail.source == "rf_tag"
        assert action.detail.user_ref in world.staff_tags
    unlocks = sum(a.kind is EventKind.UNLOCKED for a in staff)
    assert unlocks == sum(a.kind is EventKind.LOCKED for a in staff)


def test_every_dose_is_taken_or_missed_once(actions: list[Action]) -> None:
    outcome: dict[str, list[Action]] = defaultdict(list)
    due: dict[str, Action] = {}
    for action in actions:
        if isinstance(action.detail, DoseDetail):
            if action.kind is EventKind.DOSE_DUE:
                due[action.detail.dose_id + action.device_id] = action
            else:
                outcome[action.detail.dose_id + action.device_id].append(action)
    assert due
    assert set(outcome) <= set(due)
    for key, reminder in due.items():
        if reminder.time > actions[-1].time - timedelta(hours=2):
            continue  # the period ended before the outcome
        (result,) = outcome[key]
        delay = result.time - reminder.time
        if result.kind is EventKind.DOSE_MISSED:
            assert delay == timedelta(minutes=60)
        else:
            assert result.kind is EventKind.DOSE_TAKEN
            assert timedelta(0) < delay <= timedelta(minutes=61)


def test_nurse_calls_are_cleared_by_staff_and_come_mostly_in_the_morning(
    actions: list[Action],
) -> None:
    calls = [a for a in actions if a.kind is EventKind.NURSE_CALL]
    cleared = [a for a in actions if a.kind is EventKind.NURSE_CALL_CLEARED]
    assert len(calls) == len(cleared) > 100
    for call in calls:
        assert any(
            c.device_id == call.device_id
            and timedelta(0) < c.time - call.time < timedelta(minutes=21)
            for c in cleared
        )
    assert all(c.actor is Actor.STAFF for c in cleared)
    morning = sum(420 <= _wall_minute(c.time) < 660 for c in calls)
    afternoon = sum(780 <= _wall_minute(c.time) < 1020 for c in calls)
    assert morning > 2 * afternoon


def test_pendant_presses_are_rare(world: World, actions: list[Action]) -> None:
    presses = sum(a.kind is EventKind.BUTTON_PRESSED for a in actions)
    pendants = sum(1 for r in world.residents if r.pendant)
    assert presses / pendants < 5  # per resident in three weeks; about one a month is usual


# --- properties over seeds ---------------------------------------------------------------


@PROPERTY
@given(seed=st.integers(0, 2**32))
def test_any_seed_gives_an_ordered_stream_of_valid_actions(seed: int) -> None:
    world = build_world(WorldConfig(homes=3, couples=0.3), seed=seed)
    actions = _run(world, days=2, seed=seed)
    assert all(a.time <= b.time for a, b in pairwise(actions))
    for action in actions:
        site = world.site(action.site_id)
        assert action.device_id in {d.device_id for d in site.devices}
        if action.kind is EventKind.MOTION:
            assert action.room is not None
            assert site.motion[action.room] == action.device_id


# --- time ---------------------------------------------------------------------------------


def test_local_days_follow_daylight_saving_time() -> None:
    spring, summer, autumn = (
        local_days(d, 1, "Europe/Oslo")[0]
        for d in (date(2025, 3, 30), date(2025, 6, 1), date(2025, 10, 26))
    )
    assert (spring.length, summer.length, autumn.length) == (1380, 1440, 1500)
    assert spring.at(spring.elapsed(7 * 60)) == datetime(2025, 3, 30, 5, tzinfo=UTC)
    assert summer.at(summer.elapsed(7 * 60)) == datetime(2025, 6, 1, 5, tzinfo=UTC)
    assert autumn.at(autumn.elapsed(7 * 60)) == datetime(2025, 10, 26, 6, tzinfo=UTC)
    assert autumn.wall(autumn.elapsed(7 * 60)) == 7 * 60
    assert autumn.at(autumn.length + 10) < autumn.start + timedelta(minutes=1500)


def test_a_site_day_is_ordered_and_stays_inside_the_day(world: World) -> None:
    site = world.sites[0]
    routine = SiteRoutine(site, seed=1, staff_tags=world.staff_tags)
    for day in local_days(date(2025, 10, 25), 3, world.timezone):
        actions, incidents = routine.day(day, {site.residents[0].resident_id: NORMAL_DAY})
        assert not incidents
        assert actions == sorted(actions, key=lambda a: a.time)
        assert day.start <= actions[0].time
        assert actions[-1].time < day.start + timedelta(minutes=day.length)


def test_generation_rate_for_ten_residents_over_thirty_days() -> None:
    world = build_world(WorldConfig(homes=10), seed=1)
    began = time.perf_counter()
    count = sum(1 for _ in Simulation(world, start=START, days=30, seed=1).actions())
    elapsed = time.perf_counter() - began
    print(
        f"\n{count} actions for 10 residents x 30 days in {elapsed:.2f} s: {count / elapsed:,.0f}/s"
    )
    assert count > 10 * 30 * 50  # a lived-in home reports at least every half hour or so
