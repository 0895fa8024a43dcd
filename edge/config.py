"""The edge daemon's configuration: one TOML file per gateway, edited by hand on site.

``load_config(path)`` reads the file with ``tomllib`` and validates it into a frozen
``EdgeConfig``. Every problem is reported at once, each naming the file, the key (as it
is written in TOML: ``serial[1].addresses."12"``) and what was expected, because the
person reading the message is a technician at a customer's home, not a developer.

Choices:

- Relative paths (``data_dir``, ``hub.ca_file``) are relative to the config file's
  directory, never to the working directory (under systemd that would be ``/``).
- MQTT credentials may be written in the URL (``mqtts://user:pass@host``) or as
  ``username``/``password``, not both. They are kept as ``SecretStr`` and removed from
  the stored URL, so printing the config never shows a password.
- Supervision: every device has a check-in interval, the longest it may stay silent
  before it is reported offline: the per-device ``check_in_s`` if given, else the value
  for its device type in ``[supervision]``, else ``DEFAULT_CHECK_IN_S``. Devices that are
  reached through another device (SIA zones behind an alarm unit, ESPA call points behind
  the nurse-call central) are supervised through their carrier and are not supervised
  on their own unless they have their own ``check_in_s``. See ``supervised_devices()``.
- Every ``device_id`` is unique across the whole file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from devices.events import DeviceType
from edge.config_devices import (
    DispenserPort,
    EspaAddress,
    EspaPort,
    SerialPort,
    SiaAccount,
    SiaConfig,
    SiaZone,
    Topic,
    Zigbee2MqttConfig,
    ZigbeeDevice,
)
from edge.config_fields import (
    MAX_CHECK_IN_S,
    MIN_CHECK_IN_S,
    CheckIn,
    DeviceClass,
    Id,
    MqttBroker,
    Room,
    Section,
    resolve_path,
)
from edge.errors import ConfigError

__all__ = [
    "DEFAULT_CHECK_IN_S",
    "FALLBACK_CHECK_IN_S",
    "MAX_CHECK_IN_S",
    "MIN_CHECK_IN_S",
    "CheckIn",
    "ConfigError",
    "DeviceClass",
    "DispenserPort",
    "EdgeConfig",
    "EspaAddress",
    "EspaPort",
    "HubConfig",
    "Id",
    "MqttBroker",
    "QueueConfig",
    "Room",
    "SerialPort",
    "SiaAccount",
    "SiaConfig",
    "SiaZone",
    "Topic",
    "Zigbee2MqttConfig",
    "ZigbeeDevice",
    "describe_config_error",
    "load_config",
]

DEFAULT_CHECK_IN_S: Mapping[DeviceType, int] = {
    DeviceType.SAFETY_ALARM: 3600,  # pendant / base unit: a periodic test at least hourly
    DeviceType.FALL_DETECTOR: 4 * 3600,
    DeviceType.SMOKE_DETECTOR: 4 * 3600,
    DeviceType.MEDICINE_DISPENSER: 180,  # heartbeat every 60 s (docs/protocols/dispenser.md)
    DeviceType.NURSE_CALL: 5 * 60,  # ESPA 4.4.4 polling traffic flows continuously
    DeviceType.DOOR_LOCK: 2 * 3600,
    DeviceType.DOOR_SENSOR: 2 * 3600,  # battery Zigbee: Z2M's own 25 h is far too slow
    DeviceType.MOTION_SENSOR: 2 * 3600,
    DeviceType.BED_SENSOR: 2 * 3600,
    DeviceType.WATER_LEAK_SENSOR: 2 * 3600,
}
FALLBACK_CHECK_IN_S = 3600
"""For a device type added to ``devices.events`` after this table was written."""

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SECRET_KEYS = frozenset({"mqtt_url", "username", "password"})


# --- the hub and the queue --------------------------------------------------------------


class HubConfig(MqttBroker):
    """``[hub]``: the central broker the gateway publishes to."""

    protocol: Literal["5", "3.1.1"] = "5"
    heartbeat_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=1.0, gt=0, le=60)
    reconnect_max_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="The longest wait between attempts to reach the hub (with jitter).",
    )
    ca_file: Path | None = Field(
        default=None, description="CA certificate for mqtts:// when the hub uses a private CA."
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value == 5:
            return "5"  # `protocol = 5` without quotes is a TOML integer
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = resolve_path(value, info)
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path


class QueueConfig(Section):
    """``[queue]``: limits of the durable store-and-forward queue in ``data_dir``."""

    max_events: int = Field(default=1_000_000, ge=1_000)
    max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)


# --- the whole file ---------------------------------------------------------------------


class EdgeConfig(Section):
    """One gateway's configuration (``edge.toml``)."""

    gateway_id: Id
    data_dir: Path = Field(description="The durable queue lives here (StateDirectory).")
    hub: HubConfig
    queue: QueueConfig = Field(default_factory=QueueConfig)
    supervision: dict[DeviceClass, CheckIn] = Field(
        default_factory=dict, description="Check-in interval (s) per device type."
    )
    zigbee2mqtt: Zigbee2MqttConfig | None = None
    serial: list[SerialPort] = Field(default_factory=list)
    sia: SiaConfig | None = None

    @field_validator("data_dir")
    @classmethod
    def _data_dir_beside_config(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_path(value, info)

    @model_validator(mode="after")
    def _unique(self) -> EdgeConfig:
        problems = _duplicates("device_id", self._device_keys())
        problems += _duplicates("serial port path", _serial_paths(self.serial))
        if self.zigbee2mqtt is not None:
            names = (
                (f"zigbee2mqtt.devices[{i}].friendly_name", device.friendly_name)
                for i, device in enumerate(self.zigbee2mqtt.devices)
            )
            problems += _duplicates("friendly_name", names)
        if self.sia is not None:
            accounts = (
                (f"sia.accounts[{i}].account", account.account)
                for i, account in enumerate(self.sia.accounts)
            )
            problems += _duplicates("SIA account", accounts)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def queue_path(self) -> Path:
        """The durable queue's SQLite file."""
        return self.data_dir / "queue.sqlite3"

    def check_in_s(self, device_type: DeviceType) -> int:
        """The check-in interval for a device type: ``[supervision]``, else the default."""
        return self.supervision.get(
            device_type, DEFAULT_CHECK_IN_S.get(device_type, FALLBACK_CHECK_IN_S)
        )

    def supervised_devices(self) -> dict[str, tuple[DeviceType, int]]:
        """Devices to supervise: ``device_id -> (device_type, check-in interval in s)``.

        Every Zigbee device, dispenser, ESPA central and SIA account's unit; SIA zone
        devices only when they have their own ``check_in_s`` (the unit supervises its
        radio devices and reports a missing one); ESPA call points never (they speak
        only when called; their central's link is supervised).
        """
        found: dict[str, tuple[DeviceType, int]] = {}

        def add(device_id: str, device_type: DeviceType, own: int | None) -> None:
            found[device_id] = (device_type, own or self.check_in_s(device_type))

        for z in self.zigbee2mqtt.devices if self.zigbee2mqtt else ():
            add(z.device_id, z.device_type, z.check_in_s)
        for port in self.serial:
            if isinstance(port, DispenserPort):
                add(port.device_id, DeviceType.MEDICINE_DISPENSER, port.check_in_s)
            else:
                add(port.central_device_id, DeviceType.NURSE_CALL, port.check_in_s)
        for account in self.sia.accounts if self.sia else ():
            add(account.device_id, account.device_type, account.check_in_s)
            for zone in account.zones.values():
                if zone.check_in_s is not None:
                    add(zone.device_id, zone.device_type, zone.check_in_s)
        return found

    def _device_keys(self) -> Iterator[tuple[str, str]]:
        """(TOML key, device_id) for every device named in the file."""
        for i, z in enumerate(self.zigbee2mqtt.devices if self.zigbee2mqtt else ()):
            yield f"zigbee2mqtt.devices[{i}].device_id", z.device_id
        for i, port in enumerate(self.serial):
            if isinstance(port, DispenserPort):
                yield f"serial[{i}].device_id", port.device_id
            else:
                yield f"serial[{i}].central_device_id", port.central_device_id
                for address, device_id in port.addresses.items():
                    yield f"serial[{i}].addresses.{_key(address)}", device_id
        for i, account in enumerate(self.sia.accounts if self.sia else ()):
            yield f"sia.accounts[{i}].device_id", account.device_id
            for zone, binding in account.zones.items():
                yield f"sia.accounts[{i}].zones.{zone}.device_id", binding.device_id


def _serial_paths(ports: list[DispenserPort | EspaPort]) -> Iterator[tuple[str, str]]:
    for i, port in enumerate(ports):
        yield f"serial[{i}].path", port.path


def _duplicates(what: str, items: Iterator[tuple[str, str]]) -> list[str]:
    where: dict[str, list[str]] = {}
    for key, value in items:
        where.setdefault(value, []).append(key)
    return [
        f"{what} {value!r} is used more than once ({', '.join(keys)}): it must be unique"
        for value, keys in where.items()
        if len(keys) > 1
    ]


# --- loading, and errors a person can act on --------------------------------------------


def load_config(path: str | Path) -> EdgeConfig:
    """Read and validate ``path``. Raises ``ConfigError`` listing every problem."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    try:
        return EdgeConfig.model_validate(data, context={"base_dir": path.parent.absolute()})
    except ValidationError as exc:
        raise ConfigError(path, describe_config_error(exc)) from None


def describe_config_error(error: ValidationError) -> list[str]:
    """One line per problem: ``key: what is wrong (got value)``."""
    return [
        line for item in error.errors(include_url=False) for line in _describe(item).splitlines()
    ]


def _describe(item: Any) -> str:
    loc: tuple[str | int, ...] = item["loc"]
    kind: str = item["type"]
    ctx: dict[str, Any] = item.get("ctx") or {}
    message: str = item["msg"]
    if kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        message = "unknown key (check the spelling against edge.example.toml)"
    elif kind == "union_tag_invalid":
        loc = (*loc, "protocol")
        message = f"must be one of {ctx.get('expected_tags')}"
    elif kind == "union_tag_not_found":
        loc = (*loc, "protocol")
        message = "required key is missing: the protocol the port speaks ('dispenser' or 'espa444')"
    elif kind in {"value_error", "assertion_error"} and "error" in ctx:
        message = str(ctx["error"])
    key = _format_loc(loc)
    value = item.get("input")
    secret = any(part in _SECRET_KEYS for part in loc)
    if kind not in {"missing", "extra_forbidden"} and not secret and _is_short_scalar(value):
        message = f"{message} (got {value!r})"
    return f"{key}: {message}" if key else message


def _format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    previous: str | int | None = None
    for part in loc:
        if isinstance(part, int):
            out += f".{part}" if previous == "zones" else f"[{part}]"  # a key, or an index
        elif part == "[key]" or (isinstance(previous, int) and part in {"dispenser", "espa444"}):
            continue  # pydantic's markers: a dict key, the tag of a discriminated union
        else:
            out += ("." if out else "") + _key(part)
        previous = part
    return out


def _key(part: str) -> str:
    return part if _BARE_KEY.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'


def _is_short_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool) and len(repr(value)) <= 80
