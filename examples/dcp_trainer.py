"""A torchtitan-style trainer written for ``torch.distributed.checkpoint``, switched to aiockpt
by changing one import line.

The trainer checkpoints the way torchtitan does: its state is ``Stateful`` objects (an app
state wrapping ``get_state_dict``/``set_state_dict`` of an FSDP2 model and its optimizer, and a
train state holding the step), saved every ``--every`` steps with ``dcp.async_save`` into
``<root>/step-<n>`` (waiting for the previous save's future first), and loaded on start with
``dcp.load`` from the newest ``step-<n>`` under the root, or from ``--initial-load-path``.
The only line that differs between the two ways is the import in ``checkpoint_module``::

    import torch.distributed.checkpoint as dcp      # torch's DCP
    import aiockpt.dcp as dcp                       # aiockpt's drop-in

Run it on one process, or on several under a launcher (gloo; FSDP2 shards the model)::

    python -m examples.dcp_trainer --checkpointing aiockpt --steps 8
    aiockpt-run --standalone --nproc-per-node 2 examples/dcp_trainer.py --checkpointing aiockpt

Either way can resume what the other wrote. ``--report FILE`` writes the losses (the mean over
ranks) and the checkpoints as JSON (from rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "examples-ckpt", "dcp_trainer")
WIDTH, HIDDEN, BATCH = 16, 32, 8


def checkpoint_module(checkpointing: str) -> ModuleType:
    """The checkpointing module the trainer calls ``dcp``: the one line that switches."""
    if checkpointing == "aiockpt":
        import aiockpt.dcp as dcp
    else:
        import torch.distributed.checkpoint as dcp
    return dcp


class AppState(Stateful):
    """Model and optimizer, as torch's DCP tutorial and torchtitan wrap them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optimizer_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


class TrainState(Stateful):
    """The step counter, as torchtitan's ``TrainState``."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])


def build_model(world_size: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WIDTH))
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    return model


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch for a (step, rank) in every run, so that resumed runs can be compared."""
    generator = torch.Generator().manual_seed(step * 1000 + rank)
    inputs = torch.randn(BATCH, WIDTH, generator=generator)
    return inputs, inputs.flip(-1) * 0.5


def latest_step_dir(root: str) -> str | None:
    """The newest ``step-<n>`` under ``root`` that torch's DCP finished (``.metadata``), as
    torchtitan finds it."""
    if not os.path.isdir(root):
        return None
    steps = [
        int(match[1])
        for name in os.listdir(root)
        if (match := re.fullmatch(r"step-(\d+)", name))
        and os.path.isfile(os.path.join(root, name, ".metadata"))
    ]
    return os.path.join(root, f"step-{max(steps)}") if steps else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.dcp_trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpointing", choices=["torch", "aiockpt"], default="aiockpt")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where step-<n> checkpoints go")
    parser.add_argument("--steps", type=int, default=8, help="train up to this step")
    parser.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    parser.add_argument(
        "--initial-load-path", help="resume from this checkpoint when --root has none"
    )
    parser.add_argument("--report", help="write losses and checkpoints here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dcp = checkpoint_module(args.checkpointing)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = build_model(world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_state = TrainState()
    state = {"app": AppState(model, optimizer), "train_state": train_state}
    # torchtitan's: torch's async_save runs the save's collectives in a background thread, so
    # they get a group of their own, away from the training loop's. (aiockpt runs none on
    # it; it only learns the ranks and the store from it.)
    checkpoint_group = dist.new_group(backend="gloo") if world_size > 1 else None

    load_from = latest_step_dir(args.root) or args.initial_load_path
    if load_from is not None:
        dcp.load(state, checkpoint_id=load_from)
        if rank == 0:
            print(f"resumed from {load_from} at step {train_state.step}")
    losses: dict[int, float] = {}
    checkpoints: list[str] = []
    future = None
    while train_state.step < args.steps:
        train_state.step += 1
        inputs, targets = make_batch(train_state.step, rank)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(mean)
            mean /= world_size
        losses[train_state.step] = mean.item()
        if train_state.step % args.every == 0:
            if future is not None:
                future.result()  # torchtitan waits for the previous save before the next
            path = os.path.join(args.root, f"step-{train_state.step}")
            future = dcp.async_save(state, checkpoint_id=path, process_group=checkpoint_group)
            checkpoints.append(path)
    if future is not None:
        future.result()
    if rank == 0:
        print(f"trained to step {train_state.step}; checkpoints: {checkpoints}")
        if args.report:
            with open(args.report, "w") as f:
                json.dump({"losses": losses, "checkpoints": checkpoints}, f)
    if world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
