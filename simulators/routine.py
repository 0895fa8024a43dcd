"""Residents' days: habits (``Profile``) and the day's conditions in, ``Action``s out.

A day is planned as *stays*: contiguous ``(start, end, place)`` intervals in minutes
elapsed since local midnight, where a place is a room or one of ``BED``, ``OUT`` (left by
the front door), ``WANDER`` (left at night without locking), ``AWAY`` (in the building,
out of every sensor's sight) and ``FALLEN``. Visits (home care, relatives, staff
answering a pendant) and pendant presses are planned beside them; ``DayConditions``
(illness, falls, wandering, ...) reshape the plan; then the plan is emitted as actions.
Pure: time is an argument, randomness comes from seeded ``random.Random`` instances, one
per resident and one per site, so a site's days do not depend on any other site.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import attrgetter, itemgetter
from typing import Any

from devices.events import DeviceType, EventKind
from simulators.world import (
    Action,
    Actor,
    BatteryDetail,
    CallDetail,
    Detail,
    DoseDetail,
    LocalDay,
    LockDetail,
    Resident,
    Site,
    SiteKind,
)

BED, OUT, WANDER, AWAY, FALLEN = "@bed", "@out", "@wander", "@away", "@fallen"
NOT_HOME = frozenset({OUT, WANDER, FALLEN})
"""Places where the resident can neither take a dose nor press the pendant."""
_ABSENT = NOT_HOME | {BED}
_ROOM_WEIGHTS = {"stue": 45, "kjokken": 20, "bad": 10, "soverom": 10, "gang": 8, "gjesterom": 3}
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


@dataclass(slots=True)
class Visit:
    start: float
    end: float
    actor: Actor
    tag: str | None = None
    """A staff member's key tag; None for relatives."""
    by_code: bool = False
    """A relative who opens with the keypad code instead of being let in."""


@dataclass(slots=True)
class Press:
    time: float
    cancel: float | None
    response: Visit | None


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


@dataclass(slots=True)
class Plan:
    """One resident's day while it is being planned."""

    day: LocalDay
    cond: DayConditions
    sink: Sink
    wake: float
    bed: float
    stays: list[Stay] = field(default_factory=list)
    visits: list[Visit] = field(default_factory=list)
    presses: list[Press] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)

    def drop_presses(self, doomed: Callable[[Press], bool]) -> None:
        """Forget presses that cannot happen, and the staff visits they would have caused."""
        gone = [p for p in self.presses if doomed(p)]
        self.presses = [p for p in self.presses if not doomed(p)]
        self.visits = [v for v in self.visits if all(v is not p.response for p in gone)]

    def away(self, start: float, end: float) -> bool:
        """True if the resident is not at home (or cannot act) at some time in the span."""
        return any(p in NOT_HOME and a < end and start < b for a, b, p in self.stays)


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


Reshaper = Callable[["HomeRoutine", "Plan"], None]
"""Applies a day's injected anomalies to a plan (``simulators.anomalies.reshape``)."""


class HomeRoutine(ResidentRoutine):
    """A resident of a private home: meals, outings, visits, doses, the pendant."""

    reshape: Reshaper | None = None

    def __init__(
        self,
        site: Site,
        resident: Resident,
        *,
        seed: int,
        config: RoutineConfig,
        staff_tags: tuple[str, ...],
    ) -> None:
        super().__init__(site, resident, seed=seed, config=config, staff_tags=staff_tags)
        self.rooms = [r for r in site.rooms if r in _ROOM_WEIGHTS]
        weights = [_ROOM_WEIGHTS[r] for r in self.rooms]
        self.cum = [sum(weights[: i + 1]) for i in range(len(weights))]

    def day(self, day: LocalDay, cond: DayConditions) -> tuple[list[Action], list[Incident]]:
        sink = Sink(day, self.site, self.resident.resident_id)
        plan = Plan(day, cond, sink, *self.wake_and_bed(day, cond))
        plan.visits = self._visits(plan)
        plan.stays = self.sleep(0, plan.wake, cond) + self._awake(plan)
        plan.stays += self.sleep(plan.bed, day.length, cond)
        self._presses(plan)
        if self.reshape:
            self.reshape(self, plan)
        if self.resident.dispenser:
            self._doses(plan)
        self.emit_stays(plan.stays, sink, cond.activity)
        for visit in plan.visits:
            self._emit_visit(visit, sink)
        pendant = self.resident.pendant or ""
        for press in plan.presses:
            sink.add(press.time, pendant, _T.SAFETY_ALARM, _K.BUTTON_PRESSED)
            if press.cancel is not None:
                sink.add(press.cancel, pendant, _T.SAFETY_ALARM, _K.ALARM_CANCELLED)
        return sink.actions, plan.incidents

    def staff_tag(self) -> str:
        return self.rng.choice(self.staff_tags)

    def _visits(self, plan: Plan) -> list[Visit]:
        p, rng, day = self.profile, self.rng, plan.day
        found = []
        for slot in p.home_care:
            if slot == "morning":
                a, d = plan.wake + rng.uniform(5, 40), rng.uniform(20, 45)
            elif slot == "midday" and day.date.weekday() not in p.day_centre:
                a, d = day.elapsed(rng.uniform(690, 780)), rng.uniform(10, 30)
            elif slot == "evening":
                a, d = day.elapsed(rng.uniform(990, 1080)), rng.uniform(10, 30)
            elif slot == "night":
                a, d = plan.bed - rng.uniform(25, 50), rng.uniform(10, 20)
            else:
                continue
            found.append(Visit(a, a + d, Actor.STAFF, self.staff_tag()))
        if rng.random() < p.relatives_per_week * (0.25 if day.weekend else 0.1):
            a = day.elapsed(rng.uniform(780, 1050))
            end = a + rng.uniform(45, 150)
            if plan.wake + 60 < a and end < plan.bed - 30:
                found.append(Visit(a, end, Actor.VISITOR, by_code=p.relative_has_code))
        kept: list[Visit] = []
        for visit in sorted(found, key=attrgetter("start")):
            if not kept or visit.start > kept[-1].end + 2:
                kept.append(visit)
        return kept

    def _outing(self, plan: Plan) -> list[Stay]:
        p, rng, day, cond = self.profile, self.rng, plan.day, plan.cond
        if not cond.outings:
            return []
        if day.date.weekday() in p.day_centre:
            s = day.elapsed(600 + rng.uniform(-15, 15))
            e = day.elapsed(870 + rng.uniform(-15, 15))
        elif rng.random() < p.outing_prob * cond.activity * (0.6 if day.weekend else 1.0):
            s = day.elapsed(rng.uniform(600, 930))
            e = s + clamp(rng.expovariate(1.0 / p.outing_mean), (20.0, 240.0))
        else:
            return []
        clash = any(s < v.end + 20 and v.start - 20 < e for v in plan.visits)
        if clash or s < plan.wake + 30 or e > plan.bed - 60:
            return []
        return [(s, e, OUT)]

    def _awake(self, plan: Plan) -> list[Stay]:
        p, rng, day, wake, bed = self.profile, self.rng, plan.day, plan.wake, plan.bed
        fixed = self._outing(plan)
        meals = (
            (wake + rng.uniform(10, 40), rng.uniform(15, 30), "kjokken"),
            (day.elapsed(p.lunch + rng.gauss(0, 20)), rng.uniform(15, 35), "kjokken"),
            (day.elapsed(p.dinner + rng.gauss(0, 20)), rng.uniform(20, 45), "kjokken"),
        )
        nap = plan.cond.nap_minutes
        if rng.random() < p.nap_prob + (1.0 - plan.cond.activity):
            nap += rng.uniform(20, 60)
        naps = (
            (day.elapsed(rng.uniform(810, 900)), min(nap, 150), BED),
            (day.elapsed(rng.uniform(620, 680)), nap - min(nap, 150), BED),
        )
        for s, d, place in (*meals, *naps):
            fits = d > 0 and wake <= s and s + d <= bed - 12
            if fits and all(s + d <= a or s >= b for a, b, _ in fixed):
                fixed.append((s, s + d, place))
        fixed.append((bed - rng.uniform(4, 10), bed, "soverom"))
        stays: list[Stay] = []
        t, mean = wake, p.stay_mean / plan.cond.activity
        for s, e, place in sorted(fixed):
            while t < s:
                end = min(t + max(2.0, rng.expovariate(1.0 / mean)), s)
                stays.append((t, end, rng.choices(self.rooms, cum_weights=self.cum)[0]))
                t = end
            stays.append((s, e, place))
            t = e
        return stays

    def _presses(self, plan: Plan) -> None:
        p, rng, day = self.profile, self.rng, plan.day
        for _ in range(poisson(rng, p.press_rate)):
            r = rng.random()
            if r < 0.5:  # most presses come in the morning
                t = day.elapsed(rng.uniform(480, 660))
            else:
                t = rng.uniform(plan.wake, plan.bed) if r < 0.9 else rng.uniform(20, plan.wake)
            if place_at(plan.stays, t)[2] in NOT_HOME:
                continue
            cancel = t + rng.uniform(0.1, 1.0) if rng.random() < p.press_cancel else None
            response = None
            if cancel is None and rng.random() < 0.5:  # else settled over the speech line
                a = t + rng.uniform(15, 40)
                response = Visit(a, a + rng.uniform(10, 30), Actor.STAFF, self.staff_tag())
                busy = any(
                    response.start < v.end + 2 and v.start < response.end + 2 for v in plan.visits
                )
                if busy or response.end > day.length - 2 or plan.away(a, response.end):
                    response = None
                else:
                    plan.visits.append(response)
            plan.presses.append(Press(t, cancel, response))

    def _doses(self, plan: Plan) -> None:
        p, rng, day, cond = self.profile, self.rng, plan.day, plan.cond
        device, window = self.resident.dispenser or "", self.config.dose_window
        for i, wall in enumerate(p.doses):
            due = day.elapsed(wall)
            detail = DoseDetail(
                f"{day.date:%Y%m%d}-{int(wall) // 60:02d}{int(wall) % 60:02d}", day.at(due)
            )
            plan.sink.add(
                due, device, _T.MEDICINE_DISPENSER, _K.DOSE_DUE, Actor.DEVICE, None, detail
            )
            taken = None
            miss = p.dose_miss if cond.dose_miss is None else cond.dose_miss
            if i not in cond.missed_doses and rng.random() >= miss:
                lag = rng.lognormvariate(math.log(p.dose_lag), 0.6) + cond.dose_extra_lag
                taken = self._when_home(plan, due + lag)
                if taken is not None and taken - due > window:
                    taken = None
            if taken is None:
                kind, at, actor = _K.DOSE_MISSED, due + window, Actor.DEVICE
            else:
                kind, at, actor = _K.DOSE_TAKEN, taken + 0.5, Actor.RESIDENT
                plan.stays = splice(plan.stays, taken, taken + 2, [(taken, taken + 2, "kjokken")])
            plan.sink.add(at, device, _T.MEDICINE_DISPENSER, kind, actor, None, detail)
            if cond.dose_key is not None and (not cond.missed_doses or i in cond.missed_doses):
                lag_minutes = None if taken is None else round(taken + 0.5 - due, 1)
                details = {
                    "dose_id": detail.dose_id,
                    "taken": taken is not None,
                    "lag": lag_minutes,
                }
                plan.incidents.append(Incident(cond.dose_key, day.at(due), day.at(at), details))

    def _when_home(self, plan: Plan, t: float) -> float | None:
        """The first moment from ``t`` with the resident at home and up for two minutes."""
        while t < plan.day.length - 3:
            blocking = [b for a, b, p in plan.stays if a < t + 2.5 and t < b and p in _ABSENT]
            if not blocking:
                return t
            t = max(blocking) + self.rng.uniform(1.0, 5.0)
        return None

    def transition(self, prev: str, place: str, a: float, sink: Sink) -> float:
        super().transition(prev, place, a, sink)
        site, slot, motion = self.site, self.resident.lock_slot, self.site.motion
        lock, door = site.lock or "", site.door or ""
        if place in (OUT, WANDER):
            if "gang" in motion:
                sink.add(a, motion["gang"], _T.MOTION_SENSOR, _K.MOTION, room="gang")
            sink.add(a + 0.2, lock, _T.DOOR_LOCK, _K.UNLOCKED, detail=LockDetail("manual"))
            sink.add(a + 0.4, door, _T.DOOR_SENSOR, _K.OPENED, room="gang")
            sink.add(a + 0.6, door, _T.DOOR_SENSOR, _K.CLOSED, room="gang")
            if place == OUT:  # locks from outside with the keypad; a wanderer does not
                sink.add(a + 0.9, lock, _T.DOOR_LOCK, _K.LOCKED, detail=LockDetail("keypad", slot))
        if prev in (OUT, WANDER):
            if prev == OUT:
                sink.add(a, lock, _T.DOOR_LOCK, _K.UNLOCKED, detail=LockDetail("keypad", slot))
            sink.add(a + 0.2, door, _T.DOOR_SENSOR, _K.OPENED, room="gang")
            sink.add(a + 0.4, door, _T.DOOR_SENSOR, _K.CLOSED, room="gang")
            if "gang" in motion:
                sink.add(a + 0.5, motion["gang"], _T.MOTION_SENSOR, _K.MOTION, room="gang")
            if prev == OUT or self.rng.random() < 0.5:
                sink.add(a + 0.7, lock, _T.DOOR_LOCK, _K.LOCKED, detail=LockDetail("manual"))
            return 1.0
        passing = "gang" in motion and place in motion and prev in motion
        if passing and "gang" not in (prev, place) and self.rng.random() < 0.5:
            sink.add(a + 0.05, motion["gang"], _T.MOTION_SENSOR, _K.MOTION, room="gang")
        return 0.3

    def _emit_visit(self, visit: Visit, sink: Sink) -> None:
        site, rng, a, b, who = self.site, self.rng, visit.start, visit.end, visit.actor
        lock, door = site.lock or "", site.door or ""
        opener: Actor = who
        detail = LockDetail("rf_tag", visit.tag)
        if who is not Actor.STAFF:
            opener = who if visit.by_code else Actor.RESIDENT  # or the resident lets them in
            detail = LockDetail("keypad", "slot-9") if visit.by_code else LockDetail("manual")
        sink.add(a, lock, _T.DOOR_LOCK, _K.UNLOCKED, opener, None, detail)
        sink.add(a + 0.2, door, _T.DOOR_SENSOR, _K.OPENED, who, "gang")
        sink.add(a + 0.4, door, _T.DOOR_SENSOR, _K.CLOSED, who, "gang")
        rooms = [r for r in ("gang", "kjokken", "stue", "bad", "soverom") if r in site.motion]
        for n in range(1 + int((b - a) / 8) if rooms else 0):
            room, t = rooms[0], a + 0.5
            if n:
                room, t = rng.choice(rooms), rng.uniform(a + 1, max(a + 1, b - 1))
            self.motions(room, t, 0, sink, actor=who, activity=0)
        sink.add(b, door, _T.DOOR_SENSOR, _K.OPENED, who, "gang")
        sink.add(b + 0.2, door, _T.DOOR_SENSOR, _K.CLOSED, who, "gang")
        if who is Actor.STAFF:
            sink.add(b + 0.4, lock, _T.DOOR_LOCK, _K.LOCKED, who, None, detail)
        else:
            sink.add(
                b + 0.4, lock, _T.DOOR_LOCK, _K.LOCKED, Actor.RESIDENT, None, LockDetail("manual")
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
