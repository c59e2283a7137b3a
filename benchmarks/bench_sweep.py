"""Save and load time against the number of tensors, at the same bytes.

    python -m benchmarks.bench_sweep [--full] [--sections save,load] [--counts 64,...,20000]
                                     [--size 32M] [--repeats 2] [--dir /dev/shm]
                                     [--out benchmarks/figures]

The same bytes of fp32 cut into 64 ... 20,000 tensors. For every count, every method runs once
per round, in an order rotated every round; the first round is a warm-up and the figures are
medians of the others.

    save   durable seconds (on disk, fsynced, committed) of aiockpt (Checkpointer, dcp
           layout), torch.save + fsync, dcp.save, dcp.async_save with the thread and the
           process executor, and the raw write + fsync of the same bytes (the limit); see
           benchmarks._save_methods
    load   seconds of aiockpt.load verified into existing tensors and allocating, with
           mmap=True, torch.load, torch.load(mmap=True), safetensors' load_file, and reading
           the files (into an existing buffer, into new memory: the limits); see
           benchmarks._load_methods

Each section prints a markdown table (seconds per method and count) and writes a PNG (seconds
against tensors, log scales, one line per method) to --out. The default is quick, sized for
a small shared machine (32 MiB, 2 repeats, 4 counts); --full runs 256 MiB, 3 repeats and 6
counts. A benchmark, not a test: it never fails on a threshold.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch

from benchmarks._common import (
    SHM,
    format_size,
    interleave,
    log,
    many_tensors,
    median,
    parse_size,
    plot_lines,
    quiet_torch_children,
    quiet_torch_warnings,
    release_memory,
)
from benchmarks._load_methods import LOAD_METHODS, load_methods
from benchmarks._save_methods import (
    FACTORIES,
    compare,
    save_directory,
    shut_down_process_executor,
)

SAVE_METHODS = ("aiockpt", "torch_save", "dcp_save", "dcp_thread", "dcp_process", "raw")
#: count -> method -> median seconds
Results = dict[int, dict[str, float]]


async def sweep_saves(counts: Sequence[int], nbytes: int, parent: str, repeats: int) -> Results:
    results: Results = {}
    descriptors = raise_descriptor_limit()
    for count in counts:
        state_dict = many_tensors(count, nbytes)
        keys = list(SAVE_METHODS)
        if 2 * count + 1024 > descriptors:
            # torch's process executor shares every tensor through a descriptor of its own
            # (and its child dups each): past the limit it dies with EMFILE.
            log(
                f"    [save {count}] dcp.async_save process skipped: it needs a descriptor "
                f"per tensor, twice, and RLIMIT_NOFILE is {descriptors}"
            )
            keys.remove("dcp_process")
        methods = [FACTORIES[key]() for key in keys]
        with save_directory(parent) as directory:
            try:
                series = await compare(methods, state_dict, directory, repeats, f"save {count}")
            finally:
                for method in methods:
                    await method.close()
        results[count] = {
            s.method.name: s.durable for s in series.values() if s.durable is not None
        }
        del state_dict, methods, series
        release_memory()
    return results


def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (as a user of dcp's process
    executor would have to); return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def sweep_loads(counts: Sequence[int], nbytes: int, parent: str, repeats: int) -> Results:
    results: Results = {}
    for count in counts:
        state_dict = many_tensors(count, nbytes)
        with save_directory(parent) as directory:
            runs = load_methods(state_dict, directory, LOAD_METHODS)
            samples = interleave(runs, repeats, f"load {count}")
            del runs
        results[count] = {key: median(values) for key, values in samples.items()}
        del state_dict
        release_memory()
    return results


def markdown_table(results: Results) -> str:
    counts = sorted(results)
    methods = list(dict.fromkeys(m for count in counts for m in results[count]))
    lines = [
        "| method | " + " | ".join(f"{c:,} tensors" for c in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    for method in methods:
        cells = [results[c].get(method) for c in counts]
        lines.append(
            f"| {method} | " + " | ".join("" if v is None else f"{v:.3f} s" for v in cells) + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--full", action="store_true", help="256 MiB, 3 repeats, 6 counts")
    parser.add_argument("--sections", default="save,load")
    parser.add_argument("--counts", help="comma-separated tensor counts")
    parser.add_argument("--size", help="bytes of every state dict (default 32M, full 256M)")
    parser.add_argument("--repeats", type=int, help="default 2, full 3")
    parser.add_argument("--dir", default=SHM, help="where checkpoints are written")
    parser.add_argument("--out", default="bench-out", help="where the PNGs go")
    args = parser.parse_args(argv)
    counts = [
        int(c)
        for c in (
            args.counts or ("64,256,1024,4096,8192,20000" if args.full else "64,512,4096,20000")
        ).split(",")
    ]
    nbytes = parse_size(args.size or ("256M" if args.full else "32M"))
    repeats = args.repeats or (3 if args.full else 2)
    sections = args.sections.split(",")
    quiet_torch_warnings()
    load_average = os.getloadavg()[0]
    log(
        f"bench_sweep: {format_size(nbytes)} in {counts} fp32 tensors, {repeats} repeats, "
        f"{args.dir}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
        f"{load_average:.1f}"
    )
    started = time.perf_counter()
    what = f"{format_size(nbytes)} of fp32, medians of {repeats}, {args.dir}"
    if "save" in sections:
        import uvloop

        try:
            saves = uvloop.run(sweep_saves(counts, nbytes, args.dir, repeats))
        finally:
            shut_down_process_executor()
        log(f"\nSave, durable seconds ({what}):\n\n{markdown_table(saves)}")
        path = os.path.join(args.out, "sweep_save.png")
        plot_lines(saves, path, f"save, durable ({what})", "tensors", "seconds (durable)")
        log(f"\nplot: {path}")
    if "load" in sections:
        loads = sweep_loads(counts, nbytes, args.dir, repeats)
        log(f"\nLoad, seconds ({what}):\n\n{markdown_table(loads)}")
        path = os.path.join(args.out, "sweep_load.png")
        plot_lines(loads, path, f"load ({what})", "tensors", "seconds")
        log(f"\nplot: {path}")
    log(
        f"\ntotal {time.perf_counter() - started:.0f} s; load average {load_average:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end (others share the CPUs: expect noise)"
    )


if __name__ == "__mp_main__":
    quiet_torch_children()

if __name__ == "__main__":
    main()
