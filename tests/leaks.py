"""What a test may not leave behind: child processes, shared memory, temporary files.

Read straight from /proc and the file system so that the check has no stake in the code it
checks.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass

#: every shared-memory segment and temporary path aiockpt creates starts with this
RESOURCE_PREFIX = "aiockpt"


def descendants(pid: int | None = None) -> set[int]:
    """PIDs of every live or zombie descendant of ``pid`` (default: this process)."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid}: {cmd[:200]}"


#: staging arenas: ``aiockpt-<creator pid>-<16 hex digits>``
_ARENA_NAME = re.compile(rf"{RESOURCE_PREFIX}-\d+-[0-9a-f]{{16}}$")


def shm_entries() -> set[str]:
    """Arena names in /dev/shm that this test session may have made: /dev/shm is shared by
    the whole machine, so an arena whose creator is alive and not this process or one of its
    descendants belongs to someone else (another test run, say) and is left out. One whose
    creator is dead counts: it may be ours, left by a process a test killed."""
    try:
        names = {n for n in os.listdir("/dev/shm") if _ARENA_NAME.match(n)}
    except FileNotFoundError:
        return set()
    ours = {os.getpid(), *descendants()}
    return {n for n in names if _creator(n) in ours or not os.path.exists(f"/proc/{_creator(n)}")}


def _creator(name: str) -> int:
    return int(name.split("-")[1])


def temp_entries() -> set[str]:
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith(RESOURCE_PREFIX)}


@dataclass
class Snapshot:
    processes: set[int]
    shm: set[str]
    temp: set[str]

    @classmethod
    def take(cls) -> Snapshot:
        return cls(descendants(), shm_entries(), temp_entries())

    def leaked_since(self, settle_s: float = 3.0) -> list[str]:
        """Describe what appeared since this snapshot and is still there after ``settle_s``.

        Leaked processes are killed so that one leak does not cascade into later tests.
        """
        deadline = time.monotonic() + settle_s
        while True:
            now = Snapshot.take()
            procs = now.processes - self.processes
            shm = now.shm - self.shm
            temp = now.temp - self.temp
            if not (procs or shm or temp) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        problems = [f"process left running: {describe(p)}" for p in sorted(procs)]
        problems += [f"shared memory left in /dev/shm: {n}" for n in sorted(shm)]
        problems += [f"temporary path left: {n}" for n in sorted(temp)]
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return problems
