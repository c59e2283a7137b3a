"""aiockpt: asyncio-native checkpointing and worker supervision for PyTorch.

Saving::

    handle = aiockpt.async_save(state_dict, "ckpt/step_100")   # returns at once
    await handle.staged        # tensors copied out: safe to keep training
    result = await handle      # committed and durable

Layout of the package, from the wire up::

    protocol      sans-IO frames and messages (no asyncio, no torch)
    session       sans-IO rules of the channel: handshake, request ids, routing, cancel gate
    channel       asyncio streams <-> messages
    worker/       the checkpoint worker process (python -m aiockpt.worker)
    process       CheckpointProcess: the parent's side of one worker
    staging       shared-memory arenas and the copy into them
    writers/      dcp and safetensors writers; custom writers by import reference
    commit        temporary directory, manifest, fsync, rename; retention helpers
    loading       verify and load checkpoints without unpickling
    saver         SaveHandle, SaveResult, async_save
    group         the checkpoint workers' own group: store, session, process group
    coordination  one multi-rank save's rounds over the store (blocking; worker side)
    manager       Checkpointer: root, latest, retention, backpressure
    root_lock     one writer per checkpoint root (an flock the kernel releases)
    sync          SyncCheckpointer for synchronous loops
    elastic/      the worker agent and aiockpt-run (torchrun's counterpart)

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
    from aiockpt.loading import load, verify
    from aiockpt.manager import Checkpointer
    from aiockpt.process import CheckpointProcess, CheckpointProcessConfig
    from aiockpt.protocol import GcOptions, RankInfo
    from aiockpt.saver import SaveHandle, SaveResult, async_save, default_checkpointer
    from aiockpt.sync import SyncCheckpointer, SyncSaveHandle

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
    "GcOptions",
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
    "load",
    "verify",
]

_HOME = {
    "CheckpointProcess": "aiockpt.process",
    "CheckpointProcessConfig": "aiockpt.process",
    "Checkpointer": "aiockpt.manager",
    "GcOptions": "aiockpt.protocol",
    "RankInfo": "aiockpt.protocol",
    "SaveHandle": "aiockpt.saver",
    "SaveResult": "aiockpt.saver",
    "SyncCheckpointer": "aiockpt.sync",
    "SyncSaveHandle": "aiockpt.sync",
    "async_save": "aiockpt.saver",
    "default_checkpointer": "aiockpt.saver",
    "load": "aiockpt.loading",
    "verify": "aiockpt.loading",
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
