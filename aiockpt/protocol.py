"""Frames and messages between a trainer and its checkpoint worker (sans-IO, work in progress)."""

from __future__ import annotations

import msgspec


class RankInfo(msgspec.Struct, frozen=True):
    """Where a checkpoint worker's trainer stands in the job (torch's ``RankInfo``)."""

    global_rank: int = 0
    global_world_size: int = 1
