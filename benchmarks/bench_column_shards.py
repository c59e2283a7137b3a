"""Loading a tensor that 8 ranks saved column-sharded (DTensor ``Shard(1)``) as safetensors,
against the same tensor saved by one rank (the anchor, ratio 1.00).

    python -m benchmarks.bench_column_shards [--rows 2048] [--cols 4096] [--repeat 7]

The 8 ranks are threads of this process, each with its own RankGroup over a TCPStore on
127.0.0.1 (``tests.group_saves``), writing into ``/dev/shm``. Every method loads with
``verify=False`` (reads, not hashing), interleaved, medians:

    one rank             aiockpt.load of the 1-rank checkpoint (the whole, one read)
    8 ranks, whole       aiockpt.load of the 8-rank one: the pieces lie strided in one stored
                         whole, which is read once
    8 ranks, per piece   the same with that off (each piece read on its own, as a load does
                         for pieces it cannot join): each read spans most of the whole
    rank 3's piece       aiockpt.load(path, {"w": piece-shaped}, rank=3): one rank resuming
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import aiockpt
from aiockpt._format import loading
from aiockpt._format.commit import write_checkpoint
from aiockpt._wire.protocol import ShardSpec
from aiockpt.writers.safetensors import SafetensorsWriter
from benchmarks._common import median
from tests.group_saves import group_save

WORLD = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    whole = torch.randn(args.rows, args.cols)
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        states: list[dict[str, Any]] = []
        shards: list[dict[int, ShardSpec]] = []
        offset = 0
        for piece in whole.chunk(WORLD, 1):
            states.append({"w": piece.contiguous()})
            shards.append({0: ShardSpec(list(whole.shape), [0, offset])})
            offset += piece.shape[1]
        outcomes = group_save(root / "sharded", states, shards)
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
        write_checkpoint(SafetensorsWriter(), {"w": whole}, root / "one", format="safetensors")
        joined = loading._stored_whole

        def whole_load(path: Path, join: bool) -> Callable[[], float]:
            def run() -> float:
                loading._stored_whole = joined if join else (lambda used: None)  # type: ignore[assignment]
                try:
                    started = time.perf_counter()
                    loaded = aiockpt.load(path, verify=False)
                    seconds = time.perf_counter() - started
                finally:
                    loading._stored_whole = joined  # type: ignore[assignment]
                assert torch.equal(loaded["w"], whole)
                return seconds

            return run

        def piece_load() -> float:
            target = {"w": torch.empty_like(states[3]["w"])}
            started = time.perf_counter()
            aiockpt.load(root / "sharded", target, rank=3, verify=False)
            seconds = time.perf_counter() - started
            assert torch.equal(target["w"], states[3]["w"])
            return seconds

        methods = {
            "one rank": whole_load(root / "one", True),
            "8 ranks, whole": whole_load(root / "sharded", True),
            "8 ranks, per piece": whole_load(root / "sharded", False),
            "rank 3's piece": piece_load,
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeat):
            for name, method in methods.items():
                times[name].append(method())
        anchor = median(times["one rank"])
        print(f"{args.rows} x {args.cols} float32, {WORLD} ranks, Shard(1)")
        for name, values in times.items():
            seconds = median(values)
            print(f"{name:20s} {seconds * 1e3:8.1f} ms  {seconds / anchor:6.2f}x")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
