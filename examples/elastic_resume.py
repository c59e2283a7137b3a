"""A 2-rank data-parallel trainer under ``aiockpt-run`` that crashes once and resumes.

What it shows:

* every rank builds the same model and optimizer, trains on its own slice of each step's batch,
  and averages gradients with one ``torch.distributed.all_reduce`` per step (gloo, CPU), so the
  replicas stay identical, as under DDP;
* every rank creates ``aiockpt.Checkpointer(root)`` and calls ``save(state, step=)`` in the
  same order: each save is *one* checkpoint directory that every rank's checkpoint worker writes
  a part of. ``h = ckpt.save(...)`` returns at once, the next step's forward and backward pass
  and all-reduce run while the tensors are copied out, and ``await h.staged`` comes right before
  the optimizer step that changes them; durability completes in the background and rank 0
  prints one line per checkpoint once it is committed;
* the checkpoint worker starts in the background (``start()`` on a process group of its own)
  while the rank loads its checkpoint and trains: a restart waits only for torch and the load;
* with ``--crash-at C``, rank 1 dies with ``os._exit(1)`` in step C of the first attempt only
  (``TORCHELASTIC_RESTART_COUNT`` is 0 there); the agent stops rank 0 and restarts the group,
  and each new rank loads its own part of ``await ckpt.latest()``: the step counter and the
  loss continue. Each step's batch is derived from the step number (and the rank), so the
  resumed run replays exactly the steps an uninterrupted run would have trained.

Each rank appends JSON lines to ``<events>/rank<R>.jsonl`` (start, joined, ready, resumed,
step, checkpoint, crash, done, with wall-clock times) for ``examples/demo.py`` to aggregate; rank 0
also ``torch.save``s its live final state next to them, as a reference for the checkpoint.

Run it on its own (any empty directory; ``make demo`` does this and checks the outcome)::

    aiockpt-run --standalone --nproc-per-node 2 --max-restarts 1 --tee 3 --log-dir /tmp/er/logs \\
        examples/elastic_resume.py --root /tmp/er/ckpt --steps 120 --every 20 --crash-at 70

It needs the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` environment a launcher
provides (``aiockpt-run`` or ``torchrun``); it imports nothing from ``examples`` so that it runs
as a plain script path.
"""

from __future__ import annotations

import time

#: when this interpreter reached our code: the restart latency counts the time from here on
#: (importing torch, joining the group, loading the checkpoint) as part of the restart
STARTED = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import aiockpt  # noqa: E402

#: the name rank 0 gives the ``torch.save`` of its live final state, in the events directory
REFERENCE_NAME = "final-live-rank0.pt"


def build_model(width: int, hidden: int, seed: int = 0) -> nn.Module:
    """A three-layer MLP, initialised the same way on every rank for a given seed."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, width),
    )


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def make_batch(
    step: int, rank: int, batch: int, width: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s slice of step ``step``'s batch: the same tensors whenever that step is
    trained, so a resumed run sees what an uninterrupted one would. The target is a fixed
    nonlinear function of the input, which the MLP can learn."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
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


def fingerprint(model: nn.Module) -> str:
    """A digest of the weights' bytes: equal on every rank while the replicas agree."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def average_gradients(model: nn.Module, loss: torch.Tensor, world_size: int) -> float:
    """Average the gradients (and the loss, for the log) over the ranks in one all-reduce, as
    DDP would; returns the mean loss. Blocking: the training loop runs it in a thread."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)  # a sum over ranks; with 2 ranks the order cannot vary
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return float(flat[-1])


class EventLog:
    """This rank's JSON-lines record of what happened and when, for the demo driver.

    One ``write`` per line on an ``O_APPEND`` descriptor: a line is never torn, and a rank
    killed right after writing leaves it complete. Lines are tiny, so writing them on the event
    loop costs microseconds.
    """

    def __init__(self, directory: str, rank: int, attempt: int) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank{rank}.jsonl")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._base = {"rank": rank, "attempt": attempt}

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "t": time.time(), **self._base, **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


async def resume(
    ckpt: aiockpt.Checkpointer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    log: EventLog,
) -> int:
    """Load this rank's part of the newest checkpoint into ``model`` and ``optimizer``;
    return its step (0 when there is none)."""
    path = await ckpt.latest()
    if path is None:
        log.write("resumed", step=0, loss=None, path=None)
        if rank == 0:
            print(f"no checkpoint in {ckpt.root}: starting from scratch", flush=True)
        return 0
    # aiockpt.load with this rank's number rather than ckpt.load_latest(): the latter knows
    # the rank only once start() has formed the group, and start() is still running.
    saved = await asyncio.to_thread(aiockpt.load, path, rank=rank)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optim"])
    step = int(saved["step"])
    log.write("resumed", step=step, loss=saved["loss"], path=path)
    if rank == 0:
        print(f"resumed from {path} at step {step} (loss there {saved['loss']:.5f})", flush=True)
    return step


async def train(
    args: argparse.Namespace, log: EventLog, rank: int, attempt: int, ckpt_group: Any
) -> int:
    """Resume from the newest checkpoint under ``args.root`` (if any), train to ``args.steps``
    with a checkpoint every ``args.every`` steps and at the end, and record it all in ``log``.
    Returns the exit code: 1 when another rank died."""
    model = build_model(args.width, args.hidden, args.seed)
    optimizer = build_optimizer(model, args.lr)
    ckpt = aiockpt.Checkpointer(args.root, keep_last=args.keep_last, process_group=ckpt_group)

    async def start_checkpointer() -> None:
        await ckpt.start()
        log.write("ready")

    # The checkpoint worker starts (a process that imports torch: seconds) while this rank
    # loads and trains; the first save waits for it if it is not up by then. start() runs a
    # collective in a thread, on a process group of its own, so it cannot interleave with
    # the training loop's all-reduces.
    starting = asyncio.create_task(start_checkpointer())
    try:
        start = await resume(ckpt, model, optimizer, rank, log)
        loss_value = await train_steps(args, log, rank, attempt, ckpt, model, optimizer, start)
        if loss_value is None:
            return 1
        await starting
        latest = await ckpt.latest()  # every save is durable: train_steps' reporters finished
    finally:
        await asyncio.gather(starting, return_exceptions=True)
        await ckpt.close()

    if rank == 0:
        # The live state, as a reference the driver compares the final checkpoint with.
        reference = os.path.join(args.events, REFERENCE_NAME)
        state = training_state(model, optimizer, args.steps, loss_value)
        await asyncio.to_thread(torch.save, state, reference)
    log.write("done", step=args.steps, loss=loss_value, latest=latest, weights=fingerprint(model))
    return 0


async def train_steps(
    args: argparse.Namespace,
    log: EventLog,
    rank: int,
    attempt: int,
    ckpt: aiockpt.Checkpointer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    start: int,
) -> float | None:
    """Train steps ``start + 1`` to ``args.steps``, checkpointing; return the last loss once
    every checkpoint is durable, or None when another rank died."""
    world_size = dist.get_world_size()

    async def announce(handle: aiockpt.SaveHandle, loss: float, blocking_ms: float) -> None:
        """Record the checkpoint once committed and durable (rank 0 prints a line)."""
        result = await handle
        log.write(
            "checkpoint",
            step=result.step,
            path=result.path,
            nbytes=result.nbytes,
            blocking_ms=blocking_ms,
            staging_ms=result.staging_seconds * 1e3,
            durable_ms=result.total_seconds * 1e3,
        )
        if rank == 0:
            print(
                f"checkpoint step {result.step:5d}  loss {loss:.5f}  trainer blocked "
                f"{blocking_ms:5.1f} ms  staged {result.staging_seconds * 1e3:6.1f} ms  "
                f"durable {result.total_seconds * 1e3:7.1f} ms  "
                f"{result.nbytes / 1e6:5.1f} MB -> {os.path.basename(result.path)}",
                flush=True,
            )

    loss_value = float("nan")
    async with asyncio.TaskGroup() as reporters:
        # the save in progress: its handle, its step's loss, ms spent in the save() call
        saving: tuple[aiockpt.SaveHandle, float, float] | None = None

        async def finish_staging() -> None:
            """Wait until the save in progress has copied its tensors out; hand it to a
            reporter. The trainer blocks only here and in the ``save()`` call."""
            nonlocal saving
            if saving is None:
                return
            handle, saved_loss, call_ms = saving
            saving = None
            began = time.perf_counter()
            await handle.staged
            blocking_ms = call_ms + (time.perf_counter() - began) * 1e3
            reporters.create_task(announce(handle, saved_loss, blocking_ms))

        for step in range(start + 1, args.steps + 1):
            inputs, targets = make_batch(step, rank, args.batch, args.width, args.seed)
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            if attempt == 0 and rank == 1 and step == args.crash_at:
                # A real crash can land while a save is being written: that save then never
                # commits and latest() names the one before. Letting the saves in flight
                # finish first makes the step the restart must resume from known in
                # advance, so the demo can check it exactly.
                await ckpt.wait()
                log.write("crash", step=step)
                print(f"rank 1: crashing on purpose in step {step} (attempt 0)", flush=True)
                os._exit(1)
            try:
                # In a thread: meanwhile the loop sends the previous save to the worker and
                # reports checkpoints that became durable.
                loss_value = await asyncio.to_thread(average_gradients, model, loss, world_size)
            except RuntimeError as exc:  # gloo: a peer died mid-collective
                # The agent stops this rank as well by now; exit without a traceback.
                reason = re.sub(r"^\[[^]]*\] ", "", str(exc)).split(". ")[0]
                print(f"rank {rank}: lost a peer in step {step} ({reason}); exiting", flush=True)
                return None
            # The previous checkpoint's tensors were copied out during this step's forward
            # and backward pass; the optimizer step may change them only once that copy is
            # complete.
            await finish_staging()
            optimizer.step()
            log.write("step", step=step, loss=loss_value)
            if step % args.every == 0 or step == args.steps:
                began = time.perf_counter()
                state = training_state(model, optimizer, step, loss_value)
                handle = ckpt.save(state, step=step)
                saving = (handle, loss_value, (time.perf_counter() - began) * 1e3)
        await finish_staging()
    return loss_value


def init_process_group() -> None:
    """Join the trainers' gloo group through ``env://``. ``aiockpt-run`` gives every attempt
    a store of its own, so a restarted group never meets among the dead group's keys (with
    torch 2.13's ``env://``, torchrun's restarted groups do, and hang)."""
    timeout = datetime.timedelta(seconds=120)  # a lost peer fails the step, not in 30 min
    dist.init_process_group("gloo", timeout=timeout)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aiockpt-run --nproc-per-node 2 ... examples/elastic_resume.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--root", required=True, help="checkpoint directory (resumed from)")
    parser.add_argument(
        "--events", default=None, help="directory of the event records (default: ROOT/events)"
    )
    parser.add_argument("--steps", type=int, default=120, help="train up to this step")
    parser.add_argument(
        "--every", type=int, default=20, help="checkpoint every N steps (and at the end)"
    )
    parser.add_argument(
        "--crash-at",
        type=int,
        default=None,
        help="rank 1 dies in this step of the first attempt (default: no crash)",
    )
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--width", type=int, default=512, help="input and output features")
    parser.add_argument("--hidden", type=int, default=1536, help="hidden features")
    parser.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.keep_last < 1:
        parser.error("--steps, --every and --keep-last must be at least 1")
    if args.events is None:
        args.events = os.path.join(args.root, "events")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = EventLog(args.events, rank, attempt)
    log.write("start", t=STARTED, pid=os.getpid())
    init_process_group()
    try:
        if dist.get_world_size() < 2 and args.crash_at is not None:
            print("--crash-at needs at least 2 ranks (rank 1 crashes)", file=sys.stderr)
            return 2
        # The Checkpointer's own group (a collective: every rank, in the same order).
        ckpt_group = dist.new_group(backend="gloo")
        log.write("joined")
        return asyncio.run(train(args, log, rank, attempt, ckpt_group))
    finally:
        dist.destroy_process_group()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
