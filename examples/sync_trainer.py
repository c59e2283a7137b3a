"""A plain synchronous training loop checkpointing through ``aiockpt.SyncCheckpointer``.

What it shows: no ``async`` anywhere in the trainer. ``aiockpt.SyncCheckpointer`` runs its
event loop and checkpoint worker in the background; the loop

* calls ``h = ckpt.save(state, step=step)``, which returns at once;
* runs the next batch's forward and backward pass while the tensors are copied out, and calls
  ``h.staged.result()`` only right before the optimizer step that changes them;
* never waits for a write: each checkpoint's line is printed once it is durable, checked with
  ``h.done()`` between steps, and ``ckpt.close()`` at the end lets the last writes finish;
* resumes from ``ckpt.load_latest()`` on start (model, optimizer, step), so running it again
  continues the step counter and the loss curve.

The model, data and checks are those of ``examples.async_trainer``: the two trainers write
the same checkpoints, and either can resume from the other's.

Run it twice to see it resume (it keeps its checkpoints under ``--root``)::

    python -m examples.sync_trainer --steps 40
    python -m examples.sync_trainer --steps 40       # continues from step 40 to 80

Exits non-zero if one of its own checks fails. ``--report FILE`` writes what happened as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

from torch import nn

import aiockpt
from examples.async_trainer import (
    build_model,
    build_optimizer,
    conclude,
    make_batch,
    parse_args,
    resume,
    training_state,
)

#: where the examples keep their checkpoints by default, so that a second run resumes
DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "examples-ckpt", "sync_trainer")


class Pending:
    """A checkpoint whose line is printed once it is durable."""

    def __init__(self, handle: aiockpt.SyncSaveHandle, step: int, loss: float) -> None:
        self.handle = handle
        self.step = step
        self.loss = loss
        self.waited_ms = 0.0

    def wait_staged(self) -> None:
        began = time.perf_counter()
        self.handle.staged.result()  # raises what the save raised, if it failed
        self.waited_ms = (time.perf_counter() - began) * 1e3

    def announce(self, report: dict[str, Any]) -> None:
        result = self.handle.result()  # committed and durable (blocks only if it is not yet)
        print(
            f"checkpoint step {self.step:6d}  loss {self.loss:.5f}  staged "
            f"{result.staging_seconds * 1e3:6.1f} ms (trainer waited {self.waited_ms:5.1f} ms)  "
            f"durable {result.total_seconds * 1e3:7.1f} ms  {result.nbytes / 1e6:6.2f} MB  "
            f"-> {os.path.basename(result.path)}",
            flush=True,
        )
        report["checkpoints"].append(
            {"step": self.step, "path": result.path, "loss": self.loss, "nbytes": result.nbytes}
        )


def train(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resume from the newest checkpoint under ``args.root``, train ``args.steps`` steps with
    checkpoints, and return a report and the live training state at the end."""
    model = build_model(args.width, args.hidden, args.seed)
    optimizer = build_optimizer(model, args.lr)
    report: dict[str, Any] = {"root": args.root, "losses": {}, "checkpoints": []}
    checks: dict[str, bool] = {}

    ckpt = aiockpt.SyncCheckpointer(args.root, keep_last=args.keep_last)
    try:
        began = time.perf_counter()
        ckpt.start()  # spawn the worker now rather than with the first save
        print(f"checkpoint worker started in {time.perf_counter() - began:.2f} s", flush=True)
        # --- resume ----------------------------------------------------------------------
        resumed_from = ckpt.latest()
        saved = ckpt.load_latest()
        start = resume(model, optimizer, saved, resumed_from, args.root, checks)
        end = start + args.steps

        # --- train -------------------------------------------------------------------------
        staging: Pending | None = None  # tensors maybe still being copied out
        writing: list[Pending] = []  # staged, maybe not durable yet
        loss_value = float("nan")
        for step in range(start + 1, end + 1):
            inputs, targets = make_batch(step, args.batch, args.width, args.seed)
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            if staging is not None:
                # The previous checkpoint's tensors were being copied out during the forward
                # and backward pass above; the optimizer step may change them only now.
                staging.wait_staged()
                writing.append(staging)
                staging = None
            optimizer.step()
            loss_value = loss.item()
            report["losses"][str(step)] = loss_value
            while writing and writing[0].handle.done():
                writing.pop(0).announce(report)
            if step % args.every == 0 or step == end:
                state = training_state(model, optimizer, step, loss_value)
                staging = Pending(ckpt.save(state, step=step), step, loss_value)
        if staging is not None:
            staging.wait_staged()
            writing.append(staging)
        for pending in writing:
            pending.announce(report)
        latest = ckpt.latest()
    finally:
        ckpt.close()  # lets saves in flight finish, then stops the worker and its loop

    report["start_step"], report["end_step"], report["latest"] = start, end, latest
    report["retained"] = sorted(n for n in os.listdir(args.root) if n.startswith("step_"))
    report["checks"] = checks
    return report, training_state(model, optimizer, end, loss_value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "python -m examples.sync_trainer", __doc__, DEFAULT_ROOT)
    report, live = train(args)
    return conclude(args, report, live)


if __name__ == "__main__":
    sys.exit(main())
