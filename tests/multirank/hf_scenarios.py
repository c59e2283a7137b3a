"""Multi-rank scenarios of the Hugging Face layout (run by ``tests.multirank.rank_main``)."""

from __future__ import annotations

from typing import Any

import torch

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


async def hf_save(ckpt_root: str, rank: int, world: int) -> dict[str, Any]:
    """Save the tiny GPT-2 from every rank as safetensors: most tensors replicated, the
    embedding a DTensor sharded by rows, an MLP weight one sharded by columns."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = dict(tiny_gpt2().state_dict())
    for name, dim in (("transformer.wte.weight", 0), ("transformer.h.0.mlp.c_fc.weight", 1)):
        state[name] = distribute_tensor(state[name].detach().clone(), mesh, [Shard(dim)])
    async with Checkpointer(
        ckpt_root, format="safetensors", writer_options={"max_shard_size": MAX_SHARD_SIZE}
    ) as ckpt:
        result = await ckpt.save(state, step=1)
    return {"path": result.path}
