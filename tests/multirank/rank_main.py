"""One trainer rank of a multi-rank test:
``python -m tests.multirank.rank_main SCENARIO RANK WORLD STORE_PORT ROOT LOOP [PATH]``.

Joins the trainers' gloo process group through the test's ``TCPStore`` on 127.0.0.1, runs the
scenario on the ``LOOP`` event loop ("asyncio" or "uvloop") and writes what it observed to
``ROOT/result-<RANK>.json`` for the test to check; checkpoints go under ``ROOT/ckpt``, and the
load scenarios read ``PATH``.

``SCENARIO`` ``many`` with ``PATH`` a JSON list of ``[name, path or null]`` runs those
scenarios one after the other in this one process and group (one launch, one torch import
per rank, for several read-only checks): each saves under ``ROOT/<name>/ckpt`` or reads its
path, and the result file maps each name to its observations.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import uvloop

import aiockpt
from aiockpt import Checkpointer, CoordinationError, WorkerCrashed
from tests.multirank.hf_scenarios import column_shards, hf_save
from tests.multirank.writers import expected_sum
from tests.writer_fixtures import wait_for

ROWS = 8
COLS = 3


def full(name: str) -> torch.Tensor:
    """The whole of a tensor the DTensor scenarios shard, the same in every process."""
    seed = {"w": 1.0, "a": 1000.0, "b": 2000.0}[name]
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + seed


def replicated_state(step: int, rank: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(step)  # the same on every rank
    return {
        "model": {
            "w": torch.randn(64, 32, generator=generator),
            "b": torch.randn(32, generator=generator),
        },
        "rank_value": rank,
        "step": step,
    }


def listing(root: str) -> list[str]:
    """What is under ``root`` but the writer lock file, which rank 0 holds (and removes at its
    close) while another rank may already be looking."""
    return sorted(name for name in os.listdir(root) if not name.startswith("."))


def describe_error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "rank": getattr(exc, "rank", None),
        "error_type": getattr(exc, "error_type", None),
        "message": str(exc),
    }


async def replicated(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with Checkpointer(ckpt_root, keep_last=2) as ckpt:
        assert ckpt.group is not None
        out["prefix"] = ckpt.group.prefix
        for step in (1, 2, 3):
            handle = ckpt.save(replicated_state(step, rank), step=step)
            await handle.staged
            result = await handle
            out[f"path_{step}"] = result.path
        out["latest"] = await ckpt.latest()
        loaded = await ckpt.load_latest()
        out["loaded_rank_value"] = loaded["rank_value"]
        out["loaded_matches"] = bool(
            torch.equal(loaded["model"]["w"], replicated_state(3, rank)["model"]["w"])
        )
    if rank == 0:  # one rank alone, as when publishing weights for inference
        published = os.path.join(os.path.dirname(ckpt_root), "published")
        result = await aiockpt.async_save(
            replicated_state(3, rank)["model"], published, format="safetensors", no_dist=True
        )
        await aiockpt.default_checkpointer(no_dist=True).close()
        out["published"] = result.path
    out["listing"] = listing(ckpt_root)
    return out


async def dtensor_save(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    state = {
        "w": distribute_tensor(full("w"), mesh, [Shard(0)]),
        "a": distribute_tensor(full("a"), mesh_2d, [Shard(0), Replicate()]),
        "b": distribute_tensor(full("b"), mesh_2d, [Replicate(), Shard(0)]),
        "rank_value": rank,
    }
    async with Checkpointer(ckpt_root) as ckpt:
        result = await ckpt.save(state, step=1)
        target = {
            key: torch.zeros_like(value) if isinstance(value, torch.Tensor) else value
            for key, value in state.items()
        }
        await ckpt.load_latest(target)
    return {
        "path": result.path,
        "local_w": state["w"].to_local().tolist(),
        "reloaded_own_shards": all(
            torch.equal(target[k].to_local(), state[k].to_local()) for k in ("w", "a", "b")
        ),
    }


async def dtensor_load(ckpt_path: str, rank: int, world: int) -> dict[str, Any]:
    """Load a checkpoint of ``full("w")`` into this world size, sharded on dim 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    expected = distribute_tensor(full("w"), mesh, [Shard(0)])
    target = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])}
    await asyncio.to_thread(dcp.load, target, checkpoint_id=ckpt_path)
    return {
        "matches": bool(torch.equal(target["w"].to_local(), expected.to_local())),
        "local_rows": target["w"].to_local().shape[0],
    }


EMB_ROWS, EMB_COLS = 97, 48  # rows that no world size here divides evenly


def reshard_full() -> dict[str, torch.Tensor]:
    """The whole tensors of the resharding scenarios: ``emb`` is saved sharded on dim 0,
    ``bias`` as a plain (replicated) tensor."""
    generator = torch.Generator().manual_seed(97)
    return {
        "emb": torch.randn(EMB_ROWS, EMB_COLS, generator=generator),
        "bias": torch.randn(EMB_COLS, generator=generator),
    }


async def reshard_save(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    whole = reshard_full()
    mesh = init_device_mesh("cpu", (world,))
    state = {"emb": distribute_tensor(whole["emb"], mesh, [Shard(0)]), "bias": whole["bias"]}
    async with Checkpointer(ckpt_root) as ckpt:
        result = await ckpt.save({**state, "step": 7}, step=7)
    return {"path": result.path, "local_rows": state["emb"].to_local().shape[0]}


async def reshard_load(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    """Resume from ``ckpt_root``'s latest checkpoint at this world size, into DTensors
    sharded on dim 0 and a plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    whole = reshard_full()
    mesh = init_device_mesh("cpu", (world,))
    expected = distribute_tensor(whole["emb"], mesh, [Shard(0)]).to_local()
    target = {
        "emb": distribute_tensor(torch.zeros(EMB_ROWS, EMB_COLS), mesh, [Shard(0)]),
        "bias": torch.zeros(EMB_COLS),
        "step": -1,
    }
    ckpt = Checkpointer(ckpt_root)
    try:
        await ckpt.load_latest(target)
    finally:
        await ckpt.close()
    return {
        "local_rows": target["emb"].to_local().shape[0],
        "emb_matches": bool(torch.equal(target["emb"].to_local(), expected)),
        "bias_matches": bool(torch.equal(target["bias"], whole["bias"])),
        "step": target["step"],
    }


async def failure(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fmt = "tests.multirank.writers:FailingOnRankDcpWriter"
    async with Checkpointer(ckpt_root, format=fmt) as ckpt:
        state = replicated_state(1, rank)
        try:
            await ckpt.save({**state, "fail_on_rank": 1}, step=1)
        except Exception as exc:
            out["first"] = describe_error(exc)
            out["first_traceback"] = getattr(exc, "traceback", None) or ""
        out["listing_after_failure"] = listing(ckpt_root)
        result = await ckpt.save({**state, "fail_on_rank": -1}, step=2)
        out["second"] = result.path
    out["listing"] = listing(ckpt_root)
    return out


async def kill_worker(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sums = "tests.multirank.writers:AllReduceWriter"
    async with Checkpointer(
        ckpt_root, format="tests.multirank.writers:HeldDcpWriter", coordination_timeout_secs=60
    ) as ckpt:
        x = torch.full((2,), float(rank + 1))
        # The workers' process group exists from start-up on.
        await ckpt.save_to({"x": x}, os.path.join(ckpt_root, "sum_before"), format=sums)
        first_pid = ckpt.worker_pid
        gate = f"{ckpt_root}.gate"  # beside the root: not in its listing
        handle = ckpt.save({**replicated_state(1, rank), "gate": gate}, step=1)
        await handle.staged
        if rank == 1:
            assert first_pid is not None
            # killed while held in the middle of the save; then the other worker goes on
            await asyncio.to_thread(wait_for, f"{gate}.started-{first_pid}")
            os.kill(first_pid, signal.SIGKILL)
            await asyncio.to_thread(Path(f"{gate}.go").touch)
        killed_at = time.monotonic()
        try:
            await handle
        except Exception as exc:
            out["first"] = describe_error(exc)
        out["seconds_to_fail"] = time.monotonic() - killed_at
        out["listing_after_failure"] = listing(ckpt_root)
        result = await ckpt.save(replicated_state(2, rank), step=2)
        out["second"] = result.path
        out["respawned"] = ckpt.worker_pid != first_pid
        # ... and once the save after a crash is answered, again with the new worker in it.
        await ckpt.save_to({"x": x}, os.path.join(ckpt_root, "sum_after"), format=sums)
    out["sums"] = {
        name: sorted(os.listdir(os.path.join(ckpt_root, name)))
        for name in ("sum_before", "sum_after")
    }
    out["sum_values"] = read_sums(Path(ckpt_root, "sum_after"))
    out["expected_sum"] = expected_sum(world)
    return out


def read_sums(directory: Path) -> list[Any]:
    return [json.loads(f.read_text()) for f in directory.glob("sum-*")]


async def late_rank(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    gave_up = f"{ckpt_root}.rank0-gave-up"  # beside the root: not in its listing
    async with Checkpointer(ckpt_root, coordination_timeout_secs=4) as ckpt:
        if rank == 1:  # late: it comes once rank 0 has given up on it
            await asyncio.to_thread(wait_for, gave_up)
        started = time.monotonic()
        try:
            await ckpt.save(replicated_state(1, rank), step=1)
        except CoordinationError as exc:
            out["first"] = describe_error(exc)
        out["seconds_to_fail"] = time.monotonic() - started
        if rank == 0:
            await asyncio.to_thread(Path(gave_up).touch)
        result = await ckpt.save(replicated_state(2, rank), step=2)
        out["second"] = result.path
    out["listing"] = listing(ckpt_root)
    return out


async def start_only(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    try:
        async with Checkpointer(ckpt_root):
            pass
    except Exception as exc:
        return {"error": describe_error(exc)}
    return {"error": None}


SCENARIOS: dict[str, Callable[[str, int, int], Awaitable[dict[str, Any]]]] = {
    "replicated": replicated,
    "dtensor_save": dtensor_save,
    "dtensor_load": dtensor_load,
    "reshard_save": reshard_save,
    "reshard_load": reshard_load,
    "failure": failure,
    "kill_worker": kill_worker,
    "late_rank": late_rank,
    "start_only": start_only,
    "hf_save": hf_save,
    "column_shards": column_shards,
}


#: the scenarios that read the path given instead of saving under the root
LOAD_SCENARIOS = ("dtensor_load", "reshard_load")


def main(argv: list[str]) -> int:
    scenario, rank, world, port, root, loop = argv[1:7]
    rank_, world_ = int(rank), int(world)
    if scenario == "many":
        planned = [
            (name, path or os.path.join(root, name, "ckpt")) for name, path in json.loads(argv[7])
        ]
    else:
        target = argv[7] if scenario in LOAD_SCENARIOS else os.path.join(root, "ckpt")
        planned = [(scenario, target)]
    store = dist.TCPStore(
        "127.0.0.1", int(port), is_master=False, timeout=datetime.timedelta(seconds=60)
    )
    dist.init_process_group("gloo", store=store, rank=rank_, world_size=world_)
    observed: dict[str, Any] = {}
    try:
        for name, target in planned:
            run = SCENARIOS[name](target, rank_, world_)
            observed[name] = uvloop.run(run) if loop == "uvloop" else asyncio.run(run)
    except WorkerCrashed as exc:  # pragma: no cover - reported to the test as a failure
        observed = {name: {"crashed": str(exc)} for name, _ in planned}
    finally:
        dist.destroy_process_group()
    result = observed if scenario == "many" else observed[scenario]
    with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
