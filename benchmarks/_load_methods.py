"""The ways of loading a checkpoint that the load benchmarks compare, and their limits.

Each method is a function of no arguments that loads once and returns the seconds it took;
``load_methods`` builds them for one state dict, saved once in every layout they read:

    read (existing buffer)   every file of the aiockpt checkpoint into one preallocated buffer
                             (the limit of a load into existing tensors)
    read (new memory)        the same into freshly allocated memory (the limit of a load that
                             allocates: page faults included)
    aiockpt verify in place  aiockpt.load(path, target): into existing tensors, digests checked
    aiockpt verify alloc     aiockpt.load(path): new tensors, digests checked
    aiockpt mmap             aiockpt.load(path, mmap=True): views of the files, nothing read
    safetensors load_file    safetensors.torch.load_file of the same tensors (one file)
    torch.load               torch.load of a torch.save file of the same state dict
    torch.load mmap          the same with mmap=True

``SERIES_METHODS``:

    aiockpt in place, hashed in series
                             aiockpt.load(path, target) with every file hashed in the reading
                             thread (as on 1 CPU): what hashing in a thread while reading
                             saves; the same target as "aiockpt verify in place" (a load binds
                             its target: two targets would take the binding from each other)

and, to compare two versions of the loader in one run (``baseline``: another
``aiockpt/_format/loading.py``, imported on its own), ``BASELINE_METHODS``:

    baseline verify in place   the baseline's load(path, target)
    baseline verify alloc      the baseline's load(path)
    aiockpt in place, cold     aiockpt.load(path, target) with the manifest not read before
                               (the loader keeps the last one it read and its plans: a fair
                               first load; what was kept is put back after it)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._common import named_tensors, timed, torch_save

#: every method, in the order tables and plots list them
LOAD_METHODS = (
    "read (existing buffer)",
    "read (new memory)",
    "aiockpt verify in place",
    "aiockpt verify alloc",
    "aiockpt mmap",
    "safetensors load_file",
    "torch.load",
    "torch.load mmap",
)
#: what hashing in a thread saves (bench_load)
SERIES_METHODS = ("aiockpt in place, hashed in series",)
BASELINE_METHODS = (
    "baseline verify in place",
    "baseline verify alloc",
    "aiockpt in place, cold",
)


def import_baseline(path: str) -> Any:
    """The loader module at ``path`` (a ``loading.py`` of another version), imported under
    its own name next to this checkout's package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_baseline_loading", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def files_under(path: str) -> list[tuple[str, int]]:
    """Every regular file under ``path`` with its size (what a verified load reads)."""
    found = []
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            found.append((full, os.path.getsize(full)))
    return sorted(found)


def read_files(files: list[tuple[str, int]], buffers: list[memoryview]) -> None:
    for (name, size), view in zip(files, buffers, strict=True):
        fd = os.open(name, os.O_RDONLY)
        try:
            offset = 0
            while offset < size:
                offset += os.preadv(fd, [view[offset:]], offset)
        finally:
            os.close(fd)


def fresh_buffers(files: list[tuple[str, int]]) -> list[memoryview]:
    """Uninitialised new memory for each file (torch.empty, as a load's tensors would be)."""
    return [memoryview(torch.empty(size, dtype=torch.uint8).numpy()) for _, size in files]


def empty_like_tree(tree: Any) -> Any:
    """The same tree with every tensor replaced by an uninitialised one (a load target)."""
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree)
    if isinstance(tree, dict):
        return {key: empty_like_tree(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [empty_like_tree(value) for value in tree]
    if isinstance(tree, tuple):
        return tuple(empty_like_tree(value) for value in tree)
    return tree


def load_methods(
    state_dict: Any,
    directory: str,
    keys: tuple[str, ...] = LOAD_METHODS,
    fmt: str = "dcp",
    baseline: Any = None,
) -> dict[str, Callable[[], float]]:
    """``keys``' methods for ``state_dict``, saved under ``directory`` (aiockpt in ``fmt``);
    ``baseline`` is the module ``import_baseline`` returns, for ``BASELINE_METHODS``."""
    import aiockpt
    from aiockpt._format.commit import write_checkpoint
    from aiockpt.writers import create_writer

    path = os.path.join(directory, f"aiockpt-{fmt}")
    write_checkpoint(create_writer(fmt), state_dict, path, format=fmt)
    files = files_under(path)
    methods: dict[str, Callable[[], float]] = {}
    in_place_target: list[Any] = []  # made once, shared by the in-place methods

    def in_place() -> Any:
        if not in_place_target:
            in_place_target.append(empty_like_tree(state_dict))
            aiockpt.load(path, in_place_target[0])  # faulted in once
        return in_place_target[0]

    for key in keys:
        if key == "read (existing buffer)":
            existing = fresh_buffers(files)
            read_files(files, existing)  # faulted in once, like a model's tensors
            methods[key] = lambda b=existing: timed(lambda: read_files(files, b))
        elif key == "read (new memory)":
            methods[key] = lambda: timed(lambda: read_files(files, fresh_buffers(files)))
        elif key == "aiockpt verify in place":
            target = in_place()
            methods[key] = lambda t=target: timed(lambda: aiockpt.load(path, t))
        elif key == "aiockpt in place, hashed in series":
            from aiockpt._format import reading

            target = in_place()

            def in_series(t: Any = target) -> float:
                threshold = reading._THREADED_HASH_BYTES
                reading._THREADED_HASH_BYTES = 1 << 62
                try:
                    return timed(lambda: aiockpt.load(path, t))
                finally:
                    reading._THREADED_HASH_BYTES = threshold

            methods[key] = in_series
        elif key == "aiockpt verify alloc":
            methods[key] = lambda: timed(lambda: aiockpt.load(path))
        elif key == "aiockpt in place, cold":
            from aiockpt._format import loading, reading

            target = empty_like_tree(state_dict)
            aiockpt.load(path, target)

            def cold(t: Any = target) -> float:
                # The kept manifest (and its plans) put back afterwards: otherwise the next
                # load in the round, whichever method it is, pays for a first load too.
                kept = reading.last_manifest[0], loading._last_plans[0]
                reading.last_manifest[0] = loading._last_plans[0] = None
                try:
                    return timed(lambda: aiockpt.load(path, t))
                finally:
                    reading.last_manifest[0], loading._last_plans[0] = kept

            methods[key] = cold
        elif key == "baseline verify in place":
            target = empty_like_tree(state_dict)
            baseline.load(path, target)

            def baseline_in_place(t: Any = target) -> float:
                return timed(lambda: baseline.load(path, t))

            methods[key] = baseline_in_place
        elif key == "baseline verify alloc":
            methods[key] = lambda: timed(lambda: baseline.load(path))
        elif key == "aiockpt mmap":
            methods[key] = lambda: timed(lambda: aiockpt.load(path, mmap=True))
        elif key == "safetensors load_file":
            from safetensors.torch import load_file, save_file

            flat = os.path.join(directory, "flat.safetensors")
            save_file({name: t.contiguous() for name, t in named_tensors(state_dict)}, flat)
            methods[key] = lambda f=flat: timed(lambda: load_file(f))
        elif key in ("torch.load", "torch.load mmap"):
            pt = os.path.join(directory, "state.pt")
            if not os.path.exists(pt):
                torch_save(state_dict, pt)
            mmap = key.endswith("mmap")
            methods[key] = lambda p=pt, m=mmap: timed(
                lambda: torch.load(p, mmap=m, weights_only=True)
            )
        else:
            raise ValueError(
                f"unknown load method {key!r}; choose from "
                f"{LOAD_METHODS + SERIES_METHODS + BASELINE_METHODS}"
            )
    return methods
