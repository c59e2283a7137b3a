"""Writers the checkpoint workers import by reference in the multi-rank tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from aiockpt.writers.base import FileRecord, FileSink, WriterPart
from aiockpt.writers.dcp import DcpWriter
from tests.writer_fixtures import hold_at_gate


class FailingOnRankDcpWriter(DcpWriter):
    """DCP, except that the rank named by a ``"fail_on_rank"`` entry raises while writing."""

    def write_part(self, state_dict: Any, path: str, assignment: Any) -> WriterPart:
        if state_dict.get("fail_on_rank") == self.rank_info.global_rank:
            raise OSError(f"injected failure on rank {self.rank_info.global_rank}")
        return super().write_part(state_dict, path, assignment)


class HeldDcpWriter(DcpWriter):
    """DCP held before writing its part, given a ``"gate"`` entry (a path): each worker
    creates ``<gate>.started-<its pid>``, then writes only once ``<gate>.go`` appears (at
    most a minute later), so a rank can kill its worker mid-save without guessing when."""

    def write_part(self, state_dict: Any, path: str, assignment: Any) -> WriterPart:
        gate = state_dict.get("gate")
        if gate is not None:
            hold_at_gate(f"{gate}.started-{os.getpid()}", f"{gate}.go")
        return super().write_part(state_dict, path, assignment)


class AllReduceWriter:
    """Sums ``"x"`` over the workers' own process group and writes the sum: succeeds only
    when every rank's worker is in one live group."""

    def __init__(self, rank_info: Any = None) -> None:
        self.rank_info = rank_info

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord]:
        total = state_dict["x"].clone()
        dist.all_reduce(total)
        with FileSink(path, f"sum-{dist.get_rank()}-pid{os.getpid()}.txt") as sink:
            sink.write(repr(total.tolist()).encode())
            return [sink.close()]


def expected_sum(world_size: int) -> list[float]:
    return (sum(torch.full((2,), float(r + 1)) for r in range(world_size))).tolist()  # type: ignore[union-attr]
