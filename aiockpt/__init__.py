"""aiockpt: asyncio-native checkpointing and worker supervision for PyTorch.

Saving::

    handle = aiockpt.async_save(state_dict, "ckpt/step_100")   # returns at once
    await handle.staged        # tensors copied out: safe to keep training
    result = await handle      # committed and durable

Layout of the package; the folder says which process runs the code::

    __init__.py, errors.py   the public surface: what users import, and every error in one tree
    dcp.py       torch.distributed.checkpoint's save, async_save, load: a drop-in
    _runtime.py  every process: finish under cancel, the event loop, libc (stdlib only)
    _wire/       both processes; sans-IO except channel
        protocol.py        frames and messages (no asyncio, no torch)
        session.py         the channel's rules: handshake, request ids, routing, the cancel gate
        channel.py         asyncio streams <-> messages
        tensors.py         tensors and plain values <-> leaf descriptions
        refs.py            functions and classes named by "module:attr" across the boundary
        coordination.py    one multi-rank save's rounds over the group's store (blocking)
    _format/     what is on disk; no asyncio, no processes
        tree.py            state dicts as a skeleton plus a flat list of leaves
        manifest.py        the file whose presence makes a directory a checkpoint
        commit.py          temporary directory, manifest, fsync, rename; listing and retention
        reading.py         manifests checked, files read and hashed: verify (no torch)
        loading.py         load without unpickling, resharding, into tensors
        listing.py         the checkpoints under a root, torch-written ones marked unverified
        torch_written.py   checkpoints torch's dcp.save wrote: found, loaded by torch's reader
        stateful.py        Stateful values saved via state_dict(), loaded via load_state_dict()
        root_lock.py       one writer per root (an flock the kernel releases)
    command_line.py  the `aiockpt` command: ls, verify, inspect (no torch), convert
    writers/     the writer API (base.py, no torch), tensor helpers (tensor_leaves.py),
                 dcp and safetensors (Hugging Face layout) writers
    _trainer/    runs in the training process
        checkpointer.py    Checkpointer: root, latest, retention, backpressure
        handles.py         SaveHandle, SaveResult, async_save, default checkpointers
        sync.py            SyncCheckpointer for synchronous loops
        staging.py         shared-memory arenas, plans, the copy into them
        checkpoint_process.py  CheckpointProcess: the parent's side of one worker
        group_formation.py the workers' group, formed over the trainers' store
    _worker/     runs in the checkpoint worker (python -m aiockpt._worker)
        serve.py           handshake, dispatch, writes in arrival order
        progress.py        progress reports of the write in progress
        rank_group.py      the workers' store and gloo group; a multi-rank commit
    elastic/     the worker agent and aiockpt-run (torchrun's counterpart)

Everything but the errors is imported on first use: worker processes started by the elastic
agent import this package and should not pay for torch unless they use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from aiockpt.errors import (
    AiockptError,
    CheckpointWriteError,
    CoordinationError,
    CoordinationTimeout,
    CorruptCheckpoint,
    ForeignCheckpoint,
    ProtocolError,
    ProtocolVersionMismatch,
    RankFailed,
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
    RootLocked,
    SignalException,
    WorkerClosed,
    WorkerCrashed,
    WorkerError,
    WorkerStartError,
    WorkerStartTimeout,
)

if TYPE_CHECKING:
    from aiockpt._format.listing import ListedCheckpoint, list_checkpoints
    from aiockpt._format.loading import load
    from aiockpt._format.reading import verify
    from aiockpt._trainer.checkpoint_process import CheckpointProcess, CheckpointProcessConfig
    from aiockpt._trainer.checkpointer import Checkpointer
    from aiockpt._trainer.handles import (
        SaveHandle,
        SaveProgress,
        SaveResult,
        async_save,
        default_checkpointer,
    )
    from aiockpt._trainer.sync import SyncCheckpointer, SyncSaveHandle
    from aiockpt._wire.protocol import GcOptions, RankInfo

__version__ = "0.1.0"

__all__ = [
    "AiockptError",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointWriteError",
    "Checkpointer",
    "CoordinationError",
    "CoordinationTimeout",
    "CorruptCheckpoint",
    "ForeignCheckpoint",
    "GcOptions",
    "ListedCheckpoint",
    "ProtocolError",
    "ProtocolVersionMismatch",
    "RankFailed",
    "RankInfo",
    "RendezvousClosedError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousTimeoutError",
    "RootLocked",
    "SaveHandle",
    "SaveProgress",
    "SaveResult",
    "SignalException",
    "SyncCheckpointer",
    "SyncSaveHandle",
    "WorkerClosed",
    "WorkerCrashed",
    "WorkerError",
    "WorkerStartError",
    "WorkerStartTimeout",
    "__version__",
    "async_save",
    "default_checkpointer",
    "list_checkpoints",
    "load",
    "verify",
]

_HOME = {
    "CheckpointProcess": "aiockpt._trainer.checkpoint_process",
    "CheckpointProcessConfig": "aiockpt._trainer.checkpoint_process",
    "Checkpointer": "aiockpt._trainer.checkpointer",
    "GcOptions": "aiockpt._wire.protocol",
    "ListedCheckpoint": "aiockpt._format.listing",
    "RankInfo": "aiockpt._wire.protocol",
    "SaveHandle": "aiockpt._trainer.handles",
    "SaveProgress": "aiockpt._trainer.handles",
    "SaveResult": "aiockpt._trainer.handles",
    "SyncCheckpointer": "aiockpt._trainer.sync",
    "SyncSaveHandle": "aiockpt._trainer.sync",
    "async_save": "aiockpt._trainer.handles",
    "default_checkpointer": "aiockpt._trainer.handles",
    "list_checkpoints": "aiockpt._format.listing",
    "load": "aiockpt._format.loading",
    "verify": "aiockpt._format.reading",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'aiockpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
