"""Every error aiockpt raises on purpose, in one tree.

Foreign errors (OSError from a socket, msgspec.DecodeError from a frame, torch's store errors)
are translated into this tree at the boundary where they happen; callers catch
``AiockptError`` for anything of ours. Each error carries its context as attributes (as httpx's
carry their ``request``), named after the tree entry::

    AiockptError
    ├── ProtocolError                 a frame or message broke the channel's rules (.pid)
    │   └── ProtocolVersionMismatch   the two ends speak different protocol versions
    ├── WorkerError                   the checkpoint worker process did not do its job (.pid)
    │   ├── WorkerStartError          spawning or the init functions failed
    │   │   │                         (.error_type, .traceback: the worker's)
    │   │   └── WorkerStartTimeout    no handshake within subprocess_init_timeout_secs
    │   │                             (also a builtin TimeoutError)
    │   ├── WorkerCrashed             the worker exited while requests were pending, or before
    │   │                             a new request could be sent (.returncode: code or -signal)
    │   └── WorkerClosed              the CheckpointProcess was closed; no more requests
    │                                 (.path: the write that did not finish, if one)
    ├── CheckpointWriteError          the worker's writer raised (.path, .pid, .error_type,
    │                                 .traceback: the worker's)
    ├── CorruptCheckpoint             a checkpoint failed verification (.path: the file)
    ├── ForeignCheckpoint             torch's DCP wrote it (no aiockpt manifest; .path):
    │                                 loaded with torch's reader only given allow_pickle=True
    ├── RootLocked                    another process writes checkpoints under this root
    │                                 (.path, and the holder's .pid and .host)
    ├── CoordinationError             ranks disagree or fail to meet during a multi-rank save,
    │   │                             or their store failed (.rank: the rank at fault, if known)
    │   ├── CoordinationTimeout       a rank never arrived, or the store did not answer in
    │   │                             time (also a builtin TimeoutError)
    │   └── RankFailed                another rank's part of the save failed
    │                                 (.rank, .error_type, .traceback: that rank's)
    ├── RendezvousError               elastic agents could not meet over their store
    │   ├── RendezvousTimeoutError    fewer than the minimum nodes met within join_timeout
    │   └── RendezvousGracefulExitError  the rendezvous ended, not by this node's failure
    │       └── RendezvousClosedError    closed: the job is over (the agent exits 0)
    └── SignalException               the elastic agent got a termination signal and stopped
                                      its workers (``sigval`` names the signal)

Errors raised for bad arguments are the builtin ones users expect: ``TypeError`` for a value that
cannot cross the process boundary (naming it), ``FileExistsError`` for a checkpoint path that
exists when ``overwrite=False``, ``ValueError`` for nonsense options.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AiockptError",
    "CheckpointWriteError",
    "CoordinationError",
    "CoordinationTimeout",
    "CorruptCheckpoint",
    "ForeignCheckpoint",
    "ProtocolError",
    "ProtocolVersionMismatch",
    "RankFailed",
    "RendezvousClosedError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousTimeoutError",
    "RootLocked",
    "SignalException",
    "WorkerClosed",
    "WorkerCrashed",
    "WorkerError",
    "WorkerStartError",
    "WorkerStartTimeout",
]


def qualified_name(kind: type[BaseException]) -> str:
    """How an exception type is named across the process boundary: ``"OSError"`` for
    builtins, ``"package.module.Name"`` for everything else."""
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


class AiockptError(Exception):
    """Root of every error aiockpt raises on purpose."""


class ProtocolError(AiockptError):
    """A frame or message broke the channel's rules (size, encoding, unexpected type);
    ``pid`` is the process at the other end of the channel, where the raiser knows it (the
    sans-IO protocol does not: the process holding the channel fills it in)."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class ProtocolVersionMismatch(ProtocolError):
    """The parent and the worker speak different protocol versions."""


class WorkerError(AiockptError):
    """The checkpoint worker process did not do its job; ``pid`` is the worker's process id
    (None if it never started)."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class RemoteErrorMixin(Exception):
    """Carries what a worker reported about an exception raised on its side."""

    def __init__(
        self,
        message: str,
        *,
        error_type: str | None = None,
        traceback: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)  # the context attributes of the other base
        #: qualified name of the exception type raised in the worker, e.g. ``"OSError"``
        self.error_type = error_type
        #: the worker's full traceback text
        self.traceback = traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback:
            return f"{text}\n\nWorker traceback:\n{self.traceback.rstrip()}"
        return text


class WorkerStartError(RemoteErrorMixin, WorkerError):
    """Spawning the worker, or its init functions, failed; ``traceback`` holds the worker's."""


class WorkerStartTimeout(WorkerStartError, TimeoutError):
    """The worker did not finish its handshake within ``subprocess_init_timeout_secs``."""


class WorkerCrashed(WorkerError):
    """The worker ``pid`` exited unexpectedly; ``returncode`` is its exit code (negative:
    the signal that killed it)."""

    def __init__(
        self, message: str, *, returncode: int | None = None, pid: int | None = None
    ) -> None:
        super().__init__(message, pid=pid)
        self.returncode = returncode


class WorkerClosed(WorkerError):
    """The CheckpointProcess was closed; it accepts no more requests. ``path`` names the
    checkpoint whose write did not finish, when the error is a write's."""

    def __init__(self, message: str, *, pid: int | None = None, path: str | None = None) -> None:
        super().__init__(message, pid=pid)
        self.path = path


class CheckpointWriteError(RemoteErrorMixin, AiockptError):
    """The writer of worker ``pid`` raised writing the checkpoint at ``path``;
    ``error_type`` and ``traceback`` say what and where."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        pid: int | None = None,
        error_type: str | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message, error_type=error_type, traceback=traceback)
        self.path = path
        self.pid = pid


class CorruptCheckpoint(AiockptError):
    """A checkpoint failed verification; ``path`` names the offending file or directory."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class ForeignCheckpoint(AiockptError):
    """The checkpoint directory ``path`` has no aiockpt manifest but torch's ``.metadata``:
    ``torch.distributed.checkpoint.save`` wrote it. Nothing can verify it, and reading it
    means unpickling ``.metadata`` with torch's loader, so ``aiockpt.load`` raises this
    unless given ``allow_pickle=True``; ``verify`` and ``read_manifest`` always do."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class RootLocked(AiockptError):
    """Another process holds the writer lock of the checkpoint root ``path``: ``pid`` on
    ``host`` (None when it could not be read)."""

    def __init__(self, message: str, *, path: str, pid: int | None, host: str | None) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.host = host


class CoordinationError(AiockptError):
    """The ranks of a multi-rank save disagree or fail to meet; ``rank`` names the rank at
    fault when one is known."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class CoordinationTimeout(CoordinationError, TimeoutError):
    """``rank`` never arrived at a coordinated step within the configured timeout."""


class RankFailed(RemoteErrorMixin, CoordinationError):
    """Another rank's part of a multi-rank save failed, so nothing was committed; ``rank``,
    ``error_type`` and ``traceback`` say where and why."""

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        error_type: str | None = None,
        traceback: str | None = None,
    ) -> None:
        RemoteErrorMixin.__init__(self, message, error_type=error_type, traceback=traceback)
        self.rank = rank


class RendezvousError(AiockptError):
    """Elastic agents could not meet: the store was unreachable or a node never arrived."""


class RendezvousGracefulExitError(RendezvousError):
    """The rendezvous ended in a way that is not a failure of this node (torch's
    ``RendezvousGracefulExitError``): the agent exits 0."""


class RendezvousClosedError(RendezvousGracefulExitError):
    """The rendezvous is closed: the job is over, there is nothing left to join."""


class RendezvousTimeoutError(RendezvousError):
    """Not enough nodes met within ``join_timeout``."""


class SignalException(AiockptError):
    """The elastic agent received ``sigval`` (SIGTERM, SIGINT, ...) and stopped its workers."""

    def __init__(self, message: str, *, sigval: int) -> None:
        super().__init__(message)
        self.sigval = sigval
