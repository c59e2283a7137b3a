"""A trainer as users write it, started by a real launcher (torchrun or aiockpt-run):
``launched.py SCENARIO OUT_DIR LOOP``.

The ranks join the default gloo group through the launcher's environment (``env://``), train
with collectives of their own, and checkpoint with a Checkpointer that starts lazily at its
first save. Each rank writes what it observed to ``OUT_DIR/result-<RANK>.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import torch
import torch.distributed as dist
import uvloop

from aiockpt import Checkpointer


def outcome(exc: BaseException | None) -> dict[str, Any]:
    if exc is None:
        return {"type": None}
    return {
        "type": type(exc).__name__,
        "rank": getattr(exc, "rank", None),
        "error_type": getattr(exc, "error_type", None),
        "message": str(exc),
    }


def train_step(weights: torch.Tensor) -> None:
    """A data-parallel step: the trainers' own collective on the default group."""
    grad = torch.ones_like(weights) * (dist.get_rank() + 1)
    dist.all_reduce(grad)
    weights -= 0.01 * grad


async def lazy_start(root: str, rank: int) -> dict[str, Any]:
    """The README's pattern: save without start(), await staged, keep training (running
    all_reduce) while the Checkpointer forms its group and starts its worker."""
    weights = torch.zeros(1024)
    results = []
    trainers_group = dist.distributed_c10d._get_default_group()
    collectives_before = trainers_group._get_sequence_number_for_group()
    async with Checkpointer(root, keep_last=2) as ckpt:
        for step in range(1, 31):
            train_step(weights)
            if step % 10 == 0:
                handle = ckpt.save({"w": weights, "step": step}, step=step)
                await handle.staged
                results.append(handle)
        paths = [(await handle).path for handle in results]
    return {
        "paths": paths,
        "w0": float(weights[0]),
        # Every collective on the trainers' group is one of train_step's 30 all_reduces.
        "collectives": trainers_group._get_sequence_number_for_group() - collectives_before,
    }


async def save_and_report(ckpt: Checkpointer, state: Any, step: int) -> dict[str, Any]:
    try:
        handle = ckpt.save(state, step=step)
    except Exception as exc:  # refused in the caller: still fails on the other ranks
        return {"raised_in_save": True, **outcome(exc)}
    try:
        await handle
    except Exception as exc:
        return {"raised_in_save": False, **outcome(exc)}
    return outcome(None)


async def failures(root: str, rank: int) -> dict[str, Any]:
    """Save 1 is refused by rank 1 in the caller (an entry that cannot be checkpointed),
    save 2 by rank 0, save 3 is cancelled by rank 1, save 4 is skipped by rank 1; save 5
    and 6 must work on every rank."""
    weights = torch.zeros(16)
    out: dict[str, Any] = {}
    async with Checkpointer(root, coordination_timeout_secs=6) as ckpt:
        bad: dict[str, Any] = {"w": weights, "opaque": object()}
        good: dict[str, Any] = {"w": weights}
        out["1"] = await save_and_report(ckpt, bad if rank == 1 else good, 1)
        train_step(weights)
        out["2"] = await save_and_report(ckpt, bad if rank == 0 else good, 2)
        train_step(weights)
        handle = ckpt.save(good, step=3)
        if rank == 1:
            handle.cancel()
        try:
            await handle
            out["3"] = outcome(None)
        except (Exception, asyncio.CancelledError) as exc:
            out["3"] = outcome(exc)
        train_step(weights)
        if rank == 0:
            out["4"] = await save_and_report(ckpt, good, 4)
        for step in (5, 6):
            train_step(weights)
            out[str(step)] = await save_and_report(ckpt, good, step)
    out["listing"] = sorted(p for p in os.listdir(root) if not p.startswith("."))
    return out


SCENARIOS: dict[str, Callable[[str, int], Awaitable[dict[str, Any]]]] = {
    "lazy_start": lazy_start,
    "failures": failures,
}


def main(argv: list[str]) -> int:
    scenario, out_dir, loop = argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        run = SCENARIOS[scenario](os.path.join(out_dir, "ckpt"), rank)
        result = uvloop.run(run) if loop == "uvloop" else asyncio.run(run)
        dist.barrier()  # the trainers' collectives still work after every save
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
