"""Prometheus metrics of one hub process (a registry per process, not a global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class HubMetrics:
    """The hub's instruments; ``registry`` is served at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_ingested = Counter(
            "telecare_events_ingested", "Events stored (new rows).", registry=r
        )
        self.events_duplicate = Counter(
            "telecare_events_duplicate",
            "Events received again with an id already stored; not stored twice.",
            registry=r,
        )
        self.messages_received = Counter(
            "telecare_mqtt_messages_received", "MQTT messages taken off the broker.", registry=r
        )
        self.messages_quarantined = Counter(
            "telecare_messages_quarantined",
            "Messages that failed validation and went to quarantine.",
            ["reason"],
            registry=r,
        )
        self.alarms_raised = Counter(
            "telecare_alarms_raised", "Alarms raised.", ["priority"], registry=r
        )
        self.alarm_triggers_joined = Counter(
            "telecare_alarm_triggers_joined",
            "Triggers that joined an already open alarm instead of raising a new one.",
            registry=r,
        )
        self.ingest_lag = Histogram(
            "telecare_ingest_lag_seconds",
            "From the hub receiving a message to its events being committed.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.event_age = Histogram(
            "telecare_event_age_seconds",
            "From the device's event time to commit, per message by its first event"
            " (includes edge queueing and clock skew).",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86400),
            registry=r,
        )
        self.batch_events = Histogram(
            "telecare_ingest_batch_events",
            "Events written per database transaction.",
            buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
            registry=r,
        )
        self.flush_errors = Counter(
            "telecare_ingest_flush_errors",
            "Database transactions that failed and were retried.",
            registry=r,
        )
        self.pending_events = Gauge(
            "telecare_ingest_pending_events",
            "Events received and not yet committed.",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "telecare_mqtt_connected", "1 while the ingest is connected to the broker.", registry=r
        )
        self.api_invalid_requests = Counter(
            "telecare_api_invalid_requests", "API requests refused as invalid (422).", registry=r
        )
        self.mqtt_reconnects = Counter(
            "telecare_mqtt_reconnects", "Connections to the broker lost and retried.", registry=r
        )
