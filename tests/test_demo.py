"""`make demo` in a reduced mode: the same driver, launcher and training script, tiny model.

Two ranks under ``aiockpt-run`` train 8 steps with a checkpoint every 3; rank 1 dies in step 5
of the first attempt, the agent restarts both, and they resume from step 3. The driver runs
in-process (its ``main``), the launcher and ranks as subprocesses whose output ``capfd`` sees.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from examples import demo

#: 8 steps, checkpoints at 3 (attempt 0), 6 and 8 (attempt 1); rank 1 dies in step 5
REDUCED = ["--steps", "8", "--every", "3", "--crash-at", "5", "--keep-last", "2"]
TINY_MODEL = ["--width", "32", "--hidden", "64", "--batch", "8"]


def test_demo_crashes_restarts_resumes_and_checks_everything(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    # --timeout below pytest's own, so that a hang ends with the driver cleaning up
    argv = ["--root", str(root), *REDUCED, *TINY_MODEL, "--timeout", "100"]
    assert demo.main(argv) == 0
    out = capfd.readouterr().out

    # The crash, the restart from the last checkpoint before it, and a line per checkpoint
    # from rank 0 with the agent's prefix.
    assert "[default1]:rank 1: crashing on purpose in step 5 (attempt 0)" in out
    assert f"[default0]:resumed from {root / 'ckpt' / 'step_0000000003'} at step 3" in out
    assert len(re.findall(r"^\[default0\]:checkpoint step +\d+ ", out, flags=re.M)) == 3
    # The table, with the restart and its latency, and every check passed.
    latency = re.search(r"^  restart latency +([\d.]+) s  from the crash", out, flags=re.M)
    assert latency is not None, out
    assert float(latency[1]) > 0
    assert re.search(r"^  crash +rank 1, os\._exit\(1\) in step 5 of attempt 0$", out, re.M)
    assert f"final checkpoint        {root / 'ckpt' / 'step_0000000008'}" in out
    assert "FAIL" not in out
    assert "all checks passed" in out
    assert sorted(p.name for p in (root / "ckpt").iterdir() if p.name.startswith("step_")) == [
        "step_0000000006",
        "step_0000000008",
    ]

    # The checks do check: the same records with the crash left out, or with a replayed
    # step's loss changed, fail them.
    args = demo.parse_args(argv)
    records = demo.Records.read(root / "events")
    _, checks = demo.summarize(args, root, records, exit_code=0)
    assert checks and all(checks.values()), checks
    no_crash = demo.Records([e for e in records.events if e["event"] != "crash"])
    _, checks = demo.summarize(args, root, no_crash, exit_code=0)
    assert not checks["rank 1 crashed in step 5 of the first attempt"]
    diverged = demo.Records(
        [
            {**e, "loss": e["loss"] + 1e-3}
            if (e["event"], e["attempt"], e.get("step")) == ("step", 1, 4)
            else e
            for e in records.events
        ]
    )
    _, checks = demo.summarize(args, root, diverged, exit_code=0)
    assert not checks["step 4, trained before and after the crash: identical losses"]


def test_checkpoint_plan() -> None:
    # the defaults: saves at 20, 40, 60; rank 1 dies in step 70; resume from 60
    assert demo.checkpoint_plan(120, 20, 70) == ([20, 40, 60], 60, [80, 100, 120])
    # a crash right after a save resumes from it; a last step off the grid is saved too
    assert demo.checkpoint_plan(10, 3, 7) == ([3, 6], 6, [9, 10])


def test_a_foreign_root_is_refused_and_a_previous_demo_root_replaced(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        demo.prepare_root(foreign)
    assert (foreign / "precious").read_text() == "mine"
    assert demo.main(["--root", str(foreign)]) == 2

    previous = tmp_path / "previous"
    demo.prepare_root(previous)
    (previous / "ckpt").mkdir()
    demo.prepare_root(previous)
    assert sorted(p.name for p in previous.iterdir()) == [demo.MARKER]


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.parse_args(["--every", "20", "--crash-at", "10"])  # no checkpoint before it
    assert "--every < --crash-at <= --steps" in capsys.readouterr().err
    assert isinstance(demo.parse_args([]), argparse.Namespace)
