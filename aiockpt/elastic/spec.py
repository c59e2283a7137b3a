"""What the agent runs and what it reports: torchelastic's data types, without the IO.

``WorkerSpec`` is the blueprint (one role, ``local_world_size`` copies of one entrypoint);
``WorkerGroup`` is this node's instance of it after rendezvous (ranks assigned, state tracked);
``RunResult`` is what ``await agent.run()`` returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from aiockpt.elastic.failures import ProcessFailure

if TYPE_CHECKING:
    from aiockpt.elastic.dynamic import DynamicRendezvousHandler
    from aiockpt.elastic.rendezvous import StaticRendezvous

__all__ = ["DEFAULT_ROLE", "RunResult", "Worker", "WorkerGroup", "WorkerSpec", "WorkerState"]

DEFAULT_ROLE = "default"


@dataclass
class WorkerSpec:
    """Blueprint of the workers of one role on one node.

    ``entrypoint`` is a binary (a path, or a name looked up on ``PATH``) or an importable
    module-level function; ``args`` are its arguments, where the string ``"${local_rank}"``
    is replaced by each worker's local rank. ``rdzv_handler`` says how nodes meet (``None``:
    a single node on a free port; a ``DynamicRendezvousHandler``: nodes come and go).
    ``monitor_interval`` is kept for torchelastic compatibility and unused: the agent awaits
    worker exits instead of polling. Raises ``ValueError`` for a
    non-positive ``local_world_size``, a negative ``max_restarts`` or a missing entrypoint.
    """

    role: str
    local_world_size: int
    entrypoint: str | Callable[..., Any]
    args: tuple[Any, ...] = ()
    max_restarts: int = 3
    monitor_interval: float = 0.1
    rdzv_handler: StaticRendezvous | DynamicRendezvousHandler | None = None

    def __post_init__(self) -> None:
        if self.local_world_size <= 0:
            raise ValueError(f"local_world_size must be positive, got {self.local_world_size}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.entrypoint:
            raise ValueError("WorkerSpec needs an entrypoint (a binary or a function)")

    def get_entrypoint_name(self) -> str:
        """The binary's base name, or the function's qualified name."""
        if isinstance(self.entrypoint, str):
            return os.path.basename(self.entrypoint)
        return str(self.entrypoint.__qualname__)


class WorkerState(str, Enum):  # noqa: UP042 - str() as torchelastic's, and Python 3.10
    """State of a worker group; the workers of a group change state as one.

    INIT: created, not started. HEALTHY: running. UNHEALTHY: running but known bad.
    STOPPED: stopped by the agent, about to restart. SUCCEEDED: every worker exited 0.
    FAILED: a worker exited non-zero (or died by a signal) and no restart is left.
    UNKNOWN: the agent lost track of the workers; not recoverable.
    """

    UNKNOWN = "UNKNOWN"
    INIT = "INIT"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @staticmethod
    def is_running(state: WorkerState) -> bool:
        """Whether the worker processes of a group in ``state`` exist."""
        return state in {WorkerState.HEALTHY, WorkerState.UNHEALTHY}


@dataclass
class Worker:
    """One worker's place in the job: its ranks and the world sizes they count in.

    ``id`` is the worker's pid once started.
    """

    local_rank: int
    global_rank: int = -1
    role_rank: int = -1
    world_size: int = -1
    role_world_size: int = -1
    id: int | None = None


@dataclass
class WorkerGroup:
    """This node's workers for one ``WorkerSpec``, with what rendezvous assigned them."""

    spec: WorkerSpec
    workers: list[Worker] = field(init=False)
    group_rank: int | None = None
    group_world_size: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    state: WorkerState = WorkerState.INIT

    def __post_init__(self) -> None:
        self.workers = [Worker(local_rank=i) for i in range(self.spec.local_world_size)]


@dataclass
class RunResult:
    """Outcome of ``await agent.run()``: all-or-nothing over this node's workers.

    ``return_values`` (function entrypoints; ``None`` per rank for binaries) and ``failures``
    are keyed by global rank. ``failures`` holds the workers that failed on their own, in the
    order the agent saw them (root cause first); the siblings the agent stopped because of
    them are not failures and are not listed.
    """

    state: WorkerState
    return_values: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, ProcessFailure] = field(default_factory=dict)

    def is_failed(self) -> bool:
        """Whether the run ended FAILED."""
        return self.state == WorkerState.FAILED
