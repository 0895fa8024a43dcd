"""ESPA 4.4.4 calls mapped onto canonical events.

A call to pager becomes one ``nurse_call`` event, or a ``nurse_call_cleared`` when its
call status says the call was reset at the bed (only for the values the central's
configuration names). The link itself is run by ``devices.espa.session``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any, Final

from devices.espa.codec import EspaCall, NationalVariant, translate_national
from devices.events import DeviceEvent, DeviceType, EventKind, parse_event
from devices.ids import uuid7

__all__ = ["to_events"]

_MAX_ADDRESS: Final = 64
_MAX_MESSAGE: Final = 160
_MAX_CODE: Final = 16


def _clip(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    value = value.strip()[:limit]
    return value or None


def _priority(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if len(value) == 1 and value in "123456789" else None


def to_events(
    call: EspaCall,
    *,
    gateway_id: str,
    central_device_id: str,
    addresses: Mapping[str, str],
    now: datetime,
    cleared_statuses: Collection[str] = frozenset(),
    national_variant: NationalVariant | None = None,
) -> list[DeviceEvent]:
    """The canonical event for a call: ``nurse_call``, or ``nurse_call_cleared``.

    ``addresses`` maps a call address (record 1, spaces stripped) to the device id of
    that call point; an address not in it is reported as the central's device with the
    address in the payload. A call whose call status (record 7) is in
    ``cleared_statuses`` is a ``nurse_call_cleared``. ESPA 4.4.4 defines no "reset"
    value for a call to pager, so the set is empty unless the central's configuration
    says which value it uses: a guess could turn real calls into clearings.
    ``now`` (timezone-aware) is both ``time`` and ``gateway_time``: ESPA carries no time.
    Raises ``InvalidEventError`` if an id is not a valid identifier.
    """
    address = call.address.strip()[:_MAX_ADDRESS]
    status = (call.call_status or "").strip()
    cleared = bool(status) and status in cleared_statuses
    kind = EventKind.NURSE_CALL_CLEARED if cleared else EventKind.NURSE_CALL
    message = None if call.message is None else translate_national(call.message, national_variant)
    payload: dict[str, Any] = {
        "address": address,
        "message": _clip(message, _MAX_MESSAGE),
        "call_type": _clip(call.call_type, _MAX_CODE),
        "priority": _priority(call.priority),
        "beep_code": _clip(call.beep_code, _MAX_CODE),
    }
    event = parse_event(
        {
            "id": uuid7(),
            "time": now,
            "gateway_time": now,
            "gateway_id": gateway_id,
            "device_id": addresses.get(address, central_device_id),
            "device_type": DeviceType.NURSE_CALL.value,
            "kind": kind.value,
            "payload": payload,
        }
    )
    return [event]
