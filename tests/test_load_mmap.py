"""aiockpt.load(mmap=True): zero-copy views over private mappings, lazy, released by
reference counting, behind the same file rules as every load."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aiockpt import Checkpointer
from aiockpt._format.loading import load
from aiockpt._format.manifest import TensorLeaf
from aiockpt._format.reading import read_manifest, verify
from aiockpt.errors import CorruptCheckpoint
from tests.test_load import DATA_FILE, FORMATS, save, two_rank_checkpoint
from tests.test_writers import torch_dcp_load
from tests.writer_fixtures import assert_same, full_state_dict, like, random_tensor


def mappings_of(path: Path) -> list[dict[str, int]]:
    """This process's mappings of ``path``, each with its resident and private-dirty bytes
    (from /proc/self/smaps: what the kernel has actually faulted in)."""
    found: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                current = None
                if len(fields) == 6 and fields[5] == str(path):
                    current = {}
                    found.append(current)
            elif current is not None and fields[0] in ("Rss:", "Private_Dirty:"):
                current[fields[0].rstrip(":")] = int(fields[1]) * 1024
    return found


def read_chars() -> int:
    """Bytes this process has read through read-like system calls (``rchar``): a mapping
    that is touched reads through page faults, never through these."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def open_descriptors_of(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            continue  # closed meanwhile
    return found


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting may free things while this is on."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmap_gives_the_saved_tree_as_views_of_the_file(tmp_path: Path, fmt: str) -> None:
    state_dict = full_state_dict()
    path = save(tmp_path, state_dict, fmt)
    loaded = load(path, mmap=True)
    assert_same(loaded, state_dict)
    data = path / DATA_FILE[fmt]
    assert len(mappings_of(data)) == 1  # one mapping per file, whatever the tensor count
    storages = {
        t.untyped_storage().data_ptr()
        for t in (loaded["model"]["w_float32"], loaded["list_of_tensors"][0])
    }
    assert len(storages) == 1  # views of the one file, not copies


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmap_views_are_copy_on_write(tmp_path: Path, fmt: str) -> None:
    state_dict = {"w": random_tensor(torch.float32, (64, 64)), "b": random_tensor(torch.int8, (9,))}
    path = save(tmp_path, state_dict, fmt)
    loaded = load(path, mmap=True)
    loaded["w"].fill_(7.0)  # writes this process's copy of those pages
    assert torch.equal(loaded["w"], torch.full((64, 64), 7.0))
    (mapping,) = mappings_of(path / DATA_FILE[fmt])
    assert mapping["Private_Dirty"] >= 64 * 64 * 4 - 4096
    # The file is untouched: it verifies, and both loaders read what was saved.
    verify(path)
    assert_same(load(path), state_dict)
    if fmt == "dcp":
        target = like(state_dict)
        torch_dcp_load(target, str(path))
        assert_same(target, state_dict)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmap_reads_nothing_until_touched(tmp_path: Path, fmt: str) -> None:
    big = 48 << 20
    state_dict = {"big": torch.ones(big // 4), "small": torch.arange(16.0)}
    path = save(tmp_path, state_dict, fmt)
    data = path / DATA_FILE[fmt]
    before = read_chars()
    loaded = load(path, mmap=True)
    read = read_chars() - before
    (mapping,) = mappings_of(data)
    # Neither read (the manifest only) nor faulted in: the 48 MiB are still on disk.
    assert read < 1 << 20, read
    assert mapping["Rss"] < 1 << 20, mapping
    assert torch.equal(loaded["small"], torch.arange(16.0))
    assert mappings_of(data)[0]["Rss"] < 1 << 20
    # Touching the big tensor faults it in: the measurement above could see it.
    assert float(loaded["big"].sum()) == big // 4
    assert mappings_of(data)[0]["Rss"] >= big - (1 << 20)
    # A verified load reads every byte (and maps nothing).
    del loaded
    before = read_chars()
    load(path)
    assert read_chars() - before >= big
    assert mappings_of(data) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmap_holds_no_descriptor_and_unmaps_with_its_last_tensor(
    tmp_path: Path, fmt: str, no_gc: None
) -> None:
    path = save(tmp_path, {"a": torch.arange(1000.0), "b": torch.ones(3, 3)}, fmt)
    data = path / DATA_FILE[fmt]
    loaded = load(path, mmap=True)
    a = loaded["a"]
    del loaded
    assert len(mappings_of(data)) == 1
    assert open_descriptors_of(data) == []
    assert float(a[999]) == 999.0
    del a  # the last view: reference counting alone unmaps the file
    assert mappings_of(data) == []


def test_mmap_refuses_what_cannot_hold(tmp_path: Path) -> None:
    path = save(tmp_path, {"w": torch.ones(4)}, "dcp")
    with pytest.raises(ValueError, match="verify=True cannot hold with mmap=True"):
        load(path, mmap=True, verify=True)
    with pytest.raises(ValueError, match="assign=True"):
        load(path, {"w": torch.zeros(4)}, mmap=True)
    assert torch.equal(load(path, mmap=True, verify=False)["w"], torch.ones(4))


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmap_unpickles_only_with_permission(tmp_path: Path, fmt: str) -> None:
    state_dict = {"w": torch.ones(2), "obj": {1, 2, 3}, "frozen": frozenset({4})}
    path = save(tmp_path, state_dict, fmt)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load(path, mmap=True)
    assert_same(load(path, mmap=True, allow_pickle=True), state_dict)


def test_mmap_of_a_sharded_checkpoint_maps_a_ranks_pieces(tmp_path: Path) -> None:
    path, whole = two_rank_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"'cols' .* saved as pieces by 2 ranks"):
        load(path, mmap=True)
    own = load(path, mmap=True, rank=1)
    assert torch.equal(own["rows"], whole["rows"][49:]) and own["rank"] == 1
    assert torch.equal(own["cols"], whole["cols"][:, 5:])
    assert torch.equal(own["bias"], whole["bias"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmap_opens_files_by_the_same_rules(tmp_path: Path, fmt: str) -> None:
    state_dict = {"w": torch.arange(100.0)}
    path = save(tmp_path, state_dict, fmt)
    data = path / DATA_FILE[fmt]
    outside = tmp_path / "outside"
    os.rename(data, outside)
    os.symlink(outside, data)
    with pytest.raises(CorruptCheckpoint, match="symbolic link") as link:
        load(path, mmap=True)
    assert link.value.path == str(data)
    os.unlink(data)
    os.rename(outside, data)
    os.truncate(data, data.stat().st_size - 1)
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        load(path, mmap=True)


def test_a_tensor_between_elements_is_mapped_too(tmp_path: Path) -> None:
    """safetensors aligns its data to 8 bytes: a complex128 may start between two of its
    16-byte elements, and is mapped all the same."""
    for name in ("c", "cc", "ccc", "cccc", "ccccc", "cccccc", "ccccccc", "cccccccc"):
        state_dict = {name: random_tensor(torch.complex128, (3,), 1)}
        path = save(tmp_path, state_dict, "safetensors", name=name)
        (leaf,) = read_manifest(path).rank_state(0).leaves
        assert isinstance(leaf, TensorLeaf)
        if leaf.offset % 16:
            break
    else:
        pytest.fail("every header length put the tensor on a 16-byte boundary")
    loaded = load(path, mmap=True)
    assert_same(loaded, state_dict)
    assert len(mappings_of(path / DATA_FILE["safetensors"])) == 1
    loaded[name].zero_()  # copy-on-write like the others
    assert_same(load(path), state_dict)


# --- Checkpointer.load_latest ---------------------------------------------------------------

_loop_threads: set[int] = set()
_opened_on_loop: list[tuple[str, Any]] = []


def _note_file_access_on_the_loop(event: str, args: tuple[Any, ...]) -> None:
    watched = event in ("open", "os.scandir", "os.listdir")
    if watched and _loop_threads and threading.get_ident() in _loop_threads:
        _opened_on_loop.append((event, args[0] if args else None))


sys.addaudithook(_note_file_access_on_the_loop)  # audit hooks cannot be removed: idle after


@pytest.mark.parametrize("mmap", [False, True])
async def test_load_latest_never_touches_files_on_the_loop(tmp_path: Path, mmap: bool) -> None:
    """Every open and directory listing of ``load_latest`` (the audit events Python raises
    for them) happens on another thread than the event loop's."""
    state_dict = {"w": torch.arange(64.0), "step": 3}
    root = tmp_path / "root"
    root.mkdir()
    save(root, state_dict, "safetensors", name="step_1")
    save(root, {"w": torch.zeros(64), "step": 4}, "dcp", name="step_2")
    ckpt = Checkpointer(root)
    _loop_threads.add(threading.get_ident())
    try:
        loaded = await ckpt.load_latest(mmap=mmap)
    finally:
        _loop_threads.clear()
        await ckpt.close()
    assert _opened_on_loop == []
    assert loaded["step"] == 4 and torch.equal(loaded["w"], torch.zeros(64))
    assert bool(mappings_of(root / "step_2" / DATA_FILE["dcp"])) == mmap
    # The hook does see opens on the loop thread (so the check above can fail).
    _loop_threads.add(threading.get_ident())
    try:
        await asyncio.sleep(0)
        load(root / "step_2", mmap=mmap)
    finally:
        _loop_threads.clear()
    assert _opened_on_loop
    _opened_on_loop.clear()
