"""Hub settings, read once in ``main()`` from ``TELECARE_*`` environment variables.

Nested models use ``__`` as the delimiter: ``TELECARE_INGEST__BATCH_MAX_EVENTS=5000``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class MqttEndpoint(BaseModel):
    """A broker address parsed from ``mqtt://user:pass@host:port`` or ``mqtts://``."""

    host: str
    port: int
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts"}:
            raise ValueError(
                f"TELECARE_MQTT_URL must start with mqtt:// or mqtts://, not {parts.scheme}://"
            )
        if not parts.hostname:
            raise ValueError("TELECARE_MQTT_URL has no host")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
            tls=tls,
        )


class IngestSettings(BaseModel):
    """How the hub takes events off the broker and writes them."""

    client_id: str = Field(
        default="telecare-hub-1",
        description="MQTT client id; the persistent session is keyed on it. "
        "Give each hub process its own.",
    )
    shared_group: str | None = Field(
        default=None,
        description="If set, subscribe through $share/<group>/ so hub processes share load.",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        description="MQTT protocol version: auto = 5 for external brokers, 3.1.1 embedded.",
    )
    receive_maximum: int = Field(
        default=2000,
        ge=10,
        le=65535,
        description="MQTT 5 Receive Maximum: unacknowledged messages the broker may send.",
    )
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    batch_max_events: int = Field(default=5000, ge=1)
    batch_window_ms: int = Field(
        default=10, ge=0, description="Longest a telemetry event waits for its batch."
    )
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    quarantine_raw_max_bytes: int = Field(default=8192, ge=256)


class StorageSettings(BaseModel):
    """Event storage: partitions ahead, retention behind."""

    backend: Literal["auto", "native", "timescaledb"] = Field(
        default="auto",
        description="Event storage: TimescaleDB when the extension exists (auto), or native "
        "daily partitions. Chosen at the first migration and kept.",
    )
    events_retention_days: int = Field(default=180, ge=1)
    use_copy: bool = Field(
        default=True,
        description="Write event batches with COPY (the fastest way). Set false where the "
        "server's wire protocol has no COPY FROM STDIN, as with PGlite behind its socket "
        "(the TimescaleDB test backend): batches then go in as multi-row INSERTs.",
    )
    partitions_ahead_days: int = Field(default=7, ge=1)
    maintenance_interval_s: int = Field(default=3600, ge=10)
    pool_min_size: int = 2
    pool_max_size: int = 10


class SupervisionSettings(BaseModel):
    """Hub-side supervision of gateways (one technical alarm per silent gateway)."""

    gateway_timeout_s: int = Field(
        default=120,
        ge=5,
        description="A gateway not heard from for this long is offline (edges send a "
        "heartbeat every 30 s); a gateway row's supervision_timeout_s overrides it.",
    )
    interval_s: float = Field(default=10.0, gt=0, description="How often to check.")
    restart_grace_s: int | None = Field(
        default=None,
        ge=0,
        description="After the hub starts, silence is not judged for this long (the "
        "backlog is still arriving): a hub restart must page nobody. Default: the timeout.",
    )


class HubSettings(BaseSettings):
    """Everything one hub process needs. See README.md for the production set-up."""

    model_config = SettingsConfigDict(
        env_prefix="TELECARE_",
        env_nested_delimiter="__",
        extra="ignore",
        hide_input_in_errors=True,  # URLs carry passwords
    )

    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL URL; unset = a private embedded PostgreSQL."
    )
    mqtt_url: SecretStr | None = Field(
        default=None, description="mqtt:// or mqtts:// URL; unset = an in-process broker."
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path(".telecare")
    embedded_pg_port: int = Field(default=0, ge=0, le=65535, description="0 = a free port.")
    embedded_mqtt_port: int = Field(default=0, ge=0, le=65535, description="0 = a free port.")
    environment: Literal["development", "demo", "production"] = "development"
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    ingest: IngestSettings = IngestSettings()
    storage: StorageSettings = StorageSettings()
    supervision: SupervisionSettings = SupervisionSettings()

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            MqttEndpoint.from_url(value.get_secret_value())
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            url = value.get_secret_value()
            if not url.startswith(("postgresql://", "postgres://")):
                raise ValueError("TELECARE_DATABASE_URL must be a postgresql:// URL")
        return value
