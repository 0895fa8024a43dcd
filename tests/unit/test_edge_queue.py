"""The edge's durable queue (and the pure parts of the uplink that read it).

Durability across close and reopen and across SIGKILL, order (alarms first, then oldest),
duplicates stored once, and the full-queue policy: oldest telemetry dropped and counted,
alarm events never dropped.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from devices.events import DeviceEvent, make_event, parse_envelope
from devices.ids import uuid7
from edge.queue import AsyncEdgeQueue, EdgeQueue, Priority, QueueDepth, QueueError
from edge.uplink import Backoff, BrokerAddress, build_envelope, decide_command

ROOT = Path(__file__).resolve().parents[2]
MODEL = settings(max_examples=150, deadline=None, database=None)
GW = "gw-unit"


def telemetry(n: int = 0) -> DeviceEvent:
    return make_event(
        "motion",
        gateway_id=GW,
        device_id=f"motion-{n % 3}",
        device_type="motion_sensor",
        payload={"room": "stue"},
    )


def alarm(n: int = 0) -> DeviceEvent:
    return make_event(
        "button_pressed", gateway_id=GW, device_id=f"pendant-{n % 2}", device_type="safety_alarm"
    )


def ids(queue: EdgeQueue) -> list[str]:
    return [item.event_id for item in queue.peek(limit=1_000_000)]


# --- durability, order, duplicates ----------------------------------------------------


def test_events_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    events = [telemetry(i) for i in range(5)] + [alarm(i) for i in range(2)]
    with EdgeQueue.open(path) as queue:
        queue.put(events)
        before = queue.peek()
    with EdgeQueue.open(path) as queue:
        after = queue.peek()
        assert after == before
        assert queue.depth() == QueueDepth(
            alarm=2, telemetry=5, bytes=sum(item.size for item in before)
        )
        assert queue.counters()["stored"] == 7
        # The stored JSON is the event itself, byte for byte what will be sent.
        by_id = {str(e.id): e for e in events}
        for item in after:
            assert parse_envelope(f'{{"events":[{item.body}]}}').events[0] == by_id[item.event_id]
            assert item.size == len(item.body.encode())


def test_alarms_come_first_then_oldest_first(tmp_path: Path) -> None:
    with EdgeQueue.open(tmp_path / "q.db") as queue:
        t1, a1, t2, a2 = telemetry(1), alarm(1), telemetry(2), alarm(2)
        queue.put([t1, a1])
        queue.put([t2])
        queue.put([a2])
        assert ids(queue) == [str(a1.id), str(a2.id), str(t1.id), str(t2.id)]
        first = queue.peek(limit=1)
        assert [item.event_id for item in first] == [str(a1.id)]
        assert first[0].priority is Priority.ALARM
        skip = {item.seq for item in queue.peek(limit=2)}
        assert [i.event_id for i in queue.peek(exclude=skip)] == [str(t1.id), str(t2.id)]
        assert queue.peek(limit=0) == []


@given(
    batches=st.lists(st.lists(st.booleans(), min_size=1, max_size=8), min_size=1, max_size=8),
    skip_every=st.integers(2, 5),
    limit=st.integers(1, 70),
)
@MODEL
def test_peek_order_matches_a_model(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[bool]],
    skip_every: int,
    limit: int,
) -> None:
    expected_alarms: list[str] = []
    expected_telemetry: list[str] = []
    with EdgeQueue.open(tmp_path_factory.mktemp("q") / "q.db") as queue:
        for batch in batches:
            events = [alarm() if is_alarm else telemetry() for is_alarm in batch]
            queue.put(events)
            for event in events:
                (expected_alarms if event.alarm_relevant else expected_telemetry).append(
                    str(event.id)
                )
        expected = expected_alarms + expected_telemetry
        assert ids(queue) == expected
        everything = queue.peek(limit=1000)
        skip = {item.seq for n, item in enumerate(everything) if n % skip_every == 0}
        left = [item.event_id for item in everything if item.seq not in skip]
        assert [item.event_id for item in queue.peek(limit, exclude=skip)] == left[:limit]


def test_a_duplicate_is_stored_once(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    event, other = alarm(), telemetry()
    with EdgeQueue.open(path) as queue:
        queue.put([event, event, other])
        queue.put([event])
    with EdgeQueue.open(path) as queue:
        queue.put([event, other])
        assert sorted(ids(queue)) == sorted([str(event.id), str(other.id)])
        assert queue.depth().total == 2
        assert queue.counters()["duplicates"] == 4


def test_delete_removes_only_the_given_events(tmp_path: Path) -> None:
    with EdgeQueue.open(tmp_path / "q.db") as queue:
        queue.put([alarm(), telemetry(), telemetry()])
        items = queue.peek()
        queue.delete([items[0].seq, items[2].seq, 999_999])
        assert ids(queue) == [items[1].event_id]
        assert queue.depth() == QueueDepth(alarm=0, telemetry=1, bytes=items[1].size)
        queue.delete([])
        assert queue.counters()["deleted"] == 2
        # A deleted event's sequence number is never reused.
        queue.put([telemetry()])
        assert queue.peek()[-1].seq > items[2].seq


def test_a_second_process_cannot_open_the_same_queue(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with EdgeQueue.open(path) as queue:
        queue.put([telemetry()])
        with pytest.raises(QueueError, match="locked"):
            EdgeQueue.open(path)
    with EdgeQueue.open(path) as queue:  # free again once closed
        assert queue.depth().total == 1


def test_a_full_disk_fails_the_put_and_leaves_the_queue_usable(tmp_path: Path) -> None:
    with EdgeQueue.open(tmp_path / "q.db") as queue:
        queue.put([alarm()])
        before = queue.depth()
        pages = queue._conn.execute("PRAGMA page_count").fetchone()[0]
        queue._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
        with pytest.raises(QueueError, match="full"):
            queue.put([telemetry(i) for i in range(500)])
        assert queue.depth() == before
        assert len(ids(queue)) == 1
        queue._conn.execute("PRAGMA max_page_count = 1000000")  # room again
        queue.put([telemetry()])
        assert queue.depth().total == 2


def test_the_database_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    with EdgeQueue.open(tmp_path / "q.db") as queue:
        conn = queue._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


# --- the full-queue policy ------------------------------------------------------------


def test_when_full_the_oldest_telemetry_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    old = [telemetry(i) for i in range(8)]
    alarms = [alarm(i) for i in range(5)]
    with capture_logs() as logs, EdgeQueue.open(path, max_events=10) as queue:
        queue.put(old)
        queue.put(alarms)
        # 13 events for 10 places: the 3 oldest telemetry events made room.
        assert ids(queue) == [str(e.id) for e in alarms + old[3:]]
        queue.put([telemetry()])  # one more drop, within the same minute: not logged again
    warnings = [e for e in logs if e["event"] == "edge_queue_telemetry_dropped"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["occurrences"] == 3
    with EdgeQueue.open(path, max_events=10) as queue:
        assert queue.counters()["dropped_telemetry"] == 4  # persisted across the reopen
        assert queue.depth() == QueueDepth(alarm=5, telemetry=5, bytes=queue.depth().bytes)


def test_alarms_are_never_dropped_even_beyond_the_cap(tmp_path: Path) -> None:
    with capture_logs() as logs, EdgeQueue.open(tmp_path / "q.db", max_events=5) as queue:
        queue.put([telemetry(i) for i in range(3)])
        alarms = [alarm(i) for i in range(8)]
        queue.put(alarms)
        assert ids(queue) == [str(e.id) for e in alarms]
        assert queue.depth().alarm == 8
        assert queue.counters()["dropped_telemetry"] == 3
        assert queue.counters()["alarms_over_capacity"] == 8
        queue.put([telemetry()])  # telemetry that does not fit is itself dropped
        assert queue.depth().telemetry == 0
    errors = [e for e in logs if e["event"] == "edge_queue_over_capacity_with_alarms"]
    assert len(errors) == 1
    assert errors[0]["log_level"] == "error"


def test_the_byte_cap_drops_telemetry_too(tmp_path: Path) -> None:
    sample = telemetry()
    size = len(sample.model_dump_json(exclude_none=True).encode())
    with EdgeQueue.open(tmp_path / "q.db", max_bytes=size * 4 + size // 2) as queue:
        events = [telemetry(i) for i in range(6)]
        queue.put(events)
        assert ids(queue) == [str(e.id) for e in events[2:]]
        assert queue.depth().bytes <= size * 4 + size // 2
        assert queue.counters()["dropped_telemetry_bytes"] >= 2 * size - 4


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.lists(st.booleans(), min_size=1, max_size=6)),
            st.tuples(st.just("delete"), st.lists(st.integers(0, 30), max_size=6)),
        ),
        min_size=1,
        max_size=20,
    ),
    max_events=st.integers(1, 12),
)
@MODEL
def test_the_full_queue_policy_matches_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, Any]], max_events: int
) -> None:
    """Against a list: alarms are all kept; telemetry is cut from the oldest end."""
    model: list[tuple[bool, str]] = []  # (is_alarm, id) in insertion order
    dropped = 0
    with EdgeQueue.open(tmp_path_factory.mktemp("q") / "q.db", max_events=max_events) as queue:
        for op, arg in ops:
            if op == "put":
                events = [alarm() if a else telemetry() for a in arg]
                queue.put(events)
                model.extend((e.alarm_relevant, str(e.id)) for e in events)
                while len(model) > max_events and any(not a for a, _ in model):
                    model.remove(next(item for item in model if not item[0]))
                    dropped += 1
            else:
                current = queue.peek(limit=1000)
                gone = {current[i].event_id for i in arg if i < len(current)}
                queue.delete(item.seq for item in current if item.event_id in gone)
                model = [item for item in model if item[1] not in gone]
            expected = [i for a, i in model if a] + [i for a, i in model if not a]
            assert ids(queue) == expected
            assert queue.depth().total == len(model)
        assert queue.counters()["dropped_telemetry"] == dropped


# --- a crash in the middle of writing -------------------------------------------------

_WRITER = """
import sys
from devices.events import make_event
from edge.queue import EdgeQueue

queue = EdgeQueue.open(sys.argv[1])
n = 0
while True:
    batch = [
        make_event("motion", gateway_id="gw-crash", device_id="m1",
                   device_type="motion_sensor", payload={"room": "stue"})
        if (n + i) % 7 else
        make_event("button_pressed", gateway_id="gw-crash", device_id="p1",
                   device_type="safety_alarm")
        for i in range(5)
    ]
    n += 5
    queue.put(batch)
    sys.stdout.write(" ".join(str(e.id) for e in batch) + "\\n")
    sys.stdout.flush()
"""


def test_every_put_that_returned_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while len(lines) < 500 and time.monotonic() < deadline:  # ≈ 2,500 events
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        child.send_signal(signal.SIGKILL)  # somewhere inside the next put
        rest, _ = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    lines.extend(rest.splitlines(keepends=True))
    returned = {i for line in lines if line.endswith(b"\n") for i in line.decode().split()}
    assert len(returned) >= 2_000, "the writer was too slow to test anything"
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()
    with EdgeQueue.open(path) as queue:
        stored = set(ids(queue))
        assert returned <= stored
        assert len(stored) - len(returned) <= 5  # at most the one put that had not returned
        assert queue.depth().total == len(stored)


# --- the asyncio wrapper --------------------------------------------------------------


async def test_the_async_queue_does_all_its_work_on_one_thread(tmp_path: Path) -> None:
    queue = await AsyncEdgeQueue.open(tmp_path / "q.db")
    threads: set[int] = set()
    real_put = queue._queue.put

    def spy(events: Sequence[DeviceEvent]) -> None:
        threads.add(threading.get_ident())
        real_put(events)

    queue._queue.put = spy  # type: ignore[method-assign]
    events = [alarm(i) if i % 10 == 0 else telemetry(i) for i in range(200)]
    await asyncio.gather(*(queue.put([e]) for e in events))
    assert len(threads) == 1
    assert threading.get_ident() not in threads
    depth = await queue.depth()
    assert (depth.alarm, depth.telemetry) == (20, 180)
    batch = await queue.peek(limit=30)
    assert [item.priority for item in batch[:20]] == [Priority.ALARM] * 20
    rest = await queue.peek(limit=500, exclude={item.seq for item in batch})
    assert len(rest) == 170
    await queue.delete(item.seq for item in batch)
    assert (await queue.depth()).total == 170
    assert (await queue.counters())["deleted"] == 30
    await queue.close()
    await queue.close()  # a second close does nothing
    with pytest.raises(QueueError, match="closed"):
        await queue.depth()


# --- the uplink's pure parts ----------------------------------------------------------


def test_an_envelope_holds_one_priority_and_parses_as_the_hub_would(tmp_path: Path) -> None:
    with EdgeQueue.open(tmp_path / "q.db") as queue:
        alarms = [alarm(i) for i in range(3)]
        queue.put([telemetry(i) for i in range(600)] + alarms)
        batch = queue.peek(limit=500)
    payload, chosen = build_envelope(batch)
    assert [item.priority for item in chosen] == [Priority.ALARM] * 3
    assert list(parse_envelope(payload).events) == alarms
    payload, chosen = build_envelope(batch[3:], max_bytes=10**9)
    assert len(chosen) == 497
    assert len(parse_envelope(payload).events) == 497
    payload, chosen = build_envelope(batch[3:])  # the default cap: 64 KiB
    assert len(payload) <= 64 * 1024 < len(payload) + chosen[-1].size + 1
    payload, chosen = build_envelope(batch[3:], max_bytes=10 * batch[3].size)
    assert 5 <= len(chosen) < 10
    assert len(payload) <= 10 * batch[3].size
    payload, chosen = build_envelope(batch[3:], max_bytes=1)  # never fewer than one event
    assert len(chosen) == 1


def _command(**overrides: Any) -> dict[str, Any]:
    command = {
        "command_id": str(uuid7()),
        "kind": "unlock",
        "device_id": "lock-1",
        "params": {},
        "expires_at": "2030-01-01T00:00:00Z",
    }
    command.update(overrides)
    return command


NOW = datetime(2029, 6, 1, 12, 0, tzinfo=UTC)


def test_a_valid_command_is_to_be_executed() -> None:
    import json

    raw = _command()
    decision = decide_command(json.dumps(raw).encode(), now=NOW)
    assert decision.command is not None
    assert str(decision.command.command_id) == raw["command_id"]
    assert decision.result is None
    assert decision.reason is None


def test_an_expired_command_is_answered_expired_and_not_executed() -> None:
    import json

    raw = _command(expires_at=(NOW - timedelta(seconds=1)).isoformat())
    decision = decide_command(json.dumps(raw).encode(), now=NOW)
    assert decision.command is None
    assert decision.reason == "expired"
    assert decision.result is not None
    assert (decision.result.ok, decision.result.error) == (False, "expired")
    assert str(decision.result.command_id) == raw["command_id"]
    assert decision.result.time == NOW


def test_an_invalid_command_is_answered_when_its_id_can_be_read() -> None:
    import json

    raw = _command(kind="self_destruct")
    decision = decide_command(json.dumps(raw).encode(), now=NOW)
    assert decision.command is None
    assert decision.reason == "invalid"
    assert decision.result is not None
    assert decision.result.ok is False
    assert decision.result.error is not None
    assert "kind" in decision.result.error
    assert str(decision.result.command_id) == raw["command_id"]


@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
@settings(max_examples=200, deadline=None, database=None)
def test_garbage_on_the_commands_topic_never_crashes(raw: bytes) -> None:
    decision = decide_command(raw, now=NOW)
    assert decision.command is None
    assert decision.reason == "invalid"
    assert decision.result is None  # no id to answer to


@pytest.mark.parametrize(
    "command_id",
    [None, "not-a-uuid", str(uuid.uuid4()), 42],  # v4 is not a UUIDv7
)
def test_an_invalid_command_without_a_usable_id_is_not_answered(command_id: Any) -> None:
    import json

    decision = decide_command(json.dumps(_command(command_id=command_id)).encode(), now=NOW)
    assert decision.reason == "invalid"
    assert decision.result is None


def test_backoff_grows_with_jitter_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(0.5, 8.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.5
    with pytest.raises(ValueError, match="reconnect_min_s"):
        Backoff(2.0, 1.0)


def test_broker_urls() -> None:
    plain = BrokerAddress.from_url("mqtt://broker.example:1884")
    assert (plain.host, plain.port, plain.username, plain.tls) == (
        "broker.example",
        1884,
        None,
        False,
    )
    secure = BrokerAddress.from_url("mqtts://gw%2D1:p%40ss@hub.example")
    assert (secure.port, secure.username, secure.password, secure.tls) == (
        8883,
        "gw-1",
        "p@ss",
        True,
    )
    with pytest.raises(ValueError, match="mqtt://"):
        BrokerAddress.from_url("http://hub.example")
