"""`make demo`: a small model trained in an asyncio loop, checkpointed without stopping.

Trains a few-million-parameter MLP on a synthetic task, saves every few steps through one
persistent checkpoint worker (awaiting only ``staged`` before the next optimizer step), then
resumes a fresh model from ``latest()`` and checks it against the live one with torch's own
``torch.distributed.checkpoint.load``. Exits non-zero if any check fails.

    python -m examples.demo [--steps 60] [--every 10] [--root DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import aiockpt


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))


async def train(root: str, steps: int, every: int) -> int:
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = torch.randn(64, 512)
    targets = inputs.roll(1, dims=1)
    blocking_ms: list[float] = []
    durable_ms: list[float] = []
    pending: list[aiockpt.SaveHandle] = []
    async with aiockpt.Checkpointer(root, keep_last=2) as ckpt:
        for step in range(1, steps + 1):
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % every == 0:
                state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
                started = time.perf_counter()
                handle = ckpt.save(state, step=step)
                await handle.staged  # copied out: the next optimizer step may change them
                blocking_ms.append((time.perf_counter() - started) * 1e3)
                pending.append(handle)
                print(
                    f"step {step:4d}  loss {loss.item():.4f}  checkpoint staged in "
                    f"{blocking_ms[-1]:.1f} ms",
                    flush=True,
                )
            await asyncio.sleep(0)  # other tasks of the trainer's loop run here
        for handle in pending:
            durable_ms.append((await handle).total_seconds * 1e3)
        latest = await ckpt.latest()
    assert latest is not None
    # Resume a fresh model from the newest checkpoint with torch's own DCP loader.
    fresh = build_model()
    for p in fresh.parameters():
        p.data.zero_()
    target = {"model": fresh.state_dict(), "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming a single process"
        dcp.load(target, checkpoint_id=latest, no_dist=True)
    saved_step = steps - steps % every
    checks = {
        "step restored": target["step"] == saved_step,
        "weights restored": all(
            torch.equal(a, b)
            for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
        )
        if saved_step == steps
        else True,
        "manifest verifies": aiockpt.verify(latest) is not None,
    }
    print(f"\ncheckpoints written     {len(durable_ms)}")
    print(f"median blocking         {statistics.median(blocking_ms):.1f} ms")
    print(f"median durable          {statistics.median(durable_ms):.1f} ms")
    print(f"final checkpoint        {latest}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--root", default=None, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args()
    if args.root is not None:
        return asyncio.run(train(args.root, args.steps, args.every))
    with tempfile.TemporaryDirectory(prefix="demo-ckpt-") as root:
        return asyncio.run(train(root, args.steps, args.every))


if __name__ == "__main__":
    sys.exit(main())
