"""Plain SQL migrations, applied in order and recorded.

A migration is ``NNNN_name.sql``. Where the storage backend matters there are two
variants, ``NNNN_name@native.sql`` and ``NNNN_name@timescaledb.sql``; the backend is
chosen once (TimescaleDB if the extension can be created here, unless settings say
otherwise) and recorded in ``telecare_meta`` with the first variant migration, in its
transaction. Each migration runs in its own transaction under an advisory lock, so two
hub processes starting together apply each migration once. An applied migration whose
file has changed is an error.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import psycopg
import structlog

from hub.errors import MigrationError

log = structlog.get_logger(__name__)

Backend = Literal["native", "timescaledb"]
BackendChoice = Literal["auto", "native", "timescaledb"]

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:@(native|timescaledb))?\.sql$")
_LOCK_KEY = 0x7E1EC4AE  # pg_advisory_lock key for migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    variant: str | None
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(backend: Backend) -> list[Migration]:
    """The migrations shipped in ``hub/db/migrations`` for ``backend``, in order."""
    found: dict[int, Migration] = {}
    for entry in resources.files("hub.db").joinpath("migrations").iterdir():
        match = _NAME_RE.match(entry.name)
        if not match:
            continue
        version, name, variant = int(match[1]), match[2], match[3]
        if variant is not None and variant != backend:
            continue
        if version in found:
            raise MigrationError(f"two migrations with version {version:04d}")
        found[version] = Migration(version, name, variant, entry.read_text())
    return [found[v] for v in sorted(found)]


async def detect_backend(conn: psycopg.AsyncConnection[Any], choice: BackendChoice) -> Backend:
    """The backend recorded earlier, else the one ``choice`` and the server allow.

    Choosing TimescaleDB creates the extension (``conn`` in autocommit mode).
    """
    cur = await conn.execute("SELECT to_regclass('telecare_meta') IS NOT NULL")
    row = await cur.fetchone()
    if row and row[0]:
        cur = await conn.execute("SELECT value FROM telecare_meta WHERE key = 'storage_backend'")
        recorded = await cur.fetchone()
        if recorded:
            backend: Backend = "timescaledb" if recorded[0] == "timescaledb" else "native"
            if choice not in {"auto", backend}:
                raise MigrationError(
                    f"this database was set up for {backend}; it cannot be switched to {choice}"
                )
            return backend
    if choice == "native":
        return "native"
    refused = await create_timescaledb(conn)
    if refused is None:
        return "timescaledb"
    if choice == "timescaledb":
        raise MigrationError(f"TimescaleDB was asked for but {refused}")
    if refused != _NOT_AVAILABLE:
        log.warning("timescaledb_unusable", reason=refused, backend="native")
    return "native"


_NOT_AVAILABLE = "the extension is not available"


async def create_timescaledb(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """Create the TimescaleDB extension if it is not there; None if that worked, else why.

    Being listed in ``pg_available_extensions`` is not enough: a server that has the files
    but not ``shared_preload_libraries = 'timescaledb'``, or a role that may not create
    extensions, fails at ``CREATE EXTENSION``. Trying it in a transaction that is rolled
    back is no test either: the library stays loaded in the session, and TimescaleDB then
    refuses the real CREATE EXTENSION in that session ("already been loaded with another
    version"). So it is created for real, the first time, here.
    """
    cur = await conn.execute(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    if not (await cur.fetchone() or (0,))[0]:
        return _NOT_AVAILABLE
    try:
        async with conn.transaction():
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        return f"CREATE EXTENSION timescaledb failed: {str(exc).strip()}"
    return None


async def migrate(url: str, *, backend_choice: BackendChoice = "auto") -> list[int]:
    """Apply pending migrations. Returns the versions applied now."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            return await _migrate_locked(conn, backend_choice)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


async def _migrate_locked(
    conn: psycopg.AsyncConnection[Any], backend_choice: BackendChoice
) -> list[int]:
    backend = await detect_backend(conn, backend_choice)
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS telecare_meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            variant     text,
            checksum    text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        );
        """
    )
    cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
    applied = dict(await cur.fetchall())
    done: list[int] = []
    for migration in load_migrations(backend):
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} was changed after it"
                    " was applied; write a new migration instead"
                )
            continue
        try:
            async with conn.transaction():
                if migration.variant is not None:
                    # Recorded with the first migration that depends on it, in its
                    # transaction: if that migration fails (CREATE EXTENSION refused),
                    # nothing is recorded and the hub can start again as native.
                    await conn.execute(
                        "INSERT INTO telecare_meta (key, value) VALUES ('storage_backend', %s)"
                        " ON CONFLICT (key) DO NOTHING",
                        (backend,),
                    )
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, variant, checksum)"
                    " VALUES (%s, %s, %s, %s)",
                    (migration.version, migration.name, migration.variant, migration.checksum),
                )
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} failed: {exc}"
            ) from exc
        log.info("migration_applied", version=migration.version, name=migration.name)
        done.append(migration.version)
    return done
