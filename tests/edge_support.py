"""Running a real edge daemon (``telecare edge --config``) in tests, with its config."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import ROOT, ChildProcess


@dataclass
class EdgeSetup:
    """What one edge's config says; ``write()`` makes the TOML file."""

    gateway_id: str
    data_dir: Path
    hub_url: str
    z2m_url: str | None = None
    z2m_base: str = "zigbee2mqtt"
    z2m_devices: list[dict[str, Any]] = field(default_factory=list)
    serial: list[dict[str, Any]] = field(default_factory=list)
    sia_port: int | None = None
    sia_accounts: list[dict[str, Any]] = field(default_factory=list)
    heartbeat_s: int = 30
    reconnect_max_s: float = 60.0
    protocol: str = "5"
    supervision: dict[str, int] = field(default_factory=dict)

    def write(self) -> Path:
        lines = [
            f'gateway_id = "{self.gateway_id}"',
            f'data_dir = "{self.data_dir}"',
            "[hub]",
            f'mqtt_url = "{self.hub_url}"',
            f'protocol = "{self.protocol}"',
            f"heartbeat_s = {self.heartbeat_s}",
            f"reconnect_max_s = {self.reconnect_max_s}",
        ]
        if self.supervision:
            lines.append("[supervision]")
            lines += [f"{k} = {v}" for k, v in self.supervision.items()]
        if self.z2m_url:
            lines += ["[zigbee2mqtt]", f'mqtt_url = "{self.z2m_url}"',
                      f'base_topic = "{self.z2m_base}"']
            for device in self.z2m_devices:
                lines.append("[[zigbee2mqtt.devices]]")
                lines += [f"{k} = {_toml(v)}" for k, v in device.items()]
        for port in self.serial:
            lines.append("[[serial]]")
            lines += [f"{k} = {_toml(v)}" for k, v in port.items() if k != "addresses"]
            if "addresses" in port:
                lines.append("[serial.addresses]")
                lines += [f'"{a}" = "{d}"' for a, d in port["addresses"].items()]
        if self.sia_port is not None:
            lines += ["[sia]", 'host = "127.0.0.1"', f"port = {self.sia_port}"]
            for account in self.sia_accounts:
                lines.append("[[sia.accounts]]")
                lines += [f"{k} = {_toml(v)}" for k, v in account.items()]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "edge.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


def _toml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return f'"{value}"'


class EdgeProcess(ChildProcess):
    """``python -m hub edge --config FILE`` in a child process, as systemd would run it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / "edge.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TELECARE_")}
        self.env["TELECARE_LOG_FORMAT"] = "json"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> EdgeProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hub", "edge", "--config", str(self.config)],
            env=self.env, stdout=log, stderr=log, cwd=ROOT,
        )
        log.close()
        return self

