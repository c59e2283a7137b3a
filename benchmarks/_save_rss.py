"""bench_save's rss section: RSS of the trainer and the worker over many saves."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field

from benchmarks._common import (
    MiB,
    format_size,
    log,
    median,
    memory_status,
)
from benchmarks._save_methods import (
    StateDict,
    worker_pid,
)

# --- RSS over many saves --------------------------------------------------------------------


@dataclass
class RssResult:
    saves: list[int] = field(default_factory=list)
    trainer: list[dict[str, int]] = field(default_factory=list)
    worker: list[dict[str, int]] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    worker_pid: int | None = None


async def bench_rss(state_dict: StateDict, directory: str, saves: int) -> RssResult:
    import aiockpt

    result = RssResult()
    checkpointer = aiockpt.Checkpointer(
        os.path.join(directory, "ckpt-rss"), keep_last=2, max_in_flight=1
    )
    await checkpointer.start()
    try:
        result.worker_pid = worker_pid(checkpointer)
        for step in range(1, saves + 1):
            started = time.perf_counter()
            handle = checkpointer.save(state_dict, step=step)
            await handle.staged
            await handle
            result.durable.append(time.perf_counter() - started)
            if step == 1 or step % 10 == 0:
                gc.collect()
                result.saves.append(step)
                result.trainer.append(memory_status(os.getpid()))
                if result.worker_pid is not None:
                    with contextlib.suppress(OSError):
                        result.worker.append(memory_status(result.worker_pid))
    finally:
        await checkpointer.close()
    return result


def rss_drift(samples: list[dict[str, int]], saves: list[int], key: str = "VmRSS") -> float:
    """Largest distance from the sample taken after 10 saves, as a fraction of it."""
    reference_index = saves.index(10) if 10 in saves else 0
    reference = samples[reference_index][key]
    later = [s[key] for s in samples[reference_index:]]
    return max(abs(v - reference) for v in later) / reference if reference else float("nan")


def print_rss(result: RssResult, nbytes: int) -> None:
    log(f"\nRSS over {result.saves[-1]} saves of {format_size(nbytes)} (aiockpt, keep_last=2)")
    log(
        f"  durable per save: median {median(result.durable):.3f} s,"
        f" first {result.durable[0]:.3f} s, last 10 {median(result.durable[-10:]):.3f} s"
    )
    for who, samples in (("trainer", result.trainer), ("worker", result.worker)):
        if not samples:
            log(f"  {who}: not sampled (worker pid not found)")
            continue
        rss = [s["VmRSS"] / MiB for s in samples]
        anon = [s.get("RssAnon", 0) / MiB for s in samples]
        shmem = [s.get("RssShmem", 0) / MiB for s in samples]
        log(
            f"  {who:7s} VmRSS MiB first {rss[0]:7.1f}  after 10 {rss[min(1, len(rss) - 1)]:7.1f}"
            f"  last {rss[-1]:7.1f}  max {max(rss):7.1f}  drift after 10:"
            f" {rss_drift(samples, result.saves) * 100:5.2f}%"
            f"   (anon {anon[-1]:.0f}, shmem {shmem[-1]:.0f} at the end)"
        )
        every = max(1, len(rss) // 10)
        trace = " ".join(f"{result.saves[i]}:{rss[i]:.0f}" for i in range(0, len(rss), every))
        log(f"          save:MiB {trace}")
