"""`make demo` in a reduced mode: the same driver, agents and training script, tiny model.

Two ``aiockpt-run`` agents ("nodes" A and B on 127.0.0.2 and .3, dynamic rendezvous, one FSDP2
worker each) train 12 steps with a checkpoint every 3. Once step 3 is saved, B's agent is
SIGKILLed and A goes on alone from step 3 (resharded 2 -> 1); once step 6 is saved, B starts
again and both go on from step 6 (resharded 1 -> 2). The driver runs in-process (its
``main``), the agents and workers as subprocesses whose output ``capfd`` sees.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest

from examples import demo

#: 12 steps, a checkpoint every 3; B killed once step 3 is saved, back once step 6 is
REDUCED = ["--steps", "12", "--every", "3", "--kill-after", "3", "--rejoin-after", "6"]
TINY_MODEL = ["--width", "16", "--hidden", "32", "--global-batch", "8"]


def test_demo_loses_a_node_gains_it_back_and_resumes_resharded_each_time(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    # --timeout below pytest's own, so that a hang ends with the driver cleaning up
    argv = ["--root", str(root), *REDUCED, *TINY_MODEL, "--timeout", "150"]
    assert demo.main(argv) == 0
    out = capfd.readouterr().out

    # Each new group resumed from the checkpoint the demo waited for, resharded.
    ckpt = root / "ckpt"
    assert f"[A]:resumed from {ckpt / 'step_0000000003'} at step 3 (saved by 2 rank(s), now 1;" in (
        out
    )
    assert f"[A]:resumed from {ckpt / 'step_0000000006'} at step 6 (saved by 1 rank(s), now 2;" in (
        out
    )
    # The table: each change with its timings, in the order they happen.
    for change, ranks in (("node B lost (SIGKILL)", "2 -> 1"), ("node B rejoined", "1 -> 2")):
        row = re.search(
            rf"^  {re.escape(change)} +{ranks} +\+([\d.]+) s +\+([\d.]+) s +\+([\d.]+) s ",
            out,
            flags=re.M,
        )
        assert row is not None, out
        detected, running, first_step = map(float, row.groups())
        assert 0 <= detected <= running <= first_step
    assert "FAIL" not in out
    assert "all checks passed" in out

    # No jump in the loss: every step any group trained, before and after each change, has
    # the loss of an uninterrupted single-process run of the same seed and data order.
    args = demo.parse_args(argv)
    records = demo.Records.read(root / "events")
    reference, _ = demo.reference_run(args)
    groups = records.groups()
    assert [records.of("joined", group=g)[0]["world"] for g in groups] == [2, 1, 2]
    for old, new, resumed_at in ((groups[0], groups[1], 3), (groups[1], groups[2], 6)):
        before = {e["step"]: e["loss"] for e in records.of("step", group=old)}
        after = {e["step"]: e["loss"] for e in records.of("step", group=new)}
        assert min(after) == resumed_at + 1
        first = resumed_at + 1  # the old group trained it too (held before its next save)
        assert math.isclose(after[first], before[first], rel_tol=demo.LOSS_RTOL)
        assert math.isclose(after[first], reference[first], rel_tol=demo.LOSS_RTOL)
    for e in records.of("step"):
        assert math.isclose(e["loss"], reference[e["step"]], rel_tol=demo.LOSS_RTOL), e

    # The checks do check: the same records with a jump in the loss, with a group resuming
    # from a checkpoint of the wrong size, or without the kill, fail them.
    codes = {"A": 0, "B": 0}
    _, checks = demo.summarize(args, root, records, codes)
    assert checks and all(checks.values()), checks
    jumped = demo.Records(
        [
            {**e, "loss": e["loss"] * 1.01}
            if (e["event"], e.get("group"), e.get("step")) == ("step", groups[1], 4)
            else e
            for e in records.events
        ]
    )
    _, checks = demo.summarize(args, root, jumped, codes)
    assert [name for name, ok in checks.items() if not ok] == [
        next(name for name in checks if name.startswith("all 27 logged step losses"))
    ]
    resized = demo.Records(
        [
            {**e, "saved_world": 1} if (e["event"], e.get("group")) == ("resumed", groups[1]) else e
            for e in records.events
        ]
    )
    _, checks = demo.summarize(args, root, resized, codes)
    resumed_check = "node B lost (SIGKILL): all 1 rank(s) resumed from step_0000000003, saved by 2"
    assert not checks[resumed_check]
    no_kill = demo.Records([e for e in records.events if e["event"] != "kill-node"])
    _, checks = demo.summarize(args, root, no_kill, codes)
    assert not all(checks.values())
    _, checks = demo.summarize(args, root, records, {"A": 0})
    assert not checks["both agents (A, and B restarted) exited 0"]


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kill-after", "7"], "must be checkpoint steps"),
        (["--kill-after", "20", "--rejoin-after", "10"], "0 < --kill-after < --rejoin-after"),
        (["--steps", "22"], "training goes on after it"),
        (["--every", "1"], "--every at least 2"),
        (["--global-batch", "7"], "must be even"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults_are_consistent() -> None:
    args = demo.parse_args([])
    assert isinstance(args, argparse.Namespace)
    assert demo.hold_step(args.kill_after, args.every) < args.rejoin_after
