"""What a load of many small tensors cannot go below, against reading their files.

    python -m benchmarks.load_floor [--count 20000] [--bytes 80MiB] [--repeats 5] [--dir /dev/shm]

A load of N tensors does at least: decode its manifest, walk the target state dict (in
place) or make N tensor objects (allocating), and touch each tensor once from Python (a view
or a copy). A load in place into a target bound before (its second load and later) instead
checks the target in C (dynamo's TensorGuards and the tensors' addresses) and reads each
run of small tensors straight into them (``preadv`` into two buffers per tensor: its own
memory and the bytes before it), hashing each buffer. Each of those is timed here on its
own, interleaved with reading the files and with aiockpt's loads (medians), so that the
floor under the issue-14 targets (<= 1.3x a read in place, <= 1.15x a read into new memory)
is a measurement, not a guess.
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable, Sequence

import torch

from benchmarks._common import (
    SHM,
    bench_directory,
    format_size,
    interleave,
    log,
    many_tensors,
    median,
    parse_size,
    timed,
)
from benchmarks._load_methods import empty_like_tree, files_under, fresh_buffers, read_files


def read_and_hash(files: list[tuple[str, int]], buffers: list[memoryview]) -> None:
    """``read_files``, hashing (xxh3_64) each 8 MiB right after reading it, while it is in
    cache: what ``verify=True`` cannot go below hashed in series (on 1 CPU)."""
    import xxhash

    chunk = 8 << 20
    for (name, size), view in zip(files, buffers, strict=True):
        state = xxhash.xxh3_64()
        fd = os.open(name, os.O_RDONLY)
        try:
            for start in range(0, size, chunk):
                piece = view[start : min(size, start + chunk)]
                done = 0
                while done < piece.nbytes:
                    done += os.preadv(fd, [piece[done:]], start + done)
                state.update(piece)
        finally:
            os.close(fd)
        state.hexdigest()


def floor_methods(count: int, directory: str, nbytes: int) -> dict[str, Callable[[], float]]:
    import aiockpt
    from aiockpt._format import loading, reading
    from aiockpt._format.commit import write_checkpoint
    from aiockpt._format.manifest import MANIFEST_NAME, decode_manifest
    from aiockpt._format.tree import flatten
    from aiockpt._wire.tensors import is_tensor
    from aiockpt.writers import create_writer

    state_dict = many_tensors(count, nbytes)
    path = os.path.join(directory, "small")
    write_checkpoint(create_writer("dcp"), state_dict, path, format="dcp")
    files = files_under(path)
    existing = fresh_buffers(files)
    read_files(files, existing)
    target = empty_like_tree(state_dict)
    aiockpt.load(path, target)
    aiockpt.load(path, target)  # bound to the plan on its second load
    kept = loading._last_plans[0]
    bound = None if kept is None else kept[1][0].bound
    assert bound is not None, "the target was not bound"

    def scatter_read() -> None:
        """What a bound load reads: each run straight into the target's tensors."""
        assert bound is not None
        for name, runs in bound.runs.items():
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            try:
                for run in runs:
                    scatter = bound.scatters.get(run.number)
                    if scatter is not None:
                        reading._read_scatter(fd, scatter.batches, run.offset, name)
            finally:
                os.close(fd)

    def hash_pieces() -> None:
        """What a bound load hashes: each buffer a run was read into, in file order."""
        import xxhash

        assert bound is not None
        state = xxhash.xxh3_64()
        for scatter in bound.scatters.values():
            reading._hash_all(state, scatter.views, None)

    with open(os.path.join(path, MANIFEST_NAME), "rb") as file:
        manifest = file.read()
    tensors = list(target.values())
    numel = max(1, nbytes // 4 // count)
    flat = torch.empty(count * numel)
    sources = list(flat.split(numel))

    def paused(call: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            gc.disable()  # as the loader does
            try:
                return timed(call)
            finally:
                gc.enable()

        return run

    def cold_in_place() -> float:
        kept = reading.last_manifest[0], loading._last_plans[0]
        reading.last_manifest[0] = loading._last_plans[0] = None
        try:
            return timed(lambda: aiockpt.load(path, target))
        finally:  # the other loads of the round find the manifest and its plans kept
            reading.last_manifest[0], loading._last_plans[0] = kept

    return {
        "read (existing buffer)": lambda: timed(lambda: read_files(files, existing)),
        "read (new memory)": lambda: timed(lambda: read_files(files, fresh_buffers(files))),
        # A verified load reads and hashes every byte (on 2 CPUs or more, in a thread while
        # the next bytes are read: this, in series, is what that overlap saves at most).
        "read + xxh3 (existing buffer)": lambda: timed(lambda: read_and_hash(files, existing)),
        "decode the manifest": paused(lambda: decode_manifest(manifest)),
        "walk the target (flatten)": paused(lambda: flatten(target, is_tensor)),
        f"{count} torch.empty": paused(lambda: [torch.empty(numel) for _ in range(count)]),
        f"{count} views (as_strided)": paused(
            lambda: [flat.as_strided((numel,), (1,), i * numel) for i in range(count)]
        ),
        f"{count} copies (_foreach_copy_)": paused(lambda: torch._foreach_copy_(tensors, sources)),
        "read into the target's tensors": lambda: timed(scatter_read),
        "hash it, buffer by buffer": paused(hash_pieces),
        "check the target (guard, addresses)": paused(lambda: bound.targets_of(target)),
        "aiockpt verify in place": lambda: timed(lambda: aiockpt.load(path, target)),
        "aiockpt in place, cold": cold_in_place,
        "aiockpt verify alloc": lambda: timed(lambda: aiockpt.load(path)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_floor", description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument(
        "--bytes", type=parse_size, default=None, help="in all (default: 4 KiB per tensor)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=SHM)
    args = parser.parse_args(argv)
    nbytes = args.count * 4096 if args.bytes is None else args.bytes
    log(
        f"load_floor: {args.count} tensors, {format_size(nbytes)} in all, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    with bench_directory(args.dir, "bench-floor-") as directory:
        samples = interleave(floor_methods(args.count, directory, nbytes), args.repeats, "floor")
    figures = {key: median(values) for key, values in samples.items()}
    existing, new = figures["read (existing buffer)"], figures["read (new memory)"]
    for key, seconds in figures.items():
        log(
            f"  {key:34s} {seconds * 1e3:8.1f} ms  {seconds / existing:6.2f}x read existing  "
            f"{seconds / new:6.2f}x read new"
        )


if __name__ == "__main__":
    main()
