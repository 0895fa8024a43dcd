"""What is injected into a simulation (``AnomalyType``, ``Injection``) and its ground truth.

A ``Label`` records what really happened for one injection; ``write_labels`` and
``read_labels`` keep labels as JSON lines. ``simulators.anomalies`` plans injections,
``simulators.simulation`` applies them and records the labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue


class AnomalyType(StrEnum):
    FALL = "fall"
    ILLNESS = "illness"
    NIGHT_WANDERING = "night_wandering"
    MISSED_DOSES = "missed_doses"
    DECLINING_ADHERENCE = "declining_adherence"
    GRADUAL_DECLINE = "gradual_decline"
    SMOKE = "smoke"
    WATER_LEAK = "water_leak"
    BATTERY_DRAIN = "battery_drain"
    SILENT_DEVICE = "silent_device"
    LOCK_JAM = "lock_jam"
    POWER_LOSS = "power_loss"
    UPLINK_OUTAGE = "uplink_outage"


DOSE_ANOMALIES = frozenset({AnomalyType.MISSED_DOSES, AnomalyType.DECLINING_ADHERENCE})
"""Anomalies of a resident's doses: their labels list the doses concerned."""


@dataclass(frozen=True, slots=True)
class Injection:
    """One planned anomaly or fault. Times are local: a day index and a wall minute."""

    key: int
    type: AnomalyType
    site_id: str
    resident_id: str | None
    device_id: str | None
    day: int
    minute: float
    duration: float
    """Minutes; for multi-day anomalies, ``days`` whole days."""
    days: int = 1
    params: Mapping[str, float] = field(default_factory=dict)


class Label(BaseModel):
    """Ground truth for one injection, one JSON line in the labels file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: AnomalyType
    site_id: str
    gateway_id: str
    resident_id: str | None = None
    device_id: str | None = None
    start: AwareDatetime
    end: AwareDatetime
    details: dict[str, JsonValue] = Field(default_factory=dict)


def write_labels(path: Path | str, labels: Sequence[Label]) -> None:
    """Write ``labels`` as JSON lines (UTF-8), one label per line."""
    with Path(path).open("w", encoding="utf-8") as out:
        out.writelines(label.model_dump_json() + "\n" for label in labels)


def read_labels(path: Path | str) -> list[Label]:
    """Read a labels file written by ``write_labels``."""
    # Only "\n" ends a line: JSON leaves other line breaks (U+0085, U+2028) unescaped.
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    return [Label.model_validate_json(line) for line in lines if line.strip()]
