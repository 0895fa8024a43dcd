"""The simulated world: homes and care homes, their residents, devices and habits.

Everything here is data, drawn once from a seed by ``build_world``; a resident's habits
(``Profile``) are drawn by ``simulators.profile``. ``simulators.routine`` turns habits into
days of ``Action``s, and ``simulators.anomalies`` injects faults and anomalies with ground
truth. Ids are ASCII identifiers valid as ``devices.events`` ids; nobody has a name (no
personal data).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Literal
from zoneinfo import ZoneInfo

from devices.events import DeviceType, EventKind, is_identifier
from simulators.profile import Profile, ProfileConfig, draw_profile

__all__ = [
    "EXTRA_ROOM",
    "HOME_ROOMS",
    "Action",
    "Actor",
    "BatteryDetail",
    "CallDetail",
    "Detail",
    "Device",
    "DoseDetail",
    "FallDetail",
    "LocalDay",
    "LockDetail",
    "LockSource",
    "Profile",
    "ProfileConfig",
    "Resident",
    "Site",
    "SiteKind",
    "World",
    "WorldConfig",
    "build_world",
    "draw_profile",
    "local_days",
]

HOME_ROOMS = ("stue", "kjokken", "soverom", "bad", "gang")
"""Rooms of every home (ASCII ids); a sixth, ``gjesterom``, exists in some."""
EXTRA_ROOM = "gjesterom"

LockSource = Literal["keypad", "rf_tag", "app", "remote", "manual", "auto", "unknown"]


class SiteKind(StrEnum):
    HOME = "home"
    CARE_HOME = "care_home"


class Actor(StrEnum):
    """Who caused an action: motion sensors cannot tell, the ground truth can."""

    RESIDENT = "resident"
    STAFF = "staff"
    VISITOR = "visitor"
    DEVICE = "device"
    """The device itself: a dose reminder, a battery report, a test alarm."""


# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockDetail:
    source: LockSource
    user_ref: str | None = None
    reason: str | None = None
    """Why an unlock failed (``unlock_failed`` only)."""


@dataclass(frozen=True, slots=True)
class DoseDetail:
    dose_id: str
    scheduled_for: datetime


@dataclass(frozen=True, slots=True)
class CallDetail:
    address: str
    priority: int
    call_type: str


@dataclass(frozen=True, slots=True)
class BatteryDetail:
    level: int


@dataclass(frozen=True, slots=True)
class FallDetail:
    confidence: float


Detail = LockDetail | DoseDetail | CallDetail | BatteryDetail | FallDetail


@dataclass(frozen=True, slots=True)
class Action:
    """One thing that happened at a device, with the ground truth of who did it."""

    time: datetime
    """When it happened (UTC)."""
    site_id: str
    gateway_id: str
    resident_id: str | None
    """The resident it concerns; None for the site's own devices (the gateway)."""
    device_id: str
    device_type: DeviceType
    kind: EventKind
    actor: Actor = Actor.RESIDENT
    room: str | None = None
    """Where motion was seen (``motion``), or the door's room (``opened``/``closed``)."""
    detail: Detail | None = None


# --- time -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalDay:
    """One local calendar day, and the mapping of its wall clock to elapsed minutes.

    Routines work in minutes elapsed since local midnight, so that a day with a clock
    change simply lasts 1380 or 1500 minutes and times stay in order.
    """

    index: int
    date: date
    start: datetime
    """Local midnight, in UTC."""
    length: float = 1440.0
    """Minutes to the next local midnight."""
    shift_at: float = math.inf
    """Elapsed minute at which the wall clock jumps (a daylight-saving change)."""
    shift: float = 0.0
    """Minutes the wall clock jumps forward at ``shift_at`` (negative in autumn)."""

    @property
    def weekend(self) -> bool:
        return self.date.weekday() >= 5

    def elapsed(self, wall: float) -> float:
        """Elapsed minutes at a wall-clock minute (the first one if the hour repeats)."""
        if wall < self.shift_at:
            return wall
        return max(self.shift_at, wall - self.shift)

    def wall(self, elapsed: float) -> float:
        """The wall-clock minute at ``elapsed`` minutes after midnight."""
        return elapsed if elapsed < self.shift_at else elapsed + self.shift

    def at(self, elapsed: float) -> datetime:
        """The UTC time ``elapsed`` minutes after midnight, to the second, inside the day."""
        second = min(max(round(elapsed * 60), 0), round(self.length * 60) - 1)
        return self.start + timedelta(seconds=second)

    def minute_of(self, moment: datetime) -> float:
        """Elapsed minutes from this day's midnight to ``moment``."""
        return (moment - self.start).total_seconds() / 60


def local_days(start: date, days: int, timezone: str) -> list[LocalDay]:
    """``days`` local days from ``start`` in ``timezone`` (an IANA name)."""
    zone = ZoneInfo(timezone)
    out = []
    for i in range(days):
        d = start + timedelta(days=i)
        begin, end = _midnight(d, zone), _midnight(d + timedelta(days=1), zone)
        length = (end - begin).total_seconds() / 60
        if length == 1440:
            out.append(LocalDay(i, d, begin))
            continue
        offset = begin.astimezone(zone).utcoffset()
        changed = [_offset(begin, m, zone) != offset for m in range(int(length) + 1)]
        at = changed.index(True)
        out.append(LocalDay(i, d, begin, length, float(at), 1440 - length))
    return out


def _midnight(d: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(d, time(0), tzinfo=zone).astimezone(UTC)


def _offset(begin: datetime, minute: int, zone: ZoneInfo) -> timedelta | None:
    return (begin + timedelta(minutes=minute)).astimezone(zone).utcoffset()


# --- sites ------------------------------------------------------------------------------

_BATTERY_FREE = frozenset({DeviceType.MEDICINE_DISPENSER, DeviceType.NURSE_CALL})


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    device_type: DeviceType
    room: str | None = None
    resident_id: str | None = None
    """The resident a personal device belongs to (pendant, dispenser, bed sensor...)."""
    address: str | None = None
    """A nurse-call point's address in the nurse-call system (``2-104``)."""

    @property
    def battery(self) -> bool:
        """True if it runs on a battery (and reports its level)."""
        return self.device_type not in _BATTERY_FREE


@dataclass(frozen=True, slots=True)
class Resident:
    resident_id: str
    site_id: str
    profile: Profile
    pendant: str | None = None
    dispenser: str | None = None
    bed_sensor: str | None = None
    fall_detector: str | None = None
    call_point: str | None = None
    address: str | None = None
    """Care homes: the room's nurse-call address, also its motion sensor's room."""
    lock_slot: str | None = None
    """The resident's user slot on the front-door lock's keypad."""


@dataclass(frozen=True, slots=True)
class Site:
    """A home (one resident, or a couple) or a care home (one resident per room)."""

    site_id: str
    kind: SiteKind
    gateway_id: str
    residents: tuple[Resident, ...]
    devices: tuple[Device, ...]
    rooms: tuple[str, ...]
    """Every room a resident may be in; those in ``motion`` have a sensor."""
    motion: Mapping[str, str] = field(default_factory=dict)
    """Room to motion sensor id."""
    lock: str | None = None
    door: str | None = None
    smoke: str | None = None
    leak: str | None = None
    nurse_call_central: str | None = None

    def device(self, device_id: str) -> Device:
        for device in self.devices:
            if device.device_id == device_id:
                return device
        raise KeyError(device_id)


@dataclass(frozen=True, slots=True)
class World:
    sites: tuple[Site, ...]
    staff_tags: tuple[str, ...]
    """Key-tag ids of the home-care staff (``user_ref`` on the locks)."""
    timezone: str = "Europe/Oslo"

    @property
    def residents(self) -> tuple[Resident, ...]:
        return tuple(r for site in self.sites for r in site.residents)

    def site(self, site_id: str) -> Site:
        for site in self.sites:
            if site.site_id == site_id:
                return site
        raise KeyError(site_id)


@dataclass(frozen=True, slots=True)
class WorldConfig:
    homes: int = 100
    care_homes: int = 0
    care_home_rooms: tuple[int, int] = (10, 30)
    couples: float = 0.0
    """Share of homes where a couple lives."""
    motion_rooms: tuple[int, int] = (4, 6)
    bed_sensor: float = 0.5
    water_leak: float = 0.4
    fall_detector: float = 0.3
    staff: int = 40
    prefix: str = "sim"
    timezone: str = "Europe/Oslo"
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def build_world(config: WorldConfig, *, seed: int) -> World:
    """Draw homes, care homes, residents, devices and habits; the same seed, the same world."""
    rng = random.Random(f"world:{seed}")
    ids = _Ids(config.prefix)
    sites = [_home(i, config, rng, ids) for i in range(1, config.homes + 1)]
    sites += [_care_home(i, config, rng, ids) for i in range(1, config.care_homes + 1)]
    for site in sites:
        for device in site.devices:
            if not is_identifier(device.device_id):
                raise ValueError(f"not a valid device id: {device.device_id!r}")
    staff = tuple(f"staff-{k:03d}" for k in range(1, config.staff + 1))
    return World(sites=tuple(sites), staff_tags=staff, timezone=config.timezone)


class _Ids:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.residents = 0

    def resident(self) -> str:
        self.residents += 1
        return f"{self.prefix}-res-{self.residents:05d}"


def _home(index: int, config: WorldConfig, rng: random.Random, ids: _Ids) -> Site:
    site_id = f"{config.prefix}-home-{index:04d}"
    gw = f"{config.prefix}-gw-{index:04d}"
    sensors = rng.randint(*config.motion_rooms)
    rooms = (*HOME_ROOMS, EXTRA_ROOM) if sensors == 6 or rng.random() < 0.3 else HOME_ROOMS
    watched = list(rooms if sensors == 6 else HOME_ROOMS)
    if sensors == 4:
        watched.remove(rng.choice(("gang", "soverom")))
    motion = {room: f"{gw}-motion-{room}" for room in watched}
    devices = [Device(d, DeviceType.MOTION_SENSOR, room=r) for r, d in motion.items()]
    devices += [
        Device(f"{gw}-lock", DeviceType.DOOR_LOCK, room="gang"),
        Device(f"{gw}-door", DeviceType.DOOR_SENSOR, room="gang"),
        Device(f"{gw}-smoke", DeviceType.SMOKE_DETECTOR, room="kjokken"),
    ]
    leak = f"{gw}-leak" if rng.random() < config.water_leak else None
    if leak:
        devices.append(Device(leak, DeviceType.WATER_LEAK_SENSOR, room="bad"))
    residents = []
    for n in range(1, 3 if rng.random() < config.couples else 2):
        resident, own = _home_resident(site_id, gw, n=n, config=config, rng=rng, ids=ids)
        residents.append(resident)
        devices += own
    return Site(
        site_id=site_id,
        kind=SiteKind.HOME,
        gateway_id=gw,
        residents=tuple(residents),
        devices=tuple(devices),
        rooms=rooms,
        motion=motion,
        lock=f"{gw}-lock",
        door=f"{gw}-door",
        smoke=f"{gw}-smoke",
        leak=leak,
    )


def _home_resident(
    site_id: str, gw: str, *, n: int, config: WorldConfig, rng: random.Random, ids: _Ids
) -> tuple[Resident, list[Device]]:
    rid = ids.resident()
    profile = draw_profile(rng, config.profile, care_home=False)
    suffix = "" if n == 1 else f"-{n}"
    own = [Device(f"{gw}-pendant{suffix}", DeviceType.SAFETY_ALARM, resident_id=rid)]
    if profile.doses:
        own.append(Device(f"{gw}-dispenser{suffix}", DeviceType.MEDICINE_DISPENSER, "kjokken", rid))
    if rng.random() < config.bed_sensor:
        own.append(Device(f"{gw}-bed{suffix}", DeviceType.BED_SENSOR, "soverom", rid))
    if rng.random() < config.fall_detector:
        own.append(Device(f"{gw}-fall{suffix}", DeviceType.FALL_DETECTOR, resident_id=rid))
    by_type = {d.device_type: d.device_id for d in own}
    resident = Resident(
        resident_id=rid,
        site_id=site_id,
        profile=profile,
        pendant=by_type[DeviceType.SAFETY_ALARM],
        dispenser=by_type.get(DeviceType.MEDICINE_DISPENSER),
        bed_sensor=by_type.get(DeviceType.BED_SENSOR),
        fall_detector=by_type.get(DeviceType.FALL_DETECTOR),
        lock_slot=f"slot-{n}",
    )
    return resident, own


def _care_home(index: int, config: WorldConfig, rng: random.Random, ids: _Ids) -> Site:
    site_id = f"{config.prefix}-care-{index:02d}"
    gw = f"{config.prefix}-cgw-{index:02d}"
    central = f"{gw}-nursecall"
    devices = [Device(central, DeviceType.NURSE_CALL)]
    residents, motion = [], {}
    for k in range(rng.randint(*config.care_home_rooms)):
        floor = 1 + k // 15
        address = f"{floor}-{floor}{k % 15 + 1:02d}"
        rid = ids.resident()
        point, sensor, bed = f"{gw}-call-{address}", f"{gw}-motion-{address}", f"{gw}-bed-{address}"
        motion[address] = sensor
        devices += [
            Device(point, DeviceType.NURSE_CALL, room=address, resident_id=rid, address=address),
            Device(sensor, DeviceType.MOTION_SENSOR, room=address),
            Device(bed, DeviceType.BED_SENSOR, room=address, resident_id=rid),
        ]
        profile = draw_profile(rng, config.profile, care_home=True)
        residents.append(
            Resident(rid, site_id, profile, bed_sensor=bed, call_point=point, address=address)
        )
    return Site(
        site_id=site_id,
        kind=SiteKind.CARE_HOME,
        gateway_id=gw,
        residents=tuple(residents),
        devices=tuple(devices),
        rooms=tuple(motion),
        motion=motion,
        nurse_call_central=central,
    )
