"""``aiockpt.dcp``, the drop-in for ``torch.distributed.checkpoint``: torch's signatures,
unsupported arguments refused, and the same torchtitan-style trainer (``examples.dcp_trainer``)
run with torch's DCP and with aiockpt's, on one process and on 2 ranks (FSDP2 over gloo,
under torchrun and aiockpt-run), each resuming what the other wrote, with the same losses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

import aiockpt
import aiockpt.dcp
from examples import dcp_trainer
from tests.multirank.launch import run_job

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
AIOCKPT_RUN = [str(Path(sys.executable).parent / "aiockpt-run")]


@pytest.fixture(autouse=True)
def closed_checkpointers() -> Iterator[None]:
    """aiockpt.dcp's workers live until exit otherwise; the leak check wants them gone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "assuming a single process"
        try:
            yield
        finally:
            aiockpt.dcp.close_checkpointers()


@pytest.mark.parametrize("name", ["save", "async_save", "load"])
def test_signatures_are_torchs(name: str) -> None:
    """Every parameter of torch 2.13's function, by name, kind and default (aiockpt may add
    keyword-only ones after them)."""
    theirs = inspect.signature(getattr(torch_dcp, name)).parameters
    ours = inspect.signature(getattr(aiockpt.dcp, name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for parameter in theirs.values():
        assert ours[parameter.name].kind == parameter.kind, parameter.name
        assert ours[parameter.name].default == parameter.default, parameter.name


class CustomPlanner(DefaultSavePlanner):
    pass


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: aiockpt.dcp.save({}, checkpoint_id="s3://bucket/ckpt"), "is a URL"),
        (lambda: aiockpt.dcp.save({}), "pass checkpoint_id"),
        (
            lambda: aiockpt.dcp.save({}, storage_writer=object()),  # type: ignore[arg-type]
            "storage_writer=object is not supported",
        ),
        (
            lambda: aiockpt.dcp.save({}, checkpoint_id="x", planner=CustomPlanner()),
            "planner=CustomPlanner is not supported",
        ),
        (
            lambda: aiockpt.dcp.save(
                {}, checkpoint_id="x", planner=DefaultSavePlanner(flatten_state_dict=False)
            ),
            "flatten_state_dict=True",
        ),
        (
            lambda: aiockpt.dcp.save({}, checkpoint_id="x", use_collectives=False),
            "use_collectives=False",
        ),
        (
            lambda: aiockpt.dcp.async_save({}, checkpoint_id="x", async_stager=object()),
            "async_stager",
        ),
        (
            lambda: aiockpt.dcp.load(
                {}, checkpoint_id="x", planner=DefaultLoadPlanner(allow_partial_load=True)
            ),
            "allow_partial_load",
        ),
    ],
    ids=["url", "no-path", "writer", "planner", "flat", "uncoordinated", "stager", "partial"],
)
def test_what_aiockpt_does_not_support_is_refused(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_save_async_save_and_load_round_trip_with_torchs_own_storage_objects(
    tmp_path: Path,
) -> None:
    """FileSystemWriter/Reader give their path; async_save's future is a
    concurrent.futures.Future with result() and also awaitable; torch's dcp.load reads it."""
    model = torch.nn.Linear(4, 3)
    state = {"model": model, "step": 3}
    result = aiockpt.dcp.save(state, storage_writer=FileSystemWriter(str(tmp_path / "a")))
    assert isinstance(result, aiockpt.SaveResult) and result.path == str(tmp_path / "a")

    future = aiockpt.dcp.async_save(state, checkpoint_id=tmp_path / "b")
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=60).path == str(tmp_path / "b")

    async def awaited() -> aiockpt.SaveResult:
        return await aiockpt.dcp.async_save(state, checkpoint_id=tmp_path / "c")

    assert asyncio.run(awaited()).path == str(tmp_path / "c")

    for name in "abc":
        fresh = torch.nn.Linear(4, 3)
        target = {"model": fresh, "step": 0}
        aiockpt.dcp.load(target, storage_reader=FileSystemReader(str(tmp_path / name)))
        assert torch.equal(fresh.weight, model.weight) and target["step"] == 3
        by_torch = {"model": torch.nn.Linear(4, 3), "step": 0}
        torch_dcp.load(by_torch, checkpoint_id=str(tmp_path / name))
        assert torch.equal(by_torch["model"].weight, model.weight)  # type: ignore[attr-defined]
    # torch's default: saving again to the same checkpoint replaces it.
    model.weight.data.add_(1)
    aiockpt.dcp.save(state, checkpoint_id=tmp_path / "a")
    assert torch.equal(aiockpt.load(tmp_path / "a")["model"]["weight"], model.weight.detach())


def train(tmp_path: Path, checkpointing: str, root: str, steps: int, *extra: str) -> Any:
    report = tmp_path / f"{root}-{checkpointing}-{steps}.json"
    argv = ["--checkpointing", checkpointing, "--root", str(tmp_path / root)]
    argv += ["--steps", str(steps), "--every", "2", "--report", str(report), *extra]
    assert dcp_trainer.main(argv) == 0
    return {int(k): v for k, v in json.loads(report.read_text())["losses"].items()}


def test_the_trainer_switched_by_one_import_trains_and_resumes_the_same(tmp_path: Path) -> None:
    """One process: torch's run is the reference; aiockpt's run stopped at step 3 and
    resumed from its own latest step-2; each resumes the other's step-2 checkpoint; every
    loss is the reference's."""
    reference = train(tmp_path, "torch", "torch", 6)
    assert sorted(reference) == list(range(1, 7))

    first = train(tmp_path, "aiockpt", "ours", 3)
    resumed = train(tmp_path, "aiockpt", "ours", 6)
    assert sorted(resumed) == [3, 4, 5, 6]  # resumed from its latest, step-2
    assert first | resumed == reference

    torch_ckpt, our_ckpt = tmp_path / "torch" / "step-2", tmp_path / "ours" / "step-2"
    assert aiockpt.list_checkpoints(tmp_path / "torch")[0].unverified
    assert not aiockpt.list_checkpoints(tmp_path / "ours")[0].unverified
    theirs_by_us = train(tmp_path, "aiockpt", "c", 6, "--initial-load-path", str(torch_ckpt))
    ours_by_them = train(tmp_path, "torch", "d", 6, "--initial-load-path", str(our_ckpt))
    assert theirs_by_us == ours_by_them == {s: reference[s] for s in range(3, 7)}


def launch(launcher: list[str], checkpointing: str, root: Path, *extra: str) -> dict[int, float]:
    """The trainer on 2 local ranks (FSDP2, gloo); rank 0's report of the mean losses. The
    job is bounded: past the bound its process group is killed and the test fails."""
    report = root.with_suffix(".json")
    command = [*launcher, "--standalone", "--nproc-per-node", "2"]
    command += [str(ROOT / "examples" / "dcp_trainer.py"), "--checkpointing", checkpointing]
    command += ["--root", str(root), "--steps", "4", "--report", str(report), *extra]
    run_job(command, timeout=240)
    return {int(k): v for k, v in json.loads(report.read_text())["losses"].items()}


@pytest.mark.multirank
def test_two_fsdp_ranks_train_and_resume_the_same_either_way(tmp_path: Path) -> None:
    """torch's DCP under torchrun is the reference; aiockpt.dcp under aiockpt-run resumes
    torch's step-2 and saves every step after it; torch's DCP under aiockpt-run resumes
    aiockpt's step-3: the same losses at every step. Then the final checkpoints, sharded by
    2 ranks, load in one process crosswise (torch's dcp.load of aiockpt's, aiockpt.load of
    torch's) into the same weights. Three launches (each pays seconds of imports on every
    rank): each format is written by its own trainer and resumed by the other's, and each
    launcher runs each trainer but aiockpt.dcp under torchrun (tests/multirank/test_launched
    runs aiockpt under torchrun)."""
    torch_root, our_root = tmp_path / "torch", tmp_path / "ours"
    reference = launch(TORCHRUN, "torch", torch_root)
    assert sorted(reference) == [1, 2, 3, 4]
    from_torch = ("--initial-load-path", str(torch_root / "step-2"), "--every", "1")
    assert launch(AIOCKPT_RUN, "aiockpt", our_root, *from_torch) == {
        step: reference[step] for step in (3, 4)
    }
    assert sorted(p.name for p in our_root.iterdir()) == ["step-3", "step-4"]
    from_ours = ("--initial-load-path", str(our_root / "step-3"))
    assert launch(AIOCKPT_RUN, "torch", tmp_path / "d", *from_ours) == {4: reference[4]}

    whole_of_theirs = aiockpt.load(torch_root / "step-4", allow_pickle=True)["app"]["model"]
    model = dcp_trainer.build_model(world_size=1)
    torch_dcp.load({"app": {"model": model.state_dict()}}, checkpoint_id=str(our_root / "step-4"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, whole_of_theirs[name]), name
    untrained = dcp_trainer.build_model(world_size=1).state_dict()["0.weight"]
    assert not torch.equal(model.state_dict()["0.weight"], untrained)  # loaded, trained
