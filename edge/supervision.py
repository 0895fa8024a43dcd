"""Device supervision: a device that stays silent longer than its interval is offline.

Pure logic: the caller passes the time to every method, and gets back the events to
queue. Nothing here sleeps or reads a clock. The daemon feeds it:

- ``seen(device_id, now)`` for every frame or event from a device (any traffic counts:
  a heartbeat, a battery report, an alarm);
- ``link_down(device_ids, now)`` when the serial line or local link that carries some
  devices is gone, so they are reported offline at once instead of after their interval;
- ``tick(now)`` regularly (``next_due()`` says when the next device can become overdue,
  so the daemon may sleep until then, or tick every few seconds).

Rules:

- After start every device has one full interval of grace: a daemon restart must not
  page anybody. A device never heard since start is overdue at ``start + interval``.
- A device silent for longer than its interval (``now - last > interval``) gets one
  ``device_offline`` event, not one per tick. ``payload.last_seen`` is when it was last
  heard, or ``None`` if it has not been heard since the daemon started.
- ``seen`` of an offline device returns its ``device_online`` event at once (rather than
  at the next tick): a recovery is reported as soon as it is known, and a device that
  is seen before the next tick could not be confused with one that stayed silent.
  ``payload.last_seen`` of that event is ``now``.
- Ids that are not supervised (for example nurse-call points that speak only when
  called) are ignored by ``seen`` (and counted) and by ``link_down``.
- Times must be timezone-aware. A ``now`` earlier than a previous one (a clock stepped
  back) never brings a deadline forward. The daemon should pass a steady clock (wall
  time at start plus monotonic elapsed time): a gateway without a real-time clock that
  steps its time forward by years at its first NTP sync would otherwise see every
  device overdue at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from devices.events import DeviceEvent, DeviceType, EventKind, is_identifier, parse_event
from devices.ids import uuid7

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class _Watch:
    device_type: DeviceType
    interval: timedelta
    due: datetime
    """Overdue once ``now`` is past this: the last activity (or start) plus the interval."""
    last_seen: datetime | None = None
    offline: bool = False


class Supervisor:
    """Check-in supervision of the devices behind one gateway."""

    def __init__(
        self,
        gateway_id: str,
        devices: Mapping[str, tuple[DeviceType, float]],
        *,
        now: datetime,
    ) -> None:
        """``devices`` maps each device id to (device type, check-in interval in s)."""
        _check_aware(now)
        if not is_identifier(gateway_id):
            raise ValueError(f"invalid gateway id {gateway_id!r}")
        self.gateway_id = gateway_id
        self._watches: dict[str, _Watch] = {}
        for device_id, (device_type, interval_s) in devices.items():
            if not is_identifier(device_id):
                raise ValueError(f"invalid device id {device_id!r}")
            if DeviceType(device_type) is DeviceType.GATEWAY:
                raise ValueError(f"{device_id}: a gateway is not supervised as a device")
            if not interval_s > 0:
                raise ValueError(f"{device_id}: the check-in interval must be positive")
            interval = timedelta(seconds=interval_s)
            self._watches[device_id] = _Watch(DeviceType(device_type), interval, now + interval)
        self.counters: dict[str, int] = {"not_supervised": 0}

    @property
    def offline(self) -> frozenset[str]:
        """Ids of the devices that are offline now."""
        return frozenset(device_id for device_id, w in self._watches.items() if w.offline)

    def next_due(self) -> datetime | None:
        """The earliest time a device that is online now can become overdue."""
        return min((w.due for w in self._watches.values() if not w.offline), default=None)

    def seen(self, device_id: str, now: datetime) -> list[DeviceEvent]:
        """Record traffic from a device; returns its ``device_online`` if it was offline."""
        _check_aware(now)
        watch = self._watches.get(device_id)
        if watch is None:
            self.counters["not_supervised"] += 1
            return []
        watch.last_seen = now if watch.last_seen is None else max(watch.last_seen, now)
        watch.due = max(watch.due, now + watch.interval)
        if not watch.offline:
            return []
        watch.offline = False
        return [self._event(EventKind.DEVICE_ONLINE, device_id, watch, now, last_seen=now)]

    def link_down(self, device_ids: Iterable[str], now: datetime) -> list[DeviceEvent]:
        """The link carrying these devices is gone: those online go offline at once."""
        _check_aware(now)
        events = []
        for device_id in dict.fromkeys(device_ids):  # each id once, in the order given
            watch = self._watches.get(device_id)
            if watch is not None and not watch.offline:
                events.append(self._go_offline(device_id, watch, now))
        return events

    def tick(self, now: datetime) -> list[DeviceEvent]:
        """``device_offline`` for each online device silent longer than its interval."""
        _check_aware(now)
        overdue = sorted(
            (w.due, device_id)
            for device_id, w in self._watches.items()
            if not w.offline and now > w.due
        )
        return [
            self._go_offline(device_id, self._watches[device_id], now) for _, device_id in overdue
        ]

    def _go_offline(self, device_id: str, watch: _Watch, now: datetime) -> DeviceEvent:
        watch.offline = True
        return self._event(
            EventKind.DEVICE_OFFLINE, device_id, watch, now, last_seen=watch.last_seen
        )

    def _event(
        self,
        kind: EventKind,
        device_id: str,
        watch: _Watch,
        now: datetime,
        *,
        last_seen: datetime | None,
    ) -> DeviceEvent:
        return parse_event(
            {
                "id": uuid7(now_ns=_unix_ns(now)),  # from the time given: no hidden clock
                "time": now,
                "gateway_time": now,
                "gateway_id": self.gateway_id,
                "device_id": device_id,
                "device_type": watch.device_type.value,
                "kind": kind.value,
                "payload": {"last_seen": last_seen},
            }
        )


def _unix_ns(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _check_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("supervision needs timezone-aware times")
