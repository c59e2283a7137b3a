"""Pipelined save against evenly chunked and one-go staging, same run: three Checkpointers,
in rotated order.

    python -m benchmarks.bench_pipeline [--repeats 7] [--dir /tmp]

A save of at least two ``staging.PIPELINE_CHUNK_BYTES`` chunks is sent to the worker before
its staging and staged chunk by chunk while the worker writes, the first chunk small
(``PIPELINE_FIRST_CHUNK_BYTES``), the next ones doubling: the default where the process has
``PIPELINE_MIN_CPUS``, and here whatever the CPUs, to measure what that gate is for. The other
Checkpointers plan their first save with other chunk sizes (their plans are reused for every
later save of the same structure): every chunk full-size, or one chunk (no pipelining).
Durable and blocking (until ``staged``) time, medians, on the GPT + AdamW state, on 8,192
tensors and on 64 x 16 MiB; the ratios are pipelined / the variant: pipelining trades some
blocking (the staging copy shares the cores with the worker's write) for durable time. A
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
from typing import Any

from benchmarks._common import gpt_adamw, many_tensors, remove

#: how each Checkpointer's plan stages: (first chunk, later chunks) in bytes, None: defaults
VARIANTS: dict[str, tuple[int, int] | None] = {
    "pipelined": None,  # a small first chunk, doubling up to PIPELINE_CHUNK_BYTES
    "even chunks": (32 << 20, 32 << 20),  # every chunk PIPELINE_CHUNK_BYTES (before)
    "one go": (1 << 62, 1 << 62),  # no pipelining (before that)
}


async def compare(label: str, state_dict: Any, repeats: int, parent: str) -> None:
    import aiockpt
    from aiockpt._trainer import staging

    directory = tempfile.mkdtemp(prefix="bench-pipeline-", dir=parent)
    durable: dict[str, list[float]] = {name: [] for name in VARIANTS}
    blocking: dict[str, list[float]] = {name: [] for name in VARIANTS}
    defaults = staging.PIPELINE_FIRST_CHUNK_BYTES, staging.PIPELINE_CHUNK_BYTES
    min_cpus = staging.PIPELINE_MIN_CPUS
    try:
        async with contextlib.AsyncExitStack() as stack:
            ckpts = {}
            for index, (name, chunks) in enumerate(VARIANTS.items()):
                ckpt = await stack.enter_async_context(aiockpt.Checkpointer(f"{directory}/{index}"))
                # Only while its first save makes the plan, which later saves reuse.
                first, later = chunks or defaults
                staging.PIPELINE_FIRST_CHUNK_BYTES, staging.PIPELINE_CHUNK_BYTES = first, later
                staging.PIPELINE_MIN_CPUS = 1
                try:
                    await ckpt.save_to(state_dict, f"{directory}/warm-{index}")
                finally:
                    staging.PIPELINE_FIRST_CHUNK_BYTES, staging.PIPELINE_CHUNK_BYTES = defaults
                    staging.PIPELINE_MIN_CPUS = min_cpus
                ckpts[name] = ckpt
            names = list(VARIANTS)
            for round_ in range(repeats):
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in order:
                    path = f"{directory}/{round_}-{name.replace(' ', '-')}"
                    started = time.perf_counter()
                    handle = ckpts[name].save_to(state_dict, path)
                    await handle.staged
                    blocking[name].append(time.perf_counter() - started)
                    await handle
                    durable[name].append(time.perf_counter() - started)
                    await asyncio.to_thread(remove, path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for what, samples in (("durable", durable), ("blocking", blocking)):
        medians = {name: statistics.median(times) for name, times in samples.items()}
        ours = medians["pipelined"]
        others = "   ".join(
            f"{name} {value:6.3f} s ({ours / value:4.2f}x)"
            for name, value in medians.items()
            if name != "pipelined"
        )
        print(f"{label:<30} {what:<8} pipelined {ours:6.3f} s   {others}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where saves are written")
    args = parser.parse_args()
    workloads = [
        ("GPT 24x512 + AdamW, 1.0 GiB", gpt_adamw),
        ("256 MiB in 8,192 tensors", lambda: many_tensors(8192, 256 << 20)),
        ("1 GiB in 64 tensors", lambda: many_tensors(64, 1 << 30)),
    ]
    for label, make in workloads:
        asyncio.run(compare(label, make(), args.repeats, args.dir))


if __name__ == "__main__":
    main()
