"""The edge part of ``telecare bench``: its plan, its results, and its block of
docs/benchmarks.md, written between markers of its own (the hub's block is left alone)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hub.bench.profile import CpuUsage
from hub.bench.report import RESULTS_END
from hub.bench.results import Latency, percentile

EDGE_START = "<!-- telecare bench edge: results start (generated, overwritten by each run) -->"
EDGE_END = "<!-- telecare bench edge: results end -->"

TARGET_IDLE_RSS_MB = 60.0
TARGET_IDLE_CPU = 0.01
"""A share of one core."""
TARGET_DRAIN_EVENTS_S = 20_000.0
TARGET_SERIAL_P99_MS = 100.0

EDGE = "edge daemon"
GROUPS = (
    EDGE, "hub", "bench (publisher, probes)", "mosquitto", "postgres: this database's backends",
)  # fmt: skip
_BENCH_LABEL = "bench: simulators, relay, subscriber, pollers"


@dataclass(frozen=True, slots=True)
class EdgePlan:
    settle_s: float
    idle_s: float
    latency_s: float
    drain_events: int
    outage_s: float


EDGE_FULL = EdgePlan(settle_s=10.0, idle_s=60.0, latency_s=20.0, drain_events=100_000,
                     outage_s=10.0)  # fmt: skip
EDGE_QUICK = EdgePlan(settle_s=2.0, idle_s=3.0, latency_s=3.0, drain_events=5_000, outage_s=1.0)


@dataclass(slots=True)
class EdgeIdle:
    devices: int
    seconds: float = math.nan
    cpu_s: float = math.nan
    """The daemon's CPU seconds (user + system, every thread) over the window."""
    switches: int = 0
    """Context switches of all the daemon's threads over the window: its wake-ups."""
    rss: int = 0
    uss: int = 0
    peak_rss: int = 0
    threads: int = 0
    baselines: dict[str, int] = field(default_factory=dict)
    """RSS of interpreters that only import, by what they import."""
    cpu: CpuUsage = field(default_factory=CpuUsage)

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True, slots=True)
class SerialSample:
    """One dose report, in seconds from the moment its frame was written to the pty."""

    kind: str
    acked: float
    """Until the device read the edge's ACK: decoded, fsynced into the queue, answered."""
    received: float
    """Until the hub parsed it (``events.received_at``; wall clocks of this machine)."""
    stored: float
    """Until a query found its row (includes up to one poll period and a round trip)."""


@dataclass(slots=True)
class SerialLatency:
    rate: float
    sent: int = 0
    samples: list[SerialSample] = field(default_factory=list)
    lost: int = 0
    cpu: CpuUsage = field(default_factory=CpuUsage)
    pty_rtt: list[float] = field(default_factory=list)
    queue_put: list[float] = field(default_factory=list)

    def values(self, stage: str, kind: str | None = None) -> list[float]:
        out = (getattr(s, stage) for s in self.samples if kind is None or s.kind == kind)
        return [v for v in out if not math.isnan(v)]


@dataclass(slots=True)
class Drain:
    events: int
    envelopes: int = 0
    fill_s: float = math.nan
    queue_s: float = math.nan
    """The same number of events drained from a queue alone: peek, envelope, delete."""
    outage_s: float = math.nan
    first_s: float = math.nan
    """From the end of the outage to the first event at the subscriber (the reconnect)."""
    broker_s: float = math.nan
    hub_s: float = math.nan
    stored: int = 0
    distinct: int = 0
    cpu: CpuUsage = field(default_factory=CpuUsage)
    peak_rss: int = 0
    base_broker_s: float = math.nan
    base_acked_s: float = math.nan
    base_hub_s: float = math.nan
    base_cpu: CpuUsage = field(default_factory=CpuUsage)

    def rate(self, seconds: float) -> float:
        return self.events / seconds if seconds > 0 else math.nan


@dataclass(slots=True)
class EdgeReport:
    started: datetime
    quick: bool
    plan: EdgePlan
    machine: dict[str, str] = field(default_factory=dict)
    setup: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    idle: EdgeIdle | None = None
    serial: SerialLatency | None = None
    drain: Drain | None = None
    hop: Latency | None = None
    hub_telemetry: Latency | None = None
    """The hub part's telemetry publish → committed, when it ran in the same run."""
    seconds: float = 0.0


# --- rendering ------------------------------------------------------------------------


def _mb(value: float) -> str:
    return "n/a" if not value or math.isnan(value) else f"{value / 2**20:.1f} MB"


def _ms(values: Sequence[float], q: float) -> str:
    if not values:
        return "n/a"
    ms = percentile(values, q) * 1000
    return f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def _rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f} events/s"


def _ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or not b else f"{a / b:.2f}×"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**pass**" if ok else "**FAIL**")


def render_edge(report: EdgeReport, command: str) -> str:
    """The edge block of docs/benchmarks.md."""
    run = "quick (smoke) run" if report.quick else "full run"
    lines = [
        EDGE_START, "", f"## Edge results ({run}, {report.started:%Y-%m-%d %H:%M} UTC)", "",
        f"Command: `{command}` — the edge part took {report.seconds:.0f} s, after the hub's"
        " part, on the same machine and services, with a hub process of its own on the"
        " same scratch database. Generated by `hub/bench/edge.py`; this section is"
        " rewritten by every run.", "",
        "| machine and set-up | |", "| --- | --- |",
    ]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in {**report.machine, **report.setup}.items()]
    lines.append("")
    lines += _targets(report)
    lines += _findings(report)
    lines += _serial_detail(report.serial, report.hop, report.hub_telemetry)
    lines += _drain_detail(report.drain)
    lines += _cpu_table(report)
    lines += _memory(report.idle)
    if report.notes:
        lines += ["### Notes from this run", "", *[f"- {n}" for n in report.notes], ""]
    lines.append(EDGE_END)
    return "\n".join(lines) + "\n"


def _targets(report: EdgeReport) -> list[str]:
    lines = [
        "### Edge results against the targets", "",
        "| measure | target | measured | baseline, same run | ratio | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    idle, drain, serial = report.idle, report.drain, report.serial
    if idle is not None:
        cli = idle.baselines.get("what `telecare edge` imports", 0)
        lines.append(
            f"| RSS at idle, {idle.devices} devices | ≤ {TARGET_IDLE_RSS_MB:.0f} MB |"
            f" {_mb(idle.rss)} (USS {_mb(idle.uss)}, peak {_mb(idle.peak_rss)}) |"
            f" an interpreter that only imports what `telecare edge` imports: {_mb(cli)} |"
            f" {_ratio(idle.rss, cli)} | {_verdict(idle.rss <= TARGET_IDLE_RSS_MB * 2**20)} |"
        )
        share = idle.cpu_share
        lines.append(
            f"| CPU at idle ({idle.seconds:.0f} s), {idle.devices} devices |"
            f" ≤ {TARGET_IDLE_CPU * 100:.0f} % of a core | {share * 100:.2f} % of a core"
            f" ({idle.switches / idle.seconds:.1f} wake-ups/s) | — | — |"
            f" {_verdict(None if math.isnan(share) else share <= TARGET_IDLE_CPU)} |"
        )
    if drain is not None:
        for what, seconds, base, label in (
            ("a plain subscriber has every one", drain.broker_s, drain.base_broker_s,
             "at a plain subscriber"),
            ("the hub has stored every one", drain.hub_s, drain.base_hub_s, "stored by the hub"),
        ):  # fmt: skip
            rate, base_rate = drain.rate(seconds), drain.rate(base)
            ok = rate >= TARGET_DRAIN_EVENTS_S and _complete(drain)  # False if NaN
            lines.append(
                f"| drain after an outage: {drain.events:,} queued events, uplink restored →"
                f" {what} | ≥ {TARGET_DRAIN_EVENTS_S:,.0f} events/s | {_rate(rate)}"
                f" ({seconds:.2f} s) | plain aiomqtt publisher, same events and envelopes,"
                f" {label}: {_rate(base_rate)} | {_ratio(rate, base_rate)} | {_verdict(ok)} |"
            )
    if serial is not None:
        stored = serial.values("stored")
        hop = report.hop.samples if report.hop else []
        p99 = percentile(stored, 99) * 1000 if stored else math.nan
        hop99 = percentile(hop, 99) * 1000 if hop else math.nan
        ok = p99 <= TARGET_SERIAL_P99_MS and serial.lost == 0  # False if nothing arrived
        lines.append(
            f"| serial frame at the edge → stored row, p50 / p95 / p99 ({len(stored)} dose"
            f" reports at {serial.rate:.0f}/s) | p99 ≤ {TARGET_SERIAL_P99_MS:.0f} ms |"
            f" {_ms(stored, 50)} / {_ms(stored, 95)} / {_ms(stored, 99)} (max"
            f" {_ms(stored, 100)}) | MQTT hop p99 {_ms(hop, 99)}; pty round trip p99"
            f" {_ms(serial.pty_rtt, 99)} | p99 {_ratio(p99, hop99)} of the hop | {_verdict(ok)} |"
        )
    lines.append("")
    if drain is not None and not _complete(drain):
        lines += [f"**The hub stored {drain.distinct:,} distinct of {drain.events:,} drained"
                  f" events ({drain.stored:,} rows).**", ""]  # fmt: skip
    if serial is not None and serial.lost:
        lines += [f"**{serial.lost} of {serial.sent} dose reports never became visible.**", ""]
    return lines


def edge_summary(report: EdgeReport) -> str:
    """One line for the console."""
    parts = []
    if report.idle is not None:
        parts.append(f"idle RSS {_mb(report.idle.rss)}, CPU {report.idle.cpu_share * 100:.2f} %")
    if report.drain is not None:
        d = report.drain
        parts.append(f"drain {_rate(d.rate(d.broker_s))} to the broker, {_rate(d.rate(d.hub_s))}"
                     " stored")  # fmt: skip
    if report.serial is not None:
        parts.append(f"serial → stored p99 {_ms(report.serial.values('stored'), 99)}")
    return "; ".join(parts + report.notes) or "nothing measured"


def lost_anything(report: EdgeReport) -> bool:
    """Whether a drained event or a dose report never reached the database."""
    drain, serial = report.drain, report.serial
    return (drain is not None and not _complete(drain)) or (serial is not None and serial.lost > 0)


def _findings(report: EdgeReport) -> list[str]:
    """Plain sentences from this run's numbers."""
    lines = []
    idle, drain, serial = report.idle, report.drain, report.serial
    if idle is not None and idle.baselines:
        b = idle.baselines
        own, cli = b.get("the edge's modules", 0), b.get("what `telecare edge` imports", 0)
        pg = b.get("the edge's modules and psycopg", 0)
        lines.append(
            f"- Idle: RSS {_mb(idle.rss)} against ≤ {TARGET_IDLE_RSS_MB:.0f} MB, and"
            f" {idle.cpu_share * 100:.2f} % of a core with {idle.switches / idle.seconds:.0f}"
            f" wake-ups a second. An interpreter that only imports what `telecare edge`"
            f" imports holds {_mb(cli)}; the edge's own modules alone {_mb(own)}: the shared"
            f" CLI's imports add {_mb(cli - own)}, {_mb(pg - own)} of it psycopg."
        )
    if drain is not None:
        cpu = drain.cpu.seconds.get(EDGE, math.nan)
        share = cpu / drain.broker_s if drain.broker_s > 0 else math.nan
        lines.append(
            f"- Drain: {_rate(drain.rate(drain.broker_s))} from the end of the outage to the"
            f" last event at the subscriber, of which {drain.first_s:.2f} s the reconnect;"
            f" the daemon used {cpu / drain.events * 1e6:.1f} µs of CPU per event, or"
            f" {share * 100:.0f} % of one core over that time, while the machine was"
            f" {drain.cpu.machine_busy * 100:.0f} % busy. Without the network its queue work"
            f" alone runs at {_rate(drain.rate(drain.queue_s))}; a plain publisher of the same"
            f" envelopes reached the subscriber at {_rate(drain.rate(drain.base_broker_s))}."
        )
    if serial is not None and serial.samples:
        due, taken = serial.values("stored", "dose_due"), serial.values("stored", "dose_taken")
        lines.append(
            f"- Serial: p99 {_ms(serial.values('stored'), 99)} against ≤"
            f" {TARGET_SERIAL_P99_MS:.0f} ms. At the median the edge had stored and"
            f" acknowledged a report after {_ms(serial.values('acked'), 50)} and the hub had"
            f" received it after {_ms(serial.values('received'), 50)}; its row was visible"
            f" after {_ms(taken, 50)} in the alarm lane and {_ms(due, 50)} in the telemetry"
            " lane, which waits for the hub's batch window."
        )
    return ["In short, from this run's numbers:", "", *lines, ""] if lines else []


def _complete(drain: Drain) -> bool:
    return drain.distinct == drain.stored == drain.events


def _serial_detail(
    serial: SerialLatency | None, hop: Latency | None, telemetry: Latency | None
) -> list[str]:
    if serial is None:
        return []
    lines = [
        "### Serial frame → stored row: where the time goes", "",
        "Each stage is measured from the moment the dose report's frame was written to the"
        " pseudo-terminal (its first transmission). Dose reports alternate `dose_due`"
        " (telemetry) and `dose_taken` (alarm-relevant: the edge's and the hub's alarm lanes).",
        "", "| from the frame written to the pty, until | p50 | p95 | p99 | max |",
        "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    stages = (
        ("the device read the edge's ACK (frame decoded, events fsynced into the queue)",
         "acked", None),
        ("the hub received it (`events.received_at`)", "received", None),
        ("its row was found in PostgreSQL (all reports)", "stored", None),
        ("… `dose_due` only (telemetry lane)", "stored", "dose_due"),
        ("… `dose_taken` only (alarm lane)", "stored", "dose_taken"),
    )  # fmt: skip
    for label, stage, kind in stages:
        v = serial.values(stage, kind)
        lines.append(f"| {label} | {_ms(v, 50)} | {_ms(v, 95)} | {_ms(v, 99)} | {_ms(v, 100)} |")
    rows = [
        ("one fsynced `put` of one event into an edge queue, same disk", serial.queue_put),
        ("pty round trip (both ends in one thread: the kernel alone)", serial.pty_rtt),
    ]
    if hop is not None:
        rows.append(("MQTT hop, publisher → bare subscriber (the hub part)", hop.samples))
    if telemetry is not None:
        rows.append((f"the hub part's {telemetry.name}, under background load", telemetry.samples))
    for label, values in rows:
        lines.append(
            f"| baseline: {label} | {_ms(values, 50)} | {_ms(values, 95)} | {_ms(values, 99)} |"
            f" {_ms(values, 100)} |"
        )
    lines.append("")
    return lines


def _drain_detail(drain: Drain | None) -> list[str]:
    if drain is None:
        return []
    after = drain.broker_s - drain.first_s
    return [
        "### Drain after an outage", "",
        f"- {drain.events:,} events were put into the queue of a stopped edge; the daemon"
        f" then ran {drain.outage_s:.0f} s with its uplink refused. The queue alone (in this"
        f" process, same disk) takes the same number in {drain.fill_s:.1f} s (transactions"
        f" of 1,000) and gives them back in {drain.queue_s:.2f} s"
        f" ({_rate(drain.rate(drain.queue_s))}: peek 500, build the envelope, delete it, one"
        " envelope after another): what the queue's work alone allows.",
        f"- Uplink restored → first event at the subscriber {drain.first_s:.2f} s (the"
        f" reconnect, backoff capped at 0.5 s for the bench); then {after:.2f} s to the last"
        f" ({_rate(drain.rate(after))}); the hub had stored them all {drain.hub_s:.2f} s after"
        " the restore (its counter is read every 0.1 s).",
        f"- The plain publisher: {drain.envelopes:,} envelopes, {PUBLISH_WINDOW_TEXT};"
        f" every PUBACK after {drain.base_acked_s:.2f} s, every event at the subscriber after"
        f" {drain.base_broker_s:.2f} s, all stored after {drain.base_hub_s:.2f} s.",
        f"- The hub stored {drain.distinct:,} distinct events in {drain.stored:,} rows; the"
        f" edge daemon's peak RSS was {_mb(drain.peak_rss)}.", "",
    ]  # fmt: skip


PUBLISH_WINDOW_TEXT = "at most 10 unacknowledged (the edge's window of 8 plus 2 alarm slots)"


def _cpu_table(report: EdgeReport) -> list[str]:
    phases: list[tuple[str, CpuUsage, int]] = []
    if report.idle is not None:
        phases.append((f"idle, {report.idle.devices} devices", report.idle.cpu, 0))
    if report.serial is not None:
        phases.append(("serial dose reports", report.serial.cpu, report.serial.sent))
    if report.drain is not None:
        phases.append(("drain: the edge", report.drain.cpu, report.drain.events))
        phases.append(("drain: the plain publisher", report.drain.base_cpu, report.drain.events))
    if not phases:
        return []
    heads = [g if g != "bench (publisher, probes)" else _BENCH_LABEL for g in GROUPS]
    lines = [
        "### CPU by process", "",
        "CPU µs per event (per report for the serial phase; % of one core at idle),"
        " measured with psutil over each phase.", "",
        "| phase | work | machine busy | " + " | ".join(heads) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in heads) + " |",
    ]  # fmt: skip
    for name, cpu, per in phases:
        cells = []
        for group in GROUPS:
            seconds = cpu.seconds.get(group)
            if seconds is None or cpu.wall <= 0:
                cells.append("—")
            elif per:
                cells.append(f"{seconds / per * 1e6:,.1f} µs")
            else:
                cells.append(f"{seconds / cpu.wall * 100:.2f} %")
        busy = "n/a" if math.isnan(cpu.machine_busy) else f"{cpu.machine_busy * 100:.0f} %"
        work = f"{per:,} in {cpu.wall:.1f} s" if per else f"{cpu.wall:.0f} s"
        lines.append(f"| {name} | {work} | {busy} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _memory(idle: EdgeIdle | None) -> list[str]:
    if idle is None:
        return []
    parts = [f"{label} {_mb(rss)}" for label, rss in idle.baselines.items()]
    return [
        "### Memory", "",
        f"RSS of interpreters that import and wait, for comparison: {'; '.join(parts)}."
        f" The daemon at idle: RSS {_mb(idle.rss)}, of which {_mb(idle.uss)} its own (USS,"
        f" the rest shared libraries also mapped by other processes); {idle.threads} threads.",
        "",
    ]  # fmt: skip


def write_edge_report(output: Path, block: str) -> None:
    """Replace the edge block of ``output`` (else add it after the hub's block, else at
    the end); keep everything else."""
    old = output.read_text(encoding="utf-8") if output.exists() else ""
    if EDGE_START in old and EDGE_END in old:
        head, rest = old.split(EDGE_START, 1)
        text = head + block + rest.split(EDGE_END, 1)[1].removeprefix("\n")
    elif RESULTS_END in old:
        head, tail = old.split(RESULTS_END, 1)
        text = f"{head}{RESULTS_END}\n\n{block}{tail.removeprefix(chr(10))}"
    else:
        text = (old.rstrip("\n") + "\n\n" if old.strip() else "# Benchmarks\n\n") + block
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
