"""``SaveHandle``, ``SaveResult`` and the module-level ``async_save``.

A save has two moments a trainer cares about, and the handle exposes both as awaitables:
``await handle.staged`` returns once every tensor has been copied out (the trainer may change
its tensors again), ``await handle`` once the checkpoint is committed and durable.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiockpt._trainer.checkpointer import Checkpointer

__all__ = ["SaveHandle", "SaveResult", "async_save"]


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
    """

    def __init__(
        self,
        path: str,
        task: asyncio.Task[SaveResult],
        staged: asyncio.Future[None],
        step: int | None = None,
    ) -> None:
        self.path = path
        self.step = step
        self._task = task
        self._staged = staged

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

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "aiockpt.async_save needs a running event loop; in synchronous code use "
            "aiockpt.SyncCheckpointer"
        ) from None
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
