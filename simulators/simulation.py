"""The simulation: every site's routine, day by day, with the injections applied.

``day_conditions`` turns a resident's injections into each day's ``DayConditions``;
``reshape`` applies the day's falls, night wandering, smoke and leaks to a home
resident's plan; device and gateway faults are applied to a site's actions. ``Simulation``
runs it all and records one ``Label`` per injection: what really happened, with times
taken from the generated actions. ``fault_edges`` places the faults that a live run
carries out (power loss, uplink outage, silent devices) in a site's timeline.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from operator import attrgetter
from typing import Any

from pydantic import JsonValue

from devices.events import DeviceType, EventKind
from simulators.day import (
    BED,
    FALLEN,
    NOT_HOME,
    OUT,
    WANDER,
    DayConditions,
    Incident,
    RoutineConfig,
    Timed,
    place_at,
    splice,
)
from simulators.home import HomeRoutine, Plan, Press, Visit
from simulators.injection import DOSE_ANOMALIES, AnomalyType, Injection, Label
from simulators.routine import SiteRoutine
from simulators.world import Action, Actor, FallDetail, LocalDay, Site, World, local_days

A = AnomalyType
_FAULTS = frozenset({A.SILENT_DEVICE, A.LOCK_JAM, A.POWER_LOSS, A.UPLINK_OUTAGE})
_ACTED = frozenset({AnomalyType.POWER_LOSS, AnomalyType.UPLINK_OUTAGE, AnomalyType.SILENT_DEVICE})
"""Faults that a live run carries out (``simulators.site``); the others change the actions."""


# --- a resident's day under its injections ----------------------------------------------


def day_conditions(injections: Sequence[Injection], day: int) -> DayConditions:
    """The conditions of ``day`` for a resident with these injections."""
    cond = DayConditions()
    for inj in injections:
        k = day - inj.day
        if not 0 <= k < inj.days:
            continue
        p, timed = inj.params, Timed(inj.key, inj.minute, inj.duration)
        if inj.type is A.ILLNESS:
            s = p["severity"] * (0.5 if k in (0, inj.days - 1) else 1.0)  # onset and recovery
            cond = replace(
                cond,
                activity=cond.activity * (1 - 0.5 * s),
                wake_delay=cond.wake_delay + 90 * s,
                bed_advance=cond.bed_advance + 60 * s,
                nap_minutes=cond.nap_minutes + 120 * s,
                outings=False,
            )
        elif inj.type is A.GRADUAL_DECLINE:
            frac = min(1.0, (k + 1) / p["ramp_days"])
            activity = cond.activity * (1 - (1 - p["final_activity"]) * frac)
            cond = replace(cond, activity=activity, wake_delay=cond.wake_delay + 30 * frac)
        elif inj.type is A.DECLINING_ADHERENCE:
            frac = (k + 1) / inj.days
            lag, miss = p["max_extra_lag"] * frac, p["max_miss"] * frac
            cond = replace(cond, dose_key=inj.key, dose_extra_lag=lag, dose_miss=miss)
        elif inj.type is A.MISSED_DOSES:
            cond = replace(cond, dose_key=inj.key, missed_doses=_missed_slots(inj, k))
        elif inj.type is A.BATTERY_DRAIN and k == 0:
            cond = replace(cond, pendant_drain=(inj.key, p["extra_drain"]))
        elif inj.type in _TIMED:
            name = _TIMED[inj.type]
            more: dict[str, Any] = {name: (*getattr(cond, name), timed)}
            cond = replace(cond, **more)
    return cond


_TIMED = {A.FALL: "falls", A.NIGHT_WANDERING: "wanders", A.SMOKE: "smoke", A.WATER_LEAK: "leaks"}


def _missed_slots(inj: Injection, k: int) -> frozenset[int]:
    p = inj.params
    first, count, per_day = int(p["slot"]), int(p["count"]), int(p["per_day"])
    return frozenset(g % per_day for g in range(first, first + count) if g // per_day == k)


def reshape(routine: HomeRoutine, plan: Plan) -> None:
    """Apply the day's falls, night wandering, smoke and leaks to a home resident's plan."""
    for spec in plan.cond.falls:
        _fall(routine, plan, spec)
    for spec in plan.cond.wanders:
        _wander(routine, plan, spec)
    day, sink = plan.day, plan.sink
    for spec in plan.cond.smoke:
        t, end = day.elapsed(spec.minute), day.elapsed(spec.minute) + spec.duration
        cooking = not plan.away(t - 10, end) and all(
            p != BED for a, b, p in plan.stays if a < end and t - 10 < b
        )
        if cooking:
            plan.stays = splice(plan.stays, t - 10, end, [(t - 10, end, "kjokken")])
        actor = Actor.RESIDENT if cooking else Actor.DEVICE
        sink.add(t, routine.site.smoke or "", DeviceType.SMOKE_DETECTOR, EventKind.SMOKE, actor)
        plan.incidents.append(Incident(spec.key, day.at(t), day.at(end), {"cooking": cooking}))
    for spec in plan.cond.leaks:
        t = day.elapsed(spec.minute)
        leak, kind = routine.site.leak or "", EventKind.WATER_LEAK
        sink.add(t, leak, DeviceType.WATER_LEAK_SENSOR, kind, Actor.DEVICE)
        plan.incidents.append(Incident(spec.key, day.at(t), day.at(t + spec.duration)))


def _fall(routine: HomeRoutine, plan: Plan, spec: Timed) -> None:
    """A fall, then nobody moves until a visitor finds them, a press, or they get up."""
    day, rng = plan.day, routine.rng
    t = _fall_time(routine, plan, day.elapsed(spec.minute))
    end = min(t + spec.duration, day.length - 5)
    finder = min(
        (v for v in plan.visits if t < v.start <= end), key=attrgetter("start"), default=None
    )
    found = "pendant" if rng.random() < 0.5 else "self"
    if finder is not None:
        end, finder.by_code = finder.start, True  # relatives who find them have the code
        found = "home_care" if finder.actor is Actor.STAFF else "relative"
    lying, response = end, None
    if found == "pendant" and end + 60 < day.length:
        arrive = end + rng.uniform(15, 40)
        response = Visit(arrive, arrive + rng.uniform(20, 45), Actor.STAFF, routine.staff_tag())
        lying = arrive
    plan.drop_presses(lambda press: t <= press.time < lying)
    if found == "pendant":
        plan.presses.append(Press(end, None, response))
        if response:
            plan.visits.append(response)
    room, start, steps = place_at(plan.stays, t)[2], t, []
    if room == BED:  # got up in the night, fell on the way to the bathroom
        room, start = rng.choice(("gang", "bad")), t - rng.uniform(2, 5)
        steps = [(start, start + 1, "soverom"), (start + 1, t, room)]
    plan.stays = splice(plan.stays, start, lying, [*steps, (t, lying, FALLEN)])
    # Nobody goes shopping or to the day centre after lying on the floor for hours.
    plan.stays = [(a, b, "stue" if p == OUT and b > t else p) for a, b, p in plan.stays]
    detector = routine.resident.fall_detector
    detected = detector is not None and rng.random() < routine.config.fall_detection
    if detector and detected:
        detail = FallDetail(round(rng.uniform(0.6, 0.99), 2))
        plan.sink.add(t + 0.05, detector, DeviceType.FALL_DETECTOR, EventKind.FALL, detail=detail)
    details = {
        "found_by": found,
        "detected": detected,
        "room": room,
        "night": not plan.wake <= t < plan.bed,
        "inactive_minutes": round(end - t, 1),
    }
    plan.incidents.append(Incident(spec.key, day.at(t), day.at(end), details))


def _fall_time(routine: HomeRoutine, plan: Plan, t: float) -> float:
    """The planned time, moved to when the resident is at home, alone and not in a visit."""
    rng = routine.rng
    for _ in range(8):
        _, end, place = place_at(plan.stays, t)
        visit = next((v for v in plan.visits if v.start - 2 <= t <= v.end + 2), None)
        if place in NOT_HOME:
            t = end + rng.uniform(10, 30)
        elif visit is not None:
            t = visit.end + rng.uniform(10, 30)
        elif t > plan.day.length - 70:
            t = rng.uniform(60, max(61, plan.wake - 30))  # too late today: a fall at night
        else:
            break
    return t


def _wander(routine: HomeRoutine, plan: Plan, spec: Timed) -> None:
    """Out of bed at night and out of the front door, unlocked, for a while."""
    day = plan.day
    t = day.elapsed(spec.minute)
    _, end_of_stay, place = place_at(plan.stays, t)
    if place != BED:
        t = end_of_stay + 5
    end = min(t + spec.duration, day.length - 10)
    steps = [(t - 3, t - 2, "soverom"), (t - 2, t, "gang"), (t, end, WANDER)]
    steps += [(end, end + 2, "gang"), (end + 2, end + 3, "soverom")]
    plan.stays = splice(plan.stays, t - 3, end + 3, steps)
    plan.drop_presses(lambda press: t - 3 <= press.time < end + 3)
    plan.visits = [v for v in plan.visits if v.start >= end + 5 or v.end <= t - 5]
    details = {"minutes_out": round(end - t, 1), "back_before_waking": end < plan.wake}
    # The label runs from the door opening on the way out to its opening on the way back.
    plan.incidents.append(Incident(spec.key, day.at(t + 0.4), day.at(end + 0.2), details))


# --- the simulation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Window:
    injection: Injection
    start: datetime
    end: datetime


class Simulation:
    """Every site's actions, day by day, with the injections applied.

    Deterministic for a world, period, seed and injections; a site's stream depends on
    that site alone, so ``site_actions`` feeds one gateway and ``actions`` all of them in
    time order (holding one day per site in memory). A site's labels are added to
    ``labels`` when its stream has been consumed to the end.
    """

    def __init__(
        self,
        world: World,
        *,
        start: date,
        days: int,
        seed: int,
        injections: Sequence[Injection] = (),
        config: RoutineConfig | None = None,
    ) -> None:
        if days < 1:
            raise ValueError("the period must last at least one day")
        self.world, self.seed, self.config = world, seed, config
        self.days = local_days(start, days, world.timezone)
        self.end = self.days[-1].start + timedelta(minutes=self.days[-1].length)
        self._by_site: dict[str, list[Injection]] = defaultdict(list)
        for injection in injections:
            if not 0 <= injection.day < days:
                raise ValueError(f"injection {injection.key} starts outside the period")
            self._by_site[injection.site_id].append(injection)
        self._labels: list[Label] = []

    @property
    def labels(self) -> list[Label]:
        """The labels recorded so far, by start time."""
        return sorted(self._labels, key=attrgetter("start", "site_id"))

    def actions(self) -> Iterator[Action]:
        """All sites' actions in time order."""
        streams = [self.site_actions(site) for site in self.world.sites]
        return heapq.merge(*streams, key=attrgetter("time"))

    def site_actions(self, site: Site) -> Iterator[Action]:
        """One site's actions in time order, then its labels are recorded."""
        injections = self._by_site.get(site.site_id, [])
        routine = SiteRoutine(
            site, seed=self.seed, staff_tags=self.world.staff_tags, config=self.config,
            reshape=reshape,
        )  # fmt: skip
        residents: dict[str, list[Injection]] = defaultdict(list)
        for injection in injections:
            if injection.resident_id and injection.type not in _FAULTS:
                residents[injection.resident_id].append(injection)
        windows = [self._window(i) for i in injections if i.type in _FAULTS]
        incidents: dict[int, list[Incident]] = defaultdict(list)
        for day in self.days:
            conditions = {rid: day_conditions(inj, day.index) for rid, inj in residents.items()}
            actions, reported = routine.day(day, conditions)
            for incident in reported:
                incidents[incident.key].append(incident)
            day_end = day.start + timedelta(minutes=day.length)
            for window in windows:
                if window.start < day_end and window.end > day.start:
                    actions = _fault(window, actions, site, day, incidents)
            yield from actions
        self._labels += [self._label(site, i, incidents[i.key]) for i in injections]

    def _window(self, injection: Injection) -> _Window:
        day = self.days[injection.day]
        start = day.at(day.elapsed(injection.minute))
        return _Window(injection, start, start + timedelta(seconds=round(injection.duration * 60)))

    def _label(self, site: Site, inj: Injection, incidents: list[Incident]) -> Label:
        first, last = self.days[inj.day], self.days[min(inj.day + inj.days, len(self.days)) - 1]
        start, end = first.start, last.start + timedelta(minutes=last.length)
        if inj.days == 1 and inj.type not in DOSE_ANOMALIES:
            window = self._window(inj)
            start, end = window.start, window.end
        details: dict[str, JsonValue] = dict(inj.params)
        events = {str(i.details.get("event")): i.start for i in incidents}
        if inj.type in _TIMED and incidents:
            start, end = incidents[0].start, incidents[0].end
            details.update(incidents[0].details)
        elif inj.type in DOSE_ANOMALIES:
            details["doses"] = [dict(i.details) for i in incidents]
            if inj.type is A.MISSED_DOSES and incidents:
                start, end = incidents[0].start, incidents[-1].end
        elif inj.type is A.BATTERY_DRAIN:
            start, end = events.get("drain_started", start), events.get("replaced", self.end)
            for event in ("low", "flat", "replaced"):
                details[f"{event}_at"] = events[event].isoformat() if event in events else None
        elif inj.type is A.LOCK_JAM:
            jams = [i.start for i in incidents]
            details["jammed_reports"] = len(jams)
            details["first_jammed_at"] = jams[0].isoformat() if jams else None
        return Label(
            type=inj.type,
            site_id=site.site_id,
            gateway_id=site.gateway_id,
            resident_id=inj.resident_id,
            device_id=inj.device_id,
            start=start,
            end=min(end, self.end),
            details=details,
        )


def _fault(
    window: _Window,
    actions: list[Action],
    site: Site,
    day: LocalDay,
    incidents: dict[int, list[Incident]],
) -> list[Action]:
    """Apply a device or gateway fault to one day's actions of its site."""
    inj, start, end = window.injection, window.start, window.end
    if inj.type is A.POWER_LOSS:  # everything silent, then the gateway says so
        kept = [a for a in actions if not start <= a.time < end]
        if day.start <= end < day.start + timedelta(minutes=day.length):
            gw = site.gateway_id
            kept.append(
                Action(end, site.site_id, gw, None, gw, DeviceType.GATEWAY,
                       EventKind.POWER_RESTORED, Actor.DEVICE)
            )  # fmt: skip
            kept.sort(key=attrgetter("time"))
        return kept
    if inj.type is A.SILENT_DEVICE:
        return [a for a in actions if a.device_id != inj.device_id or not start <= a.time < end]
    if inj.type is A.LOCK_JAM:  # the bolt will not throw: every locking attempt reports it
        out = []
        for a in actions:
            if (
                a.device_id == inj.device_id
                and a.kind is EventKind.LOCKED
                and start <= a.time < end
            ):
                a = replace(a, kind=EventKind.JAMMED, actor=Actor.DEVICE, detail=None)  # noqa: PLW2901
                incidents[inj.key].append(Incident(inj.key, a.time, a.time, {"event": "jammed"}))
            out.append(a)
        return out
    return actions  # an uplink outage delays delivery (the edge queues): a label only


# --- faults carried out live (simulators.site) ------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultEdge:
    """The beginning or the end of a fault window, in a site's timeline."""

    time: datetime
    injection: Injection
    begins: bool


def fault_edges(
    simulation: Simulation, injections: Sequence[Injection], site_id: str
) -> list[FaultEdge]:
    """The windows of the faults carried out at ``site_id``, placed as ``Simulation``
    places them (it drops the actions inside them)."""
    edges = []
    for injection in injections:
        if injection.site_id == site_id and injection.type in _ACTED:
            day = simulation.days[injection.day]
            start = day.at(day.elapsed(injection.minute))
            end = start + timedelta(seconds=round(injection.duration * 60))
            edges += [FaultEdge(start, injection, True), FaultEdge(end, injection, False)]
    return sorted(edges, key=attrgetter("time"))
