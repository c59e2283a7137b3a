"""Pipelined save against staging in one go, same run: two Checkpointers, alternating.

    python -m benchmarks.bench_pipeline [--repeats 7] [--dir /tmp]

A save of at least two ``staging.PIPELINE_CHUNK_BYTES`` chunks is sent to the worker before
its staging and staged chunk by chunk while the worker writes (the default). The second
Checkpointer plans its first save with the chunk size set out of reach, so its plans (reused
for every later save of the same structure) stage in one go, as before pipelining. Durable
time, medians, on the GPT + AdamW state and on 8,192 tensors. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from typing import Any

from benchmarks._common import gpt_adamw, many_tensors, remove


async def compare(label: str, state_dict: Any, repeats: int, parent: str) -> None:
    import aiockpt
    from aiockpt._trainer import staging

    directory = tempfile.mkdtemp(prefix="bench-pipeline-", dir=parent)
    durable: dict[str, list[float]] = {"pipelined": [], "one go": []}
    try:
        async with (
            aiockpt.Checkpointer(f"{directory}/a") as pipelined,
            aiockpt.Checkpointer(f"{directory}/b") as one_go,
        ):
            default = staging.PIPELINE_CHUNK_BYTES
            staging.PIPELINE_CHUNK_BYTES = 1 << 62  # only while one_go makes its plan
            try:
                await one_go.save_to(state_dict, f"{directory}/warm-b")
            finally:
                staging.PIPELINE_CHUNK_BYTES = default
            await pipelined.save_to(state_dict, f"{directory}/warm-a")
            for round_ in range(repeats):
                pair = [("pipelined", pipelined), ("one go", one_go)]
                for name, ckpt in pair if round_ % 2 == 0 else pair[::-1]:
                    path = f"{directory}/{round_}-{name.replace(' ', '-')}"
                    started = time.perf_counter()
                    await ckpt.save_to(state_dict, path)
                    durable[name].append(time.perf_counter() - started)
                    await asyncio.to_thread(remove, path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ours, theirs = (statistics.median(durable[k]) for k in ("pipelined", "one go"))
    print(f"{label:<40} pipelined {ours:6.3f} s   one go {theirs:6.3f} s   {ours / theirs:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where saves are written")
    args = parser.parse_args()
    workloads = [
        ("GPT 24x512 + AdamW, 1.0 GiB", gpt_adamw),
        ("256 MiB in 8,192 tensors", lambda: many_tensors(8192, 256 << 20)),
    ]
    for label, make in workloads:
        asyncio.run(compare(label, make(), args.repeats, args.dir))


if __name__ == "__main__":
    main()
