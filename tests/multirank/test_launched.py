"""Multi-rank checkpointing as users run it: a trainer script under torchrun and under
aiockpt-run, with the trainers' own collectives running while checkpoints start lazily, and
failures raised on one rank or the other."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.multirank.launch import run_job

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "multirank" / "launched.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
AIOCKPT_RUN = [str(Path(sys.executable).parent / "aiockpt-run")]


def launch(launcher: list[str], scenario: str, out: Path, loop: str) -> list[dict[str, Any]]:
    """Run the scenario on 2 local ranks; return each rank's observations. The whole job is
    bounded: past the bound its process group is killed and the test fails with its output
    (a hang before the fix would otherwise last until gloo's 30-minute timeout)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [
        *launcher,
        "--standalone",
        "--nproc-per-node",
        "2",
        str(SCRIPT),
        scenario,
        str(out),
        loop,
    ]
    run_job(command, timeout=150)
    return [json.loads((out / f"result-{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize(
    ("launcher", "loop"),
    [(TORCHRUN, "asyncio"), (AIOCKPT_RUN, "uvloop")],
    ids=["torchrun-asyncio", "aiockpt-run-uvloop"],
)
def test_lazy_start_while_training_runs_collectives_does_not_deadlock(
    tmp_path: Path, launcher: list[str], loop: str
) -> None:
    results = launch(launcher, "lazy_start", tmp_path, loop)

    paths = [str(tmp_path / "ckpt" / f"step_{step:010d}") for step in (10, 20, 30)]
    assert results[0]["paths"] == results[1]["paths"] == paths
    assert results[0]["w0"] == results[1]["w0"]
    assert [r["collectives"] for r in results] == [30, 30]  # none of aiockpt's
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_0000000020", "step_0000000030"]


@pytest.mark.faults
def test_a_save_failing_on_one_rank_fails_everywhere_and_the_next_saves_work(
    tmp_path: Path,
) -> None:
    rank0, rank1 = launch(AIOCKPT_RUN, "failures", tmp_path, "asyncio")

    # Save 1: rank 1 refused an entry in save() itself; rank 0 learns it at once.
    assert rank1["1"]["raised_in_save"] and rank1["1"]["type"] == "TypeError"
    assert "'opaque'" in rank1["1"]["message"]
    assert rank0["1"]["type"] == "RankFailed"
    assert (rank0["1"]["rank"], rank0["1"]["error_type"]) == (1, "TypeError")
    assert "'opaque'" in rank0["1"]["message"]
    # Save 2: the same on the other side.
    assert rank0["2"]["raised_in_save"] and rank0["2"]["type"] == "TypeError"
    assert rank1["2"]["type"] == "RankFailed"
    assert (rank1["2"]["rank"], rank1["2"]["error_type"]) == (0, "TypeError")
    # Save 3: cancelled on rank 1.
    assert rank1["3"]["type"] == "CancelledError"
    assert rank0["3"]["type"] == "RankFailed" and rank0["3"]["rank"] == 1
    # Save 4: rank 1 never made it; rank 0 gives up after the coordination timeout.
    assert rank0["4"]["type"] == "CoordinationTimeout" and rank0["4"]["rank"] == 1
    # A skipped save may cost the save after it on the rank that skipped (its worker met
    # the others' worker late); from then on every save works on every rank.
    assert rank0["6"] == rank1["6"] == {"type": None}
    assert rank0["listing"] == rank1["listing"]
    assert "step_0000000006" in rank0["listing"]
    assert not {f"step_{s:010d}" for s in (1, 2, 3, 4)} & set(rank0["listing"])
