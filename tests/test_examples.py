"""The examples, each in a reduced mode (small model, few steps), through their own ``main``.

Each example's ``main`` runs ``asyncio.run`` itself (or a ``SyncCheckpointer`` with its own
loop thread), so these are plain synchronous tests; they run in-process, which spares the
torch import a subprocess would pay.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import aiockpt
from examples import async_rl, async_trainer, sync_trainer

#: a small trainer: 32 -> 64 -> 32, checkpoints at steps 4 and 6 of each 6-step run
TRAINER_ARGS = ["--width", "32", "--hidden", "64", "--batch", "16", "--every", "4"]
STEPS = 6
KEEP_LAST = 2


def reference_run(steps: int) -> tuple[dict[int, float], nn.Module]:
    """The reduced trainer's losses and final model, trained without any checkpointing."""
    width, hidden, batch = 32, 64, 16
    model = async_trainer.build_model(width, hidden)
    optimizer = async_trainer.build_optimizer(model, lr=1e-3)
    losses: dict[int, float] = {}
    for step in range(1, steps + 1):
        inputs, targets = async_trainer.make_batch(step, batch, width)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[step] = loss.item()
    return losses, model


def run_trainer(main: Any, root: Path, report: Path) -> dict[str, Any]:
    argv = ["--root", str(root), "--steps", str(STEPS), "--keep-last", str(KEEP_LAST)]
    assert main([*argv, *TRAINER_ARGS, "--report", str(report)]) == 0
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def check_resumed_training(main: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ckpt"
    first = run_trainer(main, root, tmp_path / "first.json")
    assert (first["start_step"], first["end_step"]) == (0, STEPS)
    assert [c["step"] for c in first["checkpoints"]] == [4, 6]
    assert "starting from scratch" in capsys.readouterr().out

    second = run_trainer(main, root, tmp_path / "second.json")
    out = capsys.readouterr().out
    # The step counter continues from the step the first run reached ...
    assert f"resumed from {root / 'step_0000000006'} at step {STEPS}" in out
    assert (second["start_step"], second["end_step"]) == (STEPS, 2 * STEPS)
    assert [int(s) for s in second["losses"]] == list(range(STEPS + 1, 2 * STEPS + 1))
    assert [c["step"] for c in second["checkpoints"]] == [8, 12]
    assert second["retained"] == ["step_0000000008", "step_0000000012"]  # keep_last=2
    assert len(re.findall(r"^checkpoint step ", out, flags=re.M)) == 2  # a line per checkpoint
    assert all(second["checks"].values()), second["checks"]

    # ... and so does the loss: both runs together trained exactly as one uninterrupted run.
    expected, model = reference_run(2 * STEPS)
    losses = {int(s): v for s, v in (first["losses"] | second["losses"]).items()}
    assert losses.keys() == expected.keys()
    for step, loss in losses.items():
        assert math.isclose(loss, expected[step], rel_tol=1e-5), (step, loss, expected[step])

    # The final checkpoint loads with torch's own DCP loader and holds the final state.
    latest = second["latest"]
    assert latest == str(root / "step_0000000012")
    fresh = async_trainer.build_model(32, 64, seed=1)
    saved = aiockpt.load(latest)  # the optimizer state's layout, for dcp.load to fill
    template = {
        "model": fresh.state_dict(),
        "optim": async_trainer.zeros_like_state(saved["optim"]),
        "step": 0,
        "loss": 0.0,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dcp: "assuming a single process"
        dcp.load(template, checkpoint_id=latest, no_dist=True)
    assert template["step"] == 2 * STEPS
    assert template["loss"] == losses[2 * STEPS]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(template["model"][name], tensor, rtol=1e-5, atol=1e-6)
    assert async_trainer.states_equal(template["optim"], saved["optim"])
    assert template["optim"]["state"][0]["exp_avg"].abs().sum() > 0  # filled, not the zeros


def test_async_trainer_resumes_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check_resumed_training(async_trainer.main, tmp_path, capsys)


def test_sync_trainer_resumes_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check_resumed_training(sync_trainer.main, tmp_path, capsys)


def test_async_rl_publishes_only_whole_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = 4
    argv = ["--root", str(tmp_path / "rl"), "--steps", str(steps), "--rollouts", "2"]
    argv += ["--envs", "8", "--contexts", "32", "--hidden", "256", "--batch", "2", "--keep", "2"]
    threads = torch.get_num_threads()
    assert async_rl.main([*argv, "--report", str(tmp_path / "rl.json")]) == 0
    assert torch.get_num_threads() == threads  # restored
    report = json.loads((tmp_path / "rl.json").read_text())
    assert all(report["checks"].values()), report["checks"]
    runs = {run["method"]: run for run in report["runs"]}
    assert set(runs) == {async_rl.AIOCKPT, async_rl.BLOCKING}
    for method, run in runs.items():
        # Every version was published, in order, and the pointer names the last one.
        assert run["published"] == list(range(steps + 1)), method
        assert run["final_pointer"] == f"v_{steps:06d}", method
        assert run["final_pointer"] in run["versions_on_disk"]
        assert len(run["versions_on_disk"]) <= 2
        # Every load a rollout did was a fully published version, exactly as published.
        assert run["loads"], method
        for load in run["loads"]:
            assert load["version"] in run["published"], load
            assert load["embedded"] == load["version"], load
            assert load["fingerprint"] == load["published"], load
        assert run["longest_stall_ms"] > 0, method
    # The aiockpt variant wrote plain safetensors files that inference engines read.
    published = tmp_path / "rl" / "aiockpt" / f"v_{steps:06d}" / "model.safetensors"
    assert int(safetensors.torch.load_file(published)["version"]) == steps

    # Both stall figures, side by side, as positive numbers (no threshold: the machine is noisy).
    out = capsys.readouterr().out
    assert re.search(r"aiockpt\.async_save\s+torch\.save on the loop", out)
    row = re.search(r"^longest rollout stall\s+([\d.]+) ms\s+([\d.]+) ms$", out, flags=re.M)
    assert row is not None, out
    assert float(row[1]) > 0 and float(row[2]) > 0
