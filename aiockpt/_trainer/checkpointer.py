"""``Checkpointer``: saves under a root directory through one persistent worker.

Theory of operation
-------------------
A save is one task owned by the Checkpointer, in three steps:

1. *Plan* (in the caller, synchronously): flatten the state dict and lay its tensors out in an
   arena; bad entries raise ``TypeError`` before anything is touched.
2. *Stage*: take one of ``max_in_flight`` slots (the backpressure: a save waits here while
   that many are still being written, so memory stays bounded), take a free arena big enough
   (creating one, and having the worker map it, only when none fits), copy the tensors in a
   thread. ``staged`` resolves here.
3. *Write*: send one WRITE_CHECKPOINT frame that describes the arena; the worker writes,
   fsyncs and commits; the slot and the arena are free again once it answers.

The worker and its arenas belong together (it maps each one through this process's
descriptor): when the worker dies, its arenas are dropped with it and the next save starts a fresh
worker. Only after a commit is durable does retention (``keep_last``) delete older
checkpoints, and ``latest()`` only ever reports directories that have a manifest.

Several ranks
-------------
When ``torch.distributed`` is initialised with several ranks, a Checkpointer is one rank of a
group (``aiockpt._trainer.group_formation``), formed at ``start`` or lazily at the first
save through the trainers' *store* (never a collective on their process group, so a lazy
start in the background cannot interleave with the training loop's own collectives). Every
rank creates its Checkpointer with the same root and calls ``save`` in the same order, and
each save is one checkpoint that every rank's worker writes a part of.

The ranks' workers meet about a save under its *round id*: the checkpoint's path (relative to
the root) and how many saves to that path this Checkpointer made before. A rank that skips a
save, or makes one the others do not, therefore costs that one save (it fails on the ranks
that made it, with ``CoordinationTimeout`` after ``coordination_timeout_secs``) and cannot
shift the saves after it. Saves are sent to the worker in call order, so two ranks' workers
never wait in different saves. A save that fails on one rank fails on every rank: a rank
whose save fails before its worker could report it (a bad entry refused in ``save`` itself,
a failed staging, a dead worker, a cancellation) posts the failure for its worker, so the
others raise ``RankFailed`` naming the rank at once rather than at their timeout. Only rank 0
deletes anything (retention, leftovers of crashed saves).

As in ``torch.distributed.checkpoint``, a plain (non-DTensor) tensor under the same key on
every rank is taken to be replicated and written once: per-rank tensors need per-rank keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from aiockpt._format import commit, loading
from aiockpt._format.listing import ListedCheckpoint, list_checkpoints
from aiockpt._format.root_lock import RootLock
from aiockpt._format.stateful import StatefulLoad, stateful_to_state_dict
from aiockpt._runtime import finish_even_if_cancelled
from aiockpt._trainer.checkpoint_process import (
    CheckpointProcess,
    CheckpointProcessConfig,
    WriteResult,
)
from aiockpt._trainer.group_formation import (
    DEFAULT_TIMEOUT_S,
    TrainerGroup,
    form_group,
    reserve_group_key,
    world_of,
)
from aiockpt._trainer.handles import (
    ProgressFeed,
    SaveHandle,
    SaveResult,
    final_phase,
    running_loop,
)
from aiockpt._trainer.staging import (
    PlanCache,
    SharedArena,
    StagingPlan,
    copy_into_arena,
    copy_into_arena_in_chunks,
)
from aiockpt._wire.coordination import SaveRound
from aiockpt._wire.protocol import CommitOptions, GroupInfo, RankInfo, WritePayload
from aiockpt._wire.refs import check_encodable
from aiockpt.errors import WorkerClosed, WorkerCrashed, WorkerError
from aiockpt.writers import resolve_writer

__all__ = ["Checkpointer"]

logger = logging.getLogger("aiockpt._trainer.checkpointer")

#: formats whose writers store DTensors (as pieces for dcp, as whole tensors for safetensors)
_SHARDING_FORMATS = ("dcp", "safetensors")
#: ``Checkpointer.save`` names checkpoints ``step_<step>`` zero-padded, so that they sort
STEP_NAME = "step_{step:010d}"
#: the names retention considers: ``save``'s, and no others
STEP_NAME_PATTERN = re.compile(r"step_(\d{10,})")


class Checkpointer:
    """Asynchronous checkpoints under ``root`` through one persistent checkpoint worker.

    Args:
        root: directory of the checkpoints ``save`` writes; ``latest`` and ``keep_last`` look
            here. May be None when only ``save_to`` (explicit paths) is used.
        format: "dcp" (loadable by ``torch.distributed.checkpoint.load``), "safetensors"
            (Hugging Face's layout: ``from_pretrained`` loads it), or a custom writer's import
            reference ``"package.module:Writer"``.
        writer_options: keywords for the format's writer, such as
            ``{"max_shard_size": "2GB"}`` for safetensors (default "5GB", as Hugging Face).
        keep_last: keep only the newest K checkpoints that ``save`` named by step
            (``step_<n>`` under ``root``, ordered by step); older ones are deleted only after
            a newer one is durable. Checkpoints of other names (``save_to(root / "best")``)
            are the user's and never deleted.
        max_in_flight: saves that may be staged or written at once; a further save waits for
            a slot (and its ``staged`` with it).
        allow_pickle: pickle state-dict leaves that are neither tensors nor plain values,
            instead of raising ``TypeError``.
        process_group: the trainers' group the checkpoint spans (default: the world, when
            ``torch.distributed`` is initialised with several ranks).
        no_dist: save from this rank alone even in a multi-rank job (torch's ``no_dist``).
        use_prefix_store: have the workers meet in the trainers' store at
            ``MASTER_ADDR:MASTER_PORT`` (None: ``DCP_USE_PREFIX_STORE=1``); see
            ``aiockpt._trainer.group_formation``.
        coordination_timeout_secs: how long a rank waits for another at any step of a
            multi-rank save before failing it with ``CoordinationTimeout``.
        rank_info, config: passed to the ``CheckpointProcess`` (``rank_info`` comes from the
            process group when there is one).
        read_only: open ``root`` to read it only (an eval or export process next to a
            running trainer): ``latest`` and ``load_latest`` work, no worker starts, no lock
            is taken, nothing is deleted, and saving raises ``io.UnsupportedOperation``.

    A root has one writer: ``start`` takes an exclusive lock on it (``aiockpt._format.root_lock``;
    in a group, rank 0 does) that the kernel releases when the process dies, and a second
    writer's ``start`` raises ``RootLocked`` naming the holder.

    Use ``async with Checkpointer(...) as ckpt`` or ``await start()`` / ``await close()``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        format: str = "dcp",
        writer_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        max_in_flight: int = 1,
        allow_pickle: bool = False,
        process_group: Any = None,
        no_dist: bool = False,
        use_prefix_store: bool | None = None,
        coordination_timeout_secs: float = DEFAULT_TIMEOUT_S,
        rank_info: RankInfo | None = None,
        config: CheckpointProcessConfig | None = None,
        read_only: bool = False,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None), got {keep_last}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._checked_formats: set[str] = set()
        self._check_format(format)
        self.writer_options = dict(writer_options or {})
        self._check_writer_options(format, self.writer_options)
        self.root = os.path.abspath(os.fspath(root)) if root is not None else None
        self.read_only = read_only
        #: this process's writer lock on ``root`` (rank 0's, in a group), from ``start``
        self._root_lock: RootLock | None = None
        self.format = format
        self.keep_last = keep_last
        self.max_in_flight = max_in_flight
        self.allow_pickle = allow_pickle
        self.rank_info = rank_info if rank_info is not None else RankInfo()
        self.config = config if config is not None else CheckpointProcessConfig()
        self._process: CheckpointProcess | None = None
        #: arenas mapped by the current worker and not in use by a save
        self._free_arenas: list[SharedArena] = []
        #: the last save's plan, reused while saves keep its structure
        self._plans = PlanCache()
        self._slots: asyncio.Semaphore | None = None
        self._saves: set[asyncio.Task[SaveResult]] = set()
        #: threads posting, for the other ranks, failures of saves on this rank
        self._failure_reports: set[asyncio.Future[None]] = set()
        self._start_lock: asyncio.Lock | None = None
        #: forming the group is blocking and happens in threads (a save's, a failure report's)
        self._group_formation = threading.Lock()
        self._root_prepared = False
        #: set by ``close``; saves issued before it still finish
        self.closed = False
        #: set once ``close`` has stopped the worker: nothing starts another
        self._worker_stopped = False
        self._close_task: asyncio.Task[None] | None = None
        self.process_group = process_group
        self.no_dist = no_dist
        self.use_prefix_store = use_prefix_store
        self.coordination_timeout_secs = coordination_timeout_secs
        self._group: TrainerGroup | None = None
        self._group_checked = False
        #: where rank 0 will say where the workers meet: reserved here, in program order,
        #: which is the same on every rank
        self._group_key = None if no_dist else reserve_group_key(self.root or "<no root>")
        self._workers_spawned = 0
        #: name -> saves to that name so far; with the name, the next save's round id
        self._saves_per_name: collections.Counter[str] = collections.Counter()
        #: the latest round ids, oldest first: rank 0 forgets the keys of the one two back
        self._recent_rounds: collections.deque[str] = collections.deque(maxlen=3)
        #: resolves once the latest save's write request is sent: a group's saves are sent in
        #: call order, or two ranks' workers could each wait in a different save
        self._previous_sent: asyncio.Future[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Checkpointer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def group(self) -> GroupInfo | None:
        """Where this rank stands in its multi-rank group, once started in one; else None."""
        return self._group.info if self._group is not None else None

    @property
    def _leader(self) -> bool:
        """Whether this rank deletes things (rank 0, or the only rank)."""
        return self._group is None or self._group.info.rank == 0

    @property
    def worker_pid(self) -> int | None:
        """The pid of the current checkpoint worker, if one is running."""
        return self._process.pid if self._process is not None and self._process.alive else None

    async def start(self, *, like: Any = None) -> None:
        """Start the worker now (so that the first save pays no spawn), check that ``root``
        is writable and remove what crashed saves left under it. Idempotent; saves start the
        Checkpointer themselves.

        ``like``: a state dict of the layout you will save (the same tensors will do); its
        staging arena is created and mapped now, so that the first save costs what the
        later ones do.

        In a multi-rank job every rank starts (or saves): the workers' group forms over the
        trainers' store, and every worker joins the workers' gloo process group before this
        returns.

        Raises ``RootLocked`` when another process writes under ``root``, ``OSError``
        (``PermissionError``, read-only file system, ...) naming ``root`` when a checkpoint
        cannot be created under it, what ``CheckpointProcess.start``
        raises, ``TypeError`` as ``save`` does for a ``like`` that cannot be checkpointed,
        ``WorkerClosed`` after ``close``, and what
        ``aiockpt._trainer.group_formation.form_group`` raises
        (``ValueError`` for a prefix store without ``MASTER_ADDR``/``MASTER_PORT``,
        ``CoordinationTimeout`` when rank 0 never forms the group).
        """
        running_loop("Checkpointer.start")
        if self.closed:
            raise WorkerClosed("the Checkpointer was closed")
        if self.read_only:
            return
        await self._ensure_started()
        if like is not None:
            process = self._process
            assert process is not None
            plan = self._plans.plan(stateful_to_state_dict(like), allow_pickle=True)
            arena = await self._take_arena(process, plan.nbytes)
            self._give_back(process, arena)

    async def _ensure_started(self) -> None:
        """Form the group, prepare the root and have a live worker. Saves issued before
        ``close`` still get here after it, and are served; once ``close`` has stopped the
        worker, raises ``WorkerClosed``."""
        await self._ensure_group()
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._worker_stopped:
                raise WorkerClosed("the Checkpointer was closed before this save was written")
            if not self._root_prepared:
                await asyncio.to_thread(self._prepare_root)
                self._root_prepared = True
            if self._process is not None and not self._process.alive:
                await self._drop_worker()
            if self._process is None:
                group = self._group.info if self._group is not None else None
                if group is not None and self._workers_spawned:
                    # The other ranks' workers are in a process group without this rank's:
                    # the group is re-formed after the next save (see aiockpt._worker.rank_group).
                    group = msgspec.structs.replace(group, pg_generation=None)
                self._process = CheckpointProcess(self.rank_info, self.config, group=group)
                self._workers_spawned += 1
            await self._process.start()

    def _is_collective(self) -> bool:
        """Whether saves span several ranks (decided anew: the user may initialise
        ``torch.distributed`` after creating the Checkpointer)."""
        return not self.no_dist and world_of(self.process_group) is not None

    async def _ensure_group(self) -> None:
        """Form the workers' group once, over the trainers' store (see ``group_formation``)."""
        if not self._group_checked:
            await asyncio.to_thread(self._form_group_once)

    def _form_group_once(self) -> None:
        """Blocking; from any thread."""
        with self._group_formation:
            if self._group_checked:
                return
            if self._is_collective():
                assert self._group_key is not None
                self._group = form_group(
                    self.process_group,
                    key=self._group_key,
                    use_prefix_store=self.use_prefix_store,
                    timeout_s=self.coordination_timeout_secs,
                )
                self.rank_info = RankInfo(self._group.info.rank, self._group.info.world_size)
            self._group_checked = True

    def _prepare_root(self) -> None:
        """Fail now, not at the first save, when no checkpoint can be created under the
        root; take its writer lock and remove what crashed saves left there (the lock says
        that no other writer's save is in progress)."""
        if self.root is None:
            return
        try:
            os.makedirs(self.root, exist_ok=True)
            os.rmdir(tempfile.mkdtemp(prefix=".aiockpt-probe-", dir=self.root))
        except OSError as exc:
            raise type(exc)(
                exc.errno, f"cannot create checkpoints under {self.root}: {exc.strerror}"
            ) from exc
        if self._leader:
            self._root_lock = RootLock.acquire(self.root)
            for path in commit.remove_stale_temps(self.root):
                logger.warning("removed %s, left by a save that did not finish", path)

    async def _drop_worker(self) -> None:
        """Forget a dead worker and the arenas it had mapped; the next save starts anew."""
        process, self._process = self._process, None
        arenas, self._free_arenas = self._free_arenas, []
        for arena in arenas:
            arena.close()
        if process is not None:
            await process.close()

    async def wait(self) -> list[SaveResult]:
        """Wait for every save in flight; return the results of those that committed.

        Raises the first failure among them (cancelled saves are not failures).
        """
        saves = list(self._saves)
        outcomes = await asyncio.gather(*saves, return_exceptions=True)
        results = [o for o in outcomes if isinstance(o, SaveResult)]
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return results

    async def close(self) -> None:
        """Finish every save issued before this call, then stop the worker. Idempotent, and
        safe to call concurrently; saves issued after it raise ``WorkerClosed``.

        Every step is bounded: saves are waited for as long as the worker answers a ping
        within ``config.subprocess_shutdown_timeout_secs`` (a worker writing to a slow disk
        answers; a hung or stopped one does not), then the worker is asked to exit, then
        SIGTERM, then SIGKILL (see ``CheckpointProcess.close``); saves still pending then
        fail with ``WorkerClosed`` naming their paths. Failures of saves nobody awaited are
        logged, not raised. In a multi-rank group, close on every rank (rank 0 holds the
        store the others' workers meet in).
        """
        loop = running_loop("Checkpointer.close")
        if self._close_task is None:
            self.closed = True
            self._close_task = loop.create_task(self._shut_down())
        await finish_even_if_cancelled(self._close_task)

    async def _shut_down(self) -> None:
        issued: set[asyncio.Future[Any]] = {*self._saves, *self._failure_reports}
        await self._wait_while_worker_answers(issued)
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:  # not while a save is starting the worker
            self._worker_stopped = True
        await self._drop_worker()
        if self._root_lock is not None:
            self._root_lock.release()
        outcomes = await asyncio.gather(*issued, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                logger.error("a save failed before close: %s", outcome)
        # Saves that failed just now have their failures reported to the other ranks.
        await asyncio.gather(*self._failure_reports, return_exceptions=True)
        # Rank 0's store server stops with its last reference (nothing left listening).
        self._group = None

    async def _wait_while_worker_answers(self, tasks: set[asyncio.Future[Any]]) -> None:
        """Wait for ``tasks`` while the worker (if any) answers a ping within the shutdown
        timeout; return early when it stops answering. Saves not yet at the worker are
        bounded by their own timeouts (worker start, coordination)."""
        bound = self.config.subprocess_shutdown_timeout_secs
        pending = {task for task in tasks if not task.done()}
        while pending:
            _, pending = await asyncio.wait(pending, timeout=bound)
            process = self._process
            if not pending or process is None or not process.alive:
                continue
            try:
                async with asyncio.timeout(bound):
                    await process.ping()
            except TimeoutError:
                logger.warning(
                    "checkpoint worker (pid %s) has not answered for %s s; stopping it with "
                    "%d save(s) unfinished",
                    process.pid,
                    bound,
                    len(pending),
                )
                return
            except WorkerError:
                continue  # it died: the saves fail (or start a new worker) on their own

    # --- saving --------------------------------------------------------------------------------

    def save(
        self,
        state_dict: Any,
        *,
        step: int,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> SaveHandle:
        """Save ``state_dict`` as ``<root>/step_<step>`` (zero-padded, so names sort).

        Raises ``ValueError`` when the Checkpointer has no root; otherwise as ``save_to``.
        """
        if self.root is None:
            raise ValueError("Checkpointer.save needs a root; pass root= or use save_to(path)")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        path = os.path.join(self.root, STEP_NAME.format(step=step))
        return self.save_to(state_dict, path, overwrite=overwrite, metadata=metadata, step=step)

    def save_to(
        self,
        state_dict: Any,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        writer_options: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        metadata: Mapping[str, Any] | None = None,
        allow_pickle: bool | None = None,
        step: int | None = None,
    ) -> SaveHandle:
        """Start saving ``state_dict`` to ``path``; return its ``SaveHandle`` at once.

        ``Stateful`` values (torch's protocol: ``state_dict()`` and ``load_state_dict()``, as
        modules, optimizers and torchtitan-style app states have) at the top level of
        ``state_dict``, or ``state_dict`` itself, are saved as what their ``state_dict()``
        returns, called here, as ``torch.distributed.checkpoint.save`` does.

        Raises ``TypeError`` here, naming the key, for an entry that cannot be checkpointed
        (or for ``metadata`` that is not msgspec-encodable), ``ValueError`` for an unknown
        format, ``TypeError`` or ``ValueError`` for ``writer_options`` its writer refuses
        (default: the Checkpointer's; with ``format`` given, none), ``WorkerClosed`` after
        ``close``, ``io.UnsupportedOperation`` when opened ``read_only``, ``RuntimeError``
        outside a running loop, and what a ``Stateful`` value's ``state_dict()`` raises. In a
        multi-rank job such an error still fails this save on the other ranks (with
        ``RankFailed`` naming this rank), and the next save works on every rank. Failures of
        the save itself are raised by awaiting the handle.
        """
        loop = running_loop("Checkpointer.save")
        if self.read_only:
            raise io.UnsupportedOperation(f"the Checkpointer of {self.root} is read_only")
        if self.closed:
            raise WorkerClosed("the Checkpointer was closed")
        target = os.path.abspath(os.fspath(path))
        # The round is taken before anything can fail, so that every rank agrees on it.
        round_id = self._next_round(target)
        try:
            fmt = self.format if format is None else format
            self._check_format(fmt)
            if writer_options is None:
                writer_options = self.writer_options if format is None else {}
            options_of_writer = dict(writer_options)
            if writer_options is not self.writer_options:
                self._check_writer_options(fmt, options_of_writer)
            check_encodable(dict(metadata or {}), "metadata")
            # Here, in the caller, before staging: once ``staged`` resolves, the Stateful
            # objects may change again, as with any other entry.
            state_dict = stateful_to_state_dict(state_dict)
            plan = self._plans.plan(
                state_dict,
                allow_pickle=self.allow_pickle if allow_pickle is None else allow_pickle,
            )
            if plan.shards and fmt not in _SHARDING_FORMATS:
                raise TypeError(
                    f"format={fmt!r} cannot store sharded tensors (DTensor); use "
                    "format='dcp' or save full tensors (DTensor.full_tensor())"
                )
        except Exception as exc:
            self._report_failed_save(round_id, exc)
            raise
        options = CommitOptions(
            fmt,
            overwrite,
            dict(metadata) if metadata else None,
            round_id=round_id,
            forget_round=self._recent_rounds[0] if len(self._recent_rounds) == 3 else None,
            writer_options=options_of_writer or None,
        )
        staged: asyncio.Future[None] = loop.create_future()
        previous_sent, sent = self._previous_sent, loop.create_future()
        self._previous_sent = sent
        feed = ProgressFeed(target, plan.nbytes)
        task = loop.create_task(
            self._save(plan, target, options, staged, step, _SendOrder(previous_sent, sent), feed)
        )
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)
        task.add_done_callback(functools.partial(self._save_done, round_id, staged, sent))
        task.add_done_callback(lambda done: feed.close(final_phase(done)))
        return SaveHandle(target, task, staged, step, feed)

    def _save_done(
        self,
        round_id: str,
        staged: asyncio.Future[None],
        sent: asyncio.Future[None],
        task: asyncio.Task[SaveResult],
    ) -> None:
        """Settle what a save task leaves behind, however it ended; a task cancelled before
        it ran a single line included."""
        if not sent.done():
            sent.set_result(None)  # the next save's turn to be sent
        if task.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        elif self._is_collective():
            exc = task.exception()
        else:
            exc = None
        if exc is not None:
            _resolve(staged, exc)
            self._report_failed_save(round_id, exc)

    def _next_round(self, target: str) -> str:
        """The round id of a save to ``target``: its name (relative to the root when under
        it) and how many saves to that name came before."""
        name = target
        if self.root is not None and os.path.dirname(target) == self.root:
            name = os.path.basename(target)
        round_id = f"{name}#{self._saves_per_name[name]}"
        self._saves_per_name[name] += 1
        self._recent_rounds.append(round_id)
        return round_id

    def _report_failed_save(self, round_id: str, exc: BaseException) -> None:
        """In a group, post this rank's failure of a save to the keys its worker owes and
        has not posted (refused in ``save``, failed staging, dead worker, cancelled), so that
        the other ranks fail that save now (``RankFailed``) instead of at their timeout.

        The post runs in a thread that starts now: the caller may block its loop in a
        collective next, which the other ranks only join once they learn of the failure."""
        if not self._is_collective():
            return
        loop = asyncio.get_running_loop()
        report = loop.run_in_executor(None, self._post_failure, round_id, exc)
        self._failure_reports.add(report)
        report.add_done_callback(self._failure_reports.discard)

    def _post_failure(self, round_id: str, exc: BaseException) -> None:
        """Blocking. Keys this rank's worker already posted are left as they are."""
        try:
            self._form_group_once()
            if self._group is None:
                return
            info = self._group.info
            SaveRound(
                self._group.store,
                round_id,
                rank=info.rank,
                world_size=info.world_size,
                timeout_s=0,
            ).fail(exc)
        except Exception as report_error:  # the save's own error is the one to raise
            logger.warning(
                "could not tell the other ranks that save %r failed here: %s",
                round_id,
                report_error,
            )

    async def _save(
        self,
        plan: StagingPlan,
        path: str,
        options: CommitOptions,
        staged: asyncio.Future[None],
        step: int | None,
        order: _SendOrder,
        feed: ProgressFeed,
    ) -> SaveResult:
        started = time.perf_counter()
        try:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.max_in_flight)
            async with self._slots:
                if not options.overwrite and await asyncio.to_thread(os.path.lexists, path):
                    raise FileExistsError(f"checkpoint path exists and overwrite=False: {path}")
                process = self._process
                if process is not None and process.alive:
                    await self._ensure_started()  # cheap for a running worker
                    arena = await self._take_arena(process, plan.nbytes)
                    starting = None
                else:
                    # No worker yet (or a dead one): stage into a new arena while it starts
                    # (and, in a group, while the group forms), and map the arena after.
                    starting = asyncio.ensure_future(self._ensure_started())
                    arena = await _new_arena(plan.nbytes)
                try:
                    live = starting is None and process is not None
                    if live and arena is not None and plan.chunks is not None:
                        # a live worker with the arena mapped: write while staging
                        assert process is not None
                        staged_at, written = await self._stage_while_writing(
                            process, arena, plan, path, options, staged, order, feed
                        )
                        staging_seconds = staged_at - started
                    else:
                        await _copy_in(arena, plan)
                        staging_seconds = time.perf_counter() - started
                        _resolve(staged)
                        feed.update(phase="writing", bytes_staged=plan.nbytes)
                        if starting is not None:
                            await starting
                            process = self._process
                            assert process is not None
                            if arena is not None:
                                # _map closes it if that fails: never give it back unmapped.
                                unmapped, arena = arena, None
                                await _map(process, unmapped)
                                arena = unmapped
                        assert process is not None
                        payload = _write_payload(path, plan, arena, options)
                        if self._group is not None:
                            await order.turn()
                        written = await process.write_payload(
                            payload,
                            on_sent=order.done,
                            on_progress=lambda count: feed.update(bytes_written=count),
                        )
                finally:
                    if starting is not None and not starting.done():
                        # The start belongs to the Checkpointer, not to this save: let it
                        # finish (within subprocess_init_timeout_secs) rather than leave a
                        # worker or a group half-formed.
                        await asyncio.gather(starting, return_exceptions=True)
                    if process is None:
                        _close(arena)
                    else:
                        self._give_back(process, arena)
        except BaseException as exc:
            _resolve(staged, exc)
            if isinstance(exc, WorkerCrashed):
                logger.error("save to %s failed: %s; the next save starts a new worker", path, exc)
                # A worker killed between its commit and its answer leaves this save
                # committed: retention must still hold ``keep_last``.
                try:
                    await self._retain(step)
                except OSError:
                    logger.exception("retention after the failed save to %s failed", path)
            if isinstance(exc, WorkerClosed):
                raise WorkerClosed(
                    f"save to {path} did not finish: {exc}", pid=exc.pid, path=str(path)
                ) from exc
            raise
        return await self._saved(written, staging_seconds, started, step)

    async def _stage_while_writing(
        self,
        process: CheckpointProcess,
        arena: SharedArena,
        plan: StagingPlan,
        path: str,
        options: CommitOptions,
        staged: asyncio.Future[None],
        order: _SendOrder,
        feed: ProgressFeed,
    ) -> tuple[float, WriteResult]:
        """Send the write while the first chunk is copied, then stage chunk by chunk
        (``plan.chunks``), telling the worker as each lands: it writes what is staged while
        the rest is copied, so the save is durable about the write's time after it starts,
        not after staging plus writing. Returns when staging ended (``perf_counter``) and
        the write's result. A failure or cancellation while staging cancels the write (the
        worker gives up waiting)."""
        if self._group is not None:
            await order.turn()
        sent: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        writing = asyncio.ensure_future(
            process.write_payload(
                _write_payload(path, plan, arena, options, staged_bytes=0),
                on_sent=order.done,
                on_request=sent.set_result,
                on_progress=lambda count: feed.update(bytes_written=count),
            )
        )

        async def report(nbytes: int, complete: bool) -> None:
            feed.update(bytes_staged=nbytes)
            if not sent.done():
                await asyncio.wait((sent, writing), return_when=asyncio.FIRST_COMPLETED)
                if not sent.done():
                    # It failed before it was sent (no write ends before staging does):
                    # raises why.
                    await writing
            await process.report_staged(sent.result(), nbytes, complete=complete)

        try:
            # The first chunk is copied while the write request is encoded and sent.
            await copy_into_arena_in_chunks(arena, plan, plan.chunks or [], report)
        except BaseException:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)  # bounded by the process
            raise
        staged_at = time.perf_counter()
        _resolve(staged)
        feed.update(phase="writing", bytes_staged=plan.nbytes)
        return staged_at, await writing

    async def _saved(
        self, written: WriteResult, staging_seconds: float, started: float, step: int | None
    ) -> SaveResult:
        """The result of a save whose write succeeded, after retention."""
        result = msgspec.convert(written.result, commit.CommitResult)
        await self._retain(step)
        saved = SaveResult(
            path=result.path,
            nbytes=result.nbytes,
            staging_seconds=staging_seconds,
            write_seconds=written.write_seconds,
            total_seconds=time.perf_counter() - started,
            step=step,
        )
        _log_committed(saved, leader=self._leader)
        return saved

    async def _take_arena(self, process: CheckpointProcess, nbytes: int) -> SharedArena | None:
        """A free arena of at least ``nbytes`` mapped by ``process``'s worker, or None when
        the state dict has no tensor bytes."""
        return await process.take_arena(nbytes, self._free_arenas)

    def _give_back(self, process: CheckpointProcess, arena: SharedArena | None) -> None:
        if process is self._process:
            process.give_back(arena, self._free_arenas)  # closes it if the worker is gone
        else:
            _close(arena)

    async def _retain(self, step: int | None) -> None:
        """Apply ``keep_last`` after a step-named save, on the leader only, off the loop."""
        if self.keep_last is not None and step is not None and self._leader:
            await asyncio.to_thread(self._apply_retention)

    def _apply_retention(self) -> None:
        """Delete all but the newest ``keep_last`` step-named checkpoints under the root."""
        assert self.root is not None and self.keep_last is not None
        by_step = sorted(
            (int(match[1]), path)
            for path in commit.list_committed(self.root)
            if (match := STEP_NAME_PATTERN.fullmatch(os.path.basename(path)))
        )
        for _, old in by_step[: max(0, len(by_step) - self.keep_last)]:
            with contextlib.suppress(FileNotFoundError):
                commit.remove_checkpoint(old)

    def _check_writer_options(self, format: str, options: dict[str, Any]) -> None:
        """Construct the writer once with ``options`` (only when there are some), so that a
        bad option is an error at the call, not a failed save in the worker. Raises what the
        writer's constructor raises (TypeError, ValueError), and TypeError for options that
        cannot cross to the worker."""
        if not options:
            return
        check_encodable(options, "writer_options")
        resolve_writer(format)(rank_info=RankInfo(), **options)

    def _check_format(self, format: str) -> None:
        """Resolve a format's writer once, here, so that a typo is a ValueError at the call
        rather than a failed save; later saves in the same format skip the import."""
        if format in self._checked_formats:
            return
        try:
            resolve_writer(format)
        except (ValueError, ImportError, AttributeError) as exc:
            raise ValueError(f"checkpoint format {format!r}: {exc}") from exc
        self._checked_formats.add(format)

    # --- finding and loading -------------------------------------------------------------------

    async def checkpoints(self) -> list[ListedCheckpoint]:
        """The checkpoints under ``root``, oldest name first (natural order): those aiockpt
        committed and those ``torch.distributed.checkpoint.save`` wrote, which are marked
        ``unverified`` (see ``aiockpt.list_checkpoints``). Raises ``ValueError`` when the
        Checkpointer has no root."""
        if self.root is None:
            raise ValueError("Checkpointer.checkpoints needs a root")
        return await asyncio.to_thread(list_checkpoints, self.root)

    async def latest(self) -> str | None:
        """The newest checkpoint under ``root`` (natural name order), or None.

        A directory without a manifest (a save in progress or one that crashed) is never
        reported, unless torch's ``dcp.save`` finished it (its ``.metadata``): such a
        checkpoint is reported, with a warning logged that it is unverified (loading it
        needs ``allow_pickle=True``). Raises ``ValueError`` when the Checkpointer has no root.
        """
        running_loop("Checkpointer.latest")
        if self.root is None:
            raise ValueError("Checkpointer.latest needs a root")
        listed = await asyncio.to_thread(list_checkpoints, self.root)
        if not listed:
            return None
        if listed[-1].unverified:
            logger.warning(
                "the latest checkpoint under %s, %s, was written by torch.distributed.checkpoint "
                "(no aiockpt manifest): unverified; load it with allow_pickle=True",
                self.root,
                listed[-1].name,
            )
        return listed[-1].path

    async def load_latest(
        self,
        state_dict: Any = None,
        *,
        verify: bool | None = None,
        allow_pickle: bool = False,
        mmap: bool = False,
    ) -> Any:
        """Load the newest checkpoint (see ``aiockpt.load``, ``mmap`` and ``verify``
        included), or return None if there is none; in a group, this rank's part of it at
        the current world size (its own part if the save had as many ranks, else resharded:
        DTensors get their slice, plain tensors the whole). ``Stateful`` values of
        ``state_dict`` are loaded through their ``state_dict()`` and ``load_state_dict()``,
        called in this thread; listing, reading and mapping the files run in another, never
        on the event loop. Raises what ``aiockpt.load`` raises (``ForeignCheckpoint`` for a
        checkpoint torch's DCP wrote, without ``allow_pickle``)."""
        path = await self.latest()
        if path is None:
            return None
        if self._group is not None:
            rank, world_size = self._group.info.rank, self._group.info.world_size
        else:
            # Not started yet (or a single rank): this rank's place all the same, so that a
            # rank loading before start() does not silently get rank 0's part.
            world = None if self.no_dist else world_of(self.process_group)
            rank, world_size = world if world is not None else (0, 1)
        stateful = StatefulLoad(state_dict)
        loaded = await asyncio.to_thread(
            loading.load,
            path,
            stateful.into,
            verify=verify,
            allow_pickle=allow_pickle,
            rank=rank,
            world_size=world_size,
            mmap=mmap,
        )
        return stateful.finish(loaded)


#: the fewest bytes between two progress reports of a save's worker
_MIN_PROGRESS_BYTES = 1 << 20


def _log_committed(result: SaveResult, *, leader: bool) -> None:
    """One line per committed save: INFO on the rank that commits (every rank's line would
    say the same), DEBUG on the others."""
    logger.log(
        logging.INFO if leader else logging.DEBUG,
        "committed %s: %d bytes, staging %.3f s, write %.3f s (%.2f GB/s), total %.3f s",
        result.path,
        result.nbytes,
        result.staging_seconds,
        result.write_seconds,
        result.nbytes / result.write_seconds / 1e9 if result.write_seconds > 0 else 0.0,
        result.total_seconds,
    )


class _SendOrder:
    """A save's place in the order its group's saves are sent to the worker."""

    def __init__(self, previous: asyncio.Future[None] | None, mine: asyncio.Future[None]):
        self._previous = previous
        self._mine = mine

    async def turn(self) -> None:
        """Wait until the save before this one is sent (or failed)."""
        if self._previous is not None:
            await asyncio.shield(self._previous)

    def done(self) -> None:
        if not self._mine.done():
            self._mine.set_result(None)


async def _new_arena(nbytes: int) -> SharedArena | None:
    """A new arena of ``nbytes``, not mapped by any worker yet (None for no tensor bytes)."""
    return await asyncio.to_thread(SharedArena, nbytes) if nbytes else None


async def _map(process: CheckpointProcess, arena: SharedArena) -> None:
    """Have ``process``'s worker map ``arena``; if that fails, ``arena`` is closed."""
    await process.map_new_arena(arena)


def _write_payload(
    path: str,
    plan: StagingPlan,
    arena: SharedArena | None,
    options: CommitOptions,
    *,
    staged_bytes: int | None = None,
) -> WritePayload:
    return WritePayload(
        path,
        plan.payload(arena),
        commit=options,
        progress_bytes=max(plan.nbytes // 32, _MIN_PROGRESS_BYTES),
        staged_bytes=staged_bytes,
    )


def _close(arena: SharedArena | None) -> None:
    if arena is not None:
        arena.close()


#: copy a plan's tensors into its arena off the loop (one implementation, in staging)
_copy_in = copy_into_arena


def _resolve(staged: asyncio.Future[None], exc: BaseException | None = None) -> None:
    if staged.done():
        return
    if exc is None:
        staged.set_result(None)
    elif isinstance(exc, asyncio.CancelledError):
        staged.cancel()
    else:
        staged.set_exception(exc)
        staged.exception()  # retrieved: awaiting the handle reports it; no "never retrieved"
