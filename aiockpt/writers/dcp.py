"""The DCP writer: a directory ``torch.distributed.checkpoint.load`` reads, written fast.

``dcp.save`` with ``FileSystemWriter`` serializes each tensor with ``torch.save`` into a
Python stream, which copies every tensor into a ``bytes`` object on the way and CRC32s it. This
writer produces the same layout without either:

* the plan, the flattening of nested state dicts and the ``Metadata`` come from torch's own
  ``DefaultSavePlanner``, so FQNs, ``planner_data`` and chunk metadata are exactly what
  ``dcp.load`` expects;
* each tensor item is a complete ``torch.save`` zip archive in the rank's ``.distcp`` file, as
  ``FileSystemReader`` needs (it calls ``torch.load(weights_only=True)`` on each slice): the
  pickle and small records come from torch's own ``torch.serialization._save``, run on a
  surrogate tensor that aliases the real one's memory; the zip framing is built here, and the
  tensor's bytes are written straight from its memory, 64-byte aligned. Like
  ``torch.serialization.set_crc32_options(False)``, the zip CRC fields are 0; ``torch.load``
  does not check them (integrity is the manifest's xxh3_64);
* non-tensor items are what the planner makes of them (``torch.save`` of the object), as in
  ``dcp.save``; ``.metadata`` is a pickle of torch's ``Metadata``, as in ``dcp.save``.

The manifest's tensor index points at the raw bytes inside each archive, so ``aiockpt.load``
reads DCP checkpoints without unpickling ``.metadata`` or any data item. Tensors that DCP itself
pickles as part of a bigger object (tensors inside tuples, which DCP treats as opaque values)
are additionally written raw after the DCP items so that the index covers every tensor.

Several ranks write into one directory: each its own ``__<rank>_0.distcp``, rank 0 the one
``.metadata``, after planning across ranks through the worker's coordination (see
``GroupWriter`` in ``aiockpt.writers.base`` and ``aiockpt._wire.coordination``).
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import torch
import torch.serialization
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from aiockpt._format.manifest import Leaf, TensorLeaf
from aiockpt._format.tree import KeyPath, format_key_path
from aiockpt._wire.protocol import RankInfo, ShardSpec
from aiockpt._wire.tensors import dtype_from_name, dtype_name
from aiockpt.writers.base import (
    CHUNK_BYTES,
    FileRecord,
    FileSink,
    StagedLayout,
    StagedStateDict,
    WriterPart,
    flatten_state_dict,
    staged_layout,
    tensor_bytes,
    write_objects,
)
from aiockpt.writers.tensor_leaves import split_leaves, tensor_for_write

__all__ = ["DcpPlan", "DcpWriter", "PlannedItem", "torch_save_framing"]

_ALIGN = 64
#: tensors smaller than this are written in runs copied into one buffer (``_blocks``): below
#: it, a copy costs less than the per-part Python (a hash update, an iovec) it saves
_SMALL_TENSOR_BYTES = 16 << 10
_U32_MAX = 0xFFFFFFFF
_I32_MAX = 0x7FFFFFFF
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_EXTRA_ID = 0x0001
# miniz (torch's zip library) pads with an extra field of this id; readers skip unknown ids.
_PADDING_EXTRA_ID = 0x4246
_DOS_DATE_1980 = 0x21
# torch.save's archive layout: small records first, the storage last (the storage record is
# named "data/0" for a single tensor), "version" as torch's zip writer adds it.
_ARCHIVE = "archive/"
_VERSION_RECORD = ("version", b"3\n")


class PlannedItem(msgspec.Struct, frozen=True, array_like=True):
    """A DCP ``WriteItem`` as it crosses between ranks (msgpack, no pickle)."""

    fqn: str
    offset: list[int] | None
    kind: int
    chunk_offsets: list[int] | None = None
    chunk_sizes: list[int] | None = None
    dtype: str | None = None
    size: list[int] | None = None


class DcpPlan(msgspec.Struct, frozen=True):
    """One rank's local plan: its items and DCP's FQN -> key path mappings."""

    items: list[PlannedItem]
    mappings: dict[str, list[str | int]]


#: (fqn, offset or None, file, offset in the file, length): one entry of DCP storage_data
_StorageEntry = tuple[str, list[int] | None, str, int, int]


class DcpWriter:
    """Writes a dict state dict in the layout of ``torch.distributed.checkpoint.save``.

    Single rank: ``write``. Several ranks sharing one directory: the ``GroupWriter`` steps,
    where rank 0 deduplicates the ranks' plans with DCP's own planner (a replicated tensor is
    written by one rank) and writes the one ``.metadata`` that describes every rank's items,
    so that ``dcp.load`` reshards the checkpoint into any world size.
    """

    #: writes each arena region as soon as it is staged (``StagedStateDict.wait_staged``)
    WRITES_WHILE_STAGING = True

    def __init__(self, rank_info: RankInfo | None = None, **options: Any) -> None:
        if options:
            raise TypeError(f"DcpWriter got unknown options {sorted(options)}")
        self.rank_info = rank_info or RankInfo()
        # One save at a time (the worker serializes them): planning state between the steps.
        self._planner: DefaultSavePlanner | None = None
        self._items: list[WriteItem] = []
        self._metadata: Metadata | None = None
        #: what a single-rank save of the worker's current layout reuses
        self._cached: _CachedSave | None = None

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord]:
        """Write ``state_dict`` into the directory ``path``.

        A state dict the worker staged (``StagedStateDict``) of the same layout as the last
        one reuses everything planned for it: DCP's plan, the file's layout (one gathered
        write of all tensors with their framing) and ``.metadata`` (its pickle patched
        where values change), as ``dcp.save`` reuses plans with ``cache_staged_state_dict``.

        Raises TypeError if ``state_dict`` is not a dict (DCP's rule) or holds non-strided
        tensors, ValueError for two leaves with the same DCP name, OSError from the file system.
        """
        layout = staged_layout(state_dict)
        cached = self._cached
        flat = flatten_state_dict(state_dict)[1]  # once for planning and writing
        if cached is None or layout is None or cached.version != layout.version:
            # One rank: its plan goes straight to the global step, no encoding on the way.
            (assignment,) = self._assign([self._plan(state_dict, {}, flat)])
            assert self._metadata is not None
            program = self._program(state_dict, assignment, flat)
            cached = _CachedSave(
                layout.version if layout is not None else None,
                program,
                _MetadataTemplate(self._metadata, program),
            )
            self._planner, self._items, self._metadata = None, [], None
            self._cached = cached if layout is not None else None
        part = cached.program.run(state_dict, path, flat)
        with FileSink(path, ".metadata") as sink:
            sink.write(cached.metadata.render(part.data))
            return [*part.records, sink.close()]

    def plan(self, state_dict: Any, shards: Mapping[int, ShardSpec]) -> DcpPlan:
        """This rank's items, as DCP's planner makes them; ``shards`` turn whole-tensor items
        into pieces of a bigger tensor (DTensor shards, staged as their local tensor)."""
        local_plan = self._plan(state_dict, shards, flatten_state_dict(state_dict)[1])
        mappings = local_plan.planner_data or {}
        return DcpPlan(
            [_encode_item(item) for item in local_plan.items],
            {k: list(v) for k, v in mappings.items()},
        )

    def _plan(
        self,
        state_dict: Any,
        shards: Mapping[int, ShardSpec],
        flat: Sequence[tuple[KeyPath, Any]],
    ) -> SavePlan:
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"format='dcp' needs a dict at the top of the state dict, got "
                f"{type(state_dict).__name__}"
            )
        planner = DefaultSavePlanner()
        planner.set_up_planner(
            state_dict, storage_meta=None, is_coordinator=self.rank_info.global_rank == 0
        )
        local_plan = planner.create_local_plan()
        shard_of = {id(flat[index][1]): spec for index, spec in shards.items()}
        items = []
        for item in local_plan.items:
            spec = shard_of.get(id(planner.state_dict[item.index.fqn]))
            items.append(item if spec is None else _shard_item(item, spec))
        self._planner, self._items = planner, items
        return dataclasses.replace(local_plan, items=items)

    def assign(self, plans: Sequence[Any]) -> list[list[int]]:
        """Rank 0: for every rank, the positions in its plan of the items it writes."""
        all_plans = []
        for plan in plans:
            plan = msgspec.convert(plan, DcpPlan)
            all_plans.append(
                SavePlan(
                    [_decode_item(item) for item in plan.items],
                    planner_data={fqn: tuple(path) for fqn, path in plan.mappings.items()},
                )
            )
        return self._assign(all_plans)

    def _assign(self, all_plans: list[SavePlan]) -> list[list[int]]:
        assert self._planner is not None, "plan() first"
        global_plans, self._metadata = self._planner.create_global_plan(all_plans)
        assignments = []
        for local, kept in zip(all_plans, global_plans, strict=True):
            written = {item.index for item in kept.items}
            assignments.append([i for i, item in enumerate(local.items) if item.index in written])
        return assignments

    def write_part(self, state_dict: Any, path: str, assignment: Any) -> WriterPart:
        """Write the items ``assignment`` gives this rank, and raw copies of tensors that DCP
        pickles inside other objects; tensors another rank writes become imports."""
        flat = flatten_state_dict(state_dict)[1]
        return self._program(state_dict, assignment, flat).run(state_dict, path, flat)

    def _program(
        self, state_dict: Any, assignment: Any, flat: Sequence[tuple[KeyPath, Any]]
    ) -> _FileProgram:
        """How this rank's ``.distcp`` file is laid out, from the plan: every tensor item
        (framing and bytes) at a fixed offset first, then what changes size from save to
        save (pickled objects, raw copies of tensors inside them)."""
        planner = self._planner
        assert planner is not None, "plan() first"
        positions = msgspec.convert(assignment, list[int])
        rank = self.rank_info.global_rank
        program = _FileProgram(f"__{rank}_0.distcp", f"__{rank}_objects.pkl")
        tensors, objects = split_leaves(flat)
        program.objects = [index for index, _ in objects]
        index_of = {id(value): index for index, (_, value) in enumerate(flat)}
        # id of a planned tensor object -> the key other ranks' imports name it by.
        planned = {
            id(planner.state_dict[item.index.fqn]): _item_key(item)
            for item in self._items
            if item.type != WriteItemType.BYTE_IO
        }
        # id of a tensor object written as a DCP item -> its leaf (raw bytes in the file).
        written: dict[int, TensorLeaf] = {}
        position = 0
        literal = b""
        for item in (self._items[i] for i in positions):
            where = list(item.index.offset) if item.index.offset is not None else None
            if item.type == WriteItemType.BYTE_IO:
                path = planner.mappings.get(item.index.fqn, (item.index.fqn,))
                program.byte_items.append((item.index.fqn, where, _own_path(state_dict, path)))
                continue
            tensor = planner.state_dict[item.index.fqn]
            index = index_of.get(id(tensor))
            if index is None:  # pragma: no cover - every planned tensor is a leaf
                raise RuntimeError(f"DCP item {item.index.fqn!r} is no leaf of the state dict")
            tensor = tensor_for_write(tensor, item.index.fqn)
            nbytes = tensor.numel() * tensor.element_size()
            head, tail = torch_save_framing(tensor, zip64=nbytes >= _U32_MAX)
            pad = -position % _ALIGN
            start = position + pad
            raw = start + len(head)
            program.segments += [literal + bytes(pad) + head, index]
            literal = tail
            position = raw + nbytes + len(tail)
            entry = (item.index.fqn, where, program.data_file, start, position - start)
            program.storage.append(entry)
            leaf = _tensor_leaf(program.data_file, raw, tensor, item)
            written.setdefault(id(planner.state_dict[item.index.fqn]), leaf)
            program.exports[_item_key(item)] = leaf
        program.segments.append(literal)
        program.size = position
        for index, key_path, tensor in tensors:
            located = written.get(id(tensor))
            if located is None and id(tensor) in planned:
                program.imports[index] = planned[id(tensor)]
            elif located is None:  # inside an object DCP pickles whole: a raw copy too
                program.raw.append((index, format_key_path(key_path)))
            else:
                program.leaves[index] = located
        return program

    def finish(self, path: str, parts: Sequence[WriterPart]) -> list[FileRecord]:
        """Rank 0: write ``.metadata``, DCP's index of every rank's items."""
        assert self._metadata is not None, "assign() first"
        storage: dict[MetadataIndex, _StorageInfo] = {}
        for part in parts:
            for fqn, offset, name, start, length in msgspec.convert(part.data, list[_StorageEntry]):
                storage[MetadataIndex(fqn, offset)] = _StorageInfo(name, start, length)
        metadata = dataclasses.replace(
            self._metadata,
            storage_data=storage,
            storage_meta=StorageMeta(save_id=str(uuid.uuid4())),
            version=CURRENT_DCP_VERSION,
        )
        self._planner, self._items, self._metadata = None, [], None
        with FileSink(path, ".metadata") as sink:
            sink.write(pickle.dumps(metadata))
            return [sink.close()]


class _FileProgram:
    """One rank's ``.distcp`` file as laid out from a plan (see ``DcpWriter._program``);
    ``run`` writes it for a state dict of that layout."""

    def __init__(self, data_file: str, object_file: str) -> None:
        self.data_file = data_file
        self.object_file = object_file
        #: the fixed part, in order: literal bytes (framing, padding), or the index of the
        #: leaf whose tensor bytes go there
        self.segments: list[bytes | int] = []
        #: size of the fixed part
        self.size = 0
        #: DCP storage entries of the fixed part
        self.storage: list[_StorageEntry] = []
        #: manifest leaves of the tensors in the fixed part
        self.leaves: dict[int, Leaf] = {}
        self.exports: dict[str, Leaf] = {}
        self.imports: dict[int, str] = {}
        #: (fqn, offset, path in the state dict) of the objects DCP pickles (torch.save)
        self.byte_items: list[tuple[str, list[int] | None, tuple[str | int, ...]]] = []
        #: (leaf index, key path) of tensors inside such objects: written raw after them
        self.raw: list[tuple[int, str]] = []
        #: leaf indices of the objects pickled into the sidecar (allow_pickle)
        self.objects: list[int] = []
        #: (layout version, ``_blocks``) of the last staged layout written
        self._blocks_of: tuple[int, list[_RegionBlock]] | None = None

    def run(self, state_dict: Any, path: str, flat: Sequence[tuple[KeyPath, Any]]) -> WriterPart:
        """Write the file for ``state_dict`` (of the layout this program was made for), whose
        ``flatten_state_dict`` leaves are ``flat``; ``WriterPart.data`` is its storage
        entries, the fixed ones first."""
        keep: list[torch.Tensor] = []
        parts: list[bytes | memoryview] = []
        staged = type(state_dict) is StagedStateDict
        if not staged:
            for segment in self.segments:
                if type(segment) is int:
                    key_path, value = flat[segment]
                    tensor = tensor_for_write(value, format_key_path(key_path))
                    keep.append(tensor)
                    parts.append(tensor_bytes(tensor))
                else:
                    assert isinstance(segment, bytes)
                    parts.append(segment)
        storage = list(self.storage)
        leaves = dict(self.leaves)
        with FileSink(path, self.data_file) as sink:
            if staged:
                assert isinstance(state_dict, StagedStateDict)
                self._write_regions(state_dict, sink)
            else:
                sink.write_many(parts, keep)
            wait = state_dict.wait_staged if staged else None
            if wait is not None and (self.byte_items or self.raw or self.objects):
                wait(None)  # objects may hold arena tensors anywhere
            for fqn, where, object_path in self.byte_items:
                start = sink.align(_ALIGN)
                data = io.BytesIO()
                torch.save(_element(state_dict, object_path), data)  # as dcp.save writes it
                sink.write(data.getbuffer())
                storage.append((fqn, where, self.data_file, start, sink.offset - start))
            for index, where_key in self.raw:
                sink.align(_ALIGN)
                offset = sink.write_tensor(tensor_for_write(flat[index][1], where_key))
                leaves[index] = _tensor_leaf(self.data_file, offset, flat[index][1])
            records = [msgspec.structs.replace(sink.close(), leaves=leaves)]
        objects = [(index, flat[index][1]) for index in self.objects]
        object_record = write_objects(objects, path, self.object_file)
        if object_record is not None:
            records.append(object_record)
        return WriterPart(records, self.exports, self.imports, storage)

    def _write_regions(self, state_dict: StagedStateDict, sink: FileSink) -> None:
        """The fixed part of a worker's state dict: its tensors are regions of the arena,
        sliced from the mapping (no tensor made), in the blocks ``_blocks`` laid out once
        per layout. For a write sent while the trainer still stages, what is staged goes out
        while the rest is copied: the write waits only at a block not staged yet."""
        arena, wait = state_dict.arena, state_dict.wait_staged
        staged = 0.0 if wait is not None else math.inf
        for block in self._blocks(state_dict.layout):
            literals, regions, first = block.literals, block.regions, 0
            while block.needs > staged:
                # The staged frontier lies in this block: write what is staged of it first
                # (per region, but only here: about once per chunk the trainer stages).
                assert wait is not None
                end = first
                while end < len(regions) and regions[end].stop <= staged:
                    end += 1
                if end == len(regions):
                    break
                _write_pairs(sink, arena, literals[first:end], regions[first:end], block.joined)
                first = end
                staged = wait(regions[end].stop)
            if first:
                literals, regions = literals[first:], regions[first:]
            _write_pairs(sink, arena, literals, regions, block.joined)
        tail = self.segments[-1]
        assert isinstance(tail, bytes)
        sink.write(tail)

    def _blocks(self, layout: StagedLayout) -> list[_RegionBlock]:
        """The fixed part as blocks of ``(framing, tensor region)`` pairs for ``layout``'s
        arena regions, made once per layout so that a repeated save has no Python per
        segment: runs of tensors smaller than ``_SMALL_TENSOR_BYTES`` (copied into one
        buffer) or of bigger ones (written from the arena), each of about ``CHUNK_BYTES``.
        The segments alternate framing and leaf index and end with framing (see
        ``DcpWriter._program``)."""
        if self._blocks_of is not None and self._blocks_of[0] == layout.version:
            return self._blocks_of[1]
        blocks: list[_RegionBlock] = []
        run = _RegionBlock()
        run_bytes = 0
        segments, regions = self.segments, layout.regions
        for position in range(0, len(segments) - 1, 2):
            literal, index = segments[position], segments[position + 1]
            assert isinstance(literal, bytes) and isinstance(index, int)
            offset, size = regions[index]
            small = size < _SMALL_TENSOR_BYTES
            if run.regions and (run.joined != small or run_bytes >= CHUNK_BYTES):
                blocks.append(run)
                run, run_bytes = _RegionBlock(), 0
            run.joined = small
            run.literals.append(literal)
            run.regions.append(slice(offset, offset + size))
            run.needs = max(run.needs, offset + size)
            run_bytes += len(literal) + size
        if run.regions:
            blocks.append(run)
        self._blocks_of = (layout.version, blocks)
        return blocks


def _write_pairs(
    sink: FileSink,
    arena: memoryview,
    literals: Sequence[bytes],
    regions: Sequence[slice],
    joined: bool,
) -> None:
    """Write ``literals[i]`` then the arena bytes ``regions[i]``, for every ``i``; with
    ``joined``, copied into one buffer first: for small tensors one copy (in C, no Python
    per tensor) costs less than a hash update and an iovec per tensor and per framing."""
    if not regions:
        return
    parts: list[Any] = [None] * (2 * len(regions))
    parts[::2] = literals
    parts[1::2] = map(arena.__getitem__, regions)
    sink.write_many([b"".join(parts)] if joined else parts)


@dataclasses.dataclass
class _RegionBlock:
    """Consecutive ``(framing, tensor region)`` pairs of a ``.distcp`` file, written
    together: ``literals[i]`` then the arena bytes ``regions[i]``, for every ``i``."""

    literals: list[bytes] = dataclasses.field(default_factory=list)
    regions: list[slice] = dataclasses.field(default_factory=list)
    #: the arena bytes below this must be staged before the block is written
    needs: int = 0
    #: copied into one buffer and written as one part
    joined: bool = False


def _own_path(state_dict: Any, path: Sequence[str | int]) -> tuple[str | int, ...]:
    """DCP's object path (dict keys as it spells them: ``str(key)``) as the keys of
    ``state_dict`` itself, so that ``_element`` finds the object in later saves."""
    value, own = state_dict, []
    for part in path:
        if isinstance(value, dict) and part not in value:
            part = next(key for key in value if str(key) == part)
        own.append(part)
        value = value[part]
    return tuple(own)


def _element(state_dict: Any, path: tuple[str | int, ...]) -> Any:
    """What DCP's object path ``path`` names in ``state_dict``."""
    value = state_dict
    for key in path:
        value = value[key]
    return value


@dataclasses.dataclass(frozen=True)
class _CachedSave:
    """What a single-rank save reuses while the worker's layout is the same."""

    version: int | None
    program: _FileProgram
    metadata: _MetadataTemplate


class _MetadataTemplate:
    """``.metadata`` for one program: pickled once, with placeholders where a save's values
    go (the save id, the offsets and lengths of pickled objects), which ``render`` patches in
    place. Pickling torch's ``Metadata`` costs ~20 us per item; patching costs nothing.

    Placeholder ints are pickled as 4-byte ``BININT``s, and any value that fits one may stand
    there (pickle just chooses shorter codes for small ints when it writes them itself); a
    placeholder found other than exactly once, or a value past 2**31 - 1, makes ``render``
    pickle the whole thing instead.
    """

    _SAVE_ID = "00000000-aiockpt-save-id-placeholder"  # as long as str(uuid4())
    _FIRST = 0x7A5A0000

    def __init__(self, metadata: Metadata, program: _FileProgram) -> None:
        self._metadata = metadata
        self._static = {
            MetadataIndex(fqn, offset): _StorageInfo(name, start, length)
            for fqn, offset, name, start, length in program.storage
        }
        self._dynamic = len(program.byte_items)
        storage = dict(self._static)
        placeholders = []
        for number, (fqn, where, _) in enumerate(program.byte_items):
            start, length = self._FIRST + 2 * number, self._FIRST + 2 * number + 1
            storage[MetadataIndex(fqn, where)] = _StorageInfo(program.data_file, start, length)
            placeholders += [start, length]
        pickled = self._pickle(storage, self._SAVE_ID)
        self._template: bytes | None = pickled
        self._positions: list[int] = []
        for value in placeholders:
            code = b"J" + struct.pack("<i", value)
            if pickled.count(code) != 1:
                self._template = None
                return
            self._positions.append(pickled.index(code) + 1)
        save_id = self._SAVE_ID.encode()
        if pickled.count(save_id) != 1:
            self._template = None
        self._save_id_at = pickled.find(save_id)

    def _pickle(self, storage: dict[MetadataIndex, _StorageInfo], save_id: str) -> bytes:
        metadata = dataclasses.replace(
            self._metadata,
            storage_data=storage,
            storage_meta=StorageMeta(save_id=save_id),
            version=CURRENT_DCP_VERSION,
        )
        return pickle.dumps(metadata)

    def render(self, entries: Any) -> bytes:
        """The ``.metadata`` bytes for a save whose storage entries are ``entries`` (what
        ``_FileProgram.run`` returned, the fixed ones first)."""
        storage_entries: list[_StorageEntry] = entries
        dynamic = storage_entries[len(storage_entries) - self._dynamic :]
        values = [number for entry in dynamic for number in (entry[3], entry[4])]
        save_id = str(uuid.uuid4())
        if self._template is None or any(value > _I32_MAX for value in values):
            storage = dict(self._static)
            for fqn, where, name, start, length in dynamic:
                storage[MetadataIndex(fqn, where)] = _StorageInfo(name, start, length)
            return self._pickle(storage, save_id)
        rendered = bytearray(self._template)
        for position, value in zip(self._positions, values, strict=True):
            rendered[position : position + 4] = struct.pack("<i", value)
        rendered[self._save_id_at : self._save_id_at + len(save_id)] = save_id.encode()
        return bytes(rendered)


def _tensor_leaf(
    file: str, offset: int, tensor: torch.Tensor, item: WriteItem | None = None
) -> TensorLeaf:
    """The manifest entry of ``tensor``; a shard item's also says where it lies in the whole
    (what ``aiockpt.load`` reshards by)."""
    leaf = TensorLeaf(file, offset, dtype_name(tensor.dtype), list(tensor.shape))
    if item is None or item.type != WriteItemType.SHARD or item.tensor_data is None:
        return leaf
    data = item.tensor_data
    return msgspec.structs.replace(
        leaf, global_shape=list(data.size), global_offset=list(data.chunk.offsets)
    )


def _item_key(item: WriteItem) -> str:
    offset = item.index.offset
    return item.index.fqn if offset is None else f"{item.index.fqn}@{list(offset)}"


def _shard_item(item: WriteItem, spec: ShardSpec) -> WriteItem:
    """``item`` (a whole local tensor) as the piece of a bigger tensor that it is."""
    assert item.tensor_data is not None
    offsets = torch.Size(spec.offsets)
    return WriteItem(
        index=MetadataIndex(item.index.fqn, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=item.tensor_data.chunk.sizes),
            properties=item.tensor_data.properties,
            size=torch.Size(spec.global_shape),
        ),
    )


def _encode_item(item: WriteItem) -> PlannedItem:
    offset = list(item.index.offset) if item.index.offset is not None else None
    data = item.tensor_data
    if data is None:
        return PlannedItem(item.index.fqn, offset, item.type.value)
    return PlannedItem(
        item.index.fqn,
        offset,
        item.type.value,
        list(data.chunk.offsets),
        list(data.chunk.sizes),
        dtype_name(data.properties.dtype),
        list(data.size),
    )


def _decode_item(item: PlannedItem) -> WriteItem:
    index = MetadataIndex(item.fqn, item.offset)
    if item.chunk_offsets is None or item.chunk_sizes is None or item.dtype is None:
        return WriteItem(index=index, type=WriteItemType(item.kind))
    return WriteItem(
        index=index,
        type=WriteItemType(item.kind),
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(
                torch.Size(item.chunk_offsets), torch.Size(item.chunk_sizes)
            ),
            properties=TensorProperties(dtype=dtype_from_name(item.dtype)),
            size=torch.Size(item.size or []),
        ),
    )


def _write_torch_save(sink: FileSink, tensor: torch.Tensor) -> int:
    """Write ``tensor`` as a ``torch.save`` archive; return the offset of its raw bytes."""
    nbytes = tensor.numel() * tensor.element_size()
    head, tail = torch_save_framing(tensor, zip64=nbytes >= _U32_MAX)
    raw = sink.write(head) + len(head)
    sink.write_tensor(tensor)
    sink.write(tail)
    return raw


class _RecordCollector:
    """Stands in for torch's zip writer to learn the records ``torch.save`` would write."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None]] = []

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        # Storages (the tensor data) are recorded as None: their bytes come from the tensor.
        self.records.append((name, data if isinstance(data, bytes) else None))


# (dtype, shape, zip64) -> (head, tail): the framing depends on nothing else, and the same
# shapes come back at every save of a training run.
_framing_cache: OrderedDict[tuple[torch.dtype, tuple[int, ...], bool], tuple[bytes, bytes]] = (
    OrderedDict()
)
_FRAMING_CACHE_SIZE = 8192


def torch_save_framing(tensor: torch.Tensor, *, zip64: bool = False) -> tuple[bytes, bytes]:
    """``(head, tail)`` such that ``head + tensor bytes + tail`` is what ``torch.load`` reads
    as ``tensor`` (a torch.save zip archive with CRC fields 0, data 64-byte aligned).

    ``zip64`` forces zip64 records (needed, and chosen automatically, from 4 GiB).
    """
    key = (tensor.dtype, tuple(tensor.shape), zip64)
    framing = _framing_cache.get(key)
    if framing is None:
        framing = _framing_cache[key] = _torch_save_framing(tensor, zip64)
        if len(_framing_cache) > _FRAMING_CACHE_SIZE:
            _framing_cache.popitem(last=False)
    return framing


def _torch_save_framing(tensor: torch.Tensor, zip64: bool) -> tuple[bytes, bytes]:
    # A tensor whose storage is exactly its bytes at offset 0 (the real one may be a view into
    # a larger arena, which torch.save would write whole). It aliases the memory: no copy.
    if tensor.numel() == 0:
        surrogate = torch.empty(tensor.shape, dtype=tensor.dtype)
    else:
        flat = torch.frombuffer(tensor_bytes(tensor), dtype=torch.uint8)
        surrogate = flat.view(tensor.dtype).reshape(tensor.shape)
    collector = _RecordCollector()
    torch.serialization._save(surrogate, collector, pickle, 2, False)  # type: ignore[no-untyped-call]
    small = [(name, data) for name, data in collector.records if data is not None]
    storage_names = [name for name, data in collector.records if data is None]
    if len(storage_names) != 1:  # pragma: no cover - torch.save of one tensor has one storage
        raise RuntimeError(f"unexpected torch.save records {storage_names}")
    return _zip_framing(
        [*small, _VERSION_RECORD], storage_names[0], surrogate.untyped_storage().nbytes(), zip64
    )


def _zip_framing(
    small: list[tuple[str, bytes]], data_name: str, data_size: int, zip64: bool
) -> tuple[bytes, bytes]:
    head = bytearray()
    central = bytearray()
    entries = [(name, len(payload), payload) for name, payload in small]
    entries.append((data_name, data_size, b""))  # its bytes follow the head
    for name, size, payload in entries:
        offset = len(head)
        head += _local_header(name, size, offset, zip64)
        head += payload
        central += _central_header(name, size, offset, zip64)
    central_offset = len(head) + data_size
    return bytes(head), bytes(central) + _end_records(
        len(small) + 1, len(central), central_offset, zip64
    )


def _local_header(name: str, size: int, offset: int, zip64: bool) -> bytes:
    encoded = (_ARCHIVE + name).encode()
    big = zip64 or size >= _U32_MAX
    extra = struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, size, size) if big else b""
    pad = -(offset + _LOCAL.size + len(encoded) + len(extra)) % _ALIGN
    if pad:
        pad += _ALIGN if pad < 4 else 0  # an extra field needs 4 bytes of its own
        extra += struct.pack("<HH", _PADDING_EXTRA_ID, pad - 4) + b"Z" * (pad - 4)
    size32 = _U32_MAX if big else size
    version = 45 if big else 20
    fields = (0x04034B50, version, 0, 0, 0, _DOS_DATE_1980, 0, size32, size32)
    return _LOCAL.pack(*fields, len(encoded), len(extra)) + encoded + extra


def _central_header(name: str, size: int, offset: int, zip64: bool) -> bytes:
    encoded = (_ARCHIVE + name).encode()
    big_size = zip64 or size >= _U32_MAX
    big_offset = zip64 or offset >= _U32_MAX
    values = ([size, size] if big_size else []) + ([offset] if big_offset else [])
    extra = b""
    if values:
        extra = struct.pack(f"<HH{len(values)}Q", _ZIP64_EXTRA_ID, 8 * len(values), *values)
    version = 45 if values else 20
    size32 = _U32_MAX if big_size else size
    fields = (0x02014B50, version, version, 0, 0, 0, _DOS_DATE_1980, 0, size32, size32)
    tail = (len(encoded), len(extra), 0, 0, 0, 0, _U32_MAX if big_offset else offset)
    return _CENTRAL.pack(*fields, *tail) + encoded + extra


def _end_records(count: int, central_size: int, central_offset: int, zip64: bool) -> bytes:
    big = zip64 or central_offset >= _U32_MAX
    records = b""
    if big:
        zip64_offset = central_offset + central_size
        records += _ZIP64_EOCD.pack(
            0x06064B50, _ZIP64_EOCD.size - 12, 45, 45, 0, 0, count, count, central_size,
            central_offset,
        )  # fmt: skip
        records += _ZIP64_LOCATOR.pack(0x07064B50, 0, zip64_offset, 1)
    offset32 = _U32_MAX if big else central_offset
    return records + _EOCD.pack(0x06054B50, 0, 0, count, count, central_size, offset32, 0)
