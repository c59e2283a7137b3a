"""Save latency of aiockpt against torch's checkpointing paths and the memcpy/write limits.

    python -m benchmarks.bench_save [--quick] [--sections anchors,stall,cpu,rss,sweep] ...

One command, one run. Every comparison interleaves its repeats (round-robin over the methods,
the order rotated each round) so that noise on a shared machine hits every method alike, and
reports medians and ratios. The first round is kept apart as the *first call* (worker spawn,
arena creation, first page faults) and the medians are over the later, steady rounds.

Methods (``--methods``; a state dict of ``--size`` bytes of fp32 in ``--tensors`` tensors):

    memcpy        copy_ into preallocated tensors of the same layout (the staging limit)
    raw           os.write of the same bytes into one file + fsync (the write limit)
    torch_save    torch.save to a file + fsync
    dcp_save      torch.distributed.checkpoint.save(no_dist=True), FileSystemWriter (fsyncs)
    dcp_thread    dcp.async_save, thread executor
    dcp_process   dcp.async_save, process executor (needs a process group: this run inits a
                  1-rank gloo group in-process)
    ckpt_process  torch's experimental CheckpointProcess + its CheckpointWriter, with a commit
                  hook that fsyncs the file (the writer alone only calls torch.save)
    aiockpt       aiockpt.Checkpointer(format="dcp"), started ahead of time
    aiockpt_st    the same with format="safetensors" (not in the default set)

*blocking* is the time until the caller may change its tensors again (aiockpt: ``await
handle.staged``; dcp.async_save: the call returning; synchronous saves: everything);
*durable* is the time until the checkpoint is on disk, fsynced and committed (aiockpt: ``await
handle``; dcp.async_save: ``.result()``; CheckpointProcess: ``write(...).result()``).

Sections (``--sections``):

    anchors  all methods at --size, to /dev/shm and to a directory on disk (--dirs)
    stall    longest event-loop stall while aiockpt saves --size (a 1 ms heartbeat task)
    cpu      slowdown of a CPU-bound loop in the trainer while a save is in flight
             (aiockpt vs dcp.async_save's thread executor)
    rss      RSS of the trainer and of the aiockpt worker over --rss-saves saves
    sweep    blocking and durable of every method against size, plotted into --png

A benchmark, not a test: it prints figures and the issue's targets with met/missed, and never
fails on a threshold. Everything it writes is under ``bench-save-*`` directories it removes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

from benchmarks._common import (
    SHM,
    GiB,
    format_size,
    log,
    many_tensors,
    mem_available,
    parse_size,
    quiet_torch_children,
    quiet_torch_warnings,
    release_memory,
)
from benchmarks._save_cpu import bench_cpu, print_cpu
from benchmarks._save_methods import (
    DEFAULT_METHODS,
    FACTORIES,
    Series,
    StateDict,
    aiockpt_available,
    compare,
    fit_problem,
    print_comparison,
    save_directory,
    shut_down_process_executor,
    state_dict_bytes,
)
from benchmarks._save_rss import bench_rss, print_rss
from benchmarks._save_sizes import bench_sweep, plot_sweep, print_sweep
from benchmarks._save_stall import bench_stall, print_stall
from benchmarks._save_summary import explain, summarize

# --- main -----------------------------------------------------------------------------------

SECTIONS = ("anchors", "stall", "cpu", "rss", "sweep")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, sweep up to 1 GiB")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated")
    parser.add_argument("--size", default="1G", help="state dict of anchors/stall/cpu")
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, help="anchors on /dev/shm (default 5, quick 3)")
    parser.add_argument("--disk-repeats", type=int, help="anchors on disk (default 3, quick 2)")
    parser.add_argument(
        "--dirs", action="append", help=f"anchor parents (default {SHM} and the temp dir)"
    )
    parser.add_argument("--sweep-sizes", default="256M,512M,1G,2G,4G")
    parser.add_argument("--max-size", help="cap the sweep (quick: 1G)")
    parser.add_argument("--sweep-repeats", type=int, help="default 3, quick 2")
    parser.add_argument("--stall-saves", type=int, help="steady saves (default 5, quick 3)")
    parser.add_argument("--cpu-rounds", type=int, help="default 5, quick 3")
    parser.add_argument("--cpu-work", default="python,matmul", help="python and/or matmul")
    parser.add_argument(
        "--cpu-nice",
        type=int,
        default=10,
        help="also measure aiockpt with its worker threads at this niceness (0: skip)",
    )
    parser.add_argument("--rss-saves", type=int, help="default 200, quick 50")
    parser.add_argument("--rss-size", default="256M")
    parser.add_argument("--png", default="bench-out/bench_save.png")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sections = [s for s in args.sections.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    for name in args.sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in args.methods:
        if name not in FACTORIES:
            parser.error(f"unknown method {name!r}; choose from {', '.join(FACTORIES)}")
    args.size = parse_size(args.size)
    args.rss_size = parse_size(args.rss_size)
    args.repeats = args.repeats or (3 if quick else 5)
    args.disk_repeats = args.disk_repeats or (2 if quick else 3)
    args.sweep_repeats = args.sweep_repeats or (2 if quick else 3)
    args.stall_saves = args.stall_saves or (3 if quick else 5)
    args.cpu_rounds = args.cpu_rounds or (3 if quick else 5)
    args.rss_saves = args.rss_saves or (50 if quick else 200)
    args.cpu_work = [k for k in args.cpu_work.split(",") if k]
    cap = parse_size(args.max_size) if args.max_size else (GiB if quick else None)
    args.sweep_sizes = [
        s for s in map(parse_size, args.sweep_sizes.split(",")) if cap is None or s <= cap
    ]
    args.dirs = args.dirs or [SHM, tempfile.gettempdir()]
    return args


async def amain(args: argparse.Namespace) -> None:
    import uvloop  # noqa: F401 - imported to report the loop in use

    unavailable = aiockpt_available()
    methods = list(args.methods)
    if unavailable:
        log(f"NOTE: aiockpt is not measured: {unavailable}")
        methods = [m for m in methods if not m.startswith("aiockpt")]
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    log(
        f"bench_save: torch {torch.__version__}, {os.cpu_count()} CPUs, loop {loop_name},"
        f" torch threads {torch.get_num_threads()}, sections {','.join(args.sections)}"
    )
    log(
        f"  /dev/shm free {format_size(shutil.disk_usage(SHM).free)},"
        f" memory available {format_size(mem_available())},"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    run_started = time.perf_counter()
    shm_series: dict[str, Series] | None = None
    stall = cpu = rss = None
    state_dict: StateDict | None = None

    def main_state_dict() -> StateDict:
        nonlocal state_dict
        if state_dict is None:
            state_dict = many_tensors(args.tensors, args.size)
        return state_dict

    needs_aiockpt = {"stall", "cpu", "rss"} & set(args.sections)
    if needs_aiockpt and unavailable:
        log(f"\nskipping {', '.join(sorted(needs_aiockpt))}: {unavailable}")
    elif "rss" in args.sections:
        # first, so that the trainer's figures are those of a trainer that only saves
        log("\n== rss ==")
        with save_directory(SHM) as directory:
            rss_sd = many_tensors(args.tensors, args.rss_size)
            rss = await bench_rss(rss_sd, directory, args.rss_saves)
            del rss_sd
        print_rss(rss, args.rss_size)
        release_memory()

    if "anchors" in args.sections:
        for parent in args.dirs:
            on_shm = os.stat(parent).st_dev == os.stat(SHM).st_dev
            repeats = args.repeats if on_shm else args.disk_repeats
            with save_directory(parent) as directory:
                problem = fit_problem(args.size, directory, kept=2)
                if problem:
                    log(f"\nskipping anchors in {parent}: {problem}")
                    continue
                sd = main_state_dict()
                log(f"\n== anchors: {parent} ({directory}) ==")
                started = time.perf_counter()
                instances = [FACTORIES[key]() for key in methods]
                try:
                    series = await compare(instances, sd, directory, repeats, parent)
                finally:
                    for method in instances:
                        await method.close()
                title = (
                    f"{parent}: {format_size(state_dict_bytes(sd))} in {args.tensors} fp32"
                    f" tensors, {repeats} interleaved repeats after a first-call round"
                    f" ({time.perf_counter() - started:.0f} s)"
                )
                print_comparison(title, series)
                if on_shm and shm_series is None:
                    shm_series = series
            release_memory()

    if not unavailable:
        if "stall" in args.sections:
            log("\n== stall ==")
            with save_directory(SHM) as directory:
                stall = await bench_stall(main_state_dict(), directory, args.stall_saves)
            print_stall(stall, args.size)
            release_memory()
        if "cpu" in args.sections:
            log("\n== cpu ==")
            with save_directory(SHM) as directory:
                cpu = await bench_cpu(
                    main_state_dict(), directory, args.cpu_rounds, args.cpu_work, args.cpu_nice
                )
            print_cpu(cpu, args.size, args.cpu_nice)
            release_memory()
    if "sweep" in args.sections:
        state_dict = None
        release_memory()
        log(f"\n== sweep: {', '.join(map(format_size, args.sweep_sizes))} in {SHM} ==")
        sweep = await bench_sweep(methods, args.sweep_sizes, args.tensors, SHM, args.sweep_repeats)
        print_sweep(sweep)
        if sweep:
            plot_sweep(
                sweep,
                args.png,
                f"save latency vs size, /dev/shm, {args.tensors} fp32 tensors,"
                f" medians of {args.sweep_repeats} interleaved repeats (torch {torch.__version__})",
            )
            log(f"\nplot: {os.path.join(os.getcwd(), args.png)}")

    shut_down_process_executor()
    log("\n== summary: issue-3 targets (steady state, /dev/shm; a report, not assertions) ==")
    for target in summarize(shm_series, stall, cpu, rss):
        log(target.line())
    for note in explain(shm_series, stall, cpu):
        log(f"  * {note}")
    log(f"\ntotal {time.perf_counter() - run_started:.0f} s")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_torch_warnings()
    import uvloop

    try:
        uvloop.run(amain(args))
    finally:
        shut_down_process_executor()
    sys.stdout.flush()


if __name__ == "__mp_main__":
    quiet_torch_children()

if __name__ == "__main__":
    main()
