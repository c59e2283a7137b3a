"""Fault-injection helpers: writers the checkpoint worker imports by reference, and probes of
/proc and /dev/shm that read the system directly (no stake in the code under test).

Kept free of pytest so that the worker can import it cheaply.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from aiockpt._format.manifest import TensorLeaf
from aiockpt._wire.protocol import RankInfo
from aiockpt._wire.tensors import dtype_name
from aiockpt.writers.base import FileRecord, FileSink, flatten_state_dict
from tests.leaks import ARENA_MEMFD

#: import references of the writers below, for ``format=``
TRICKLING = "tests.faults:TricklingWriter"


class TricklingWriter:
    """Writes each tensor raw into its own file, a slice at a time with short sleeps between:
    a SIGKILL at a random moment then most often lands in the middle of a file, and the
    checkpoint still loads through the manifest (the writer reports where each tensor lies).
    """

    SLICES = 4
    #: sleep after each slice; random so that kills do not line up with slice boundaries
    SLICE_SLEEP = (0.001, 0.01)

    def __init__(self, rank_info: RankInfo | None = None, **options: Any) -> None:
        self.rank_info = rank_info or RankInfo()

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord]:
        _, flat = flatten_state_dict(state_dict)
        records: list[FileRecord] = []
        for index, (_, value) in enumerate(flat):
            if not isinstance(value, torch.Tensor):
                continue  # plain values: commit keeps them in the manifest
            name = f"t{index}.bin"
            flat_bytes = value.contiguous().reshape(-1).view(torch.uint8)
            step = max(1, -(-flat_bytes.numel() // self.SLICES))
            with FileSink(path, name) as sink:
                for start in range(0, flat_bytes.numel(), step):
                    sink.write_tensor(flat_bytes[start : start + step])
                    self.after_slice()
                leaf = TensorLeaf(name, 0, dtype_name(value.dtype), list(value.shape))
                records.append(msgspec.structs.replace(sink.close(), leaves={index: leaf}))
        return records

    def after_slice(self) -> None:
        """Called with a file open, a slice of it written."""
        time.sleep(random.uniform(*self.SLICE_SLEEP))


# --- probes ------------------------------------------------------------------------------------


def arena_names(pid: int) -> list[str]:
    """Entries of /dev/shm that name process ``pid`` (staging arenas were once files there,
    ``aiockpt-<pid>-<random>``; now none may ever appear)."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"aiockpt-{pid}-"))
    except FileNotFoundError:
        return []


def mapped_arenas(pid: int) -> set[int]:
    """The inodes of the staging arenas (anonymous memfds) that process ``pid`` maps."""
    found: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith(ARENA_MEMFD):
                    found.add(int(parts[4]))
    except FileNotFoundError:
        pass
    return found


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until ``pid`` exited, or None if it is still running after ``timeout``."""
    started = time.perf_counter()
    while not process_gone(pid):
        if time.perf_counter() - started > timeout:
            return None
        time.sleep(0.002)
    return time.perf_counter() - started


def open_fds(pid: int) -> dict[int, str]:
    """The open file descriptors of ``pid`` and what each points at."""
    fds: dict[int, str] = {}
    directory = f"/proc/{pid}/fd"
    for entry in os.listdir(directory):
        try:
            fds[int(entry)] = os.readlink(os.path.join(directory, entry))
        except FileNotFoundError:
            continue  # closed while listing (the listing's own descriptor, for one)
    return fds


def tree_snapshot(top: str) -> dict[str, tuple[int, int, int, int]]:
    """Every path under ``top`` (relative) -> (mode, size, inode, mtime in ns), without
    following symlinks: what a test compares to prove nothing outside a checkpoint changed."""
    snapshot: dict[str, tuple[int, int, int, int]] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            try:
                info = os.lstat(full)
            except FileNotFoundError:
                continue
            snapshot[os.path.relpath(full, top)] = (
                info.st_mode,
                info.st_size,
                info.st_ino,
                info.st_mtime_ns,
            )
    return snapshot
