"""Two ranks saving 1 GiB in total: aiockpt's Checkpointer against torch's
``dcp.async_save(..., async_checkpointer_type=PROCESS)``.

    python -m benchmarks.bench_multirank [--total 1G] [--steady 5] [--dir /dev/shm]

Each rank holds half of every tensor (DTensor ``Shard(0)``, FSDP2-style), in 32 tensors. For
each method the run measures the *first* save (a fresh Checkpointer / a fresh process
executor: worker spawn, process-group set-up, first arena, included) and the *steady* state
(median over ``--steady`` saves, the methods interleaved). *Blocking* is the time until the
trainer may touch its tensors again (``await handle.staged`` / ``dcp.async_save`` returning),
*durable* until the checkpoint is committed and fsynced on every rank. The ranks start every
save together (a barrier on the trainers' group) and the figures are rank 0's.

The run is done twice, each method going first once, so that neither "first" benefits from
the other having warmed imports and page caches; each method's first save is taken from the
run where it went first.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import format_size, median, parse_size

TENSORS = 32
METHODS = ("aiockpt", "torch-process")


def rank_main(args: argparse.Namespace) -> None:
    """One trainer rank: build its shards, run both methods, write its timings."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import aiockpt

    store = dist.TCPStore(
        "127.0.0.1", args.port, is_master=False, timeout=datetime.timedelta(seconds=600)
    )
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    rows = args.total // TENSORS // 4 // 1024
    state = {
        f"layer{i}": distribute_tensor(torch.randn(rows, 1024), mesh, [Shard(0)])
        for i in range(TENSORS)
    }
    timings: dict[str, list[tuple[float, float]]] = {method: [] for method in METHODS}
    counter = iter(range(10_000))

    def target() -> str:
        return os.path.join(args.dir, f"save_{next(counter)}")

    def discard(path: str) -> None:
        dist.barrier()
        if args.rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    def torch_save() -> tuple[float, float]:
        path = target()
        dist.barrier()
        started = time.perf_counter()
        future = dcp.async_save(
            state, checkpoint_id=path, async_checkpointer_type=AsyncCheckpointerType.PROCESS
        )
        blocking = time.perf_counter() - started
        future.result()
        durable = time.perf_counter() - started
        discard(path)
        return blocking, durable

    async def aiockpt_save(ckpt: aiockpt.Checkpointer) -> tuple[float, float]:
        path = target()
        await asyncio.to_thread(dist.barrier)
        started = time.perf_counter()
        handle = ckpt.save_to(state, path)
        await handle.staged
        blocking = time.perf_counter() - started
        await handle
        durable = time.perf_counter() - started
        await asyncio.to_thread(discard, path)
        return blocking, durable

    async def run() -> None:
        async with aiockpt.Checkpointer() as ckpt:
            for method in args.order.split(","):
                if method == "aiockpt":
                    timings[method].append(await aiockpt_save(ckpt))
                else:
                    timings[method].append(await asyncio.to_thread(torch_save))
            for _ in range(args.steady):
                for method in args.order.split(","):
                    if method == "aiockpt":
                        timings[method].append(await aiockpt_save(ckpt))
                    else:
                        timings[method].append(await asyncio.to_thread(torch_save))

    asyncio.run(run())
    dist.destroy_process_group()
    with open(os.path.join(args.results, f"rank{args.rank}.json"), "w") as f:
        json.dump(timings, f)


def launch(args: argparse.Namespace, order: str, results: str) -> dict[str, Any]:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    command = [sys.executable, "-m", "benchmarks.bench_multirank", "--port", str(store.port)]
    command += ["--total", str(args.total), "--steady", str(args.steady), "--dir", args.dir]
    command += ["--order", order, "--results", results]
    ranks = [subprocess.Popen([*command, "--rank", str(r)], env=env) for r in range(2)]
    for process in ranks:
        if process.wait() != 0:
            raise SystemExit(f"a rank failed ({process.returncode})")
    result: dict[str, Any] = json.loads(Path(results, "rank0.json").read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--steady", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--order", default=",".join(METHODS))
    parser.add_argument("--results", default="")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-multirank-", dir=args.dir) as scratch:
        args.dir = scratch
        runs = {}
        for order in (METHODS, tuple(reversed(METHODS))):
            results = tempfile.mkdtemp(dir=scratch)
            runs[order[0]] = launch(args, ",".join(order), results)
    print(f"2 ranks, {format_size(args.total)} in total ({TENSORS} tensors, Shard(0)), "
          f"{args.steady} steady saves per method per run, medians of both runs")  # fmt: skip
    print(f"{'method':<15}{'first blocking':>16}{'first durable':>15}"
          f"{'steady blocking':>17}{'steady durable':>16}")  # fmt: skip
    rows = {}
    for method in METHODS:
        first = runs[method][method][0]
        steady = [t for run in runs.values() for t in run[method][1:]]
        rows[method] = (
            first[0], first[1], median([b for b, _ in steady]), median([d for _, d in steady])
        )  # fmt: skip
        print(f"{method:<15}" + "".join(f"{v:>15.3f}s" for v in rows[method]))
    ours, theirs = rows["aiockpt"], rows["torch-process"]
    print("torch / aiockpt: " + ", ".join(
        f"{name} {t / o:.1f}x" for name, t, o in zip(
            ("first blocking", "first durable", "steady blocking", "steady durable"),
            theirs, ours, strict=True,
        )
    ))  # fmt: skip


if __name__ == "__main__":
    main()
