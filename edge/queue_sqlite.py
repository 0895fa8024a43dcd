"""SQLite helpers of the edge queue (``edge.queue``): schema, transactions, paced logs.

``prepare(conn, counters)`` sets the connection up (exclusive lock, WAL, ``synchronous =
FULL``) and creates or checks the schema; ``Transaction`` is ``BEGIN IMMEDIATE`` ...
``COMMIT``, or ``ROLLBACK`` on any exception; ``RateLimitedLog`` logs an event at most
once per interval.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from types import TracebackType

MiB = 1024 * 1024

SCHEMA_VERSION = 1
SQL_CHUNK = 500
"""Bound parameters per statement: far below SQLite's limit on every version in use."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    priority INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    body TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_priority ON events (priority, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""


def prepare(conn: sqlite3.Connection, counters: Iterable[str]) -> None:
    """Lock the file, switch to WAL, create the schema and a zero row per counter.

    Raises ``sqlite3.Error`` if the file is locked, is not a database, or has a newer
    schema than this code.
    """
    # Exclusive: one daemon per queue file. Set before the first WAL access, so no
    # shared-memory index is used; the lock is taken by the first write below.
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA journal_size_limit = {64 * MiB}")
    with Transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"queue schema {version} is newer than this code")
        # Statement by statement: executescript() would COMMIT our transaction.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)",
            [(key,) for key in counters],
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:  # disk full, I/O error: leave no transaction open
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


class RateLimitedLog:
    """Logs an event at most once per interval, with how many occurrences it stands for."""

    def __init__(self, interval_s: float, monotonic: Callable[[], float]) -> None:
        self._interval_s = interval_s
        self._monotonic = monotonic
        self._last: float | None = None
        self._pending = 0

    def __call__(self, emit: Callable[..., object], event: str, count: int, **kw: object) -> None:
        self._pending += count
        now = self._monotonic()
        if self._last is not None and now - self._last < self._interval_s:
            return
        emit(event, occurrences=self._pending, **kw)
        self._last = now
        self._pending = 0
