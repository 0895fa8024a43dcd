"""Residents' habits: ``Profile``, the distributions it is drawn from, and ``draw_profile``.

Times of day are local wall minutes after midnight. ``simulators.world`` gives each
resident a ``Profile`` when it builds the world; ``simulators.routine`` lives it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Profile:
    """A resident's personal routine. Times of day are local wall minutes after midnight."""

    wake: float
    wake_sd: float
    wake_range: tuple[float, float]
    """Each day's wake time is clamped to this range (illness may push it later)."""
    bed: float
    bed_sd: float
    bed_range: tuple[float, float]
    weekend_shift: float
    """Minutes later on Saturdays and Sundays (wake and bed)."""
    stay_mean: float
    """Mean minutes spent in one room before moving to another."""
    retrigger_mean: float
    """Mean minutes between motion reports while staying in one room."""
    night_toilet: float
    """Mean bathroom visits per night."""
    lunch: float
    dinner: float
    nap_prob: float
    outing_prob: float
    """Probability of going out (shopping, a walk) on a weekday; less on weekends."""
    outing_mean: float
    day_centre: frozenset[int]
    """Weekdays (0 is Monday) spent at a day centre, 10:00 to 14:30."""
    home_care: tuple[str, ...]
    """Daily home-care visit slots: ``morning``, ``midday``, ``evening``, ``night``."""
    relatives_per_week: float
    relative_has_code: bool
    doses: tuple[float, ...]
    """Dose times of the dispenser; empty when the resident has none."""
    dose_lag: float
    """Median minutes from a dose's reminder to taking it."""
    dose_miss: float
    press_rate: float
    """Pendant presses per day."""
    press_cancel: float
    """Probability that a press is cancelled at the pendant."""
    nurse_calls: float
    """Care homes: nurse calls per day from this resident's room."""


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """The distributions ``Profile``s are drawn from. Times are local wall minutes."""

    wake_range: tuple[float, float] = (390.0, 540.0)
    bed_range: tuple[float, float] = (1260.0, 1410.0)
    wake_jitter: tuple[float, float] = (5.0, 30.0)
    night_toilet: tuple[float, float] = (0.2, 3.0)
    stay_mean: tuple[float, float] = (12.0, 35.0)
    retrigger_mean: tuple[float, float] = (3.0, 8.0)
    outing_prob: tuple[float, float] = (0.05, 0.6)
    day_centre_share: float = 0.25
    home_care_share: float = 0.6
    relatives_per_week: tuple[float, float] = (0.0, 3.0)
    dispenser_share: float = 0.8
    doses_per_day: tuple[int, int] = (1, 4)
    dose_lag: tuple[float, float] = (2.0, 25.0)
    dose_miss: tuple[float, float] = (0.0, 0.05)
    presses_per_month: tuple[float, float] = (0.5, 2.5)
    frequent_presser_share: float = 0.03
    frequent_presses_per_month: tuple[float, float] = (10.0, 30.0)
    press_cancel: tuple[float, float] = (0.3, 0.8)
    nurse_calls: tuple[float, float] = (1.0, 6.0)


_DOSE_PLANS: dict[int, tuple[float, ...]] = {
    1: (540.0,),
    2: (540.0, 1200.0),
    3: (540.0, 840.0, 1200.0),
    4: (510.0, 750.0, 990.0, 1260.0),
}


def draw_profile(rng: random.Random, config: ProfileConfig, *, care_home: bool) -> Profile:
    """One resident's habits, drawn from ``config``."""
    c = config
    wake = rng.uniform(*c.wake_range)
    heavy = rng.random() < c.frequent_presser_share
    presses = rng.uniform(*(c.frequent_presses_per_month if heavy else c.presses_per_month))
    has_dispenser = not care_home and rng.random() < c.dispenser_share
    doses: tuple[float, ...] = ()
    if has_dispenser:
        plan = _DOSE_PLANS[rng.randint(*c.doses_per_day)]
        # The first dose is set to suit the resident: at least half an hour after waking.
        shift = max(0.0, round((wake + 30 - plan[0]) / 15) * 15)
        doses = tuple(min(t + shift, 1350.0) for t in plan)
    slots = ("morning", "midday", "evening", "night")
    home_care: tuple[str, ...] = ()
    if not care_home and rng.random() < c.home_care_share:
        home_care = tuple(s for s in slots if rng.random() < 0.5) or ("morning",)
    return Profile(
        wake=wake,
        wake_sd=rng.uniform(*c.wake_jitter),
        wake_range=c.wake_range,
        bed=rng.uniform(*c.bed_range),
        bed_sd=rng.uniform(10.0, 35.0),
        bed_range=c.bed_range,
        weekend_shift=rng.uniform(0.0, 45.0),
        stay_mean=rng.uniform(*c.stay_mean),
        retrigger_mean=rng.uniform(*c.retrigger_mean),
        night_toilet=rng.uniform(*c.night_toilet),
        lunch=rng.uniform(690.0, 780.0),
        dinner=rng.uniform(990.0, 1080.0),
        nap_prob=rng.uniform(0.0, 0.6),
        outing_prob=rng.uniform(*c.outing_prob),
        outing_mean=rng.uniform(40.0, 120.0),
        day_centre=frozenset(rng.sample(range(5), rng.randint(1, 2)))
        if not care_home and rng.random() < c.day_centre_share
        else frozenset(),
        home_care=home_care,
        relatives_per_week=rng.uniform(*c.relatives_per_week),
        relative_has_code=rng.random() < 0.3,
        doses=doses,
        dose_lag=rng.uniform(*c.dose_lag),
        dose_miss=rng.uniform(*c.dose_miss),
        press_rate=presses / 30.0,
        press_cancel=rng.uniform(*c.press_cancel),
        nurse_calls=rng.uniform(*c.nurse_calls) if care_home else 0.0,
    )
