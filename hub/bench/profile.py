"""Where the time goes: CPU seconds per process group (psutil) and py-spy profiles of the hub."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

# --- CPU accounting -------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(times.user + times.system)


@dataclass(slots=True)
class CpuSample:
    wall: float
    per_pid: dict[int, tuple[str, float]]
    busy: float
    total: float


@dataclass(slots=True)
class CpuUsage:
    wall: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0
    """Fraction of all cores busy."""


class CpuMeter:
    """CPU seconds per process group between two samples."""

    def __init__(self, *, broker_pids: list[int]) -> None:
        self.groups: dict[str, list[int]] = {"bench (publisher, probes)": [os.getpid()]}
        if broker_pids:
            self.groups["mosquitto"] = broker_pids
        self.scratch_pids: list[int] = []

    def _named(self, name: str) -> list[int]:
        found = []
        for proc in psutil.process_iter(["name"]):
            if proc.info.get("name") == name:
                found.append(proc.pid)
        return found

    def sample(self) -> CpuSample:
        groups = dict(self.groups)
        postgres = self._named("postgres")
        scratch = [pid for pid in self.scratch_pids if pid in postgres]
        groups["postgres: this database's backends"] = scratch
        groups["postgres: all other processes"] = [p for p in postgres if p not in scratch]
        per_pid: dict[int, tuple[str, float]] = {}
        for group, pids in groups.items():
            for pid in pids:
                seconds = _cpu_seconds(pid)
                if seconds is not None:
                    per_pid[pid] = (group, seconds)
        cpu = psutil.cpu_times()
        total = float(sum(cpu))
        idle = float(cpu.idle + getattr(cpu, "iowait", 0.0))
        return CpuSample(time.monotonic(), per_pid, total - idle, total)

    @staticmethod
    def usage(before: CpuSample, after: CpuSample) -> CpuUsage:
        usage = CpuUsage(wall=after.wall - before.wall)
        for pid, (group, seconds) in after.per_pid.items():
            start = before.per_pid.get(pid, (group, 0.0))[1]
            usage.seconds[group] = usage.seconds.get(group, 0.0) + max(0.0, seconds - start)
        total = after.total - before.total
        usage.machine_busy = (after.busy - before.busy) / total if total > 0 else math.nan
        return usage


# --- py-spy ---------------------------------------------------------------------------


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


_CATEGORIES = (
    ("paho-mqtt", ("paho/",)),
    ("aiomqtt", ("aiomqtt/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("psycopg", ("psycopg/", "psycopg_pool/", "psycopg_binary/")),
    (
        "prometheus/HTTP",
        ("prometheus_client/", "uvicorn/protocols", "starlette/", "fastapi/", "h11/"),
    ),
    ("logging", ("structlog/", "logging/")),
    ("hub & devices code", ("hub/", "devices/", "alarms/")),
)
_INCLUSIVE = (
    ("MQTT receive (paho loop_read)", re.compile(r"^loop_read \(paho/")),
    ("parse + validate (Ingest.parse)", re.compile(r"^Ingest\.parse \(")),
    ("DB flush (Ingest._flush)", re.compile(r"^Ingest\._flush \(")),
    ("acks (ingest.ack)", re.compile(r"^ack \(hub/ingest")),
    ("HTTP server and /metrics", re.compile(r"\((prometheus_client|uvicorn/protocols|h11)/")),
)


_PG_SCRATCH = "postgres: this database's backends"
_LOOP_FRAME = re.compile(r"^(Handle\._run|BaseEventLoop\._run_once) \(asyncio/")


@dataclass(slots=True)
class Profile:
    samples: int = 0
    self_time: dict[str, int] = field(default_factory=dict)
    inclusive: dict[str, int] = field(default_factory=dict)
    top_frames: list[tuple[str, int]] = field(default_factory=list)


def parse_profile(text: str) -> Profile:
    """py-spy ``--format raw`` (collapsed stacks) → time by library and by activity."""
    profile = Profile()
    leaves: dict[str, int] = {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        profile.samples += count
        category = "event loop & stdlib"
        for frame in reversed(frames):
            if _LOOP_FRAME.match(frame):
                break  # above the event loop: the server's plumbing, not this work
            found = next((n for n, keys in _CATEGORIES if any(k in frame for k in keys)), None)
            if found is not None:
                category = found
                break
        profile.self_time[category] = profile.self_time.get(category, 0) + count
        for name, pattern in _INCLUSIVE:
            if any(pattern.search(frame) for frame in frames):
                profile.inclusive[name] = profile.inclusive.get(name, 0) + count
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + count
    profile.top_frames = sorted(leaves.items(), key=lambda kv: -kv[1])[:8]
    return profile


class Profiler:
    """``py-spy record`` on the hub for one phase, stopped with SIGINT at its end."""

    def __init__(self, exe: str | None, pid: int, out: Path) -> None:
        self.exe, self.pid, self.out = exe, pid, out
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.exe is None:
            return
        self.process = subprocess.Popen(  # noqa: S603 - py-spy from the venv or PATH
            [self.exe, "record", "--pid", str(self.pid), "--rate", "100", "--nonblocking",
             "--format", "raw", "--output", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def own_pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def stop(self) -> Profile | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.process.wait, 15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 5)
        if not self.out.exists():
            return None
        return parse_profile(self.out.read_text(errors="replace"))
