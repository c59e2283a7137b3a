"""An asyncio training loop that checkpoints without stopping, and resumes where it stopped.

What it shows:

* ``h = ckpt.save(state, step=step)`` with ``aiockpt.Checkpointer(root, keep_last=...)``
  returns at once; the next batch's forward and backward pass run while the worker's thread
  copies the tensors out, and ``await h.staged`` comes only right before the optimizer step
  that changes them;
* durability completes in the background: a reporter task per checkpoint awaits the handle and
  prints one line once the checkpoint is committed and durable;
* on start the loop resumes from ``await ckpt.load_latest()`` (model, optimizer, step), so
  running it again continues the step counter and the loss curve. Each step's batch is derived
  from the step number, so a run that was interrupted and resumed trains on exactly the batches
  an uninterrupted run would have seen;
* at the end the newest checkpoint is read back with torch's own
  ``torch.distributed.checkpoint.load`` and compared with the live model and optimizer.

Run it twice to see it resume (it keeps its checkpoints under ``--root``)::

    python -m examples.async_trainer --steps 40
    python -m examples.async_trainer --steps 40      # continues from step 40 to 80

Exits non-zero if one of its own checks fails. ``--report FILE`` writes what happened as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import aiockpt

#: where the examples keep their checkpoints by default, so that a second run resumes
DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "examples-ckpt", "async_trainer")


def build_model(width: int, hidden: int, seed: int = 0) -> nn.Module:
    """A small MLP, initialised the same way for a given seed."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def make_batch(
    step: int, batch: int, width: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic data of step ``step``: the same tensors whenever that step is trained, so a
    resumed run sees the batches an uninterrupted one would. The target is a fixed nonlinear
    function of the input, which the MLP can learn."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    inputs = torch.randn(batch, width, generator=generator)
    targets = torch.tanh(inputs.roll(1, dims=1) - 0.5 * inputs)
    return inputs, targets


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, loss: float
) -> dict[str, Any]:
    """What a checkpoint holds: enough to continue training exactly."""
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "step": step,
        "loss": loss,
    }


def states_equal(a: Any, b: Any) -> bool:
    """Exact equality of two nested state dicts (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def resume(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any] | None,
    resumed_from: str | None,
    root: str,
    checks: dict[str, bool],
) -> int:
    """Load ``saved`` (a training state, or None) into the model and optimizer; the step to
    continue from. Records whether the loaded state matches the checkpoint in ``checks``."""
    if saved is None:
        print(f"no checkpoint under {root}: starting from scratch", flush=True)
        return 0
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optim"])
    start = int(saved["step"])
    print(
        f"resumed from {resumed_from} at step {start} (loss there {saved['loss']:.5f})", flush=True
    )
    checks["resumed state matches the checkpoint"] = states_equal(
        training_state(model, optimizer, start, saved["loss"]), saved
    )
    return start


def zeros_like_state(state: Any) -> Any:
    """A template of ``state``'s layout with zeroed tensors, for ``dcp.load`` to fill."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(zeros_like_state(v) for v in state)
    return state


def dcp_load(path: str, template: Any) -> Any:
    """``torch.distributed.checkpoint.load`` into ``template`` in a single process."""
    with warnings.catch_warnings():
        # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(template, checkpoint_id=path, no_dist=True)
    return template


async def train(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resume from the newest checkpoint under ``args.root``, train ``args.steps`` steps with
    checkpoints, and return a report and the live training state at the end."""
    model = build_model(args.width, args.hidden, args.seed)
    optimizer = build_optimizer(model, args.lr)
    report: dict[str, Any] = {"root": args.root, "losses": {}, "checkpoints": []}
    checks: dict[str, bool] = {}

    async with aiockpt.Checkpointer(args.root, keep_last=args.keep_last) as ckpt:
        # --- resume ----------------------------------------------------------------------
        resumed_from = await ckpt.latest()
        saved = await ckpt.load_latest()
        start = resume(model, optimizer, saved, resumed_from, args.root, checks)
        report["start_step"] = start
        end = start + args.steps

        # --- train -------------------------------------------------------------------------
        async def announce(handle: aiockpt.SaveHandle, loss: float, waited_ms: float) -> None:
            result = await handle  # committed and durable
            print(
                f"checkpoint step {result.step:6d}  loss {loss:.5f}  staged "
                f"{result.staging_seconds * 1e3:6.1f} ms (trainer waited {waited_ms:5.1f} ms)  "
                f"durable {result.total_seconds * 1e3:7.1f} ms  {result.nbytes / 1e6:6.2f} MB  "
                f"-> {os.path.basename(result.path)}",
                flush=True,
            )
            report["checkpoints"].append(
                {"step": result.step, "path": result.path, "loss": loss, "nbytes": result.nbytes}
            )

        loss_value = float("nan")
        async with asyncio.TaskGroup() as reporters:

            async def staged(handle: aiockpt.SaveHandle, loss: float) -> None:
                """Wait until ``handle``'s tensors are copied out; report it when durable."""
                began = time.perf_counter()
                await handle.staged
                waited_ms = (time.perf_counter() - began) * 1e3
                reporters.create_task(announce(handle, loss, waited_ms))

            saving: tuple[aiockpt.SaveHandle, float] | None = None
            for step in range(start + 1, end + 1):
                inputs, targets = make_batch(step, args.batch, args.width, args.seed)
                loss = nn.functional.mse_loss(model(inputs), targets)
                optimizer.zero_grad()
                loss.backward()
                if saving is not None:
                    # The previous checkpoint's tensors were being copied out during the
                    # forward and backward pass above; the optimizer step may change them
                    # only once that copy is complete.
                    await staged(*saving)
                    saving = None
                optimizer.step()
                loss_value = loss.item()
                report["losses"][str(step)] = loss_value
                if step % args.every == 0 or step == end:
                    state = training_state(model, optimizer, step, loss_value)
                    saving = (ckpt.save(state, step=step), loss_value)
                await asyncio.sleep(0)  # the trainer's other tasks (reporters) run here
            if saving is not None:
                await staged(*saving)
        latest = await ckpt.latest()
        committed = await asyncio.to_thread(os.listdir, args.root)

    report["start_step"], report["end_step"], report["latest"] = start, end, latest
    report["retained"] = sorted(n for n in committed if n.startswith("step_"))
    report["checks"] = checks
    return report, training_state(model, optimizer, end, loss_value)


def check_final(args: argparse.Namespace, report: dict[str, Any], live: dict[str, Any]) -> None:
    """Read the newest checkpoint back with torch's DCP loader and with aiockpt's, and compare
    both with the live state; record the outcomes in ``report["checks"]`` and print them."""
    checks: dict[str, bool] = report["checks"]
    latest: str | None = report["latest"]
    end: int = report["end_step"]
    checks["newest checkpoint is the last step"] = latest is not None and latest.endswith(
        f"{end:010d}"
    )
    if latest is not None:
        loaded = dcp_load(latest, zeros_like_state(live))
        checks["torch's dcp.load reads the newest checkpoint back exactly"] = states_equal(
            loaded, live
        )
        checks["aiockpt.load agrees"] = states_equal(aiockpt.load(latest), live)
    checks[f"keep_last={args.keep_last} retained at most that many"] = (
        len(report["retained"]) <= args.keep_last
    )
    print(
        f"\nsteps {report['start_step'] + 1}..{end}, last loss {live['loss']:.5f}, "
        f"newest checkpoint {latest}"
    )
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'}  {name}")


def parse_args(
    argv: list[str] | None,
    prog: str = "python -m examples.async_trainer",
    doc: str = __doc__,
    root: str = DEFAULT_ROOT,
) -> argparse.Namespace:
    """The flags both trainers take (``sync_trainer`` passes its own name, docstring, root)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--root", default=root, help="checkpoint directory (resumed from)")
    parser.add_argument("--steps", type=int, default=40, help="steps to train in this run")
    parser.add_argument(
        "--every", type=int, default=10, help="checkpoint every N steps (and at the end)"
    )
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--width", type=int, default=256, help="input and output features")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden features")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default=None, help="write a JSON report to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.keep_last < 1:
        parser.error("--steps, --every and --keep-last must be at least 1")
    return args


def conclude(args: argparse.Namespace, report: dict[str, Any], live: dict[str, Any]) -> int:
    """Check the final checkpoint, write the report; the exit code (0: every check passed)."""
    check_final(args, report, live)
    if args.report is not None:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["checks"] and all(report["checks"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report, live = asyncio.run(train(args))
    return conclude(args, report, live)


if __name__ == "__main__":
    sys.exit(main())
