"""Medicine dispensers on a serial line: our documented protocol (docs/protocols/dispenser.md).

``codec`` frames and messages (sans-IO; models in ``messages``, field codecs in
``fields``), ``session`` the link roles of the gateway and the device (acknowledgements,
retries, duplicates), ``events`` the mapping to canonical events and from hub commands.
"""

from devices.dispenser.codec import BadFrame, DecodeError, DispenserDecoder, Frame, encode
from devices.dispenser.events import (
    DispenserCommandError,
    command_from_gateway,
    command_result,
    to_events,
)
from devices.dispenser.session import DeviceSide, GatewaySide

__all__ = [
    "BadFrame",
    "DecodeError",
    "DeviceSide",
    "DispenserCommandError",
    "DispenserDecoder",
    "Frame",
    "GatewaySide",
    "command_from_gateway",
    "command_result",
    "encode",
    "to_events",
]
