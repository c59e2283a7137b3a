"""bench_save's stall section: the longest event-loop stall while a save is in flight."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

from benchmarks._common import (
    format_size,
    log,
    median,
    percentile,
    remove,
)
from benchmarks._save_methods import (
    StateDict,
)

# --- heartbeat ------------------------------------------------------------------------------


class Heartbeat:
    """A task that sleeps 1 ms in a loop and records how long each sleep really took: the
    longest gap is the longest the event loop was kept from running its tasks."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.gaps: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._since = time.perf_counter()

    async def _beat(self) -> None:
        while True:
            self._since = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.gaps.append(time.perf_counter() - self._since)

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.get_running_loop().create_task(self._beat())
        await asyncio.sleep(0)  # let it take its first timestamp
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        # a gap still open when the measured code finished counts too (a save that held the
        # loop from start to end would otherwise leave no gap at all)
        self.gaps.append(time.perf_counter() - self._since)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def max(self) -> float:
        return max(self.gaps, default=float("nan"))

    @property
    def p99(self) -> float:
        return percentile(self.gaps, 0.99)


@dataclass
class StallResult:
    idle_max: float
    first_max: float
    first_p99: float
    steady_max: list[float]
    steady_p99: list[float]
    module_first_max: float | None = None
    module_steady_max: float | None = None
    torch_thread_max: float | None = None


async def bench_stall(state_dict: StateDict, directory: str, saves: int) -> StallResult:
    import torch.distributed.checkpoint as dcp

    import aiockpt

    async with Heartbeat() as idle:
        await asyncio.sleep(1.0)
    steady_max, steady_p99 = [], []
    # default settings (keep_last only so that /dev/shm does not fill up)
    checkpointer = aiockpt.Checkpointer(os.path.join(directory, "ckpt-stall"), keep_last=1)
    await checkpointer.start()
    try:
        for step in range(saves + 1):
            async with Heartbeat() as beat:
                handle = checkpointer.save(state_dict, step=step)
                await handle.staged
                await handle
            if step == 0:
                first_max, first_p99 = beat.max, beat.p99
            else:
                steady_max.append(beat.max)
                steady_p99.append(beat.p99)
    finally:
        await checkpointer.close()
    result = StallResult(idle.max, first_max, first_p99, steady_max, steady_p99)

    async_save = getattr(aiockpt, "async_save", None)
    if async_save is not None:
        # the module-level default checkpointer: its first call also starts the worker
        gaps = []
        for index in range(3):
            target = os.path.join(directory, f"module-{index}")
            async with Heartbeat() as beat:
                await async_save(state_dict, target, format="dcp")
            gaps.append(beat.max)
            remove(target)
        result.module_first_max = gaps[0]
        result.module_steady_max = median(gaps[1:])
        # stop its worker and free its arena now rather than at loop shutdown
        with contextlib.suppress(ImportError):
            from aiockpt._trainer.handles import default_checkpointer

            await default_checkpointer().close()

    # torch's thread executor called from a coroutine: staging runs on the loop's thread
    target = os.path.join(directory, "torch-thread")
    async with Heartbeat() as beat:
        future = dcp.async_save(state_dict, checkpoint_id=target, no_dist=True)
        await asyncio.wrap_future(future)
    remove(target)
    result.torch_thread_max = beat.max
    return result


def print_stall(result: StallResult, nbytes: int) -> None:
    ms = 1000.0
    log(f"\nEvent-loop stall while saving {format_size(nbytes)} (a heartbeat task; gap = the time")
    log("  one asyncio.sleep(0.001) really took, so an idle loop shows ~1-2 ms)")
    log(f"  idle loop (no save)                     max gap {result.idle_max * ms:7.1f} ms")
    log(
        f"  aiockpt first save (started Checkpointer) max gap {result.first_max * ms:7.1f} ms,"
        f" p99 {result.first_p99 * ms:5.1f} ms"
    )
    log(
        f"  aiockpt steady saves (median of {len(result.steady_max)})   max gap"
        f" {median(result.steady_max) * ms:7.1f} ms (worst {max(result.steady_max) * ms:.1f}),"
        f" p99 {median(result.steady_p99) * ms:5.1f} ms"
    )
    if result.module_first_max is not None:
        log(
            f"  aiockpt.async_save (module-level)       max gap first call (starts the worker)"
            f" {result.module_first_max * ms:.1f} ms, steady {result.module_steady_max * ms:.1f} ms"  # type: ignore[operator]
        )
    if result.torch_thread_max is not None:
        log(
            f"  dcp.async_save thread, called on the loop max gap"
            f" {result.torch_thread_max * ms:7.1f} ms (its staging runs on the caller's thread)"
        )
