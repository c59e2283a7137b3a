"""What a test may not leave behind: child processes, shared memory, temporary files.

Read straight from /proc and the file system so that the check has no stake in the code it
checks.
"""

from __future__ import annotations

import gc
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


def shm_entries(ours: set[int]) -> set[str]:
    """Arena names in /dev/shm that this test session may have made: /dev/shm is shared by
    the whole machine, so an arena whose creator is alive and not this process or one of its
    descendants belongs to someone else (another test run, say) and is left out. One whose
    creator is dead counts: it may be ours, left by a process a test killed. ``ours``: this
    process and its descendants."""
    try:
        names = {n for n in os.listdir("/dev/shm") if _ARENA_NAME.match(n)}
    except FileNotFoundError:
        return set()
    return {n for n in names if _creator(n) in ours or not os.path.exists(f"/proc/{_creator(n)}")}


def _creator(name: str) -> int:
    return int(name.split("-")[1])


#: what /proc shows for a staging arena (an anonymous memfd): ``/memfd:aiockpt-arena (deleted)``
ARENA_MEMFD = "/memfd:aiockpt-arena"


def arena_memfds(pids: set[int]) -> dict[int, set[int]]:
    """The staging arenas (by inode) that the live processes ``pids`` still map or hold a
    descriptor of. Arenas have no name anywhere: these mappings and descriptors are all there
    is of them."""
    found: dict[int, set[int]] = {}
    for pid in pids:
        inodes: set[int] = set()
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith(ARENA_MEMFD):
                        inodes.add(int(fields[4]))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(ARENA_MEMFD):
                        inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
                except OSError:
                    continue  # closed meanwhile
        except OSError:
            continue  # exited meanwhile
        if inodes:
            found[pid] = inodes
    return found


def new_arenas(before: dict[int, set[int]], now: dict[int, set[int]]) -> list[str]:
    """Arenas a process holds beyond as many as it held before. A process may have *replaced*
    an arena meanwhile (a Checkpointer that a module-scoped fixture owns grows its arena when
    a test saves more): only more arenas than before is a leak."""
    leaked = []
    for pid, inodes in now.items():
        had = before.get(pid, set())
        if len(inodes) > len(had):
            extra = sorted(inodes - had)
            leaked.append(
                f"{len(inodes) - len(had)} more staging arena(s) than before (inodes {extra}) "
                f"held by {describe(pid)}"
            )
    return leaked


def temp_entries() -> set[str]:
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith(RESOURCE_PREFIX)}


@dataclass
class Snapshot:
    processes: set[int]
    shm: set[str]
    temp: set[str]
    #: pid -> inodes of the staging arenas it maps or holds open
    arenas: dict[int, set[int]]

    @classmethod
    def take(cls) -> Snapshot:
        children = descendants()  # one walk of /proc for all three
        ours = {os.getpid(), *children}
        return cls(children, shm_entries(ours), temp_entries(), arena_memfds(ours))

    def leaked_since(self, settle_s: float = 3.0) -> list[str]:
        """Describe what appeared since this snapshot and is still there after ``settle_s``.

        Leaked processes are killed so that one leak does not cascade into later tests.
        """
        # Objects the test dropped go now, cycles included (a finished test's event loop and
        # what it owned): what is still there after this is held by something alive.
        gc.collect()
        deadline = time.monotonic() + settle_s
        while True:
            now = Snapshot.take()
            procs = now.processes - self.processes
            shm = now.shm - self.shm
            temp = now.temp - self.temp
            arenas = new_arenas(self.arenas, now.arenas)
            if not (procs or shm or temp or arenas) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        problems = [f"process left running: {describe(p)}" for p in sorted(procs)]
        problems += [f"shared memory left in /dev/shm: {n}" for n in sorted(shm)]
        problems += [f"shared memory left: {a}" for a in arenas]
        problems += [f"temporary path left: {n}" for n in sorted(temp)]
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return problems
