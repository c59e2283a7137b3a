"""bench_save's sweep section: blocking and durable time of every method against size."""

from __future__ import annotations

import os
from collections.abc import Sequence

from benchmarks._common import (
    MiB,
    format_size,
    log,
    many_tensors,
    release_memory,
)
from benchmarks._save_methods import (
    FACTORIES,
    Aiockpt,
    Series,
    compare,
    fit_problem,
    save_directory,
)

# --- size sweep -----------------------------------------------------------------------------


async def bench_sweep(
    keys: Sequence[str], sizes: Sequence[int], count: int, parent: str, repeats: int
) -> dict[int, dict[str, Series]]:
    results: dict[int, dict[str, Series]] = {}
    for nbytes in sizes:
        with save_directory(parent) as directory:
            problem = fit_problem(nbytes, directory, kept=1)
            if problem:
                log(f"    [sweep] skipping {format_size(nbytes)}: {problem}")
                continue
            state_dict = many_tensors(count, nbytes)
            methods = [FACTORIES[key]() for key in keys]
            for method in methods:
                if isinstance(method, Aiockpt):
                    method.keep_last = 1
            try:
                label = f"sweep {format_size(nbytes)}"
                results[nbytes] = await compare(methods, state_dict, directory, repeats, label)
            finally:
                for method in methods:
                    await method.close()
            del state_dict, methods
            release_memory()
    return results


def print_sweep(results: dict[int, dict[str, Series]]) -> None:
    if not results:
        return
    keys = list(next(iter(results.values())))
    names = {key: s.method.name for key, s in next(iter(results.values())).items()}
    sizes = list(results)
    header = "".join(f"{format_size(size):>17s}" for size in sizes)
    log("\nSize sweep (/dev/shm, medians, blocking / durable seconds)")
    log(f"  {'method':30s}{header}")
    for key in keys:
        cells = []
        for size in sizes:
            s = results[size].get(key)
            if s is None:
                cells.append(f"{'':>17s}")
                continue
            durable = f"{s.durable:7.3f}" if s.durable is not None else f"{'-':>7s}"
            cells.append(f"{s.blocking:7.3f} / {durable}")
        log(f"  {names[key]:30s}" + "".join(f"{c:>17s}" for c in cells))


def plot_sweep(results: dict[int, dict[str, Series]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    keys = list(results[sizes[0]])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, attribute in zip(axes, ("blocking", "durable"), strict=True):
        for key in keys:
            xs, ys = [], []
            for size in sizes:
                s = results[size].get(key)
                value = getattr(s, attribute) if s is not None else None
                if value is not None:
                    xs.append(size / MiB)
                    ys.append(value)
            if not xs:
                continue
            name = results[sizes[0]][key].method.name.replace(" †", "")
            if key == "ckpt_process" and attribute == "blocking":
                name += " (returns unstaged)"
            style = "--" if key in ("memcpy", "raw") else "-"
            width = 3 if key.startswith("aiockpt") else 1.5
            # the same colour for a method in both panels (memcpy has no durable line)
            color = f"C{list(FACTORIES).index(key) % 10}"
            ax.plot(xs, ys, style, marker="o", linewidth=width, color=color, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([s / MiB for s in sizes])
        ax.set_xticklabels([format_size(s) for s in sizes])
        ax.set_xlabel("state dict size (64 fp32 tensors)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(
            f"{attribute}: "
            + ("caller may mutate" if attribute == "blocking" else "on disk, fsynced, committed")
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
