"""Saves of real-shaped training state: a GPT-style model with AdamW, thousands of small
tensors, and the 64 large tensors the first figures came from.

    python -m benchmarks.bench_shapes [--workloads gpt,small8k,small20k,big64] [--repeats 5]
                                      [--dir /dev/shm]

Per workload, every round runs each method once, in an order rotated every round, so noise
on a shared machine hits every method alike; the first round is a warm-up (worker spawn,
arena creation, first page faults) and the figures are medians over the others:

    memcpy      copy_ into preallocated tensors of the same layout (the staging limit)
    raw         os.write of every tensor's bytes into one file + fsync (the write limit)
    torch.save  torch.save to a file + fsync
    staged write  the least a save that stages and checks its bytes can take here: a thread
                copies every tensor into one buffer (batched copies of ~4 MiB) while another
                hashes (xxh3) and writes what is staged, then fsync (``StagedWrite``): raw
                write plus the staging copy and the hash on the same 2 cores, no IPC, no format
    raw files   raw write+fsync of as many bytes as aiockpt's DCP checkpoint holds: the
                tensors' bytes, then the rest in one write (torch.save's ~1 KiB of framing per
                tensor in the .distcp file, DCP's .metadata, the manifest): the write limit
                of the format
    aiockpt     Checkpointer.save_to, DCP layout: *blocking* until ``staged``, *durable*
                until the commit; *call* is the synchronous ``save_to`` call (planning), per
                tensor; *cpu* the CPU time the save took in the trainer and the worker
    aiockpt st  the same with ``format="safetensors"`` (a few bytes of header per tensor)

raw's *cpu* is its process's: on a shared machine a save cannot be durable sooner than its
CPU time over the cores it gets, which is what the ratio of the two cpu figures shows.

A benchmark, not a test: it prints figures and ratios and never fails on a threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks._common import (
    WORKLOADS,
    StagedWrite,
    format_size,
    median,
    raw_write,
    remove,
    tensors_of,
    torch_save,
)

DIR_PREFIX = "bench-shapes-"  # never "aiockpt*": the test suite's leak checker owns those


async def measure(name: str, state_dict: Any, directory: str, repeats: int) -> dict[str, float]:
    """Medians over ``repeats`` interleaved rounds after one warm-up round."""
    import aiockpt

    tensors = tensors_of(state_dict)
    copies = [torch.empty_like(t) for t in tensors]
    samples: dict[str, list[float]] = {}
    counter = 0

    def target() -> str:
        nonlocal counter
        counter += 1
        return os.path.join(directory, f"{name}-{counter}")

    async with aiockpt.Checkpointer(directory) as ckpt:
        await ckpt.start(like=state_dict)

        worker = ckpt.worker_pid
        assert worker is not None

        checkpoint_bytes = 0  # of the DCP checkpoint, learnt from its first save

        async def run_aiockpt() -> dict[str, float]:
            nonlocal checkpoint_bytes
            path = target()
            cpu = cpu_seconds(os.getpid()) + cpu_seconds(worker)
            started = time.perf_counter()
            handle = ckpt.save_to(state_dict, path)
            called = time.perf_counter()
            await handle.staged
            staged = time.perf_counter()
            await handle
            durable = time.perf_counter()
            cpu = cpu_seconds(os.getpid()) + cpu_seconds(worker) - cpu
            checkpoint_bytes = checkpoint_bytes or size_of(path)
            await asyncio.to_thread(remove, path)
            return {
                "aiockpt cpu": cpu,
                "aiockpt call us/tensor": (called - started) / len(tensors) * 1e6,
                "aiockpt blocking": staged - started,
                "aiockpt durable": durable - started,
            }

        async def run_aiockpt_safetensors() -> dict[str, float]:
            path = target()
            started = time.perf_counter()
            await ckpt.save_to(state_dict, path, format="safetensors")
            durable = time.perf_counter()
            await asyncio.to_thread(remove, path)
            return {"aiockpt st durable": durable - started}

        staged_write = StagedWrite(tensors)

        def raw_write_files(what: Any, path: str) -> None:
            tensor_bytes = sum(t.numel() * t.element_size() for t in what)
            raw_write(what, path, extra=max(0, checkpoint_bytes - tensor_bytes))

        async def run_memcpy() -> dict[str, float]:
            started = time.perf_counter()
            torch._foreach_copy_(copies, tensors)
            return {"memcpy": time.perf_counter() - started}

        async def run_sync(
            key: str, save: Callable[[Any, str], None], what: Any
        ) -> dict[str, float]:
            path = target()
            cpu = cpu_seconds(os.getpid())
            started = time.perf_counter()
            await asyncio.to_thread(save, what, path)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(os.getpid()) - cpu
            await asyncio.to_thread(remove, path)
            return {key: elapsed, f"{key} cpu": cpu}

        methods = [
            run_aiockpt,
            run_memcpy,
            run_aiockpt_safetensors,
            lambda: run_sync("raw write+fsync", raw_write, tensors),
            lambda: run_sync("raw files+fsync", raw_write_files, tensors),
            lambda: run_sync("staged write+fsync", staged_write, tensors),
            lambda: run_sync("torch.save+fsync", torch_save, state_dict),
        ]
        for round_ in range(repeats + 1):
            order = methods[round_ % len(methods) :] + methods[: round_ % len(methods)]
            for method in order:
                figures = await method()
                if round_:  # round 0 is the warm-up
                    for key, value in figures.items():
                        samples.setdefault(key, []).append(value)
    return {key: median(values) for key, values in samples.items()}


def size_of(path: str) -> int:
    """Bytes in the files under ``path``."""
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(title: str, count: int, nbytes: int, figures: dict[str, float]) -> None:
    print(f"\n{title}: {count} tensors, {format_size(nbytes)}")
    for key, value in figures.items():
        unit = "" if "us/" in key else " s"
        print(f"  {key:<24} {value:8.3f}{unit}")
    durable, raw = figures["aiockpt durable"], figures["raw write+fsync"]
    print(f"  durable / raw write      {durable / raw:8.2f}x")
    print(f"  durable / raw files      {durable / figures['raw files+fsync']:8.2f}x")
    staged_write = figures["staged write+fsync"]
    print(f"  staged write / raw write {staged_write / raw:8.2f}x")
    print(f"  durable / staged write   {durable / staged_write:8.2f}x")
    print(f"  st durable / raw write   {figures['aiockpt st durable'] / raw:8.2f}x")
    print(f"  durable / torch.save     {durable / figures['torch.save+fsync']:8.2f}x")
    print(f"  blocking / memcpy        {figures['aiockpt blocking'] / figures['memcpy']:8.2f}x")
    cpu_ratio = figures["aiockpt cpu"] / figures["raw write+fsync cpu"]
    print(f"  cpu / raw write cpu      {cpu_ratio:8.2f}x")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_shapes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm", help="where checkpoints are written")
    args = parser.parse_args(argv)
    for name in args.workloads.split(","):
        title, build = WORKLOADS[name]
        state_dict = build()
        tensors = tensors_of(state_dict)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        directory = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=args.dir)
        try:
            figures = asyncio.run(measure(name, state_dict, directory, args.repeats))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        report(title, len(tensors), nbytes, figures)


if __name__ == "__main__":
    main()
