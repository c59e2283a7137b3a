"""Helpers shared by the benchmarks.

Everything a torch ``spawn`` child has to unpickle lives here, at module level under a stable
module name: a benchmark run as ``python -m benchmarks.bench_x`` is ``__main__`` in the parent,
and references into ``__main__`` only resolve in children by re-running that module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

SHM = "/dev/shm"


def log(message: str = "") -> None:
    print(message, flush=True)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


@contextlib.contextmanager
def bench_directory(parent: str, prefix: str) -> Iterator[str]:
    """A fresh directory under ``parent``, removed afterwards. ``prefix`` must never start
    with "aiockpt": the test suite's leak checker owns those names."""
    directory = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- state dicts ----------------------------------------------------------------------------


def many_tensors(count: int, nbytes: int) -> dict[str, Any]:
    """``count`` fp32 tensors of ``nbytes`` in all (at least one element each)."""
    import torch

    numel = max(1, nbytes // 4 // count)
    return {f"layer{i}.weight": torch.rand(numel) for i in range(count)}


def gpt_adamw(layers: int = 24, width: int = 512, vocab: int = 24_000) -> dict[str, Any]:
    """A GPT-2-style model (``layers`` blocks of ``width``) and its AdamW state after one
    step: ~1,270 tensors, ~1 GiB."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block() -> nn.Module:
        return nn.ModuleDict(
            {
                "ln_1": nn.LayerNorm(width),
                "attn": nn.ModuleDict(
                    {"c_attn": nn.Linear(width, 3 * width), "c_proj": nn.Linear(width, width)}
                ),
                "ln_2": nn.LayerNorm(width),
                "mlp": nn.ModuleDict(
                    {"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)}
                ),
            }
        )

    model = nn.ModuleDict(
        {
            "wte": nn.Embedding(vocab, width),
            "wpe": nn.Embedding(1024, width),
            "h": nn.ModuleList([block() for _ in range(layers)]),
            "ln_f": nn.LayerNorm(width),
        }
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 1e-3)
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}


#: the real-shaped workloads of issue 14: name -> (title, builder)
WORKLOADS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "gpt": ("GPT 24x512 + AdamW", gpt_adamw),
    "small8k": ("256 MiB in 8,192 tensors", lambda: many_tensors(8192, 256 * MiB)),
    "small20k": ("20,000 tensors of 4 KiB", lambda: many_tensors(20_000, 20_000 * 4 * KiB)),
    "big64": ("1 GiB in 64 tensors", lambda: many_tensors(64, GiB)),
}


def tensors_of(tree: Any) -> list[Any]:
    """Every tensor of a state dict, in flattening order."""
    return [tensor for _, tensor in named_tensors(tree)]


def named_tensors(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key path, tensor)`` for every tensor of a state dict."""
    import torch

    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        items: Iterable[tuple[Any, Any]] = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    return [
        named
        for key, value in items
        for named in named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    ]


def nbytes_of(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(tree))


def torch_save(state_dict: Any, path: str) -> None:
    """torch.save to a new file, then fsync (durable, like the others)."""
    import torch

    with open(path, "wb") as file:
        torch.save(state_dict, file)
        file.flush()
        os.fsync(file.fileno())


# --- interleaved rounds ---------------------------------------------------------------------


def interleave(
    runs: dict[str, Callable[[], float]], repeats: int, label: str = ""
) -> dict[str, list[float]]:
    """Each run (which returns the seconds it measured) once per round, the order rotated
    every round so that noise on a shared machine hits every method alike. Round 0 is a
    warm-up (first page faults, imports, caches) and is not kept."""
    samples: dict[str, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    for round_index in range(repeats + 1):
        shift = round_index % len(keys)
        for key in [*keys[shift:], *keys[:shift]]:
            seconds = runs[key]()
            if round_index:
                samples[key].append(seconds)
        release_memory()
        if label:
            what = "warm-up" if round_index == 0 else f"repeat {round_index}/{repeats}"
            log(f"    [{label}] {what} (load average {os.getloadavg()[0]:.1f})")
    return samples


def timed(call: Callable[[], Any]) -> float:
    """Seconds ``call()`` took; what it returned is dropped after the clock stops."""
    started = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - started
    del result
    return elapsed


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


def raw_write(tensors: Iterable[Any], path: str, *, extra: int = 0) -> None:
    """The write limit: every tensor's bytes into one new file, then ``extra`` more bytes
    (a format's framing) in one write, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for tensor in tensors:
            view = memoryview(tensor.numpy()).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        view = memoryview(bytes(extra))
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedWrite:
    """The least a save that stages and checks its bytes can take on this machine: every
    tensor copied into one buffer (the staging a caller waits for, in batched copies of about
    ``chunk`` bytes) while a second thread hashes (xxh3) and writes what is staged, then
    fsyncs. Two threads of one process, no IPC, no format, no per-tensor Python beyond
    grouping the copies; the buffer and its views are made once, as an arena is."""

    def __init__(self, tensors: Sequence[Any], *, chunk: int = 4 << 20) -> None:
        import torch

        self.tensors = list(tensors)
        offsets, offset = [], 0
        for tensor in self.tensors:
            offset += -offset % 64
            offsets.append(offset)
            offset += tensor.numel() * tensor.element_size()
        self.size = offset
        self.buffer = torch.ones(max(offset, 1), dtype=torch.uint8)  # touched, as an arena is
        self.views = [
            self.buffer[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for start, t in zip(offsets, self.tensors, strict=True)
        ]
        # (first tensor, end tensor, bytes staged once copied) of each batched copy
        self.groups: list[tuple[int, int, int]] = []
        first, start, last = 0, 0, len(self.tensors) - 1
        for index, tensor in enumerate(self.tensors):
            end = offsets[index] + tensor.numel() * tensor.element_size()
            if end - start >= chunk or index == last:
                self.groups.append((first, index + 1, end))
                first, start = index + 1, end

    def __call__(self, _tensors: Any, path: str) -> None:
        import threading

        import torch
        import xxhash

        staged = 0
        ready = threading.Condition()

        def stage() -> None:
            nonlocal staged
            with torch.no_grad():
                for first, end, nbytes in self.groups:
                    torch._foreach_copy_(self.views[first:end], self.tensors[first:end])
                    with ready:
                        staged = nbytes
                        ready.notify()

        copier = threading.Thread(target=stage)
        copier.start()
        digest = xxhash.xxh3_64()
        memory = memoryview(self.buffer.numpy())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            written = 0
            while written < self.size:
                with ready:
                    while staged <= written:
                        ready.wait()
                    end = staged
                piece = memory[written:end]
                digest.update(piece)
                while piece:
                    piece = piece[os.write(fd, piece) :]
                written = end
            os.fsync(fd)
        finally:
            os.close(fd)
            copier.join()


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


# --- torch's dcp process executor: quiet children -------------------------------------------


def quiet_torch_children() -> None:
    """dcp's process-executor child logs every request at INFO to the shared stderr; it
    imports the benchmark's main module as ``__mp_main__`` before it starts, so a benchmark
    that runs that executor calls this there."""
    quiet_torch_warnings()
    with contextlib.suppress(ImportError):
        from torch.distributed.checkpoint import _async_process_executor as executor

        executor._init_logger = lambda rank: None  # type: ignore[attr-defined]


def quiet_torch_warnings() -> None:
    # dcp.save(no_dist=True) warns that it "assumes the intent is to save in a single process"
    warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


# --- plots ----------------------------------------------------------------------------------


def plot_lines(
    results: dict[int, dict[str, float]], path: str, title: str, xlabel: str, ylabel: str
) -> None:
    """One line per method of ``results`` (x -> method -> seconds), log scales, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(results)
    methods = list(dict.fromkeys(m for x in xs for m in results[x]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for index, method in enumerate(methods):
        points = [(x, results[x][method]) for x in xs if method in results[x]]
        limit = method.startswith(("raw", "read"))
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "--" if limit else "-",
            marker="o",
            linewidth=3 if method.startswith("aiockpt") else 1.5,
            color=f"C{index % 10}",
            label=method,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:,}" for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
