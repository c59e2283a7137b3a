"""The safetensors writer: Hugging Face's layout, which inference engines and ``transformers``
load.

A checkpoint is one ``model.safetensors`` when every tensor fits in ``max_shard_size`` (default
``"5GB"``, as ``transformers``' ``save_pretrained``), else ``model-00001-of-0000N.safetensors``
... plus ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``, tensor
name -> file). Tensors are put in files in state-dict order, a new file begun whenever the next
tensor would take the current one past ``max_shard_size`` (a tensor larger than that gets a
file of its own), exactly as ``huggingface_hub.split_torch_state_dict_into_shards`` does. Each
file is byte for byte what ``safetensors.torch.save_file`` would accept and
``safetensors.torch.load_file`` reads, but written straight from tensor memory: the header is
built from shapes and dtypes alone, then each tensor's bytes go to the file without an
intermediate ``bytes`` object.

Several ranks write one checkpoint together (the ``GroupWriter`` steps): rank 0 lays out the
files from every rank's plan, and every tensor is written exactly once. A tensor under the same
name on several ranks is taken to be replicated (as in ``torch.distributed.checkpoint``) and
written by one of them; a DTensor is written whole, each distinct piece by one rank that holds
it, straight into its place in the whole tensor's bytes (no gather, no collective). Each
rank's manifest entry for a piece says which piece of the whole it is and where its bytes
lie among the whole's: one run for a row piece, strided for a column piece
(``TensorLeaf.strides``), so that a rank resumes its own piece. A file that one rank writes
alone is written front to back and hashed on the way; a file that several ranks write pieces
into is hashed by rank 0 at commit. The index is written at commit, by rank 0.

Tensors are named by their key path (``"model.layers.0.weight"``); two leaves with the same
name (``{"a.b": x, "a": {"b": y}}``) raise ValueError, as ``torch.distributed.checkpoint`` does.
Names live inside the files, so hostile keys cannot reach the file system. Non-tensor leaves
are kept by the manifest (plain values) or pickled into a sidecar ``objects.pkl`` (only when
the caller opted into pickling). Dtypes the installed safetensors cannot represent (complex128,
float8_e8m0fnu, ...) are stored as ``U8`` with a trailing dimension of the element size; the
manifest and the header's ``aiockpt.raw_dtypes`` metadata record the real dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from aiockpt._format.manifest import Leaf, TensorLeaf, check_relative_name
from aiockpt._format.tree import KeyPath, format_key_path
from aiockpt._wire.protocol import RankInfo, ShardSpec
from aiockpt._wire.tensors import dtype_from_name, dtype_name
from aiockpt.writers.base import (
    FileRecord,
    FileSink,
    StagedStateDict,
    WriterPart,
    flatten_state_dict,
    report_bytes_written,
    staged_layout,
    tensor_bytes,
    write_objects,
)
from aiockpt.writers.tensor_leaves import split_leaves, tensor_for_write

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "SafetensorsWriter",
    "parse_shard_size",
]

#: as ``transformers``' ``save_pretrained``: 5 * 10**9 bytes
DEFAULT_MAX_SHARD_SIZE = "5GB"
#: the one file of a checkpoint that fits in one shard
SINGLE_FILE_NAME = "model.safetensors"
#: Hugging Face's index of a checkpoint in several files
INDEX_NAME = "model.safetensors.index.json"

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

# Units as Hugging Face writes sizes: decimal "GB", binary "GiB".
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*")


def parse_shard_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string as Hugging Face writes sizes (``"5GB"`` is
    5 * 10**9, ``"500MiB"`` is 500 * 2**20, ``"100KB"``; the unit is case-insensitive).

    Raises ValueError for a string in no such form, and for a size below one byte; TypeError
    for anything but an int or a str.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"max_shard_size must be an int or a str like '5GB', got {size!r}")
    if isinstance(size, str):
        match = _SIZE.fullmatch(size)
        unit = match[2].upper() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"max_shard_size {size!r} is not a size such as '5GB', '500MB' or '2GiB'"
            )
        size = int(float(match[1]) * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size}")
    return size


def file_names(count: int) -> list[str]:
    """The names of a checkpoint's ``count`` tensor files, Hugging Face style."""
    if count == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def object_file_name(rank_info: RankInfo) -> str:
    """The pickle sidecar of one rank (only written when it has objects to pickle)."""
    if rank_info.global_world_size == 1:
        return "objects.pkl"
    return f"objects-{rank_info.global_rank + 1:05d}-of-{rank_info.global_world_size:05d}.pkl"


# --- what crosses between ranks (msgpack through the workers' store) --------------------------


class PlannedTensor(msgspec.Struct, frozen=True, array_like=True):
    """A tensor leaf of one rank: a whole tensor, or (``global_shape``) a rank's piece of a
    sharded one, ``offsets`` telling where it lies in the whole."""

    name: str
    dtype: str
    shape: list[int]
    global_shape: list[int] | None = None
    offsets: list[int] | None = None


class SafetensorsPlan(msgspec.Struct, frozen=True):
    """One rank's tensor leaves, in ``flatten_state_dict`` order."""

    tensors: list[PlannedTensor]


class OwnedFile(msgspec.Struct, frozen=True, array_like=True):
    """A file one rank writes alone, front to back: the header, then whole tensors (their
    positions in the rank's plan) in file order."""

    name: str
    header: bytes
    tensors: list[int]


class SharedFile(msgspec.Struct, frozen=True, array_like=True):
    """One rank's share of a file several ranks write at fixed offsets: the header (the
    rank that owns the file) and byte runs ``[plan position, offset in the tensor, offset in
    the file, length]``."""

    name: str
    size: int
    header: bytes | None
    runs: list[list[int]]


class SafetensorsAssignment(msgspec.Struct, frozen=True):
    """What one rank writes, and where every one of its tensor leaves ends up (plan
    position -> location, in whichever rank's file)."""

    owned: list[OwnedFile]
    shared: list[SharedFile]
    leaves: dict[int, TensorLeaf]


# --- the layout, from every rank's plan --------------------------------------------------------


@dataclass
class _Piece:
    shape: list[int]
    offsets: list[int]
    #: (rank, plan position) of every rank holding this piece
    holders: list[tuple[int, int]] = field(default_factory=list)

    def nbytes(self, whole: _Whole) -> int:
        return math.prod(self.shape) * whole.dtype.itemsize


@dataclass
class _Whole:
    name: str
    dtype: torch.dtype
    shape: list[int]
    sharded: bool
    pieces: dict[tuple[int, ...], _Piece] = field(default_factory=dict)
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Layout:
    """Every rank's assignment, and what the index needs."""

    assignments: list[SafetensorsAssignment]
    files: list[str]
    weight_map: dict[str, str]
    total_size: int


def _wholes(plans: Sequence[SafetensorsPlan]) -> list[_Whole]:
    """The distinct tensors of all ranks, rank 0's first, each in its rank's order; raises
    ValueError where ranks disagree about a name or pieces do not make up their whole."""
    wholes: dict[str, _Whole] = {}
    for rank, plan in enumerate(plans):
        for position, tensor in enumerate(plan.tensors):
            shape = tensor.global_shape if tensor.global_shape is not None else tensor.shape
            dtype = dtype_from_name(tensor.dtype)
            whole = wholes.get(tensor.name)
            if whole is None:
                whole = _Whole(tensor.name, dtype, shape, tensor.global_shape is not None)
                wholes[tensor.name] = whole
            elif (whole.dtype, whole.shape, whole.sharded) != (
                dtype,
                shape,
                tensor.global_shape is not None,
            ):
                kind = "a piece of a sharded tensor" if tensor.global_shape else "a tensor"
                raise ValueError(
                    f"{tensor.name!r} is {kind} of {dtype} {shape} on rank {rank}, but of "
                    f"{whole.dtype} {whole.shape} on an earlier rank: a name must stand for one "
                    "tensor on every rank (replicated, or pieces of one DTensor)"
                )
            offsets = tensor.offsets if tensor.offsets is not None else [0] * len(shape)
            piece = whole.pieces.setdefault(tuple(offsets), _Piece(tensor.shape, offsets))
            if piece.shape != tensor.shape:
                raise ValueError(
                    f"{tensor.name!r}: ranks hold pieces of different shapes at {offsets}"
                )
            piece.holders.append((rank, position))
    for whole in wholes.values():
        covered = sum(math.prod(piece.shape) for piece in whole.pieces.values())
        if covered != math.prod(whole.shape):
            raise ValueError(
                f"{whole.name!r}: the ranks' pieces cover {covered} of the "
                f"{math.prod(whole.shape)} elements of its whole {whole.shape}"
            )
    return list(wholes.values())


def _shards(wholes: Sequence[_Whole], max_shard_size: int) -> list[list[_Whole]]:
    """Tensors into files as ``huggingface_hub.split_torch_state_dict_into_shards`` does."""
    shards: list[list[_Whole]] = []
    current: list[_Whole] = []
    current_size = 0
    for whole in wholes:
        if whole.nbytes > max_shard_size:
            shards.append([whole])
            continue
        if current and current_size + whole.nbytes > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(whole)
        current_size += whole.nbytes
    if current or not shards:  # no tensor at all: still one (empty) file
        shards.append(current)
    return shards


def _byte_runs(piece: _Piece, whole_shape: list[int], itemsize: int) -> Iterator[list[int]]:
    """``[offset in the piece, offset in the whole, length]`` of each contiguous run of the
    piece's bytes inside the whole tensor's bytes (row-major), in order."""
    if math.prod(piece.shape) == 0:
        return
    ndim = len(whole_shape)
    if ndim == 0:
        yield [0, 0, itemsize]
        return
    inner = _inner_dimension(piece.shape, whole_shape)
    whole_strides = [math.prod(whole_shape[d + 1 :]) for d in range(ndim)]
    piece_strides = [math.prod(piece.shape[d + 1 :]) for d in range(ndim)]
    run = piece.shape[inner] * piece_strides[inner] * itemsize
    outer = [range(size) for size in piece.shape[:inner]]
    base = sum(o * s for o, s in zip(piece.offsets, whole_strides, strict=True))
    for index in _product(outer):
        source = sum(i * s for i, s in zip(index, piece_strides, strict=False))
        target = base + sum(i * s for i, s in zip(index, whole_strides, strict=False))
        yield [source * itemsize, target * itemsize, run]


def _inner_dimension(piece_shape: Sequence[int], whole_shape: Sequence[int]) -> int:
    """The last dimension in which a piece is narrower than its whole (0 if none): it spans
    every later one in full, so it lies in the whole's bytes as one contiguous run per index
    of the dimensions before this one."""
    inner = len(whole_shape) - 1
    while inner > 0 and piece_shape[inner] == whole_shape[inner]:
        inner -= 1
    return inner


def _lies_contiguous(piece: _Piece, whole_shape: Sequence[int]) -> bool:
    """Whether the piece's bytes are one run in the whole's (a row piece: yes; a column
    piece of more than one row: no)."""
    if not whole_shape or math.prod(piece.shape) == 0:
        return True
    return math.prod(piece.shape[: _inner_dimension(piece.shape, whole_shape)]) == 1


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for first in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (first, *rest)


def _header_entry(whole: _Whole, start: int) -> tuple[dict[str, Any], str | None]:
    """The header entry of ``whole`` at ``start`` in the data section, and its real dtype
    when safetensors has no name for it (stored as U8 then)."""
    shape = list(whole.shape)
    st_dtype = _NATIVE.get(whole.dtype)
    raw = None
    if st_dtype is None:
        st_dtype = "U8"
        shape.append(whole.dtype.itemsize)
        raw = dtype_name(whole.dtype)
    return {"dtype": st_dtype, "shape": shape, "data_offsets": [start, start + whole.nbytes]}, raw


def _header(wholes: Sequence[_Whole]) -> tuple[bytes, list[int]]:
    """The header of a file of ``wholes`` (in that order; space-padded so that data starts
    8-aligned) and each tensor's offset from the start of the data section."""
    header: dict[str, Any] = {}
    raw_dtypes: dict[str, str] = {}
    offsets: list[int] = []
    position = 0
    for whole in wholes:
        if whole.name == _RESERVED_NAME:
            raise ValueError(f"a tensor cannot be named {_RESERVED_NAME!r} in safetensors")
        header[whole.name], raw = _header_entry(whole, position)
        if raw is not None:
            raw_dtypes[whole.name] = raw
        offsets.append(position)
        position += whole.nbytes
    metadata = {"format": "pt"}
    if raw_dtypes:
        metadata["aiockpt.raw_dtypes"] = json.dumps(raw_dtypes)
    # ensure_ascii: keys may hold any character (NUL included); escapes keep it valid JSON.
    text = json.dumps({_RESERVED_NAME: metadata, **header}, separators=(",", ":"))
    encoded = text.encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, offsets


def lay_out(plans: Sequence[SafetensorsPlan], max_shard_size: int) -> _Layout:
    """Files, headers and every rank's share of the writing, from every rank's plan.

    Raises ValueError where ranks disagree about a tensor (see ``_wholes``).
    """
    world = len(plans)
    shards = _shards(_wholes(plans), max_shard_size)
    names = file_names(len(shards))
    owned: list[list[OwnedFile]] = [[] for _ in range(world)]
    shared: list[list[SharedFile]] = [[] for _ in range(world)]
    leaves: list[dict[int, TensorLeaf]] = [{} for _ in range(world)]
    load = [0] * world  # bytes each rank writes so far
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        # Largest elements first: with the data section 8-aligned, every tensor then starts
        # at a multiple of its element size, as safetensors' own writer arranges.
        shard = sorted(shard, key=lambda w: -w.dtype.itemsize)
        header, starts = _header(shard)
        owner = min(range(world), key=lambda r: load[r])
        # (data offset, whole, piece, writing rank, its plan position) of every piece
        placed: list[tuple[int, _Whole, _Piece, int, int]] = []
        alone = True
        for whole, start in zip(shard, starts, strict=True):
            weight_map[whole.name] = name
            data = len(header) + start
            located = _locate(whole, name, data)
            for piece in whole.pieces.values():
                holders = piece.holders
                writer = owner
                if not any(rank == owner for rank, _ in holders):
                    writer = min((rank for rank, _ in holders), key=lambda r: load[r])
                position = next(p for r, p in holders if r == writer)
                load[writer] += whole.nbytes if not whole.sharded else piece.nbytes(whole)
                alone = alone and writer == owner and not whole.sharded
                placed.append((data, whole, piece, writer, position))
                for rank, position in holders:
                    leaves[rank][position] = located(piece)
        if alone:  # written front to back by its owner: no runs needed
            owned[owner].append(OwnedFile(name, header, [entry[4] for entry in placed]))
            continue
        runs: list[list[list[int]]] = [[] for _ in range(world)]
        for data, whole, piece, writer, position in placed:
            for source, target, length in _byte_runs(piece, whole.shape, whole.dtype.itemsize):
                runs[writer].append([position, source, data + target, length])
        size = len(header) + sum(whole.nbytes for whole in shard)
        for rank in range(world):
            if rank == owner or runs[rank]:
                own_header = header if rank == owner else None
                shared[rank].append(SharedFile(name, size, own_header, runs[rank]))
    assignments = [SafetensorsAssignment(owned[r], shared[r], leaves[r]) for r in range(world)]
    total_size = sum(whole.nbytes for shard in shards for whole in shard)
    return _Layout(assignments, names, weight_map, total_size)


def _locate(whole: _Whole, file: str, data: int) -> Any:
    """A function from a piece of ``whole`` (at ``data`` in ``file``) to its manifest leaf:
    where the piece's own bytes lie inside the whole's, and which piece of the whole it is
    (as DCP's metadata records a chunk), so that a rank resuming at the same world size reads
    its own piece. A piece that is not one run of the whole's bytes (a column piece) is
    recorded with the whole's strides, from its first element on."""
    dtype = dtype_name(whole.dtype)
    if not whole.sharded:
        return lambda piece: TensorLeaf(file, data, dtype, list(whole.shape))
    itemsize = whole.dtype.itemsize
    strides = [math.prod(whole.shape[d + 1 :]) for d in range(len(whole.shape))]

    def piece_leaf(piece: _Piece) -> TensorLeaf:
        first = sum(o * s for o, s in zip(piece.offsets, strides, strict=True))
        if math.prod(piece.shape) == 0:
            first = 0  # (an empty piece may sit at the whole's end: nothing to read)
        return TensorLeaf(
            file,
            data + first * itemsize,
            dtype,
            list(piece.shape),
            list(whole.shape),
            list(piece.offsets),
            None if _lies_contiguous(piece, whole.shape) else list(strides),
        )

    return piece_leaf


# --- the writer ---------------------------------------------------------------------------------


class SafetensorsWriter:
    """Writes a state dict in Hugging Face's safetensors layout (see the module docstring).

    ``max_shard_size``: the most bytes of tensors in one file, an int or a string such as
    ``"5GB"`` or ``"500MiB"`` (see ``parse_shard_size``, which says what it raises).
    """

    #: files this rank owns are written from the arena range by range as each is staged
    WRITES_WHILE_STAGING = True

    def __init__(
        self,
        rank_info: RankInfo | None = None,
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        **options: Any,
    ) -> None:
        if options:
            raise TypeError(f"SafetensorsWriter got unknown options {sorted(options)}")
        self.rank_info = rank_info or RankInfo()
        self.max_shard_size = parse_shard_size(max_shard_size)
        #: rank 0, between ``assign`` and ``finish``: the layout the index describes
        self._layout: _Layout | None = None
        #: the tensor names ``plan`` made, for this save's writes (made once: thousands of
        #: key paths joined twice cost as much as writing small tensors)
        self._names: list[str] = []
        #: (layout version, layout, names) of the worker's last single-rank save: a save of
        #: the same structure reuses them, as the DCP writer reuses its plan
        self._cached: tuple[int, _Layout, list[str]] | None = None
        #: the owned files of the last staged layout, as arena ranges
        self._staged: _StagedFiles | None = None

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord]:
        """Write ``state_dict``, alone, into the directory ``path``: the files and, when
        there are several, the index.

        Raises ValueError for two tensors with the same name, TypeError for tensors that are
        not strided (sparse, quantized), OSError from the file system.
        """
        staged = staged_layout(state_dict)
        cached = self._cached
        if staged is not None and cached is not None and cached[0] == staged.version:
            layout, self._names = cached[1], cached[2]
        else:
            layout = lay_out([self.plan(state_dict, {})], self.max_shard_size)
            if staged is not None:
                self._cached = (staged.version, layout, self._names)
        (assignment,) = layout.assignments
        written = self._write_assignment(state_dict, path, assignment)
        by_file = written.located_by_file()
        records = [
            msgspec.structs.replace(r, leaves={**r.leaves, **by_file.get(r.name, {})})
            for r in written.records
        ]
        return records + _write_index(path, layout)

    def plan(self, state_dict: Any, shards: Mapping[int, ShardSpec]) -> SafetensorsPlan:
        """This rank's tensors, named, with where each DTensor piece lies in its whole.

        Raises ValueError for two tensors with the same name.
        """
        _, flat = flatten_state_dict(state_dict)
        tensors, _ = split_leaves(flat)
        planned: list[PlannedTensor] = []
        seen: set[str] = set()
        for index, key_path, tensor in tensors:
            name = format_key_path(key_path)
            if name in seen:
                raise ValueError(f"two leaves of the state dict are both named {name!r}")
            seen.add(name)
            spec = shards.get(index)
            planned.append(
                PlannedTensor(
                    name,
                    dtype_name(tensor.dtype),
                    list(tensor.shape),
                    None if spec is None else list(spec.global_shape),
                    None if spec is None else list(spec.offsets),
                )
            )
        self._names = [tensor.name for tensor in planned]
        return SafetensorsPlan(planned)

    def assign(self, plans: Sequence[Any]) -> list[SafetensorsAssignment]:
        """Rank 0: what every rank writes (see ``lay_out``, which says what it raises)."""
        decoded = [msgspec.convert(plan, SafetensorsPlan) for plan in plans]
        self._layout = lay_out(decoded, self.max_shard_size)
        return self._layout.assignments

    def write_part(self, state_dict: Any, path: str, assignment: Any) -> WriterPart:
        """Write this rank's share into the directory every rank shares. Files this rank
        wrote alone are reported; files several ranks wrote into are left for rank 0's
        commit to hash. Every tensor leaf's location is exported, and imported by its own
        leaf, so that the manifest points at whichever rank's file holds it."""
        assignment = msgspec.convert(assignment, SafetensorsAssignment)
        written = self._write_assignment(state_dict, path, assignment)
        rank = self.rank_info.global_rank
        exports: dict[str, Leaf] = {}
        imports: dict[int, str] = {}
        for index, leaf in written.located.items():
            key = f"{rank}/{index}"
            exports[key] = leaf
            imports[index] = key
        return WriterPart(written.records, exports, imports)

    def finish(self, path: str, parts: Sequence[WriterPart]) -> list[FileRecord]:
        """Rank 0, every part in: the index, when the checkpoint has several files."""
        layout, self._layout = self._layout, None
        assert layout is not None, "assign() first"
        return _write_index(path, layout)

    def _write_assignment(
        self, state_dict: Any, path: str, assignment: SafetensorsAssignment
    ) -> _Written:
        _, flat = flatten_state_dict(state_dict)
        staged = self._staged_files(state_dict, assignment)
        tensors: list[tuple[int, KeyPath, torch.Tensor]] = []
        if staged is not None:
            objects, indices = staged.files.objects, staged.files.indices
        else:
            tensors, object_leaves = split_leaves(flat)
            objects = [index for index, _ in object_leaves]
            indices = [index for index, _, _ in tensors]
        names = self._names

        def tensor(position: int) -> torch.Tensor:
            nonlocal names
            if not tensors:  # staged: made only for files shared with other ranks
                tensors.extend(split_leaves(flat)[0])
            if len(names) != len(tensors):  # not planned by this writer (plan() first)
                names = [format_key_path(key_path) for _, key_path, _ in tensors]
            return tensor_for_write(tensors[position][2], names[position])

        records: list[FileRecord] = []
        for number, owned in enumerate(assignment.owned):
            with FileSink(path, owned.name) as sink:
                sink.write(owned.header)
                if staged is not None:
                    staged.write_data(number, sink)
                else:
                    data = [tensor(position) for position in owned.tensors]
                    # One gathered write: thousands of small tensors cost a few system calls.
                    sink.write_many([tensor_bytes(t) for t in data], keep=data)
                records.append(sink.close())
        if staged is not None and (assignment.shared or objects):
            staged.wait_all()  # these read any tensor
        for share in assignment.shared:
            _write_shared(path, share, tensor)
        object_record = write_objects(
            [(index, flat[index][1]) for index in objects], path, object_file_name(self.rank_info)
        )
        if object_record is not None:
            records.append(object_record)
        if staged is not None:
            return _Written(records, staged.files.located)
        located = {indices[position]: leaf for position, leaf in assignment.leaves.items()}
        return _Written(records, located)

    def _staged_files(
        self, state_dict: Any, assignment: SafetensorsAssignment
    ) -> _StagedWrite | None:
        """How the files this rank owns are laid out in the arena of a state dict the
        worker staged, worked out once per layout and assignment; None for any other state
        dict, or a layout with a tensor outside the arena (inline)."""
        layout = staged_layout(state_dict)
        if layout is None:
            return None
        assert isinstance(state_dict, StagedStateDict)
        kept = self._staged
        if kept is None or kept.version != layout.version or kept.assignment != assignment:
            kept = self._staged = _StagedFiles.lay_out(state_dict, assignment)
        if kept.runs is None:
            if state_dict.wait_staged is not None:
                state_dict.wait_staged(None)  # written tensor by tensor: all must be staged
            return None
        return _StagedWrite(kept, state_dict)


@dataclass
class _StagedFiles:
    """The data sections of a rank's owned files as byte ranges of the arena, tensors that
    lie next to each other there merged into one range: staged in state-dict order, the
    tensors of one dtype are one range, written with one hash update and as few system calls
    as its size needs. Worked out once per layout and assignment."""

    version: int
    assignment: SafetensorsAssignment
    #: per owned file, its data section as ``(start, stop)`` ranges of the arena; None when
    #: some tensor does not lie in the arena
    runs: list[list[tuple[int, int]]] | None
    #: the tensor leaves' indices in plan order, and the other non-plain leaves'
    indices: list[int]
    objects: list[int]
    #: leaf index -> where its bytes lie
    located: dict[int, TensorLeaf]

    @classmethod
    def lay_out(
        cls, state_dict: StagedStateDict, assignment: SafetensorsAssignment
    ) -> _StagedFiles:
        layout = state_dict.layout
        tensors, objects = split_leaves(state_dict.flat_leaves())
        indices = [index for index, _, _ in tensors]
        runs: list[list[tuple[int, int]]] | None = []
        for owned in assignment.owned:
            ranges: list[tuple[int, int]] = []
            for position in owned.tensors:
                region = layout.regions.get(indices[position])
                if region is None:  # an inline tensor (an ad-hoc write's)
                    runs = None
                    break
                start, size = region
                if not size:
                    continue
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], start + size)
                else:
                    ranges.append((start, start + size))
            if runs is None:
                break
            runs.append(ranges)
        located = {indices[position]: leaf for position, leaf in assignment.leaves.items()}
        return cls(layout.version, assignment, runs, indices, [i for i, _ in objects], located)


class _StagedWrite:
    """One write of a staged layout's owned files, each range as soon as it is staged."""

    def __init__(self, files: _StagedFiles, state_dict: StagedStateDict) -> None:
        assert files.runs is not None
        self.files = files
        self._runs = files.runs
        self._arena = state_dict.arena
        self._wait = state_dict.wait_staged
        #: the arena bytes below this are staged
        self._staged = 0.0 if self._wait is not None else math.inf

    def write_data(self, number: int, sink: FileSink) -> None:
        """Write owned file ``number``'s data section: of a range that is staged only in
        part (it may span the trainer's chunks), what is staged, then the rest as it is."""
        for start, stop in self._runs[number]:
            while start < stop:
                if start >= self._staged:
                    assert self._wait is not None
                    self._staged = self._wait(start + 1)
                end = stop if self._staged >= stop else int(self._staged)
                sink.write(self._arena[start:end])
                start = end

    def wait_all(self) -> None:
        if self._wait is not None and self._staged != math.inf:
            self._staged = self._wait(None)


@dataclass
class _Written:
    records: list[FileRecord]
    #: leaf index -> where its bytes lie
    located: dict[int, TensorLeaf]

    def located_by_file(self) -> dict[str, dict[int, Leaf]]:
        by_file: dict[str, dict[int, Leaf]] = {}
        for index, leaf in self.located.items():
            by_file.setdefault(leaf.file, {})[index] = leaf
        return by_file


def _write_shared(directory: str, share: SharedFile, tensor: Any) -> None:
    """Write this rank's runs (and the header, for the file's owner) into a file several
    ranks write, at fixed offsets, and fsync it. The file is created by whichever rank comes
    first, never through a link (the directory is the save's own, owner-only)."""
    check_relative_name(share.name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(os.path.join(directory, share.name), flags, 0o600)
    try:
        os.ftruncate(fd, share.size)  # every writer sets the same final size
        if share.header is not None:
            _pwrite_all(fd, memoryview(share.header), 0)
        held: dict[int, tuple[torch.Tensor, memoryview]] = {}
        for position, source, target, length in share.runs:
            if position not in held:
                value = tensor(position)
                held[position] = (value, tensor_bytes(value))
            _pwrite_all(fd, held[position][1][source : source + length], target)
        os.fsync(fd)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.path.join(directory, share.name)
        raise
    finally:
        os.close(fd)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        count = os.pwrite(fd, view, offset)
        report_bytes_written(count)
        view = view[count:]
        offset += count


def _write_index(directory: str, layout: _Layout) -> list[FileRecord]:
    """``model.safetensors.index.json`` as ``transformers`` writes it, for several files."""
    if len(layout.files) < 2:
        return []
    index = {"metadata": {"total_size": layout.total_size}, "weight_map": layout.weight_map}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    with FileSink(directory, INDEX_NAME) as sink:
        sink.write(text.encode())
        return [sink.close()]
