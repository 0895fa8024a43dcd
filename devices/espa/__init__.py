"""ESPA 4.4.4: calls from a care home's nurse-call central, received as its paging system.

``codec`` turns bytes into frames and back, ``session`` runs the link (our slave side and
the central's master side, for simulators) and ``mapping`` maps calls onto canonical
events. The protocol as we read it: ``docs/protocols/espa444.md``.
"""

from devices.espa.codec import (
    EspaBadBlock,
    EspaBlock,
    EspaCall,
    EspaControl,
    EspaDecoder,
    EspaEnquiry,
    EspaFrame,
    EspaItem,
    EspaRecord,
    encode,
)
from devices.espa.mapping import to_events
from devices.espa.session import CallOutcome, EspaMasterSession, EspaSlaveSession

__all__ = [
    "CallOutcome",
    "EspaBadBlock",
    "EspaBlock",
    "EspaCall",
    "EspaControl",
    "EspaDecoder",
    "EspaEnquiry",
    "EspaFrame",
    "EspaItem",
    "EspaMasterSession",
    "EspaRecord",
    "EspaSlaveSession",
    "encode",
    "to_events",
]
