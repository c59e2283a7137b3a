"""Durable-save cost of the writers against the raw write limit.

    python -m benchmarks.bench_writers [--gib 1] [--tensors 64] [--repeats 5] [--dir PATH ...]

State: ``--gib`` GiB of random fp32 in ``--tensors`` tensors, all views into one buffer (as in
the worker, where they view the shared-memory arena). For each target directory (default
/dev/shm and a directory on disk under the system temp dir) each repeat runs, in rotating
order:

* raw: ``os.write`` of every tensor's bytes into one file, ``fsync`` (the write limit);
* raw, early writeback: the same plus ``sync_file_range`` after each write, which the
  writers also do (shows how much of their margin on a disk comes from that alone);
* aiockpt dcp / aiockpt safetensors: ``write_checkpoint`` (writer, checksums, manifest,
  fsyncs, rename: a committed, durable checkpoint);
* dcp.save: ``torch.distributed.checkpoint.save`` with its default FileSystemWriter.

Prints the median seconds of each and its ratio to raw. Everything written is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from aiockpt._format.commit import write_checkpoint
from aiockpt.writers.base import _SYNC_FILE_RANGE_WRITE, _sync_file_range, tensor_bytes
from aiockpt.writers.dcp import DcpWriter
from aiockpt.writers.safetensors import SafetensorsWriter

StateDict = dict[str, torch.Tensor]


def make_state_dict(gib: float, count: int) -> StateDict:
    numel = int(gib * (1 << 30)) // 4 // count
    arena = torch.rand(numel * count, dtype=torch.float32)
    return {f"layer{i}.weight": arena[i * numel : (i + 1) * numel] for i in range(count)}


def raw(state_dict: StateDict, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for tensor in state_dict.values():
            view = tensor_bytes(tensor)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_early_writeback(state_dict: StateDict, path: str) -> None:
    """The raw write with the writers' one I/O trick: writeback started as bytes arrive."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        written = 0
        for tensor in state_dict.values():
            view = tensor_bytes(tensor)
            while view:
                count = os.write(fd, view)
                view = view[count:]
                if _sync_file_range is not None:
                    _sync_file_range(fd, written, count, _SYNC_FILE_RANGE_WRITE)
                written += count
        os.fsync(fd)
    finally:
        os.close(fd)


def aiockpt_dcp(state_dict: StateDict, path: str) -> None:
    write_checkpoint(DcpWriter(), state_dict, path, format="dcp")


def aiockpt_safetensors(state_dict: StateDict, path: str) -> None:
    write_checkpoint(SafetensorsWriter(), state_dict, path, format="safetensors")


def torch_dcp_save(state_dict: StateDict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state_dict, checkpoint_id=path, no_dist=True)


METHODS: dict[str, Callable[[StateDict, str], None]] = {
    "raw write+fsync": raw,
    "raw, early writeback": raw_early_writeback,
    "aiockpt dcp": aiockpt_dcp,
    "aiockpt safetensors": aiockpt_safetensors,
    "dcp.save": torch_dcp_save,
}


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def bench_directory(state_dict: StateDict, directory: str, repeats: int) -> None:
    names = list(METHODS)
    times: dict[str, list[float]] = {name: [] for name in names}
    # One untimed round: first touches of fresh tmpfs pages and lazy imports are not steady.
    for round_index in range(repeats + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            target = os.path.join(directory, "ckpt")
            started = time.perf_counter()
            METHODS[name](state_dict, target)
            elapsed = time.perf_counter() - started
            remove(target)
            if round_index:
                times[name].append(elapsed)
    baseline = statistics.median(times[names[0]])
    print(f"\n{directory}  ({repeats} repeats, medians)")
    for name in names:
        median = statistics.median(times[name])
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:22s} {median:7.3f} s  ({spread})  {median / baseline:5.2f}x raw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", action="append", dest="dirs", help="parent directories")
    args = parser.parse_args()
    parents = args.dirs or ["/dev/shm", tempfile.gettempdir()]
    state_dict = make_state_dict(args.gib, args.tensors)
    print(f"{args.gib} GiB of fp32 in {args.tensors} tensors; torch {torch.__version__}")
    for parent in parents:
        directory = tempfile.mkdtemp(prefix="aiockpt-bench-", dir=parent)
        try:
            bench_directory(state_dict, directory, args.repeats)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
