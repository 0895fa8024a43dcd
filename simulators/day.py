"""A resident's day while it is planned: places, conditions, incidents, the action sink.

A day is planned as *stays*: contiguous ``(start, end, place)`` intervals in minutes
elapsed since local midnight, where a place is a room or one of ``BED``, ``OUT`` (left by
the front door), ``WANDER`` (left at night without locking), ``AWAY`` (in the building,
out of every sensor's sight) and ``FALLEN``. ``ResidentRoutine`` is what the planners of
both kinds of site share (``simulators.home.HomeRoutine``,
``simulators.routine.CareRoutine``): wake and bed times, sleep, motion, bed sensors.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Any

from devices.events import DeviceType, EventKind
from simulators.world import Action, Actor, Detail, LocalDay, Resident, Site

BED, OUT, WANDER, AWAY, FALLEN = "@bed", "@out", "@wander", "@away", "@fallen"
NOT_HOME = frozenset({OUT, WANDER, FALLEN})
"""Places where the resident can neither take a dose nor press the pendant."""
_ROOM_STILLNESS = {"stue": 2.0, "soverom": 1.2, "kjokken": 0.6, "bad": 0.7, "gang": 0.4}
_T, _K = DeviceType, EventKind
Stay = tuple[float, float, str]


@dataclass(frozen=True, slots=True)
class RoutineConfig:
    """Behaviour shared by every resident and device."""

    dose_window: float = 60.0
    """Minutes after a dose is due before the dispenser reports it missed."""
    fall_detection: float = 0.8
    """Probability that a fall detector detects a fall."""
    motion_cooldown: float = 1.5
    """Minimum minutes between two reports of one motion sensor in one stay."""
    battery_low: float = 15.0
    battery_start: tuple[float, float] = (15.0, 100.0)
    battery_drain: tuple[float, float] = (0.03, 0.12)
    """Percent per day."""


@dataclass(frozen=True, slots=True)
class Timed:
    """Something injected at a wall-clock minute of a day, lasting ``duration`` minutes."""

    key: int
    minute: float
    duration: float


@dataclass(frozen=True, slots=True)
class DayConditions:
    """How a resident's day departs from normal (the defaults: a normal day)."""

    activity: float = 1.0
    """Below 1: fewer room changes and motion reports, fewer outings, more naps."""
    wake_delay: float = 0.0
    bed_advance: float = 0.0
    nap_minutes: float = 0.0
    outings: bool = True
    dose_key: int | None = None
    """When set, every dose's outcome is reported as an ``Incident`` with this key."""
    dose_extra_lag: float = 0.0
    dose_miss: float | None = None
    missed_doses: frozenset[int] = frozenset()
    """Indexes of today's doses that are missed whatever happens."""
    falls: tuple[Timed, ...] = ()
    wanders: tuple[Timed, ...] = ()
    smoke: tuple[Timed, ...] = ()
    leaks: tuple[Timed, ...] = ()
    pendant_drain: tuple[int, float] | None = None
    """(key, percent per day): the pendant's battery drains this much faster from today."""


NORMAL_DAY = DayConditions()


@dataclass(frozen=True, slots=True)
class Incident:
    """What an injected condition turned into: the routine's report for a label."""

    key: int
    start: datetime
    end: datetime
    details: dict[str, Any] = field(default_factory=dict)


class Sink:
    """Collects one day's actions for one resident (or for the site's own devices)."""

    __slots__ = ("actions", "day", "gw", "rid", "site_id")

    def __init__(self, day: LocalDay, site: Site, resident_id: str | None) -> None:
        self.day, self.site_id, self.gw, self.rid = day, site.site_id, site.gateway_id, resident_id
        self.actions: list[Action] = []

    def add(  # noqa: PLR0917 - positional on purpose: called for every action
        self,
        minute: float,
        device_id: str,
        device_type: DeviceType,
        kind: EventKind,
        actor: Actor = Actor.RESIDENT,
        room: str | None = None,
        detail: Detail | None = None,
    ) -> None:
        time = self.day.at(minute)
        rid, site, gw = self.rid, self.site_id, self.gw
        self.actions.append(
            Action(time, site, gw, rid, device_id, device_type, kind, actor, room, detail)
        )


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method; the means here are small)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def splice(stays: list[Stay], start: float, end: float, new: list[Stay]) -> list[Stay]:
    """``stays`` with the span ``[start, end)`` replaced by ``new``."""
    before = [(a, min(b, start), p) for a, b, p in stays if a < start]
    after = [(max(a, end), b, p) for a, b, p in stays if b > end]
    return [s for s in before if s[1] > s[0]] + new + [s for s in after if s[1] > s[0]]


def place_at(stays: list[Stay], minute: float) -> Stay:
    """The stay holding ``minute``."""
    return stays[max(bisect_right(stays, minute, key=itemgetter(0)) - 1, 0)]


class ResidentRoutine:
    """One resident's days; ``HomeRoutine`` and ``CareRoutine`` plan them."""

    def __init__(
        self,
        site: Site,
        resident: Resident,
        *,
        seed: int,
        config: RoutineConfig,
        staff_tags: tuple[str, ...],
    ) -> None:
        self.site, self.resident, self.profile = site, resident, resident.profile
        self.config, self.staff_tags = config, staff_tags
        self.rng = random.Random(f"{seed}:{resident.resident_id}")
        self.bedroom = resident.address or "soverom"

    def day(self, day: LocalDay, cond: DayConditions) -> tuple[list[Action], list[Incident]]:
        """The resident's actions of one day (unsorted) and the incidents it reports."""
        raise NotImplementedError

    def wake_and_bed(self, day: LocalDay, cond: DayConditions) -> tuple[float, float]:
        """Today's wake and bed times, in elapsed minutes."""
        p, rng = self.profile, self.rng
        shift = p.weekend_shift if day.weekend else 0.0
        wake = clamp(p.wake + rng.gauss(0, p.wake_sd) + shift, p.wake_range) + cond.wake_delay
        bed = clamp(p.bed + rng.gauss(0, p.bed_sd) + shift, p.bed_range) - cond.bed_advance
        return day.elapsed(wake), min(day.elapsed(max(bed, wake + 600)), day.length - 30)

    def sleep(self, start: float, end: float, cond: DayConditions) -> list[Stay]:
        """In bed from ``start`` to ``end``, with visits to the bathroom."""
        rng, room = self.rng, self.resident.address
        rate = self.profile.night_toilet * (2.0 - cond.activity)
        n = poisson(rng, rate * (end - start) / 540) if end - start > 45 else 0
        trip = (room,) if room else ("soverom", "gang", "bad", "gang", "soverom")
        out: list[Stay] = []
        t = start
        for up in sorted(rng.uniform(start + 15, end - 25) for _ in range(n)):
            if up < t + 15:
                continue
            out.append((t, up, BED))
            t = up
            for place in trip:
                d = rng.uniform(3.0, 10.0) if place in ("bad", room) else 0.7
                out.append((t, t + d, place))
                t += d
        out.append((t, end, BED))
        return out

    def emit_stays(self, stays: list[Stay], sink: Sink, activity: float) -> None:
        prev, rng, motion = BED, self.rng, self.site.motion
        for a, b, place in stays:
            entry = self.transition(prev, place, a, sink) if place != prev else 0.3
            if place in motion:
                self.motions(place, a + entry, b, sink, actor=Actor.RESIDENT, activity=activity)
            elif place == BED and self.bedroom in motion:
                for _ in range(poisson(rng, (b - a) / 400)):  # turning over in bed
                    self.motions(
                        self.bedroom, rng.uniform(a, b), b, sink, actor=Actor.RESIDENT, activity=0
                    )
            prev = place

    def transition(self, prev: str, place: str, a: float, sink: Sink) -> float:
        """Actions at a change of place; returns when the new room's motion may start."""
        bed = self.resident.bed_sensor
        if bed and prev == BED:
            sink.add(a, bed, _T.BED_SENSOR, _K.BED_EXITED)
        if bed and place == BED:
            sink.add(a, bed, _T.BED_SENSOR, _K.BED_ENTERED)
        return 0.3

    def motions(
        self, room: str, t: float, end: float, sink: Sink, *, actor: Actor, activity: float
    ) -> None:
        """Motion reports in ``room`` from ``t`` until ``end``; ``activity`` 0: just one."""
        device = self.site.motion[room]
        if activity <= 0:
            sink.add(t, device, _T.MOTION_SENSOR, _K.MOTION, actor, room)
            return
        mean = self.profile.retrigger_mean * _ROOM_STILLNESS.get(room, 1.0) / activity
        cooldown, rng = self.config.motion_cooldown, self.rng
        while t < end:
            sink.add(t, device, _T.MOTION_SENSOR, _K.MOTION, actor, room)
            t += max(cooldown, rng.expovariate(1.0 / mean))
