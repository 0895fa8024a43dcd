"""Targets, rates, windows and the sizes of a full and of a quick run."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_SINGLE_MSG_S = 15_000.0
TARGET_ENVELOPE_EVENTS_S = 80_000.0
TARGET_ALARM_P99_MS = 25.0
BACKGROUND_EVENTS_S = 2_000.0
PROBE_RATE_S = 20.0
ENVELOPE_EVENTS = 500
GATEWAYS = 50

PROGRESS_POLL_S = 0.1
"""How often the hub's /metrics is read during throughput phases (each read costs the hub
a few ms of CPU: at 20 Hz that was ~7 % of its CPU in the single-event phase)."""
PROBE_POLL_S = 0.001
"""Pause between two visibility queries while a latency probe is outstanding."""
BROKER_WINDOW = 100
"""Publishes awaiting the broker's PUBACK at once (paho's own queue stays empty)."""
ENVELOPE_WINDOW = 100
"""Envelopes ahead of the hub: 50,000 events, the hub's default max_pending_events."""
MOSQUITTO_QUEUE_SLACK = 500
"""Under Mosquitto's default max_queued_messages (1,000) on top of the inflight window."""
STALL_S = 10.0
"""A phase ends when nothing was delivered for this long."""
WARMUP_S = 1.0
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Plan:
    single_messages: int
    envelope_events: int
    baseline_messages: int
    copy_rows: int
    latency_s: float
    hop_s: float
    phase_timeout_s: float


FULL = Plan(100_000, 1_000_000, 100_000, 500_000, 20.0, 5.0, 90.0)
QUICK = Plan(10_000, 100_000, 10_000, 100_000, 4.0, 1.5, 20.0)
