"""Loads of real-shaped checkpoints against the speed of reading their files.

    python -m benchmarks.bench_load [--workloads gpt,small8k,small20k,big64] [--repeats 5]
                                    [--format dcp] [--dir /dev/shm]

Per workload (see ``benchmarks._common.WORKLOADS``) the state dict is saved once in each layout
the methods of ``benchmarks._load_methods`` read, then every method loads it once per round,
in an order rotated every round; round 0 is a warm-up and the figures are medians of the
others. The issue-14 targets are printed as ratios (a report, never a failure):

    aiockpt verify in place   <= 1.3x  read (existing buffer)
    aiockpt verify alloc      <= 1.15x read (new memory)
    aiockpt mmap              <= 2x    safetensors load_file, and <= 0.25x a verified load

and, beside them, the load in place with hashing in series (what the hashing thread saves).
``--baseline other/aiockpt/_format/loading.py`` adds that version's verified loads (and this
one's first load of a manifest) to the same rounds, and prints their ratios too: a before
and after measured together.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks._common import (
    SHM,
    WORKLOADS,
    bench_directory,
    format_size,
    interleave,
    log,
    median,
    nbytes_of,
    release_memory,
    tensors_of,
)
from benchmarks._load_methods import (
    BASELINE_METHODS,
    LOAD_METHODS,
    SERIES_METHODS,
    import_baseline,
    load_methods,
)

DIR_PREFIX = "bench-load-"  # never "aiockpt*": the test suite's leak checker owns those names
#: the methods the targets compare (torch.load is in the sweep, bench_sweep), and hashing in
#: series
METHODS = LOAD_METHODS[:6] + SERIES_METHODS
#: (what, measured, against, goal): measured / against <= goal
TARGETS = (
    ("verify in place / read existing", "aiockpt verify in place", "read (existing buffer)", 1.3),
    ("verify alloc / read new", "aiockpt verify alloc", "read (new memory)", 1.15),
    ("mmap / safetensors load_file", "aiockpt mmap", "safetensors load_file", 2.0),
    ("mmap / verify in place", "aiockpt mmap", "aiockpt verify in place", 0.25),
)


#: (what, measured, against), reported like TARGETS but without a goal
RATIOS = (
    (
        "in place, hashed in series / read",
        "aiockpt in place, hashed in series",
        "read (existing buffer)",
    ),
    # with --baseline
    ("baseline in place / read existing", "baseline verify in place", "read (existing buffer)"),
    ("baseline alloc / read new", "baseline verify alloc", "read (new memory)"),
    ("cold in place / read existing", "aiockpt in place, cold", "read (existing buffer)"),
)


def after_trim(run: Callable[[], float]) -> float:
    """``run()`` with the heap trimmed first. What a load allocates is fresh memory, page
    faults and all, only if nothing freed just before is still mapped: otherwise whichever
    method follows one that freed a GiB gets it back already faulted in (seen: the same
    allocating load took 0.25 s or 0.85 s depending on its place in the round)."""
    release_memory()
    return run()


def report(title: str, count: int, nbytes: int, figures: dict[str, float]) -> list[str]:
    """Print one workload's medians and targets; return its markdown row of ratios."""
    log(f"\n{title}: {count} tensors, {format_size(nbytes)}")
    for key, seconds in figures.items():
        per = seconds / count * 1e6
        log(f"  {key:26s} {seconds:8.4f} s  ({per:6.2f} us/tensor)")
    cells = []
    for what, measured, against, goal in TARGETS:
        ratio = figures[measured] / figures[against]
        verdict = "met" if ratio <= goal else "MISSED"
        log(f"  {what:34s} {ratio:6.3f}x  (target <= {goal}x) {verdict}")
        cells.append(f"{ratio:.2f}x{'' if ratio <= goal else ' ✗'}")
    for what, measured, against in RATIOS:
        if measured in figures:
            log(f"  {what:34s} {figures[measured] / figures[against]:6.3f}x")
    return cells


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_load", description=__doc__)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--format", default="dcp", choices=("dcp", "safetensors"))
    parser.add_argument("--dir", default=SHM, help="where the checkpoints are written")
    parser.add_argument("--baseline", help="another version's aiockpt/_format/loading.py")
    args = parser.parse_args(argv)
    baseline = None if args.baseline is None else import_baseline(args.baseline)
    methods = METHODS if baseline is None else METHODS + BASELINE_METHODS
    log(
        f"bench_load: torch {torch.__version__}, {os.cpu_count()} CPUs, aiockpt format "
        f"{args.format}, in {args.dir}, load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for name in args.workloads.split(","):
        title, build = WORKLOADS[name]
        state_dict = build()
        count, nbytes = len(tensors_of(state_dict)), nbytes_of(state_dict)
        started = time.perf_counter()
        with bench_directory(args.dir, DIR_PREFIX) as directory:
            runs = load_methods(state_dict, directory, methods, args.format, baseline)
            samples = interleave(
                {key: functools.partial(after_trim, run) for key, run in runs.items()},
                args.repeats,
                name,
            )
            del runs
        figures = {key: median(values) for key, values in samples.items()}
        log(f"  ({time.perf_counter() - started:.0f} s)")
        rows.append([f"{title} ({count} tensors)", *report(title, count, nbytes, figures)])
        del state_dict
        release_memory()
    log("\n| workload | " + " | ".join(t[0] for t in TARGETS) + " |")
    log("|---|" + "---|" * len(TARGETS))
    log("| targets | " + " | ".join(f"<= {t[3]}x" for t in TARGETS) + " |")
    for row in rows:
        log("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
