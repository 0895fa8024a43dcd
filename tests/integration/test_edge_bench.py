"""The edge part of ``telecare bench`` in its quick mode, end to end (about 20 s).

Real edge daemons, a private Mosquitto when one is installed, the test's PostgreSQL: the
run measures every phase, loses nothing, and writes its block into an existing
benchmarks file without disturbing what is already there.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pydantic import SecretStr

from hub.bench.edge import run_edge_only
from hub.bench.edge_report import EDGE_END, EDGE_START, write_edge_report
from hub.bench.report import RESULTS_END, RESULTS_START
from hub.settings import HubSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_EXISTING = (
    f"# Benchmarks\n\nA summary written by hand.\n\n{RESULTS_START}\nthe hub's block\n"
    f"{RESULTS_END}\n\nA closing paragraph.\n"
)


def _broker(test_broker: str) -> SecretStr | None:
    """None, for a private Mosquitto (as `telecare bench` uses) when one is installed."""
    installed = shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
    return None if installed else SecretStr(test_broker)


def _row(text: str, starts: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {starts}")]
    assert len(rows) >= 1, f"no row starting with {starts!r}"
    return rows[0]


async def test_quick_edge_bench_measures_every_phase_and_keeps_the_file(
    tmp_path: Path, pg_admin_url: str, mqtt_url: str
) -> None:
    output = tmp_path / "benchmarks.md"
    output.write_text(_EXISTING)
    settings = HubSettings(database_url=SecretStr(pg_admin_url), mqtt_url=_broker(mqtt_url))

    status = await run_edge_only(settings, quick=True, output=output)

    text = output.read_text()
    assert status == 0, text
    hub_part = _EXISTING.partition(RESULTS_END)[0] + RESULTS_END
    assert text.startswith(hub_part)  # the summary and the hub's block are untouched
    assert text.rstrip().endswith("A closing paragraph.")
    assert text.count(EDGE_START) == text.count(EDGE_END) == 1
    assert text.index(RESULTS_END) < text.index(EDGE_START)
    block = text[text.index(EDGE_START) : text.index(EDGE_END)]
    assert "failed" not in block

    rss = _row(block, "RSS at idle, 10 devices")
    assert re.search(r"\| \d+\.\d MB \(USS \d+\.\d MB", rss), rss
    assert re.search(r"\| \d+\.\d\d % of a core", _row(block, "CPU at idle")), block
    for drain in (
        "drain after an outage: 5,000 queued events, uplink restored → a plain",
        "drain after an outage: 5,000 queued events, uplink restored → the hub",
    ):
        assert re.search(r"\| [\d,]+ events/s \(\d+\.\d\d s\)", _row(block, drain)), block
    serial = _row(block, "serial frame at the edge → stored row")
    assert re.search(r"\| [\d.]+ ms / [\d.]+ ms / [\d.]+ ms \(max", serial), serial
    assert "The hub stored 5,000 distinct events in 5,000 rows" in block

    # Written again, the block replaces itself: nothing is added or lost.
    write_edge_report(output, block + EDGE_END + "\n")
    assert output.read_text() == text
