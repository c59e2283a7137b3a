"""The save methods bench_save and bench_sweep compare (aiockpt, torch's paths, the limits),
and the interleaved comparison that runs them.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks._common import (
    SHM,
    bench_directory,
    children_with,
    format_size,
    log,
    make_torch_checkpoint_writer,
    median,
    mem_available,
    noop_subprocess_init,
    raw_write,
    remove,
)

StateDict = dict[str, torch.Tensor]

DIR_PREFIX = "bench-save-"  # never "aiockpt*": the test suite's leak checker owns those names


def save_directory(parent: str) -> contextlib.AbstractContextManager[str]:
    """A fresh ``bench-save-*`` directory under ``parent``, removed afterwards."""
    return bench_directory(parent, DIR_PREFIX)


def state_dict_bytes(state_dict: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def aiockpt_available() -> str | None:
    """None when ``aiockpt.Checkpointer`` is importable, else why not."""
    try:
        import aiockpt
    except Exception as exc:  # reported; the torch anchors still run
        return f"import aiockpt failed: {exc!r}"
    if not hasattr(aiockpt, "Checkpointer"):
        return "aiockpt.Checkpointer does not exist yet"
    return None


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
