"""Multi-rank saves in one process: each rank a thread with its own ``RankGroup`` (the
worker's side of a group save) over a real TCPStore on 127.0.0.1, no trainer, no worker
process: the writers' group steps and the coordinated commit, as the ranks' workers run them."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import Any

import torch.distributed as dist

from aiockpt._wire.protocol import CommitOptions, GroupInfo, RankInfo, ShardSpec
from aiockpt._worker.rank_group import RankGroup
from aiockpt.writers import create_writer


def group_save(
    path: Path,
    states: list[dict[str, Any]],
    shards: list[dict[int, ShardSpec]],
    format: str = "safetensors",
    **options: Any,
) -> list[Any]:
    """Save ``states`` (rank r's is ``states[r]``) as one checkpoint in ``format``, each rank
    in a thread of its own with its own RankGroup, as the ranks' workers do; return each
    rank's outcome."""
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    world = len(states)
    outcomes: list[Any] = [None] * world

    def rank_main(rank: int) -> None:
        info = GroupInfo(
            "127.0.0.1", store.port, "", f"session-{path.name}", rank, world, rank,
            timeout_s=20, pg_generation=None,
        )  # fmt: skip
        group = RankGroup(info)
        writer = create_writer(format, RankInfo(rank, world), **options)
        try:
            outcomes[rank] = group.write_and_commit(
                writer,
                states[rank],
                shards[rank],
                str(path),
                CommitOptions(format, round_id=f"{path.name}#0"),
                begin_commit=lambda: None,
            )
        except BaseException as exc:
            outcomes[rank] = exc
        finally:
            group.close()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes
