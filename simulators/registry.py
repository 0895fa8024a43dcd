"""What the hub and each simulated gateway are told about a simulated world.

``registry(world, seed=)`` is the hub's side: districts, sites, residents, gateways and
devices in the format of ``telecare admin import`` (``hub.admin.RegistryFile``), with
invented display names (no real person, no address). ``wire(site)`` is the gateway's
side: which transport reaches each device, as a real installer would set it up:

- pendants are zones of a social-alarm unit reporting over SIA DC-09 (the unit itself is
  the device ``<gateway>-alarm``, which the world does not model: it only carries them);
- each medicine dispenser has its own serial line, the care home's nurse-call central
  one ESPA 4.4.4 line with a call address per room;
- everything else (motion, door, lock, smoke, leak, bed, fall) is a Zigbee device behind
  Zigbee2MQTT, its friendly name the device id without the gateway prefix.

``edge_toml(...)`` writes that wiring as the gateway's ``edge.toml`` (docs/deploy/), and
``zigbee_messages`` / ``SiteWiring.sia_report`` say how an action reads in the device's
own protocol: the state fields a Zigbee device publishes, the report an alarm unit sends.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from devices.events import DeviceType, EventKind
from devices.zigbee2mqtt.locks import NO_USER
from simulators.devices.nurse_call import DEFAULT_CLEARED_STATUS
from simulators.world import Action, BatteryDetail, Device, LockDetail, Site, SiteKind, World

_FIRST = (
    "Kari",
    "Ola",
    "Ingrid",
    "Per",
    "Solveig",
    "Arne",
    "Astrid",
    "Knut",
    "Randi",
    "Odd",
    "Gunvor",
    "Leif",
    "Bjørg",
    "Terje",
    "Aud",
    "Rolf",
)
_LAST = (
    "Hansen",
    "Johansen",
    "Olsen",
    "Larsen",
    "Andersen",
    "Pedersen",
    "Nilsen",
    "Berg",
    "Dahl",
    "Lien",
    "Moen",
    "Haugen",
)

_LABELS: Mapping[DeviceType, str] = {
    DeviceType.SAFETY_ALARM: "Trygghetsalarm",
    DeviceType.MEDICINE_DISPENSER: "Medisindispenser",
    DeviceType.DOOR_LOCK: "Ytterdør lås",
    DeviceType.DOOR_SENSOR: "Ytterdør",
    DeviceType.MOTION_SENSOR: "Bevegelse",
    DeviceType.BED_SENSOR: "Sengesensor",
    DeviceType.FALL_DETECTOR: "Fallsensor",
    DeviceType.SMOKE_DETECTOR: "Røykvarsler",
    DeviceType.WATER_LEAK_SENSOR: "Vannlekkasje",
    DeviceType.NURSE_CALL: "Sykesignal",
}

_SERIAL = frozenset({DeviceType.MEDICINE_DISPENSER, DeviceType.NURSE_CALL})


@dataclass(frozen=True, slots=True)
class SiteWiring:
    """How one gateway reaches its site's devices."""

    gateway_id: str
    zigbee: Mapping[str, str] = field(default_factory=dict)
    """Device id to Zigbee2MQTT friendly name."""
    dispensers: Mapping[str, str] = field(default_factory=dict)
    """Dispenser device id to the name of its serial port (a symlink under ``dev/``)."""
    central: str | None = None
    """The nurse-call central's device id; its port is named ``nursecall``."""
    call_points: Mapping[str, str] = field(default_factory=dict)
    """ESPA call address to the call point's device id."""
    alarm_unit: str | None = None
    """The social-alarm unit's device id, if the site has pendants."""
    account: str = ""
    """The unit's SIA account (hex)."""
    zones: Mapping[str, int] = field(default_factory=dict)
    """Pendant device id to its zone on the unit (1, 2, ...)."""

    @property
    def base_topic(self) -> str:
        """The Zigbee2MQTT base topic of this home's bridge."""
        return f"z2m-{self.gateway_id}"

    def sia_report(self, action: Action) -> tuple[str, int] | None:
        """The alarm unit's report (a key of ``SimAlarmUnit``'s ``REPORTS``) and zone for
        a pendant's action; None if SIA cannot carry it (a battery level)."""
        zone = self.zones.get(action.device_id)
        report = _SIA_REPORTS.get(action.kind)
        if zone is None or report is None:
            return None
        return report, 0 if action.kind is EventKind.TEST_ALARM else zone  # the unit's test


def short_name(site: Site, device_id: str) -> str:
    """The device id without its gateway prefix (``motion-stue``)."""
    prefix = f"{site.gateway_id}-"
    return device_id[len(prefix) :] if device_id.startswith(prefix) else device_id


def alarm_unit_id(site: Site) -> str:
    return f"{site.gateway_id}-alarm"


def wire(site: Site) -> SiteWiring:
    """Choose the transport of every device of ``site`` (see the module docstring)."""
    zigbee: dict[str, str] = {}
    dispensers: dict[str, str] = {}
    call_points: dict[str, str] = {}
    pendants: list[str] = []
    for device in site.devices:
        kind = device.device_type
        if kind is DeviceType.SAFETY_ALARM:
            pendants.append(device.device_id)
        elif kind is DeviceType.MEDICINE_DISPENSER:
            dispensers[device.device_id] = short_name(site, device.device_id)
        elif kind is DeviceType.NURSE_CALL and device.address is not None:
            call_points[device.address] = device.device_id
        elif kind not in _SERIAL:
            zigbee[device.device_id] = short_name(site, device.device_id)
    account = f"{zlib.crc32(site.gateway_id.encode()) & 0xFFFFFF:06X}"
    return SiteWiring(
        gateway_id=site.gateway_id,
        zigbee=zigbee,
        dispensers=dispensers,
        central=site.nurse_call_central,
        call_points=call_points,
        alarm_unit=alarm_unit_id(site) if pendants else None,
        account=account if pendants else "",
        zones={pendant: n for n, pendant in enumerate(pendants, start=1)},
    )


# --- the hub's registry -------------------------------------------------------------------


def registry(world: World, *, seed: int, district_id: str | None = None) -> dict[str, Any]:
    """The world as a ``telecare admin import`` file (``hub.admin.RegistryFile``).

    Display names are drawn from common Norwegian first and last names with ``seed``:
    invented, never a real person's record; sites have no address.
    """
    rng = random.Random(f"names:{seed}")
    district = district_id or f"{_prefix(world)}-district"
    sites: list[dict[str, Any]] = []
    residents: list[dict[str, Any]] = []
    gateways: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    for site in world.sites:
        number = site.site_id.rsplit("-", 1)[-1]
        home = site.kind is SiteKind.HOME
        sites.append(
            {
                "id": site.site_id,
                "district_id": district,
                "kind": site.kind.value,
                "name": f"{'Hjem' if home else 'Sykehjem'} {number} (simulert)",
            }
        )
        gateways.append({"id": site.gateway_id, "site_id": site.site_id})
        for resident in site.residents:
            residents.append(
                {
                    "id": resident.resident_id,
                    "site_id": site.site_id,
                    "display_name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                    "room": resident.address,
                }
            )
        devices += [_device(site, device) for device in site.devices]
        if wire(site).alarm_unit is not None:
            owner = site.residents[0].resident_id if site.residents else None
            devices.append(
                {
                    "id": alarm_unit_id(site),
                    "gateway_id": site.gateway_id,
                    "device_type": DeviceType.SAFETY_ALARM.value,
                    "resident_id": owner,
                    "label": "Trygghetsalarm basisenhet",
                }
            )
    return {
        "districts": [{"id": district, "name": "Simulert bydel", "timezone": world.timezone}],
        "sites": sites,
        "residents": residents,
        "gateways": gateways,
        "devices": devices,
    }


def _prefix(world: World) -> str:
    if not world.sites:
        return "sim"
    return world.sites[0].site_id.rsplit("-", 2)[0]


def _device(site: Site, device: Device) -> dict[str, Any]:
    label = _LABELS.get(device.device_type, device.device_type.value)
    if device.device_id == site.nurse_call_central:
        label = "Sykesignalsentral"
    elif device.address is not None:
        label = f"{label} {device.address}"
    elif device.device_type is DeviceType.MOTION_SENSOR and device.room:
        label = f"{label} {device.room}"
    return {
        "id": device.device_id,
        "gateway_id": site.gateway_id,
        "device_type": device.device_type.value,
        "resident_id": device.resident_id,
        "label": label,
    }


# --- the gateway's edge.toml --------------------------------------------------------------


def _s(value: str | Path) -> str:
    """A TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(str(value), ensure_ascii=False)


def edge_toml(
    site: Site,
    wiring: SiteWiring,
    *,
    hub_url: str,
    hub_protocol: Literal["5", "3.1.1"],
    data_dir: Path,
    dev_dir: Path,
    sia_port: int | None,
    time_zone: str,
) -> str:
    """The gateway's config file; ``edge.config.load_config`` reads it."""
    lines = [
        "# Written by the simulator (simulators/run.py) for a simulated gateway.",
        f"gateway_id = {_s(site.gateway_id)}",
        f"data_dir = {_s(data_dir)}",
        "",
        "[hub]",
        f"mqtt_url = {_s(hub_url)}",
        f"protocol = {_s(hub_protocol)}",
        "heartbeat_s = 30",
        "reconnect_max_s = 10",
    ]
    if wiring.zigbee:
        lines += [
            "",
            "[zigbee2mqtt]",
            "# The hub's broker stands in for the home's own.",
            f"mqtt_url = {_s(hub_url)}",
            f"base_topic = {_s(wiring.base_topic)}",
        ]
        for device_id, name in wiring.zigbee.items():
            device = site.device(device_id)
            lines += [
                "[[zigbee2mqtt.devices]]",
                f"friendly_name = {_s(name)}",
                f"device_id = {_s(device_id)}",
                f"device_type = {_s(device.device_type.value)}",
            ]
            if device.room:
                lines.append(f"room = {_s(device.room)}")
    for device_id, port in wiring.dispensers.items():
        lines += [
            "",
            "[[serial]]",
            f"path = {_s(dev_dir / port)}",
            'protocol = "dispenser"',
            f"device_id = {_s(device_id)}",
            f"time_zone = {_s(time_zone)}",
        ]
    if wiring.central is not None:
        lines += [
            "",
            "[[serial]]",
            f"path = {_s(dev_dir / 'nursecall')}",
            'protocol = "espa444"',
            f"central_device_id = {_s(wiring.central)}",
            f"cleared_statuses = [{_s(DEFAULT_CLEARED_STATUS)}]",
            "[serial.addresses]",
        ]
        lines += [f"{_s(address)} = {_s(point)}" for address, point in wiring.call_points.items()]
    if wiring.alarm_unit is not None and sia_port is not None:
        lines += [
            "",
            "[sia]",
            'host = "127.0.0.1"',
            f"port = {sia_port}",
            "[[sia.accounts]]",
            f"account = {_s(wiring.account)}",
            f"device_id = {_s(wiring.alarm_unit)}",
            'device_type = "safety_alarm"',
        ]
        for pendant, zone in wiring.zones.items():
            lines += [
                f"[sia.accounts.zones.{zone}]",
                f"device_id = {_s(pendant)}",
                'device_type = "safety_alarm"',
            ]
    return "\n".join(lines) + "\n"


# --- actions in the devices' own words ------------------------------------------------------

_SIA_REPORTS: Mapping[EventKind, str] = {
    EventKind.BUTTON_PRESSED: "pendant_press",
    EventKind.ALARM_CANCELLED: "cancel",
    EventKind.TEST_ALARM: "periodic_test",
    EventKind.BATTERY_LOW: "low_battery",
}
_LOCK_SOURCES = {
    "keypad": "keypad",
    "rf_tag": "rfid",
    "manual": "manual",
    "remote": "zigbee",
    "auto": "auto",
}
"""``LockDetail.source`` to the lock's ``action_source_name`` (Zigbee2MQTT)."""
_LOCK_ACTIONS = {
    ("keypad", True): "keypad_lock",
    ("keypad", False): "keypad_unlock",
    ("manual", True): "manual_lock",
    ("manual", False): "manual_unlock",
}
_ALERTS: Mapping[EventKind, tuple[str, object, object]] = {
    EventKind.SMOKE: ("smoke", True, False),
    EventKind.WATER_LEAK: ("water_leak", True, False),
    EventKind.FALL: ("fall_status", "fall_alarm", "normal"),  # Heiman HS2FD
}

Fields = dict[str, Any]


def user_slot(user_ref: str | None) -> int:
    """A lock's user slot: ``slot-N`` is N, staff key tag ``staff-NNN`` is 100 + NNN."""
    kind, _, number = (user_ref or "").rpartition("-")
    if number.isdigit():
        return int(number) + (100 if kind == "staff" else 0)
    return NO_USER


def zigbee_messages(action: Action, *, battery_low: float) -> tuple[list[Fields], Fields | None]:
    """The state changes a Zigbee device publishes for ``action``, in order (keyword
    arguments of ``SimZigbeeBridge.update``), and the one it publishes once the condition
    is over (smoke, leak, fall), or None. No messages: the device cannot say it.

    A motion sensor's other reports say ``occupancy: false``: the bridge would have reset
    it after its timeout, which is seconds of real time but may be hours when the world
    runs fast, and a report still saying ``true`` would read as motion.
    """
    now, after = _zigbee_messages(action, battery_low=battery_low)
    if action.device_type is DeviceType.MOTION_SENSOR and action.kind is not EventKind.MOTION:
        now = [{**fields, "occupancy": False} for fields in now]
    return now, after


def _zigbee_messages(  # noqa: PLR0911 - one return per kind of action, read as a table
    action: Action, *, battery_low: float
) -> tuple[list[Fields], Fields | None]:
    kind = action.kind
    if kind is EventKind.MOTION:
        return [{"occupancy": True}], None
    if kind in (EventKind.BED_ENTERED, EventKind.BED_EXITED):
        return [{"occupancy": kind is EventKind.BED_ENTERED}], None
    if kind in (EventKind.OPENED, EventKind.CLOSED):
        return [{"contact": kind is EventKind.CLOSED}], None  # contact: true is closed
    if kind in (EventKind.LOCKED, EventKind.UNLOCKED):
        return _lock(action), None
    if kind is EventKind.JAMMED:
        return [{"action": "error_jammed"}, {"lock_state": "not_fully_locked"}], None
    if kind in _ALERTS:
        name, on, off = _ALERTS[kind]
        return [{name: on}], {name: off}
    if kind is EventKind.BATTERY_LEVEL and isinstance(action.detail, BatteryDetail):
        level = action.detail.level
        return [{"battery": level, "battery_low": level < battery_low}], None
    if kind is EventKind.BATTERY_LOW:
        return [{"battery_low": True}], None
    return [], None


def _lock(action: Action) -> list[Fields]:
    """The operation event (who did it), then the new position, as a lock reports them."""
    detail = action.detail if isinstance(action.detail, LockDetail) else None
    source = detail.source if detail else "unknown"
    locked = action.kind is EventKind.LOCKED
    details: Fields = {"action_user": user_slot(detail.user_ref if detail else None)}
    if source in _LOCK_SOURCES:
        details["action_source_name"] = _LOCK_SOURCES[source]
    operation = _LOCK_ACTIONS.get((source, locked), "lock" if locked else "unlock")
    position = (
        {"lock_state": "locked", "state": "LOCK"}
        if locked
        else {"lock_state": "unlocked", "state": "UNLOCK"}
    )
    return [{"action": operation, "action_details": details}, position]
