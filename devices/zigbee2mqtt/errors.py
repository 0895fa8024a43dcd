"""Errors raised by the Zigbee2MQTT codec.

TelecareError                      (devices.errors)
└── DeviceError                    (devices.errors)
    └── Zigbee2MqttError           a Zigbee2MQTT topic or payload we cannot accept
"""

from __future__ import annotations

from devices.errors import DeviceError


class Zigbee2MqttError(DeviceError):
    """A Zigbee2MQTT message (or a command we were asked to build) is malformed.

    ``reason`` is a short machine-readable code, used as a counter and metric label and
    stored with a quarantined message:

    ``foreign_topic``, ``invalid_topic``, ``payload_too_large``, ``invalid_utf8``,
    ``invalid_json``, ``not_object``, ``invalid_field``, ``invalid_availability``,
    ``not_a_command``, ``invalid_friendly_name``, ``invalid_command``, ``not_encodable``.

    ``str(error)`` is a message a person can act on. It never repeats the payload, which
    may carry data about a resident.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
