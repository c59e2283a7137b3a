"""`make demo`: a job on two "nodes" loses one and gains one back, and each time the new group
resumes from the newest checkpoint resharded to its own size; then everything is checked.

The driver starts two ``aiockpt-run`` agents with the dynamic rendezvous, each a "node" on its
own loopback address, one worker each::

    python -m aiockpt.run --rdzv-backend c10d --rdzv-endpoint 127.0.0.2:PORT --nnodes 1:2 \\
        --local-addr 127.0.0.2 --nproc-per-node 1 ... examples/elastic_resume.py --name A ...
    (node B: the same on 127.0.0.3)

Their workers train an MLP sharded with FSDP2 (gloo, CPU) and checkpoint every ``--every``
steps through ``aiockpt.Checkpointer`` (output streams through, each line prefixed with its
node). Then, each step driven by what is on disk, not by sleeps:

1. once the checkpoint of step ``--kill-after`` is committed, node B's agent is SIGKILLed (its
   janitor kills its worker): node A's worker fails on the lost peer, and once B's keep-alive
   expires A's agent forms a group of 1, which resumes from that checkpoint (saved by 2 ranks,
   loaded resharded into 1);
2. once that group has committed step ``--rejoin-after``, a new agent starts on node B: node
   A's agent sees it waiting, stops its worker, and the two form a group of 2 again, which
   resumes from there (saved by 1 rank, loaded resharded into 2), and trains to the end.

A group never trains more than ``--every - 1`` steps past the checkpoint the demo waits for
(``elastic_resume.py --hold``), so the demo always changes the membership in time and knows
the step each new group must resume from. From the workers' event records the driver prints a
table (each membership change with its timings: detected, new group running, first step after
resume) and checks that:

* the groups were 2, then 1, then 2 ranks, each resuming from the checkpoint it had to;
* every step's loss, at whatever world size and however often it was trained, equals (within
  float tolerance) the loss of an uninterrupted single-process run with the same seed and
  data order, computed here: no jump at either change;
* the final checkpoint (saved by 2 ranks), loaded whole by ``aiockpt.load`` and by torch's own
  ``dcp.load`` in this single process, holds the reference run's final weights.

Exits 0 only if every check passed.

    python -m examples.demo [--steps 30] [--every 5] [--kill-after 10] [--rejoin-after 20]

``--root`` (default: a fixed directory under the temp dir, replaced on each run) keeps the
checkpoints (``ckpt/``), the records (``events/``) and the agents' logs (``logs/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import aiockpt
from examples import elastic_resume
from examples.async_trainer import dcp_load, states_equal, zeros_like_state

#: the demo's own directory when no --root is given; replaced on every run
DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "examples-ckpt", "elastic_resume")
#: marks a --root as the demo's, so that a second run may replace it
MARKER = ".aiockpt-elastic-demo"
SCRIPT = Path(elastic_resume.__file__).resolve()
#: the nodes: name -> loopback address (node A hosts the rendezvous store)
NODES = {"A": "127.0.0.2", "B": "127.0.0.3"}
#: a node silent for 2 s is dead (0.5 s beats, 4 missed); a round with enough nodes closes
#: 3 s after the first of them arrives (at once with 2, the maximum). Both agents start
#: together, but on a busy machine one may reach the first round over a second after the
#: other: with a shorter last call the first group was A alone, then 2, then 1, then 2.
RDZV_CONF = (
    "join_timeout=60,last_call_timeout=3,keep_alive_interval=0.5,"
    "keep_alive_max_attempt=4,close_timeout=5"
)
#: how far a step's loss may be from the reference run's: FSDP's sharded reductions add
#: in another order than one process does (measured: ~1e-7 relative)
LOSS_RTOL = 1e-4
#: the driver's own records, beside the nodes' in the events directory
DRIVER = "driver"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=30, help="train up to this step")
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    parser.add_argument(
        "--kill-after", type=int, default=10, help="SIGKILL node B once this step is saved"
    )
    parser.add_argument(
        "--rejoin-after",
        type=int,
        default=20,
        help="restart node B once the group of 1 has saved this step",
    )
    parser.add_argument(
        "--root", default=None, help=f"empty or a previous demo's directory ({DEFAULT_ROOT})"
    )
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--width", type=int, default=64, help="model input and output features")
    parser.add_argument("--hidden", type=int, default=256, help="model hidden features")
    parser.add_argument(
        "--global-batch", type=int, default=32, help="examples per step (split over the ranks)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds before giving up")
    args = parser.parse_args(argv)
    if min(args.steps, args.keep_last) < 1 or args.every < 2:
        parser.error("--steps and --keep-last must be at least 1, --every at least 2")
    if args.kill_after % args.every or args.rejoin_after % args.every:
        parser.error("--kill-after and --rejoin-after must be checkpoint steps (of --every)")
    if not 0 < args.kill_after < args.rejoin_after < hold_step(args.rejoin_after, args.every):
        parser.error("need 0 < --kill-after < --rejoin-after")
    if hold_step(args.rejoin_after, args.every) >= args.steps:
        parser.error("need --rejoin-after + --every <= --steps: training goes on after it")
    if args.global_batch % 2:
        parser.error("--global-batch must be even (it is split over 2 ranks)")
    return args


def hold_step(saved: int, every: int) -> int:
    """The last step a group may train after the checkpoint of step ``saved`` the demo waits
    for: the step before the next checkpoint, so that the new group resumes from ``saved``."""
    return saved + every - 1


def prepare_root(root: Path) -> None:
    """Make ``root`` an empty demo directory: a leftover checkpoint would be resumed from.

    Removes only a directory this demo created (it holds ``MARKER``); raises ``ValueError``
    for any other non-empty directory.
    """
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise ValueError(f"{root} is not empty and not a previous demo's directory")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def agent_command(args: argparse.Namespace, root: Path, node: str, endpoint: str) -> list[str]:
    """``aiockpt-run`` on ``node`` with the training script, as a user would type it."""
    return [
        sys.executable,
        "-m",
        "aiockpt.run",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=elastic-demo",
        f"--rdzv-conf={RDZV_CONF}",
        "--nnodes=1:2",
        "--nproc-per-node=1",
        f"--local-addr={NODES[node]}",
        "--max-restarts=3",
        "--shutdown-timeout=5",
        "--tee=3",  # the worker's output on the console, each line prefixed with its node
        f"--log-line-prefix-template=[{node}]:",
        f"--log-dir={root / 'logs' / node}",
        str(SCRIPT),
        f"--name={node}",
        f"--root={root / 'ckpt'}",
        f"--events={root / 'events'}",
        f"--steps={args.steps}",
        f"--every={args.every}",
        f"--hold={hold_step(args.kill_after, args.every)}@2",
        f"--hold={hold_step(args.rejoin_after, args.every)}@1",
        f"--keep-last={args.keep_last}",
        f"--width={args.width}",
        f"--hidden={args.hidden}",
        f"--global-batch={args.global_batch}",
    ]


class DemoFailed(Exception):
    """The job did not get where the demo waited for it to get."""


@dataclass
class Job:
    """The agents the driver started, and its own records of what it did to them."""

    args: argparse.Namespace
    root: Path
    endpoint: str
    deadline: float
    log: elastic_resume.EventLog
    agents: dict[str, subprocess.Popen[bytes]]

    def start(self, node: str) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # two trainers share the cores
        self.log.write("start-node", target=node)
        command = agent_command(self.args, self.root, node, self.endpoint)
        self.agents[node] = subprocess.Popen(command, env=env)

    def kill(self, node: str) -> None:
        """SIGKILL the node's agent: its janitor kills its worker, as a lost machine's die."""
        agent = self.agents.pop(node)
        self.log.write("kill-node", target=node)
        agent.kill()
        agent.wait()

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Until ``done()``; raises DemoFailed past the deadline or if an agent exits first."""
        while not done():
            for node, agent in self.agents.items():
                if agent.poll() is not None:
                    raise DemoFailed(f"node {node} exited {agent.returncode} before {what}")
            if time.monotonic() > self.deadline:
                raise DemoFailed(f"no {what} within {self.args.timeout:.0f} s")
            time.sleep(0.05)  # a look at the disk every 50 ms: the trainers are held meanwhile

    def saved(self, step: int) -> Callable[[], bool]:
        """Whether the checkpoint of ``step`` is committed (its directory is renamed into
        place only then)."""
        path = self.root / "ckpt" / f"step_{step:010d}"
        return path.is_dir

    def finish(self) -> dict[str, int]:
        """Wait for every agent to exit; their exit codes."""
        codes: dict[str, int] = {}
        for node, agent in self.agents.items():
            left = max(self.deadline - time.monotonic(), 0.0)
            try:
                codes[node] = agent.wait(timeout=left)
            except subprocess.TimeoutExpired:
                raise DemoFailed(
                    f"node {node} still running after {self.args.timeout:.0f} s"
                ) from None
        return codes

    def stop(self) -> None:
        """After a failure or an interruption: SIGTERM has the agents stop their workers;
        SIGKILL (and their janitors) if they do not within their own shutdown deadline."""
        for agent in self.agents.values():
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def run_job(args: argparse.Namespace, root: Path) -> dict[str, int]:
    """Start both nodes, kill B, start it again, wait for the end; the exit codes."""
    log = elastic_resume.EventLog(str(root / "events"), DRIVER, {})
    job = Job(
        args,
        root,
        f"{NODES['A']}:{free_port(NODES['A'])}",
        time.monotonic() + args.timeout,
        log,
        {},
    )
    try:
        job.start("A")  # hosts the rendezvous store
        job.start("B")
        job.wait_until(job.saved(args.kill_after), f"checkpoint of step {args.kill_after}")
        print(f"demo: step {args.kill_after} is saved; SIGKILL to node B's agent", flush=True)
        job.kill("B")
        job.wait_until(job.saved(args.rejoin_after), f"checkpoint of step {args.rejoin_after}")
        print(f"demo: step {args.rejoin_after} is saved; node B starts again", flush=True)
        job.start("B")
        return job.finish()
    except DemoFailed as exc:
        print(f"demo: {exc}", flush=True)
        return {}
    finally:
        job.stop()
        log.close()


def reference_run(args: argparse.Namespace) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """The losses and final weights of the same training in one process, uninterrupted."""
    model = elastic_resume.build_model(args.width, args.hidden)
    optimizer = elastic_resume.build_optimizer(model, lr=1e-3)
    losses: dict[int, float] = {}
    for step in range(1, args.steps + 1):
        inputs, targets = elastic_resume.make_batch(step, args.global_batch, args.width)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[step] = loss.item()
    return losses, model.state_dict()


class Records:
    """The nodes' and the driver's event records, with the lookups the checks need."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = sorted(events, key=lambda e: e["t"])

    @classmethod
    def read(cls, directory: Path) -> Records:
        events: list[dict[str, Any]] = []
        for path in sorted(directory.glob("*.jsonl")):
            with path.open() as f:
                events.extend(json.loads(line) for line in f if line.strip())
        return cls(events)

    def of(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """The records of kind ``event`` whose fields equal ``match``, in time order."""
        return [
            e
            for e in self.events
            if e["event"] == event and all(e.get(k) == v for k, v in match.items())
        ]

    def groups(self) -> list[int]:
        """The groups whose every rank joined (by ``MASTER_PORT``), in the order they formed."""
        joined: dict[int, set[int]] = {}
        world: dict[int, int] = {}
        for e in self.of("joined"):
            joined.setdefault(e["group"], set()).add(e["rank"])
            world[e["group"]] = e["world"]
        return [g for g in joined if len(joined[g]) == world[g]]

    def last_t(self, event: str, **match: Any) -> float:
        """When the last rank got to ``event`` (NaN if none did)."""
        return max((e["t"] for e in self.of(event, **match)), default=math.nan)


@dataclass
class Change:
    """One membership change as the records tell it."""

    what: str
    at: float  # when the driver acted
    detected: float  # when the old group's worker saw it (lost its peer, or was stopped)
    running: float  # when every rank of the new group had joined its process group
    first_step: float  # when every rank of the new group had trained its first step
    worlds: tuple[int, int]
    resumed: list[dict[str, Any]]


def summarize(
    args: argparse.Namespace, root: Path, records: Records, exit_codes: dict[str, int]
) -> tuple[list[tuple[str, ...]], dict[str, bool]]:
    """The table's rows and the checks' outcomes, from the records and the files."""
    of = records.of
    checks: dict[str, bool] = {
        "both agents (A, and B restarted) exited 0": exit_codes == {"A": 0, "B": 0}
    }
    groups = records.groups()
    worlds = [of("joined", group=g)[0]["world"] for g in groups]
    checks[f"the groups were 2, 1, then 2 ranks (got {worlds})"] = worlds == [2, 1, 2]
    kills, starts = of("kill-node", target="B"), of("start-node", target="B")
    if worlds != [2, 1, 2] or len(kills) != 1 or len(starts) != 2:
        checks["node B was killed once and started twice"] = False
        return [], checks

    reference, final_weights = reference_run(args)
    changes = [
        change(records, "node B lost (SIGKILL)", kills[0]["t"], groups[0], groups[1]),
        change(records, "node B rejoined", starts[1]["t"], groups[1], groups[2]),
    ]
    # --- resumed where they had to, resharded --------------------------------------------------
    for item, step, saved_world in zip(
        changes, (args.kill_after, args.rejoin_after), (2, 1), strict=True
    ):
        new_world = item.worlds[1]
        name = f"step_{step:010d}"
        checks[
            f"{item.what}: all {new_world} rank(s) resumed from {name}, saved by {saved_world}"
        ] = len(item.resumed) == new_world and all(
            e["step"] == step
            and os.path.basename(e["path"] or "") == name
            and e["saved_world"] == saved_world
            for e in item.resumed
        )
    # --- the trajectory is the uninterrupted one ---------------------------------------------
    spans = {
        groups[0]: (1, args.kill_after),
        groups[1]: (args.kill_after + 1, args.rejoin_after),
        groups[2]: (args.rejoin_after + 1, args.steps),
    }
    for group, (first, last) in spans.items():
        trained = {e["step"] for e in of("step", group=group)}
        checks[f"the group of {worlds[groups.index(group)]} trained steps {first}..{last}"] = (
            set(range(first, last + 1)) <= trained
        )
    steps = of("step")
    off = [
        (e["step"], e["world"], e["loss"])
        for e in steps
        if not math.isclose(e["loss"], reference[e["step"]], rel_tol=LOSS_RTOL)
    ]
    checks[
        f"all {len(steps)} logged step losses (every rank, every group) match an uninterrupted "
        f"run's to {LOSS_RTOL:g}" + (f"; off: {off[:3]}" if off else "")
    ] = bool(steps) and not off
    # --- checkpoints -------------------------------------------------------------------------
    final = root / "ckpt" / f"step_{args.steps:010d}"
    listing = sorted(p.name for p in (root / "ckpt").glob("step_*"))
    saved_steps = sorted({*range(args.every, args.steps + 1, args.every), args.steps})
    kept = [f"step_{s:010d}" for s in saved_steps[-args.keep_last :]]
    checks[f"keep_last={args.keep_last} kept the newest: {', '.join(kept)}"] = listing == kept
    if final.is_dir():
        checks.update(check_final_checkpoint(final, final_weights, args))
    else:
        checks[f"the final checkpoint {final.name} exists"] = False

    rows: list[tuple[str, ...]] = [
        ("membership change", "ranks", "detected", "group running", "first step", "resumed from")
    ]
    for item in changes:
        resumed = item.resumed[0] if item.resumed else {"step": -1, "saved_world": "?"}
        rows.append(
            (
                item.what,
                f"{item.worlds[0]} -> {item.worlds[1]}",
                _since(item.at, item.detected),
                _since(item.at, item.running),
                _since(item.at, item.first_step),
                f"step {resumed['step']} (saved by {resumed['saved_world']})",
            )
        )
    losses = {g: {e["step"]: e["loss"] for e in of("step", group=g, rank=0)} for g in groups}
    for item, (old, new), step in zip(
        changes,
        ((groups[0], groups[1]), (groups[1], groups[2])),
        (args.kill_after, args.rejoin_after),
        strict=True,
    ):
        before = losses[old].get(step + 1, math.nan)
        after = losses[new].get(step + 1, math.nan)
        rows.append(
            (
                f"loss of step {step + 1}",
                f"{before:.6f} on {item.worlds[0]} rank(s) before, {after:.6f} on "
                f"{item.worlds[1]} after, {reference[step + 1]:.6f} uninterrupted",
            )
        )
    return rows, checks


def change(records: Records, what: str, at: float, old: int, new: int) -> Change:
    """The timings of the change from group ``old`` to group ``new``."""
    of = records.of
    noticed = [e["t"] for e in of("lost-peer", group=old) + of("stopped", group=old)]
    firsts: dict[int, float] = {}
    for e in of("step", group=new):
        firsts.setdefault(e["rank"], e["t"])
    return Change(
        what,
        at,
        min((t for t in noticed if t >= at), default=math.nan),
        records.last_t("joined", group=new),
        max(firsts.values(), default=math.nan),
        (of("joined", group=old)[0]["world"], of("joined", group=new)[0]["world"]),
        of("resumed", group=new),
    )


def _since(at: float, t: float) -> str:
    return f"+{t - at:.2f} s"


def check_final_checkpoint(
    path: Path, reference: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, bool]:
    """Load the final checkpoint as a stranger would (one process, the whole) and compare it
    with the reference run's weights."""
    checks: dict[str, bool] = {}
    manifest = aiockpt.verify(path)
    whole = aiockpt.load(path)  # rank None: every DTensor assembled from the ranks' shards
    checks[f"the final checkpoint ({path.name}) was saved by 2 ranks"] = manifest.world_size == 2
    close = whole["model"].keys() == reference.keys() and all(
        torch.allclose(whole["model"][k], v, rtol=1e-4, atol=1e-6) for k, v in reference.items()
    )
    checks["its weights, loaded whole, are the uninterrupted run's"] = close
    # Torch's own loader, in this single process, into zeroed tensors of the whole shapes.
    template = zeros_like_state({"model": whole["model"], "optim": whole["optim"]})
    loaded = dcp_load(str(path), template)
    checks["torch's dcp.load (world size 1) of it equals aiockpt.load's"] = states_equal(
        loaded, {"model": whole["model"], "optim": whole["optim"]}
    )
    return checks


def print_table(rows: list[tuple[str, ...]]) -> None:
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    root = Path(args.root if args.root is not None else DEFAULT_ROOT).resolve()
    try:
        prepare_root(root)
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(
        f"demo: nodes A ({NODES['A']}) and B ({NODES['B']}) train {args.steps} steps, a "
        f"checkpoint every {args.every}; B is killed after step {args.kill_after} is saved "
        f"and restarted after step {args.rejoin_after}",
        flush=True,
    )
    exit_codes = run_job(args, root)
    rows, checks = summarize(args, root, Records.read(root / "events"), exit_codes)

    model = elastic_resume.build_model(args.width, args.hidden)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"\nelastic resume: an MLP of {parameters / 1e6:.2f}M parameters, FSDP2-sharded over "
        f"the group (gloo, CPU); times since the demo killed or started node B"
    )
    print_table([row for row in rows if len(row) > 2])
    for name, value in (row for row in rows if len(row) == 2):
        print(f"  {name}: {value}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'}  {name}")
    passed = all(checks.values())
    print(
        f"{'all checks passed' if passed else 'SOME CHECKS FAILED'} "
        f"({time.monotonic() - began:.1f} s; files in {root})"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
