"""Facts about the machine, the hub's settings and the code, for the report's header."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from hub.bench.phases import Bench
from hub.settings import HubSettings, MqttEndpoint


def machine_facts() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "CPU": model,
        "cores": f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False)} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "load average at start": f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
    }


def _hub_settings(settings: HubSettings, bench: Bench) -> dict[str, str]:
    from hub.ingest import make_client

    ingest = settings.ingest
    client = make_client(MqttEndpoint(host="127.0.0.1", port=1), ingest, embedded=not bench.v5)
    manual = bool(getattr(client._client, "_manual_ack", False))
    skip = {"client_id", "protocol", "session_expiry_s", "quarantine_raw_max_bytes"}
    skip |= {"reconnect_min_s", "reconnect_max_s"}
    tuning = ", ".join(
        f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
        for key, value in ingest.model_dump().items()
        if key not in skip and value is not None
    )
    out = {
        "hub ingest": f"MQTT {'5' if bench.v5 else '3.1.1'}; {tuning}",
        "hub acknowledgement": "manual, PUBACK after COMMIT"
        if manual
        else "**automatic (paho acks on receipt): hub/ingest.py as found does not enable"
        " manual acknowledgement**",
        "batch_max_events": f"{ingest.batch_max_events:,}",
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parents[2]
        head = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=root, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "hub", "devices",  # noqa: S607
             "alarms"],
            cwd=root, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.split()  # fmt: skip
        own = ("hub/bench/", "hub/bench.py")  # the bench's own code, as a package or a module
        changed = [p for p in dirty if "/" in p and not p.startswith(own)]
        if head:
            out["code"] = f"commit {head}" + (
                f", with uncommitted changes in {', '.join(changed)}" if changed else ""
            )
    return out
