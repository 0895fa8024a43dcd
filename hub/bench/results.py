"""What a run measured: throughput and latency figures, and the whole report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from hub.bench.mqtt import InflightFinding
from hub.bench.plan import Plan
from hub.bench.profile import CpuUsage, Profile


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class Throughput:
    name: str
    unit: str
    expected: int
    delivered: int = 0
    messages: int = 0
    seconds: float = math.nan
    blocked_s: float = 0.0
    cpu: CpuUsage = field(default_factory=CpuUsage)
    hub: dict[str, float] = field(default_factory=dict)
    profile: Profile | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else math.nan

    @property
    def missing(self) -> int:
        return self.expected - self.delivered


@dataclass(slots=True)
class Latency:
    name: str
    samples: list[float] = field(default_factory=list)
    by_probe: dict[int, float] = field(default_factory=dict)
    lost: int = 0
    background_rate: float = math.nan
    cpu: CpuUsage = field(default_factory=CpuUsage)
    hub: dict[str, float] = field(default_factory=dict)
    events: int = 0

    def ms(self, q: float) -> float:
        return percentile(self.samples, q) * 1000

    def slowest(self, n: int = 3) -> str:
        worst = sorted(self.by_probe.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"#{i + 1} {v * 1000:.0f} ms" for i, v in worst)


@dataclass(slots=True)
class Report:
    started: datetime
    quick: bool
    plan: Plan
    services: dict[str, str] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inflight: InflightFinding | None = None
    publish_only: Throughput | None = None
    raw_sub: list[Throughput] = field(default_factory=list)
    raw_sub_other: Throughput | None = None
    """The bare subscriber on MQTT 3.1.1, to show what MQTT 5 costs the client."""
    copy: list[Throughput] = field(default_factory=list)
    hop: Latency | None = None
    single: Throughput | None = None
    envelopes: Throughput | None = None
    telemetry: Latency | None = None
    alarm: Latency | None = None
    seconds: float = 0.0
    message_bytes: int = 0
    envelope_bytes: int = 0
