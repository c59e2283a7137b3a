"""Elastic worker agent: torchelastic's ``LocalElasticAgent`` on an event loop.

The worker monitor, the log tees and the exit barrier are asyncio tasks: the agent wakes when a
worker exits or writes, not on a polling interval, and uses no thread per worker or per log.

Modules, from the worker outwards::

    bootstrap   child side: parent-death signal, exec the binary or run the function
    failures    record() and error files, ProcessFailure, torchelastic's failure report
    logs        Std, LogsSpecs (redirects, tee, filters), the tee task
    process     WorkerProcess: start one worker, await its exit, signal its process group
    monitor     await the group's exits; on the first failure stop the rest (TERM, KILL)
    rendezvous  static rendezvous and rank assignment over TCPStore
    dynamic     dynamic (c10d) rendezvous: nodes join and leave between MIN and MAX
    barrier     the exit barrier
    janitor     kills the workers' process groups and removes the temporary log directory
                of an agent that died without doing so
    spec        WorkerSpec, WorkerState, Worker, WorkerGroup, RunResult
    agent       LocalElasticAgent: rendezvous, start, monitor, restart, barrier, signals
    cli         aiockpt-run / python -m aiockpt.run
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiockpt.elastic.agent import LocalElasticAgent
    from aiockpt.elastic.dynamic import DynamicRendezvousHandler, RendezvousSettings
    from aiockpt.elastic.failures import ProcessFailure, format_failures, record
    from aiockpt.elastic.logs import LogsSpecs, Std
    from aiockpt.elastic.rendezvous import StaticRendezvous
    from aiockpt.elastic.spec import RunResult, Worker, WorkerGroup, WorkerSpec, WorkerState
    from aiockpt.errors import (
        RendezvousClosedError,
        RendezvousError,
        RendezvousGracefulExitError,
        RendezvousTimeoutError,
        SignalException,
    )

__all__ = [
    "DynamicRendezvousHandler",
    "LocalElasticAgent",
    "LogsSpecs",
    "ProcessFailure",
    "RendezvousClosedError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousSettings",
    "RendezvousTimeoutError",
    "RunResult",
    "SignalException",
    "StaticRendezvous",
    "Std",
    "Worker",
    "WorkerGroup",
    "WorkerSpec",
    "WorkerState",
    "format_failures",
    "record",
]

# Imported on first use: every function worker starts as ``python -m aiockpt.elastic.bootstrap``
# and so imports this package; it needs ``record``, not asyncio and the agent (~60 ms).
_HOME = {
    "DynamicRendezvousHandler": "aiockpt.elastic.dynamic",
    "RendezvousClosedError": "aiockpt.errors",
    "RendezvousGracefulExitError": "aiockpt.errors",
    "RendezvousSettings": "aiockpt.elastic.dynamic",
    "RendezvousTimeoutError": "aiockpt.errors",
    "LocalElasticAgent": "aiockpt.elastic.agent",
    "LogsSpecs": "aiockpt.elastic.logs",
    "ProcessFailure": "aiockpt.elastic.failures",
    "RendezvousError": "aiockpt.errors",
    "RunResult": "aiockpt.elastic.spec",
    "SignalException": "aiockpt.errors",
    "StaticRendezvous": "aiockpt.elastic.rendezvous",
    "Std": "aiockpt.elastic.logs",
    "Worker": "aiockpt.elastic.spec",
    "WorkerGroup": "aiockpt.elastic.spec",
    "WorkerSpec": "aiockpt.elastic.spec",
    "WorkerState": "aiockpt.elastic.spec",
    "format_failures": "aiockpt.elastic.failures",
    "record": "aiockpt.elastic.failures",
}


def __getattr__(name: str) -> Any:
    try:
        home = _HOME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
