"""Throwaway PostgreSQL clusters run from the real server binaries.

A test that needs a server of its own (a primary and a streaming replica, a
server to stop or kill) creates one here: ``initdb`` into a folder of its own,
a free port on 127.0.0.1, trust authentication on loopback, and no Unix
socket, so nothing collides with another cluster or with the machine's own
server. ``initdb``, ``pg_ctl`` and ``postgres`` refuse to run as root, so a
root process runs them as the ``postgres`` user, in folders that user owns.

Every call here is synchronous and bounded by a timeout; an async test calls
the slow ones (start, replica, waits) through ``asyncio.to_thread``.
Clusters are always stopped and removed by :func:`throwaway_cluster`, also when
the test fails, and at interpreter exit as a last resort.

A test marked with :func:`skip_unless_runnable` is skipped, with what is
missing named, on a machine without every program it runs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "BINARIES",
    "CLUSTER_PROGRAMS",
    "Cluster",
    "ClusterError",
    "missing_programs",
    "skip_unless_runnable",
    "throwaway_cluster",
]

BINARIES = Path(os.environ.get("ORDERTRAIL_PG_BINARIES", "/usr/lib/postgresql/15/bin"))
"""The server binaries; ``ORDERTRAIL_PG_BINARIES`` names another folder."""

SERVER_USER = "postgres"
"""The operating-system user the servers run as when this process is root."""

CLUSTER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
"""What every cluster runs: ``initdb`` to create it, ``pg_ctl`` to start and
stop it, and the server itself, which both of them start."""

COMMAND_TIMEOUT = 60.0

DEFAULT_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    # Durability is not under test unless a test asks for it.
    "fsync": "off",
    "wal_level": "replica",
    "max_wal_senders": "8",
    "max_replication_slots": "8",
    "wal_keep_size": "'128MB'",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "max_connections": "60",
    "shared_buffers": "'16MB'",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "timezone": "'UTC'",
}

_running: list[Cluster] = []


class ClusterError(RuntimeError):
    """A server command failed; the message carries its output."""


def _is_root() -> bool:
    return os.geteuid() == 0


def _server_user() -> pwd.struct_passwd:
    return pwd.getpwnam(SERVER_USER)


def _as_server_user(argv: Sequence[str]) -> list[str]:
    if _is_root():
        return ["runuser", "-u", SERVER_USER, "--", *argv]
    return list(argv)


def missing_programs(
    programs: Iterable[str],
    *,
    folder: Path | None = None,
    as_root: bool | None = None,
) -> list[str]:
    """What this machine lacks to run ``programs``: empty when nothing.

    The programs are looked for in ``folder`` (default :data:`BINARIES`). As
    root (default: whether this process is), each runs through ``runuser`` as
    :data:`SERVER_USER`, so that command and that user are needed as well.
    """
    folder = BINARIES if folder is None else folder
    missing = [
        str(folder / name)
        for name in programs
        if not ((folder / name).is_file() and os.access(folder / name, os.X_OK))
    ]
    if _is_root() if as_root is None else as_root:
        if shutil.which("runuser") is None:
            missing.append("runuser on PATH")
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            missing.append(f"the {SERVER_USER} user")
    return missing


def skip_unless_runnable(*extra: str) -> pytest.MarkDecorator:
    """Skip a test unless it can run clusters and the ``extra`` programs.

    ``extra`` names what the test runs beyond :data:`CLUSTER_PROGRAMS`:
    ``pg_basebackup`` for a replica, ``psql`` for :meth:`Cluster.query` and
    what calls it. The reason names everything missing, not only the first.
    """
    missing = missing_programs((*CLUSTER_PROGRAMS, *extra))
    return pytest.mark.skipif(
        bool(missing),
        reason=f"cannot run throwaway clusters without {', '.join(missing)}",
    )


def _run(argv: Sequence[str], *, cwd: Path, timeout: float = COMMAND_TIMEOUT) -> str:
    completed = subprocess.run(
        _as_server_user(argv),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise ClusterError(
            f"{' '.join(argv)} exited {completed.returncode}: "
            f"{completed.stdout}{completed.stderr}"
        )
    return completed.stdout


def _enterable_by_server_user(folder: Path) -> bool:
    """Whether the server's user can reach and write ``folder``.

    pytest's temporary folders sit under a 0700 folder of root's, which the
    ``postgres`` user cannot enter.
    """
    if not _is_root():
        return True
    user = _server_user()
    groups = {user.pw_gid}
    folder = folder.resolve()
    for part in [folder, *folder.parents]:
        mode = part.stat()
        if mode.st_uid == user.pw_uid:
            allowed = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid in groups:
            allowed = mode.st_mode & stat.S_IXGRP
        else:
            allowed = mode.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    own = folder.stat()
    return own.st_uid == user.pw_uid or bool(own.st_mode & stat.S_IWOTH)


def _home_for(root: Path, prefix: str) -> Path:
    """Make a folder the server's user owns, under ``root`` when it can."""
    root.mkdir(parents=True, exist_ok=True)
    base = root if _enterable_by_server_user(root) else None
    home = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if _is_root():
        user = _server_user()
        os.chown(home, user.pw_uid, user.pw_gid)
    return home


def free_port() -> int:
    """Return a loopback port nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _append_settings(config: Path, settings: Mapping[str, str]) -> None:
    # The last line for a name wins, so appending overrides what is above.
    with config.open("a", encoding="utf-8") as file:
        file.write("\n# throwaway cluster\n")
        for name, value in settings.items():
            file.write(f"{name} = {value}\n")


class Cluster:
    """One PostgreSQL server in a folder of its own, on its own port."""

    data_dir: Path
    port: int

    def __init__(self, home: Path, port: int, name: str) -> None:
        self.home = home
        self.data_dir = home / "data"
        self.port = port
        self.name = name
        self.log_path = home / "server.log"
        self.replicas: list[Cluster] = []
        self._log_start = 0

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, port={self.port}, data_dir={self.data_dir})"

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        settings: Mapping[str, str] | None = None,
        name: str = "primary",
    ) -> Cluster:
        """Initialise a cluster under ``root`` (not started).

        ``settings`` are postgresql.conf lines (values quoted as the file
        wants them) that override the defaults above.
        """
        home = _home_for(root, f"ordertrail-{name}-")
        cluster = cls(home, free_port(), name)
        _run(
            [
                str(BINARIES / "initdb"),
                "--pgdata",
                str(cluster.data_dir),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            cwd=home,
        )
        _append_settings(
            cluster.config_file,
            {
                **DEFAULT_SETTINGS,
                "port": str(cluster.port),
                "cluster_name": f"'{name}'",
                **(settings or {}),
            },
        )
        return cluster

    @property
    def config_file(self) -> Path:
        """The cluster's postgresql.conf."""
        return self.data_dir / "postgresql.conf"

    def url(self, database: str = "postgres") -> str:
        """A DSN for ``database`` on this cluster, as the superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def is_running(self) -> bool:
        """Whether the postmaster of this data folder is alive."""
        return (self.data_dir / "postmaster.pid").exists()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections.

        Another process may take the chosen port between choosing and binding
        it; the server then gets a new port and one more try.
        """
        for attempt in range(3):
            try:
                self._pg_ctl_start(timeout)
            except ClusterError:
                if attempt == 2 or not self._port_was_taken():
                    raise
                self.port = free_port()
                _append_settings(self.config_file, {"port": str(self.port)})
            else:
                _running.append(self)
                return

    def _pg_ctl_start(self, timeout: float) -> None:
        self._log_start = self.log_size()
        try:
            _run(
                [
                    str(BINARIES / "pg_ctl"),
                    "start",
                    "--pgdata",
                    str(self.data_dir),
                    "--log",
                    str(self.log_path),
                    "--wait",
                    "--timeout",
                    str(int(timeout)),
                ],
                cwd=self.home,
                timeout=timeout + 10.0,
            )
        except (ClusterError, subprocess.TimeoutExpired) as error:
            raise ClusterError(f"{self!r} did not start:\n{self.log_tail()}") from error

    def _port_was_taken(self) -> bool:
        log = self.log_since(self._log_start)
        return "could not bind" in log or "Address already in use" in log

    def log_since(self, offset: int = 0) -> str:
        """The server's log from byte ``offset`` on (the log outlives restarts)."""
        try:
            with self.log_path.open("rb") as file:
                file.seek(offset)
                return file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, to explain a failure."""
        text = self.log_since(self._log_start)
        return "\n".join(text.splitlines()[-lines:]) or "(nothing logged)"

    def log_size(self) -> int:
        """Where the server's log ends now: an offset for :meth:`log_since`."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``, ``smart`` or ``immediate``); no-op if down."""
        if self.is_running():
            _run(
                [
                    str(BINARIES / "pg_ctl"),
                    "stop",
                    "--pgdata",
                    str(self.data_dir),
                    "--mode",
                    mode,
                    "--wait",
                    "--timeout",
                    "30",
                ],
                cwd=self.home,
            )
        with contextlib.suppress(ValueError):
            _running.remove(self)

    def remove(self) -> None:
        """Stop this cluster and its replicas and delete their folders."""
        try:
            for replica in self.replicas:
                replica.remove()
            self.stop("immediate")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    def configure(self, settings: Mapping[str, str]) -> None:
        """Change settings of the running server and reload them.

        Only settings a reload applies take effect (``synchronous_commit``,
        ``synchronous_standby_names``, ``recovery_min_apply_delay``, ...).
        """
        _append_settings(self.config_file, settings)
        self.query("SELECT pg_reload_conf()")

    def query(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql; return its unaligned, tuples-only output."""
        completed = subprocess.run(
            [
                str(BINARIES / "psql"),
                "--no-psqlrc",
                "--no-align",
                "--tuples-only",
                "--quiet",
                "--set",
                "ON_ERROR_STOP=1",
                "--command",
                sql,
                self.url(database),
            ],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if completed.returncode != 0:
            raise ClusterError(f"{sql!r} on {self!r}: {completed.stderr}")
        return completed.stdout.strip()

    def wal_lsn(self) -> str:
        """The primary's current WAL write position."""
        return self.query("SELECT pg_current_wal_lsn()")

    def replayed_up_to(self, lsn: str) -> bool:
        """Whether this standby has replayed the WAL up to ``lsn``."""
        answer = self.query(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")
        return answer == "t"

    def wait_for_replay(self, lsn: str, timeout: float = 30.0) -> None:
        """Wait until this standby has replayed up to ``lsn`` of its primary."""
        _until(lambda: self.replayed_up_to(lsn), timeout, f"{self!r} replays {lsn}")

    def catch_up(self, primary: Cluster, timeout: float = 30.0) -> None:
        """Wait until this standby shows everything ``primary`` has written."""
        self.wait_for_replay(primary.wal_lsn(), timeout)

    def streams_to(self, standby: str) -> bool:
        """Whether the standby named ``standby`` is streaming from this primary."""
        answer = self.query(
            "SELECT count(*) FROM pg_stat_replication "
            f"WHERE application_name = '{standby}' AND state = 'streaming'"
        )
        return answer == "1"

    def replica(
        self,
        root: Path,
        *,
        name: str = "replica",
        settings: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Cluster:
        """Clone this running primary into a started, streaming hot standby.

        The standby's ``cluster_name`` is ``name``, which is also the
        application name it streams under: the name to put in the primary's
        ``synchronous_standby_names``. It is removed with this primary.
        """
        home = _home_for(root, f"ordertrail-{name}-")
        replica = Cluster(home, free_port(), name)
        self.replicas.append(replica)
        _run(
            [
                str(BINARIES / "pg_basebackup"),
                "--pgdata",
                str(replica.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--username",
                "postgres",
                "--write-recovery-conf",
                "--wal-method",
                "stream",
                "--checkpoint",
                "fast",
                "--no-sync",
            ],
            cwd=home,
        )
        _append_settings(
            replica.config_file,
            {
                "port": str(replica.port),
                "cluster_name": f"'{name}'",
                **(settings or {}),
            },
        )
        replica.start(timeout)
        _until(lambda: self.streams_to(name), timeout, f"{name} streams from {self!r}")
        return replica


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def throwaway_cluster(root: Path, **kw: Any) -> Iterator[Cluster]:
    """Create and start a cluster; always stop and remove it and its replicas.

    Keyword arguments go to :meth:`Cluster.create`.
    """
    cluster = Cluster.create(root, **kw)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@atexit.register
def _stop_leftovers() -> None:
    # A test interrupted between start and its clean-up (a timeout that
    # unwinds no frames) must still not leave a server behind.
    for cluster in list(_running):
        with contextlib.suppress(Exception):
            cluster.stop("immediate")
