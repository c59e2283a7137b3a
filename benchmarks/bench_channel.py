"""Channel and start-up costs: aiockpt vs torch's experimental CheckpointProcess.

    python -m benchmarks.bench_channel [--pings 2000] [--spawns 5]

1. PING round trip over the aiockpt channel (socketpair + msgspec frames, on asyncio and on
   uvloop) vs a pickled request/response round trip over ``multiprocessing.Pipe`` to a spawned
   echo process (what torch's CheckpointProcess does for each request).
2. Spawn + handshake until the first write could be sent: ``await CheckpointProcess.start()``
   vs constructing torch's ``CheckpointProcess`` and waiting for its creation future.
Repeats are interleaved so that machine noise hits both sides alike; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import uvloop
from torch.multiprocessing.spawn import ProcessExitedException

from aiockpt._trainer.checkpoint_process import CheckpointProcess


@dataclass
class _PickledRequest:
    request_type: str
    payload: dict[str, Any]


def _pipe_echo(conn: Connection) -> None:
    while True:
        request = conn.recv()
        if request.request_type == "exit":
            return
        conn.send(_PickledRequest("ping", {}))


class NullWriter:
    """A writer for start-up timing: both sides build one, neither writes."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    def write(self, *args: Any, **kwargs: Any) -> None:
        pass


def noop_init(*args: Any) -> None:
    pass


def pipe_round_trips(n: int) -> list[float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_echo, args=(child,), daemon=True)
    proc.start()
    child.close()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        parent.send(_PickledRequest("ping", {}))
        parent.recv()
        samples.append(time.perf_counter() - started)
    parent.send(_PickledRequest("exit", {}))
    proc.join()
    return samples


async def aiockpt_round_trips(n: int) -> list[float]:
    async with CheckpointProcess(checkpoint_writer_init_fn=NullWriter) as proc:
        return [await proc.ping() for _ in range(n)]


async def aiockpt_start() -> float:
    proc = CheckpointProcess(subprocess_init_fn=noop_init, checkpoint_writer_init_fn=NullWriter)
    started = time.perf_counter()
    await proc.start()
    elapsed = time.perf_counter() - started
    await proc.close()
    return elapsed


def torch_start() -> float:
    from torch.distributed.checkpoint._experimental.checkpoint_process import (
        CheckpointProcess as TorchCheckpointProcess,
    )
    from torch.distributed.checkpoint._experimental.checkpoint_process import (
        CheckpointProcessConfig as TorchConfig,
    )
    from torch.distributed.checkpoint._experimental.types import RankInfo as TorchRankInfo

    started = time.perf_counter()
    proc = TorchCheckpointProcess(
        TorchRankInfo(global_rank=0, global_world_size=1),
        TorchConfig(),
        noop_init,
        (),
        NullWriter,
        {},
    )
    proc.process_creation_future.result()
    elapsed = time.perf_counter() - started
    try:
        proc.close()
    except ProcessExitedException as exc:  # torch's close sometimes reports its own child's exit
        print(f"  (torch CheckpointProcess.close raised: {exc})")
    return elapsed


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def run_on(runner: str, coro_fn: Callable[[], Any]) -> Any:
    return uvloop.run(coro_fn()) if runner == "uvloop" else asyncio.run(coro_fn())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--spawns", type=int, default=5)
    args = parser.parse_args()

    rtt: dict[str, list[float]] = {"asyncio": [], "uvloop": [], "pipe": []}
    for _ in range(3):  # interleaved rounds
        rtt["pipe"] += pipe_round_trips(args.pings)
        for runner in ("asyncio", "uvloop"):
            rtt[runner] += run_on(runner, lambda: aiockpt_round_trips(args.pings))
    print(f"PING round trip, median of {3 * args.pings} (lower is better)")
    pipe = median_us(rtt["pipe"])
    print(f"  torch-style pickled mp.Pipe     {pipe:8.1f} us")
    for runner in ("asyncio", "uvloop"):
        ours = median_us(rtt[runner])
        ratio = ours / pipe
        print(f"  aiockpt channel on {runner:8s}     {ours:8.1f} us   ({ratio:.2f}x the pipe)")

    starts: dict[str, list[float]] = {"aiockpt": [], "torch": []}
    for _ in range(args.spawns):
        starts["torch"].append(torch_start())
        starts["aiockpt"].append(run_on("uvloop", aiockpt_start))
    ours, theirs = (statistics.median(starts[k]) for k in ("aiockpt", "torch"))
    print(f"\nSpawn + handshake, median of {args.spawns}")
    print(f"  torch experimental CheckpointProcess  {theirs:6.3f} s")
    print(f"  aiockpt CheckpointProcess.start()     {ours:6.3f} s  ({ours / theirs:.2f}x)")


if __name__ == "__main__":
    main()
