"""Loads of many small tensors and of large files: batched reads, views of one buffer,
hashing in a thread while reading, the garbage collector paused, the manifest read once."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aiockpt._format import loading, reading
from aiockpt._format.loading import load
from aiockpt._format.manifest import MANIFEST_NAME, TensorLeaf, decode_manifest
from aiockpt._format.reading import verify
from aiockpt.errors import CorruptCheckpoint
from tests.test_load import DATA_FILE, FORMATS, flip_byte, save
from tests.writer_fixtures import DTYPES, assert_same, like, random_tensor


def many_small(count: int) -> dict[str, torch.Tensor]:
    """``count`` small tensors of every dtype in turn, of several shapes, 0-d ones too (a
    complex128 lands between two of its 16-byte elements in safetensors' 8-byte layout)."""
    dtypes = [*DTYPES, torch.complex128]
    shapes: list[tuple[int, ...]] = [(), (3,), (2, 5), (4, 1, 3), (17,)]
    return {
        f"t{i}": random_tensor(dtypes[i % len(dtypes)], shapes[i % len(shapes)], seed=i)
        for i in range(count)
    }


@pytest.fixture
def threaded_hashing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every file hashed in a thread and large tensors read in 4 KiB chunks, so that small
    test files take the path large ones take; no thread is left behind."""
    monkeypatch.setattr(reading, "_THREADED_HASH_BYTES", 0)
    monkeypatch.setattr(reading, "_CHUNK_BYTES", 4096)
    before = set(threading.enumerate())
    yield
    assert not set(threading.enumerate()) - before, "a thread left running"


@pytest.mark.parametrize("fmt", FORMATS)
def test_20000_small_tensors_load_bit_exact_in_place_and_allocated(
    tmp_path: Path, fmt: str
) -> None:
    state_dict = many_small(20_000)
    path = save(tmp_path, state_dict, fmt)
    target = like(state_dict)
    identities = {key: id(tensor) for key, tensor in target.items()}
    assert load(path, target) is target
    assert_same(target, state_dict)
    assert {key: id(tensor) for key, tensor in target.items()} == identities
    loaded = load(path)
    assert_same(loaded, state_dict)
    # Small tensors come back as views of shared buffers: each is its own bytes all the same.
    storages = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(storages) < len(loaded) // 5  # (a misaligned complex128 is copied out)
    for key in ("t100", "t101", "t102"):
        loaded[key].reshape(-1).view(torch.uint8).fill_(0xAB)
    assert_same(loaded["t99"], state_dict["t99"])
    assert_same(loaded["t103"], state_dict["t103"])
    kept = loaded["t7"]
    del loaded
    gc.collect()
    assert_same(kept, state_dict["t7"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threaded", [False, True])
def test_a_flipped_byte_in_one_small_tensor_of_thousands_names_the_file(
    tmp_path: Path, fmt: str, threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if threaded:
        monkeypatch.setattr(reading, "_THREADED_HASH_BYTES", 0)
    before = set(threading.enumerate())
    state_dict = many_small(2_000)
    path = save(tmp_path, state_dict, fmt)
    data = path / DATA_FILE[fmt]
    leaf = decode_manifest((path / MANIFEST_NAME).read_bytes()).leaves[1_234]
    assert isinstance(leaf, TensorLeaf) and leaf.shape  # not a 0-d one
    flip_byte(data, leaf.offset)
    calls = (verify, load, lambda p: load(p, like(state_dict)))
    for call in calls:
        with pytest.raises(CorruptCheckpoint, match=DATA_FILE[fmt]) as info:
            call(path)
        assert info.value.path == str(data)
    # Unverified, the flipped byte is what comes back, and only in that tensor.
    loaded = load(path, verify=False)
    assert not torch.equal(
        loaded["t1234"].reshape(-1).view(torch.uint8),
        state_dict["t1234"].reshape(-1).view(torch.uint8),
    )
    del loaded["t1234"], state_dict["t1234"]
    assert_same(loaded, state_dict)
    assert not set(threading.enumerate()) - before, "a thread left running"


@pytest.mark.parametrize("fmt", FORMATS)
def test_large_tensors_are_read_in_chunks_hashed_in_a_thread(
    tmp_path: Path, fmt: str, threaded_hashing: None
) -> None:
    state_dict = {
        "big": random_tensor(torch.float32, (300, 101), seed=1),  # ~30 chunks of 4 KiB
        "small": random_tensor(torch.bfloat16, (5,), seed=2),
        "odd": random_tensor(torch.int8, (4097,), seed=3),
    }
    path = save(tmp_path, state_dict, fmt)
    assert_same(load(path), state_dict)
    target = like(state_dict)
    load(path, target)
    assert_same(target, state_dict)
    data = path / DATA_FILE[fmt]
    leaf = next(
        leaf
        for leaf in decode_manifest((path / MANIFEST_NAME).read_bytes()).leaves
        if isinstance(leaf, TensorLeaf) and leaf.shape == [300, 101]
    )
    flip_byte(data, leaf.offset + 5 * 4096 + 7)  # inside its sixth chunk
    for call in (verify, load, lambda p: load(p, like(state_dict))):
        with pytest.raises(CorruptCheckpoint, match=DATA_FILE[fmt]) as info:
            call(path)
        assert info.value.path == str(data)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_load_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path, enabled: bool) -> None:
    """No collection runs while a load works (its thousands of leaves would set off several;
    the one they are owed may run as it returns), and the collector is as it was
    afterwards, after a failed load too."""
    path = save(tmp_path, many_small(2_000), "dcp")
    loading_now = [False]
    collected: list[str] = []

    def during_load(phase: str, info: dict[str, Any]) -> None:
        if loading_now[0]:
            collected.append(phase)

    def load_watched(**kwargs: Any) -> None:
        loading_now[0] = True
        try:
            load(path, **kwargs)
        finally:
            loading_now[0] = False

    was_enabled = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    gc.callbacks.append(during_load)
    try:
        load_watched(verify=False)
        assert gc.isenabled() is enabled
        flip_byte(path / DATA_FILE["dcp"], 200)
        with pytest.raises(CorruptCheckpoint):
            load_watched()
        assert gc.isenabled() is enabled
    finally:
        gc.callbacks.remove(during_load)
        (gc.enable if was_enabled else gc.disable)()
    assert collected.count("start") <= (2 if enabled else 0)  # one per load at most


def test_a_manifest_read_again_is_decoded_again_once_its_bytes_change(tmp_path: Path) -> None:
    """The last manifest is kept with its bytes: a load of the same checkpoint skips
    decoding it, and any other bytes (another checkpoint, an altered manifest) are read
    and checked anew."""
    first = save(tmp_path, {"w": torch.ones(3)}, "dcp", name="first")
    second = save(tmp_path, {"w": torch.full((3,), 2.0)}, "dcp", name="second")
    assert load(first)["w"].tolist() == [1.0] * 3
    assert reading.read_manifest(first) is reading.read_manifest(first)
    assert load(second)["w"].tolist() == [2.0] * 3
    manifest = first / MANIFEST_NAME
    data = bytearray(manifest.read_bytes())
    data[data.index(b'"w"') + 1] = ord("v")  # a key renamed: the checksum no longer matches
    manifest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum") as info:
        load(first)
    assert info.value.path == str(manifest)


@pytest.mark.parametrize("fmt", FORMATS)
def test_loads_of_a_kept_manifest_reuse_its_plan_for_any_target(tmp_path: Path, fmt: str) -> None:
    """The plan (runs, views of the spare buffer) is made once per manifest; every load
    still fills its own target: another dtype (converted), a parameter that requires grad,
    tied leaves into separate tensors, a target without some keys (not filled), a non-tensor
    where a tensor was saved (replaced)."""
    state_dict: dict[str, Any] = many_small(600)
    shared = random_tensor(torch.float32, (7,), seed=900)
    state_dict["tied_a"] = state_dict["tied_b"] = shared
    path = save(tmp_path, state_dict, fmt)
    loaded = load(path)
    assert_same(loaded, state_dict)
    if fmt == "dcp":  # saved once for both keys (safetensors writes each key's own copy)
        assert loaded["tied_a"] is loaded["tied_b"]
    kept = loading._last_plans[0]
    assert kept is not None
    plans = dict(kept[1])
    singles = [k for k, v in state_dict.items() if v.dtype == torch.float32 and v.dim()]
    converted, parameter, replaced, missing = singles[1:5]
    for round_ in range(3):
        target = like(state_dict)
        target["tied_b"] = torch.empty(7)  # tied when saved, each filled on its own here
        target[converted] = torch.zeros(state_dict[converted].shape, dtype=torch.float64)
        target[parameter] = torch.nn.Parameter(torch.zeros_like(state_dict[parameter]))
        target[replaced] = None
        del target[missing]
        assert load(path, target) is target
        assert torch.equal(target[converted], state_dict[converted].to(torch.float64))
        assert isinstance(target[parameter], torch.nn.Parameter)
        assert torch.equal(target[parameter].detach(), state_dict[parameter])
        assert_same(target[replaced], state_dict[replaced])
        assert missing not in target
        expected = {k: v for k, v in state_dict.items() if k not in (converted, parameter, missing)}
        assert_same({k: target[k] for k in expected}, expected)
        kept = loading._last_plans[0]
        assert kept is not None and kept[1] == plans, round_  # the same plan objects


def test_loads_in_place_from_several_threads_at_once(tmp_path: Path) -> None:
    """One spare buffer per plan is lent to one load at a time; loads running together
    each fill their own target correctly."""
    state_dict = many_small(3_000)
    path = save(tmp_path, state_dict, "dcp")
    load(path, like(state_dict))  # the plan made and its spare buffer kept
    targets = [like(state_dict) for _ in range(3)]
    start = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def run(target: dict[str, torch.Tensor]) -> None:
        try:
            start.wait(timeout=30)
            for _ in range(3):
                load(path, target)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    for target in targets:
        assert_same(target, state_dict)


def test_two_different_tensors_at_one_place_are_corrupt_when_both_are_read(
    tmp_path: Path,
) -> None:
    """A manifest (sealed with a valid checksum) placing two different small tensors at one
    offset is refused by any load that reads both, naming the data file; a load of only one
    of them reads it as saved."""
    from tests.test_hostile_input import sealed

    state_dict = {"a": torch.arange(16.0), "b": torch.arange(16.0) + 100, "c": torch.ones(3)}
    path = save(tmp_path, state_dict, "safetensors")
    manifest = json.loads((path / MANIFEST_NAME).read_bytes())
    skeleton = manifest["skeleton"]
    index = {key: child[1] for key, child in zip(skeleton[1], skeleton[2], strict=True)}
    a, b = manifest["leaves"][index["a"]], manifest["leaves"][index["b"]]
    b.update(offset=a["offset"], shape=[8])  # b's place is a's now, and b is another tensor
    (path / MANIFEST_NAME).write_bytes(sealed(manifest))
    for call in (lambda: load(path), lambda: load(path, {"a": torch.zeros(16), "b": None})):
        with pytest.raises(CorruptCheckpoint, match="two different leaves") as info:
            call()
        assert info.value.path == str(path / DATA_FILE["safetensors"])
    only_b = load(path, {"b": torch.zeros(8), "c": torch.zeros(3)})
    assert only_b["b"].tolist() == list(range(8)) and only_b["c"].tolist() == [1.0] * 3
    only_a = load(path, {"a": torch.zeros(16)})
    assert only_a["a"].tolist() == list(range(16))
