"""The measured phases of one run: set-up, baselines, the hub's throughput and latency."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from hub.bench.mqtt import (
    BaselineSubscriber,
    Publisher,
    broker_facts,
    check_inflight,
    forget_session,
)
from hub.bench.payloads import (
    _ALARM_GATEWAY,
    _PROBE_GATEWAY,
    _check_payloads,
    _copy_rows,
    _press,
    _probe_event,
    _topic,
    envelope_messages,
    registry,
    single_messages,
)
from hub.bench.plan import (
    BACKGROUND_EVENTS_S,
    ENVELOPE_EVENTS,
    ENVELOPE_WINDOW,
    FULL,
    MOSQUITTO_QUEUE_SLACK,
    PROBE_POLL_S,
    PROBE_RATE_S,
    PROBE_TIMEOUT_S,
    QUICK,
    STALL_S,
    WARMUP_S,
)
from hub.bench.profile import CpuMeter, CpuSample, CpuUsage, Profiler, _py_spy
from hub.bench.prometheus import _delta
from hub.bench.results import Latency, Report, Throughput
from hub.bench.services import HubProcess, Progress, Services, _with_database
from hub.settings import HubSettings, MqttEndpoint


class Bench:
    def __init__(self, settings: HubSettings, *, quick: bool, scratch: Path) -> None:
        self.settings = settings
        self.plan = QUICK if quick else FULL
        self.scratch = scratch
        self.report = Report(started=datetime.now(UTC), quick=quick, plan=self.plan)
        self.services: Services | None = None
        self.database_url = ""
        self.hub: HubProcess | None = None
        self.cpu: CpuMeter | None = None
        self.conn: psycopg.AsyncConnection[Any] | None = None

    @property
    def endpoint(self) -> MqttEndpoint:
        assert self.services is not None  # noqa: S101
        return self.services.endpoint

    @property
    def v5(self) -> bool:
        protocol = self.settings.ingest.protocol
        embedded = self.services is not None and self.services.embedded_broker
        return protocol == "5" or (protocol == "auto" and not embedded)

    @property
    def hub_inflight(self) -> int:
        return self.settings.ingest.receive_maximum if self.v5 else 20

    # -- set-up --

    async def setup(self, services: Services) -> None:
        self.services = services
        self.cpu = CpuMeter(broker_pids=services.broker_pids)
        name = f"telecare_bench_{secrets.token_hex(5)}"
        async with await psycopg.AsyncConnection.connect(services.admin_url, autocommit=True) as c:
            await c.execute(f'CREATE DATABASE "{name}"'.encode())
            cur = await c.execute("SHOW server_version")
            row = await cur.fetchone()
            self.report.machine["PostgreSQL"] = str(row[0]) if row else "?"
        self.database_url = _with_database(services.admin_url, name)
        self.report.services["scratch database"] = name

    async def drop_database(self) -> None:
        if self.services is None or not self.database_url:
            return
        name = self.database_url.rsplit("/", 1)[1].split("?")[0]
        async with await psycopg.AsyncConnection.connect(
            self.services.admin_url, autocommit=True
        ) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    async def prepare_database(self) -> None:
        from hub.admin import RegistryFile, import_registry
        from hub.db.migrate import migrate

        await migrate(self.database_url, backend_choice=self.settings.storage.backend)
        self.conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        presses = int(self.plan.latency_s * PROBE_RATE_S) + 50
        await import_registry(self.conn, RegistryFile.model_validate(registry(presses)))
        cur = await self.conn.execute(
            "SELECT value FROM telecare_meta WHERE key = 'storage_backend'"
        )
        row = await cur.fetchone()
        self.report.services["event storage"] = str(row[0]) if row else "?"
        await self._refresh_scratch_pids()

    async def _refresh_scratch_pids(self) -> None:
        if self.conn is None or self.cpu is None:
            return
        cur = await self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
        self.cpu.scratch_pids = [int(r[0]) for r in await cur.fetchall()]

    async def sample_cpu(self) -> CpuSample:
        assert self.cpu is not None  # noqa: S101
        await self._refresh_scratch_pids()
        return self.cpu.sample()

    async def usage_since(self, before: CpuSample) -> CpuUsage:
        assert self.cpu is not None  # noqa: S101
        return CpuMeter.usage(before, await self.sample_cpu())

    # -- baselines --

    async def publish_only(self, messages: Sequence[tuple[str, bytes]]) -> Throughput:
        """The publisher alone, to a topic nobody subscribes to: its ceiling."""
        result = Throughput("publish-only (no subscriber)", "msg", len(messages))
        topic = f"telecare-bench/{secrets.token_hex(4)}/nobody"
        before = await self.sample_cpu()
        async with Publisher(self.endpoint) as publisher:
            start = time.monotonic()
            for _, payload in messages:
                await publisher.publish(topic, payload)
            await publisher.drain()
            result.seconds = time.monotonic() - start
        result.cpu = await self.usage_since(before)
        result.delivered = result.messages = len(messages)
        return result

    async def raw_subscriber(
        self, messages: Sequence[tuple[str, bytes]], label: str, *, v5: bool | None = None
    ) -> Throughput:
        """The same publisher and messages into a bare aiomqtt subscriber that counts, on
        the hub's protocol unless ``v5`` says otherwise."""
        v5 = self.v5 if v5 is None else v5
        name = f"bare aiomqtt subscriber, MQTT {'5' if v5 else '3.1.1'} ({label})"
        result = Throughput(name, "msg", len(messages))
        sub = await BaselineSubscriber(
            self.endpoint, "telecare/v1/+/events", v5=v5,
            receive_maximum=self.settings.ingest.receive_maximum,
        ).start()  # fmt: skip
        assert self.cpu is not None  # noqa: S101
        self.cpu.groups["bare subscriber (baseline)"] = [sub.pid or 0]
        try:
            before = await self.sample_cpu()
            inflight = self.settings.ingest.receive_maximum if v5 else 20
            window = min(2000, inflight + MOSQUITTO_QUEUE_SLACK)

            async def wait() -> None:
                await asyncio.sleep(0.001)

            start = time.monotonic()
            result.blocked_s = await self._drive(
                messages, delivered=lambda: sub.count, wait=wait, window=window
            )
            await self._settle(lambda: float(sub.count), float(len(messages)), wait)
            result.delivered = result.messages = sub.count
            result.seconds = sub.last - start
            result.cpu = await self.usage_since(before)
        finally:
            sub.stop()
            self.cpu.groups.pop("bare subscriber (baseline)", None)
        return result

    async def hop_latency(self) -> Latency:
        """MQTT hop publish → bare subscriber at the background rate."""
        result = Latency("MQTT hop (publisher → bare subscriber)")
        count = int(self.plan.hop_s * BACKGROUND_EVENTS_S)
        sub = await BaselineSubscriber(
            self.endpoint, "telecare/v1/+/events", v5=self.v5,
            receive_maximum=self.settings.ingest.receive_maximum, timings=count,
        ).start()  # fmt: skip
        try:
            pad = b" " * max(0, self.report.message_bytes - 20)
            topic = _topic("bench-gw-hop")
            async with Publisher(self.endpoint) as publisher:
                start = time.monotonic()
                for i in range(count):
                    due = start + i / BACKGROUND_EVENTS_S
                    if due > time.monotonic():
                        await asyncio.sleep(due - time.monotonic())
                    await publisher.publish(topic, f"{time.monotonic():.6f}".encode() + pad)
                await publisher.drain()
            await self._settle(lambda: float(sub.count), float(count), lambda: asyncio.sleep(0.01))
            result.samples = sub.latencies()
            result.lost = count - sub.count
        finally:
            sub.stop()
        return result

    async def copy_baseline(self, rows: int, label: str) -> Throughput:
        """COPY binary of event rows into a table like ``events`` (same keys and indexes),
        in transactions of ``batch_max_events`` rows: the database's ceiling."""
        from hub.store.writer import _EVENT_TYPES, EVENT_COLUMNS

        result = Throughput(f"PostgreSQL COPY binary ({label})", "row", rows)
        batch = self.settings.ingest.batch_max_events
        data = _copy_rows(rows)
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as c:
            await c.execute(
                "CREATE TABLE IF NOT EXISTS bench_copy_baseline (LIKE events INCLUDING ALL)"
            )
            await c.execute("TRUNCATE bench_copy_baseline")
            statement = f"COPY bench_copy_baseline ({EVENT_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            before = await self.sample_cpu()
            start = time.monotonic()
            for offset in range(0, rows, batch):
                async with c.transaction(), c.cursor().copy(statement) as copy:
                    copy.set_types(_EVENT_TYPES)
                    for row in data[offset : offset + batch]:
                        await copy.write_row(row)
            result.seconds = time.monotonic() - start
            result.cpu = await self.usage_since(before)
            await c.execute("TRUNCATE bench_copy_baseline")
        result.delivered = rows
        return result

    # -- driving load --

    async def _drive(
        self,
        messages: Sequence[tuple[str, bytes]],
        *,
        delivered: Callable[[], float],
        wait: Callable[[], Awaitable[None]],
        window: int,
    ) -> float:
        """Publish all, never more than ``window`` messages ahead of ``delivered()``
        (in messages). Returns the seconds spent waiting for the window."""
        blocked = 0.0
        deadline = time.monotonic() + self.plan.phase_timeout_s
        async with Publisher(self.endpoint) as publisher:
            for sent, (topic, payload) in enumerate(messages):
                if sent - delivered() >= window:
                    t = time.monotonic()
                    while sent - delivered() >= window and time.monotonic() < deadline:
                        await wait()
                    blocked += time.monotonic() - t
                if time.monotonic() >= deadline:
                    self.report.notes.append(
                        f"publishing stopped at the {self.plan.phase_timeout_s:.0f} s phase limit"
                        f" after {sent} of {len(messages)} messages"
                    )
                    break
                await publisher.publish(topic, payload)
        return blocked

    async def _settle(
        self, delivered: Callable[[], float], target: float, wait: Callable[[], Awaitable[None]]
    ) -> None:
        """Until ``delivered()`` reaches ``target``, or nothing moves for ``STALL_S``."""
        last, since = delivered(), time.monotonic()
        hard = time.monotonic() + self.plan.phase_timeout_s
        while delivered() < target and time.monotonic() < hard:
            await wait()
            if delivered() != last:
                last, since = delivered(), time.monotonic()
            elif time.monotonic() - since > STALL_S:
                break

    # -- hub phases --

    async def hub_throughput(
        self, name: str, messages: Sequence[tuple[str, bytes]], events_per_message: int,
        events: int, window: int,
    ) -> Throughput:  # fmt: skip
        assert self.hub is not None  # noqa: S101
        result = Throughput(name, "event", events, messages=len(messages))
        metrics_before = await self.hub.metrics()
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
        profiler = Profiler(_py_spy(), self.hub.pid, self.scratch / f"profile-{slug}.txt")
        async with Progress(self.hub) as progress:
            base = progress.value
            before = await self.sample_cpu()
            profiler.start()
            if profiler.own_pid is not None and self.cpu is not None:
                self.cpu.groups["py-spy (profiling the hub)"] = [profiler.own_pid]
            start = time.monotonic()
            result.blocked_s = await self._drive(
                messages,
                delivered=lambda: (progress.value - base) / events_per_message,
                wait=progress.wait, window=window,
            )  # fmt: skip
            await self._settle(lambda: progress.value - base, events, progress.wait)
            final = progress.value
            done = progress.reached(final) or time.monotonic()
            result.cpu = await self.usage_since(before)
            result.profile = await profiler.stop()
            if self.cpu is not None:
                self.cpu.groups.pop("py-spy (profiling the hub)", None)
        result.delivered = int(final - base)
        result.seconds = done - start
        result.hub = _delta(metrics_before, await self.hub.metrics())
        return result

    async def settle_database(self) -> None:
        """After the bulk phases: CHECKPOINT and VACUUM ANALYZE, so the latency phases
        measure a steady 2,000 events/s rather than the aftermath of a million-row load
        (a checkpoint or an autovacuum of ``events`` starting in the middle of them)."""
        assert self.conn is not None  # noqa: S101
        start = time.monotonic()
        done = []
        for statement in ("CHECKPOINT", "VACUUM (ANALYZE) events"):
            try:
                await self.conn.execute(statement)
                done.append(statement)
            except psycopg.Error as exc:
                self.report.notes.append(f"{statement} before the latency phases: {exc}")
        self.report.notes.append(
            f"before the latency phases: {' and '.join(done) or 'nothing'}"
            f" ({time.monotonic() - start:.1f} s), then {self.warmup_s:.0f} s of background"
            " before the first probe"
        )

    @property
    def warmup_s(self) -> float:
        return WARMUP_S if self.report.quick else 3 * WARMUP_S

    async def _background(
        self, publisher: Publisher, stop: asyncio.Event, messages: Sequence[tuple[str, bytes]]
    ) -> tuple[int, float]:
        """Single-event telemetry at ``BACKGROUND_EVENTS_S`` until ``stop``, from messages
        made beforehand (then made on the fly, should the phase run long)."""
        start = time.monotonic()
        sent = 0
        while not stop.is_set() and time.monotonic() - start < 120:
            due = int((time.monotonic() - start) * BACKGROUND_EVENTS_S)
            while sent < due:
                if sent < len(messages):
                    topic, payload = messages[sent]
                else:
                    topic, payload = single_messages(1)[0]
                await publisher.publish(topic, payload)
                sent += 1
            await asyncio.sleep(0.002)
        return sent, time.monotonic() - start

    async def latency_phase(self, *, alarm: bool) -> Latency:
        """Probes at ``PROBE_RATE_S`` within the background; each probe's publish time
        against the first visibility query that finds its row (events, or alarm_triggers
        for a pendant press; every press is from another resident, so each raises an alarm
        of its own). A query runs every ``PROBE_POLL_S`` while a probe is outstanding; the
        figure includes up to one poll period and one query round trip."""
        assert self.hub is not None  # noqa: S101
        assert self.conn is not None  # noqa: S101
        name = "pendant press → alarm row" if alarm else "telemetry publish → committed"
        result = Latency(name)
        sql = (
            "SELECT event_id FROM alarm_triggers WHERE event_id = ANY(%s)"
            if alarm
            else "SELECT id FROM events WHERE id = ANY(%s)"
        )
        probes = int(self.plan.latency_s * PROBE_RATE_S)
        pending: dict[UUID, tuple[int, float]] = {}
        wake, stop_bg, probes_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        background_msgs = single_messages(
            int(BACKGROUND_EVENTS_S * (self.warmup_s + self.plan.latency_s + PROBE_TIMEOUT_S + 2))
        )
        metrics_before = await self.hub.metrics()
        before = await self.sample_cpu()
        async with Publisher(self.endpoint) as publisher:
            background = asyncio.create_task(self._background(publisher, stop_bg, background_msgs))
            await asyncio.sleep(self.warmup_s)
            poller = asyncio.create_task(
                self._poll(self.conn, sql, pending, result=result, wake=wake, done=probes_done)
            )
            start = time.monotonic()
            for i in range(probes):
                due = start + i / PROBE_RATE_S
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                payload, event_id = _press(i) if alarm else _probe_event()
                topic = _topic(_ALARM_GATEWAY if alarm else _PROBE_GATEWAY)
                pending[event_id] = (i, time.monotonic())
                await publisher.publish(topic, payload)
                wake.set()
            probes_done.set()
            wake.set()
            await poller
            stop_bg.set()
            sent, seconds = await background
        result.background_rate = sent / seconds
        result.events = sent + probes
        result.cpu = await self.usage_since(before)
        result.hub = _delta(metrics_before, await self.hub.metrics())
        return result

    @staticmethod
    async def _poll(
        conn: psycopg.AsyncConnection[Any], sql: str, pending: dict[UUID, tuple[int, float]], *,
        result: Latency, wake: asyncio.Event, done: asyncio.Event,
    ) -> None:  # fmt: skip
        while not (done.is_set() and not pending):
            if not pending:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.1)
                continue
            cur = await conn.execute(sql, (list(pending),))
            rows = await cur.fetchall()
            now = time.monotonic()
            for (event_id,) in rows:
                index, published = pending.pop(event_id)
                result.samples.append(now - published)
                result.by_probe[index] = now - published
            for event_id, (_, published) in list(pending.items()):
                if now - published > PROBE_TIMEOUT_S:
                    del pending[event_id]
                    result.lost += 1
            await asyncio.sleep(PROBE_POLL_S)

    # -- the whole run --

    async def run(self, services: Services) -> None:
        report = self.report
        await self.setup(services)
        await self.prepare_database()
        _check_payloads()
        if not services.embedded_broker:
            facts = await broker_facts(self.endpoint)
            report.machine["Mosquitto"] = facts.get("version", "?").removeprefix(
                "mosquitto version "
            )
            report.inflight = await check_inflight(
                self.endpoint, self.settings.ingest.receive_maximum
            )
        plan = self.plan
        t = time.monotonic()
        singles = single_messages(max(plan.single_messages, plan.baseline_messages))
        envelopes = envelope_messages(plan.envelope_events)
        report.message_bytes = round(sum(len(p) for _, p in singles[:1000]) / 1000)
        report.envelope_bytes = round(sum(len(p) for _, p in envelopes) / len(envelopes))
        report.notes.append(f"payload generation took {time.monotonic() - t:.1f} s (not timed)")
        baseline_msgs = singles[: plan.baseline_messages]
        report.publish_only = await self.publish_only(baseline_msgs)
        report.raw_sub.append(await self.raw_subscriber(baseline_msgs, "before the hub"))
        if self.v5:
            report.raw_sub_other = await self.raw_subscriber(
                baseline_msgs, "before the hub", v5=False
            )
        report.hop = await self.hop_latency()
        report.copy.append(await self.copy_baseline(plan.copy_rows, "before the hub"))

        self.hub = HubProcess(
            self.settings, database_url=self.database_url, mqtt_url=services.mqtt_url,
            scratch=self.scratch, protocol="5" if self.v5 else "3.1.1",
        )  # fmt: skip
        await self.hub.start()
        assert self.cpu is not None  # noqa: S101
        self.cpu.groups["hub"] = [self.hub.pid]
        try:
            window = min(2000, self.hub_inflight + MOSQUITTO_QUEUE_SLACK)
            report.single = await self.hub_throughput(
                "single-event messages", singles[: plan.single_messages], 1,
                plan.single_messages, window,
            )  # fmt: skip
            report.envelopes = await self.hub_throughput(
                f"{ENVELOPE_EVENTS}-event envelopes", envelopes, ENVELOPE_EVENTS,
                plan.envelope_events, ENVELOPE_WINDOW,
            )  # fmt: skip
            await self.settle_database()
            report.telemetry = await self.latency_phase(alarm=False)
            report.alarm = await self.latency_phase(alarm=True)
        finally:
            await self.hub.stop()
            self.cpu.groups.pop("hub", None)
            await forget_session(self.endpoint, self.hub.client_id, v5=self.v5)
        report.raw_sub.append(await self.raw_subscriber(baseline_msgs, "after the hub"))
        report.copy.append(await self.copy_baseline(plan.copy_rows, "after the hub"))

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
