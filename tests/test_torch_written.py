"""Checkpoints that torch's ``dcp.save`` wrote, under a Checkpointer's root: listed (marked
unverified), found by ``latest()``, refused loudly by ``aiockpt.load`` unless the caller
allows unpickling, then loaded by torch's own reader; never deleted by retention."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiockpt
from aiockpt._format.commit import TEMP_PREFIX


def torch_save(path: Path, state: dict[str, object]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming a single process"
        dcp.save(state, checkpoint_id=str(path))


STATE = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, "step": 5}


def test_listing_marks_torch_written_checkpoints_unverified(tmp_path: Path) -> None:
    torch_save(tmp_path / "step-5", STATE)
    with aiockpt.SyncCheckpointer(tmp_path) as ckpt:
        ckpt.save({"w": torch.zeros(2)}, step=3).result()
    # Neither an unfinished torch save (no .metadata) nor an aiockpt save in progress
    # (.metadata before its manifest) is a checkpoint.
    (tmp_path / "step-9").mkdir()
    (tmp_path / "step-9" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / f"{TEMP_PREFIX}step_0000000010-x").mkdir()
    (tmp_path / f"{TEMP_PREFIX}step_0000000010-x" / ".metadata").write_bytes(b"x")

    listed = aiockpt.list_checkpoints(tmp_path)
    assert [(c.name, c.unverified, c.step) for c in listed] == [
        ("step-5", True, 5),
        ("step_0000000003", False, 3),
    ]
    assert listed[0].path == str(tmp_path / "step-5")


async def test_latest_finds_a_torch_written_checkpoint_and_load_latest_refuses_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run switched from torch's DCP must not silently start from scratch."""
    torch_save(tmp_path / "step-5", STATE)
    ckpt = aiockpt.Checkpointer(tmp_path, read_only=True)
    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        assert await ckpt.latest() == str(tmp_path / "step-5")
    assert "unverified" in caplog.text and "step-5" in caplog.text
    assert [c.unverified for c in await ckpt.checkpoints()] == [True]

    with pytest.raises(aiockpt.ForeignCheckpoint, match="allow_pickle=True") as raised:
        await ckpt.load_latest()
    assert raised.value.path == str(tmp_path / "step-5")
    with pytest.raises(aiockpt.ForeignCheckpoint):
        aiockpt.verify(tmp_path / "step-5")

    caplog.clear()
    target = {"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3)}, "step": 0}
    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        assert await ckpt.load_latest(target, allow_pickle=True) is target
    assert "unverified" in caplog.text
    assert torch.equal(target["model"]["w"], STATE["model"]["w"])  # type: ignore[index]
    assert target["step"] == 5


def test_a_torch_written_checkpoint_loads_whole_with_allow_pickle(tmp_path: Path) -> None:
    torch_save(tmp_path / "ckpt", STATE)
    with pytest.raises(aiockpt.ForeignCheckpoint):
        aiockpt.load(tmp_path / "ckpt")
    whole = aiockpt.load(tmp_path / "ckpt", allow_pickle=True)
    assert whole.keys() == STATE.keys() and whole["step"] == 5
    for name in ("w", "b"):
        assert torch.equal(whole["model"][name], STATE["model"][name])  # type: ignore[index]


def test_a_directory_without_either_file_is_still_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(aiockpt.CorruptCheckpoint, match="never committed"):
        aiockpt.load(tmp_path / "ckpt", allow_pickle=True)


def test_retention_never_deletes_a_torch_written_checkpoint(tmp_path: Path) -> None:
    torch_save(tmp_path / "step_0000000001", STATE)  # named as retention's own
    with aiockpt.SyncCheckpointer(tmp_path, keep_last=1) as ckpt:
        for step in (2, 3):
            ckpt.save({"w": torch.zeros(2)}, step=step).result()
    names = [c.name for c in aiockpt.list_checkpoints(tmp_path)]
    assert names == ["step_0000000001", "step_0000000003"]
