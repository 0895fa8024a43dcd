"""The edge's durable store-and-forward queue: SQLite in WAL mode, fsync on every commit.

An event is written here before anything is published, and deleted only after the hub
broker has acknowledged it (PUBACK). ``put`` is one transaction and the event is on disk
when it returns (``synchronous=FULL``), so a power cut after ``put`` loses nothing.

Order: alarm-relevant events (priority 0) first, then telemetry (priority 1), each oldest
first by insertion sequence. The event id is unique: putting the same event twice stores
it once (a driver that replays its input after a restart does no harm).

Full-queue policy (``max_events``, ``max_bytes`` of event JSON): an alarm event is always
accepted. Room is made by deleting the OLDEST telemetry first, counted in a persisted
counter (``dropped_telemetry``) and logged at warning, at most once a minute. A queue
full of alarm events only accepts more beyond the cap and logs at error. See
docs/edge-queue.md for the reasoning and the numbers.

``EdgeQueue`` is synchronous and bound to the thread that opened it (sqlite3's own check).
``AsyncEdgeQueue`` runs one ``EdgeQueue`` on a dedicated single-worker executor, so the
event loop never waits on an fsync. The schema and SQLite helpers are in
``edge.queue_sqlite``.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import structlog

from devices.events import DeviceEvent
from edge.errors import QueueError
from edge.queue_sqlite import SQL_CHUNK, MiB, RateLimitedLog, Transaction, prepare

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_EVENTS",
    "LOG_INTERVAL_S",
    "AsyncEdgeQueue",
    "EdgeQueue",
    "MiB",
    "Priority",
    "QueueDepth",
    "QueueError",
    "QueuedEvent",
    "priority_of",
]

log = structlog.get_logger()

DEFAULT_MAX_EVENTS = 1_000_000
DEFAULT_MAX_BYTES = 512 * MiB
LOG_INTERVAL_S = 60.0
"""At most one warning (dropped telemetry) and one error (over the cap) per interval."""

_COUNTERS = (
    "stored",
    "duplicates",
    "deleted",
    "dropped_telemetry",
    "dropped_telemetry_bytes",
    "alarms_over_capacity",
)


class Priority(IntEnum):
    ALARM = 0
    TELEMETRY = 1


def priority_of(event: DeviceEvent) -> Priority:
    return Priority.ALARM if event.alarm_relevant else Priority.TELEMETRY


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """One stored event: ``body`` is the event's JSON exactly as it will be sent."""

    seq: int
    event_id: str
    priority: Priority
    enqueued_at: float
    body: str
    size: int


@dataclass(frozen=True, slots=True)
class QueueDepth:
    alarm: int
    telemetry: int
    bytes: int

    @property
    def total(self) -> int:
        return self.alarm + self.telemetry


class EdgeQueue:
    """The synchronous queue. Use ``EdgeQueue.open``; every method is one transaction."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        max_events: int,
        max_bytes: int,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._conn = conn
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._clock = clock
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._count = {Priority.ALARM: 0, Priority.TELEMETRY: 0}
        self._bytes = 0
        self._drop_log = RateLimitedLog(LOG_INTERVAL_S, monotonic)
        self._over_log = RateLimitedLog(LOG_INTERVAL_S, monotonic)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> EdgeQueue:
        """Open or create the queue at ``path``, exclusively: a second opener gets QueueError.

        ``clock`` stamps ``enqueued_at`` (Unix seconds); ``monotonic`` paces the logs.
        """
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be positive")
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=0.1)
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open the edge queue at {path}: {exc}") from exc
        queue = cls(
            conn, max_events=max_events, max_bytes=max_bytes, clock=clock, monotonic=monotonic
        )
        try:
            queue._prepare()
        except sqlite3.Error as exc:
            conn.close()
            raise QueueError(f"cannot open the edge queue at {path}: {exc}") from exc
        return queue

    def _prepare(self) -> None:
        conn = self._conn
        prepare(conn, _COUNTERS)
        for key, value in conn.execute("SELECT key, value FROM meta"):
            if key in self._counters:
                self._counters[key] = int(value)
        rows = conn.execute(
            "SELECT priority, count(*), coalesce(sum(size), 0) FROM events GROUP BY priority"
        )
        for priority, count, size in rows:
            self._count[Priority(priority)] = int(count)
            self._bytes += int(size)

    # --- writing ----------------------------------------------------------------------

    def put(self, events: Sequence[DeviceEvent]) -> None:
        """Store ``events`` in one transaction; durable on disk when this returns."""
        if not events:
            return
        rows = []
        for event in events:
            body = event.model_dump_json(exclude_none=True)
            rows.append((str(event.id), int(priority_of(event)), body, len(body.encode())))
        now = self._clock()
        try:
            with self._transaction():
                added, added_bytes, duplicates = self._insert(rows, now)
                dropped, dropped_bytes = self._make_room(
                    self._count[Priority.ALARM] + added[Priority.ALARM],
                    self._count[Priority.TELEMETRY] + added[Priority.TELEMETRY],
                    self._bytes + added_bytes,
                )
                over = self._over_capacity(added, added_bytes, dropped, dropped_bytes)
                changes = {
                    "stored": sum(added.values()),
                    "duplicates": duplicates,
                    "dropped_telemetry": dropped,
                    "dropped_telemetry_bytes": dropped_bytes,
                    "alarms_over_capacity": added[Priority.ALARM] if over else 0,
                }
                self._bump(changes)
        except sqlite3.Error as exc:
            raise QueueError(f"could not store {len(events)} events: {exc}") from exc
        self._count[Priority.ALARM] += added[Priority.ALARM]
        self._count[Priority.TELEMETRY] += added[Priority.TELEMETRY] - dropped
        self._bytes += added_bytes - dropped_bytes
        self._apply(changes)
        self._report(dropped, over)

    def _insert(
        self, rows: Iterable[tuple[str, int, str, int]], now: float
    ) -> tuple[dict[Priority, int], int, int]:
        added = {Priority.ALARM: 0, Priority.TELEMETRY: 0}
        added_bytes = duplicates = 0
        for event_id, priority, body, size in rows:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO events (event_id, priority, enqueued_at, body, size)"
                " VALUES (?, ?, ?, ?, ?)",
                (event_id, priority, now, body, size),
            )
            if cur.rowcount == 1:
                added[Priority(priority)] += 1
                added_bytes += size
            else:
                duplicates += 1
        return added, added_bytes, duplicates

    def _make_room(self, alarms: int, telemetry: int, size: int) -> tuple[int, int]:
        """Delete the oldest telemetry until both caps hold (or no telemetry is left)."""
        excess_events = alarms + telemetry - self._max_events
        excess_bytes = size - self._max_bytes
        if excess_events <= 0 and excess_bytes <= 0:
            return 0, 0
        dropped = dropped_bytes = 0
        cutoff = None
        cur = self._conn.execute(
            "SELECT seq, size FROM events WHERE priority = ? ORDER BY seq",
            (int(Priority.TELEMETRY),),
        )
        for seq, row_size in cur:
            if dropped >= excess_events and dropped_bytes >= excess_bytes:
                break
            cutoff, dropped, dropped_bytes = seq, dropped + 1, dropped_bytes + row_size
        cur.close()
        if cutoff is not None:
            self._conn.execute(
                "DELETE FROM events WHERE priority = ? AND seq <= ?",
                (int(Priority.TELEMETRY), cutoff),
            )
        return dropped, dropped_bytes

    def _over_capacity(
        self, added: dict[Priority, int], added_bytes: int, dropped: int, dropped_bytes: int
    ) -> bool:
        count = self._count[Priority.ALARM] + self._count[Priority.TELEMETRY]
        count += sum(added.values()) - dropped
        size = self._bytes + added_bytes - dropped_bytes
        return count > self._max_events or size > self._max_bytes

    def delete(self, seqs: Iterable[int]) -> None:
        """Delete acknowledged events by sequence number; unknown numbers are ignored."""
        wanted = sorted(set(seqs))
        if not wanted:
            return
        removed = {Priority.ALARM: 0, Priority.TELEMETRY: 0}
        removed_bytes = 0
        try:
            with self._transaction():
                for start in range(0, len(wanted), SQL_CHUNK):
                    chunk = wanted[start : start + SQL_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows = self._conn.execute(
                        f"SELECT priority, size FROM events WHERE seq IN ({marks})", chunk
                    ).fetchall()
                    for priority, size in rows:
                        removed[Priority(priority)] += 1
                        removed_bytes += size
                    self._conn.execute(f"DELETE FROM events WHERE seq IN ({marks})", chunk)
                changes = {"deleted": sum(removed.values())}
                self._bump(changes)
        except sqlite3.Error as exc:
            raise QueueError(f"could not delete {len(wanted)} events: {exc}") from exc
        for priority, count in removed.items():
            self._count[priority] -= count
        self._bytes -= removed_bytes
        self._apply(changes)

    # --- reading ----------------------------------------------------------------------

    def peek(self, limit: int = 500, exclude: Collection[int] = ()) -> list[QueuedEvent]:
        """Up to ``limit`` events, alarms first, then oldest first, skipping ``exclude``."""
        if limit < 1:
            return []
        skip = frozenset(exclude)
        try:
            # The index (priority, seq) answers this without touching the rows; at most
            # len(skip) of the first limit + len(skip) entries can be skipped.
            seqs = [
                seq
                for (seq,) in self._conn.execute(
                    "SELECT seq FROM events ORDER BY priority, seq LIMIT ?",
                    (limit + len(skip),),
                )
                if seq not in skip
            ][:limit]
            found: list[QueuedEvent] = []
            for start in range(0, len(seqs), SQL_CHUNK):
                chunk = seqs[start : start + SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.extend(
                    QueuedEvent(seq, event_id, Priority(prio), enqueued_at, body, size)
                    for seq, event_id, prio, enqueued_at, body, size in self._conn.execute(
                        "SELECT seq, event_id, priority, enqueued_at, body, size"
                        f" FROM events WHERE seq IN ({marks})",
                        chunk,
                    )
                )
        except sqlite3.Error as exc:
            raise QueueError(f"could not read the queue: {exc}") from exc
        found.sort(key=lambda item: (item.priority, item.seq))
        return found

    def depth(self) -> QueueDepth:
        return QueueDepth(
            alarm=self._count[Priority.ALARM],
            telemetry=self._count[Priority.TELEMETRY],
            bytes=self._bytes,
        )

    def counters(self) -> dict[str, int]:
        """Persisted counters: stored, duplicates, deleted, dropped_telemetry, ..."""
        return dict(self._counters)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- helpers ----------------------------------------------------------------------

    def _transaction(self) -> Transaction:
        return Transaction(self._conn)

    def _bump(self, changes: dict[str, int]) -> None:
        self._conn.executemany(
            "UPDATE meta SET value = value + ? WHERE key = ?",
            [(value, key) for key, value in changes.items() if value],
        )

    def _apply(self, changes: dict[str, int]) -> None:
        for key, value in changes.items():
            self._counters[key] += value

    def _report(self, dropped: int, over: bool) -> None:
        if dropped:
            self._drop_log(
                log.warning,
                "edge_queue_telemetry_dropped",
                dropped,
                total_dropped=self._counters["dropped_telemetry"],
                max_events=self._max_events,
                max_bytes=self._max_bytes,
            )
        if over:
            depth = self.depth()
            self._over_log(
                log.error,
                "edge_queue_over_capacity_with_alarms",
                1,
                alarms=depth.alarm,
                bytes=depth.bytes,
                max_events=self._max_events,
                max_bytes=self._max_bytes,
            )


_T = TypeVar("_T")


class AsyncEdgeQueue:
    """``EdgeQueue`` for asyncio: every SQLite call runs on ONE dedicated worker thread.

    A cancelled call may still complete on the worker (a ``put`` may be stored although
    its caller saw ``CancelledError``); that is safe, since ids are unique.
    """

    def __init__(self, queue: EdgeQueue, executor: ThreadPoolExecutor) -> None:
        self._queue = queue
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> AsyncEdgeQueue:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-queue")
        opener = functools.partial(EdgeQueue.open, path, max_events=max_events, max_bytes=max_bytes)
        try:
            queue = await asyncio.get_running_loop().run_in_executor(executor, opener)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(queue, executor)

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, functools.partial(func, *args))
        except RuntimeError as exc:  # the executor was shut down
            raise QueueError("the edge queue is closed") from exc
        return await future

    async def put(self, events: Sequence[DeviceEvent]) -> None:
        await self._run(self._queue.put, list(events))

    async def peek(self, limit: int = 500, exclude: Collection[int] = ()) -> list[QueuedEvent]:
        # A frozen copy: the caller may change its set while the worker reads it.
        return await self._run(self._queue.peek, limit, frozenset(exclude))

    async def delete(self, seqs: Iterable[int]) -> None:
        await self._run(self._queue.delete, list(seqs))

    async def depth(self) -> QueueDepth:
        return await self._run(self._queue.depth)

    async def counters(self) -> dict[str, int]:
        return await self._run(self._queue.counters)

    async def close(self) -> None:
        """Close the database, then stop the worker; closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._run(self._queue.close)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
