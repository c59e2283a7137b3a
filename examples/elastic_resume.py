"""An FSDP2 trainer that survives its job changing size: a node is lost, a node joins, and each
time the new group resumes from the newest checkpoint resharded to its own world size.

Run it under ``aiockpt-run`` agents with a dynamic rendezvous, one per "node" (here one worker
each)::

    aiockpt-run --rdzv-backend c10d --rdzv-endpoint 127.0.0.2:29500 --nnodes 1:2 \\
        --local-addr 127.0.0.2 --nproc-per-node 1 --rdzv-id job \\
        examples/elastic_resume.py --root /tmp/er/ckpt --name A
    # and the same with --local-addr 127.0.0.3 ... --name B, now or later

What it shows:

* the model's parameters and the AdamW state are sharded over the group with FSDP2
  (``fully_shard`` on a CPU device mesh, gloo): every rank holds its rows of each weight, as
  DTensors; each step's global batch is split over the ranks, so the trajectory does not
  depend on how many there are;
* every rank creates ``aiockpt.Checkpointer(root)`` and calls ``save(state, step=)`` every
  ``--every`` steps: one checkpoint directory per save, each rank's worker writing its shards;
  ``await h.staged`` comes right before the optimizer step that changes them;
* a new group (whatever its size: the agents re-form it when a node is lost or joins) builds
  the sharded model and calls ``ckpt.load_latest(template)`` with a template of its *own*
  sharding (torch's ``get_state_dict``): each rank reads just the slices of the saved shards
  that make up its new shards, then ``set_state_dict``. The step counter and the loss go on;
* a rank whose collective fails (a peer's node died) exits 1 at once; a rank the agent stops
  (SIGTERM: a node is joining) records it and dies of the signal.

``--hold STEP@WORLD`` keeps a group of WORLD ranks from training past STEP (its ranks keep
all-reducing, as a training step would, until the agent replaces the group; at most
``--hold-timeout`` seconds): the demo uses it so that a fast machine cannot finish a phase
before the demo has changed the membership.

Each rank appends JSON lines to ``<events>/<node>.jsonl`` (start, joined, resumed, step, hold,
checkpoint, lost-peer, stopped, done; wall-clock times, its rank, the world size and the
group's ``MASTER_PORT``, new for every group) for ``examples/demo.py`` to aggregate. It needs
the environment a launcher provides (``aiockpt-run`` or ``torchrun``), and imports nothing
from ``examples`` so that it runs as a plain script path.
"""

from __future__ import annotations

import time

#: when this interpreter reached our code: the time to a running group counts from here on
#: (importing torch, joining the group, loading the checkpoint) as part of the change
STARTED = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import aiockpt  # noqa: E402

#: how often a held group all-reduces while it waits to be replaced
HOLD_TICK_S = 0.05


def build_model(width: int, hidden: int, seed: int = 0) -> nn.Module:
    """A three-layer MLP, initialised the same way on every rank (and in the demo's
    single-process reference run) for a given seed."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, width),
    )


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2: each linear layer its own unit, the root last (torch's recipe)."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def make_batch(
    step: int, global_batch: int, width: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s whole batch: the same tensors whenever and at whatever world size that
    step is trained. The target is a fixed nonlinear function of the input."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    inputs = torch.randn(global_batch, width, generator=generator)
    targets = torch.tanh(inputs.roll(1, dims=1) - 0.5 * inputs)
    return inputs, targets


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's equal share of a batch: the mean of the ranks' mean losses (what FSDP's
    gradient averaging follows) is then the mean over the whole batch."""
    return batch.chunk(world_size)[rank]


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, loss: float
) -> dict[str, Any]:
    """What a checkpoint holds: torch's world-size-independent state dicts (parameter names
    as keys, DTensor shards as values) and where training was."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "step": step, "loss": loss}


class EventLog:
    """This node's JSON-lines record of what happened and when, for the demo driver.

    One ``write`` per line on an ``O_APPEND`` descriptor: a line is never torn, and a rank
    killed right after writing leaves it complete. Lines are tiny, so writing them on the event
    loop (or in a signal handler) costs microseconds.
    """

    def __init__(self, directory: str, node: str, fields: dict[str, Any]) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{node}.jsonl")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._base = {"node": node, **fields}

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "t": time.time(), **self._base, **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def parse_holds(items: list[str]) -> set[tuple[int, int]]:
    """``STEP@WORLD`` items as (step, world size) pairs. Raises ``ValueError``."""
    holds: set[tuple[int, int]] = set()
    for item in items:
        step, sep, world = item.partition("@")
        if not sep:
            raise ValueError(f"--hold: expected STEP@WORLD, got {item!r}")
        holds.add((int(step), int(world)))
    return holds


async def resume(
    ckpt: aiockpt.Checkpointer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    log: EventLog,
) -> int:
    """Load this rank's new shards of the newest checkpoint into ``model`` and ``optimizer``;
    return its step (0 when there is none)."""
    path = await ckpt.latest()
    if path is None:
        log.write("resumed", step=0, loss=None, path=None, saved_world=None)
        if rank == 0:
            print(f"no checkpoint in {ckpt.root}: starting from scratch", flush=True)
        return 0
    # The template has this group's sharding: load_latest gives each DTensor this rank's
    # slice of the whole, whatever the world size that saved it. (Only when there is a
    # checkpoint: get_state_dict gives a fresh AdamW its state by a zero step, which must not
    # be trained from.)
    model_state, optim_state = get_state_dict(model, optimizer)
    template = {"model": model_state, "optim": optim_state, "step": 0, "loss": 0.0}
    saved = await ckpt.load_latest(template)
    set_state_dict(
        model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optim"]
    )
    step = int(saved["step"])
    saved_world = (await asyncio.to_thread(aiockpt.verify, path)).world_size
    log.write("resumed", step=step, loss=saved["loss"], path=path, saved_world=saved_world)
    if rank == 0:
        print(
            f"resumed from {path} at step {step} (saved by {saved_world} rank(s), now "
            f"{dist.get_world_size()}; loss there {saved['loss']:.5f})",
            flush=True,
        )
    return step


def forward_backward(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, world_size: int
) -> float:
    """One step's forward and backward pass (FSDP all-gathers the weights and reduce-scatters
    the gradients) and the mean loss over the ranks. Blocking: run in a thread, so that the
    loop meanwhile sends the previous save to the worker and reports durable checkpoints.
    Raises ``RuntimeError`` (torch's DistError) when a peer is gone."""
    loss = nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world_size


def hold_collective() -> None:
    """What a held rank does: an all-reduce like a step's, so a lost peer fails it the same
    way. Blocking."""
    dist.all_reduce(torch.zeros(1))


async def train(args: argparse.Namespace, log: EventLog, ckpt_group: Any) -> int:
    """Resume from the newest checkpoint under ``args.root`` (if any), train to ``args.steps``
    with a checkpoint every ``args.every`` steps and at the end, and record it all in ``log``.
    Returns the exit code."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world_size,))
    model = shard_model(build_model(args.width, args.hidden, args.seed), mesh)
    optimizer = build_optimizer(model, args.lr)
    ckpt = aiockpt.Checkpointer(args.root, keep_last=args.keep_last, process_group=ckpt_group)
    holds = parse_holds(args.hold)

    # The checkpoint worker starts (a process that imports torch: seconds) while this rank
    # loads and trains; the first save waits for it if it is not up by then. start() runs a
    # collective in a thread, on a process group of its own, so it cannot interleave with
    # the training loop's collectives.
    starting = asyncio.create_task(ckpt.start())
    try:
        start = await resume(ckpt, model, optimizer, rank, log)

        async def announce(handle: aiockpt.SaveHandle, loss: float, blocking_ms: float) -> None:
            """Record the checkpoint once committed and durable (rank 0 prints a line)."""
            result = await handle
            log.write("checkpoint", step=result.step, path=result.path, blocking_ms=blocking_ms)
            if rank == 0:
                print(
                    f"checkpoint step {result.step:4d}  loss {loss:.5f}  world {world_size}  "
                    f"trainer blocked {blocking_ms:5.1f} ms  durable "
                    f"{result.total_seconds * 1e3:6.1f} ms -> {os.path.basename(result.path)}",
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
                inputs, targets = make_batch(step, args.global_batch, args.width, args.seed)
                optimizer.zero_grad()
                try:
                    loss_value = await asyncio.to_thread(
                        forward_backward,
                        model,
                        rank_slice(inputs, rank, world_size),
                        rank_slice(targets, rank, world_size),
                        world_size,
                    )
                except RuntimeError as exc:  # gloo: a peer died mid-collective
                    lost_peer(log, rank, step, exc)
                # The previous checkpoint's tensors were copied out during this step's
                # forward and backward pass; the optimizer step may change them only once
                # that copy is complete.
                await finish_staging()
                optimizer.step()
                log.write("step", step=step, loss=loss_value)
                if step % args.every == 0 or step == args.steps:
                    began = time.perf_counter()
                    state = training_state(model, optimizer, step, loss_value)
                    handle = ckpt.save(state, step=step)
                    saving = (handle, loss_value, (time.perf_counter() - began) * 1e3)
                if (step, world_size) in holds:
                    await finish_staging()
                    await hold(args.hold_timeout, log, rank, step)
            await finish_staging()
        await starting
        latest = await ckpt.latest()  # every save is durable: the reporters finished
    finally:
        await asyncio.gather(starting, return_exceptions=True)
        await ckpt.close()
    log.write("done", step=args.steps, loss=loss_value, latest=latest)
    return 0


async def hold(longest_s: float, log: EventLog, rank: int, step: int) -> None:
    """Keep the group in collectives, not training, until the agent replaces it (this rank is
    stopped, or a peer's loss fails the collective); exit 3 after ``longest_s`` seconds."""
    log.write("hold", step=step)
    deadline = time.monotonic() + longest_s
    while time.monotonic() < deadline:
        try:
            await asyncio.to_thread(hold_collective)
        except RuntimeError as exc:
            lost_peer(log, rank, step, exc)
        await asyncio.sleep(HOLD_TICK_S)
    print(f"rank {rank}: held at step {step} for {longest_s:.0f} s; giving up", flush=True)
    os._exit(3)


def lost_peer(log: EventLog, rank: int, step: int, exc: RuntimeError) -> None:
    """A collective failed: a peer (its node) is gone. Exit 1 at once: the group's
    clean-up (and the checkpointer's, whose workers share the dead peer) would wait on it; the
    agent stops what is left of this rank and re-forms the group."""
    log.write("lost-peer", step=step)
    reason = re.sub(r"^\[[^]]*\] ", "", str(exc)).split(". ")[0].splitlines()[0]
    print(f"rank {rank}: lost a peer in step {step} ({reason}); exiting", flush=True)
    os._exit(1)


def record_stop(log: EventLog) -> None:
    """On SIGTERM (the agent stops this group: a node is joining), record it, then die of the
    signal as the agent expects."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        log.write("stopped", signal="SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def init_process_group() -> None:
    """Join the trainers' gloo group through ``env://`` (a new store for every group the
    agents form)."""
    timeout = datetime.timedelta(seconds=120)  # a lost peer fails the step, not in 30 min
    dist.init_process_group("gloo", timeout=timeout)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aiockpt-run --rdzv-backend c10d --nnodes 1:2 ... examples/elastic_resume.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--root", required=True, help="checkpoint directory (resumed from)")
    parser.add_argument("--name", default="node", help="this node's name, for the records")
    parser.add_argument(
        "--events", default=None, help="directory of the event records (default: ROOT/events)"
    )
    parser.add_argument("--steps", type=int, default=40, help="train up to this step")
    parser.add_argument(
        "--every", type=int, default=5, help="checkpoint every N steps (and at the end)"
    )
    parser.add_argument(
        "--hold",
        action="append",
        default=[],
        metavar="STEP@WORLD",
        help="a group of WORLD ranks trains no further than STEP (repeatable)",
    )
    parser.add_argument("--hold-timeout", type=float, default=120.0, help="longest hold (s)")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--width", type=int, default=128, help="input and output features")
    parser.add_argument("--hidden", type=int, default=512, help="hidden features")
    parser.add_argument(
        "--global-batch", type=int, default=32, help="examples per step, split over the ranks"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.keep_last < 1:
        parser.error("--steps, --every and --keep-last must be at least 1")
    try:
        parse_holds(args.hold)
    except ValueError as exc:
        parser.error(str(exc))
    if args.events is None:
        args.events = os.path.join(args.root, "events")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fields = {
        "rank": int(os.environ["RANK"]),
        "world": int(os.environ["WORLD_SIZE"]),
        "group": int(os.environ["MASTER_PORT"]),
        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }
    log = EventLog(args.events, args.name, fields)
    log.write("start", t=STARTED, pid=os.getpid())
    record_stop(log)
    init_process_group()
    try:
        if args.global_batch % dist.get_world_size():
            print("--global-batch must divide by the world size", file=sys.stderr)
            return 2
        # The Checkpointer's own group (a collective: every rank, in the same order).
        ckpt_group = dist.new_group(backend="gloo")
        log.write("joined")
        return asyncio.run(train(args, log, ckpt_group))
    finally:
        dist.destroy_process_group()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
