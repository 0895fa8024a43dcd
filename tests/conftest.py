"""Service fixtures: the real PostgreSQL and Mosquitto when reachable, embedded otherwise.

``TELECARE_TEST_SERVICES=embedded`` forces the embedded ones for the whole run; tests
marked ``embedded`` always use them. The run's header says which were used.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from hub.db.migrate import migrate
from tests.support import REAL_MQTT_URL, REAL_PG_URL, reachable

# PGlite with TimescaleDB in a Node process, one per test (tests/timescale_fixture.py).
from tests.timescale_fixture import timescale_url  # noqa: F401 - registers the fixture


def _use_real() -> tuple[bool, bool]:
    if os.environ.get("TELECARE_TEST_SERVICES") == "embedded":
        return False, False
    return reachable("127.0.0.1", 5432), reachable("127.0.0.1", 1883)


def pytest_report_header(config: pytest.Config) -> str:
    real_pg, real_mqtt = _use_real()
    pg = "PostgreSQL 127.0.0.1:5432 (real)" if real_pg else "embedded PostgreSQL (pip wheel)"
    mqtt = "Mosquitto 127.0.0.1:1883 (real)" if real_mqtt else "embedded amqtt broker"
    return f"telecare services: {pg}; {mqtt}; tests marked 'embedded' use the embedded ones"


@pytest.fixture(scope="session")
def embedded_pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private PostgreSQL for the session; yields a URL to its maintenance database."""
    from hub.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("embedded-pg"))
    url = server.start()
    try:
        yield url.rsplit("/", 1)[0] + "/postgres"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def embedded_mqtt_url() -> Iterator[str]:
    from hub.embedded import EmbeddedBrokerThread

    broker = EmbeddedBrokerThread()
    url = broker.start()
    try:
        yield url
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def pg_admin_url(request: pytest.FixtureRequest) -> str:
    if _use_real()[0]:
        return REAL_PG_URL
    return str(request.getfixturevalue("embedded_pg_admin_url"))


@pytest.fixture(scope="session")
def mqtt_url(request: pytest.FixtureRequest) -> str:
    if _use_real()[1]:
        return REAL_MQTT_URL
    return str(request.getfixturevalue("embedded_mqtt_url"))


def _with_database(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


async def fresh_database(admin_url: str) -> str:
    name = f"telecare_t_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"'.encode())
    url = _with_database(admin_url, name)
    await migrate(url)
    return url


async def drop_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture
async def database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A new, migrated database for one test, dropped afterwards."""
    url = await fresh_database(pg_admin_url)
    try:
        yield url
    finally:
        await drop_database(pg_admin_url, url)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "telecare"
    path.mkdir()
    return path
