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
import time
from collections.abc import Callable
from typing import Any

import msgspec
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore

from aiockpt._format import commit
from aiockpt._wire.coordination import SaveRound, connect_store
from aiockpt._wire.protocol import CommitOptions, GroupInfo, ShardSpec
from aiockpt.errors import CoordinationError
from aiockpt.writers.base import GroupWriter, Writer, WriterPart

__all__ = ["RankGroup"]


class Outcome(msgspec.Struct, frozen=True):
    """What rank 0 posts once the checkpoint is committed."""

    result: commit.CommitResult
    #: re-form the workers' process group under this generation after this save
    regroup: int | None = None


class RankGroup:
    """This worker's membership in its Checkpointer's group.

    Raises ``torch.distributed.DistStoreError`` at construction when the store cannot be
    reached, and what ``init_process_group`` raises when the process group cannot form.
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
        share and, on rank 0, commit it once every part is in.

        ``begin_commit`` is called at this rank's point of no return (rank 0: before the
        rename; others: before handing their part over) and raises to cancel. On any failure
        the failure is posted to every key this rank owes, so that no rank waits for it, and
        re-raised; rank 0 then removes the temporary directory.
        """
        info = self.info
        ranks = list(range(info.world_size))
        round_ = SaveRound(
            self.store,
            options.round_id,
            rank=info.rank,
            world_size=info.world_size,
            timeout_s=info.timeout_s,
        )
        pending: commit.PendingCheckpoint | None = None
        started = time.perf_counter()
        try:
            if info.rank == 0:
                if options.forget_round is not None:
                    SaveRound(
                        self.store,
                        options.forget_round,
                        rank=0,
                        world_size=len(ranks),
                        timeout_s=0,
                    ).forget()
                pending = commit.prepare(path, overwrite=options.overwrite)
                temp_path = pending.temp_path
                round_.post("prepared", temp_path)
            else:
                (temp_path,) = round_.collect(["prepared"], [0])
            if isinstance(writer, GroupWriter):
                round_.post(f"plan/{info.rank}", writer.plan(state_dict, shards))
                if info.rank == 0:
                    plans = round_.collect([f"plan/{r}" for r in ranks], ranks)
                    round_.post("assign", writer.assign(plans))
                (assignments,) = round_.collect(["assign"], [0])
                written = writer.write_part(state_dict, temp_path, assignments[info.rank])
            else:
                if shards:
                    raise TypeError(
                        f"{type(writer).__name__} cannot write sharded tensors (DTensor); "
                        "use format='dcp'"
                    )
                records = commit.write_files(writer, state_dict, temp_path, hash_unreported=False)
                written = WriterPart(records)
            skeleton, leaves = commit.describe_leaves(
                state_dict, written.records, elsewhere=written.imports
            )
            part = commit.RankPart(path, written, skeleton, leaves, self.pg_generation)
            write_seconds = time.perf_counter() - started
            if info.rank != 0:
                begin_commit()
                round_.post(f"part/{info.rank}", part)
                (outcome,) = round_.collect(["outcome"], [0])
                return msgspec.convert(outcome, Outcome)
            assert pending is not None
            round_.post("part/0", part)
            others = round_.collect([f"part/{r}" for r in ranks[1:]], ranks[1:])
            parts = [part, *(msgspec.convert(p, commit.RankPart) for p in others)]
            outcome = self._finalize(writer, parts, pending, options, begin_commit, write_seconds)
            round_.post("outcome", outcome)
            return outcome
        except BaseException as exc:
            round_.fail(exc)
            if pending is not None:
                commit.abort(pending)
            raise

    def _finalize(
        self,
        writer: Writer,
        parts: list[commit.RankPart],
        pending: commit.PendingCheckpoint,
        options: CommitOptions,
        begin_commit: Callable[[], None],
        write_seconds: float,
    ) -> Outcome:
        """Rank 0, every part in: the global files, the manifest, the rename."""
        started = time.perf_counter()
        for rank, part in enumerate(parts):
            if part.path != pending.path:
                raise CoordinationError(
                    f"ranks disagree on the checkpoint path: rank 0 saves to "
                    f"{pending.path!r}, rank {rank} to {part.path!r}",
                    rank=rank,
                )
        records = [record for part in parts for record in part.written.records]
        if isinstance(writer, GroupWriter):
            records += writer.finish(pending.temp_path, [part.written for part in parts])
        records += commit.record_unreported_files(pending.temp_path, records)
        manifest = commit.build_group_manifest(
            options.format, parts, records, metadata=options.metadata
        )
        # A worker that replaced a dead one, or one whose re-forming failed, is not in the
        # others' process group: all of them re-form it once this save is answered.
        generations = {part.pg_generation for part in parts}
        # Generations are random: a replaced rank 0 worker must not reuse an old prefix.
        regroup = None if generations == {self.pg_generation} != {None} else secrets.randbits(62)
        begin_commit()
        manifest_size = commit.finalize(pending, manifest)
        result = commit.CommitResult(
            path=pending.path,
            nbytes=sum(f.size for f in manifest.files) + manifest_size,
            files=manifest.files,
            write_seconds=write_seconds,
            commit_seconds=time.perf_counter() - started,
        )
        return Outcome(result, regroup)
