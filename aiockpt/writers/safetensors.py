"""The safetensors writer: what inference engines load.

Each rank writes one ``.safetensors`` file (``model.safetensors`` for a single rank, Hugging
Face's ``model-00001-of-00004.safetensors`` naming otherwise), byte for byte what
``safetensors.torch.save_file`` would accept and ``safetensors.torch.load_file`` reads, but
written straight from tensor memory: the header is built from shapes and dtypes alone, then
each tensor's bytes go to the file without an intermediate ``bytes`` object.

Tensors are named by their key path (``"model.layers.0.weight"``); two leaves with the same
name (``{"a.b": x, "a": {"b": y}}``) raise ValueError, as ``torch.distributed.checkpoint`` does.
Names live inside the file, so hostile keys cannot reach the file system. Non-tensor leaves
are kept by the manifest (plain values) or pickled into a sidecar ``objects.pkl`` (only when
the caller opted into pickling). Dtypes the installed safetensors cannot represent (complex128,
float8_e8m0fnu, ...) are stored as ``U8`` with a trailing dimension of the element size; the
manifest and the header's ``aiockpt.raw_dtypes`` metadata record the real dtype.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from aiockpt._format.manifest import Leaf, TensorLeaf
from aiockpt._format.tree import format_key_path
from aiockpt._wire.protocol import RankInfo
from aiockpt.writers.base import (
    FileRecord,
    FileSink,
    dtype_name,
    flatten_state_dict,
    split_leaves,
    tensor_bytes,
    tensor_for_write,
    write_objects,
)

__all__ = ["SafetensorsWriter"]

# The dtypes every safetensors release since 0.4 reads; newer releases list more in
# ``safetensors.torch._TYPES``, which is used when present.
_BASE_TYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _native_types() -> dict[torch.dtype, str]:
    try:
        from safetensors import torch as st_torch

        known: dict[str, torch.dtype] = dict(getattr(st_torch, "_TYPES", _BASE_TYPES))
    except ImportError:  # pragma: no cover - safetensors is a dependency
        known = _BASE_TYPES
    return {dtype: name for name, dtype in known.items()}


_NATIVE = _native_types()
_RESERVED_NAME = "__metadata__"


def file_names(rank_info: RankInfo) -> tuple[str, str]:
    """The tensor file and the object sidecar of one rank, Hugging Face style."""
    if rank_info.global_world_size == 1:
        return "model.safetensors", "objects.pkl"
    shard = f"{rank_info.global_rank + 1:05d}-of-{rank_info.global_world_size:05d}"
    return f"model-{shard}.safetensors", f"objects-{shard}.pkl"


class SafetensorsWriter:
    """Writes a state dict as one safetensors file per rank (see the module docstring)."""

    def __init__(self, rank_info: RankInfo | None = None, **options: Any) -> None:
        if options:
            raise TypeError(f"SafetensorsWriter got unknown options {sorted(options)}")
        self.rank_info = rank_info or RankInfo()

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord]:
        """Write ``state_dict`` into the directory ``path``.

        Raises ValueError for two tensors with the same name, TypeError for tensors that are
        not strided (sparse, quantized), OSError from the file system.
        """
        tensor_file, object_file = file_names(self.rank_info)
        _, flat = flatten_state_dict(state_dict)
        tensors, objects = split_leaves(flat)
        entries = [
            (index, format_key_path(key_path), tensor_for_write(t, format_key_path(key_path)))
            for index, key_path, t in tensors
        ]
        # Largest elements first: with the data section 8-aligned, every tensor then starts
        # at a multiple of its element size, as safetensors' own writer arranges.
        entries.sort(key=lambda e: -e[2].element_size())
        header, offsets = _header(entries)
        leaves: dict[int, Leaf] = {}
        with FileSink(path, tensor_file) as sink:
            sink.write(struct.pack("<Q", len(header)))
            sink.write(header)
            data_start = sink.offset
            data = [t for _, _, t in entries]
            # One gathered write: thousands of small tensors cost a few system calls.
            sink.write_many([tensor_bytes(t) for t in data], keep=data)
            for (index, _, t), offset in zip(entries, offsets, strict=True):
                leaves[index] = TensorLeaf(
                    tensor_file, data_start + offset, dtype_name(t.dtype), list(t.shape)
                )
            record = msgspec.structs.replace(sink.close(), leaves=leaves)
        object_record = write_objects(objects, path, object_file)
        return [record] if object_record is None else [record, object_record]


def _header(entries: Sequence[tuple[int, str, torch.Tensor]]) -> tuple[bytes, list[int]]:
    """The JSON header (space-padded so that data starts 8-aligned) and each tensor's offset
    from the start of the data section."""
    header: dict[str, Any] = {}
    raw_dtypes: dict[str, str] = {}
    offsets: list[int] = []
    position = 0
    for _, name, t in entries:
        if name in header or name == _RESERVED_NAME:
            raise ValueError(f"two leaves of the state dict are both named {name!r}")
        nbytes = t.numel() * t.element_size()
        shape = list(t.shape)
        st_dtype = _NATIVE.get(t.dtype)
        if st_dtype is None:
            st_dtype = "U8"
            shape.append(t.element_size())
            raw_dtypes[name] = dtype_name(t.dtype)
        header[name] = {
            "dtype": st_dtype,
            "shape": shape,
            "data_offsets": [position, position + nbytes],
        }
        offsets.append(position)
        position += nbytes
    metadata = {"format": "pt"}
    if raw_dtypes:
        metadata["aiockpt.raw_dtypes"] = json.dumps(raw_dtypes)
    # ensure_ascii: keys may hold any character (NUL included); escapes keep it valid JSON.
    text = json.dumps({_RESERVED_NAME: metadata, **header}, separators=(",", ":"))
    encoded = text.encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    return encoded, offsets
