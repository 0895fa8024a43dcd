"""Field types and sections shared by the edge's config modules (``edge.config``).

``Section`` is the base of every TOML table (frozen, unknown keys refused); ``Id``,
``DeviceClass``, ``CheckIn`` and ``Room`` are the validated field types; ``MqttBroker``
is a broker's URL and credentials, used for ``[hub]`` and ``[zigbee2mqtt]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from devices.events import DeviceType, is_identifier

MIN_CHECK_IN_S = 30
MAX_CHECK_IN_S = 24 * 3600
"""A device silent for a day is a fault (UK practice: technical faults handled in 24 h)."""


def _identifier(value: str) -> str:
    if not is_identifier(value):
        raise ValueError(
            "must be 1 to 64 characters: letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit (it appears in MQTT topics)"
        )
    return value


def _device_class(value: DeviceType) -> DeviceType:
    if value is DeviceType.GATEWAY:
        raise ValueError("'gateway' is the gateway itself, not a device behind it")
    return value


Id = Annotated[str, AfterValidator(_identifier)]
DeviceClass = Annotated[DeviceType, AfterValidator(_device_class)]
CheckIn = Annotated[int, Field(ge=MIN_CHECK_IN_S, le=MAX_CHECK_IN_S)]
Room = Annotated[str, Field(min_length=1, max_length=40)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """``value`` relative to the config file's directory (the ``base_dir`` context)."""
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if isinstance(base, Path) and not value.is_absolute():
        return base / value
    return value


# --- MQTT brokers -----------------------------------------------------------------------


class MqttBroker(Section):
    """A broker: ``mqtt://host:port`` or ``mqtts://host:port`` and optional credentials."""

    mqtt_url: str
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _credentials_out_of_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("mqtt_url"), str):
            return data
        try:
            parts = urlsplit(data["mqtt_url"])
        except ValueError:
            return data  # reported by the field validator
        if parts.username is None and parts.password is None:
            return data
        if "username" in data or "password" in data:
            raise ValueError(
                "the user name and password are given both in mqtt_url and as "
                "username/password: give them once"
            )
        host = parts.netloc.rpartition("@")[2]
        return {
            **data,
            "mqtt_url": parts._replace(netloc=host).geturl(),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
        }

    @field_validator("mqtt_url")
    @classmethod
    def _url_is_a_broker(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "mqtts"}:
            raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883")
        if not parts.hostname:
            raise ValueError("has no host: write it like mqtt://host:1883")
        try:
            parts.port  # noqa: B018 - urlsplit parses the port lazily; this raises if bad
        except ValueError:
            raise ValueError("has a port that is not a number from 1 to 65535") from None
        if parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise ValueError("must be only scheme, host and port, with no path or query")
        return value

    @property
    def tls(self) -> bool:
        return self.mqtt_url.startswith("mqtts:")

    @property
    def host(self) -> str:
        return urlsplit(self.mqtt_url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.mqtt_url).port or (8883 if self.tls else 1883)
