"""aiockpt: asyncio-native checkpointing and worker supervision for PyTorch."""

from __future__ import annotations

from aiockpt.errors import (
    AiockptError,
    CheckpointWriteError,
    CoordinationError,
    CoordinationTimeout,
    CorruptCheckpoint,
    ProtocolError,
    ProtocolVersionMismatch,
    WorkerClosed,
    WorkerCrashed,
    WorkerError,
    WorkerStartError,
    WorkerStartTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "AiockptError",
    "CheckpointWriteError",
    "CoordinationError",
    "CoordinationTimeout",
    "CorruptCheckpoint",
    "ProtocolError",
    "ProtocolVersionMismatch",
    "WorkerClosed",
    "WorkerCrashed",
    "WorkerError",
    "WorkerStartError",
    "WorkerStartTimeout",
    "__version__",
]
