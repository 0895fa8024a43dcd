"""Injected anomalies and faults, their ground truth, and the simulation that runs them.

``plan_anomalies`` draws ``Injection``s from a seed: a rate per target, or an exact count
per type (the evaluation needs enough cases of each). ``Simulation`` runs every site's
routine day by day, shapes the residents' days by the injections (falls, illness,
wandering, doses, decline, smoke, leaks), applies device and gateway faults to the
actions, and records one ``Label`` per injection: what really happened, with times
taken from the generated actions. Labels are written as JSON lines by ``write_labels``.

This module holds the planning and ``simulate`` and re-exports the rest: the types and
labels are in ``simulators.injection``, ``Simulation`` and ``reshape`` in
``simulators.simulation``.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping
from datetime import date

from simulators.day import RoutineConfig, poisson
from simulators.injection import (
    DOSE_ANOMALIES,
    AnomalyType,
    Injection,
    Label,
    read_labels,
    write_labels,
)
from simulators.simulation import Simulation, day_conditions, reshape
from simulators.world import Site, SiteKind, World

__all__ = [
    "DEFAULT_RATES",
    "AnomalyType",
    "Injection",
    "Label",
    "Simulation",
    "day_conditions",
    "plan_anomalies",
    "read_labels",
    "reshape",
    "simulate",
    "write_labels",
]

A = AnomalyType

DEFAULT_RATES: Mapping[AnomalyType, float] = {
    A.FALL: 0.1,
    A.ILLNESS: 0.05,
    A.NIGHT_WANDERING: 0.05,
    A.MISSED_DOSES: 0.15,
    A.DECLINING_ADHERENCE: 0.03,
    A.GRADUAL_DECLINE: 0.02,
    A.SMOKE: 0.02,
    A.WATER_LEAK: 0.02,
    A.BATTERY_DRAIN: 0.02,
    A.SILENT_DEVICE: 0.005,
    A.LOCK_JAM: 0.02,
    A.POWER_LOSS: 0.05,
    A.UPLINK_OUTAGE: 0.1,
}
"""Expected cases per eligible target (resident, site or device) per 30 days."""


# --- planning ---------------------------------------------------------------------------


def plan_anomalies(
    world: World,
    *,
    days: int,
    seed: int,
    counts: Mapping[AnomalyType, int] | None = None,
    rates: Mapping[AnomalyType, float] | None = None,
) -> list[Injection]:
    """Injections over ``days`` days: exactly ``counts[type]`` of a counted type, else
    Poisson with ``rates[type]`` per target per 30 days (``DEFAULT_RATES`` when neither
    is given). Two injections never overlap at one site, so each label stands alone.
    Raises ``ValueError`` when a count cannot be placed without overlap.
    """
    if days < 1:
        raise ValueError("the period must last at least one day")
    if rates is None:
        rates = DEFAULT_RATES if counts is None else {}
    planner = _Planner(world, days, random.Random(f"anomalies:{seed}"))
    for kind in AnomalyType:
        targets = planner.targets(kind)
        if counts is not None and kind in counts:
            for _ in range(counts[kind]):
                planner.place(kind, targets, None)
        elif rates.get(kind, 0.0) > 0:
            for target in targets:
                for _ in range(poisson(planner.rng, rates[kind] * days / 30)):
                    planner.place(kind, targets, target)
    return planner.placed


_Target = tuple[Site, str | None, str | None]  # site, resident id, device id


class _Planner:
    def __init__(self, world: World, days: int, rng: random.Random) -> None:
        self.world, self.days, self.rng = world, days, rng
        self.placed: list[Injection] = []
        self.busy: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def targets(self, kind: AnomalyType) -> list[_Target]:  # noqa: PLR0911 - a table by type
        sites = self.world.sites
        homes = [s for s in sites if s.kind is SiteKind.HOME]
        alone = [(s, s.residents[0]) for s in homes if len(s.residents) == 1]
        if kind in DOSE_ANOMALIES:
            return [(s, r.resident_id, r.dispenser) for s, r in alone if r.dispenser]
        if kind is A.BATTERY_DRAIN:
            return [(s, r.resident_id, r.pendant) for s, r in alone if r.pendant]
        if kind is A.WATER_LEAK:
            return [(s, r.resident_id, s.leak) for s, r in alone if s.leak]
        if kind is A.SMOKE:
            return [(s, r.resident_id, s.smoke) for s, r in alone]
        if kind is A.FALL:
            return [(s, r.resident_id, r.fall_detector) for s, r in alone]
        if kind is A.SILENT_DEVICE:
            return [(s, d.resident_id, d.device_id) for s in sites for d in s.devices]
        if kind is A.LOCK_JAM:
            return [(s, None, s.lock) for s in homes]
        if kind in (A.POWER_LOSS, A.UPLINK_OUTAGE):
            return [(s, None, None) for s in sites]
        return [(s, r.resident_id, None) for s, r in alone]

    def place(self, kind: AnomalyType, targets: list[_Target], target: _Target | None) -> None:
        """Place one case, on ``target`` or on any of ``targets``; a given target may refuse."""
        for _ in range(20 if target else 300):
            if not targets:
                break
            site, resident_id, device_id = target or self.rng.choice(targets)
            day, minute, duration, days, params = self._when(kind, site, resident_id)
            start = day * 1440 + minute - 60
            end = day * 1440 + minute + (days * 1440 if days > 1 else duration) + 60
            if kind is A.FALL:  # the routine may move a fall to later that day, or the night
                start, end = day * 1440 - 60, day * 1440 + 1500
            if all(end <= a or start >= b for a, b in self.busy[site.site_id]):
                self.busy[site.site_id].append((start, end))
                self.placed.append(
                    Injection(
                        len(self.placed), kind, site.site_id, resident_id, device_id,
                        day, minute, duration, days, params,
                    )
                )  # fmt: skip
                return
        if target is None:
            raise ValueError(
                f"cannot place another {kind.value} without overlapping another injection: "
                "too few eligible targets or days for the requested count"
            )

    def _when(  # noqa: PLR0911 - one return per anomaly type, read as a table
        self, kind: AnomalyType, site: Site, resident_id: str | None
    ) -> tuple[int, float, float, int, dict[str, float]]:
        """(first day, wall minute, minutes, days, params) for one case of ``kind``."""
        rng, period, u = self.rng, self.days, self.rng.uniform
        profile = next((r.profile for r in site.residents if r.resident_id == resident_id), None)
        day = rng.randrange(period)
        if kind is A.FALL:
            wake = profile.wake if profile else 480.0
            minute = u(30, 300) if rng.random() < 0.35 else u(wake + 60, 1320)
            return day, minute, min(u(60, 360), 1430 - minute), 1, {}
        if kind is A.NIGHT_WANDERING:
            return day, u(30, 270), u(5, 30) if rng.random() < 0.7 else u(60, 240), 1, {}
        if kind is A.SMOKE:
            return day, (profile.dinner if profile else 1020.0) + u(-20, 20), u(3, 15), 1, {}
        if kind is A.WATER_LEAK:
            return day, u(420, 1320), u(30, 600), 1, {}
        if kind is A.MISSED_DOSES:
            per_day = len(profile.doses) if profile else 1
            count, slot = rng.randint(2, 6), rng.randrange(per_day)
            days = math.ceil((slot + count) / per_day)
            first = rng.randint(0, max(period - days, 0))
            return first, 0.0, 0.0, days, {"count": count, "slot": slot, "per_day": per_day}
        if kind is A.BATTERY_DRAIN:  # busy until the battery is surely replaced
            rate = u(4.0, 10.0)
            return (
                day,
                0.0,
                0.0,
                max(min(math.ceil(100 / rate) + 5, period - day), 1),
                {"extra_drain": rate},
            )
        if kind in (A.ILLNESS, A.DECLINING_ADHERENCE, A.GRADUAL_DECLINE):
            return self._spell(kind)
        longest = {A.SILENT_DEVICE: 4320, A.LOCK_JAM: 2880, A.POWER_LOSS: 480}.get(kind, 720)
        return day, u(0, 1440), u(10 if kind is A.POWER_LOSS else 120, longest), 1, {}

    def _spell(self, kind: AnomalyType) -> tuple[int, float, float, int, dict[str, float]]:
        rng, period, u = self.rng, self.days, self.rng.uniform
        low, high = {A.ILLNESS: (3, 10), A.DECLINING_ADHERENCE: (10, 21)}.get(kind, (21, 60))
        n = min(rng.randint(low, high), period)
        first = rng.randint(0, period - n)
        if kind is A.ILLNESS:
            return first, 0.0, 0.0, n, {"severity": u(0.4, 1.0)}
        if kind is A.DECLINING_ADHERENCE:
            return first, 0.0, 0.0, n, {"max_extra_lag": u(25, 50), "max_miss": u(0.2, 0.5)}
        # A decline does not recover: it lasts to the end of the period.
        return first, 0.0, 0.0, period - first, {"ramp_days": n, "final_activity": u(0.45, 0.7)}


def simulate(
    world: World,
    *,
    start: date,
    days: int,
    seed: int,
    counts: Mapping[AnomalyType, int] | None = None,
    rates: Mapping[AnomalyType, float] | None = None,
    config: RoutineConfig | None = None,
) -> Simulation:
    """Plan anomalies (see ``plan_anomalies``) and return the simulation that injects them."""
    injections = plan_anomalies(world, days=days, seed=seed, counts=counts, rates=rates)
    return Simulation(
        world, start=start, days=days, seed=seed, injections=injections, config=config
    )
