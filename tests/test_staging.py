"""Staging arenas against a real worker: what stays mapped, and what needs no arena at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import aiockpt
from aiockpt import Checkpointer
from aiockpt._trainer.checkpoint_process import CheckpointProcessConfig
from aiockpt._wire.protocol import GcOptions
from tests.faults import arena_names, mapped_arenas

MIB = 1 << 20


def model_state(mib: int) -> dict[str, torch.Tensor]:
    """``mib`` MiB of fp32 in four tensors."""
    return {f"layer{i}.weight": torch.full((mib * MIB // 16,), float(i)) for i in range(4)}


async def test_growing_saves_leave_only_the_live_arena_mapped_in_the_worker(
    tmp_path: Path,
) -> None:
    """The layout grows save after save (the model, then the model and its optimizer state):
    each time the arena is replaced, and the worker must unmap the old one at once, without
    the garbage collector's help (automatic collection is off in the worker here). A worker
    that kept retired arenas mapped held N of them, which a 64 MiB /dev/shm could not."""
    config = CheckpointProcessConfig(gc=GcOptions(disable_automatic=True))
    model = model_state(8)
    async with Checkpointer(tmp_path, keep_last=1, config=config) as ckpt:
        for step, state in enumerate(
            [
                model,
                {"model": model, "optimizer": {"exp_avg": model_state(8)}},
                {"model": model, "optimizer": {"exp_avg": model_state(8), "sq": model_state(8)}},
                {"model": model_state(32)},
            ]
        ):
            await ckpt.save(state, step=step)
            worker = ckpt.worker_pid
            assert worker is not None
            ours = mapped_arenas(os.getpid())
            assert len(ours) == 1, f"save {step}: this process maps {len(ours)} arenas"
            theirs = mapped_arenas(worker)
            assert theirs == ours, f"save {step}: the worker maps {theirs}, the live one is {ours}"
        assert arena_names(os.getpid()) == []
    assert mapped_arenas(os.getpid()) == set()


@pytest.mark.parametrize("fmt", ["dcp", "safetensors"])
async def test_state_dict_of_only_empty_tensors_saves_and_loads(tmp_path: Path, fmt: str) -> None:
    """No tensor bytes, so no arena: the worker still gets every (empty) tensor."""
    state = {
        "empty": torch.empty(0),
        "rows": torch.zeros(0, 3, dtype=torch.bfloat16),
        "nested": {"ids": torch.empty(2, 0, dtype=torch.int64)},
        "step": 7,
    }
    path = tmp_path / "ck"
    async with Checkpointer(format=fmt) as ckpt:
        await ckpt.save_to(state, path)
    loaded: dict[str, Any] = aiockpt.load(path)
    assert loaded.keys() == state.keys() and loaded["step"] == 7
    for got, want in [
        (loaded["empty"], state["empty"]),
        (loaded["rows"], state["rows"]),
        (loaded["nested"]["ids"], state["nested"]["ids"]),
    ]:
        assert got.dtype == want.dtype and got.shape == want.shape
    if fmt == "dcp":  # torch's own loader reads it as well
        target = {"empty": torch.ones(0), "rows": torch.ones(0, 3, dtype=torch.bfloat16)}
        dcp.load(target, checkpoint_id=str(path), no_dist=True)
        assert target["rows"].shape == (0, 3)
    else:
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        tensors = safetensors.torch.load_file(str(path / files[0]))
        assert tensors["rows"].shape == (0, 3) and tensors["rows"].dtype == torch.bfloat16
