"""The embedded PostgreSQL and the in-process MQTT broker, against real clients.

Every wait is bounded: PostgreSQL calls by ``connect_timeout`` and ``pg_ctl -t``, MQTT
exchanges by ``asyncio.timeout``, subprocesses by explicit deadlines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt
import psycopg
import pytest

from hub.embedded import EmbeddedBroker, EmbeddedBrokerThread, EmbeddedPostgres, free_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MQTT_TIMEOUT_S = 10
CONNECT_TIMEOUT_S = 5


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_data_survives_stop_and_start(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    try:
        url = pg.start()
        parts = urlsplit(url)
        assert parts.scheme == "postgresql"
        assert parts.hostname == "127.0.0.1"
        assert parts.port not in (None, 5432)
        assert parts.path == "/telecare"
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            conn.execute("CREATE TABLE readings (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO readings VALUES (1, 'a'), (2, 'b')")

        pg.stop()
        assert not pg.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2).close()

        url = pg.start()
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            rows = conn.execute("SELECT id, v FROM readings ORDER BY id").fetchall()
        assert rows == [(1, "a"), (2, "b")]
    finally:
        pg.stop()


def test_two_postgres_instances_run_at_once(tmp_path: Path) -> None:
    with (
        EmbeddedPostgres(tmp_path / "a") as url_a,
        EmbeddedPostgres(tmp_path / "b") as url_b,
    ):
        assert _host_port(url_a)[1] != _host_port(url_b)[1]
        with psycopg.connect(url_a, connect_timeout=CONNECT_TIMEOUT_S) as a:
            a.execute("CREATE TABLE only_in_a (x int)")
        with psycopg.connect(url_b, connect_timeout=CONNECT_TIMEOUT_S) as b:
            assert b.execute("SELECT to_regclass('only_in_a')").fetchone() == (None,)
            row = b.execute("SELECT current_setting('data_directory')").fetchone()
        assert row is not None
        assert Path(row[0]).resolve() == (tmp_path / "b").resolve()


def test_postgres_fixed_port_and_single_owner(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedPostgres(tmp_path / "pg", port=port) as url:
        assert _host_port(url) == ("127.0.0.1", port)
        with pytest.raises(RuntimeError, match="in use"):
            EmbeddedPostgres(tmp_path / "pg").start()
        # the refused second owner must not have disturbed the running server
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


_CHILD = """
import sys, time
from pathlib import Path
import psycopg
from hub.embedded import EmbeddedPostgres
url = EmbeddedPostgres(Path(sys.argv[1])).start()
with psycopg.connect(url) as conn:
    conn.execute("CREATE TABLE survivor (x int)")
    conn.execute("INSERT INTO survivor VALUES (7)")
Path(sys.argv[2]).write_text(url)
time.sleep(60)
"""


def test_postgres_recovers_from_crashes(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    url_file = tmp_path / "url"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data), str(url_file)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not url_file.exists():
            assert child.poll() is None, "child failed to start PostgreSQL"
            assert time.monotonic() < deadline, "child did not start PostgreSQL in 30 s"
            time.sleep(0.05)
        orphan = _postmaster_pid(data)
    finally:
        # The owner dies without stopping its server: an orphaned postmaster stays up.
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    port = free_port()
    pg = EmbeddedPostgres(data, port=port)
    try:
        url = pg.start()
        assert _host_port(url)[1] == port  # a different port than the crashed run
        assert _postmaster_pid(data) != orphan
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            assert conn.execute("SELECT x FROM survivor").fetchall() == [(7,)]

        # Now the postmaster itself is killed: a stale postmaster.pid is left behind.
        os.kill(_postmaster_pid(data), signal.SIGKILL)
        pg.stop()  # must not raise for a dead server
        assert (data / "postmaster.pid").exists()
        url = pg.start()
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            assert conn.execute("SELECT x FROM survivor").fetchall() == [(7,)]
    finally:
        pg.stop()


# --------------------------------------------------------------------------- MQTT broker


@pytest.mark.asyncio
async def test_broker_qos1_exchange_of_100_messages() -> None:
    async with EmbeddedBroker() as url:
        host, port = _host_port(url)
        assert url == f"mqtt://127.0.0.1:{port}"
        expected = {f"m{i}".encode() for i in range(100)}
        received: list[aiomqtt.Message] = []
        async with (
            asyncio.timeout(MQTT_TIMEOUT_S),
            aiomqtt.Client(host, port, identifier="sub-100") as sub,
            aiomqtt.Client(host, port, identifier="pub-100") as pub,
        ):
            await sub.subscribe("homes/+/events", qos=1)
            for i in range(100):
                await pub.publish(f"homes/h{i % 5}/events", f"m{i}".encode(), qos=1)
            async for message in sub.messages:
                received.append(message)
                if len(received) == len(expected):
                    break
    assert {m.payload for m in received} == expected
    assert {m.qos for m in received} == {1}


@pytest.mark.asyncio
async def test_broker_delivers_retained_message_to_later_subscriber() -> None:
    async with EmbeddedBroker() as url:
        host, port = _host_port(url)
        async with asyncio.timeout(MQTT_TIMEOUT_S):
            async with aiomqtt.Client(host, port, identifier="device-1") as pub:
                await pub.publish("homes/h1/status", b"online", qos=1, retain=True)
            async with aiomqtt.Client(host, port, identifier="late") as late:
                await late.subscribe("homes/+/status", qos=1)
                message = await anext(aiter(late.messages))
    assert message.payload == b"online"
    assert message.retain
    assert message.topic.matches("homes/h1/status")


@pytest.mark.asyncio
async def test_broker_persistent_session_queues_while_offline() -> None:
    async with EmbeddedBroker() as url:
        host, port = _host_port(url)
        got: list[bytes] = []
        async with asyncio.timeout(MQTT_TIMEOUT_S):
            async with aiomqtt.Client(host, port, identifier="ingest", clean_session=False) as sub:
                await sub.subscribe("homes/#", qos=1)
            async with aiomqtt.Client(host, port, identifier="device-2") as pub:
                for i in range(3):
                    await pub.publish("homes/h2/events", f"offline-{i}".encode(), qos=1)
            async with aiomqtt.Client(host, port, identifier="ingest", clean_session=False) as sub:
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    got.append(message.payload)
                    if len(got) == 3:
                        break
    assert sorted(got) == [b"offline-0", b"offline-1", b"offline-2"]


@pytest.mark.asyncio
async def test_broker_rejects_mqtt5_known_limit() -> None:
    async with EmbeddedBroker() as url:
        host, port = _host_port(url)
        async with asyncio.timeout(MQTT_TIMEOUT_S):
            with pytest.raises(aiomqtt.MqttError, match="protocol"):
                async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5):
                    pass


def test_broker_thread_serves_synchronous_callers() -> None:
    async def roundtrip(host: str, port: int) -> bytes | bytearray | object:
        async with (
            asyncio.timeout(MQTT_TIMEOUT_S),
            aiomqtt.Client(host, port, identifier="thread-client") as client,
        ):
            await client.subscribe("ping", qos=1)
            await client.publish("ping", b"pong", qos=1)
            async for message in client.messages:
                return message.payload
        raise AssertionError("no message")

    with EmbeddedBrokerThread() as url:
        host, port = _host_port(url)
        payload = asyncio.run(roundtrip(host, port))
    assert payload == b"pong"
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, port), timeout=2):
        pass


@pytest.mark.asyncio
async def test_broker_sends_a_new_connection_only_the_retained_messages_of_its_own_filters(
) -> None:
    """amqtt 0.12 sent every client's retained matches to each new connection (patched)."""
    async with EmbeddedBroker() as url:
        host, port = _host_port(url)
        async with asyncio.timeout(MQTT_TIMEOUT_S):
            async with aiomqtt.Client(host, port, identifier="gw-a") as gateway:
                await gateway.publish("gw/a/status", b"online", qos=1, retain=True)
            # Someone else holds a filter that matches that retained status.
            async with aiomqtt.Client(host, port, identifier="watcher") as watcher:
                await watcher.subscribe("gw/+/status", qos=1)
                # A new client subscribed only to its commands must not get the status.
                async with aiomqtt.Client(host, port, identifier="gw-b") as other:
                    await other.subscribe("gw/b/commands", qos=1)
                    await other.publish("gw/b/commands", b"unlock", qos=1)
                    first = await anext(aiter(other.messages))
    assert first.payload == b"unlock"
    assert first.topic.matches("gw/b/commands")


@pytest.mark.asyncio
async def test_broker_survives_many_clients_subscribing_at_once() -> None:
    """amqtt 0.12 iterated its subscription table while awaiting (patched: a snapshot)."""
    async with EmbeddedBroker() as url:
        host, port = _host_port(url)
        async with aiomqtt.Client(host, port, identifier="retainer") as retainer:
            for i in range(20):
                await retainer.publish(f"site/{i}/status", b"online", qos=1, retain=True)

        async def one(i: int) -> bytes:
            async with aiomqtt.Client(host, port, identifier=f"edge-{i}",
                                      clean_session=False) as client:
                await client.subscribe(f"site/{i}/status", qos=1)
                message = await anext(aiter(client.messages))
                assert isinstance(message.payload, bytes)
                return message.payload

        async with asyncio.timeout(MQTT_TIMEOUT_S * 3):
            for _ in range(2):  # the second round reconnects persistent sessions
                got = await asyncio.gather(*(one(i) for i in range(20)))
                assert got == [b"online"] * 20
