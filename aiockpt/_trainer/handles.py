"""``SaveHandle``, ``SaveResult`` and the module-level ``async_save``.

A save has two moments a trainer cares about, and the handle exposes both as awaitables:
``await handle.staged`` returns once every tensor has been copied out (the trainer may change
its tensors again), ``await handle`` once the checkpoint is committed and durable. In between,
``async for p in handle.progress()`` follows it (``SaveProgress``: bytes staged and written).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiockpt._trainer.checkpointer import Checkpointer

__all__ = [
    "ProgressFeed",
    "SaveHandle",
    "SaveProgress",
    "SaveResult",
    "async_save",
    "final_phase",
    "running_loop",
]


@dataclass(frozen=True)
class SaveResult:
    """A committed, durable checkpoint and what it took.

    Attributes:
        path: the checkpoint directory.
        nbytes: bytes written (data files and manifest).
        staging_seconds: from the call until every tensor was copied out (includes waiting
            for a free in-flight slot).
        write_seconds: time the worker spent writing and fsyncing the files.
        total_seconds: from the call until the commit was durable.
        step: the step given to ``Checkpointer.save``, if any.
    """

    path: str
    nbytes: int
    staging_seconds: float
    write_seconds: float
    total_seconds: float
    step: int | None = None


@dataclass(frozen=True)
class SaveProgress:
    """Where a save stands (see ``SaveHandle.progress``).

    Attributes:
        path: the checkpoint directory.
        phase: "staging" (waiting for an in-flight slot, or copying the tensors out),
            "writing" (staged: the worker writes and commits), "committed", or "failed"
            (failed or cancelled; awaiting the handle says why).
        nbytes: the tensor bytes this rank stages.
        bytes_staged: tensor bytes copied out so far: a large save to a running worker, in
            a process that may run on 4 CPUs or more, is copied (and reported) in chunks of
            up to ~32 MiB while the worker writes what is copied; any other in one batched
            copy, so 0 until it is done, then ``nbytes``.
        bytes_written: bytes this rank's checkpoint worker has written to the checkpoint's
            files so far: tensor data, framing, metadata and manifest (one rank alone: the
            ``SaveResult.nbytes`` in the end); in a multi-rank save, this rank's share of the
            whole. Reported by the worker every ~1/32 of ``nbytes`` (at least 1 MiB) and
            once when its files are written.
    """

    path: str
    phase: str
    nbytes: int
    bytes_staged: int = 0
    bytes_written: int = 0


class ProgressFeed:
    """The latest ``SaveProgress`` of one save, and a wake-up for those following it. Lives
    on the save's event loop; ``update`` and ``close`` are called there."""

    def __init__(self, path: str, nbytes: int) -> None:
        self.current = SaveProgress(path, "staging", nbytes)
        self.closed = False
        self._changed = asyncio.Event()

    def update(self, **changes: Any) -> None:
        """Change fields of the current progress (ignored once closed)."""
        if self.closed:
            return
        self.current = dataclasses.replace(self.current, **changes)
        self._wake()

    def close(self, phase: str) -> None:
        """The save is over: a last update to ``phase``; followers end after it."""
        self.update(phase=phase)
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self) -> AsyncGenerator[SaveProgress, None]:
        """The current progress, then each new one until the save is over; a slow follower
        skips to the latest rather than falling behind."""
        last: SaveProgress | None = None
        while True:
            changed = self._changed
            current = self.current
            if current is not last:
                last = current
                yield current
                continue
            if self.closed:
                return
            await changed.wait()


class SaveHandle:
    """A save in progress: ``await handle`` for the ``SaveResult``.

    ``await handle`` raises ``FileExistsError`` (path exists and ``overwrite=False``),
    ``CheckpointWriteError`` (the writer failed; worker traceback attached), ``WorkerCrashed``
    (the worker died; the next save respawns it), ``OSError`` (no room for staging) or
    ``asyncio.CancelledError`` (cancelled before its commit; nothing at ``path``).

    Awaiting the handle is awaiting the save: cancelling the awaiting task, or
    ``asyncio.wait_for(handle, t)`` running out, cancels the save. To bound a wait without
    giving up the save, wait with ``handle.wait()``:
    ``async with asyncio.timeout(t): await handle.wait()``.

    ``async for p in handle.progress()`` follows the save as it is staged and written.
    """

    def __init__(
        self,
        path: str,
        task: asyncio.Task[SaveResult],
        staged: asyncio.Future[None],
        step: int | None = None,
        progress: ProgressFeed | None = None,
    ) -> None:
        self.path = path
        self.step = step
        self._task = task
        self._staged = staged
        if progress is None:  # a handle of a save that reports nothing but its end
            progress = ProgressFeed(path, 0)
            task.add_done_callback(lambda _: progress.close(final_phase(task)))
        self._progress = progress

    def progress(self) -> AsyncGenerator[SaveProgress, None]:
        """Follow the save: ``async for p in handle.progress(): ...`` yields its current
        ``SaveProgress``, then each change (the latest one, when the loop body is slower
        than the save), and ends after the last one (``phase`` "committed" or "failed").
        Never raises for the save's failure: await the handle for that. Any number of
        followers, at any time (a late one starts from the latest)."""
        return self._progress.follow()

    @property
    def current_progress(self) -> SaveProgress:
        """The latest ``SaveProgress`` (for logging without following)."""
        return self._progress.current

    @property
    def staged(self) -> asyncio.Future[None]:
        """Resolves once every tensor has been copied out; raises what the save raised if
        it failed before that. Cancelling a task that awaits it does not cancel the save."""
        return asyncio.shield(self._staged)

    def __await__(self) -> Generator[Any, None, SaveResult]:
        # Awaiting the task itself links cancellation: cancelling the awaiting task cancels
        # the save, exactly like cancelling the handle.
        return self._task.__await__()

    async def wait(self) -> SaveResult:
        """The save's result, awaited without owning the save: cancelling the waiting task,
        or a deadline around it (``async with asyncio.timeout(t): await handle.wait()``),
        stops the wait and leaves the save running. Raises what ``await handle`` raises."""
        return await asyncio.shield(self._task)

    def done(self) -> bool:
        """True once the save committed, failed or was cancelled."""
        return self._task.done()

    def cancel(self) -> bool:
        """Cancel the save unless it has finished; return False if it had.

        Before its commit begins a cancelled save leaves nothing at ``path`` (its temporary
        files are removed) and awaiting it raises ``asyncio.CancelledError``. Like
        ``asyncio.Task.cancel`` this is a request: a save whose commit was already under way
        when the request reached the worker completes, and awaiting it returns its result.
        """
        if self._task.done():
            return False
        return self._task.cancel()

    def result(self) -> SaveResult:
        """The result of a finished save (``asyncio.InvalidStateError`` if not finished)."""
        return self._task.result()

    def add_done_callback(self, callback: Callable[[SaveHandle], object]) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "staged" if self._staged.done() else "staging"
        return f"<SaveHandle {self.path!r} {state}>"


def running_loop(what: str) -> asyncio.AbstractEventLoop:
    """The running asyncio loop, for ``what`` (the API called). Raises RuntimeError saying
    what to do instead outside one: under trio (aiockpt's tasks, streams and subprocesses are
    asyncio's), and in synchronous code."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    if _under_trio():
        raise RuntimeError(
            f"{what} runs on an asyncio event loop (asyncio or uvloop), and this code runs "
            "under trio. From trio, use aiockpt.SyncCheckpointer in a worker thread "
            "(trio.to_thread.run_sync), or run the trainer on asyncio (anyio.run(main, "
            "backend='asyncio'))"
        ) from None
    raise RuntimeError(
        f"{what} needs a running asyncio event loop; in synchronous code use "
        "aiockpt.SyncCheckpointer"
    ) from None


def _under_trio() -> bool:
    """Whether the calling thread is inside ``trio.run`` (trio imported, a trio task running)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def final_phase(task: asyncio.Task[Any]) -> str:
    return "committed" if not task.cancelled() and task.exception() is None else "failed"


#: loop -> (collective default Checkpointer, this-rank-only default Checkpointer)
_default_checkpointers: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[bool, Checkpointer]
] = weakref.WeakKeyDictionary()


def default_checkpointer(*, no_dist: bool = False) -> Checkpointer:
    """The running loop's default ``Checkpointer`` (no root), created on first use; with
    ``no_dist``, the one that saves from this rank alone in a multi-rank job.

    Its worker starts with the first save (``await default_checkpointer().start()`` to start
    it earlier) and the Checkpointer is closed, releasing its worker, channel and arenas, when
    the loop shuts down (``asyncio.run``, ``uvloop.run`` and ``anyio.run`` cancel the tasks
    left, among them one that closes it), or on ``close()``; so a program may call
    ``asyncio.run`` once per checkpoint. Raises ``RuntimeError`` outside a running event
    loop.
    """
    from aiockpt._trainer.checkpointer import Checkpointer

    loop = running_loop("aiockpt.async_save")
    checkpointers = _default_checkpointers.setdefault(loop, {})
    checkpointer = checkpointers.get(no_dist)
    if checkpointer is None or checkpointer.closed:
        checkpointer = checkpointers[no_dist] = Checkpointer(no_dist=no_dist)
        closer = loop.create_task(_close_at_loop_shutdown(loop, checkpointer, no_dist))
        _closers.add(closer)  # the loop holds its tasks weakly
        closer.add_done_callback(_closers.discard)
    return checkpointer


#: one task per default Checkpointer, pending until its loop shuts down
_closers: set[asyncio.Task[None]] = set()


async def _close_at_loop_shutdown(
    loop: asyncio.AbstractEventLoop, checkpointer: Checkpointer, no_dist: bool
) -> None:
    """Wait until the loop's shutdown cancels this task, then close ``checkpointer`` and
    forget it: nothing else would release a default Checkpointer's worker, channel and
    arenas, nor the entry that keeps it."""
    try:
        await asyncio.Future()
    finally:
        await checkpointer.close()
        checkpointers = _default_checkpointers.get(loop, {})
        if checkpointers.get(no_dist) is checkpointer:
            del checkpointers[no_dist]


def async_save(
    state_dict: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "dcp",
    writer_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    no_dist: bool = False,
) -> SaveHandle:
    """Start saving ``state_dict`` to ``path``; return its ``SaveHandle`` at once.

    ``await aiockpt.async_save(sd, path)`` waits until the checkpoint is durable;
    ``await handle.staged`` only until the tensors have been copied out. Uses the running
    loop's default checkpointer (see ``default_checkpointer``).

    When ``torch.distributed`` is initialised with several ranks this is a collective, as
    ``torch.distributed.checkpoint.async_save`` is: every rank calls it, in the same order,
    and together they write one checkpoint. ``no_dist=True`` saves from this rank alone
    (say, rank 0 publishing weights).

    ``writer_options`` go to the format's writer (``{"max_shard_size": "2GB"}`` for
    safetensors).

    Raises ``TypeError`` here, naming the key, for an entry that cannot be checkpointed
    (objects other than tensors and plain values need ``allow_pickle=True``), ``ValueError``
    for an unknown ``format``, ``TypeError`` or ``ValueError`` for ``writer_options`` its
    writer refuses, ``RuntimeError`` outside a running event loop. Everything else
    is raised by awaiting the handle (see ``SaveHandle``).
    """
    return default_checkpointer(no_dist=no_dist).save_to(
        state_dict,
        path,
        format=format,
        writer_options=writer_options or {},
        overwrite=overwrite,
        metadata=metadata,
        allow_pickle=allow_pickle,
    )
