"""The worker monitor: await exits, and on the first failure stop the rest, bounded.

torchelastic polls every ``monitor_interval`` (``time.sleep`` then ``poll()`` each process);
here the exits are tasks and the monitor is woken by the first one that completes, so it
notices a crash as soon as the loop learns of the child's exit.

Stopping is the escalation every supervisor needs: the graceful signal to every process group,
one deadline shared by all (so N stuck workers cost one timeout, not N), then SIGKILL. The
graceful step is what lets a checkpoint worker fail its save cleanly instead of being cut off.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from aiockpt.elastic.failures import ProcessFailure
from aiockpt.elastic.process import WorkerProcess

__all__ = ["GroupOutcome", "monitor", "stop_processes"]

logger = logging.getLogger(__name__)

#: the least time a SIGKILLed worker is given to be reaped: dying takes a moment even when the
#: grace period before SIGKILL is zero (``shutdown_timeout=0``: kill at once)
_REAP_AFTER_KILL_S = 5.0


@dataclass
class GroupOutcome:
    """How one attempt ended, by local rank: every return value, or the workers that failed
    on their own (the first exit or exits seen to fail, root cause first; never the siblings
    the agent then stopped)."""

    return_values: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, ProcessFailure] = field(default_factory=dict)


async def monitor(
    processes: list[WorkerProcess], error_files: dict[int, str], stop_timeout: float
) -> GroupOutcome:
    """Wait until every worker exited 0 (collect return values) or one failed.

    On a failure the others are stopped with :func:`stop_processes` (SIGTERM, ``stop_timeout``,
    SIGKILL). Only the exits seen up to the first failure are failures: a sibling that the
    stop ends (SIGTERM, SIGKILL, or a non-zero exit from its handler) died because the agent
    ended it, not on its own, and torchelastic does not report it either. Raises what reading
    an error file raises (``OSError``, ``ValueError`` for malformed JSON).
    """
    running = {process.exited: process for process in processes}
    failures: dict[int, ProcessFailure] = {}

    def record_exit(process: WorkerProcess) -> None:
        exitcode = process.exited.result()
        if exitcode != 0:
            failures[process.local_rank] = ProcessFailure(
                local_rank=process.local_rank,
                pid=process.pid,
                exitcode=exitcode,
                error_file=error_files.get(process.local_rank, ""),
            )

    while running and not failures:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        # exits seen in one wake-up have no known order; local rank order is stable
        for process in sorted((running.pop(task) for task in done), key=_by_local_rank):
            record_exit(process)
    if failures:
        first = next(iter(failures.values()))
        logger.error(
            "failed (exitcode: %s) local_rank: %s (pid: %s); stopping %s other worker(s)",
            first.exitcode,
            first.local_rank,
            first.pid,
            len(running),
        )
        await stop_processes(list(running.values()), signal.SIGTERM, stop_timeout)
        return GroupOutcome(failures=failures)
    return GroupOutcome(
        return_values={process.local_rank: await process.return_value() for process in processes}
    )


async def stop_processes(
    processes: list[WorkerProcess], sig: signal.Signals, deadline_s: float
) -> None:
    """Send ``sig`` to every worker's process group, wait at most ``deadline_s`` for all of
    them together, SIGKILL the groups still running and wait ``deadline_s`` again, or 5 s if
    that is longer (a process in uninterruptible sleep survives SIGKILL: it is logged and
    abandoned, not waited for).

    Every group gets a final SIGKILL too, so that no child a worker left behind survives the
    attempt. Never raises.
    """
    for process in processes:
        process.signal_group(sig)
    running = {process.exited: process for process in processes if not process.exited.done()}
    if running:
        _, late = await asyncio.wait(running, timeout=deadline_s)
        if late:
            for task in late:
                logger.warning(
                    "worker pid %s ignored %s for %.1fs; sending SIGKILL",
                    running[task].pid,
                    sig.name,
                    deadline_s,
                )
                running[task].signal_group(signal.SIGKILL)
            _, stuck = await asyncio.wait(late, timeout=max(deadline_s, _REAP_AFTER_KILL_S))
            for task in stuck:
                logger.error("worker pid %s survived SIGKILL; abandoning it", running[task].pid)
    for process in processes:
        process.signal_group(signal.SIGKILL)


def _by_local_rank(process: WorkerProcess) -> int:
    return process.local_rank
