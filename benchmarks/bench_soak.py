"""Soak: many saves through one Checkpointer, watching for anything that grows.

    python -m benchmarks.bench_soak [--saves 500] [--mib 256] [--every 10] [--dir /dev/shm]

One ``aiockpt.Checkpointer(keep_last=2)`` saves the same ``--mib`` state dict ``--saves`` times
into a fresh ``bench-soak-*`` directory under ``--dir``, awaiting each save (staged, then
durable) before the next. After the first save and every ``--every`` saves it samples, for the
trainer (this process) and the checkpoint worker:

    rss        VmRSS (and its anonymous / shared-memory parts)
    fds        open file descriptors (/proc/<pid>/fd)
    threads    the Threads: line of /proc/<pid>/status
    arenas     staging arenas (anonymous memfds, counted as tests/leaks.py counts them) that
               each process maps or holds a descriptor of, and how many distinct ones in all
    shm        bytes of the arenas either process maps (memfds have no name: these mappings
               are aiockpt's whole shared-memory footprint besides the checkpoints), and the
               bytes of the kept checkpoints (on /dev/shm too when --dir is there)

and reports each series' drift after the first 10 saves: the largest distance from its value
at save 10, as a fraction of that value (a leak shows as drift that grows with --saves; a
flat series stays near 0). A PNG of every series against the save number goes to --png.

A benchmark, not a test: it prints figures and never fails on a threshold. It removes the
directory it created and checks that this process maps or holds no arena after the close.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from benchmarks._common import (
    MiB,
    format_size,
    median,
    memory_status,
    percentile,
    release_memory,
)
from tests.leaks import ARENA_MEMFD, arena_memfds

SHM = "/dev/shm"
DIR_PREFIX = "bench-soak-"  # never "aiockpt*": the test suite's leak checker owns those names


def log(message: str = "") -> None:
    print(message, flush=True)


def make_state_dict(nbytes: int, count: int) -> dict[str, torch.Tensor]:
    numel = nbytes // 4 // count
    return {f"layer{i}.weight": torch.rand(numel, dtype=torch.float32) for i in range(count)}


# --- /proc probes -------------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def mapped_arenas(pid: int) -> dict[int, int]:
    """The staging arenas (anonymous memfds, by inode, as ``tests.leaks`` finds them) that
    ``pid`` maps or holds a descriptor of, with the bytes it maps of each: arenas have no
    name anywhere, so these mappings and descriptors are all there is of them."""
    found = dict.fromkeys(arena_memfds({pid}).get(pid, set()), 0)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(ARENA_MEMFD):
                start, _, end = parts[0].partition("-")
                inode = int(parts[4])
                found[inode] = found.get(inode, 0) + int(end, 16) - int(start, 16)
    return found


def shm_used() -> int:
    """All of /dev/shm in use, by every process on the machine (context, not a series)."""
    usage = shutil.disk_usage(SHM)
    return usage.total - usage.free


def tree_bytes(top: str) -> int:
    total = 0
    for directory, _, files in os.walk(top):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue  # removed by retention while we walked
    return total


# --- the run ------------------------------------------------------------------------------------

#: series sampled per process; "shm" series are system-wide
PROCESS_SERIES = ("rss", "anon", "shmem", "fds", "threads", "arenas")


@dataclass
class Soak:
    saves: list[int] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    staged: list[float] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    worker_pids: set[int] = field(default_factory=set)

    def add(self, name: str, value: float) -> None:
        self.series.setdefault(name, []).append(value)


def sample(soak: Soak, step: int, worker: int, root: str) -> None:
    soak.saves.append(step)
    arenas: dict[int, int] = {}
    for who, pid in (("trainer", os.getpid()), ("worker", worker)):
        status = memory_status(pid)
        soak.add(f"{who} rss", status["VmRSS"])
        soak.add(f"{who} anon", status.get("RssAnon", 0))
        soak.add(f"{who} shmem", status.get("RssShmem", 0))
        soak.add(f"{who} fds", fd_count(pid))
        soak.add(f"{who} threads", thread_count(pid))
        mapped = mapped_arenas(pid)
        soak.add(f"{who} arenas", len(mapped))
        for inode, size in mapped.items():
            arenas[inode] = max(size, arenas.get(inode, 0))
    soak.add("arena bytes", sum(arenas.values()))
    soak.add("arenas", len(arenas))
    soak.add("checkpoints", tree_bytes(root))


async def soak_run(args: argparse.Namespace, root: str) -> Soak:
    import aiockpt

    state_dict = make_state_dict(args.mib * MiB, args.tensors)
    soak = Soak()
    log(f"  /dev/shm in use before: {format_size(shm_used())} (all processes)")
    checkpointer = aiockpt.Checkpointer(root, keep_last=2, format=args.format)
    await checkpointer.start(like=state_dict)
    started = time.perf_counter()
    try:
        for step in range(1, args.saves + 1):
            began = time.perf_counter()
            handle = checkpointer.save(state_dict, step=step)
            await handle.staged
            soak.staged.append(time.perf_counter() - began)
            await handle
            soak.durable.append(time.perf_counter() - began)
            worker = checkpointer.worker_pid
            assert worker is not None, "the worker is gone"
            soak.worker_pids.add(worker)
            if step == 1 or step % args.every == 0:
                sample(soak, step, worker, root)
            if step % max(1, args.saves // 10) == 0:
                log(
                    f"  {step:5d}/{args.saves} saves, {time.perf_counter() - started:6.1f} s,"
                    f" durable median {median(soak.durable[-50:]):.3f} s"
                )
        log(f"  /dev/shm in use after the last save: {format_size(shm_used())} (all processes)")
    finally:
        await checkpointer.close()
    return soak


def drift(values: Sequence[float], saves: Sequence[int]) -> tuple[float, float, float]:
    """(value at save 10, largest distance from it afterwards, that distance as a fraction)."""
    reference_index = saves.index(10) if 10 in saves else 0
    reference = values[reference_index]
    deviation = max(abs(v - reference) for v in values[reference_index:])
    fraction = deviation / reference if reference else (0.0 if deviation == 0 else float("inf"))
    return reference, deviation, fraction


def show(name: str, value: float) -> str:
    if name.endswith(("rss", "anon", "shmem", "bytes", "checkpoints")):
        return format_size(value) if value >= 0 else "-" + format_size(-value)
    return f"{value:.0f}"


def report(soak: Soak, args: argparse.Namespace, seconds: float) -> None:
    log(
        f"\n{len(soak.durable)} saves of {args.mib} MiB ({args.tensors} tensors, {args.format})"
        f" in {seconds:.0f} s; worker pids seen: {sorted(soak.worker_pids)}"
    )
    log(
        f"  staged: median {median(soak.staged) * 1000:.1f} ms,"
        f" p90 {percentile(soak.staged, 0.9) * 1000:.1f} ms;"
        f" durable: median {median(soak.durable):.3f} s,"
        f" p90 {percentile(soak.durable, 0.9):.3f} s, first {soak.durable[0]:.3f} s,"
        f" last 50 {median(soak.durable[-50:]):.3f} s"
    )
    log(f"\n  {'series':18s} {'save 1':>11s} {'save 10':>11s} {'last':>11s} {'max':>11s}  drift")
    for name, values in soak.series.items():
        reference, deviation, fraction = drift(values, soak.saves)
        relative = f"{fraction * 100:6.2f} %" if fraction != float("inf") else "   (from 0)"
        log(
            f"  {name:18s} {show(name, values[0]):>11s} {show(name, reference):>11s}"
            f" {show(name, values[-1]):>11s} {show(name, max(values)):>11s}  {relative}"
            f"  (max deviation {show(name, deviation)})"
        )


def plot(soak: Soak, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("RSS (MiB)", ["trainer rss", "worker rss", "trainer anon", "worker anon"], MiB),
        (
            "shared memory (MiB)",
            ["trainer shmem", "worker shmem", "arena bytes", "checkpoints"],
            MiB,
        ),
        ("open file descriptors", ["trainer fds", "worker fds"], 1),
        ("threads", ["trainer threads", "worker threads"], 1),
        ("staging arenas", ["trainer arenas", "worker arenas", "arenas"], 1),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    flat = list(axes.flat)
    for ax, (label, names, scale) in zip(flat, panels, strict=False):
        for name in names:
            ax.plot(soak.saves, [v / scale for v in soak.series[name]], marker=".", label=name)
        ax.set_title(label)
        ax.set_xlabel("save")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    # At the scale of the RSS panel a leak of a few MiB is invisible: show it relative.
    ax = flat[len(panels)]
    reference_index = soak.saves.index(10) if 10 in soak.saves else 0
    for name in ("trainer rss", "worker rss", "trainer anon", "worker anon"):
        values = soak.series[name]
        reference = values[reference_index] or 1
        ax.plot(soak.saves, [(v - reference) / reference * 100 for v in values], label=name)
    ax.set_title("RSS change since save 10 (%)")
    ax.set_xlabel("save")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = flat[len(panels) + 1]
    ax.plot(range(1, len(soak.durable) + 1), soak.durable, ".", markersize=2, label="durable")
    ax.plot(range(1, len(soak.staged) + 1), soak.staged, ".", markersize=2, label="staged")
    ax.set_title("seconds per save")
    ax.set_xlabel("save")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    for unused in flat[len(panels) + 2 :]:
        unused.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--saves", type=int, default=500)
    parser.add_argument("--mib", type=int, default=256, help="state dict size in MiB")
    parser.add_argument("--every", type=int, default=10, help="sample every N saves")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--format", default="dcp")
    parser.add_argument("--dir", default=SHM, help="where the checkpoints go")
    parser.add_argument("--png", default="bench-out/bench_soak.png")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> tuple[Soak, float]:
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    log(
        f"bench_soak: torch {torch.__version__}, {os.cpu_count()} CPUs, loop {loop_name},"
        f" {args.saves} saves of {args.mib} MiB into {args.dir}, sampled every {args.every}"
    )
    root = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=args.dir)
    started = time.perf_counter()
    try:
        soak = await soak_run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log(f"removed {root}")
    return soak, time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import uvloop

    soak, seconds = uvloop.run(amain(args))
    report(soak, args, seconds)
    plot(
        soak,
        args.png,
        f"{args.saves} saves of {args.mib} MiB through one Checkpointer (keep_last=2,"
        f" {args.format}, {args.dir}); torch {torch.__version__}",
    )
    log(f"\nplot: {os.path.abspath(args.png)}")
    left = sorted(mapped_arenas(os.getpid()))
    log(f"arenas this process still maps or holds after close: {left or 'none'}")
    release_memory()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
