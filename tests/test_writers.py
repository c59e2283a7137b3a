"""Writers against the loaders of their formats: torch's own DCP loader, safetensors' own."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from aiockpt._format.commit import remove_checkpoint, write_checkpoint
from aiockpt._format.loading import load
from aiockpt._format.manifest import TensorLeaf
from aiockpt._wire.protocol import RankInfo
from aiockpt.writers import BUILTIN_WRITERS, create_writer, resolve_writer
from aiockpt.writers.base import FileSink, tensor_bytes
from aiockpt.writers.dcp import DcpWriter, torch_save_framing
from aiockpt.writers.safetensors import SafetensorsWriter
from tests.writer_fixtures import (
    DTYPES,
    NoneReturningWriter,
    assert_same,
    full_state_dict,
    like,
    random_tensor,
)

FORMATS = ["dcp", "safetensors"]


def save(tmp_path: Path, state_dict: Any, fmt: str, name: str = "ckpt") -> str:
    path = str(tmp_path / name)
    write_checkpoint(create_writer(fmt), state_dict, path, format=fmt)
    return path


def torch_dcp_load(state_dict: Any, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state_dict, checkpoint_id=path, no_dist=True)


# --- DCP ------------------------------------------------------------------------------------


def test_dcp_loads_with_torch_loader_bit_exact(tmp_path: Path) -> None:
    state_dict = full_state_dict()
    path = save(tmp_path, state_dict, "dcp")
    target = like(state_dict)
    torch_dcp_load(target, path)
    assert_same(target, state_dict)


def test_dcp_layout_is_torchs(tmp_path: Path) -> None:
    path = save(tmp_path, {"w": torch.ones(3)}, "dcp")
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "aiockpt-manifest.json"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (2, 3), (1, 0, 4)], ids=str)
@pytest.mark.parametrize("zip64", [False, True])
def test_torch_save_framing_is_read_by_torch_load(
    dtype: torch.dtype, shape: tuple[int, ...], zip64: bool
) -> None:
    tensor = random_tensor(dtype, shape, seed=3)
    head, tail = torch_save_framing(tensor, zip64=zip64)
    archive = head + bytes(tensor_bytes(tensor)) + tail
    assert len(head) % 64 == 0  # tensor bytes 64-byte aligned, as torch.save places them
    loaded = torch.load(io.BytesIO(archive), weights_only=True)
    assert_same(loaded, tensor)
    names = [i.filename for i in zipfile.ZipFile(io.BytesIO(archive)).infolist()]
    assert "archive/data.pkl" in names and "archive/data/0" in names


def test_dcp_writes_only_the_views_bytes_not_the_whole_arena(tmp_path: Path) -> None:
    # The worker's tensors are views into one shared-memory arena: torch.save would write the
    # whole arena for each of them.
    arena = torch.arange(1 << 16, dtype=torch.float32)
    state_dict = {f"t{i}": arena[i * 1024 : (i + 1) * 1024] for i in range(4)}
    path = save(tmp_path, state_dict, "dcp")
    assert os.path.getsize(os.path.join(path, "__0_0.distcp")) < 4 * 4096 + 8192
    target = like(state_dict)
    torch_dcp_load(target, path)
    assert_same(target, state_dict)


def test_dcp_tensors_inside_tuples_are_indexed_too(tmp_path: Path) -> None:
    # DCP pickles a tuple (tensors included) as one item; the manifest still indexes them.
    state_dict = {"pair": (torch.ones(2), torch.zeros(3, dtype=torch.int8)), "x": torch.ones(1)}
    path = save(tmp_path, state_dict, "dcp")
    assert_same(load(path), state_dict)
    target = like(state_dict)
    torch_dcp_load(target, path)
    assert_same(target, state_dict)


def test_dcp_needs_a_dict(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="dict"):
        DcpWriter().write([torch.ones(1)], str(tmp_path))


def test_dcp_rank_names_its_data_file(tmp_path: Path) -> None:
    records = DcpWriter(rank_info=RankInfo(0, 1)).write({"w": torch.ones(2)}, str(tmp_path))
    assert {r.name for r in records} == {"__0_0.distcp", ".metadata"}


# --- safetensors ----------------------------------------------------------------------------


def test_safetensors_loads_with_safetensors_loader_bit_exact(tmp_path: Path) -> None:
    state_dict = full_state_dict()
    path = save(tmp_path, state_dict, "safetensors")
    loaded = load_file(os.path.join(path, "model.safetensors"))
    expected = {
        "scalar": state_dict["scalar"],
        "empty": state_dict["empty"],
        "optimizer.state.0.exp_avg": state_dict["optimizer"]["state"][0]["exp_avg"],
        "list_of_tensors.1": state_dict["list_of_tensors"][1],
        **{f"model.{k}": v for k, v in state_dict["model"].items()},
    }
    for name, tensor in expected.items():
        if tensor.dtype in (torch.complex128, torch.float8_e8m0fnu):
            # No safetensors dtype: stored as U8 with a trailing element-size dimension.
            assert loaded[name].dtype == torch.uint8
            assert loaded[name].shape == (*tensor.shape, tensor.element_size())
            assert bytes(tensor_bytes(loaded[name])) == bytes(tensor_bytes(tensor))
        else:
            assert_same(loaded[name], tensor, name)
    assert_same(load(path), state_dict)


def test_safetensors_header_is_standard(tmp_path: Path) -> None:
    path = save(tmp_path, {"b": torch.ones(3, dtype=torch.int8), "a": torch.ones(2)}, "safetensors")
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    assert (8 + length) % 8 == 0
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert header["b"] == {"dtype": "I8", "shape": [3], "data_offsets": [8, 11]}


def test_safetensors_duplicate_names_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'a\.b'"):
        SafetensorsWriter().write({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, str(tmp_path))


def test_safetensors_write_alone_is_a_complete_hugging_face_layout(tmp_path: Path) -> None:
    # Ranks of one save coordinate through the GroupWriter steps (tests/test_safetensors_layout);
    # write() on its own writes the whole state dict it is given.
    writer = SafetensorsWriter(rank_info=RankInfo(global_rank=1, global_world_size=4))
    (record,) = writer.write({"w": torch.ones(1)}, str(tmp_path))
    assert record.name == "model.safetensors"


# --- both -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_records_match_files(tmp_path: Path, fmt: str) -> None:
    state_dict = {"w": random_tensor(torch.float32, (300, 300)), "obj": {1, 2}, "n": 3}
    records = create_writer(fmt).write(state_dict, str(tmp_path))
    assert records is not None
    assert {r.name for r in records} == set(os.listdir(tmp_path))
    for record in records:
        data = (tmp_path / record.name).read_bytes()
        assert record.size == len(data)
        assert record.xxh3_64 == xxhash.xxh3_64_hexdigest(data)
        for leaf in record.leaves.values():
            if isinstance(leaf, TensorLeaf):  # the index points at the raw bytes
                assert (
                    data[leaf.offset : leaf.offset + 4] == bytes(tensor_bytes(state_dict["w"]))[:4]
                )


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_and_grad_tensors_are_written_as_values(tmp_path: Path, fmt: str) -> None:
    # Not what the worker hands writers, but direct callers may: the contiguous copies must
    # live until their bytes are written (the write thread may still be on them).
    state_dict = {
        "t": random_tensor(torch.float32, (300, 700), seed=4).t(),
        "strided": torch.arange(300_000)[::3],
        "param": torch.nn.Parameter(torch.ones(3)),
    }
    path = save(tmp_path, state_dict, fmt)
    expected = {k: v.detach().contiguous() for k, v in state_dict.items()}
    assert_same(load(path), expected)
    if fmt == "dcp":
        target = like(expected)
        torch_dcp_load(target, path)
        assert_same(target, expected)


HOSTILE_KEYS = ["../escape", "../../etc/passwd", "/abs/path", "a\0b", "x/y", "..", "c\\d", ""]


@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_keys_stay_inside(tmp_path: Path, fmt: str) -> None:
    parent = tmp_path / "root"
    parent.mkdir()
    state_dict = {
        key: {"t": torch.full((2,), float(i)), key: i} for i, key in enumerate(HOSTILE_KEYS)
    }
    path = save(parent, state_dict, fmt)
    assert os.listdir(tmp_path) == ["root"]
    assert os.listdir(parent) == ["ckpt"]
    for directory, dirnames, filenames in os.walk(path):
        assert directory == path and not dirnames
        allowed = {"aiockpt-manifest.json", ".metadata", "__0_0.distcp", "model.safetensors"}
        assert set(filenames) <= allowed
    assert_same(load(path), state_dict)
    if fmt == "safetensors":  # the names live in the header, escaped, and load as they were
        loaded = load_file(os.path.join(path, "model.safetensors"))
        assert set(loaded) == {f"{key}.t" for key in HOSTILE_KEYS}


def test_writers_are_resolved_by_format_name() -> None:
    assert BUILTIN_WRITERS == {
        "dcp": "aiockpt.writers.dcp:DcpWriter",
        "safetensors": "aiockpt.writers.safetensors:SafetensorsWriter",
    }
    assert resolve_writer("dcp") is DcpWriter
    assert isinstance(create_writer("safetensors", RankInfo()), SafetensorsWriter)
    custom = create_writer("tests.writer_fixtures:NoneReturningWriter", level=3)
    assert isinstance(custom, NoneReturningWriter) and custom.options == {"level": 3}
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        resolve_writer("pickle")
    with pytest.raises(ImportError, match="has no attribute 'NoSuchWriter'"):
        resolve_writer("tests.writer_fixtures:NoSuchWriter")
    with pytest.raises(ImportError):
        resolve_writer("tests.no_such_module:Writer")
    with pytest.raises(TypeError, match="unknown options"):
        create_writer("dcp", thread_count=4)


def test_file_sink_hashes_what_it_writes(tmp_path: Path) -> None:
    big = random_tensor(torch.uint8, (3 << 20,), seed=1)
    with FileSink(str(tmp_path), "f.bin", chunk_bytes=1 << 20) as sink:
        assert sink.write(b"head") == 0
        assert sink.align(64) == 64
        assert sink.write(tensor_bytes(big)) == 64
        sink.write(b"tail")
        record = sink.close()
    data = (tmp_path / "f.bin").read_bytes()
    assert data == b"head" + bytes(60) + bytes(tensor_bytes(big)) + b"tail"
    assert (record.name, record.size, record.xxh3_64) == (
        "f.bin",
        len(data),
        xxhash.xxh3_64_hexdigest(data),
    )
    assert (os.stat(tmp_path / "f.bin").st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        FileSink(str(tmp_path), "f.bin")


# --- property test: random small trees round-trip through both formats -----------------------

_keys = st.one_of(st.text(max_size=6), st.integers(-3, 1000))
_plain = st.one_of(
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.binary(max_size=8),
)


@st.composite
def _tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    return random_tensor(dtype, shape, seed=draw(st.integers(0, 1000)))


_trees = st.recursive(
    st.one_of(_plain, _tensors()),
    lambda children: st.one_of(
        st.dictionaries(_keys, children, max_size=4),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=10,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=st.dictionaries(st.text(min_size=1, max_size=6), _trees, max_size=4))
def test_random_trees_round_trip(tmp_path: Path, tree: dict[Any, Any]) -> None:
    for fmt in FORMATS:
        try:
            path = save(tmp_path, tree, fmt, name="prop")
        except ValueError as exc:  # two leaves flattening to the same name: refused loudly
            assert "named" in str(exc) or "duplicated" in str(exc)
            continue
        try:
            assert_same(load(path), tree)
        finally:
            remove_checkpoint(path)
