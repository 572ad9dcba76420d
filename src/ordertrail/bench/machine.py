"""What the machine is and where its CPU went during a measurement.

On two shared cores a throughput figure means little without knowing who
used the CPU: the server under test, PostgreSQL, the load generator, or a
neighbour (which shows as steal time on a virtual machine). Everything here
reads ``/proc`` and degrades to zeros where it is missing.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "CpuSample",
    "CpuUsage",
    "Machine",
    "describe_machine",
    "memory_of",
    "peak_memory",
    "sample_cpu",
]

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Machine:
    """The hardware and software a run measured."""

    cores: int
    cpu_model: str
    python: str
    postgresql: str
    granian: str
    litestar: str
    asyncpg: str
    code: str = "unknown"
    """The commit measured, and whether the source differed from it."""


def describe_machine(postgresql: str) -> Machine:
    """Describe this machine; ``postgresql`` is the server's version string."""
    return Machine(
        cores=len(os.sched_getaffinity(0)),
        cpu_model=_cpu_model(),
        python=platform.python_version(),
        postgresql=postgresql,
        granian=_version("granian"),
        litestar=_version("litestar"),
        asyncpg=_version("asyncpg"),
        code=_commit(),
    )


def _commit() -> str:
    # Figures belong to the code that produced them, and the code moves.
    root = Path(__file__).resolve().parents[3]
    try:
        head = _git(root, "rev-parse", "--short", "HEAD")
        changed = _git(root, "status", "--porcelain", "--untracked-files=no", "src")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} with uncommitted changes in src" if changed else head


def _git(root: Path, *arguments: str) -> str:
    completed = subprocess.run(  # noqa: S603 - fixed arguments, no input
        ["git", "-C", str(root), *arguments],  # noqa: S607 - git from PATH
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return completed.stdout.strip()


def peak_memory(pid: int) -> int:
    """Return the peak resident memory of ``pid`` and its descendants, in bytes.

    Each process's own peak (``VmHWM``) is added up. Peaks reached at
    different moments can overstate the tree's peak a little; for a server
    whose workers all hold their memory to the end, the sum is what it used.
    """
    return sum(_status_kilobytes(p, "VmHWM") for p in _tree(pid)) * 1024


def memory_of(pid: int) -> int:
    """Return the resident memory of ``pid`` and its descendants now, in bytes."""
    return sum(_status_kilobytes(p, "VmRSS") for p in _tree(pid)) * 1024


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in _processes().items():
        children.setdefault(parent, []).append(child)
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, ()))
    return found


def _status_kilobytes(pid: int, field: str) -> int:
    try:
        text = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    return 0


def _cpu_model() -> str:
    try:
        text = (_PROC / "cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ThreadTime:
    """Cumulative scheduler times of one thread, in nanoseconds."""

    running: int
    """On a CPU."""
    waiting: int
    """Runnable, but waiting for a CPU that something else held."""


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU counters at one moment."""

    server: int
    """Ticks of the server process and all its descendants."""
    server_threads: dict[int, ThreadTime]
    """Each thread of the server and its descendants, by thread id."""
    postgres: dict[int, int]
    """Ticks of each PostgreSQL process counted, by pid (see ``sample_cpu``)."""
    busy: int
    """Machine-wide ticks not idle and not waiting on I/O."""
    pressure: int
    """Microseconds in which some runnable task waited for a CPU (PSI)."""


@dataclass(frozen=True)
class CpuUsage:
    """CPU use over a window: cores (1.0 is one core kept busy) or shares of it."""

    server: float
    """Cores used by the server's process tree."""
    loop: float
    """Share of the window the server's busiest thread (its event loop) ran."""
    loop_waiting: float
    """Share of the window that thread was runnable but had no CPU.

    With ``loop``, it tells a saturated loop (the two add up to about 1) from
    one that waited for I/O; on a shared machine the second part is noise.
    """
    postgres: float
    """Cores used by PostgreSQL."""
    machine: float
    """Cores used by everything on the machine."""
    pressure: float
    """Share of the window in which some task on the machine waited for a CPU."""


def sample_cpu(server_pid: int, database: str | None = None) -> CpuSample:
    """Read the cumulative CPU counters of the server tree, PostgreSQL and machine.

    With ``database``, PostgreSQL's figure leaves out the backends (and
    autovacuum workers) of other databases: on a shared server, other people's
    tests would count as the target's. The postmaster and its background
    processes (WAL writer, checkpointer and the like) serve every database and
    are always counted.
    """
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(pid)

    server = 0
    threads: dict[int, ThreadTime] = {}
    pending = [server_pid]
    while pending:
        pid = pending.pop()
        if pid in processes:
            server += processes[pid][2]
            threads.update(_thread_times(pid))
        pending.extend(children.get(pid, ()))

    postgres = {
        pid: ticks
        for pid, (_, name, ticks) in processes.items()
        if name == "postgres" and (database is None or _serves(pid, database))
    }
    return CpuSample(
        server=server,
        server_threads=threads,
        postgres=postgres,
        busy=_machine_busy(),
        pressure=_cpu_pressure(),
    )


def cpu_usage(before: CpuSample, after: CpuSample, seconds: float) -> CpuUsage:
    """Return the CPU used between two samples taken ``seconds`` apart."""
    if seconds <= 0:
        return CpuUsage(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    ticks = _TICKS * seconds
    nanoseconds = seconds * 1e9
    idle = ThreadTime(0, 0)
    loop = max(
        (
            ThreadTime(
                now.running - before.server_threads.get(thread, idle).running,
                now.waiting - before.server_threads.get(thread, idle).waiting,
            )
            for thread, now in after.server_threads.items()
        ),
        key=lambda times: times.running,
        default=idle,
    )
    return CpuUsage(
        server=(after.server - before.server) / ticks,
        loop=loop.running / nanoseconds,
        loop_waiting=loop.waiting / nanoseconds,
        # Per process, so that a backend that ended in between subtracts
        # nothing; one that started counts all it used.
        postgres=sum(
            used - before.postgres.get(pid, 0) for pid, used in after.postgres.items()
        )
        / ticks,
        machine=(after.busy - before.busy) / ticks,
        pressure=(after.pressure - before.pressure) / (seconds * 1e6),
    )


def _processes() -> dict[int, tuple[int, str, int]]:
    """Return each visible process as pid: (parent pid, name, CPU ticks)."""
    found = {}
    for entry in _PROC.iterdir() if _PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended between the listing and the read
        # The name is in parentheses and may itself hold spaces or ")".
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        # After the name: state, ppid, ... utime and stime are the 12th, 13th.
        found[int(entry.name)] = (
            int(fields[1]),
            name,
            int(fields[11]) + int(fields[12]),
        )
    return found


# What a process is doing, after "postgres:" and the cluster's name if set.
_TITLE = re.compile(r"postgres: (?:[^ :]+: )?(.*)")
# Titles of PostgreSQL's own processes, which work for every database.
_SHARED_TITLES = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "archiver",
    "stats collector",
)


def _serves(pid: int, database: str) -> bool:
    """Return whether PostgreSQL process ``pid`` works for ``database``.

    A backend's title reads ``postgres: <cluster>: <user> <database> <client>
    <activity>``, an autovacuum worker's ``...: autovacuum worker <database>``.
    """
    try:
        command = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    title = _TITLE.match(command.replace(b"\0", b" ").decode("utf-8", "replace"))
    if title is None:
        return True  # the postmaster
    activity = title.group(1)
    if activity.startswith(_SHARED_TITLES):
        return True
    words = activity.split()
    if activity.startswith("autovacuum worker"):
        return words[-1:] == [database]
    return len(words) >= 2 and words[1] == database


def _thread_times(pid: int) -> dict[int, ThreadTime]:
    """Return the scheduler times of each thread of ``pid``, by thread id."""
    found = {}
    with contextlib.suppress(OSError):
        for entry in (_PROC / str(pid) / "task").iterdir():
            try:
                running, waiting, _ = (entry / "schedstat").read_text().split()
            except (OSError, ValueError):
                continue
            found[int(entry.name)] = ThreadTime(int(running), int(waiting))
    return found


def _machine_busy() -> int:
    """Return the machine's busy ticks since boot."""
    try:
        first = (_PROC / "stat").read_text().split("\n", 1)[0]
    except OSError:
        return 0
    # cpu user nice system idle iowait irq softirq (guest is within user).
    user, nice, system, _idle, _iowait, irq, softirq = map(int, first.split()[1:8])
    return user + nice + system + irq + softirq


def _cpu_pressure() -> int:
    """Return the total microseconds some task waited for a CPU, 0 if unknown."""
    try:
        first = (_PROC / "pressure" / "cpu").read_text().split("\n", 1)[0]
    except OSError:
        return 0
    _, _, total = first.rpartition("total=")
    return int(total) if total.isdigit() else 0
