"""A worker's side of a multi-rank Checkpointer: the group's store, the workers' own gloo
process group, and the coordinated commit of one save (see ``aiockpt._wire.coordination``).

The process group is formed at start-up, so that the first save does not pay for it. It is
never used by the built-in writers' coordination (the store is: a collective cannot time out
per step or survive a dead peer), so a worker that replaces a dead one starts without it and
the group is re-formed after the next save, when rank 0 has seen every rank's generation:
custom writers that call ``torch.distributed`` collectives then find a group of live workers.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Callable
from typing import Any

import msgspec
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore

from aiockpt._format import commit
from aiockpt._wire.coordination import SaveRound, connect_store, translate_store_errors
from aiockpt._wire.protocol import CommitOptions, GroupInfo, ShardSpec
from aiockpt.writers.base import GroupWriter, Writer

__all__ = ["RankGroup"]


class Outcome(msgspec.Struct, frozen=True):
    """What rank 0 posts once the checkpoint is committed."""

    result: commit.CommitResult
    #: re-form the workers' process group under this generation after this save
    regroup: int | None = None


class RankGroup:
    """This worker's membership in its Checkpointer's group.

    Raises ``CoordinationError`` at construction when the store cannot be reached or the
    process group cannot form.
    """

    def __init__(self, info: GroupInfo) -> None:
        self.info = info
        self.store = connect_store(info)
        self.pg_generation: int | None = None
        if info.pg_generation is not None:
            self.form_process_group(info.pg_generation)

    def form_process_group(self, generation: int) -> None:
        """(Re-)join the workers' gloo group, under a store prefix of its own generation."""
        self.close()
        with translate_store_errors(f"forming the workers' process group {generation}"):
            dist.init_process_group(
                "gloo",
                store=PrefixStore(f"pg/{generation}", self.store),
                rank=self.info.rank,
                world_size=self.info.world_size,
                timeout=datetime.timedelta(seconds=self.info.timeout_s),
            )
        self.pg_generation = generation

    def close(self) -> None:
        """Leave the process group (gloo's threads must be gone before the process exits)."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self.pg_generation = None

    def write_and_commit(
        self,
        writer: Writer,
        state_dict: Any,
        shards: dict[int, ShardSpec],
        path: str,
        options: CommitOptions,
        *,
        begin_commit: Callable[[], None],
    ) -> Outcome:
        """Write this rank's part of save ``options.round_id`` into the directory all ranks
        share and, on rank 0, commit it once every part is in (``commit.write_checkpoint``
        with this group's rounds as its peers).

        ``begin_commit`` is called at this rank's point of no return (rank 0: before the
        rename; others: before handing their part over) and raises to cancel. On any failure
        the failure is posted to every key this rank owes, so that no rank waits for it, and
        re-raised; rank 0 then removes the temporary directory.
        """
        peers = _RoundPeers(self, options.round_id)
        if self.info.rank == 0 and options.forget_round is not None:
            try:
                SaveRound(
                    self.store,
                    options.forget_round,
                    rank=0,
                    world_size=self.info.world_size,
                    timeout_s=0,
                ).forget()
            except BaseException as exc:
                peers.fail(exc)
                raise
        result = commit.write_checkpoint(
            writer,
            state_dict,
            path,
            format=options.format,
            overwrite=options.overwrite,
            metadata=options.metadata,
            before_commit=begin_commit,
            peers=peers,
            shards=shards,
        )
        return Outcome(result, peers.regroup)


class _RoundPeers:
    """``commit.CommitPeers`` over one save's keys in the group's store (``SaveRound``)."""

    def __init__(self, group: RankGroup, round_id: str) -> None:
        info = group.info
        self.rank = info.rank
        self._group = group
        self._ranks = list(range(info.world_size))
        self._round = SaveRound(
            group.store,
            round_id,
            rank=info.rank,
            world_size=info.world_size,
            timeout_s=info.timeout_s,
        )
        #: re-form the workers' process group under this generation after this save
        self.regroup: int | None = None

    def share_temp_path(self, temp_path: str | None) -> str:
        if temp_path is not None:
            self._round.post("prepared", temp_path)
            return temp_path
        (shared,) = self._round.collect(["prepared"], [0])
        return str(shared)

    def assign(self, writer: GroupWriter, plan: Any) -> Any:
        ranks = self._ranks
        self._round.post(f"plan/{self.rank}", plan)
        if self.rank == 0:
            plans = self._round.collect([f"plan/{r}" for r in ranks], ranks)
            self._round.post("assign", writer.assign(plans))
        (assignments,) = self._round.collect(["assign"], [0])
        return assignments[self.rank]

    def exchange_parts(self, part: commit.RankPart) -> list[commit.RankPart]:
        generation = self._group.pg_generation
        part = msgspec.structs.replace(part, pg_generation=generation)
        self._round.post(f"part/{self.rank}", part)
        if self.rank != 0:
            return []
        others = self._ranks[1:]
        posted = self._round.collect([f"part/{r}" for r in others], others)
        parts = [part, *(msgspec.convert(p, commit.RankPart) for p in posted)]
        # A worker that replaced a dead one, or one whose re-forming failed, is not in the
        # others' process group: all of them re-form it once this save is answered.
        # Generations are random: a replaced rank 0 worker must not reuse an old prefix.
        generations = {p.pg_generation for p in parts}
        if generations != {generation} or generation is None:
            self.regroup = secrets.randbits(62)
        return parts

    def publish(self, result: commit.CommitResult) -> None:
        self._round.post("outcome", Outcome(result, self.regroup))

    def receive(self) -> commit.CommitResult:
        (posted,) = self._round.collect(["outcome"], [0])
        outcome = msgspec.convert(posted, Outcome)
        self.regroup = outcome.regroup
        return outcome.result

    def fail(self, exc: BaseException) -> None:
        self._round.fail(exc)
