"""The edge config file: the shipped example loads, and mistakes are named precisely."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devices.events import DeviceType
from edge.config import (
    DEFAULT_CHECK_IN_S,
    ConfigError,
    DispenserPort,
    EdgeConfig,
    EspaPort,
    load_config,
)
from edge.supervision import Supervisor

EXAMPLE = Path(__file__).parents[2] / "docs" / "deploy" / "edge.example.toml"

MINIMAL = """
gateway_id = "gw-1"
data_dir = "state"

[hub]
mqtt_url = "mqtt://hub.example:1883"
"""


def write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(tmp_path / "edge.toml") in str(caught.value)  # the file is always named
    return caught.value.problems


# --- what a good file gives ------------------------------------------------------------


def test_the_shipped_example_loads_with_its_devices() -> None:
    config = load_config(EXAMPLE)

    assert config.gateway_id == "gw-0042"
    assert config.hub.tls
    assert config.hub.port == 8883
    assert config.zigbee2mqtt is not None
    assert len(config.zigbee2mqtt.devices) == 4
    assert isinstance(config.serial[0], DispenserPort)
    assert config.sia is not None
    assert set(config.sia.accounts[0].zones) == {1, 2}
    supervised = config.supervised_devices()
    assert supervised["dispenser-0042-1"] == (DeviceType.MEDICINE_DISPENSER, 180)
    assert supervised["motion-0042-1"] == (DeviceType.MOTION_SENSOR, 3600)  # its own value
    assert supervised["alarm-0042-1"] == (DeviceType.SAFETY_ALARM, 3600)
    assert "pendant-0042-1" not in supervised  # a zone: supervised by its alarm unit
    supervisor = Supervisor(config.gateway_id, supervised, now=datetime(2025, 1, 1, tzinfo=UTC))
    assert supervisor.next_due() == datetime(2025, 1, 1, 0, 3, tzinfo=UTC)  # the dispenser


def test_a_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))

    assert config.hub.protocol == "5"
    assert config.hub.heartbeat_s == 30
    assert (config.hub.host, config.hub.port, config.hub.tls) == ("hub.example", 1883, False)
    assert config.data_dir == tmp_path / "state"  # relative to the file, not the cwd
    assert config.queue_path == tmp_path / "state" / "queue.sqlite3"
    assert config.serial == []
    assert config.zigbee2mqtt is None
    assert config.sia is None
    assert config.supervised_devices() == {}


def test_defaults_follow_the_telecare_requirements() -> None:
    assert DEFAULT_CHECK_IN_S[DeviceType.SAFETY_ALARM] <= 3600  # at least hourly
    assert DEFAULT_CHECK_IN_S[DeviceType.MEDICINE_DISPENSER] == 180  # the protocol's silence limit
    assert DEFAULT_CHECK_IN_S[DeviceType.MOTION_SENSOR] <= 2 * 3600  # not Z2M's 25 h
    assert 3600 < DEFAULT_CHECK_IN_S[DeviceType.SMOKE_DETECTOR] <= 6 * 3600
    assert set(DEFAULT_CHECK_IN_S) == set(DeviceType) - {DeviceType.GATEWAY}


def test_credentials_in_the_url_move_to_secret_fields(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL.replace("mqtt://hub", "mqtts://gw%401:p%3Ass@hub"))
    )

    assert config.hub.username == "gw@1"
    assert config.hub.password is not None
    assert config.hub.password.get_secret_value() == "p:ss"
    assert config.hub.mqtt_url == "mqtts://hub.example:1883"
    assert "p:ss" not in repr(config)


def test_protocol_may_be_written_as_a_number(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "protocol = 5\n"))

    assert config.hub.protocol == "5"


def test_supervision_overrides_per_type_and_per_device(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [supervision]
        door_sensor = 1800

        [zigbee2mqtt]
        [[zigbee2mqtt.devices]]
        friendly_name = "hall/door"
        device_id = "door-1"
        device_type = "door_sensor"
        [[zigbee2mqtt.devices]]
        friendly_name = "bath/leak"
        device_id = "leak-1"
        device_type = "water_leak_sensor"
        check_in_s = 600
        """)
    config = load_config(write(tmp_path, text))

    assert config.supervised_devices() == {
        "door-1": (DeviceType.DOOR_SENSOR, 1800),
        "leak-1": (DeviceType.WATER_LEAK_SENSOR, 600),
    }


def test_an_espa_port_binds_addresses_and_supervises_only_the_central(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [[serial]]
        path = "/dev/ttyUSB1"
        protocol = "espa444"
        baudrate = 1200
        bytesize = 7
        parity = "E"
        stopbits = 2
        central_device_id = "central-1"
        [serial.addresses]
        "101" = "call-101"
        "12A" = "call-12a"
        """)
    (port,) = load_config(write(tmp_path, text)).serial

    assert isinstance(port, EspaPort)
    assert (port.baudrate, port.bytesize, port.parity, port.stopbits) == (1200, 7, "E", 2)
    assert port.addresses == {"101": "call-101", "12A": "call-12a"}
    assert port.device_ids == ("central-1", "call-101", "call-12a")
    config = load_config(write(tmp_path, text))
    assert config.supervised_devices() == {"central-1": (DeviceType.NURSE_CALL, 300)}


def test_a_zone_with_its_own_check_in_is_supervised(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [sia]
        port = 12128
        [[sia.accounts]]
        account = "12ab"
        device_id = "unit-1"
        device_type = "safety_alarm"
        [sia.accounts.zones.003]
        device_id = "smoke-1"
        device_type = "smoke_detector"
        check_in_s = 7200
        """)
    config = load_config(write(tmp_path, text))

    assert config.sia is not None
    assert config.sia.host == "127.0.0.1"  # loopback unless told otherwise
    assert config.sia.accounts[0].account == "12AB"
    assert set(config.sia.accounts[0].zones) == {3}
    assert config.supervised_devices()["smoke-1"] == (DeviceType.SMOKE_DETECTOR, 7200)


# --- mistakes a person makes, and what they are told ----------------------------------


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"edge\.toml: cannot read the file"):
        load_config(tmp_path / "edge.toml")


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, 'gateway_id = "gw-1\n')

    assert "not valid TOML" in problem
    assert "line 1" in problem


def test_missing_required_keys_are_each_named(tmp_path: Path) -> None:
    found = problems(tmp_path, 'data_dir = "/x"\n')

    assert found == ["gateway_id: required key is missing", "hub: required key is missing"]


def test_a_misspelt_key_is_reported_as_unknown(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "heartbeat = 30\n")

    assert found == ["hub.heartbeat: unknown key (check the spelling against edge.example.toml)"]


def test_an_unknown_device_type_lists_the_expected_ones(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [zigbee2mqtt]
        [[zigbee2mqtt.devices]]
        friendly_name = "a"
        device_id = "a-1"
        device_type = "pendant"
        """)
    (problem,) = problems(tmp_path, text)

    assert problem.startswith("zigbee2mqtt.devices[0].device_type: ")
    assert "'safety_alarm'" in problem
    assert "(got 'pendant')" in problem


def test_a_gateway_is_not_a_device_type_for_a_binding(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [[serial]]
        path = "/dev/ttyUSB0"
        protocol = "dispenser"
        device_id = "gw-1"
        [sia]
        port = 1
        [[sia.accounts]]
        account = "123"
        device_id = "x"
        device_type = "gateway"
        """)
    (problem,) = problems(tmp_path, text)

    assert problem.startswith("sia.accounts[0].device_type: 'gateway' is the gateway itself")


def test_a_bad_identifier_says_what_is_allowed(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, MINIMAL.replace('"gw-1"', '"gw 1/a"'))

    assert problem.startswith("gateway_id: must be 1 to 64 characters")
    assert "(got 'gw 1/a')" in problem


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://hub.example", "must look like mqtt://host:1883"),
        ("mqtt://", "has no host"),
        ("mqtt://hub.example:99999", "port that is not a number"),
        ("mqtt://hub.example/telecare", "no path"),
    ],
)
def test_a_bad_hub_url_is_explained_without_echoing_it(
    tmp_path: Path, url: str, expected: str
) -> None:
    (problem,) = problems(tmp_path, MINIMAL.replace("mqtt://hub.example:1883", url))

    assert problem.startswith("hub.mqtt_url: ")
    assert expected in problem
    assert "got" not in problem  # a URL may hold a password


def test_credentials_twice_are_refused_without_showing_the_password(tmp_path: Path) -> None:
    text = MINIMAL.replace("mqtt://hub", "mqtt://u:s3cret@hub") + 'password = "other"\n'
    (problem,) = problems(tmp_path, text)

    assert problem.startswith("hub: ")
    assert "give them once" in problem
    assert "s3cret" not in problem
    assert "other" not in problem


def test_serial_port_problems_name_the_port_and_the_key(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [[serial]]
        path = "/dev/ttyUSB0"
        protocol = "dispenser"
        device_id = "d-1"
        [[serial]]
        path = "ttyUSB1"
        protocol = "dispenser"
        parity = "X"
        stopbits = 3
        """)
    found = problems(tmp_path, text)

    assert found[0] == (
        "serial[1].path: must be an absolute device path such as /dev/ttyUSB0 (got 'ttyUSB1')"
    )
    assert found[1].startswith("serial[1].parity: Input should be 'N', 'E', 'O', 'M' or 'S'")
    assert found[2] == "serial[1].stopbits: must be 1, 1.5 or 2 (got 3)"
    assert found[3] == "serial[1].device_id: required key is missing"


def test_an_unknown_or_missing_serial_protocol_is_explained(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [[serial]]
        path = "/dev/ttyUSB0"
        protocol = "modbus"
        [[serial]]
        path = "/dev/ttyUSB1"
        """)
    found = problems(tmp_path, text)

    assert found[0] == "serial[0].protocol: must be one of 'dispenser', 'espa444'"
    assert found[1].startswith("serial[1].protocol: required key is missing")


def test_a_bad_key_inside_a_table_is_quoted_as_in_toml(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [[serial]]
        path = "/dev/ttyUSB0"
        protocol = "espa444"
        central_device_id = "c-1"
        [serial.addresses]
        "room 12" = "not an id"
        """)
    (problem,) = problems(tmp_path, text)

    assert problem.startswith('serial[0].addresses."room 12": must be 1 to 64 characters')


def test_device_ids_must_be_unique_across_the_whole_file(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [zigbee2mqtt]
        [[zigbee2mqtt.devices]]
        friendly_name = "a"
        device_id = "dev-1"
        device_type = "door_sensor"
        [[serial]]
        path = "/dev/ttyUSB0"
        protocol = "dispenser"
        device_id = "dev-1"
        [sia]
        port = 12128
        [[sia.accounts]]
        account = "123"
        device_id = "unit-1"
        device_type = "safety_alarm"
        [sia.accounts.zones.1]
        device_id = "dev-1"
        device_type = "safety_alarm"
        """)
    (problem,) = problems(tmp_path, text)

    assert problem == (
        "device_id 'dev-1' is used more than once (zigbee2mqtt.devices[0].device_id, "
        "serial[0].device_id, sia.accounts[0].zones.1.device_id): it must be unique"
    )


def test_paths_names_and_accounts_must_be_unique_too(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [zigbee2mqtt]
        [[zigbee2mqtt.devices]]
        friendly_name = "a"
        device_id = "z-1"
        device_type = "door_sensor"
        [[zigbee2mqtt.devices]]
        friendly_name = "a"
        device_id = "z-2"
        device_type = "door_sensor"
        [[serial]]
        path = "/dev/ttyUSB0"
        protocol = "dispenser"
        device_id = "d-1"
        [[serial]]
        path = "/dev/ttyUSB0"
        protocol = "dispenser"
        device_id = "d-2"
        [sia]
        port = 12128
        [[sia.accounts]]
        account = "abc"
        device_id = "u-1"
        device_type = "safety_alarm"
        [[sia.accounts]]
        account = "ABC"
        device_id = "u-2"
        device_type = "safety_alarm"
        """)
    found = problems(tmp_path, text)

    assert found == [
        "serial port path '/dev/ttyUSB0' is used more than once "
        "(serial[0].path, serial[1].path): it must be unique",
        "friendly_name 'a' is used more than once "
        "(zigbee2mqtt.devices[0].friendly_name, zigbee2mqtt.devices[1].friendly_name): "
        "it must be unique",
        "SIA account 'ABC' is used more than once "
        "(sia.accounts[0].account, sia.accounts[1].account): it must be unique",
    ]


def test_the_same_zone_written_twice_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent("""
        [sia]
        port = 12128
        [[sia.accounts]]
        account = "123"
        device_id = "u-1"
        device_type = "safety_alarm"
        [sia.accounts.zones.1]
        device_id = "p-1"
        device_type = "safety_alarm"
        [sia.accounts.zones.001]
        device_id = "p-2"
        device_type = "safety_alarm"
        """)
    (problem,) = problems(tmp_path, text)

    assert problem == "sia.accounts[0].zones: zone 1 is given twice"


def test_check_in_intervals_are_bounded(tmp_path: Path) -> None:
    text = MINIMAL + "[supervision]\nsafety_alarm = 90000\nsmoke_detector = 5\n"
    found = problems(tmp_path, text)

    assert found[0].startswith("supervision.safety_alarm: Input should be less than or equal")
    assert found[1].startswith("supervision.smoke_detector: Input should be greater than")


def test_a_missing_ca_file_is_reported(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, MINIMAL + 'ca_file = "ca.pem"\n')

    assert problem.startswith(f"hub.ca_file: no such file: {tmp_path / 'ca.pem'}")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = 'gateway_id = "bad id"\ndata_dir = "/x"\n[hub]\nmqtt_url = "ftp://x"\nheartbeat_s = 1\n'

    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))

    assert len(caught.value.problems) == 3
    assert str(caught.value).startswith(f"{tmp_path / 'edge.toml'}: 3 problems:\n  gateway_id:")


def test_the_model_validates_dicts_too() -> None:
    config = EdgeConfig.model_validate(
        {"gateway_id": "gw-1", "data_dir": "/var/lib/x", "hub": {"mqtt_url": "mqtt://h"}}
    )

    assert config.data_dir == Path("/var/lib/x")
    assert config.check_in_s(DeviceType.SAFETY_ALARM) == 3600


@pytest.mark.parametrize("name", ["hall/#", "+/door", "/hall", "hall/", ""])
def test_friendly_names_with_wildcards_or_stray_slashes_are_refused(
    tmp_path: Path, name: str
) -> None:
    text = MINIMAL + textwrap.dedent(f"""
        [zigbee2mqtt]
        [[zigbee2mqtt.devices]]
        friendly_name = "{name}"
        device_id = "d-1"
        device_type = "door_sensor"
        """)
    (problem,) = problems(tmp_path, text)

    assert problem.startswith("zigbee2mqtt.devices[0].friendly_name: must be a plain MQTT topic")


def test_a_dispenser_time_zone_must_be_a_real_one(tmp_path: Path) -> None:
    text = MINIMAL + (
        '[[serial]]\npath = "/dev/ttyUSB0"\nprotocol = "dispenser"\ndevice_id = "disp-1"\n'
        'time_zone = "Europe/Olso"\n'
    )
    path = tmp_path / "edge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "serial[0].time_zone" in str(caught.value)
    assert "IANA" in str(caught.value)
