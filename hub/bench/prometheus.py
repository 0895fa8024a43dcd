"""The hub's /metrics in Prometheus text format: parsing, deltas, histogram quantiles."""

from __future__ import annotations

import contextlib
import math


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def hist_quantile(metrics: dict[str, float], name: str, q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` (from cumulative deltas)."""
    buckets: list[tuple[float, float]] = []
    for key, value in metrics.items():
        if key.startswith(f"{name}_bucket{{"):
            bound = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if bound == "+Inf" else float(bound), value))
    buckets.sort()
    total = metrics.get(f"{name}_count", 0.0)
    if total <= 0:
        return math.nan
    return next((bound for bound, cum in buckets if cum >= q * total), math.inf)
