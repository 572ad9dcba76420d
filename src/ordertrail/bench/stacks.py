"""Where a profiled process spent its time, from py-spy's raw stack samples.

``py-spy record --format raw --idle`` writes one line per distinct stack:
the frames from the outermost to the innermost, separated by ``;``, then the
number of samples. Only the event loop's thread is kept (stacks through
``run_forever``): a server's other threads (granian's supervisor, its Rust
runtime) would add samples of waiting that say nothing. Samples whose
innermost frame is the loop's selector are the process waiting (for
PostgreSQL or the network); the others are the loop running Python. Shares
are of the samples kept, so the idle share and the functions' shares add up
to the loop thread's wall-clock time.

asyncpg decodes rows in Cython, which py-spy does not see as Python frames:
that time shows as the event loop's socket callback
(``_read_ready__data_received``) itself.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FunctionShare", "StackSummary", "py_spy", "summarize"]

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")
# The innermost frame of an event loop waiting for its sockets.
_IDLE = ("Selector.select", "select.epoll.poll")
# A frame every stack of the event loop's thread goes through.
_LOOP = "run_forever"
_NOTES = {
    "_read_ready__data_received": "  <- asyncpg reading and decoding rows (Cython)",
}


@dataclass(frozen=True)
class FunctionShare:
    """One function's share of the samples."""

    name: str
    inclusive: float
    """Share of samples with the function anywhere on the stack."""
    own: float
    """Share of samples with the function innermost (Python frames only)."""


@dataclass(frozen=True)
class StackSummary:
    """A profile reduced to the functions that took the time."""

    samples: int
    idle: float
    """Share of samples spent waiting in the event loop's selector."""
    by_inclusive: list[FunctionShare]
    by_own: list[FunctionShare]

    def lines(self, top: int = 25, *, within: tuple[str, ...] = ()) -> list[str]:
        """Return the summary as text lines.

        ``within`` keeps, in the inclusive list, only functions whose file
        path contains one of the given parts (``"ordertrail/"``, say), so
        the frames of the event loop machinery do not crowd it.
        """
        inclusive = [
            share
            for share in self.by_inclusive
            if not within or any(part in share.name for part in within)
        ]
        lines = [
            f"{self.samples:,} samples of the event loop's thread; {self.idle:.1%} "
            f"waiting (for PostgreSQL or the network), {1 - self.idle:.1%} running",
            "",
            "inclusive (time under the function, share of all samples)",
        ]
        lines += [f"  {s.inclusive:6.1%}  {s.name}" for s in inclusive[:top]]
        lines += ["", "own (time in the function itself, share of all samples)"]
        lines += [f"  {s.own:6.1%}  {s.name}{_note(s.name)}" for s in self.by_own[:top]]
        return lines


def _note(name: str) -> str:
    return next((note for marker, note in _NOTES.items() if marker in name), "")


def py_spy() -> str:
    """Return the py-spy executable: the one beside this Python, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        msg = "profiling needs py-spy (pip install py-spy)"
        raise RuntimeError(msg)
    return found


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['function']} ({match['file']})"


def summarize(path: Path) -> StackSummary:
    """Read a raw py-spy profile and return the functions that took the time."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    samples = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if _LOOP not in stack:
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        samples += count
        innermost = frames[-1]
        if any(marker in innermost for marker in _IDLE):
            idle += count
            continue
        own[innermost] += count
        for name in set(frames):
            inclusive[name] += count
    total = samples or 1
    return StackSummary(
        samples=samples,
        idle=idle / total,
        by_inclusive=[
            FunctionShare(name, count / total, own[name] / total)
            for name, count in inclusive.most_common()
        ],
        by_own=[
            FunctionShare(name, inclusive[name] / total, count / total)
            for name, count in own.most_common()
        ],
    )
