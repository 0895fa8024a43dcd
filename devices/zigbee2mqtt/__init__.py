"""Zigbee2MQTT: sensors and door locks behind a Zigbee2MQTT bridge on the home's broker.

``codec`` parses the bridge's topics and payloads and builds commands back;
``translator`` turns them into canonical ``DeviceEvent``s, keeping the last state of each
device because the bridge publishes whole states, not changes; ``locks`` holds the door
lock rules.
"""

from devices.zigbee2mqtt.codec import (
    DEFAULT_BASE_TOPIC,
    MAX_PAYLOAD_BYTES,
    AvailabilityMessage,
    DeviceState,
    DeviceTopic,
    IgnoredMessage,
    IgnoreReason,
    LockAction,
    Message,
    SetRequest,
    StateMessage,
    availability_payload,
    friendly_name_problem,
    lock_command,
    parse_message,
    parse_set,
    parse_topic,
    state_payload,
)
from devices.zigbee2mqtt.errors import Zigbee2MqttError
from devices.zigbee2mqtt.translator import DeviceBinding, Zigbee2MqttTranslator

__all__ = [
    "DEFAULT_BASE_TOPIC",
    "MAX_PAYLOAD_BYTES",
    "AvailabilityMessage",
    "DeviceBinding",
    "DeviceState",
    "DeviceTopic",
    "IgnoreReason",
    "IgnoredMessage",
    "LockAction",
    "Message",
    "SetRequest",
    "StateMessage",
    "Zigbee2MqttError",
    "Zigbee2MqttTranslator",
    "availability_payload",
    "friendly_name_problem",
    "lock_command",
    "parse_message",
    "parse_set",
    "parse_topic",
    "state_payload",
]
