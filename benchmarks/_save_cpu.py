"""bench_save's cpu section: how much a CPU-bound trainer loop slows while a save is in flight."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks._common import (
    format_size,
    log,
    median,
    remove,
)
from benchmarks._save_methods import (
    StateDict,
    worker_pid,
)

# --- CPU-bound trainer ----------------------------------------------------------------------


def python_work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def make_matmul_work() -> Callable[[int], Any]:
    a = torch.rand(128, 128)
    b = torch.rand(128, 128)

    def work(n: int) -> Any:
        c = a
        for _ in range(n):
            c = torch.mm(c, b)
            c.mul_(0.01)
        return c

    return work


def calibrate(work: Callable[[int], Any], seconds: float) -> int:
    n = 1
    while True:
        started = time.perf_counter()
        work(n)
        if time.perf_counter() - started > seconds / 4:
            break
        n *= 2
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        work(n)
        runs.append(time.perf_counter() - started)
    # the fastest run: the least disturbed by other processes on a shared machine
    return max(1, int(n * seconds / min(runs)))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of the calling thread."""
    with open("/proc/thread-self/schedstat") as stat:
        run_ns, wait_ns, _ = stat.read().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


@dataclass
class Iterations:
    """Per iteration of the trainer's loop: wall = cpu + runq + other, where *runq* is time the
    thread was runnable but had no core (other processes, the worker included, on a busy
    machine) and *other* is time it was not runnable (waiting for the GIL, page faults in I/O).
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    runq: list[float] = field(default_factory=list)

    @property
    def other(self) -> list[float]:
        return [max(0.0, w - c - r) for w, c, r in zip(self.wall, self.cpu, self.runq, strict=True)]

    @property
    def off_runq(self) -> list[float]:
        """What an iteration would take with a core of its own: wall minus run-queue wait."""
        return [w - r for w, r in zip(self.wall, self.runq, strict=True)]


async def timed_iterations(
    work: Callable[[int], Any], n: int, until: Callable[[], bool], out: Iterations
) -> None:
    """Run ``work(n)`` between loop turns until ``until()``; one time per iteration."""
    while not until():
        cpu0, runq0 = thread_schedstat()
        started = time.perf_counter()
        work(n)
        elapsed = time.perf_counter() - started
        cpu1, runq1 = thread_schedstat()
        out.wall.append(elapsed)
        out.cpu.append(cpu1 - cpu0)
        out.runq.append(runq1 - runq0)
        await asyncio.sleep(0)


@dataclass
class Window:
    """One save in flight: how long, and the CPU that processes used meanwhile (in cores)."""

    seconds: float
    trainer_cores: float
    worker_cores: float
    load: float


CPU_VARIANTS = {
    "aiockpt": "aiockpt",
    "aiockpt_nice": "aiockpt, worker niced",
    "thread": "dcp.async_save thread",
}


@dataclass
class CpuResult:
    kind: str
    baseline: Iterations = field(default_factory=Iterations)
    during: dict[str, Iterations] = field(default_factory=dict)
    windows: dict[str, list[Window]] = field(default_factory=dict)

    def slowdown(self, which: str) -> float:
        return median(self.during[which].wall) / median(self.baseline.wall) - 1.0

    def own_core_slowdown(self, which: str) -> float:
        return median(self.during[which].off_runq) / median(self.baseline.off_runq) - 1.0


def renice_all_threads(pid: int, niceness: int) -> None:
    """setpriority on every thread of ``pid`` (on Linux it applies to one thread at a time;
    threads started later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), niceness)


async def bench_cpu(
    state_dict: StateDict, directory: str, rounds: int, kinds: Sequence[str], nice: int
) -> list[CpuResult]:
    """Per round and work kind: [baseline, save in flight] for each variant, in turn."""
    import torch.distributed.checkpoint as dcp

    import aiockpt

    variants = [v for v in CPU_VARIANTS if nice or v != "aiockpt_nice"]
    checkpointers = {}
    for variant in variants:
        if variant.startswith("aiockpt"):
            checkpointers[variant] = aiockpt.Checkpointer(
                os.path.join(directory, f"ckpt-{variant}"), keep_last=1
            )
            await checkpointers[variant].start()
    pids = {variant: worker_pid(c) for variant, c in checkpointers.items()}
    steps = itertools.count()
    results = []
    threads = torch.get_num_threads()
    try:
        for kind in kinds:
            # one thread: the trainer loop is one thread, and its schedstat tells all
            work = python_work if kind == "python" else make_matmul_work()
            torch.set_num_threads(1)
            n = calibrate(work, 0.005)
            torch.set_num_threads(threads)
            result = CpuResult(kind)
            for variant in variants:
                result.during[variant] = Iterations()
                result.windows[variant] = []
            for round_index in range(rounds + 1):
                keep = round_index > 0  # round 0 warms the arenas and the daemon thread
                for variant in variants:
                    pid = pids.get(variant)
                    if variant == "aiockpt_nice" and pid:
                        renice_all_threads(pid, nice)  # the worker's pool threads are new
                    torch.set_num_threads(1)
                    baseline = Iterations()
                    deadline = time.perf_counter() + 0.4
                    await timed_iterations(
                        work, n, lambda d=deadline: time.perf_counter() > d, baseline
                    )
                    torch.set_num_threads(threads)  # staging copies as usual
                    if variant == "thread":
                        target = os.path.join(directory, f"thread-{kind}-{round_index}")
                        future = dcp.async_save(state_dict, checkpoint_id=target, no_dist=True)
                        done: Callable[[], bool] = future.done
                    else:
                        handle = checkpointers[variant].save(state_dict, step=next(steps))
                        await handle.staged
                        waiter = asyncio.ensure_future(handle)
                        done = waiter.done
                    torch.set_num_threads(1)
                    during = Iterations()
                    started = time.perf_counter()
                    trainer_cpu = process_cpu_seconds(os.getpid())
                    worker_cpu = process_cpu_seconds(pid) if pid else 0.0
                    await timed_iterations(work, n, done, during)
                    seconds = time.perf_counter() - started
                    window = Window(
                        seconds,
                        (process_cpu_seconds(os.getpid()) - trainer_cpu) / seconds,
                        ((process_cpu_seconds(pid) if pid else 0.0) - worker_cpu) / seconds,
                        os.getloadavg()[0],
                    )
                    torch.set_num_threads(threads)
                    if variant == "thread":
                        future.result()
                        remove(target)
                    else:
                        await waiter
                    if keep:
                        for attribute in ("wall", "cpu", "runq"):
                            getattr(result.baseline, attribute).extend(getattr(baseline, attribute))
                            getattr(result.during[variant], attribute).extend(
                                getattr(during, attribute)
                            )
                        result.windows[variant].append(window)
                    gc.collect()
            results.append(result)
    finally:
        torch.set_num_threads(threads)
        for checkpointer in checkpointers.values():
            await checkpointer.close()
    return results


def print_cpu(results: Sequence[CpuResult], nbytes: int, nice: int) -> None:
    log(f"\nCPU-bound loop in the trainer while a {format_size(nbytes)} save is in flight")
    log("  ~5 ms single-threaded iterations between loop turns, from staged/returned until")
    log("  durable. slowdown = median iteration in flight / median without a save - 1. Each")
    log("  iteration = cpu (the thread ran) + runq (runnable, no free core) + other (not")
    log("  runnable: the GIL); 'own core' = the slowdown of wall - runq. Baselines interleaved.")
    if nice:
        log(f"  'worker niced' = the same with every worker thread at nice {nice} (an experiment)")
    ms = 1000.0
    for r in results:
        b = r.baseline
        log(
            f"  {r.kind:7s} baseline {median(b.wall) * ms:5.2f} ms/iter = cpu"
            f" {median(b.cpu) * ms:.2f} + runq {median(b.runq) * ms:.2f} + other"
            f" {median(b.other) * ms:.2f} ({len(b.wall)} iters)"
        )
        for which, it in r.during.items():
            windows = r.windows[which]
            log(
                f"    {CPU_VARIANTS[which]:22s} wall {r.slowdown(which) * 100:+6.1f}%"
                f"  own core {r.own_core_slowdown(which) * 100:+6.1f}%"
                f"  | {median(it.wall) * ms:5.2f} ms = cpu {median(it.cpu) * ms:.2f} + runq"
                f" {median(it.runq) * ms:.2f} + other {median(it.other) * ms:.2f}"
                f" ({len(it.wall)} iters)"
            )
            log(
                f"    {'':22s} window {median([w.seconds for w in windows]):.2f} s; cores used:"
                f" trainer process {median([w.trainer_cores for w in windows]):.2f},"
                f" worker {median([w.worker_cores for w in windows]):.2f};"
                f" load average {median([w.load for w in windows]):.1f}"
            )
