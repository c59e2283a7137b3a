"""Save latency of aiockpt against torch's checkpointing paths and the memcpy/write limits.

    python -m benchmarks.bench_save [--quick] [--sections anchors,stall,cpu,rss,sweep] ...

One command, one run. Every comparison interleaves its repeats (round-robin over the methods,
the order rotated each round) so that noise on a shared machine hits every method alike, and
reports medians and ratios. The first round is kept apart as the *first call* (worker spawn,
arena creation, first page faults) and the medians are over the later, steady rounds.

Methods (``--methods``; a state dict of ``--size`` bytes of fp32 in ``--tensors`` tensors):

    memcpy        copy_ into preallocated tensors of the same layout (the staging limit)
    raw           os.write of the same bytes into one file + fsync (the write limit)
    torch_save    torch.save to a file + fsync
    dcp_save      torch.distributed.checkpoint.save(no_dist=True), FileSystemWriter (fsyncs)
    dcp_thread    dcp.async_save, thread executor
    dcp_process   dcp.async_save, process executor (needs a process group: this run inits a
                  1-rank gloo group in-process)
    ckpt_process  torch's experimental CheckpointProcess + its CheckpointWriter, with a commit
                  hook that fsyncs the file (the writer alone only calls torch.save)
    aiockpt       aiockpt.Checkpointer(format="dcp"), started ahead of time
    aiockpt_st    the same with format="safetensors" (not in the default set)

*blocking* is the time until the caller may change its tensors again (aiockpt: ``await
handle.staged``; dcp.async_save: the call returning; synchronous saves: everything);
*durable* is the time until the checkpoint is on disk, fsynced and committed (aiockpt: ``await
handle``; dcp.async_save: ``.result()``; CheckpointProcess: ``write(...).result()``).

Sections (``--sections``):

    anchors  all methods at --size, to /dev/shm and to a directory on disk (--dirs)
    stall    longest event-loop stall while aiockpt saves --size (a 1 ms heartbeat task)
    cpu      slowdown of a CPU-bound loop in the trainer while a save is in flight
             (aiockpt vs dcp.async_save's thread executor)
    rss      RSS of the trainer and of the aiockpt worker over --rss-saves saves
    sweep    blocking and durable of every method against size, plotted into --png

A benchmark, not a test: it prints figures and the issue's targets with met/missed, and never
fails on a threshold. Everything it writes is under ``bench-save-*`` directories it removes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks._common import (
    GiB,
    MiB,
    children_with,
    format_size,
    make_torch_checkpoint_writer,
    median,
    mem_available,
    memory_status,
    noop_subprocess_init,
    parse_size,
    percentile,
    raw_write,
    release_memory,
)

StateDict = dict[str, torch.Tensor]

SHM = "/dev/shm"
DIR_PREFIX = "bench-save-"  # never "aiockpt*": the test suite's leak checker owns those names


def log(message: str = "") -> None:
    print(message, flush=True)


def make_state_dict(nbytes: int, count: int) -> StateDict:
    numel = nbytes // 4 // count
    return {f"layer{i}.weight": torch.rand(numel, dtype=torch.float32) for i in range(count)}


def state_dict_bytes(state_dict: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def aiockpt_available() -> str | None:
    """None when ``aiockpt.Checkpointer`` is importable, else why not."""
    try:
        import aiockpt
    except Exception as exc:  # reported; the torch anchors still run
        return f"import aiockpt failed: {exc!r}"
    if not hasattr(aiockpt, "Checkpointer"):
        return "aiockpt.Checkpointer does not exist yet"
    return None


@contextlib.contextmanager
def bench_directory(parent: str) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- methods --------------------------------------------------------------------------------


@dataclass
class Sample:
    blocking: float
    durable: float | None


class Method:
    key = ""
    name = ""
    #: printed under the table
    note = ""
    #: the aiockpt rows (their write/commit breakdown is printed)
    is_aiockpt = False

    async def setup(self, directory: str, state_dict: StateDict) -> None:
        self.directory = directory

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        raise NotImplementedError

    def remove_output(self, target: str) -> None:
        remove(target)

    async def close(self) -> None:
        pass


class Memcpy(Method):
    key, name = "memcpy", "memcpy (preallocated)"

    async def setup(self, directory: str, state_dict: StateDict) -> None:
        await super().setup(directory, state_dict)
        self.destination = {key: torch.empty_like(t) for key, t in state_dict.items()}

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        started = time.perf_counter()
        for key, tensor in state_dict.items():
            self.destination[key].copy_(tensor)
        return Sample(time.perf_counter() - started, None)

    async def close(self) -> None:
        self.destination = {}


class RawWrite(Method):
    key, name = "raw", "raw write+fsync"

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        started = time.perf_counter()
        raw_write(state_dict.values(), target)
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed)


class TorchSave(Method):
    key, name = "torch_save", "torch.save+fsync"

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        started = time.perf_counter()
        # the synchronous anchors block the loop on purpose: nothing else runs meanwhile
        with open(target, "wb") as file:  # noqa: ASYNC230
            torch.save(state_dict, file)
            file.flush()
            os.fsync(file.fileno())
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed)


class DcpSave(Method):
    key, name = "dcp_save", "dcp.save"

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        dcp.save(state_dict, checkpoint_id=target, no_dist=True)
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed)


def ensure_process_group() -> None:
    """dcp's process executor asks the default group for rank and world size and broadcasts
    the port of its child's TCPStore: a 1-rank gloo group over an in-process store does."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def shut_down_process_executor() -> None:
    """Stop dcp's per-trainer checkpoint daemon (TERMINATE, join 5 s, SIGTERM) and the group."""
    import torch.distributed as dist

    with contextlib.suppress(ImportError):
        from torch.distributed.checkpoint import _async_process_executor as executor

        process = executor._CHECKPOINT_PROCESS
        executor._CHECKPOINT_PROCESS = None
        if process is not None:
            process.__del__()
    if dist.is_initialized():
        dist.destroy_process_group()


class DcpAsync(Method):
    def __init__(self, executor: str) -> None:
        self.executor = executor
        self.key = f"dcp_{executor}"
        self.name = f"dcp.async_save {executor}"
        if executor == "process":
            self.note = (
                "dcp.async_save process: one daemon per trainer, spawned by the first call "
                "(spawn + gloo init); state dicts are pickled through a pipe"
            )

    async def setup(self, directory: str, state_dict: StateDict) -> None:
        await super().setup(directory, state_dict)
        if self.executor == "process":
            ensure_process_group()

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = (
            AsyncCheckpointerType.PROCESS
            if self.executor == "process"
            else AsyncCheckpointerType.THREAD
        )
        started = time.perf_counter()
        future = dcp.async_save(
            state_dict, checkpoint_id=target, async_checkpointer_type=kind, no_dist=True
        )
        staged = time.perf_counter()
        future.result()
        return Sample(staged - started, time.perf_counter() - started)


class TorchCheckpointProcess(Method):
    key, name = "ckpt_process", "CheckpointProcess (exp.) †"

    async def setup(self, directory: str, state_dict: StateDict) -> None:
        await super().setup(directory, state_dict)
        from torch.distributed.checkpoint._experimental.checkpoint_process import (
            CheckpointProcess,
            CheckpointProcessConfig,
        )
        from torch.distributed.checkpoint._experimental.types import RankInfo

        started = time.perf_counter()
        self.process = CheckpointProcess(
            rank_info=RankInfo(global_rank=0, global_world_size=1),
            config=CheckpointProcessConfig(),
            subprocess_init_fn=noop_subprocess_init,
            subprocess_init_args=(),
            checkpoint_writer_init_fn=make_torch_checkpoint_writer,
            checkpoint_writer_init_args={},
        )
        self.process.process_creation_future.result()
        self.spawn_seconds = time.perf_counter() - started
        self.note = (
            f"† CheckpointProcess: write() returns before the tensors are pickled (no staging: "
            f"the state dict must not change until durable); spawn + PING took "
            f"{self.spawn_seconds:.2f} s before the first call"
        )

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        started = time.perf_counter()
        future = self.process.write(state_dict, target)
        returned = time.perf_counter()
        assert future is not None
        future.result()
        return Sample(returned - started, time.perf_counter() - started)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.process.close()


@dataclass
class Breakdown:
    staging: list[float] = field(default_factory=list)
    write: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


def worker_pid(checkpointer: Any) -> int | None:
    """The aiockpt worker's pid: a public accessor if there is one, else the child process
    whose command line names ``aiockpt._worker``."""
    for attribute in ("worker_pid", "pid"):
        value = getattr(checkpointer, attribute, None)
        if isinstance(value, int):
            return value
    for attribute in ("process", "_process"):
        value = getattr(getattr(checkpointer, attribute, None), "pid", None)
        if isinstance(value, int):
            return value
    found = children_with("aiockpt._worker")
    return found[0] if len(found) == 1 else None


class Aiockpt(Method):
    is_aiockpt = True

    def __init__(self, fmt: str = "dcp", keep_last: int = 2) -> None:
        self.format = fmt
        self.keep_last = keep_last
        self.key = "aiockpt" if fmt == "dcp" else "aiockpt_st"
        self.name = f"aiockpt {fmt}"
        self.breakdown = Breakdown()
        self.steps = itertools.count(1)

    async def setup(self, directory: str, state_dict: StateDict) -> None:
        await super().setup(directory, state_dict)
        import aiockpt

        self.checkpointer = aiockpt.Checkpointer(
            os.path.join(directory, f"ckpt-{self.format}"),
            format=self.format,
            keep_last=self.keep_last,
            max_in_flight=1,
        )
        started = time.perf_counter()
        # like=: the staging arena is created and mapped here, not during the first save.
        await self.checkpointer.start(like=state_dict)
        self.start_seconds = time.perf_counter() - started
        self.note = (
            f"{self.name}: Checkpointer.start(like=sd) (spawn, handshake, arena) took "
            f"{self.start_seconds:.2f} s before the first call; keep_last={self.keep_last}"
        )

    async def run(self, state_dict: StateDict, target: str) -> Sample:
        started = time.perf_counter()
        handle = self.checkpointer.save(state_dict, step=next(self.steps))
        await handle.staged
        staged = time.perf_counter()
        result = await handle
        durable = time.perf_counter() - started
        for name in ("staging", "write", "total"):
            value = getattr(result, f"{name}_seconds", None)
            if isinstance(value, float):
                getattr(self.breakdown, name).append(value)
        return Sample(staged - started, durable)

    def remove_output(self, target: str) -> None:
        pass  # retention (keep_last) removes old checkpoints

    async def close(self) -> None:
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is not None:
            await checkpointer.close()


FACTORIES: dict[str, Callable[[], Method]] = {
    "memcpy": Memcpy,
    "raw": RawWrite,
    "torch_save": TorchSave,
    "dcp_save": DcpSave,
    "dcp_thread": lambda: DcpAsync("thread"),
    "dcp_process": lambda: DcpAsync("process"),
    "ckpt_process": TorchCheckpointProcess,
    "aiockpt": lambda: Aiockpt("dcp"),
    "aiockpt_st": lambda: Aiockpt("safetensors"),
}
DEFAULT_METHODS = [key for key in FACTORIES if key != "aiockpt_st"]


# --- the interleaved comparison -------------------------------------------------------------


@dataclass
class Series:
    method: Method
    first: Sample | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def blocking(self) -> float:
        return median([s.blocking for s in self.samples])

    @property
    def durable(self) -> float | None:
        values = [s.durable for s in self.samples if s.durable is not None]
        return median(values) if values else None

    def spread(self, attribute: str) -> str:
        values = [getattr(s, attribute) for s in self.samples]
        values = [v for v in values if v is not None]
        return f"{min(values):.3f}-{max(values):.3f}" if values else ""


async def compare(
    methods: Sequence[Method], state_dict: StateDict, directory: str, repeats: int, label: str
) -> dict[str, Series]:
    """Round 0 is every method's first call; rounds 1..repeats are the steady samples."""
    series = {m.key: Series(m) for m in methods}
    for method in methods:
        await method.setup(directory, state_dict)
    names = itertools.count()
    for round_index in range(repeats + 1):
        started = time.perf_counter()
        shift = round_index % len(methods)
        for method in [*methods[shift:], *methods[:shift]]:
            target = os.path.join(directory, f"{method.key}-{next(names)}")
            sample = await method.run(state_dict, target)
            method.remove_output(target)
            gc.collect()
            if round_index == 0:
                series[method.key].first = sample
            else:
                series[method.key].samples.append(sample)
        what = "first calls" if round_index == 0 else f"repeat {round_index}/{repeats}"
        elapsed = time.perf_counter() - started
        log(f"    [{label}] {what}: {elapsed:.1f} s (load average {os.getloadavg()[0]:.1f})")
    return series


def print_comparison(title: str, series: dict[str, Series]) -> None:
    memcpy = series.get("memcpy")
    raw = series.get("raw")
    ours = series.get("aiockpt")
    log(f"\n{title}")
    log(
        f"  {'method':30s} {'blocking':>8s} {'x memcpy':>8s} {'durable':>8s} {'x raw':>6s}"
        f" {'vs aiockpt':>10s}   {'first call blk / dur':>20s}   durable range"
    )
    for s in series.values():
        blocking = s.blocking
        durable = s.durable
        x_memcpy = f"{blocking / memcpy.blocking:7.2f}x" if memcpy else ""
        x_raw = f"{durable / raw.durable:5.2f}x" if raw and raw.durable and durable else ""
        vs = ""
        if ours and ours.durable and durable and s is not ours:
            vs = f"{durable / ours.durable:9.1f}x"
        dur_text = f"{durable:7.3f}s" if durable is not None else f"{'-':>8s}"
        first = ""
        if s.first is not None:
            first_durable = s.first.durable
            first_dur = f"{first_durable:7.3f}s" if first_durable is not None else f"{'-':>8s}"
            first = f"{s.first.blocking:7.3f}s / {first_dur}"
        log(
            f"  {s.method.name:30s} {blocking:7.3f}s {x_memcpy:>8s} {dur_text} {x_raw:>6s}"
            f" {vs:>10s}   {first:>20s}   {s.spread('durable')}"
        )
    log("  (medians of the steady repeats; 'vs aiockpt' = that method's durable / aiockpt's)")
    for s in series.values():
        if s.method.note:
            log(f"  {s.method.note}")
        if s.method.is_aiockpt:
            b = s.method.breakdown  # type: ignore[attr-defined]
            if b.total:
                log(
                    f"  {s.method.name} SaveResult medians: staging {median(b.staging):.3f} s,"
                    f" write {median(b.write):.3f} s, total {median(b.total):.3f} s"
                )


def fit_problem(nbytes: int, directory: str, kept: int) -> str | None:
    """Why a comparison of ``nbytes`` would not fit in memory / /dev/shm now, or None.

    Resident throughout: the state dict, the memcpy destination, aiockpt's arena and its kept
    checkpoints; at the peak of one run, up to three more copies (dcp's staged copy, the
    tensors torch shares with its child for pickling, the output)."""
    on_shm = os.stat(directory).st_dev == os.stat(SHM).st_dev
    # arena + torch's shared copies (+ kept checkpoints and the output when they are on tmpfs)
    shm_needed = nbytes * (2 + (kept + 1 if on_shm else 0))
    # + the state dict, the memcpy destination, dcp's staged copy
    ram_needed = nbytes * 3 + shm_needed
    shm_free = shutil.disk_usage(SHM).free
    available = mem_available()
    if shm_needed > shm_free * 0.9:
        return f"needs ~{format_size(shm_needed)} of /dev/shm, {format_size(shm_free)} free"
    if ram_needed > available * 0.9:
        return f"needs ~{format_size(ram_needed)} of memory, {format_size(available)} available"
    if not on_shm and nbytes * 2 > shutil.disk_usage(directory).free:
        return f"needs ~{format_size(nbytes * 2)} free in {directory}"
    return None


# --- heartbeat ------------------------------------------------------------------------------


class Heartbeat:
    """A task that sleeps 1 ms in a loop and records how long each sleep really took: the
    longest gap is the longest the event loop was kept from running its tasks."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.gaps: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._since = time.perf_counter()

    async def _beat(self) -> None:
        while True:
            self._since = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.gaps.append(time.perf_counter() - self._since)

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.get_running_loop().create_task(self._beat())
        await asyncio.sleep(0)  # let it take its first timestamp
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        # a gap still open when the measured code finished counts too (a save that held the
        # loop from start to end would otherwise leave no gap at all)
        self.gaps.append(time.perf_counter() - self._since)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def max(self) -> float:
        return max(self.gaps, default=float("nan"))

    @property
    def p99(self) -> float:
        return percentile(self.gaps, 0.99)


@dataclass
class StallResult:
    idle_max: float
    first_max: float
    first_p99: float
    steady_max: list[float]
    steady_p99: list[float]
    module_first_max: float | None = None
    module_steady_max: float | None = None
    torch_thread_max: float | None = None


async def bench_stall(state_dict: StateDict, directory: str, saves: int) -> StallResult:
    import torch.distributed.checkpoint as dcp

    import aiockpt

    async with Heartbeat() as idle:
        await asyncio.sleep(1.0)
    steady_max, steady_p99 = [], []
    # default settings (keep_last only so that /dev/shm does not fill up)
    checkpointer = aiockpt.Checkpointer(os.path.join(directory, "ckpt-stall"), keep_last=1)
    await checkpointer.start()
    try:
        for step in range(saves + 1):
            async with Heartbeat() as beat:
                handle = checkpointer.save(state_dict, step=step)
                await handle.staged
                await handle
            if step == 0:
                first_max, first_p99 = beat.max, beat.p99
            else:
                steady_max.append(beat.max)
                steady_p99.append(beat.p99)
    finally:
        await checkpointer.close()
    result = StallResult(idle.max, first_max, first_p99, steady_max, steady_p99)

    async_save = getattr(aiockpt, "async_save", None)
    if async_save is not None:
        # the module-level default checkpointer: its first call also starts the worker
        gaps = []
        for index in range(3):
            target = os.path.join(directory, f"module-{index}")
            async with Heartbeat() as beat:
                await async_save(state_dict, target, format="dcp")
            gaps.append(beat.max)
            remove(target)
        result.module_first_max = gaps[0]
        result.module_steady_max = median(gaps[1:])
        # stop its worker and free its arena now rather than at loop shutdown
        with contextlib.suppress(ImportError):
            from aiockpt._trainer.handles import default_checkpointer

            await default_checkpointer().close()

    # torch's thread executor called from a coroutine: staging runs on the loop's thread
    target = os.path.join(directory, "torch-thread")
    async with Heartbeat() as beat:
        future = dcp.async_save(state_dict, checkpoint_id=target, no_dist=True)
        await asyncio.wrap_future(future)
    remove(target)
    result.torch_thread_max = beat.max
    return result


def print_stall(result: StallResult, nbytes: int) -> None:
    ms = 1000.0
    log(f"\nEvent-loop stall while saving {format_size(nbytes)} (a heartbeat task; gap = the time")
    log("  one asyncio.sleep(0.001) really took, so an idle loop shows ~1-2 ms)")
    log(f"  idle loop (no save)                     max gap {result.idle_max * ms:7.1f} ms")
    log(
        f"  aiockpt first save (started Checkpointer) max gap {result.first_max * ms:7.1f} ms,"
        f" p99 {result.first_p99 * ms:5.1f} ms"
    )
    log(
        f"  aiockpt steady saves (median of {len(result.steady_max)})   max gap"
        f" {median(result.steady_max) * ms:7.1f} ms (worst {max(result.steady_max) * ms:.1f}),"
        f" p99 {median(result.steady_p99) * ms:5.1f} ms"
    )
    if result.module_first_max is not None:
        log(
            f"  aiockpt.async_save (module-level)       max gap first call (starts the worker)"
            f" {result.module_first_max * ms:.1f} ms, steady {result.module_steady_max * ms:.1f} ms"  # type: ignore[operator]
        )
    if result.torch_thread_max is not None:
        log(
            f"  dcp.async_save thread, called on the loop max gap"
            f" {result.torch_thread_max * ms:7.1f} ms (its staging runs on the caller's thread)"
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


# --- RSS over many saves --------------------------------------------------------------------


@dataclass
class RssResult:
    saves: list[int] = field(default_factory=list)
    trainer: list[dict[str, int]] = field(default_factory=list)
    worker: list[dict[str, int]] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    worker_pid: int | None = None


async def bench_rss(state_dict: StateDict, directory: str, saves: int) -> RssResult:
    import aiockpt

    result = RssResult()
    checkpointer = aiockpt.Checkpointer(
        os.path.join(directory, "ckpt-rss"), keep_last=2, max_in_flight=1
    )
    await checkpointer.start()
    try:
        result.worker_pid = worker_pid(checkpointer)
        for step in range(1, saves + 1):
            started = time.perf_counter()
            handle = checkpointer.save(state_dict, step=step)
            await handle.staged
            await handle
            result.durable.append(time.perf_counter() - started)
            if step == 1 or step % 10 == 0:
                gc.collect()
                result.saves.append(step)
                result.trainer.append(memory_status(os.getpid()))
                if result.worker_pid is not None:
                    with contextlib.suppress(OSError):
                        result.worker.append(memory_status(result.worker_pid))
    finally:
        await checkpointer.close()
    return result


def rss_drift(samples: list[dict[str, int]], saves: list[int], key: str = "VmRSS") -> float:
    """Largest distance from the sample taken after 10 saves, as a fraction of it."""
    reference_index = saves.index(10) if 10 in saves else 0
    reference = samples[reference_index][key]
    later = [s[key] for s in samples[reference_index:]]
    return max(abs(v - reference) for v in later) / reference if reference else float("nan")


def print_rss(result: RssResult, nbytes: int) -> None:
    log(f"\nRSS over {result.saves[-1]} saves of {format_size(nbytes)} (aiockpt, keep_last=2)")
    log(
        f"  durable per save: median {median(result.durable):.3f} s,"
        f" first {result.durable[0]:.3f} s, last 10 {median(result.durable[-10:]):.3f} s"
    )
    for who, samples in (("trainer", result.trainer), ("worker", result.worker)):
        if not samples:
            log(f"  {who}: not sampled (worker pid not found)")
            continue
        rss = [s["VmRSS"] / MiB for s in samples]
        anon = [s.get("RssAnon", 0) / MiB for s in samples]
        shmem = [s.get("RssShmem", 0) / MiB for s in samples]
        log(
            f"  {who:7s} VmRSS MiB first {rss[0]:7.1f}  after 10 {rss[min(1, len(rss) - 1)]:7.1f}"
            f"  last {rss[-1]:7.1f}  max {max(rss):7.1f}  drift after 10:"
            f" {rss_drift(samples, result.saves) * 100:5.2f}%"
            f"   (anon {anon[-1]:.0f}, shmem {shmem[-1]:.0f} at the end)"
        )
        every = max(1, len(rss) // 10)
        trace = " ".join(f"{result.saves[i]}:{rss[i]:.0f}" for i in range(0, len(rss), every))
        log(f"          save:MiB {trace}")


# --- size sweep -----------------------------------------------------------------------------


async def bench_sweep(
    keys: Sequence[str], sizes: Sequence[int], count: int, parent: str, repeats: int
) -> dict[int, dict[str, Series]]:
    results: dict[int, dict[str, Series]] = {}
    for nbytes in sizes:
        with bench_directory(parent) as directory:
            problem = fit_problem(nbytes, directory, kept=1)
            if problem:
                log(f"    [sweep] skipping {format_size(nbytes)}: {problem}")
                continue
            state_dict = make_state_dict(nbytes, count)
            methods = [FACTORIES[key]() for key in keys]
            for method in methods:
                if isinstance(method, Aiockpt):
                    method.keep_last = 1
            try:
                label = f"sweep {format_size(nbytes)}"
                results[nbytes] = await compare(methods, state_dict, directory, repeats, label)
            finally:
                for method in methods:
                    await method.close()
            del state_dict, methods
            release_memory()
    return results


def print_sweep(results: dict[int, dict[str, Series]]) -> None:
    if not results:
        return
    keys = list(next(iter(results.values())))
    names = {key: s.method.name for key, s in next(iter(results.values())).items()}
    sizes = list(results)
    header = "".join(f"{format_size(size):>17s}" for size in sizes)
    log("\nSize sweep (/dev/shm, medians, blocking / durable seconds)")
    log(f"  {'method':30s}{header}")
    for key in keys:
        cells = []
        for size in sizes:
            s = results[size].get(key)
            if s is None:
                cells.append(f"{'':>17s}")
                continue
            durable = f"{s.durable:7.3f}" if s.durable is not None else f"{'-':>7s}"
            cells.append(f"{s.blocking:7.3f} / {durable}")
        log(f"  {names[key]:30s}" + "".join(f"{c:>17s}" for c in cells))


def plot_sweep(results: dict[int, dict[str, Series]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    keys = list(results[sizes[0]])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, attribute in zip(axes, ("blocking", "durable"), strict=True):
        for key in keys:
            xs, ys = [], []
            for size in sizes:
                s = results[size].get(key)
                value = getattr(s, attribute) if s is not None else None
                if value is not None:
                    xs.append(size / MiB)
                    ys.append(value)
            if not xs:
                continue
            name = results[sizes[0]][key].method.name.replace(" †", "")
            if key == "ckpt_process" and attribute == "blocking":
                name += " (returns unstaged)"
            style = "--" if key in ("memcpy", "raw") else "-"
            width = 3 if key.startswith("aiockpt") else 1.5
            # the same colour for a method in both panels (memcpy has no durable line)
            color = f"C{list(FACTORIES).index(key) % 10}"
            ax.plot(xs, ys, style, marker="o", linewidth=width, color=color, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([s / MiB for s in sizes])
        ax.set_xticklabels([format_size(s) for s in sizes])
        ax.set_xlabel("state dict size (64 fp32 tensors)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(
            f"{attribute}: "
            + ("caller may mutate" if attribute == "blocking" else "on disk, fsynced, committed")
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- summary --------------------------------------------------------------------------------


@dataclass
class Target:
    what: str
    goal: str
    measured: str = "not measured"
    met: bool | None = None

    def line(self) -> str:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[self.met]
        return f"  {self.what:58s} {self.goal:>11s}  {self.measured:44s} {verdict}"


def summarize(
    shm: dict[str, Series] | None,
    stall: StallResult | None,
    cpu: Sequence[CpuResult] | None,
    rss: RssResult | None,
) -> list[Target]:
    blocking = Target("blocking vs memcpy (steady, /dev/shm)", "<= 1.5x")
    durable = Target("durable vs raw write+fsync (steady, /dev/shm)", "<= 1.3x")
    process = Target("durable vs dcp.async_save process (steady)", ">= 5x faster")
    first = Target("first save from a started Checkpointer vs steady (dur)", "<= 1.5x")
    first_blocking = Target("  the same, blocking", "(<= 1.5x)")
    rss_target = Target("RSS flat over the saves (trainer, worker)", "within 5%")
    cpu_target = Target("CPU-bound trainer loop slowed while in flight", "<= 10%")
    stall_target = Target("longest event-loop stall, 1 GiB save (steady)", "<= 20 ms")
    stall_first = Target("  the same, first save from a started Checkpointer", "(<= 20 ms)")
    if shm is not None and "aiockpt" in shm:
        ours = shm["aiockpt"]
        if "memcpy" in shm:
            ratio = ours.blocking / shm["memcpy"].blocking
            blocking.measured = (
                f"{ours.blocking:.3f} s / {shm['memcpy'].blocking:.3f} s = {ratio:.2f}x"
            )
            blocking.met = ratio <= 1.5
        if "raw" in shm and ours.durable and shm["raw"].durable:
            ratio = ours.durable / shm["raw"].durable
            durable.measured = f"{ours.durable:.3f} s / {shm['raw'].durable:.3f} s = {ratio:.2f}x"
            durable.met = ratio <= 1.3
        if "dcp_process" in shm and ours.durable and shm["dcp_process"].durable:
            ratio = shm["dcp_process"].durable / ours.durable
            process.measured = (
                f"{shm['dcp_process'].durable:.3f} s / {ours.durable:.3f} s = {ratio:.1f}x"
            )
            process.met = ratio >= 5
        if ours.first is not None and ours.first.durable and ours.durable:
            ratio = ours.first.durable / ours.durable
            first.measured = f"{ours.first.durable:.3f} s / {ours.durable:.3f} s = {ratio:.2f}x"
            first.met = ratio <= 1.5
            ratio = ours.first.blocking / ours.blocking
            first_blocking.measured = (
                f"{ours.first.blocking:.3f} s / {ours.blocking:.3f} s = {ratio:.2f}x"
            )
            first_blocking.met = ratio <= 1.5
    if rss is not None and rss.trainer:
        trainer = rss_drift(rss.trainer, rss.saves)
        worker = rss_drift(rss.worker, rss.saves) if rss.worker else float("nan")
        rss_target.measured = (
            f"{trainer * 100:.2f}% / {worker * 100:.2f}% over {rss.saves[-1]} saves"
        )
        rss_target.met = trainer <= 0.05 and (not rss.worker or worker <= 0.05)
    if cpu:
        parts, met = [], True
        for r in cpu:
            ours_slow = r.slowdown("aiockpt")
            ours_own = r.own_core_slowdown("aiockpt")
            parts.append(
                f"{r.kind} {ours_slow * 100:+.0f}% [own core {ours_own * 100:+.0f}%]"
                f" (thread {r.slowdown('thread') * 100:+.0f}%"
                f" [{r.own_core_slowdown('thread') * 100:+.0f}%])"
            )
            met = met and ours_slow <= 0.10
        cpu_target.measured = ", ".join(parts)
        cpu_target.met = met
    if stall is not None:
        worst = median(stall.steady_max)
        stall_target.measured = (
            f"{worst * 1000:.1f} ms (worst {max(stall.steady_max) * 1000:.1f}; idle"
            f" {stall.idle_max * 1000:.1f})"
        )
        stall_target.met = worst <= 0.020
        stall_first.measured = f"{stall.first_max * 1000:.1f} ms"
        stall_first.met = stall.first_max <= 0.020
    return [
        blocking,
        durable,
        process,
        first,
        first_blocking,
        rss_target,
        cpu_target,
        stall_target,
        stall_first,
    ]


def explain(
    shm: dict[str, Series] | None, stall: StallResult | None, cpu: Sequence[CpuResult] | None
) -> list[str]:
    """What the measurements say about the misses (breakdowns, not guesses)."""
    notes = []
    if shm is not None and "aiockpt" in shm:
        ours = shm["aiockpt"]
        breakdown: Breakdown = ours.method.breakdown  # type: ignore[attr-defined]
        raw = shm.get("raw")
        if breakdown.total and raw is not None and raw.durable:
            staging, write = median(breakdown.staging), median(breakdown.write)
            notes.append(
                f"aiockpt durable = staging {staging:.3f} s, then the worker's write+commit"
                f" {write:.3f} s, in series; the write alone is {write / raw.durable:.2f}x raw"
            )
        process = shm.get("dcp_process")
        if process is not None and process.durable and raw is not None and raw.durable:
            notes.append(
                f"dcp.async_save process is {process.durable / raw.durable:.1f}x the raw"
                f" write limit here: '>= 5x faster' needs a durable save under"
                f" {process.durable / 5:.3f} s"
            )
        if ours.first is not None and ours.first.durable and ours.durable:
            notes.append(
                f"first save: +{ours.first.blocking - ours.blocking:.3f} s blocking,"
                f" +{ours.first.durable - ours.durable:.3f} s durable over steady (the arena is"
                f" created, populated and mapped by the worker during the first save)"
            )
    if stall is not None and stall.first_max > 0.020:
        notes.append(
            f"first-save stall {stall.first_max * 1000:.0f} ms: the longest single hold of"
            f" the loop thread (e.g. a C call that keeps the GIL) during arena creation"
        )
    if cpu:
        for r in cpu:
            notes.append(
                f"{r.kind} loop in flight with aiockpt: wall {r.slowdown('aiockpt') * 100:+.0f}%"
                f" of which run-queue wait (no free core; load average"
                f" {median([w.load for w in r.windows['aiockpt']]):.1f} on"
                f" {os.cpu_count()} CPUs) leaves {r.own_core_slowdown('aiockpt') * 100:+.0f}%"
                f" with a core of its own"
            )
    return notes


# --- main -----------------------------------------------------------------------------------

SECTIONS = ("anchors", "stall", "cpu", "rss", "sweep")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, sweep up to 1 GiB")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated")
    parser.add_argument("--size", default="1G", help="state dict of anchors/stall/cpu")
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, help="anchors on /dev/shm (default 5, quick 3)")
    parser.add_argument("--disk-repeats", type=int, help="anchors on disk (default 3, quick 2)")
    parser.add_argument(
        "--dirs", action="append", help=f"anchor parents (default {SHM} and the temp dir)"
    )
    parser.add_argument("--sweep-sizes", default="256M,512M,1G,2G,4G")
    parser.add_argument("--max-size", help="cap the sweep (quick: 1G)")
    parser.add_argument("--sweep-repeats", type=int, help="default 3, quick 2")
    parser.add_argument("--stall-saves", type=int, help="steady saves (default 5, quick 3)")
    parser.add_argument("--cpu-rounds", type=int, help="default 5, quick 3")
    parser.add_argument("--cpu-work", default="python,matmul", help="python and/or matmul")
    parser.add_argument(
        "--cpu-nice",
        type=int,
        default=10,
        help="also measure aiockpt with its worker threads at this niceness (0: skip)",
    )
    parser.add_argument("--rss-saves", type=int, help="default 200, quick 50")
    parser.add_argument("--rss-size", default="256M")
    parser.add_argument("--png", default="bench-out/bench_save.png")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sections = [s for s in args.sections.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    for name in args.sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in args.methods:
        if name not in FACTORIES:
            parser.error(f"unknown method {name!r}; choose from {', '.join(FACTORIES)}")
    args.size = parse_size(args.size)
    args.rss_size = parse_size(args.rss_size)
    args.repeats = args.repeats or (3 if quick else 5)
    args.disk_repeats = args.disk_repeats or (2 if quick else 3)
    args.sweep_repeats = args.sweep_repeats or (2 if quick else 3)
    args.stall_saves = args.stall_saves or (3 if quick else 5)
    args.cpu_rounds = args.cpu_rounds or (3 if quick else 5)
    args.rss_saves = args.rss_saves or (50 if quick else 200)
    args.cpu_work = [k for k in args.cpu_work.split(",") if k]
    cap = parse_size(args.max_size) if args.max_size else (GiB if quick else None)
    args.sweep_sizes = [
        s for s in map(parse_size, args.sweep_sizes.split(",")) if cap is None or s <= cap
    ]
    args.dirs = args.dirs or [SHM, tempfile.gettempdir()]
    return args


async def amain(args: argparse.Namespace) -> None:
    import uvloop  # noqa: F401 - imported to report the loop in use

    unavailable = aiockpt_available()
    methods = list(args.methods)
    if unavailable:
        log(f"NOTE: aiockpt is not measured: {unavailable}")
        methods = [m for m in methods if not m.startswith("aiockpt")]
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    log(
        f"bench_save: torch {torch.__version__}, {os.cpu_count()} CPUs, loop {loop_name},"
        f" torch threads {torch.get_num_threads()}, sections {','.join(args.sections)}"
    )
    log(
        f"  /dev/shm free {format_size(shutil.disk_usage(SHM).free)},"
        f" memory available {format_size(mem_available())},"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    run_started = time.perf_counter()
    shm_series: dict[str, Series] | None = None
    stall = cpu = rss = None
    state_dict: StateDict | None = None

    def main_state_dict() -> StateDict:
        nonlocal state_dict
        if state_dict is None:
            state_dict = make_state_dict(args.size, args.tensors)
        return state_dict

    needs_aiockpt = {"stall", "cpu", "rss"} & set(args.sections)
    if needs_aiockpt and unavailable:
        log(f"\nskipping {', '.join(sorted(needs_aiockpt))}: {unavailable}")
    elif "rss" in args.sections:
        # first, so that the trainer's figures are those of a trainer that only saves
        log("\n== rss ==")
        with bench_directory(SHM) as directory:
            rss_sd = make_state_dict(args.rss_size, args.tensors)
            rss = await bench_rss(rss_sd, directory, args.rss_saves)
            del rss_sd
        print_rss(rss, args.rss_size)
        release_memory()

    if "anchors" in args.sections:
        for parent in args.dirs:
            on_shm = os.stat(parent).st_dev == os.stat(SHM).st_dev
            repeats = args.repeats if on_shm else args.disk_repeats
            with bench_directory(parent) as directory:
                problem = fit_problem(args.size, directory, kept=2)
                if problem:
                    log(f"\nskipping anchors in {parent}: {problem}")
                    continue
                sd = main_state_dict()
                log(f"\n== anchors: {parent} ({directory}) ==")
                started = time.perf_counter()
                instances = [FACTORIES[key]() for key in methods]
                try:
                    series = await compare(instances, sd, directory, repeats, parent)
                finally:
                    for method in instances:
                        await method.close()
                title = (
                    f"{parent}: {format_size(state_dict_bytes(sd))} in {args.tensors} fp32"
                    f" tensors, {repeats} interleaved repeats after a first-call round"
                    f" ({time.perf_counter() - started:.0f} s)"
                )
                print_comparison(title, series)
                if on_shm and shm_series is None:
                    shm_series = series
            release_memory()

    if not unavailable:
        if "stall" in args.sections:
            log("\n== stall ==")
            with bench_directory(SHM) as directory:
                stall = await bench_stall(main_state_dict(), directory, args.stall_saves)
            print_stall(stall, args.size)
            release_memory()
        if "cpu" in args.sections:
            log("\n== cpu ==")
            with bench_directory(SHM) as directory:
                cpu = await bench_cpu(
                    main_state_dict(), directory, args.cpu_rounds, args.cpu_work, args.cpu_nice
                )
            print_cpu(cpu, args.size, args.cpu_nice)
            release_memory()
    if "sweep" in args.sections:
        state_dict = None
        release_memory()
        log(f"\n== sweep: {', '.join(map(format_size, args.sweep_sizes))} in {SHM} ==")
        sweep = await bench_sweep(methods, args.sweep_sizes, args.tensors, SHM, args.sweep_repeats)
        print_sweep(sweep)
        if sweep:
            plot_sweep(
                sweep,
                args.png,
                f"save latency vs size, /dev/shm, {args.tensors} fp32 tensors,"
                f" medians of {args.sweep_repeats} interleaved repeats (torch {torch.__version__})",
            )
            log(f"\nplot: {os.path.join(os.getcwd(), args.png)}")

    shut_down_process_executor()
    log("\n== summary: issue-3 targets (steady state, /dev/shm; a report, not assertions) ==")
    for target in summarize(shm_series, stall, cpu, rss):
        log(target.line())
    for note in explain(shm_series, stall, cpu):
        log(f"  * {note}")
    log(f"\ntotal {time.perf_counter() - run_started:.0f} s")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet_torch_warnings()
    import uvloop

    try:
        uvloop.run(amain(args))
    finally:
        shut_down_process_executor()
    sys.stdout.flush()


def _quiet_torch_children() -> None:
    """dcp's process-executor child logs every request at INFO to the shared stderr; it
    imports this module as ``__mp_main__`` before it starts, so silence that here."""
    _quiet_torch_warnings()
    with contextlib.suppress(ImportError):
        from torch.distributed.checkpoint import _async_process_executor as executor

        executor._init_logger = lambda rank: None  # type: ignore[attr-defined]


def _quiet_torch_warnings() -> None:
    # dcp.save(no_dist=True) warns that it "assumes the intent is to save in a single process"
    warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


if __name__ == "__mp_main__":
    _quiet_torch_children()

if __name__ == "__main__":
    main()
