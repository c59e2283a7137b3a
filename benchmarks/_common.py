"""Helpers shared by the benchmarks.

Everything a torch ``spawn`` child has to unpickle lives here, at module level under a stable
module name: a benchmark run as ``python -m benchmarks.bench_x`` is ``__main__`` in the parent,
and references into ``__main__`` only resolve in children by re-running that module.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# --- formatting -----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"256M"``, ``"1GiB"``, ``"1.5g"`` or a plain byte count -> bytes."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    units = {"k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}
    if cleaned and cleaned[-1] in units:
        return int(float(cleaned[:-1]) * units[cleaned[-1]])
    return int(float(cleaned))


def format_size(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{nbytes:.0f} B"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in [0, 1])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


# --- /proc ----------------------------------------------------------------------------------


def memory_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem``, ``VmHWM`` of a process, in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                fields[key] = int(rest.split()[0]) * KiB
    return fields


def children_with(marker: str, parent: int | None = None) -> list[int]:
    """Pids of the direct children of ``parent`` (default: this process) whose command line
    contains ``marker``."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # the command name may contain spaces and parentheses: split after the last ")"
                ppid = int(stat.read().rpartition(")")[2].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``).

    After torch frees a large block, glibc raises its mmap threshold (up to 32 MiB), so later
    16 MiB tensors come from the heap and, once freed, stay in the process: without a trim a
    benchmark that made a few 1 GiB copies keeps gigabytes it no longer uses.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- torch's experimental CheckpointProcess: what its spawned child unpickles ----------------


def raw_write(tensors: Iterable[Any], path: str) -> None:
    """The write limit: every tensor's bytes into one new file, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for tensor in tensors:
            view = memoryview(tensor.numpy()).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def noop_subprocess_init(*_args: Any) -> None:
    """``subprocess_init_fn`` for torch's ``CheckpointProcess``: nothing to initialise."""


def _fsync_hook_class() -> type:
    from torch.distributed.checkpoint._experimental.checkpoint_writer import WriterHook

    class FsyncCommitHook(WriterHook):
        """Makes torch's ``CheckpointWriter`` durable: fsync its file and directory before the
        commit (the writer itself only calls ``torch.save``)."""

        def pre_commit(self, path: str, **kwargs: Any) -> None:
            for name in os.listdir(path):
                fsync_path(os.path.join(path, name))
            fsync_path(path)

        def post_commit(self, path: str, **kwargs: Any) -> None:
            pass

    return FsyncCommitHook


def make_torch_checkpoint_writer(rank_info: Any) -> Any:
    """``checkpoint_writer_init_fn``: torch's own experimental ``CheckpointWriter`` (torch.save
    of the whole state dict to ``<path>/checkpoint_<rank>.pt``) plus an fsync commit hook."""
    from torch.distributed.checkpoint._experimental.checkpoint_writer import (
        CheckpointWriter,
        CheckpointWriterConfig,
    )

    return CheckpointWriter(
        config=CheckpointWriterConfig(),
        rank_info=rank_info,
        commit_hook=_fsync_hook_class()(),
    )
