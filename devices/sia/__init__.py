"""SIA DC-09: what safety-alarm units and alarm panels send to an alarm receiver.

``codec``: frames (sans-IO decoder, encoder), content (SIA DC-03, Contact ID), answers
(ACK, NAK, DUH) and the timestamp window. ``codes``: the table from codes to canonical
events, account bindings and the translation. See ``docs/protocols/sia-dc09.md``.
"""

from devices.sia.codec import (
    MAX_FRAME_BYTES,
    PROTOCOL_IDS,
    ReportedEvent,
    SiaBadFrame,
    SiaContentError,
    SiaDecoder,
    SiaFrame,
    SiaMessage,
    ack_for,
    crc16_arc,
    decode_frame,
    duh_for,
    encode,
    frame_account,
    nak,
    parse_message,
    timestamp_in_window,
)
from devices.sia.codes import (
    CONTACT_ID_CODES,
    SIA_CODES,
    CodeRow,
    SiaAccountBinding,
    SiaTranslation,
    lookup,
    to_events,
    translate,
)

__all__ = [
    "CONTACT_ID_CODES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_IDS",
    "SIA_CODES",
    "CodeRow",
    "ReportedEvent",
    "SiaAccountBinding",
    "SiaBadFrame",
    "SiaContentError",
    "SiaDecoder",
    "SiaFrame",
    "SiaMessage",
    "SiaTranslation",
    "ack_for",
    "crc16_arc",
    "decode_frame",
    "duh_for",
    "encode",
    "frame_account",
    "lookup",
    "nak",
    "parse_message",
    "timestamp_in_window",
    "to_events",
    "translate",
]
