"""`make demo`: two ranks train under ``aiockpt-run``, checkpoint without stopping, one crashes,
the group restarts and resumes where the last checkpoint left it; then everything is checked.

The driver runs ``python -m aiockpt.run --standalone --nproc-per-node 2 --max-restarts 1 ...
examples/elastic_resume.py`` (its output streams through, rank 0 printing a line per durable
checkpoint), in which a data-parallel MLP of ~3.9M parameters trains on two gloo ranks on the
CPU and checkpoints every ``--every`` steps through ``aiockpt.Checkpointer``: one checkpoint
directory per save, every rank's worker writing its part. Rank 1 dies on purpose in step
``--crash-at`` of the first attempt; the agent restarts both ranks, and each loads its part
of the checkpoint ``latest()`` names. From the ranks' event records the driver then prints a
table (steps, checkpoints, median blocking and durable time per save, restart latency, the
final checkpoint) and checks that:

* the crash and the restart happened, and the restarted ranks resumed from the last checkpoint
  before the crash (step counter and loss continue; the steps trained on both sides of the
  crash have identical losses, so the run follows the uninterrupted trajectory);
* the expected checkpoints were written, and ``keep_last`` kept the newest ones;
* the final checkpoint, loaded with torch's own ``torch.distributed.checkpoint.load`` in this
  process (world size 1, into a freshly built model and zeroed optimizer state), equals the live
  final state rank 0 ``torch.save``d, as does ``aiockpt.load`` of every rank's part.

Exits 0 only if every check passed.

    python -m examples.demo [--steps 120] [--every 20] [--crash-at 70] [--root DIR]

``--root`` (default: a fixed directory under the temp dir, replaced on each run) keeps the
checkpoints (``ckpt/``), the ranks' records (``events/``) and the worker logs (``logs/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import aiockpt
from examples import elastic_resume
from examples.async_trainer import dcp_load, states_equal, zeros_like_state

#: the demo's own directory when no --root is given; replaced on every run
DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "examples-ckpt", "elastic_resume")
#: marks a --root as the demo's, so that a second run may replace it
MARKER = ".aiockpt-elastic-demo"
SCRIPT = Path(elastic_resume.__file__).resolve()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=120, help="train up to this step")
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument(
        "--crash-at", type=int, default=70, help="rank 1 dies in this step of the first attempt"
    )
    parser.add_argument(
        "--root", default=None, help=f"empty or a previous demo's directory ({DEFAULT_ROOT})"
    )
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (at least 2: rank 1 crashes)")
    parser.add_argument("--width", type=int, default=512, help="model input and output features")
    parser.add_argument("--hidden", type=int, default=1536, help="model hidden features")
    parser.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up")
    args = parser.parse_args(argv)
    if min(args.steps, args.every, args.keep_last) < 1:
        parser.error("--steps, --every and --keep-last must be at least 1")
    if not args.every < args.crash_at <= args.steps:
        parser.error("need --every < --crash-at <= --steps: a checkpoint before the crash")
    if args.nproc < 2:
        parser.error("--nproc must be at least 2")
    return args


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


def launch_command(args: argparse.Namespace, root: Path) -> list[str]:
    """``aiockpt-run`` with the training script, as a user would type it."""
    return [
        sys.executable,
        "-m",
        "aiockpt.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "--max-restarts=1",
        "--tee=3",  # both ranks' output on the console, each line prefixed with its rank
        f"--log-dir={root / 'logs'}",
        str(SCRIPT),
        f"--root={root / 'ckpt'}",
        f"--events={root / 'events'}",
        f"--steps={args.steps}",
        f"--every={args.every}",
        f"--crash-at={args.crash_at}",
        f"--keep-last={args.keep_last}",
        f"--width={args.width}",
        f"--hidden={args.hidden}",
        f"--batch={args.batch}",
    ]


def run_launcher(command: list[str], timeout: float) -> int:
    """Run the launcher with its output streaming through; return its exit code.

    Past ``timeout``, SIGTERM lets the agent stop its workers; SIGKILL follows if it does not.
    """
    env = dict(os.environ)
    # Each rank single-threaded: N ranks share the cores (aiockpt-run would set it too, with
    # a warning).
    env.setdefault("OMP_NUM_THREADS", "1")
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"demo: no result after {timeout:.0f} s; stopping the launcher", flush=True)
        return 124
    finally:
        # After a timeout or an interruption (Ctrl-C reached the agent too): SIGTERM has the
        # agent stop its workers; SIGKILL if it does not within its own shutdown deadline.
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def checkpoint_plan(steps: int, every: int, crash_at: int) -> tuple[list[int], int, list[int]]:
    """The checkpoint steps of the first attempt, the step the restart resumes from, and the
    checkpoint steps of the second attempt.

    Rank 1 dies in step ``crash_at`` (after it waited for every save in flight), so the first
    attempt committed every multiple of ``every`` below it, and the newest is where the second
    attempt starts; it saves every multiple of ``every`` after that, and the last step.
    """
    first = list(range(every, crash_at, every))
    resume = first[-1]
    second = sorted({*range(resume + every, steps + 1, every), steps})
    return first, resume, second


def check_final_checkpoint(
    path: str, reference: dict[str, Any], args: argparse.Namespace
) -> dict[str, bool]:
    """Load ``path`` as a stranger would and compare it with the live final state."""
    checks: dict[str, bool] = {}
    # Torch's own loader, in this single process, into a model built from another seed (so
    # every weight has to come from the checkpoint) and a zeroed optimizer state of the live
    # one's layout (a fresh AdamW has no state yet to give dcp.load the layout).
    fresh = elastic_resume.build_model(args.width, args.hidden, seed=1)
    template = {
        "model": fresh.state_dict(),
        "optim": zeros_like_state(reference["optim"]),
        "step": 0,
        "loss": 0.0,
    }
    differed = not states_equal(template["model"], reference["model"])
    loaded = dcp_load(path, template)
    checks["torch's dcp.load (world size 1) of the final checkpoint equals the live state"] = (
        differed and states_equal(loaded, reference)
    )
    manifest = aiockpt.verify(path)
    checks[f"aiockpt.load of each of the {manifest.world_size} ranks' parts agrees"] = all(
        states_equal(aiockpt.load(path, rank=rank), reference)
        for rank in range(manifest.world_size)
    )
    return checks


class Records:
    """The ranks' event records, with the lookups the checks need."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    @classmethod
    def read(cls, directory: Path) -> Records:
        """Every rank's records, in the order each rank wrote them."""
        events: list[dict[str, Any]] = []
        for path in sorted(directory.glob("rank*.jsonl")):
            with path.open() as f:
                events.extend(json.loads(line) for line in f if line.strip())
        return cls(events)

    def of(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """The records of kind ``event`` whose fields equal ``match``."""
        return [
            e
            for e in self.events
            if e["event"] == event and all(e.get(k) == v for k, v in match.items())
        ]

    def losses(self, attempt: int) -> dict[int, float]:
        """Step -> loss (the mean over the ranks) of one attempt, as rank 0 logged it."""
        return {e["step"]: e["loss"] for e in self.of("step", attempt=attempt, rank=0)}

    def last_t(self, event: str, **match: Any) -> float:
        """When the last rank got to ``event`` (NaN if none did)."""
        return max((e["t"] for e in self.of(event, **match)), default=math.nan)


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}..{last}"


def summarize(
    args: argparse.Namespace, root: Path, records: Records, exit_code: int
) -> tuple[list[tuple[str, str]], dict[str, bool]]:
    """The table's rows and the checks' outcomes, from the ranks' records and the files."""
    of = records.of
    checks: dict[str, bool] = {"aiockpt-run exited 0": exit_code == 0}
    first_saves, resume, second_saves = checkpoint_plan(args.steps, args.every, args.crash_at)

    # --- the crash and the restart happened --------------------------------------------------
    crashes = of("crash", attempt=0)
    restarted = {e["rank"] for e in of("start", attempt=1)}
    checks[f"rank 1 crashed in step {args.crash_at} of the first attempt"] = [
        (e["rank"], e["step"]) for e in crashes
    ] == [(1, args.crash_at)]
    checks[f"the agent restarted the {args.nproc} ranks, once"] = restarted == set(
        range(args.nproc)
    ) and not of("start", attempt=2)
    if not crashes or not restarted:
        return [], checks
    crash_t = crashes[0]["t"]

    # --- resumed, not restarted --------------------------------------------------------------
    before, after = records.losses(0), records.losses(1)
    resumed = of("resumed", attempt=1)
    name = f"step_{resume:010d}"
    checks[f"every rank resumed from {name}, the last checkpoint before the crash"] = len(
        resumed
    ) == args.nproc and all(
        e["step"] == resume and os.path.basename(e["path"] or "") == name for e in resumed
    )
    checks[f"the step counter continued: attempt 1 trained {_steps(resume + 1, args.steps)}"] = (
        sorted(after) == list(range(resume + 1, args.steps + 1))
    )
    checks[f"the loss continued: the loss saved at step {resume} is the one logged there"] = bool(
        resumed
    ) and math.isclose(resumed[0]["loss"], before.get(resume, math.nan), rel_tol=1e-6)
    # Each step's batch comes from the step number: the steps between the checkpoint and the
    # crash were trained twice, from the same weights, and must give the same losses.
    replayed = range(resume + 1, args.crash_at)
    checks[
        f"{_steps(resume + 1, args.crash_at - 1)}, trained before and after the crash: "
        "identical losses"
    ] = all(math.isclose(before.get(s, math.nan), after.get(s, math.inf)) for s in replayed)

    # --- checkpoints -------------------------------------------------------------------------
    per_save: dict[int, list[dict[str, Any]]] = {}
    for e in of("checkpoint"):
        per_save.setdefault(e["step"], []).append(e)
    expected = first_saves + second_saves
    checks[f"{len(expected)} checkpoints written, at steps {expected}"] = sorted(per_save) == (
        expected
    ) and all(len(saves) == args.nproc for saves in per_save.values())
    listing = sorted(p.name for p in (root / "ckpt").glob("step_*"))
    kept = [f"step_{s:010d}" for s in expected[-args.keep_last :]]
    checks[f"keep_last={args.keep_last} kept the newest: {', '.join(kept)}"] = listing == kept
    # A data-parallel step waits for its slowest rank: per save, take the slowest rank's time.
    blocking = [max(e["blocking_ms"] for e in saves) for saves in per_save.values()]
    durable = [max(e["durable_ms"] for e in saves) for saves in per_save.values()]
    nbytes = max((e["nbytes"] for saves in per_save.values() for e in saves), default=0)

    # --- the final state ---------------------------------------------------------------------
    done = of("done", attempt=1)
    final = str(root / "ckpt" / f"step_{args.steps:010d}")
    checks[f"the {args.nproc} replicas ended with the same weights"] = (
        len(done) == args.nproc and len({e["weights"] for e in done}) == 1
    )
    checks[f"the newest checkpoint is the last step's ({os.path.basename(final)})"] = bool(
        done
    ) and all(e["latest"] == final for e in done)
    reference_path = root / "events" / elastic_resume.REFERENCE_NAME
    if reference_path.exists() and os.path.isdir(final):
        reference = torch.load(reference_path, weights_only=True)
        checks.update(check_final_checkpoint(final, reference, args))
    else:
        checks["the final checkpoint and rank 0's live state exist"] = False

    def since_crash(t: float, sign: str = "+") -> str:
        return f"{sign}{t - crash_t:.2f} s".rjust(8)  # the column of seconds lines up

    started = min((e["t"] for e in of("start", attempt=1)), default=math.nan)
    first_step = records.last_t("step", attempt=1, step=resume + 1)
    rows = [
        (
            "steps",
            f"{args.steps}: 1..{max(before, default=0)} on attempt 0, "
            f"{resume + 1}..{max(after, default=0)} on attempt 1",
        ),
        (
            "checkpoints written",
            f"{len(per_save)} at steps {', '.join(map(str, sorted(per_save)))} "
            f"({nbytes / 1e6:.1f} MB each, {len(listing)} kept)",
        ),
        ("median blocking / save", f"{_median(blocking):.1f} ms  save() + await staged"),
        (
            "median durable / save",
            f"{_median(durable):.1f} ms  committed and fsynced "
            f"(max {max(durable, default=math.nan):.0f} ms: a first save waits for the worker)",
        ),
        ("crash", f"rank 1, os._exit(1) in step {args.crash_at} of attempt 0"),
        (
            "restart latency",
            f"{since_crash(first_step, sign='')}  from the crash to the first resumed step",
        ),
        ("", f"{since_crash(started)}  new ranks running (the agent stopped rank 0, restarted)"),
        ("", f"{since_crash(records.last_t('joined', attempt=1))}  torch imported, gloo joined"),
        ("", f"{since_crash(records.last_t('resumed', attempt=1))}  model built, {name} loaded"),
        ("", f"{since_crash(first_step)}  step {resume + 1} trained"),
        (
            "",
            f"{since_crash(records.last_t('ready', attempt=1))}  checkpoint workers up "
            "(started in the background)",
        ),
        (
            "loss",
            f"{before.get(1, math.nan):.5f} at step 1, {before.get(resume, math.nan):.5f} at "
            f"step {resume} (saved), {after.get(args.steps, math.nan):.5f} at step {args.steps}",
        ),
        (
            f"loss of step {resume + 1}",
            f"{after.get(resume + 1, math.nan):.5f} after the restart, "
            f"{before.get(resume + 1, math.nan):.5f} before the crash",
        ),
        ("final checkpoint", final),
    ]
    return rows, checks


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    root = Path(args.root if args.root is not None else DEFAULT_ROOT).resolve()
    try:
        prepare_root(root)
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    command = launch_command(args, root)
    print(
        f"demo: {args.nproc} ranks train {args.steps} steps with a checkpoint every {args.every}; "
        f"rank 1 crashes in step {args.crash_at}, and aiockpt-run restarts the group",
        flush=True,
    )
    print("demo: python " + shlex.join(command[1:]), flush=True)
    exit_code = run_launcher(command, args.timeout)
    rows, checks = summarize(args, root, Records.read(root / "events"), exit_code)

    model = elastic_resume.build_model(args.width, args.hidden)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"\nelastic resume: {args.nproc} ranks (gloo, CPU) training a {parameters / 1e6:.2f}M-"
        f"parameter MLP, checkpoint every {args.every} steps"
    )
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
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
