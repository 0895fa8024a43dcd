"""Hub settings: the broker URL, and what the environment may and may not set."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from hub.settings import HubSettings, MqttEndpoint


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TELECARE_* variable from the developer's shell reaches these tests."""
    for name in list(os.environ):
        if name.startswith("TELECARE_"):
            monkeypatch.delenv(name)


def test_mqtt_url_with_host_and_port() -> None:
    endpoint = MqttEndpoint.from_url("mqtt://broker.example:1884")

    assert (endpoint.host, endpoint.port, endpoint.tls) == ("broker.example", 1884, False)
    assert endpoint.username is None
    assert endpoint.password is None


def test_mqtt_url_default_port() -> None:
    assert MqttEndpoint.from_url("mqtt://broker.example").port == 1883


def test_mqtts_url_defaults_to_8883_with_tls() -> None:
    endpoint = MqttEndpoint.from_url("mqtts://broker.example")

    assert (endpoint.port, endpoint.tls) == (8883, True)


def test_mqtts_url_keeps_an_explicit_port() -> None:
    endpoint = MqttEndpoint.from_url("mqtts://broker.example:443")

    assert (endpoint.port, endpoint.tls) == (443, True)


def test_credentials_are_percent_decoded() -> None:
    endpoint = MqttEndpoint.from_url("mqtts://hub%40kommune:p%3As%2Fw%20rd@broker.example")

    assert endpoint.username == "hub@kommune"
    assert endpoint.password is not None
    assert endpoint.password.get_secret_value() == "p:s/w rd"
    assert "p:s/w rd" not in repr(endpoint)


@pytest.mark.parametrize("url", ["mqtt://", "mqtt://:1883", "mqtt://user:pw@"])
def test_a_url_without_a_host_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="no host"):
        MqttEndpoint.from_url(url)


@pytest.mark.parametrize(
    "url", ["http://broker.example", "tcp://broker.example:1883", "broker.example:1883", ""]
)
def test_a_url_with_another_scheme_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"mqtt:// or mqtts://"):
        MqttEndpoint.from_url(url)


def test_defaults_without_environment() -> None:
    settings = HubSettings()

    assert settings.database_url is None
    assert settings.mqtt_url is None
    assert settings.ingest.batch_max_events == 5000


def test_nested_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELECARE_INGEST__BATCH_MAX_EVENTS", "1234")
    monkeypatch.setenv("TELECARE_INGEST__CLIENT_ID", "hub-7")
    monkeypatch.setenv("TELECARE_STORAGE__EVENTS_RETENTION_DAYS", "30")

    settings = HubSettings()

    assert settings.ingest.batch_max_events == 1234
    assert settings.ingest.client_id == "hub-7"
    assert settings.storage.events_retention_days == 30


def test_a_nested_value_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELECARE_INGEST__BATCH_MAX_EVENTS", "0")

    with pytest.raises(ValidationError, match="batch_max_events"):
        HubSettings()


def test_good_urls_are_kept_as_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELECARE_MQTT_URL", "mqtts://hub:pw@broker.example")
    monkeypatch.setenv("TELECARE_DATABASE_URL", "postgresql://hub:pw@db.example/telecare")

    settings = HubSettings()

    assert settings.mqtt_url is not None
    assert settings.mqtt_url.get_secret_value() == "mqtts://hub:pw@broker.example"
    assert settings.database_url is not None
    assert "pw" not in repr(settings)


@pytest.mark.parametrize("url", ["http://broker.example", "mqtt://", "broker.example:1883"])
def test_a_bad_mqtt_url_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("TELECARE_MQTT_URL", url)

    with pytest.raises(ValidationError, match="TELECARE_MQTT_URL"):
        HubSettings()


@pytest.mark.parametrize(
    "url", ["mysql://db.example/telecare", "sqlite:///telecare.db", "db.example:5432"]
)
def test_a_database_url_that_is_not_postgresql_is_refused(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("TELECARE_DATABASE_URL", url)

    with pytest.raises(ValidationError, match="postgresql://"):
        HubSettings()


@pytest.mark.parametrize("url", ["postgresql://db.example/t", "postgres://db.example/t"])
def test_both_postgresql_schemes_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("TELECARE_DATABASE_URL", url)

    settings = HubSettings()

    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == url


def test_refusing_a_bad_mqtt_url_does_not_reveal_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TELECARE_MQTT_URL", "http://hub:s3cret-pw@broker.example")

    with pytest.raises(ValidationError) as caught:
        HubSettings()
    assert "s3cret-pw" not in str(caught.value)
