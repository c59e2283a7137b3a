"""Multi-rank scenarios of the Hugging Face layout (run by ``tests.multirank.rank_main``)."""

from __future__ import annotations

import asyncio
import functools
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import torch

import aiockpt
from aiockpt import Checkpointer

#: small enough that the tiny model below spans several files
MAX_SHARD_SIZE = "20KB"


def tiny_gpt2() -> Any:
    """A tiny GPT-2 built from a config (no download), the same weights in every process."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def _local(value: torch.Tensor) -> torch.Tensor:
    to_local = getattr(value, "to_local", None)
    return to_local() if callable(to_local) else value


def _same_locals(loaded: Any, state: dict[str, Any]) -> bool | str:
    """Whether every tensor of ``loaded`` is this rank's piece of ``state`` (or why not)."""
    for name, value in state.items():
        got = _local(loaded[name])
        want = _local(value)
        if got.shape != want.shape or not torch.equal(got, want):
            return f"{name}: got {list(got.shape)}, want {list(want.shape)}"
    return True


#: the tensors ``hf_save`` shards, and along which dimension
SHARDED = {"transformer.wte.weight": 0, "transformer.h.0.mlp.c_fc.weight": 1}


async def hf_save(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    """Save the tiny GPT-2 from every rank as safetensors: most tensors replicated, the
    embedding a DTensor sharded by rows, an MLP weight one sharded by columns."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = dict(tiny_gpt2().state_dict())
    for name, dim in SHARDED.items():
        state[name] = distribute_tensor(state[name].detach().clone(), mesh, [Shard(dim)])
    async with Checkpointer(
        ckpt_root, format="safetensors", writer_options={"max_shard_size": MAX_SHARD_SIZE}
    ) as ckpt:
        result = await ckpt.save(state, step=1)
        # Each rank resumes its own pieces (the column piece too) into tensors of their shape.
        sharded = {name: state[name] for name in SHARDED}
        loaded = await ckpt.load_latest(
            {k: torch.zeros_like(_local(v)) for k, v in sharded.items()}
        )
    return {"path": result.path, "own_pieces": _same_locals(loaded, sharded)}


#: the tensors of ``column_shards``: name -> whole shape. Chosen so that no world size here
#: splits a sharded dimension evenly (DTensor's pieces are then of different sizes).
COLUMN_SHAPES: dict[str, tuple[int, ...]] = {
    "cols": (5, 7),  # Shard(1): 4 + 3 columns
    "cube": (3, 5, 4),  # Shard(1) of 3 dimensions: the middle one, 3 + 2
    "grid": (6, 5),  # on a 2-D mesh (1 x world): Shard(0) over 1, Shard(1) over world
    "rows": (5, 3),  # Shard(0): the case that always worked, for comparison
    "bias": (7,),  # a plain tensor on every rank (replicated)
}


def column_whole(name: str) -> torch.Tensor:
    """The whole of a ``column_shards`` tensor, the same in every process."""
    shape = COLUMN_SHAPES[name]
    offset = 1000.0 * list(COLUMN_SHAPES).index(name)
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + offset


def column_state(world: int) -> dict[str, Any]:
    """This rank's state dict of ``column_shards``: DTensors sharded along dimensions other
    than 0, one on a 2-D mesh, one sharded by rows, and a plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    return {
        "cols": distribute_tensor(column_whole("cols"), mesh, [Shard(1)]),
        "cube": distribute_tensor(column_whole("cube"), mesh, [Shard(1)]),
        "grid": distribute_tensor(column_whole("grid"), mesh_2d, [Shard(0), Shard(1)]),
        "rows": distribute_tensor(column_whole("rows"), mesh, [Shard(0)]),
        "bias": column_whole("bias"),
    }


async def column_shards(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    """Save DTensors sharded along other dimensions than 0 from every rank, as safetensors
    and as DCP, then reload on this rank every way a rank resumes: into plain tensors of
    its pieces' shapes, into DTensors, without a target, and mapped. Each check's outcome
    (True, or what went wrong) goes back to the test."""
    state = column_state(world)
    dcp_path = os.path.join(os.path.dirname(ckpt_root), "dcp")
    checks: dict[str, bool | str] = {}

    async def check(name: str, load: Callable[[], Awaitable[Any]]) -> None:
        try:
            checks[name] = _same_locals(await load(), state)
        except Exception as exc:  # reported to the test, which fails naming it
            checks[name] = f"{type(exc).__name__}: {exc}"

    def pieces() -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(_local(value)) for name, value in state.items()}

    def dtensors() -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(value) for name, value in state.items()}

    async with Checkpointer(ckpt_root, format="safetensors") as ckpt:
        result = await ckpt.save(state, step=1)
        await ckpt.save_to(state, dcp_path, format="dcp")
        for fmt, path in (("safetensors", result.path), ("dcp", dcp_path)):
            own = functools.partial(asyncio.to_thread, aiockpt.load, path, rank=rank)
            await check(f"{fmt}: plain pieces with rank", lambda own=own: own(pieces()))
            await check(f"{fmt}: own pieces without a target", own)
            await check(f"{fmt}: own pieces mapped", functools.partial(own, mmap=True))
            await check(
                f"{fmt}: DTensors",
                lambda path=path: asyncio.to_thread(aiockpt.load, path, dtensors()),
            )
        await check(
            "safetensors: load_latest into plain pieces", lambda: ckpt.load_latest(pieces())
        )
    return {
        "path": result.path,
        "dcp_path": dcp_path,
        "checks": checks,
        # this rank's pieces as it held them, for the test to find in the file
        "pieces": {name: _local(state[name]).tolist() for name in ("cols", "cube")},
    }
