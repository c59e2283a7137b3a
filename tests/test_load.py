"""aiockpt.load and verify: exact trees, in-place fills, corruption, no unpickling."""

from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from aiockpt import Checkpointer
from aiockpt._format import commit
from aiockpt._format.commit import write_checkpoint
from aiockpt._format.loading import load
from aiockpt._format.manifest import MANIFEST_NAME, TensorLeaf, decode_manifest, encode_manifest
from aiockpt._format.reading import verify
from aiockpt._format.tree import MAX_DEPTH
from aiockpt._wire.protocol import RankInfo, ShardSpec
from aiockpt.errors import CorruptCheckpoint
from aiockpt.writers import create_writer
from aiockpt.writers.base import flatten_state_dict
from aiockpt.writers.dcp import DcpWriter
from tests.writer_fixtures import assert_same, full_state_dict, like, random_tensor

FORMATS = ["dcp", "safetensors"]
DATA_FILE = {"dcp": "__0_0.distcp", "safetensors": "model.safetensors"}


def save(tmp_path: Path, state_dict: Any, fmt: str, name: str = "ckpt") -> Path:
    path = tmp_path / name
    write_checkpoint(create_writer(fmt), state_dict, path, format=fmt)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_returns_the_exact_tree(tmp_path: Path, fmt: str) -> None:
    state_dict = full_state_dict()
    loaded = load(save(tmp_path, state_dict, fmt))
    assert_same(loaded, state_dict)
    assert isinstance(loaded["optimizer"]["param_groups"][0]["betas"], tuple)
    assert list(loaded["optimizer"]["state"]) == [0, 1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_fills_a_state_dict_in_place(tmp_path: Path, fmt: str) -> None:
    state_dict = full_state_dict()
    path = save(tmp_path, state_dict, fmt)
    target = like(state_dict)
    target["optimizer"]["state"][0]["exp_avg"] = torch.nn.Parameter(torch.zeros(7))
    tensors_before = {
        "w": target["model"]["w_float32"],
        "param": target["optimizer"]["state"][0]["exp_avg"],
    }
    groups = target["optimizer"]["param_groups"]
    result = load(path, target)
    assert result is target
    assert_same(
        target["optimizer"]["state"][0]["exp_avg"].detach(),
        state_dict["optimizer"]["state"][0]["exp_avg"],
    )
    target["optimizer"]["state"][0]["exp_avg"] = state_dict["optimizer"]["state"][0]["exp_avg"]
    assert_same(target, state_dict)
    # Tensors keep their identity (copy_); containers are the caller's; leaves are replaced.
    assert target["model"]["w_float32"] is tensors_before["w"]
    assert target["optimizer"]["param_groups"] is groups
    assert tensors_before["param"].requires_grad


def test_load_into_a_partial_state_dict_converting_dtypes(tmp_path: Path) -> None:
    path = save(tmp_path, {"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2)}, "dcp")
    target = {"a": torch.zeros(4, dtype=torch.float64)}  # "b" is not asked for
    load(path, target)
    assert target["a"].dtype == torch.float64 and target["a"].tolist() == [0, 1, 2, 3]


def test_load_into_a_non_contiguous_tensor(tmp_path: Path) -> None:
    path = save(tmp_path, {"a": torch.arange(6.0).reshape(2, 3)}, "safetensors")
    target = {"a": torch.zeros(3, 2).t()}
    load(path, target)
    assert torch.equal(target["a"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_into_conjugate_and_negative_views_reads_back_what_was_saved(
    tmp_path: Path, fmt: str
) -> None:
    # Such views are contiguous, but their bytes are not their values: bytes read straight
    # into them would read back conjugated or negated.
    saved = {"z": torch.tensor([1 + 2j, 3 - 4j]), "r": torch.tensor([1.0, -2.0])}
    path = save(tmp_path, saved, fmt)
    complex_base, real_base = torch.zeros(2, dtype=torch.complex64), torch.zeros(2)
    target = {"z": complex_base.conj(), "r": real_base._neg_view()}
    views = dict(target)
    for _ in range(3):  # the first load, the second (which binds plain targets), a bound one
        complex_base.zero_(), real_base.zero_()
        assert load(path, target) is target
        assert target["z"] is views["z"] and target["r"] is views["r"]
        assert torch.equal(target["z"], saved["z"]) and torch.equal(target["r"], saved["r"])
        assert torch.equal(complex_base, saved["z"].conj()) and torch.equal(real_base, -saved["r"])


def test_load_key_and_shape_mismatches(tmp_path: Path) -> None:
    path = save(tmp_path, {"a": torch.ones(4), "nested": {"b": 1}}, "safetensors")
    with pytest.raises(KeyError, match=r"nested\.c"):
        load(path, {"nested": {"c": 2}})
    with pytest.raises(ValueError, match="shape"):
        load(path, {"a": torch.zeros(2, 2)})


def test_tied_tensors_come_back_tied_from_dcp(tmp_path: Path) -> None:
    weight = torch.randn(3, 3)
    loaded = load(save(tmp_path, {"embed": weight, "head": weight}, "dcp"))
    assert loaded["embed"] is loaded["head"]
    target = {"embed": torch.zeros(3, 3), "head": torch.zeros(3, 3)}
    load(tmp_path / "ckpt", target)
    assert torch.equal(target["embed"], weight) and torch.equal(target["head"], weight)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pickled_leaves_need_explicit_permission(tmp_path: Path, fmt: str) -> None:
    state_dict = {"w": torch.ones(2), "obj": {1, 2, 3}, "frozen": frozenset({4})}
    path = save(tmp_path, state_dict, fmt)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load(path)
    assert_same(load(path, allow_pickle=True), state_dict)


# --- verification -----------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_byte_is_caught_naming_the_file(tmp_path: Path, fmt: str) -> None:
    state_dict = {"w": random_tensor(torch.float32, (64, 64)), "step": 3}
    path = save(tmp_path, state_dict, fmt)
    data = path / DATA_FILE[fmt]
    leaf = decode_manifest((path / MANIFEST_NAME).read_bytes()).leaves[0]
    assert isinstance(leaf, TensorLeaf)
    flip_byte(data, leaf.offset + 100)  # inside the tensor's bytes
    for call in (verify, load):
        with pytest.raises(CorruptCheckpoint, match=DATA_FILE[fmt]) as info:
            call(path)
        assert info.value.path == str(data)
    flip_byte(data, leaf.offset + 100)
    flip_byte(data, 3)  # a header byte, outside any tensor
    with pytest.raises(CorruptCheckpoint) as info:
        load(path)
    assert info.value.path == str(data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_or_missing_file_is_caught(tmp_path: Path, fmt: str) -> None:
    path = save(tmp_path, {"w": random_tensor(torch.float32, (64, 64))}, fmt)
    data = path / DATA_FILE[fmt]
    os.truncate(data, os.path.getsize(data) - 10)
    for kwargs in ({"verify": True}, {"verify": False}):  # sizes are checked either way
        with pytest.raises(CorruptCheckpoint, match="truncated") as info:
            load(path, **kwargs)
        assert info.value.path == str(data)
    os.unlink(data)
    with pytest.raises(CorruptCheckpoint) as info:
        verify(path)
    assert info.value.path == str(data)


def test_missing_or_broken_manifest(tmp_path: Path) -> None:
    path = save(tmp_path, {"w": torch.ones(2)}, "safetensors")
    manifest = path / MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:-5])
    with pytest.raises(CorruptCheckpoint, match="unreadable manifest") as info:
        load(path)
    assert info.value.path == str(manifest)
    os.unlink(manifest)
    for call in (verify, load):
        with pytest.raises(CorruptCheckpoint, match="never committed"):
            call(path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing")


def test_manifest_with_an_unknown_dtype_is_corrupt(tmp_path: Path) -> None:
    path = save(tmp_path, {"w": torch.ones(2)}, "safetensors")
    manifest = decode_manifest((path / MANIFEST_NAME).read_bytes())
    leaf = msgspec.structs.replace(manifest.leaves[0], dtype="__class__")
    (path / MANIFEST_NAME).write_bytes(
        encode_manifest(msgspec.structs.replace(manifest, leaves=[leaf]))
    )
    with pytest.raises(CorruptCheckpoint, match="unknown dtype"):
        load(path)


def test_hostile_manifest_cannot_point_outside(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"s" * 64)
    path = save(tmp_path, {"w": torch.ones(2)}, "safetensors")
    manifest = decode_manifest((path / MANIFEST_NAME).read_bytes())
    entry = msgspec.structs.replace(manifest.files[0], name="../secret")
    leaf = msgspec.structs.replace(manifest.leaves[0], file="../secret")
    hostile = msgspec.structs.replace(manifest, files=[entry], leaves=[leaf])
    (path / MANIFEST_NAME).write_bytes(encode_manifest(hostile))
    with pytest.raises(CorruptCheckpoint, match="not a relative file name"):
        load(path, verify=False)


def test_dcp_load_never_unpickles_metadata(tmp_path: Path) -> None:
    path = save(tmp_path, {"w": torch.arange(3.0), "step": 4}, "dcp")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    loaded = load(path, verify=False)  # verify=True would (rightly) reject the new .metadata
    assert loaded["step"] == 4 and loaded["w"].tolist() == [0.0, 1.0, 2.0]
    assert not marker.exists()
    with pytest.raises(CorruptCheckpoint, match=r"\.metadata"):
        load(path)


def test_the_deepest_state_dict_a_save_accepts_loads(tmp_path: Path) -> None:
    """Saves refuse nesting deeper than MAX_DEPTH (the loader refuses such manifests), and
    the deepest they accept loads back."""
    deepest: Any = {"w": torch.ones(2)}
    for _ in range(MAX_DEPTH - 1):
        deepest = [deepest]
    assert_same(load(save(tmp_path, deepest, "safetensors")), deepest)
    with pytest.raises(TypeError, match=f"more than {MAX_DEPTH} deep"):
        save(tmp_path, [deepest], "safetensors", name="deeper")
    assert not (tmp_path / "deeper").exists()


BIG_INTS = {"huge": 2**200, "negative": -(2**70), "edge": 2**64, "max": 2**64 - 1}


async def test_ints_beyond_64_bits_round_trip_through_the_worker(tmp_path: Path) -> None:
    """Trainer -> channel -> worker -> manifest -> load, in both formats (such ints failed
    at ``await`` with an OverflowError from the encoder that named no key)."""
    state = {"w": torch.arange(4.0), "ints": dict(BIG_INTS), "nested": [(2**100, "x")]}
    async with Checkpointer(tmp_path) as ckpt:
        for fmt in FORMATS:
            await ckpt.save_to(state, tmp_path / fmt, format=fmt)
            assert_same(await asyncio.to_thread(load, tmp_path / fmt), state)


@pytest.mark.parametrize(
    ("state", "key"),
    [
        ({"opt": {"lr": np.float64(0.1)}}, "opt.lr"),
        ({"opt": {"name": "\ud800"}}, "opt.name"),
        ({"opt": {2**70: 1}}, "1180591620717411303424"),
        ({"opt": {"\udcff": 1}}, r"\\udcff"),
    ],
    ids=["numpy-scalar", "surrogate-value", "int-key-beyond-64-bits", "surrogate-key"],
)
async def test_a_leaf_the_worker_cannot_receive_fails_in_the_caller(
    tmp_path: Path, state: dict[str, Any], key: str
) -> None:
    """TypeError from ``save_to`` itself, naming the key, before anything is sent or written."""
    async with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=key):
            ckpt.save_to(state, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# --- Checkpoints saved by several ranks, written here rank by rank through the DCP writer's
# group steps (the worker's path, without processes; tests/multirank runs the real thing).


def save_ranks(path: Path, states: list[tuple[dict[str, Any], dict[int, ShardSpec]]]) -> Path:
    """Commit one checkpoint of ``states``, rank r's state dict and its shards (leaf index ->
    where that tensor lies in the whole), as the ranks of one save would."""
    world = len(states)
    writers = [DcpWriter(RankInfo(global_rank=r, global_world_size=world)) for r in range(world)]
    plans = [writer.plan(sd, shards) for writer, (sd, shards) in zip(writers, states, strict=True)]
    assignments = writers[0].assign(plans)
    pending = commit.prepare(path)
    written = [
        writer.write_part(sd, pending.temp_path, assignment)
        for writer, (sd, _), assignment in zip(writers, states, assignments, strict=True)
    ]
    records = [record for part in written for record in part.records]
    records += writers[0].finish(pending.temp_path, written)
    parts = []
    for part, (sd, _) in zip(written, states, strict=True):
        flat_state = flatten_state_dict(sd)
        leaves = commit.describe_leaves(flat_state, part.records, elsewhere=part.imports)
        parts.append(commit.RankPart(str(path), part, flat_state[0], leaves))
    commit.finalize(pending, commit.build_manifest("dcp", parts, records))
    return path


def sharded(whole: torch.Tensor, dim: int, world: int) -> list[tuple[torch.Tensor, ShardSpec]]:
    """``whole`` cut into ``world`` pieces along ``dim`` as DTensor's Shard(dim) cuts it."""
    pieces, offset = [], 0
    for piece in torch.chunk(whole, world, dim):
        offsets = [0] * whole.dim()
        offsets[dim] = offset
        pieces.append((piece.contiguous(), ShardSpec(list(whole.shape), offsets)))
        offset += piece.shape[dim]
    return pieces


def two_rank_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """``rows`` (97 x 6) sharded on dim 0 and ``cols`` (5 x 9) on dim 1 over 2 ranks, plus a
    replicated tensor and a per-rank value; returns the path and the whole tensors."""
    whole = {"rows": torch.randn(97, 6), "cols": torch.randn(5, 9), "bias": torch.randn(6)}
    rows, cols = sharded(whole["rows"], 0, 2), sharded(whole["cols"], 1, 2)
    states = []
    for r in range(2):
        # Leaf order: bias, cols, rank, rows (flatten sorts nothing: insertion order).
        sd = {"bias": whole["bias"], "cols": cols[r][0], "rank": r, "rows": rows[r][0]}
        states.append((sd, {1: cols[r][1], 3: rows[r][1]}))
    return save_ranks(tmp_path / "two", states), whole


def test_a_sharded_checkpoint_loads_whole_in_one_process(tmp_path: Path) -> None:
    path, whole = two_rank_checkpoint(tmp_path)
    loaded = load(path)
    for name in ("rows", "cols", "bias"):
        assert torch.equal(loaded[name], whole[name]), name
    assert loaded["rank"] == 0  # non-sharded leaves are rank 0's, as dcp.load gives them
    # At the saved world size, a rank gets what it saved: its own piece and values.
    own = load(path, rank=1)
    assert torch.equal(own["rows"], whole["rows"][49:]) and own["rank"] == 1
    assert torch.equal(own["cols"], whole["cols"][:, 5:])


def test_a_sharded_checkpoint_fills_plain_targets_of_the_whole_shape(tmp_path: Path) -> None:
    path, whole = two_rank_checkpoint(tmp_path)
    target = {
        "rows": torch.zeros(97, 6, dtype=torch.float64),  # converted on the way
        "cols": torch.zeros(9, 5).t(),  # not contiguous: filled through a copy
        "bias": torch.zeros(6),
    }
    cols = target["cols"]
    assert load(path, target) is target
    assert target["cols"] is cols
    assert torch.equal(target["rows"], whole["rows"].double())
    assert torch.equal(target["cols"], whole["cols"])
    # At another world size, a plain tensor of one piece's shape is no piece of anything.
    with pytest.raises(ValueError, match=r"saved by 2 ranks as pieces \[49, 6\] at \[0, 0\]"):
        load(path, {"rows": torch.zeros(49, 6)}, rank=0, world_size=3)


def test_a_resharding_load_reads_only_what_it_needs_and_verifies_it(tmp_path: Path) -> None:
    path, whole = two_rank_checkpoint(tmp_path)
    # Corrupt a byte of rank 1's file outside every tensor: only a verified load sees it.
    data = path / "__1_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[2] ^= 0xFF
    data.write_bytes(bytes(raw))
    loaded = load(path, verify=False)
    assert torch.equal(loaded["rows"], whole["rows"])
    with pytest.raises(CorruptCheckpoint, match=r"__1_0\.distcp"):
        load(path)


def test_pieces_that_do_not_make_up_their_whole_are_refused(tmp_path: Path) -> None:
    path, _ = two_rank_checkpoint(tmp_path)
    manifest_path = path / MANIFEST_NAME
    manifest = decode_manifest(manifest_path.read_bytes())
    rank_1 = manifest.ranks[0]
    leaves = list(rank_1.leaves)
    rows = leaves[3]
    assert isinstance(rows, TensorLeaf) and rows.global_offset == [49, 0]
    leaves[3] = msgspec.structs.replace(rows, global_offset=[48, 0])  # overlaps rank 0's
    ranks = [msgspec.structs.replace(rank_1, leaves=leaves)]
    manifest_path.write_bytes(encode_manifest(msgspec.structs.replace(manifest, ranks=ranks)))
    with pytest.raises(CorruptCheckpoint, match="'rows'"):
        load(path)
    # Its own piece, at the saved world size, is still what rank 0 saved.
    assert load(path, rank=0)["rows"].shape == (49, 6)
