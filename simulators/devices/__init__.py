"""Simulated devices that speak the real wire protocols, built on our reference codecs.

- ``SimSerialPort``: a pseudo-terminal behind a stable symlink, with unplug and replug;
- ``SimDispenser``: a medicine dispenser on a serial line (our dispenser protocol);
- ``SimNurseCallCentral``: a care home's nurse-call central (ESPA 4.4.4 control station);
- ``SimAlarmUnit``: a social-alarm unit reporting over SIA DC-09 on TCP;
- ``SimZigbeeBridge``: a Zigbee2MQTT bridge with sensors and door locks on an MQTT broker.

Each one is started with ``await start()`` (or ``async with``) and stopped with
``stop()``, and counts what it sent and what was acknowledged in ``counters``.
"""

from simulators.devices.alarm_unit import (
    AlarmUnitError,
    AlarmUnitRefusedError,
    AlarmUnitTimeoutError,
    SimAlarmUnit,
)
from simulators.devices.dispenser import SimDispenser
from simulators.devices.nurse_call import SimNurseCallCentral
from simulators.devices.pty import SimSerialPort
from simulators.devices.zigbee import SimZigbeeBridge

__all__ = [
    "AlarmUnitError",
    "AlarmUnitRefusedError",
    "AlarmUnitTimeoutError",
    "SimAlarmUnit",
    "SimDispenser",
    "SimNurseCallCentral",
    "SimSerialPort",
    "SimZigbeeBridge",
]
