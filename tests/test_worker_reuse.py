"""The worker's side of a repeated save, on a real arena (memfd, both mappings): the state
dict it makes is reused while the layout and plain values stay, and dropped before its arena
is released; the DCP writer writes a staged layout in blocks (runs of small tensors copied
into one buffer, big tensors straight from the arena) that make the very bytes the
tensor-by-tensor path makes, waiting for each block's bytes to be staged."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.distributed.checkpoint as dcp

from aiockpt._format.commit import write_checkpoint
from aiockpt._format.loading import load
from aiockpt._trainer.staging import PlanCache, SharedArena
from aiockpt._wire.protocol import StateDictPayload
from aiockpt._worker.serve import ArenaMaps, Layouts, materialize
from aiockpt.writers import dcp as dcp_writer
from aiockpt.writers.base import StagedStateDict
from aiockpt.writers.dcp import DcpWriter
from tests.writer_fixtures import assert_same


def mixed_state(step: int) -> dict[str, Any]:
    """Runs of small tensors between tensors of at least the writer's small-tensor limit."""
    state: dict[str, Any] = {}
    for i in range(40):
        state[f"small{i}"] = torch.full((i % 5 + 1, 3), float(step * 100 + i))
        if i % 9 == 0:
            state[f"big{i}"] = torch.full((128, 160), float(step - i))  # 80 KiB
    state["half"] = torch.arange(7, dtype=torch.bfloat16) + step
    state["empty"] = torch.zeros(0, 4)
    state["step"] = step
    return state


class Staged:
    """A trainer's plan cache and arena, and a worker's mapping of that arena."""

    def __init__(self) -> None:
        self.cache = PlanCache()
        self.arena: SharedArena | None = None
        self.maps: ArenaMaps | None = None
        self.layouts = Layouts()

    def stage(self, state: dict[str, Any]) -> StagedStateDict:
        plan = self.cache.plan(state)
        if self.arena is None:
            self.arena = SharedArena(plan.nbytes)
            self.maps = ArenaMaps(before_release=self.layouts.forget)
        assert self.maps is not None
        self.arena.copy_in(plan)
        # As the frame carries it: encoded, decoded.
        payload = msgspec.msgpack.decode(
            msgspec.msgpack.encode(plan.payload(self.arena)), type=StateDictPayload
        )
        staged = materialize(payload, self.maps, self.layouts)
        assert isinstance(staged, StagedStateDict)
        return staged

    def close(self) -> None:
        if self.maps is not None and self.arena is not None:
            self.maps.release(self.arena.path)
            self.arena.close()


def test_a_repeated_layout_reuses_the_state_dict_and_releases_its_mapping() -> None:
    staged = Staged()
    try:
        first = staged.stage(mixed_state(1))
        second = staged.stage(mixed_state(2))  # same layout, step changed: made anew
        assert second is not first and second["step"] == 2
        third = staged.stage(mixed_state(2))  # nothing but tensor bytes changed: reused
        assert third is second and third.wait_staged is None
        state = mixed_state(3)
        state["step"] = 2
        fourth = staged.stage(state)
        assert fourth is second
        assert_same(dict(fourth), state)  # the reused tensors view the bytes staged now
        del first, second, third, fourth  # what a write holds while it runs
        assert staged.maps is not None and staged.arena is not None
        staged.maps.release(staged.arena.path)
        # The kept state dict was dropped first: the mapping closed, nothing lingers.
        assert staged.maps._lingering == []
    finally:
        staged.close()


def write_both_ways(tmp_path: Path, staged: StagedStateDict, name: str) -> tuple[bytes, bytes]:
    """The data file from the staged layout, and from a plain copy of the same state dict
    (tensor by tensor)."""
    writer = DcpWriter()
    write_checkpoint(writer, staged, tmp_path / name, format="dcp")
    plain = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in staged.items()}
    write_checkpoint(DcpWriter(), plain, tmp_path / f"{name}-plain", format="dcp")
    data = "__0_0.distcp"
    return (tmp_path / name / data).read_bytes(), (tmp_path / f"{name}-plain" / data).read_bytes()


def test_dcp_blocks_write_the_bytes_of_the_tensor_by_tensor_path(tmp_path: Path) -> None:
    staged = Staged()
    writer = DcpWriter()
    try:
        for step in range(3):  # the first plans; the others reuse program and blocks
            state = mixed_state(step)
            state_dict = staged.stage(state)
            write_checkpoint(writer, state_dict, tmp_path / f"s{step}", format="dcp")
            blocks = writer._cached.program._blocks(state_dict.layout)  # type: ignore[union-attr]
            assert any(b.joined and len(b.regions) > 1 for b in blocks)
            assert any(not b.joined for b in blocks)
            ours, plain = write_both_ways(tmp_path, staged.stage(state), f"both{step}")
            assert ours == plain
            target = {k: torch.zeros_like(v) for k, v in state.items() if k != "step"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a ..."
                dcp.load(target, checkpoint_id=str(tmp_path / f"s{step}"), no_dist=True)
            assert_same(target, {k: v for k, v in state.items() if k != "step"})
            assert_same(load(tmp_path / f"s{step}"), state)
        del state_dict, blocks
    finally:
        staged.close()


def test_dcp_blocks_wait_for_their_bytes_to_be_staged(tmp_path: Path, monkeypatch: Any) -> None:
    """A write sent while staging asks for arena bytes only past what it was told is
    staged, in order, until the last block's; the staged part of a block whose end is not
    staged yet is written first (the trainer may be waiting on it)."""
    monkeypatch.setattr(dcp_writer, "CHUNK_BYTES", 256)  # several runs of small tensors
    staged = Staged()
    try:
        state = mixed_state(5)
        state_dict = staged.stage(state)
        writer = DcpWriter()
        write_checkpoint(writer, state_dict, tmp_path / "first", format="dcp")
        asked: list[int | None] = []
        told: list[float] = [0.0]
        total = max(offset + size for offset, size in state_dict.layout.regions.values())

        def wait_staged(end: int | None) -> float:
            if end is None:  # every byte (objects are pickled after the tensors)
                told.append(total)
                return math.inf
            assert end > told[-1]  # asks only for what it was not told
            asked.append(end)
            told.append(min(total, math.ceil(end / 1000) * 1000))  # as if staged in chunks
            return math.inf if told[-1] == total else told[-1]

        state_dict = staged.stage(state)
        state_dict.wait_staged = wait_staged
        write_checkpoint(writer, state_dict, tmp_path / "second", format="dcp")
        assert asked == sorted(asked) and len(asked) > 4 and told[-1] == total
        assert_same(load(tmp_path / "second"), state)
        # Each time for the end of the next region it writes, not more (its block's end).
        stops = {offset + size for offset, size in state_dict.layout.regions.values()}
        assert set(asked) <= stops
        del state_dict
    finally:
        staged.close()
