"""Actor-learner RL in one event loop: publish weights without stalling the rollouts.

What it shows: rollout workers are asyncio tasks in the same event loop as the trainer. They
step a toy vector environment (a contextual bandit computed in torch) with their copy of the
policy and hand experience to the trainer; after each optimizer step the trainer publishes the
new weights, and the rollouts switch to them through a "published" pointer only:

1. ``h = aiockpt.async_save(policy_state, root / "v_000012", format="safetensors")``;
   ``await h.staged`` (then the next optimizer step may change the weights);
2. once ``h`` resolves (the version is committed and durable) a publisher task points
   ``root/PUBLISHED`` at it atomically: the name goes into a temporary file, which is
   fsynced, ``os.replace``\\ d over ``PUBLISHED``, and the directory is fsynced;
3. rollout workers poll ``PUBLISHED`` and load the version it names with
   ``safetensors.torch.load_file`` in a thread, check that the step embedded in the file is
   the one the pointer names and that the weights are exactly those the trainer published
   (a fingerprint), and only then switch, so nothing torn or half-written is ever used;
4. old versions are deleted, keeping the newest few and never the published one.

Blocking file I/O (pointer, loads, deletions) runs in threads (``asyncio.to_thread``), and so
does the trainer's arithmetic: the loop itself only schedules. Then the same run is repeated
with the obvious alternative, a blocking ``torch.save`` (plus fsync and rename) of each version
on the loop thread, and the longest rollout stall (the longest gap between two consecutive
steps of any rollout task) of both runs is printed side by side.

    python -m examples.async_rl [--steps 20] [--rollouts 4] [--hidden 16384] [--root DIR]

Exits non-zero if one of its own checks fails. ``--report FILE`` writes what happened as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
import xxhash
from torch import nn

import aiockpt

POINTER = "PUBLISHED"
VERSION_NAME = "v_{version:06d}"
AIOCKPT = "aiockpt.async_save"
BLOCKING = "torch.save on the loop"


# --- the toy problem ---------------------------------------------------------------------------


def build_policy(contexts: int, hidden: int, actions: int) -> nn.Module:
    """An embedding of each context and a linear head: its size (``contexts * hidden``
    floats) is what a publish has to move, while acting costs one row lookup per env, so the
    rollouts' own work stays small next to the publishing that is being compared."""
    return nn.Sequential(nn.Embedding(contexts, hidden), nn.ReLU(), nn.Linear(hidden, actions))


class BanditEnv:
    """``n`` contextual bandits at once: each observation is one of ``contexts`` contexts,
    drawn at random, and one action per context (fixed, unknown to the agent) is rewarded."""

    def __init__(self, n: int, contexts: int, actions: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.n, self.contexts = n, contexts
        truth = torch.Generator().manual_seed(7)  # the same task for every env
        self.rewarded = torch.randint(actions, (contexts,), generator=truth)
        self.obs = self.observe()

    def observe(self) -> torch.Tensor:
        return torch.randint(self.contexts, (self.n,), generator=self.generator)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward the actions taken on the current observations; return them and the next."""
        reward = (actions == self.rewarded[self.obs]).float()
        self.obs = self.observe()
        return reward, self.obs


@dataclass
class Experience:
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    version: int


# --- publishing ----------------------------------------------------------------------------------


def fingerprint(policy_state: dict[str, torch.Tensor]) -> str:
    """A digest of the policy's names, shapes, dtypes and bytes: a loaded copy that differs
    in any byte (torn, mixed from two versions, stale) does not match."""
    digest = xxhash.xxh3_64()
    for name, t in sorted(policy_state.items()):
        t = t.detach().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        nbytes = t.numel() * t.element_size()
        if nbytes:  # the tensor's memory, read in place
            digest.update(memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())))
    return digest.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(root: str, name: str) -> None:
    """Point ``root/PUBLISHED`` at ``name`` atomically and durably: readers see the old name
    or the new one, never a partial file, and after a crash the pointer is one of the two."""
    temp = os.path.join(root, f".{POINTER}.{os.getpid()}.tmp")
    with open(temp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, os.path.join(root, POINTER))
    fsync_dir(root)


def read_pointer(root: str) -> str | None:
    try:
        with open(os.path.join(root, POINTER)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def collect_garbage(root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions, never the published one."""
    published = read_pointer(root)
    versions = sorted(n for n in os.listdir(root) if n.startswith("v_"))
    removed = []
    for name in versions[: max(0, len(versions) - keep)]:
        if name != published:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def torch_save_version(root: str, name: str, state: dict[str, Any]) -> None:
    """The baseline's publish: ``torch.save`` into a temporary directory, fsync, rename."""
    temp = os.path.join(root, f".{name}.tmp")
    os.makedirs(temp)
    with open(os.path.join(temp, "policy.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(temp)
    os.replace(temp, os.path.join(root, name))
    fsync_dir(root)


def load_version(root: str, name: str, method: str) -> tuple[int, dict[str, torch.Tensor]]:
    """The embedded version and the policy weights of version ``name``, as the inference side
    reads them: a plain safetensors file, or the baseline's ``torch.save`` file."""
    directory = os.path.join(root, name)
    if method == AIOCKPT:
        flat = safetensors.torch.load_file(os.path.join(directory, "model.safetensors"))
        policy = {k.removeprefix("policy."): v for k, v in flat.items() if k != "version"}
        return int(flat["version"].item()), policy
    saved = torch.load(os.path.join(directory, "policy.pt"), weights_only=True)
    return int(saved["version"].item()), saved["policy"]


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run's shared state and what it measured."""

    args: argparse.Namespace
    method: str
    root: str
    experience: asyncio.Queue[Experience]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: version -> fingerprint of the weights the trainer saved as that version
    saved: dict[int, str] = field(default_factory=dict)
    #: versions in the order the pointer was moved to them
    published: list[int] = field(default_factory=list)
    #: every load a rollout did: version from the pointer, embedded version, fingerprint
    loads: list[dict[str, Any]] = field(default_factory=list)
    #: loads that found their version already deleted (retried with the newer pointer)
    vanished: int = 0
    #: per rollout task: gaps between consecutive steps (seconds)
    gaps: list[list[float]] = field(default_factory=list)
    rollout_steps: int = 0
    rewards: list[float] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: version name -> its load in progress, shared by the rollout tasks
    loading: dict[str, asyncio.Task[tuple[int, nn.Module] | None]] = field(default_factory=dict)


async def load_published(run: Run, name: str) -> tuple[int, nn.Module] | None:
    """Load version ``name`` and check it before anyone may use it; None if it is not what
    was published under that name (recorded, and never used)."""
    args = run.args

    def read() -> tuple[int, str, nn.Module]:  # in a thread: file I/O and 16 MB of arithmetic
        embedded, weights = load_version(run.root, name, run.method)
        policy = build_policy(args.contexts, args.hidden, args.actions)
        policy.load_state_dict(weights)
        return embedded, fingerprint(weights), policy.requires_grad_(False)

    embedded, digest, policy = await asyncio.to_thread(read)
    version = int(name.removeprefix("v_"))
    run.loads.append(
        {
            "pointer": name,
            "version": version,
            "embedded": embedded,
            "fingerprint": digest,
            "published": run.saved.get(version),
        }
    )
    if embedded != version or digest != run.saved.get(version):
        print(f"{name} does not hold the weights published as {name}: not used", flush=True)
        return None
    return version, policy


async def follow_pointer(run: Run, current: str | None) -> tuple[str, int, nn.Module] | None:
    """The published version if it is not ``current``: read the pointer, then load what it
    names (one load per version, shared by the rollout tasks)."""
    name = await asyncio.to_thread(read_pointer, run.root)
    if name is None or name == current:
        return None
    task = run.loading.get(name)
    if task is None:
        task = run.loading[name] = asyncio.create_task(load_published(run, name))
        task.add_done_callback(_retrieve)
    try:
        loaded = await asyncio.shield(task)
    except FileNotFoundError:  # deleted after newer versions: the next poll finds the newest
        run.vanished += 1
        run.loading.pop(name, None)
        return None
    for old in list(run.loading)[: -run.args.keep]:
        if run.loading[old].done():
            del run.loading[old]
    return None if loaded is None else (name, *loaded)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A load's outcome is read by whoever awaits it; if nobody is left to (the rollouts have
    stopped), it is read here so that the loop does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def rollout(run: Run, index: int) -> None:
    """Step the environment with the published policy until the trainer is done; never
    await anything slow between steps: polls and loads run as tasks of their own."""
    args = run.args
    env = BanditEnv(args.envs, args.contexts, args.actions, seed=1000 + index)
    generator = torch.Generator().manual_seed(index)
    name: str | None = None
    policy: nn.Module | None = None
    version = -1
    polling: asyncio.Task[tuple[str, int, nn.Module] | None] | None = None
    next_poll = 0.0
    gaps: list[float] = []
    run.gaps.append(gaps)
    last = None
    try:
        while not run.stop.is_set():
            now = time.perf_counter()
            if polling is None and now >= next_poll:
                polling = asyncio.create_task(follow_pointer(run, name))
                next_poll = now + args.poll_interval
            if polling is not None and polling.done():
                switched = polling.result()
                polling = None
                if switched is not None:
                    name, version, policy = switched
            if policy is None:  # nothing published yet
                await asyncio.sleep(args.env_latency)
                continue
            obs = env.obs
            with torch.no_grad():
                logits = policy(obs)
            actions = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
            rewards, _ = env.step(actions)
            run.rewards.append(rewards.mean().item())
            if run.experience.full():  # the trainer is behind: keep the freshest experience
                run.experience.get_nowait()
            run.experience.put_nowait(Experience(obs, actions, rewards, version))
            run.rollout_steps += 1
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            await asyncio.sleep(args.env_latency)  # the environment's own latency
    finally:
        if polling is not None:
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError, FileNotFoundError):
                await polling


async def publisher(
    run: Run, handles: asyncio.Queue[tuple[int, aiockpt.SaveHandle] | None]
) -> None:
    """Move the pointer to each version once it is durable, in order; then collect garbage."""
    while (item := await handles.get()) is not None:
        version, handle = item
        await handle  # committed and durable: now, and only now, it may be published
        await asyncio.to_thread(write_pointer, run.root, VERSION_NAME.format(version=version))
        run.published.append(version)
        run.removed += await asyncio.to_thread(collect_garbage, run.root, run.args.keep)


async def trainer(run: Run) -> None:
    """REINFORCE on the rollouts' experience; publish after every optimizer step."""
    args = run.args
    torch.manual_seed(args.seed)
    policy = build_policy(args.contexts, args.hidden, args.actions)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    handles: asyncio.Queue[tuple[int, aiockpt.SaveHandle] | None] = asyncio.Queue()

    def train_step(batch: list[Experience]) -> None:
        obs = torch.cat([e.obs for e in batch])
        actions = torch.cat([e.actions for e in batch])
        rewards = torch.cat([e.rewards for e in batch])
        logp = policy(obs).log_softmax(dim=1).gather(1, actions[:, None]).squeeze(1)
        loss = -(logp * (rewards - rewards.mean())).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def snapshot(version: int) -> dict[str, Any]:
        weights = policy.state_dict()
        run.saved[version] = fingerprint(weights)
        return {"policy": weights, "version": torch.tensor(version)}

    async def publish(version: int) -> None:
        name = VERSION_NAME.format(version=version)
        state = await asyncio.to_thread(snapshot, version)
        if run.method == AIOCKPT:
            path = os.path.join(run.root, name)
            handle = aiockpt.async_save(state, path, format="safetensors")
            await handle.staged  # copied out: the next optimizer step may change the weights
            handles.put_nowait((version, handle))
        else:  # everything on the loop thread, as a plain training script would do it
            torch_save_version(run.root, name, state)
            write_pointer(run.root, name)
            run.published.append(version)
            run.removed += collect_garbage(run.root, args.keep)

    publishing = asyncio.create_task(publisher(run, handles))
    try:
        await publish(0)
        for version in range(1, args.steps + 1):
            batch = [await run.experience.get() for _ in range(args.batch)]
            await asyncio.to_thread(train_step, batch)
            await publish(version)
    finally:
        handles.put_nowait(None)
        await publishing


async def run_once(args: argparse.Namespace, method: str, root: str) -> Run:
    os.makedirs(root, exist_ok=True)
    run = Run(args, method, root, asyncio.Queue(maxsize=4 * args.batch))
    try:
        # A failing rollout cancels the trainer, and a failing trainer stops the rollouts.
        async with asyncio.TaskGroup() as group:
            for index in range(args.rollouts):
                group.create_task(rollout(run, index))
            try:
                await trainer(run)
            finally:
                run.stop.set()
    finally:
        for task in run.loading.values():
            task.cancel()
        await asyncio.gather(*run.loading.values(), return_exceptions=True)
    return run


# --- report --------------------------------------------------------------------------------------


def summarize(run: Run) -> dict[str, Any]:
    gaps = [g for per_task in run.gaps for g in per_task]
    return {
        "method": run.method,
        "publishes": len(run.published),
        "published": run.published,
        "final_pointer": read_pointer(run.root),
        "loads": run.loads,
        "vanished_before_load": run.vanished,
        "rollout_steps": run.rollout_steps,
        "longest_stall_ms": max(gaps, default=0.0) * 1e3,
        "median_step_gap_ms": statistics.median(gaps) * 1e3 if gaps else 0.0,
        "p99_step_gap_ms": statistics.quantiles(gaps, n=100)[98] * 1e3 if len(gaps) > 1 else 0.0,
        "versions_on_disk": sorted(n for n in os.listdir(run.root) if n.startswith("v_")),
        "removed": run.removed,
        "first_reward": statistics.fmean(run.rewards[: 4 * run.args.rollouts] or [0.0]),
        "last_reward": statistics.fmean(run.rewards[-4 * run.args.rollouts :] or [0.0]),
    }


def check(summary: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    published = summary["published"]
    pointer = VERSION_NAME.format(version=published[-1]) if published else None
    return {
        "every version was published, in order": published == list(range(args.steps + 1)),
        "the pointer names the last version": summary["final_pointer"] == pointer,
        "rollouts loaded weights": bool(summary["loads"]),
        "every load was a published version, its weights exactly as published": all(
            load["version"] in published
            and load["embedded"] == load["version"]
            and load["fingerprint"] == load["published"]
            for load in summary["loads"]
        ),
        f"at most {args.keep} versions kept, the published one among them": (
            len(summary["versions_on_disk"]) <= args.keep
            and summary["final_pointer"] in summary["versions_on_disk"]
        ),
        "rollouts kept stepping": summary["rollout_steps"] > args.rollouts,
    }


def print_report(summaries: list[dict[str, Any]]) -> None:
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("versions published", lambda s: f"{s['publishes']}"),
        ("weight loads by rollouts", lambda s: f"{len(s['loads'])}"),
        ("rollout steps", lambda s: f"{s['rollout_steps']}"),
        ("median rollout step gap", lambda s: f"{s['median_step_gap_ms']:.1f} ms"),
        ("99th percentile step gap", lambda s: f"{s['p99_step_gap_ms']:.1f} ms"),
        ("longest rollout stall", lambda s: f"{s['longest_stall_ms']:.1f} ms"),
        (
            "mean reward, first -> last",
            lambda s: f"{s['first_reward']:.2f} -> {s['last_reward']:.2f}",
        ),
    ]
    width = 26
    print(f"\n{'':{width}}" + "".join(f"{s['method']:>24}" for s in summaries))
    for label, cell in rows:
        print(f"{label:{width}}" + "".join(f"{cell(s):>24}" for s in summaries))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.async_rl", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--root", default=None, help="where versions go (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (= publishes)")
    parser.add_argument("--rollouts", type=int, default=4, help="rollout tasks")
    parser.add_argument("--envs", type=int, default=32, help="environments per rollout task")
    parser.add_argument("--batch", type=int, default=4, help="rollout steps per optimizer step")
    parser.add_argument("--contexts", type=int, default=256, help="bandit contexts")
    parser.add_argument("--actions", type=int, default=8)
    parser.add_argument(
        "--hidden", type=int, default=16384, help="embedding width (policy: contexts*hidden)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads during the run (0: leave torch's setting)",
    )
    parser.add_argument("--keep", type=int, default=3, help="versions kept on disk")
    parser.add_argument("--env-latency", type=float, default=0.005, help="seconds per env step")
    parser.add_argument("--poll-interval", type=float, default=0.01, help="pointer poll period")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", choices=["aiockpt", "torch"], default=None, help="run one variant only"
    )
    parser.add_argument("--report", default=None, help="write a JSON report to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rollouts < 1 or args.batch < 1 or args.keep < 1:
        parser.error("--steps, --rollouts, --batch and --keep must be at least 1")
    return args


def run_all(args: argparse.Namespace, root: str) -> dict[str, Any]:
    methods = {"aiockpt": AIOCKPT, "torch": BLOCKING}
    chosen = [args.only] if args.only else list(methods)
    report: dict[str, Any] = {"runs": [], "checks": {}}
    for key in chosen:
        run = asyncio.run(run_once(args, methods[key], os.path.join(root, key)))
        summary = summarize(run)
        report["runs"].append(summary)
        for name, ok in check(summary, args).items():
            report["checks"][f"{key}: {name}"] = ok
    print_report(report["runs"])
    print()
    for name, ok in report["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'}  {name}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        # The loop thread (rollouts) and the worker threads (training, loading) all run torch
        # ops. With an intra-op pool per calling thread, two parallel regions at once
        # oversubscribe a small machine and the loop thread is descheduled for tens of ms:
        # stalls that have nothing to do with publishing. One thread per op avoids that.
        torch.set_num_threads(args.threads)
    try:
        if args.root is not None:
            report = run_all(args, args.root)
        else:
            with tempfile.TemporaryDirectory(prefix="async-rl-") as root:
                report = run_all(args, root)
    finally:
        torch.set_num_threads(threads)
    if args.report is not None:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["checks"] and all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
