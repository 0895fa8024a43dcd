"""Injected anomalies and faults: each has a label, and the actions really show it."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.events import DeviceType, EventKind, parse_event
from simulators.anomalies import (
    AnomalyType,
    Label,
    Simulation,
    plan_anomalies,
    read_labels,
    simulate,
    write_labels,
)
from simulators.canonical import to_events
from simulators.world import (
    Action,
    Actor,
    BatteryDetail,
    DoseDetail,
    LockDetail,
    World,
    WorldConfig,
    build_world,
)

A = AnomalyType
OSLO = ZoneInfo("Europe/Oslo")
START = date(2025, 10, 6)
DAYS = 30
EACH = 3
ROUND_TRIP = settings(max_examples=100, deadline=None, database=None)


class Run:
    def __init__(self, world: World, sim: Simulation) -> None:
        self.world, self.sim = world, sim
        self.actions = list(sim.actions())
        self.labels = sim.labels
        self.by_site: dict[str, list[Action]] = defaultdict(list)
        for action in self.actions:
            self.by_site[action.site_id].append(action)

    def of(self, kind: AnomalyType) -> list[Label]:
        found = [label for label in self.labels if label.type is kind]
        assert len(found) == EACH
        return found

    def during(self, label: Label, *, extra: timedelta = timedelta(0)) -> list[Action]:
        start, end = label.start, label.end + extra
        return [a for a in self.by_site[label.site_id] if start <= a.time < end]


@pytest.fixture(scope="module")
def run() -> Run:
    config = WorldConfig(homes=40, care_homes=1, care_home_rooms=(10, 10), fall_detector=0.6)
    world = build_world(config, seed=21)
    sim = simulate(world, start=START, days=DAYS, seed=5, counts=dict.fromkeys(A, EACH))
    return Run(world, sim)


def test_every_requested_anomaly_has_one_label(run: Run) -> None:
    assert Counter(label.type for label in run.labels) == dict.fromkeys(A, EACH)
    for label in run.labels:
        assert label.start <= label.end
        site = run.world.site(label.site_id)
        assert label.gateway_id == site.gateway_id
        if label.device_id:
            assert label.device_id in {d.device_id for d in site.devices}


def test_the_same_seed_plans_the_same_anomalies() -> None:
    world = build_world(WorldConfig(homes=20), seed=1)
    first = plan_anomalies(world, days=30, seed=4)
    assert first == plan_anomalies(world, days=30, seed=4)
    assert first != plan_anomalies(world, days=30, seed=5)
    assert first  # the default rates give some cases over 20 residents and 30 days


def test_a_count_that_cannot_fit_is_refused() -> None:
    world = build_world(WorldConfig(homes=1), seed=1)
    with pytest.raises(ValueError, match="illness"):
        plan_anomalies(world, days=5, seed=1, counts={A.ILLNESS: 4})
    with pytest.raises(ValueError, match="one day"):
        plan_anomalies(world, days=0, seed=1)
    late = replace(plan_anomalies(world, days=10, seed=1, counts={A.FALL: 1})[0], day=5)
    with pytest.raises(ValueError, match="outside the period"):
        Simulation(world, start=START, days=1, seed=1, injections=[late])


def test_counts_alone_inject_only_the_counted_types() -> None:
    world = build_world(WorldConfig(homes=10, care_homes=1, care_home_rooms=(10, 10)), seed=1)
    injections = plan_anomalies(world, days=30, seed=2, counts={A.POWER_LOSS: 4})
    assert [i.type for i in injections] == [A.POWER_LOSS] * 4
    assert {i.site_id for i in injections} <= {s.site_id for s in world.sites}


def test_after_a_fall_nothing_moves_until_the_resident_is_found(run: Run) -> None:
    hours = set()
    for label in run.of(A.FALL):
        during = run.during(label)
        assert not [a for a in during if a.kind is EventKind.MOTION]
        at_end = [a for a in run.by_site[label.site_id] if a.time == label.end]
        found_by = label.details["found_by"]
        if found_by == "pendant":
            assert any(a.kind is EventKind.BUTTON_PRESSED for a in at_end)
        elif found_by in ("home_care", "relative"):
            unlock = next(a for a in at_end if a.kind is EventKind.UNLOCKED)
            assert isinstance(unlock.detail, LockDetail)
            assert unlock.detail.source == ("rf_tag" if found_by == "home_care" else "keypad")
        falls = [a for a in during if a.kind is EventKind.FALL]
        assert len(falls) == (1 if label.details["detected"] else 0)
        if falls:
            assert falls[0].device_id == label.device_id
        hours.add(label.start.astimezone(OSLO).hour)
    assert len(hours) > 1


def test_falls_are_found_in_every_way_and_nobody_moves_before() -> None:
    world = build_world(WorldConfig(homes=30, fall_detector=0.5), seed=8)
    falls = Run(world, simulate(world, start=START, days=20, seed=2, counts={A.FALL: 40}))
    assert len(falls.labels) == 40
    ways = Counter(label.details["found_by"] for label in falls.labels)
    assert set(ways) == {"self", "pendant", "home_care", "relative"}
    assert {label.details["night"] for label in falls.labels} == {True, False}
    for label in falls.labels:
        assert not [a for a in falls.during(label) if a.kind is EventKind.MOTION]
        if label.details["found_by"] in ("self", "pendant"):  # nobody came: 1 to 6 hours
            assert timedelta(minutes=59) <= label.end - label.start <= timedelta(hours=6)
        resident = next(r for r in world.residents if r.resident_id == label.resident_id)
        if resident.fall_detector is None:
            assert label.details["detected"] is False
    detected = [label.details["detected"] for label in falls.labels if label.device_id]
    assert 0 < sum(d is True for d in detected) < len(detected)  # a detector misses some falls


def test_a_night_wanderer_opens_the_front_door_and_comes_back_later(run: Run) -> None:
    for label in run.of(A.NIGHT_WANDERING):
        door = run.world.site(label.site_id).door
        opened = [
            a
            for a in run.by_site[label.site_id]
            if a.device_id == door and a.kind is EventKind.OPENED
        ]
        assert label.start in {a.time for a in opened}
        assert label.end in {a.time for a in opened}
        assert not [a for a in run.during(label) if a.kind is EventKind.MOTION]
        assert label.start.astimezone(OSLO).hour < 6


def test_missed_doses_are_reported_missed(run: Run) -> None:
    missed = {
        a.detail.dose_id
        for a in run.actions
        if a.kind is EventKind.DOSE_MISSED and isinstance(a.detail, DoseDetail)
    }
    for label in run.of(A.MISSED_DOSES):
        doses = label.details["doses"]
        assert isinstance(doses, list)
        assert len(doses) == label.details["count"]
        for dose in doses:
            assert isinstance(dose, dict)
            assert dose["dose_id"] in missed


def test_declining_adherence_takes_doses_later_and_misses_more(run: Run) -> None:
    for label in run.of(A.DECLINING_ADHERENCE):
        doses = label.details["doses"]
        assert isinstance(doses, list)
        half = len(doses) // 2

        def badness(part: Sequence[object]) -> float:
            lags = [d["lag"] if d["taken"] else 120.0 for d in part if isinstance(d, dict)]
            return statistics.mean(float(x) for x in lags if isinstance(x, (int, float)))

        assert badness(doses[half:]) > badness(doses[:half]) + 10


def _motions_per_day(run: Run, label: Label, start: datetime, end: datetime) -> float:
    days = (end - start) / timedelta(days=1)
    count = sum(
        1
        for a in run.by_site[label.site_id]
        if a.kind is EventKind.MOTION and a.actor is Actor.RESIDENT and start <= a.time < end
    )
    return count / days


def test_illness_reduces_activity(run: Run) -> None:
    first = run.actions[0].time
    last = run.actions[-1].time
    for label in run.of(A.ILLNESS):
        ill = _motions_per_day(run, label, label.start, label.end)
        before = _motions_per_day(run, label, first, label.start) if label.start > first else None
        after = _motions_per_day(run, label, label.end, last) if label.end < last else None
        normal = max(x for x in (before, after) if x is not None)
        assert ill < 0.85 * normal


def test_gradual_decline_reduces_activity_week_by_week(run: Run) -> None:
    for label in run.of(A.GRADUAL_DECLINE):
        week = timedelta(days=5)
        early = _motions_per_day(run, label, label.start, label.start + week)
        late = _motions_per_day(run, label, label.end - week, label.end)
        assert late < 0.85 * early


def test_a_draining_pendant_reports_low_and_is_replaced(run: Run) -> None:
    for label in run.of(A.BATTERY_DRAIN):
        pendant = [a for a in run.by_site[label.site_id] if a.device_id == label.device_id]
        levels = [
            (a.time, a.detail.level)
            for a in pendant
            if a.kind is EventKind.BATTERY_LEVEL and isinstance(a.detail, BatteryDetail)
        ]
        inside = [level for t, level in levels if label.start <= t < label.end]
        assert inside == sorted(inside, reverse=True)
        if len(inside) > 1:
            assert (inside[0] - inside[-1]) / (len(inside) - 1) >= 4
        if label.details["low_at"]:
            low = datetime.fromisoformat(str(label.details["low_at"]))
            assert any(a.kind is EventKind.BATTERY_LOW and a.time == low for a in pendant)
        if label.details["flat_at"]:
            flat = datetime.fromisoformat(str(label.details["flat_at"]))
            assert not [a for a in pendant if flat <= a.time < label.end]


def test_a_silent_device_says_nothing(run: Run) -> None:
    for label in run.of(A.SILENT_DEVICE):
        assert not [a for a in run.during(label) if a.device_id == label.device_id]


def test_a_jammed_lock_never_locks(run: Run) -> None:
    for label in run.of(A.LOCK_JAM):
        lock = [a for a in run.during(label) if a.device_id == label.device_id]
        assert not [a for a in lock if a.kind is EventKind.LOCKED]
        assert sum(a.kind is EventKind.JAMMED for a in lock) == label.details["jammed_reports"]


def test_a_power_loss_silences_the_site_then_power_returns(run: Run) -> None:
    for label in run.of(A.POWER_LOSS):
        assert not run.during(label)
        if label.end < run.sim.end:
            restored = [a for a in run.by_site[label.site_id] if a.time == label.end]
            assert [a.kind for a in restored] == [EventKind.POWER_RESTORED]
            assert restored[0].device_type is DeviceType.GATEWAY


def test_an_uplink_outage_changes_no_action(run: Run) -> None:
    for label in run.of(A.UPLINK_OUTAGE):
        assert label.gateway_id
        assert run.during(label, extra=timedelta(hours=2))  # life goes on, delivery waits


def test_smoke_and_leaks_are_reported_when_they_start(run: Run) -> None:
    for kind, event in ((A.SMOKE, EventKind.SMOKE), (A.WATER_LEAK, EventKind.WATER_LEAK)):
        for label in run.of(kind):
            assert any(a.kind is event for a in run.during(label) if a.time == label.start)


def test_labels_round_trip_through_the_file(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    write_labels(path, run.labels)
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(run.labels)
    assert read_labels(path) == run.labels


@ROUND_TRIP
@given(
    labels=st.lists(
        st.builds(
            Label,
            type=st.sampled_from(A),
            site_id=st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
            gateway_id=st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
            resident_id=st.none() | st.text(max_size=20),
            start=st.datetimes(timezones=st.just(UTC)),
            end=st.datetimes(timezones=st.just(UTC)),
            details=st.dictionaries(
                st.text(max_size=10), st.none() | st.booleans() | st.integers() | st.text()
            ),
        ),
        max_size=5,
    )
)
def test_any_labels_round_trip(
    labels: list[Label], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    write_labels(path, labels)
    assert read_labels(path) == labels


def test_every_kind_of_action_becomes_a_valid_canonical_event(run: Run) -> None:
    samples: dict[tuple[EventKind, DeviceType], Action] = {}
    for action in run.actions:
        samples.setdefault((action.kind, action.device_type), action)
    expected = {
        EventKind.MOTION, EventKind.OPENED, EventKind.CLOSED, EventKind.LOCKED,
        EventKind.UNLOCKED, EventKind.JAMMED, EventKind.BED_ENTERED, EventKind.BED_EXITED,
        EventKind.DOSE_DUE, EventKind.DOSE_TAKEN, EventKind.DOSE_MISSED,
        EventKind.BUTTON_PRESSED, EventKind.ALARM_CANCELLED, EventKind.TEST_ALARM,
        EventKind.NURSE_CALL, EventKind.NURSE_CALL_CLEARED, EventKind.BATTERY_LEVEL,
        EventKind.BATTERY_LOW, EventKind.SMOKE, EventKind.WATER_LEAK, EventKind.FALL,
        EventKind.POWER_RESTORED,
    }  # fmt: skip
    assert expected <= {kind for kind, _ in samples}
    for action in samples.values():
        (event,) = to_events(action)
        assert event.time == action.time
        assert event.gateway_time == action.time
        assert (event.device_id, event.kind) == (action.device_id, action.kind)
        assert event.gateway_id == action.gateway_id
        assert parse_event(event.model_dump(mode="json")) == event
    (other,) = to_events(next(iter(samples.values())), "gw-other")
    assert other.gateway_id == "gw-other"
