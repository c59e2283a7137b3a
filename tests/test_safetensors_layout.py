"""Hugging Face's safetensors layout: shards, the index, one file per tensor set, written once
from several ranks; checked with safetensors' and huggingface_hub's own code and transformers'
``from_pretrained``."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file

import aiockpt
from aiockpt._format.commit import write_checkpoint
from aiockpt._format.manifest import TensorLeaf
from aiockpt._wire.protocol import ShardSpec
from aiockpt.writers.safetensors import (
    INDEX_NAME,
    SafetensorsWriter,
    parse_shard_size,
)
from tests.group_saves import group_save
from tests.multirank.hf_scenarios import tiny_gpt2

# --- max_shard_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1000, 1000),
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5mib", int(1.5 * 2**20)),
        (" 10 KB ", 10_000),
        ("64", 64),
    ],
)
def test_shard_sizes_parse_as_hugging_face_writes_them(size: int | str, expected: int) -> None:
    assert parse_shard_size(size) == expected


@pytest.mark.parametrize("size", ["5 gigabytes", "GB", "-1GB", 0, "0MB"])
def test_bad_shard_sizes_are_value_errors(size: int | str) -> None:
    with pytest.raises(ValueError, match="max_shard_size"):
        SafetensorsWriter(max_shard_size=size)


def test_a_shard_size_of_another_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="max_shard_size"):
        SafetensorsWriter(max_shard_size=5.0)  # type: ignore[arg-type]


# --- one rank -----------------------------------------------------------------------------------


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(4):
        state[f"layers.{layer}.weight"] = torch.randn(64, 32, generator=generator)
        state[f"layers.{layer}.bias"] = torch.randn(32, generator=generator)
    state["head.weight"] = torch.randn(100, 64, generator=generator).to(torch.bfloat16)
    state["steps"] = torch.tensor(7, dtype=torch.int64)
    return state


def test_shards_and_index_match_huggingface_hub(tmp_path: Path) -> None:
    state = model_state()
    max_size = 20_000
    path = tmp_path / "ckpt"
    writer = SafetensorsWriter(max_shard_size=max_size)
    write_checkpoint(writer, state, path, format="safetensors")

    expected = split_torch_state_dict_into_shards(state, max_shard_size=max_size)
    assert expected.is_sharded
    index = json.loads((path / INDEX_NAME).read_text())
    assert index["weight_map"] == expected.tensor_to_filename
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    names = sorted(expected.filename_to_tensors)
    assert sorted(p.name for p in path.glob("*.safetensors")) == names
    assert names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    for name, tensor_names in expected.filename_to_tensors.items():
        shard = load_file(path / name)
        assert sorted(shard) == sorted(tensor_names)
        for key, tensor in shard.items():
            assert torch.equal(tensor, state[key]), key
    # aiockpt's own loader reads it back and checks every file, the index included.
    loaded = aiockpt.load(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert INDEX_NAME in {entry.name for entry in aiockpt.verify(path).files}


def test_a_state_dict_that_fits_one_shard_is_one_model_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    write_checkpoint(SafetensorsWriter(), model_state(), path, format="safetensors")
    assert sorted(os.listdir(path)) == ["aiockpt-manifest.json", "model.safetensors"]


def test_a_tensor_larger_than_the_shard_size_gets_a_file_of_its_own(tmp_path: Path) -> None:
    state = {"small": torch.ones(10), "big": torch.ones(1000), "after": torch.ones(10)}
    SafetensorsWriter(max_shard_size=400).write(state, str(tmp_path))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert (
        index["weight_map"]
        == split_torch_state_dict_into_shards(state, max_shard_size=400).tensor_to_filename
    )


# --- several ranks, through the real coordination over a TCPStore --------------------------------


ROWS, COLS = 6, 4


def whole(seed: float) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + seed


def pieces(world: int) -> tuple[list[dict[str, Any]], list[dict[int, ShardSpec]]]:
    """Rank r's state dict: ``rows`` and ``cols`` sharded on dim 0 and dim 1 (as DTensors
    stage them: the local piece plus where it lies), ``shared`` replicated, ``mine`` a
    per-rank key, a plain value."""
    states, shards = [], []
    for rank in range(world):
        rows = whole(0).chunk(world, 0)[rank]
        cols = whole(100).chunk(world, 1)[rank]
        states.append(
            {
                "rows": rows.contiguous(),
                "cols": cols.contiguous(),
                "shared": whole(200),
                f"mine.{rank}": torch.full((3,), float(rank)),
                "step": 5,
            }
        )
        shards.append(
            {
                0: ShardSpec([ROWS, COLS], [rank * (ROWS // world), 0]),
                1: ShardSpec([ROWS, COLS], [0, rank * (COLS // world)]),
            }
        )
    return states, shards


@pytest.mark.parametrize("max_shard_size", [10**9, 100], ids=["one-file", "sharded"])
def test_two_ranks_write_every_tensor_once_as_whole_tensors(
    tmp_path: Path, max_shard_size: int
) -> None:
    path = tmp_path / "ckpt"
    states, shards = pieces(2)
    outcomes = group_save(path, states, shards, max_shard_size=max_shard_size)
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes

    expected = {
        "rows": whole(0),
        "cols": whole(100),
        "shared": whole(200),
        "mine.0": torch.zeros(3),
        "mine.1": torch.ones(3),
    }
    files = sorted(p.name for p in path.glob("*.safetensors"))
    found: dict[str, torch.Tensor] = {}
    for name in files:
        for key, tensor in load_file(path / name).items():
            assert key not in found, f"{key} written twice"
            found[key] = tensor
    assert found.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(found[key], tensor), key
    # Exactly one copy of the tensor bytes on disk (plus the small headers).
    data = sum((path / name).stat().st_size for name in files)
    one_copy = sum(t.nbytes for t in expected.values())
    assert one_copy <= data < one_copy + 512 * len(files)
    if max_shard_size == 100:
        assert len(files) > 1
        index = json.loads((path / INDEX_NAME).read_text())
        assert sorted(index["weight_map"]) == sorted(expected)
        assert set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == one_copy
    else:
        assert files == ["model.safetensors"] and not (path / INDEX_NAME).exists()

    # aiockpt's loader: verified, whole tensors assembled, each rank's own values.
    manifest = aiockpt.verify(path)
    assert manifest.world_size == 2
    loaded = aiockpt.load(path, {"rows": torch.zeros(ROWS, COLS), "cols": torch.zeros(ROWS, COLS)})
    assert torch.equal(loaded["rows"], whole(0)) and torch.equal(loaded["cols"], whole(100))
    for rank in range(2):
        # A rank resuming gets its own pieces back: a row piece is one run of the whole's
        # bytes, a column piece is read strided out of them.
        own = aiockpt.load(path, rank=rank)
        assert torch.equal(own["rows"], states[rank]["rows"])
        assert torch.equal(own["cols"], states[rank]["cols"])
        assert torch.equal(own[f"mine.{rank}"], states[rank][f"mine.{rank}"])
        assert own["step"] == 5
        target = {"cols": torch.zeros(ROWS, COLS // 2)}
        aiockpt.load(path, target, rank=rank)
        assert torch.equal(target["cols"], states[rank]["cols"])
    # ... and a target of the whole shape gets the whole, on any rank.
    target = {"cols": torch.zeros(ROWS, COLS)}
    aiockpt.load(path, target, rank=1)
    assert torch.equal(target["cols"], whole(100))


def test_three_ranks_with_uneven_pieces(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    # 7 rows over 3 ranks: 3, 3, 1 (as DTensor's Shard(0) splits them).
    full = torch.arange(7 * 5, dtype=torch.float16).reshape(7, 5)
    sizes = [3, 3, 1]
    states, shards = [], []
    start = 0
    for size in sizes:
        states.append({"emb": full[start : start + size].clone(), "bias": torch.ones(5)})
        shards.append({0: ShardSpec([7, 5], [start, 0])})
        start += size
    outcomes = group_save(path, states, shards, max_shard_size="50")
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    emb_file = json.loads((path / INDEX_NAME).read_text())["weight_map"]["emb"]
    assert torch.equal(load_file(path / emb_file)["emb"], full)
    assert torch.equal(aiockpt.load(path)["emb"], full)


def grid_piece(
    tensor: torch.Tensor, splits: list[int], coordinates: list[int]
) -> tuple[torch.Tensor, ShardSpec]:
    """The piece of ``tensor`` at ``coordinates`` when each dimension d is cut into
    ``splits[d]`` equal parts, and where it lies."""
    offsets = []
    piece = tensor
    for dim, (parts, coordinate) in enumerate(zip(splits, coordinates, strict=True)):
        size = tensor.size(dim) // parts
        offsets.append(coordinate * size)
        piece = piece.narrow(dim, coordinate * size, size)
    return piece.contiguous(), ShardSpec(list(tensor.shape), offsets)


def test_four_ranks_with_pieces_cut_along_every_dimension(tmp_path: Path) -> None:
    """A 2 x 2 mesh: ``grid`` sharded by rows and columns, ``cube`` by its last two
    dimensions; ``tp`` by columns and ``dp`` by rows on one mesh dimension, replicated on the
    other (two ranks hold each piece; one writes it)."""
    wholes = {
        "grid": torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6),
        "cube": torch.arange(3 * 4 * 6, dtype=torch.int64).reshape(3, 4, 6),
        "tp": torch.arange(5 * 4, dtype=torch.bfloat16).reshape(5, 4),
        "dp": torch.arange(4 * 3, dtype=torch.float16).reshape(4, 3),
    }
    names = list(wholes)
    splits = {"grid": [2, 2], "cube": [1, 2, 2], "tp": [1, 2], "dp": [2, 1]}
    states, shards = [], []
    for rank in range(4):
        row, col = divmod(rank, 2)
        coordinates = {"grid": [row, col], "cube": [0, row, col], "tp": [0, col], "dp": [row, 0]}
        pieces = {name: grid_piece(wholes[name], splits[name], coordinates[name]) for name in names}
        states.append({name: piece for name, (piece, _) in pieces.items()})
        shards.append({position: pieces[name][1] for position, name in enumerate(names)})
    path = tmp_path / "ckpt"
    outcomes = group_save(path, states, shards)
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes

    # safetensors' own reader: each tensor whole, once.
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as opened:
        assert sorted(opened.keys()) == sorted(wholes)
        for name, tensor in wholes.items():
            assert torch.equal(opened.get_tensor(name), tensor), name
    # The manifest says which piece of the whole each rank's entry is; pieces that are not
    # one run of the whole's bytes (all but dp's rows) lie strided.
    manifest = aiockpt.verify(path)
    assert manifest.format_version == 3  # strided leaves: a version-2 reader must refuse it
    for rank in range(4):
        leaves = manifest.rank_state(rank).leaves
        for position, name in enumerate(names):
            leaf = leaves[position]
            assert isinstance(leaf, TensorLeaf)
            assert leaf.shape == list(states[rank][name].shape)
            assert leaf.global_offset == shards[rank][position].offsets
            strides = None if name == "dp" else _contiguous_strides(wholes[name].shape)
            assert leaf.strides == strides, (rank, name)
    # Every rank resumes its own pieces: into tensors of their shape, without a target, and
    # mapped (strided views of the file).
    for rank in range(4):
        targets = {name: torch.zeros_like(piece) for name, piece in states[rank].items()}
        loaded_again = []
        for _ in range(3):  # into the same target again: strided pieces are never bound
            aiockpt.load(path, {k: v.zero_() for k, v in targets.items()}, rank=rank)
            loaded_again.append({k: v.clone() for k, v in targets.items()})
        for loaded in (
            *loaded_again,
            aiockpt.load(path, rank=rank),
            aiockpt.load(path, rank=rank, mmap=True),
        ):
            for name, piece in states[rank].items():
                assert torch.equal(loaded[name], piece), (rank, name)
    # One process, or another world size: the wholes.
    for loaded in (aiockpt.load(path), aiockpt.load(path, rank=0, world_size=3)):
        for name, tensor in wholes.items():
            assert torch.equal(loaded[name], tensor), name


def _contiguous_strides(shape: torch.Size) -> list[int]:
    return list(torch.empty(shape, dtype=torch.uint8).stride())


def test_ranks_disagreeing_about_a_tensor_fail_the_save_on_every_rank(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    states = [{"w": torch.ones(4)}, {"w": torch.ones(5)}]
    outcomes = group_save(path, states, [{}, {}])
    assert all(isinstance(o, BaseException) for o in outcomes), outcomes
    assert "'w'" in str(outcomes[0]) and "a name must stand for one tensor" in str(outcomes[0])
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


# --- transformers ------------------------------------------------------------------------------


def from_pretrained(model_class: Any, path: Path, config: Any) -> Any:
    """``model_class.from_pretrained`` on a checkpoint of weights only: the config and the
    generation config are passed (a checkpoint holds neither; a missing generation config
    would otherwise be looked up in config.json, which it does not have either)."""
    from transformers import GenerationConfig

    model = model_class.from_pretrained(path, config=config, generation_config=GenerationConfig())
    return model.eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
async def test_from_pretrained_loads_a_checkpointer_save_of_a_tiny_gpt2(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()
    async with aiockpt.Checkpointer(
        tmp_path, format="safetensors", writer_options={"max_shard_size": "20KB"}
    ) as ckpt:
        result = await ckpt.save(model.state_dict(), step=1)
    path = Path(result.path)
    files = await asyncio.to_thread(os.listdir, path)
    assert len([name for name in files if name.startswith("model-0")]) > 1
    assert INDEX_NAME in files
    reloaded = from_pretrained(GPT2LMHeadModel, path, model.config)
    tokens = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


async def test_bad_writer_options_are_refused_at_the_call(tmp_path: Path) -> None:
    async with aiockpt.Checkpointer(tmp_path, format="safetensors") as ckpt:
        with pytest.raises(ValueError, match="max_shard_size"):
            ckpt.save_to(
                {"w": torch.ones(1)}, tmp_path / "x", writer_options={"max_shard_size": "lots"}
            )
        with pytest.raises(TypeError, match="unknown options"):
            ckpt.save_to({"w": torch.ones(1)}, tmp_path / "y", writer_options={"shard": 1})
    with pytest.raises(ValueError, match="max_shard_size"):
        aiockpt.Checkpointer(tmp_path, format="safetensors", writer_options={"max_shard_size": 0})


def test_saves_of_one_staged_layout_reuse_the_plan_and_write_the_new_values(
    tmp_path: Path,
) -> None:
    from aiockpt.writers.base import StagedLayout, StagedStateDict, flatten_state_dict

    writer = SafetensorsWriter(max_shard_size=100)
    skeleton, flat = flatten_state_dict({"a": torch.zeros(20), "b": torch.zeros(20)})
    layout = StagedLayout(skeleton)
    for value in (1.0, 2.0):
        values = [torch.full((20,), value) for _ in flat]
        path = tmp_path / f"save-{value}"
        path.mkdir()
        writer.write(StagedStateDict(layout, values, memoryview(b"")), str(path))
        assert writer._cached is not None and writer._cached[0] == layout.version
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            assert all(
                torch.equal(t, torch.full((20,), value)) for t in load_file(path / name).values()
            )
    # Another structure is planned anew.
    other = StagedLayout(flatten_state_dict({"c": torch.zeros(3)})[0])
    (tmp_path / "other").mkdir()
    writer.write(StagedStateDict(other, [torch.ones(3)], memoryview(b"")), str(tmp_path / "other"))
    assert list(load_file(tmp_path / "other" / "model.safetensors")) == ["c"]


async def test_repeated_saves_write_every_file_from_the_arena_as_safetensors_reads_it(
    tmp_path: Path,
) -> None:
    """Saves of one structure write each file's data from the arena in merged ranges; mixed
    dtypes (reordered by element size in the file), odd sizes (padding between them in the
    arena), a tied pair, an empty tensor and several files must all still land right."""

    def state(step: int) -> dict[str, Any]:
        tied = torch.full((7,), float(step))
        return {
            "a": torch.arange(1000, dtype=torch.float32) + step,
            "b": torch.full((3, 5), step, dtype=torch.bfloat16),
            "c": torch.arange(13, dtype=torch.int64) * step,
            "tied1": tied,
            "tied2": tied,
            "empty": torch.empty(0),
            "d": (torch.arange(2000, dtype=torch.float16) + step).reshape(40, 50).t(),
            "step": step,
        }

    async with aiockpt.Checkpointer(
        tmp_path, format="safetensors", writer_options={"max_shard_size": "5KB"}
    ) as ckpt:
        for step in (1, 2, 3):
            result = await ckpt.save(state(step), step=step)
            path = Path(result.path)
            files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
            assert len(files) > 1
            written: dict[str, torch.Tensor] = {}
            for name in files:
                written.update(load_file(path / name))
            expected = state(step)
            tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
            assert written.keys() == tensors.keys()
            for key, tensor in tensors.items():
                assert torch.equal(written[key], tensor), (step, key)
            loaded = aiockpt.load(path)
            assert loaded["step"] == step
            assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
            assert aiockpt.verify(path).format == "safetensors"  # raises on a bad hash


def test_a_staged_files_data_is_one_arena_range_per_run_of_adjacent_tensors(
    tmp_path: Path,
) -> None:
    """The worker's side, in this process: a state dict staged in order is written as
    ranges of the arena, one per run of tensors that lie next to each other there."""
    from aiockpt._trainer.staging import SharedArena, plan_staging
    from aiockpt._worker.serve import ArenaMaps, Layouts, materialize

    state = {f"w{i}": torch.full((64, 64), float(i)) for i in range(8)}  # 16 KiB each
    state["odd"] = torch.arange(3, dtype=torch.float32)  # 12 bytes: padding follows it
    state["empty"] = torch.empty(0)
    state["last"] = torch.full((16,), 7.0)
    plan = plan_staging(state)
    layouts = Layouts()
    arena, maps = SharedArena(plan.nbytes), ArenaMaps(before_release=layouts.forget)
    writer = SafetensorsWriter()
    try:
        arena.copy_in(plan)
        for attempt in range(2):  # the second save reuses what the first worked out
            staged = materialize(plan.payload(arena), maps, layouts)
            (tmp_path / str(attempt)).mkdir()
            writer.write(staged, str(tmp_path / str(attempt)))
            written = load_file(tmp_path / str(attempt) / "model.safetensors")
            assert all(torch.equal(written[k], v) for k, v in state.items())
            del staged
        assert writer._staged is not None
        assert writer._staged.runs == [[(0, 8 * 16384 + 12), (8 * 16384 + 64, 8 * 16384 + 128)]]
    finally:
        maps.release(arena.ref.path)
        arena.close()
