"""Device supervision with a fake clock: grace at start, offline once, back online."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.events import DeviceEvent, DeviceType, EventKind
from edge.supervision import Supervisor

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
DEVICES = {
    "pendant-1": (DeviceType.SAFETY_ALARM, 3600.0),
    "dispenser-1": (DeviceType.MEDICINE_DISPENSER, 900.0),
    "smoke-1": (DeviceType.SMOKE_DETECTOR, 4 * 3600.0),
}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def kinds(events: list[DeviceEvent]) -> list[tuple[EventKind, str]]:
    return [(event.kind, event.device_id) for event in events]


@pytest.fixture
def supervisor() -> Supervisor:
    return Supervisor("gw-1", DEVICES, now=T0)


def test_a_restart_gives_every_device_one_full_interval_of_grace(supervisor: Supervisor) -> None:
    assert supervisor.tick(at(900)) == []  # exactly the dispenser's interval: not yet longer
    assert kinds(supervisor.tick(at(901))) == [(EventKind.DEVICE_OFFLINE, "dispenser-1")]
    assert kinds(supervisor.tick(at(3600))) == []
    assert kinds(supervisor.tick(at(3601))) == [(EventKind.DEVICE_OFFLINE, "pendant-1")]


def test_offline_is_reported_once_not_on_every_tick(supervisor: Supervisor) -> None:
    first = supervisor.tick(at(1000))

    assert kinds(first) == [(EventKind.DEVICE_OFFLINE, "dispenser-1")]
    assert supervisor.tick(at(1001)) == []
    assert supervisor.tick(at(3000)) == []
    assert supervisor.offline == {"dispenser-1"}


def test_a_device_heard_from_is_not_offline_until_silent_for_its_interval(
    supervisor: Supervisor,
) -> None:
    assert supervisor.seen("dispenser-1", at(800)) == []

    assert supervisor.tick(at(1700)) == []  # 900 s after the last report, not longer
    assert kinds(supervisor.tick(at(1701))) == [(EventKind.DEVICE_OFFLINE, "dispenser-1")]


def test_offline_event_carries_type_times_and_last_seen(supervisor: Supervisor) -> None:
    supervisor.seen("dispenser-1", at(100))

    (event,) = supervisor.tick(at(1001))

    assert event.kind == EventKind.DEVICE_OFFLINE
    assert event.device_type == DeviceType.MEDICINE_DISPENSER
    assert event.gateway_id == "gw-1"
    assert event.time == at(1001)
    assert event.gateway_time == at(1001)
    assert event.payload.model_dump() == {"last_seen": at(100)}
    assert event.id.int >> 80 == int(at(1001).timestamp() * 1000)  # UUIDv7 from `now`


def test_a_device_never_heard_since_start_has_no_last_seen(supervisor: Supervisor) -> None:
    (event,) = supervisor.tick(at(901))

    assert event.payload.model_dump() == {"last_seen": None}


def test_seen_after_offline_returns_device_online_at_once(supervisor: Supervisor) -> None:
    supervisor.tick(at(901))

    events = supervisor.seen("dispenser-1", at(1200))

    assert kinds(events) == [(EventKind.DEVICE_ONLINE, "dispenser-1")]
    assert events[0].device_type == DeviceType.MEDICINE_DISPENSER
    assert events[0].gateway_time == at(1200)
    assert events[0].payload.model_dump() == {"last_seen": at(1200)}
    assert supervisor.seen("dispenser-1", at(1201)) == []  # online once
    assert supervisor.offline == frozenset()
    assert supervisor.tick(at(2100)) == []
    assert kinds(supervisor.tick(at(2102))) == [(EventKind.DEVICE_OFFLINE, "dispenser-1")]


def test_link_down_makes_devices_offline_at_once(supervisor: Supervisor) -> None:
    supervisor.seen("dispenser-1", at(10))

    events = supervisor.link_down(["dispenser-1"], at(20))

    assert kinds(events) == [(EventKind.DEVICE_OFFLINE, "dispenser-1")]
    assert events[0].payload.model_dump() == {"last_seen": at(10)}
    later = supervisor.tick(at(15_000))  # the others go overdue; the dispenser is not repeated
    assert [event.device_id for event in later] == ["pendant-1", "smoke-1"]


def test_link_down_during_the_start_grace_still_reports_at_once(supervisor: Supervisor) -> None:
    assert kinds(supervisor.link_down(["smoke-1"], at(1))) == [
        (EventKind.DEVICE_OFFLINE, "smoke-1")
    ]


def test_link_down_ignores_offline_and_unsupervised_devices(supervisor: Supervisor) -> None:
    supervisor.tick(at(901))  # the dispenser is offline already

    events = supervisor.link_down(["dispenser-1", "nurse-call-point-7", "pendant-1"], at(902))

    assert kinds(events) == [(EventKind.DEVICE_OFFLINE, "pendant-1")]


def test_link_down_reports_a_device_listed_twice_once(supervisor: Supervisor) -> None:
    assert len(supervisor.link_down(["pendant-1", "pendant-1"], at(5))) == 1


def test_traffic_from_an_unsupervised_device_is_counted_not_an_error(
    supervisor: Supervisor,
) -> None:
    assert supervisor.seen("call-point-12", at(5)) == []
    assert supervisor.counters["not_supervised"] == 1


def test_next_due_is_the_earliest_deadline_of_an_online_device(supervisor: Supervisor) -> None:
    assert supervisor.next_due() == at(900)

    supervisor.seen("dispenser-1", at(600))
    assert supervisor.next_due() == at(1500)

    supervisor.link_down(["dispenser-1", "pendant-1"], at(700))
    assert supervisor.next_due() == at(4 * 3600)

    supervisor.link_down(["smoke-1"], at(701))
    assert supervisor.next_due() is None


def test_a_clock_stepped_back_never_brings_a_deadline_forward(supervisor: Supervisor) -> None:
    supervisor.seen("dispenser-1", at(800))
    supervisor.seen("dispenser-1", at(100))  # an earlier time arrives late

    assert supervisor.tick(at(1650)) == []  # still due at 800 + 900


def test_several_devices_overdue_together_come_oldest_deadline_first(
    supervisor: Supervisor,
) -> None:
    events = supervisor.tick(at(5 * 3600))

    assert [event.device_id for event in events] == ["dispenser-1", "pendant-1", "smoke-1"]


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ({"gw": (DeviceType.GATEWAY, 60.0)}, "gateway"),
        ({"pendant-1": (DeviceType.SAFETY_ALARM, 0.0)}, "positive"),
        ({"bad id": (DeviceType.SAFETY_ALARM, 60.0)}, "invalid device id"),
    ],
)
def test_bad_device_tables_are_refused(
    devices: dict[str, tuple[DeviceType, float]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Supervisor("gw-1", devices, now=T0)


def test_naive_times_are_refused(supervisor: Supervisor) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        supervisor.tick(datetime(2025, 3, 1, 13, 0))  # naive on purpose


# --- against a simple model -------------------------------------------------------------

INTERVALS = {"a": 60.0, "b": 300.0, "c": 3600.0}
Expected = list[tuple[EventKind, str, datetime | None]]


@dataclass
class ModelDevice:
    last_activity: datetime
    last_seen: datetime | None = None
    offline: bool = False


class Model:
    """What supervision means, written as plainly as possible."""

    def __init__(self) -> None:
        self.devices = {name: ModelDevice(last_activity=T0) for name in INTERVALS}

    def seen(self, name: str, now: datetime) -> Expected:
        device = self.devices.get(name)
        if device is None:
            return []
        device.last_activity = device.last_seen = now
        if not device.offline:
            return []
        device.offline = False
        return [(EventKind.DEVICE_ONLINE, name, now)]

    def tick(self, now: datetime) -> Expected:
        names = [
            name
            for name, device in self.devices.items()
            if (now - device.last_activity).total_seconds() > INTERVALS[name]
        ]
        return self.link_down(names)

    def link_down(self, names: list[str]) -> Expected:
        expected: Expected = []
        for name in names:
            device = self.devices[name]
            if not device.offline:
                device.offline = True
                expected.append((EventKind.DEVICE_OFFLINE, name, device.last_seen))
        return expected


Op = tuple[str, int | frozenset[str] | str]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(min_value=0, max_value=4000)),
        st.tuples(st.just("seen"), st.sampled_from([*sorted(INTERVALS), "unknown"])),
        st.tuples(st.just("tick"), st.just("")),
        st.tuples(st.just("link_down"), st.frozensets(st.sampled_from(sorted(INTERVALS)))),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_supervisor_agrees_with_a_simple_model(operations: list[Op]) -> None:
    devices = {name: (DeviceType.MOTION_SENSOR, s) for name, s in INTERVALS.items()}
    supervisor = Supervisor("gw-model", devices, now=T0)
    model = Model()
    now = T0
    history: dict[str, list[EventKind]] = {name: [] for name in INTERVALS}

    for op, arg in operations:
        if op == "advance":
            assert isinstance(arg, int)
            now += timedelta(seconds=arg)
            continue
        if op == "seen":
            assert isinstance(arg, str)
            got, expected = supervisor.seen(arg, now), model.seen(arg, now)
        elif op == "tick":
            got, expected = supervisor.tick(now), model.tick(now)
        else:
            assert isinstance(arg, frozenset)
            got, expected = supervisor.link_down(sorted(arg), now), model.link_down(sorted(arg))

        observed = [
            (event.kind, event.device_id, event.payload.model_dump()["last_seen"]) for event in got
        ]
        assert sorted(observed) == sorted(expected)
        assert all(event.gateway_time == now == event.time for event in got)
        for event in got:
            history[event.device_id].append(event.kind)
        assert supervisor.offline == {name for name, d in model.devices.items() if d.offline}

    for kinds_seen in history.values():  # offline and online alternate, offline first
        assert kinds_seen[::2] == [EventKind.DEVICE_OFFLINE] * len(kinds_seen[::2])
        assert kinds_seen[1::2] == [EventKind.DEVICE_ONLINE] * len(kinds_seen[1::2])
