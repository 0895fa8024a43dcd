"""A resident of a private home: meals, outings, visits, doses, the pendant.

``HomeRoutine`` plans a day as stays (see ``simulators.day``) with visits (home care,
relatives, staff answering a pendant) and pendant presses beside them; a ``Reshaper``
(``simulators.simulation.reshape``) applies the day's injected anomalies to the ``Plan``
before it is emitted as actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from devices.events import DeviceType, EventKind
from simulators.day import (
    BED,
    NOT_HOME,
    OUT,
    WANDER,
    DayConditions,
    Incident,
    ResidentRoutine,
    RoutineConfig,
    Sink,
    Stay,
    clamp,
    place_at,
    poisson,
    splice,
)
from simulators.world import Action, Actor, DoseDetail, LocalDay, LockDetail, Resident, Site

_ABSENT = NOT_HOME | {BED}
_ROOM_WEIGHTS = {"stue": 45, "kjokken": 20, "bad": 10, "soverom": 10, "gang": 8, "gjesterom": 3}
_T, _K = DeviceType, EventKind


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


Reshaper = Callable[["HomeRoutine", "Plan"], None]
"""Applies a day's injected anomalies to a plan (``simulators.simulation.reshape``)."""


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
