"""bench_save's summary: the issue's targets, met or missed, and what the figures say."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks._common import (
    median,
)
from benchmarks._save_cpu import CpuResult
from benchmarks._save_methods import (
    Breakdown,
    Series,
)
from benchmarks._save_rss import RssResult, rss_drift
from benchmarks._save_stall import StallResult

# --- summary --------------------------------------------------------------------------------


@dataclass
class Target:
    what: str
    goal: str
    measured: str = "not measured"
    met: bool | None = None

    def line(self) -> str:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[self.met]
        return f"  {self.what:58s} {self.goal:>11s}  {self.measured:44s} {verdict}"


def summarize(
    shm: dict[str, Series] | None,
    stall: StallResult | None,
    cpu: Sequence[CpuResult] | None,
    rss: RssResult | None,
) -> list[Target]:
    blocking = Target("blocking vs memcpy (steady, /dev/shm)", "<= 1.5x")
    durable = Target("durable vs raw write+fsync (steady, /dev/shm)", "<= 1.3x")
    process = Target("durable vs dcp.async_save process (steady)", ">= 5x faster")
    first = Target("first save from a started Checkpointer vs steady (dur)", "<= 1.5x")
    first_blocking = Target("  the same, blocking", "(<= 1.5x)")
    rss_target = Target("RSS flat over the saves (trainer, worker)", "within 5%")
    cpu_target = Target("CPU-bound trainer loop slowed while in flight", "<= 10%")
    stall_target = Target("longest event-loop stall, 1 GiB save (steady)", "<= 20 ms")
    stall_first = Target("  the same, first save from a started Checkpointer", "(<= 20 ms)")
    if shm is not None and "aiockpt" in shm:
        ours = shm["aiockpt"]
        if "memcpy" in shm:
            ratio = ours.blocking / shm["memcpy"].blocking
            blocking.measured = (
                f"{ours.blocking:.3f} s / {shm['memcpy'].blocking:.3f} s = {ratio:.2f}x"
            )
            blocking.met = ratio <= 1.5
        if "raw" in shm and ours.durable and shm["raw"].durable:
            ratio = ours.durable / shm["raw"].durable
            durable.measured = f"{ours.durable:.3f} s / {shm['raw'].durable:.3f} s = {ratio:.2f}x"
            durable.met = ratio <= 1.3
        if "dcp_process" in shm and ours.durable and shm["dcp_process"].durable:
            ratio = shm["dcp_process"].durable / ours.durable
            process.measured = (
                f"{shm['dcp_process'].durable:.3f} s / {ours.durable:.3f} s = {ratio:.1f}x"
            )
            process.met = ratio >= 5
        if ours.first is not None and ours.first.durable and ours.durable:
            ratio = ours.first.durable / ours.durable
            first.measured = f"{ours.first.durable:.3f} s / {ours.durable:.3f} s = {ratio:.2f}x"
            first.met = ratio <= 1.5
            ratio = ours.first.blocking / ours.blocking
            first_blocking.measured = (
                f"{ours.first.blocking:.3f} s / {ours.blocking:.3f} s = {ratio:.2f}x"
            )
            first_blocking.met = ratio <= 1.5
    if rss is not None and rss.trainer:
        trainer = rss_drift(rss.trainer, rss.saves)
        worker = rss_drift(rss.worker, rss.saves) if rss.worker else float("nan")
        rss_target.measured = (
            f"{trainer * 100:.2f}% / {worker * 100:.2f}% over {rss.saves[-1]} saves"
        )
        rss_target.met = trainer <= 0.05 and (not rss.worker or worker <= 0.05)
    if cpu:
        parts, met = [], True
        for r in cpu:
            ours_slow = r.slowdown("aiockpt")
            ours_own = r.own_core_slowdown("aiockpt")
            parts.append(
                f"{r.kind} {ours_slow * 100:+.0f}% [own core {ours_own * 100:+.0f}%]"
                f" (thread {r.slowdown('thread') * 100:+.0f}%"
                f" [{r.own_core_slowdown('thread') * 100:+.0f}%])"
            )
            met = met and ours_slow <= 0.10
        cpu_target.measured = ", ".join(parts)
        cpu_target.met = met
    if stall is not None:
        worst = median(stall.steady_max)
        stall_target.measured = (
            f"{worst * 1000:.1f} ms (worst {max(stall.steady_max) * 1000:.1f}; idle"
            f" {stall.idle_max * 1000:.1f})"
        )
        stall_target.met = worst <= 0.020
        stall_first.measured = f"{stall.first_max * 1000:.1f} ms"
        stall_first.met = stall.first_max <= 0.020
    return [
        blocking,
        durable,
        process,
        first,
        first_blocking,
        rss_target,
        cpu_target,
        stall_target,
        stall_first,
    ]


def explain(
    shm: dict[str, Series] | None, stall: StallResult | None, cpu: Sequence[CpuResult] | None
) -> list[str]:
    """What the measurements say about the misses (breakdowns, not guesses)."""
    notes = []
    if shm is not None and "aiockpt" in shm:
        ours = shm["aiockpt"]
        breakdown: Breakdown = ours.method.breakdown  # type: ignore[attr-defined]
        raw = shm.get("raw")
        if breakdown.total and raw is not None and raw.durable:
            staging, write = median(breakdown.staging), median(breakdown.write)
            notes.append(
                f"aiockpt durable = staging {staging:.3f} s, then the worker's write+commit"
                f" {write:.3f} s, in series; the write alone is {write / raw.durable:.2f}x raw"
            )
        process = shm.get("dcp_process")
        if process is not None and process.durable and raw is not None and raw.durable:
            notes.append(
                f"dcp.async_save process is {process.durable / raw.durable:.1f}x the raw"
                f" write limit here: '>= 5x faster' needs a durable save under"
                f" {process.durable / 5:.3f} s"
            )
        if ours.first is not None and ours.first.durable and ours.durable:
            notes.append(
                f"first save: +{ours.first.blocking - ours.blocking:.3f} s blocking,"
                f" +{ours.first.durable - ours.durable:.3f} s durable over steady (the arena is"
                f" created, populated and mapped by the worker during the first save)"
            )
    if stall is not None and stall.first_max > 0.020:
        notes.append(
            f"first-save stall {stall.first_max * 1000:.0f} ms: the longest single hold of"
            f" the loop thread (e.g. a C call that keeps the GIL) during arena creation"
        )
    if cpu:
        for r in cpu:
            notes.append(
                f"{r.kind} loop in flight with aiockpt: wall {r.slowdown('aiockpt') * 100:+.0f}%"
                f" of which run-queue wait (no free core; load average"
                f" {median([w.load for w in r.windows['aiockpt']]):.1f} on"
                f" {os.cpu_count()} CPUs) leaves {r.own_core_slowdown('aiockpt') * 100:+.0f}%"
                f" with a core of its own"
            )
    return notes
