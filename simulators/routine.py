"""Residents' days: habits (``Profile``) and the day's conditions in, ``Action``s out.

A day is planned as *stays*: contiguous ``(start, end, place)`` intervals in minutes
elapsed since local midnight, where a place is a room or one of ``BED``, ``OUT`` (left by
the front door), ``WANDER`` (left at night without locking), ``AWAY`` (in the building,
out of every sensor's sight) and ``FALLEN``. Visits (home care, relatives, staff
answering a pendant) and pendant presses are planned beside them; ``DayConditions``
(illness, falls, wandering, ...) reshape the plan; then the plan is emitted as actions.
Pure: time is an argument, randomness comes from seeded ``random.Random`` instances, one
per resident and one per site, so a site's days do not depend on any other site.

This module holds ``CareRoutine``, ``Batteries`` and ``SiteRoutine`` and re-exports the
rest: the planned day and ``ResidentRoutine`` are in ``simulators.day``, ``HomeRoutine``
and its plan in ``simulators.home``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from operator import attrgetter

from devices.events import DeviceType, EventKind
from simulators.day import (
    AWAY,
    BED,
    FALLEN,
    NORMAL_DAY,
    NOT_HOME,
    OUT,
    WANDER,
    DayConditions,
    Incident,
    ResidentRoutine,
    RoutineConfig,
    Sink,
    Stay,
    Timed,
    clamp,
    place_at,
    poisson,
    splice,
)
from simulators.home import HomeRoutine, Plan, Press, Reshaper, Visit
from simulators.world import Action, Actor, BatteryDetail, CallDetail, LocalDay, Site, SiteKind

__all__ = [
    "AWAY",
    "BED",
    "FALLEN",
    "NORMAL_DAY",
    "NOT_HOME",
    "OUT",
    "WANDER",
    "Batteries",
    "CareRoutine",
    "DayConditions",
    "HomeRoutine",
    "Incident",
    "Plan",
    "Press",
    "Reshaper",
    "ResidentRoutine",
    "RoutineConfig",
    "Sink",
    "SiteRoutine",
    "Stay",
    "Timed",
    "Visit",
    "clamp",
    "place_at",
    "poisson",
    "splice",
]

_T, _K = DeviceType, EventKind


class CareRoutine(ResidentRoutine):
    """A care-home resident: the room, meals in the dining room, nurse calls, night rounds."""

    def day(self, day: LocalDay, cond: DayConditions) -> tuple[list[Action], list[Incident]]:
        sink = Sink(day, self.site, self.resident.resident_id)
        wake, bed = self.wake_and_bed(day, cond)
        stays = self.sleep(0, wake, cond) + self._awake(day, wake, bed, cond)
        stays += self.sleep(bed, day.length, cond)
        self.emit_stays(stays, sink, cond.activity)
        self._calls(day, stays, (wake, bed), sink, cond)
        room, rng = self.resident.address or "", self.rng
        for wall in (rng.uniform(1380, 1420), rng.uniform(180, 240)):  # night rounds
            if rng.random() < 0.6 and day.elapsed(wall) < day.length:
                self.motions(room, day.elapsed(wall), 0, sink, actor=Actor.STAFF, activity=0)
        return sink.actions, []

    def _awake(self, day: LocalDay, wake: float, bed: float, cond: DayConditions) -> list[Stay]:
        rng, room = self.rng, self.resident.address or ""
        blocks = (  # wall minute, chance, shortest, longest, place
            (510, 0.8, 30, 60, AWAY),  # meals in the dining room
            (750, 0.85, 30, 60, AWAY),
            (1020, 0.85, 30, 50, AWAY),
            (870, 0.4 * cond.activity, 45, 120, AWAY),  # the common room
            (810, self.profile.nap_prob, 30, 90, BED),
        )
        fixed: list[Stay] = []
        for wall, chance, shortest, longest, place in blocks:
            s = max(day.elapsed(wall + rng.uniform(-15, 30)), wake + 20)
            e = s + rng.uniform(shortest, longest)
            free = all(e <= a or s >= b for a, b, _ in fixed)
            if rng.random() < chance and e < bed - 10 and free:
                fixed.append((s, e, place))
        stays, t = [], wake
        for s, e, place in sorted(fixed):
            stays += [(t, s, room), (s, e, place)]
            t = e
        return [*stays, (t, bed, room)]

    def _calls(
        self,
        day: LocalDay,
        stays: list[Stay],
        awake: tuple[float, float],
        sink: Sink,
        cond: DayConditions,
    ) -> None:
        rng, point, room = self.rng, self.resident.call_point, self.resident.address
        if not point or not room:
            return
        for _ in range(poisson(rng, self.profile.nurse_calls * (2.0 - cond.activity))):
            r = rng.random()
            if r < 0.5:  # more in the morning
                t = day.elapsed(rng.uniform(420, 660))
            else:
                t = rng.uniform(*awake) if r < 0.9 else rng.uniform(20, max(21, awake[0] - 10))
            if place_at(stays, t)[2] == AWAY:
                continue
            urgent = rng.random() < 0.05
            detail = CallDetail(room, 1 if urgent else 3, "emergency" if urgent else "normal")
            sink.add(t, point, _T.NURSE_CALL, _K.NURSE_CALL, Actor.RESIDENT, detail=detail)
            arrive = t + rng.uniform(1.0, 12.0)
            self.motions(room, arrive, 0, sink, actor=Actor.STAFF, activity=0)
            cleared = arrive + rng.uniform(0.3, 8.0)
            sink.add(
                cleared, point, _T.NURSE_CALL, _K.NURSE_CALL_CLEARED, Actor.STAFF, None, detail
            )


class Batteries:
    """Battery levels of a site's devices: a daily report, ``battery_low``, replacement.

    Home care replaces a battery one to four days after ``battery_low``; a device whose
    battery runs flat before that is silent until then.
    """

    def __init__(self, site: Site, rng: random.Random, config: RoutineConfig) -> None:
        self.config, self.rng = config, rng
        self.devices = [d for d in site.devices if d.battery]
        self.level = {d.device_id: rng.uniform(*config.battery_start) for d in self.devices}
        self.drain = {d.device_id: rng.uniform(*config.battery_drain) for d in self.devices}
        self.minute = {d.device_id: rng.uniform(0, 1440) for d in self.devices}
        self.flat: dict[str, datetime] = {}
        self.replace_on: dict[str, int] = {}
        self.fault: dict[str, tuple[int, float]] = {}

    def day(
        self, day: LocalDay, sink: Sink, drains: Mapping[str, tuple[int, float]]
    ) -> tuple[list[Incident], dict[str, tuple[datetime, datetime]]]:
        """Today's reports, the incidents of drain faults, and when flat devices are silent."""
        incidents: list[Incident] = []
        silent: dict[str, tuple[datetime, datetime]] = {}
        for device in self.devices:
            did, kind = device.device_id, device.device_type
            m = day.elapsed(self.minute[did])
            now, sink.rid = day.at(m), device.resident_id
            key = self.fault.get(did, drains.get(did, (-1, 0.0)))[0]
            events = []
            if did in drains:
                self.fault[did] = drains[did]
                events.append("drain_started")
            if self.replace_on.get(did) == day.index:
                del self.replace_on[did]
                self.level[did] = 100.0
                self.fault.pop(did, None)
                events.append("replaced")
                if did in self.flat:
                    silent[did] = (self.flat.pop(did), now)
            level = self.level[did] - self.drain[did] - self.fault.get(did, (0, 0.0))[1]
            self.level[did] = level = max(level, 0.0)
            if level <= 0 and did not in self.flat:
                self.flat[did] = now
                events.append("flat")
            if did in self.flat:
                silent[did] = (self.flat[did], day.start + timedelta(minutes=day.length))
            else:
                detail = BatteryDetail(round(level))
                sink.add(m, did, kind, _K.BATTERY_LEVEL, Actor.DEVICE, None, detail)
                if level < self.config.battery_low and did not in self.replace_on:
                    sink.add(m, did, kind, _K.BATTERY_LOW, Actor.DEVICE, None, detail)
                    self.replace_on[did] = day.index + self.rng.randint(1, 4)
                    events.append("low")
                if kind is DeviceType.SAFETY_ALARM:  # the daily automatic test alarm
                    sink.add(m + 0.5, did, kind, _K.TEST_ALARM, Actor.DEVICE)
            if key >= 0:
                incidents += [Incident(key, now, now, {"event": event}) for event in events]
        sink.rid = None
        return incidents, silent


class SiteRoutine:
    """One site's days: its residents' routines and its devices' batteries."""

    def __init__(
        self,
        site: Site,
        *,
        seed: int,
        staff_tags: tuple[str, ...],
        config: RoutineConfig | None = None,
        reshape: Reshaper | None = None,
    ) -> None:
        self.site = site
        config = config or RoutineConfig()
        kind = HomeRoutine if site.kind is SiteKind.HOME else CareRoutine
        self.routines = [
            kind(site, r, seed=seed, config=config, staff_tags=staff_tags) for r in site.residents
        ]
        for routine in self.routines:
            if isinstance(routine, HomeRoutine):
                routine.reshape = reshape
        self.batteries = Batteries(site, random.Random(f"{seed}:{site.site_id}"), config)

    def day(
        self, day: LocalDay, conditions: Mapping[str, DayConditions] | None = None
    ) -> tuple[list[Action], list[Incident]]:
        """The site's actions of one day, in time order, and the incidents reported."""
        conditions = conditions or {}
        drains = {}
        for routine in self.routines:
            cond = conditions.get(routine.resident.resident_id)
            if cond and cond.pendant_drain and routine.resident.pendant:
                drains[routine.resident.pendant] = cond.pendant_drain
        sink = Sink(day, self.site, None)
        incidents, silent = self.batteries.day(day, sink, drains)
        actions = sink.actions
        for routine in self.routines:
            more, reported = routine.day(
                day, conditions.get(routine.resident.resident_id, NORMAL_DAY)
            )
            actions += more
            incidents += reported
        if silent:  # flat batteries
            actions = [
                a
                for a in actions
                if a.device_id not in silent
                or not silent[a.device_id][0] <= a.time < silent[a.device_id][1]
            ]
        actions.sort(key=attrgetter("time"))
        return actions, incidents
