"""The device and port sections of the edge's config: Zigbee2MQTT, serial ports, SIA.

``edge.config`` assembles them into ``EdgeConfig``; the field types they share are in
``edge.config_fields``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, Field, field_validator

from edge.config_fields import CheckIn, DeviceClass, Id, MqttBroker, Room, Section

_SIA_ACCOUNT = re.compile(r"^[0-9A-Fa-f]{3,16}$")


# --- Zigbee2MQTT ------------------------------------------------------------------------


def _plain_topic(value: str) -> str:
    if not value or any(char in value for char in "#+\0") or value[0] == "/" or value[-1] == "/":
        raise ValueError("must be a plain MQTT topic: not empty, no '#' or '+', no '/' at an end")
    return value


Topic = Annotated[str, Field(max_length=200), AfterValidator(_plain_topic)]


class ZigbeeDevice(Section):
    """One ``[[zigbee2mqtt.devices]]`` entry: a Z2M friendly name bound to a device."""

    friendly_name: Topic
    device_id: Id
    device_type: DeviceClass
    room: Room | None = None
    check_in_s: CheckIn | None = None


class Zigbee2MqttConfig(MqttBroker):
    """``[zigbee2mqtt]``: the home's local broker that Zigbee2MQTT publishes to."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    base_topic: Topic = "zigbee2mqtt"
    devices: list[ZigbeeDevice] = Field(default_factory=list)


# --- serial ports -----------------------------------------------------------------------


def _stopbits(value: float) -> float:
    if value not in {1, 1.5, 2}:
        raise ValueError("must be 1, 1.5 or 2")
    return value


class _SerialPortBase(Section):
    path: str = Field(
        min_length=2, description="Prefer a stable /dev/serial/by-id/... link to /dev/ttyUSB0."
    )
    baudrate: int = Field(default=9600, ge=50, le=4_000_000)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: Annotated[float, AfterValidator(_stopbits)] = 1

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute device path such as /dev/ttyUSB0")
        return value


class DispenserPort(_SerialPortBase):
    """A medicine dispenser on its own serial line (our documented line protocol)."""

    protocol: Literal["dispenser"]
    device_id: Id
    check_in_s: CheckIn | None = None
    time_zone: str = Field(
        default="Europe/Oslo",
        description="IANA time zone of the home: the dispenser's schedule is local time, "
        "and its clock is set with this zone's UTC offset.",
    )

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone such as 'Europe/Oslo'") from None
        return value

    @property
    def device_ids(self) -> tuple[str, ...]:
        return (self.device_id,)


def _espa_address(value: str) -> str:
    if not value or len(value) > 64 or not value.isprintable():
        raise ValueError("an ESPA call address is 1 to 64 printable characters")
    return value


EspaAddress = Annotated[str, AfterValidator(_espa_address)]


class EspaPort(_SerialPortBase):
    """A care home's nurse-call central speaking ESPA 4.4.4; call points by address."""

    protocol: Literal["espa444"]
    central_device_id: Id
    addresses: dict[EspaAddress, Id] = Field(default_factory=dict)
    check_in_s: CheckIn | None = Field(default=None, description="For the central.")
    cleared_statuses: list[Annotated[str, Field(min_length=1, max_length=16)]] = Field(
        default_factory=list,
        description="Values of record 7 (call status) that mean the call was reset at the "
        "bed; the central's manual says which. Empty: no call is ever read as cleared.",
    )

    @property
    def device_ids(self) -> tuple[str, ...]:
        return (self.central_device_id, *self.addresses.values())


SerialPort = Annotated[DispenserPort | EspaPort, Field(discriminator="protocol")]


# --- SIA DC-09 --------------------------------------------------------------------------


class SiaZone(Section):
    """A device reported through an SIA account's zone (a pendant, a smoke detector)."""

    device_id: Id
    device_type: DeviceClass
    room: Room | None = None
    check_in_s: CheckIn | None = None


def _sia_account(value: str) -> str:
    if not _SIA_ACCOUNT.fullmatch(value):
        raise ValueError("an SIA account is 3 to 16 hexadecimal characters, like '1234AB'")
    return value.upper()


def _zone_keys(value: Any) -> Any:
    """Zones are numbers: '1', '01' and '001' are one zone, and may appear only once."""
    if not isinstance(value, dict):
        return value
    zones: dict[int, Any] = {}
    for key, binding in value.items():
        text = str(key)
        if not text.isdigit() or int(text) > 9999:
            raise ValueError(f"zone {text!r} is not a number from 0 to 9999")
        if int(text) in zones:
            raise ValueError(f"zone {int(text)} is given twice")
        zones[int(text)] = binding
    return zones


class SiaAccount(Section):
    """``[[sia.accounts]]``: an alarm unit's account, the unit itself and its zones."""

    account: Annotated[str, AfterValidator(_sia_account)]
    device_id: Id
    device_type: DeviceClass
    check_in_s: CheckIn | None = None
    zones: Annotated[dict[int, SiaZone], BeforeValidator(_zone_keys)] = Field(default_factory=dict)


class SiaConfig(Section):
    """``[sia]``: the SIA DC-09 receiver that alarm units on the home network report to."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=1, le=65535)
    accounts: list[SiaAccount] = Field(default_factory=list)
