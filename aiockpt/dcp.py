"""A drop-in for ``torch.distributed.checkpoint``'s ``save``, ``async_save`` and ``load``.

Code written for torch's DCP switches by changing one import line::

    import torch.distributed.checkpoint as dcp      # before
    import aiockpt.dcp as dcp                       # after

    dcp.save(state_dict, checkpoint_id=path)
    future = dcp.async_save(state_dict, checkpoint_id=path, process_group=pg)
    ...
    future.result()            # or, in async code: await future
    dcp.load(state_dict, checkpoint_id=path)

The signatures are torch 2.13's, and so are the semantics a trainer relies on: ``Stateful``
values (``{"app": AppState(model, optimizer)}``) are saved through ``state_dict()`` and loaded
through ``load_state_dict()``; every rank calls ``save``/``async_save`` in the same order and
together they write one checkpoint; ``async_save`` returns once the state is copied out (the
trainer may step again) with a future that resolves when the checkpoint is durable; ``load``
fills the state dict in place, resharding DTensors to the current world size and placements.

What aiockpt does instead of torch's executors: each ``(process_group, no_dist)`` gets one
``SyncCheckpointer`` (a persistent checkpoint worker, its event loop in a background thread)
on first use; its workers meet over the trainers' store and never run a collective on
``process_group``. Checkpoints are committed atomically with aiockpt's manifest, and are
loadable by torch's own ``dcp.load``. ``load`` reads aiockpt checkpoints without unpickling
anything but objects saved as pickles (as torch saves them), verifying every file; a
checkpoint torch's DCP wrote is loaded by torch's own reader, with a warning that it is
unverified. Objects that are neither tensors nor plain values are pickled, as torch's DCP
does (``allow_pickle=True``).

Differences, each raised rather than ignored:

* ``save`` returns aiockpt's ``SaveResult`` (path, bytes, seconds), not torch's
  ``Metadata`` (reading that back means unpickling ``.metadata``).
* ``storage_writer``/``storage_reader``: only torch's ``FileSystemWriter``/``FileSystemReader``
  (their path; a writer's ``overwrite``), other storage raises ``ValueError``. ``checkpoint_id``
  must be a local path; a URL (``s3://``) raises ``ValueError``.
* ``planner``: None or torch's ``DefaultSavePlanner``/``DefaultLoadPlanner`` with their
  default flattening (aiockpt's DCP writer plans with ``DefaultSavePlanner`` itself); a
  custom planner, ``allow_partial_load=True`` or ``use_collectives=False`` raise
  ``ValueError``; ``async_stager`` likewise (aiockpt stages into its own shared memory);
  ``async_checkpointer_type`` is accepted and changes nothing (aiockpt always writes in its
  worker process).
* An existing directory at ``checkpoint_id`` is replaced only if it is an aiockpt checkpoint
  (atomically); anything else there is a ``FileExistsError``, where torch would write into it.

``close_checkpointers()`` (not in torch) stops the checkpoint workers after letting saves in
flight finish; it runs at interpreter exit, as torch's executor threads are joined then.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
from collections.abc import Generator
from typing import Any

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from aiockpt._format import loading
from aiockpt._trainer.group_formation import world_of
from aiockpt._trainer.handles import SaveResult
from aiockpt._trainer.sync import SyncCheckpointer, SyncSaveHandle

__all__ = ["DcpSaveFuture", "async_save", "close_checkpointers", "load", "save"]


class DcpSaveFuture(concurrent.futures.Future[SaveResult]):
    """What ``async_save`` returns: a ``concurrent.futures.Future`` (``result(timeout)``
    blocks until the checkpoint is committed and durable, and raises what the save raised)
    that can also be awaited (``await future``) from any event loop. ``cancel()`` cancels
    the save unless its commit has begun (see ``aiockpt.SaveHandle.cancel``)."""

    def __init__(self, handle: SyncSaveHandle) -> None:
        super().__init__()
        self._handle = handle
        self.path = handle.path
        handle.add_done_callback(self._settle)

    def _settle(self, handle: SyncSaveHandle) -> None:
        try:
            result = handle.result(0)
        except concurrent.futures.CancelledError:
            super().cancel()
        except BaseException as exc:
            self.set_exception(exc)
        else:
            self.set_result(result)

    def cancel(self) -> bool:
        return self._handle.cancel()

    def __await__(self) -> Generator[Any, None, SaveResult]:
        return asyncio.wrap_future(self).__await__()


#: (process_group, no_dist) -> its SyncCheckpointer; one worker (and group) each
_checkpointers: dict[tuple[Any, bool], SyncCheckpointer] = {}
_checkpointers_lock = threading.Lock()


def _checkpointer(process_group: Any, no_dist: bool) -> SyncCheckpointer:
    with _checkpointers_lock:
        checkpointer = _checkpointers.get((process_group, no_dist))
        if checkpointer is None:
            checkpointer = _checkpointers[(process_group, no_dist)] = SyncCheckpointer(
                process_group=process_group, no_dist=no_dist, allow_pickle=True
            )
        return checkpointer


def close_checkpointers() -> None:
    """Let every save in flight finish, then stop the checkpoint workers this module
    started (the next save starts new ones). Runs at interpreter exit; call it earlier to
    release them. In a multi-rank job call it on every rank. Raises nothing a save raised
    (failures of saves nobody waited for are logged)."""
    with _checkpointers_lock:
        checkpointers = list(_checkpointers.values())
        _checkpointers.clear()
    for checkpointer in checkpointers:
        checkpointer.close()


atexit.register(close_checkpointers)


def _path_of(
    checkpoint_id: str | os.PathLike[str] | None, storage: Any, kind: type[Any], argument: str
) -> str:
    """The local directory a save or load is about; ``ValueError`` for anything else."""
    if storage is not None and type(storage) is not kind:
        raise ValueError(
            f"aiockpt.dcp writes and reads local directories through its own checkpoint "
            f"worker and manifest; {argument}={type(storage).__qualname__} is not supported "
            f"(pass checkpoint_id=<directory> or a {kind.__qualname__}, or use "
            "torch.distributed.checkpoint for other storage)"
        )
    if checkpoint_id is None:
        if storage is None:
            raise ValueError(f"pass checkpoint_id=<directory> or {argument}=")
        checkpoint_id = storage.path
    path = os.fspath(checkpoint_id)
    if "://" in path:
        raise ValueError(
            f"aiockpt.dcp saves to local directories; checkpoint_id={path!r} is a URL (use "
            "torch.distributed.checkpoint with an fsspec storage for it)"
        )
    return path


def _check_planner(planner: Any, kind: type[Any]) -> None:
    if planner is None:
        return
    if type(planner) is not kind:
        raise ValueError(
            f"aiockpt.dcp plans with torch's {kind.__qualname__} itself; "
            f"planner={type(planner).__qualname__} is not supported (use "
            "torch.distributed.checkpoint for a custom planner)"
        )
    if not (planner.flatten_state_dict and planner.flatten_sharded_tensors):
        raise ValueError(
            f"aiockpt.dcp supports {kind.__qualname__} with flatten_state_dict=True and "
            "flatten_sharded_tensors=True (the defaults) only"
        )
    if getattr(planner, "allow_partial_load", False):
        raise ValueError(
            "aiockpt.dcp.load does not support allow_partial_load=True: every key of the "
            "state dict must be in the checkpoint (a missing one raises KeyError)"
        )


def _start_save(
    state_dict: Any,
    checkpoint_id: str | os.PathLike[str] | None,
    storage_writer: Any,
    planner: Any,
    process_group: Any,
    no_dist: bool,
    use_collectives: bool,
) -> SyncSaveHandle:
    path = _path_of(checkpoint_id, storage_writer, FileSystemWriter, "storage_writer")
    _check_planner(planner, DefaultSavePlanner)
    if not use_collectives:
        raise ValueError(
            "aiockpt.dcp does not support use_collectives=False (torch's experimental "
            "uncoordinated format); aiockpt's ranks never run collectives on your group anyway"
        )
    overwrite = True if storage_writer is None else bool(storage_writer.overwrite)
    return _checkpointer(process_group, no_dist).save_to(state_dict, path, overwrite=overwrite)


def save(
    state_dict: Any,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: FileSystemWriter | None = None,
    planner: DefaultSavePlanner | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    use_collectives: bool = True,
) -> SaveResult:
    """Save ``state_dict`` to the directory ``checkpoint_id`` and wait until it is durable,
    as ``torch.distributed.checkpoint.save``; return its ``SaveResult``.

    ``Stateful`` values at the top level are saved as their ``state_dict()``. In a job with
    several ranks (``torch.distributed`` initialised) every rank of ``process_group``
    (default: the world) calls this in the same order and they write one checkpoint;
    ``no_dist=True`` saves from this rank alone.

    Raises ``ValueError`` for arguments aiockpt does not support (see the module's
    docstring), ``TypeError`` naming the key for an entry that cannot be saved,
    ``FileExistsError`` when something other than an aiockpt checkpoint is at the path, and
    what ``aiockpt.SaveHandle`` raises (``CheckpointWriteError``, ``RankFailed``,
    ``CoordinationTimeout``, ``WorkerCrashed``, ...).
    """
    handle = _start_save(
        state_dict,
        checkpoint_id,
        storage_writer,
        planner,
        process_group,
        no_dist,
        use_collectives,
    )
    return handle.result()


def async_save(
    state_dict: Any,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: FileSystemWriter | None = None,
    planner: DefaultSavePlanner | None = None,
    process_group: Any = None,
    async_checkpointer_type: AsyncCheckpointerType = AsyncCheckpointerType.THREAD,
    async_stager: Any = None,
    no_dist: bool = False,
    use_collectives: bool = True,
) -> DcpSaveFuture:
    """Start saving ``state_dict`` to ``checkpoint_id``, as
    ``torch.distributed.checkpoint.async_save``: return once every tensor has been copied
    out (the trainer may change them again), with a ``DcpSaveFuture`` that resolves when the
    checkpoint is durable (``future.result()``, or ``await future``). Callable from
    synchronous code and from a running event loop (it then blocks that loop until the
    tensors are copied out, as torch's does; async code may prefer ``aiockpt.async_save``).

    A save waits for the previous one to be written before it copies (aiockpt keeps one
    save in flight per process group), as a trainer calling ``future.result()`` before its
    next ``async_save`` does. ``async_checkpointer_type`` changes nothing (aiockpt always
    writes in its worker process).

    Raises ``ValueError`` for arguments aiockpt does not support (an ``async_stager``
    among them), ``TypeError`` naming the key for an entry that cannot be saved, and what
    the save raised before its tensors were copied out; later failures are raised by the
    future (see ``save``).
    """
    if async_stager is not None:
        raise ValueError(
            "aiockpt.dcp.async_save does not support async_stager: aiockpt stages into its own "
            "shared memory, read by its checkpoint worker"
        )
    handle = _start_save(
        state_dict,
        checkpoint_id,
        storage_writer,
        planner,
        process_group,
        no_dist,
        use_collectives,
    )
    future = DcpSaveFuture(handle)
    handle.staged.result()
    return future


def load(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_reader: FileSystemReader | None = None,
    planner: DefaultLoadPlanner | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    verify: bool = True,
) -> None:
    """Load the checkpoint at ``checkpoint_id`` into ``state_dict`` in place, as
    ``torch.distributed.checkpoint.load``: tensors are copied into (DTensors get their own
    slice, at any world size and placement), other values replaced, ``Stateful`` values
    loaded through ``state_dict()`` and ``load_state_dict()``. In a job with several ranks,
    this rank's part at the current world size of ``process_group`` (see ``aiockpt.load``);
    no collective runs, so ranks need not call it together.

    ``verify`` (aiockpt's, default True) checks every file's size and checksum as it reads.
    A checkpoint torch's DCP wrote is read by torch's own reader (with ``no_dist``),
    unverified: a warning is logged.

    Raises ``ValueError`` for arguments aiockpt does not support, ``TypeError`` for a
    ``state_dict`` that is not a dict, and what ``aiockpt.load`` raises (``KeyError`` for a
    key the checkpoint lacks, ``CorruptCheckpoint`` naming a bad file, ...).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__qualname__}")
    path = _path_of(checkpoint_id, storage_reader, FileSystemReader, "storage_reader")
    _check_planner(planner, DefaultLoadPlanner)
    world = None if no_dist else world_of(process_group)
    rank, world_size = world if world is not None else (0, 1)
    loading.load(
        path, state_dict, verify=verify, allow_pickle=True, rank=rank, world_size=world_size
    )
