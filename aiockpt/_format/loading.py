"""Loading checkpoints through their manifest, without unpickling. Opening a checkpoint,
checking its manifest and reading and hashing its files (and ``verify``, ``read_manifest``)
are ``aiockpt._format.reading``'s, which needs no torch; what is checked is said below.

``load`` reads every tensor from the raw bytes the manifest points at (for DCP checkpoints,
inside each ``torch.save`` archive) and plain values from the manifest itself, so neither
DCP's pickled ``.metadata`` nor any data item is ever unpickled. Only leaves the user saved as
arbitrary objects (after opting into pickling) are pickles, and ``load`` refuses them unless
the caller passes ``allow_pickle=True``.

With ``verify=True`` every file the manifest names is read once, front to back: a large
tensor's bytes land directly in their destination tensor, a run of small tensors is read with
one call (into a spare buffer copied out in one batch, or, for new tensors, into a buffer
they become views of), the bytes in between go through a scratch buffer, and everything is
hashed in file order (for a large file, in a thread while the next bytes are read, where
the process has 2 CPUs or more); the
xxh3_64 digest and size are compared with the manifest's before any value is handed out.
What a load plans per tensor (each leaf's dtype and shape, the runs of small tensors and
where each lies in its run's buffer, the views of a mapped file) is worked out once per
manifest and kept with it (``_Plan``): a load of a manifest read before does per tensor only
what it must (match the target, one view or copy, hand the value out). The next checkpoint of
the same state (laid out alike) takes the plan over. A target loaded into in place a second
time is bound to the plan (``_Bound``): later loads into it, found unchanged by a few calls in
C, skip matching and checking it and read runs of small tensors straight into its tensors
(one ``preadv`` into many buffers). The garbage collector is paused meanwhile
(``collection_paused``).

Everything on disk is hostile until checked, whoever wrote it (the disk is shared), and
whether or not ``verify`` is set:

* the manifest must match its own checksum (``aiockpt._format.manifest``) and then be consistent:
  its format version, file names inside the directory, ranks, a skeleton no deeper than
  ``tree.MAX_DEPTH`` that names every leaf once, numbers that parse, and every tensor within
  the listed size of its file;
* every file, the manifest too, is opened from the checkpoint directory's descriptor one path
  component at a time with ``O_NOFOLLOW`` (a link anywhere inside is refused), must be a
  regular file (a FIFO or a device is refused; ``O_NONBLOCK`` keeps the open itself from
  waiting on a FIFO), and must have the listed size before any buffer is allocated for it;
  the manifest is read only up to ``MAX_MANIFEST_BYTES``.

With ``mmap=True`` nothing is read: each tensor is a view over a private, copy-on-write
mapping of its file (``load`` says what that means for verification and lifetimes).

A checksum proves nothing against someone who can write the directory (they can write a
matching manifest); the rules about opening files are what keep a reader inside it.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from aiockpt._format.manifest import (
    MANIFEST_NAME,
    BigIntLeaf,
    BytesLeaf,
    FileEntry,
    FloatLeaf,
    Leaf,
    Manifest,
    ObjectLeaf,
    OpaqueLeaf,
    RankState,
    TensorLeaf,
    ValueLeaf,
    plain_value,
)
from aiockpt._format.reading import (
    IOV_MAX,
    OpenCheckpoint,
    check_file_sizes,
    last_manifest,
    open_listed_file,
    read_listed_file,
    strided_extent,
)
from aiockpt._format.stateful import load_through_stateful
from aiockpt._format.torch_written import load_torch_written
from aiockpt._format.tree import (
    DictNode,
    KeyPath,
    LeafNode,
    ListNode,
    Node,
    TupleNode,
    flatten,
    format_key_path,
    iter_key_paths,
    unflatten,
)
from aiockpt._runtime import collection_paused
from aiockpt._wire.tensors import dtype_from_name, is_tensor, tensor_addresses, tensors_guard
from aiockpt.errors import CorruptCheckpoint, ForeignCheckpoint
from aiockpt.writers.base import _PYBUF_WRITE, _memoryview_from_memory, tensor_bytes

__all__ = ["load"]


def load(
    path: str | os.PathLike[str],
    state_dict: Any = None,
    *,
    verify: bool | None = None,
    allow_pickle: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    mmap: bool = False,
) -> Any:
    """Load the checkpoint at ``path`` (either format) as CPU tensors and plain values.

    A checkpoint saved by several ranks holds one state dict per rank, and a DTensor was saved
    as pieces, one per rank, each knowing where it lies in the whole. What comes back:

    * ``rank`` None (an offline process: eval, export): the whole checkpoint. Sharded tensors
      come back whole, assembled from every rank's pieces; everything else is rank 0's (the
      value ``dcp.load`` would give every rank: replicated tensors are the same everywhere).
    * ``rank`` given, at the saved world size (``world_size`` None or equal to it): what that
      rank saved (its own pieces, its own values), as when each rank resumes where it was.
    * ``rank`` given at another ``world_size``: like ``rank`` None, so that every rank of a
      resized job gets the same non-sharded values.

    Without ``state_dict``, return the saved tree exactly (int keys, tuples, nesting); tensors
    of up to 256 KiB come back as views of buffers of up to 4 MiB they share with tensors
    saved next to them (each run of them is read with one call and not copied): a tensor
    kept alone keeps its buffer alive, and ``torch.save`` of it alone writes the whole
    buffer, as for any view (``clone()`` it first). With
    one, fill it in place torch-style and return it: for each of its leaves, tensors are
    overwritten with ``copy_`` (dtypes convert), anything else is replaced by the saved value;
    keys the checkpoint has but ``state_dict`` lacks are not read. A tuple is immutable, so a
    tuple in ``state_dict`` is replaced by a new one in its container. A DTensor in
    ``state_dict`` receives its own slice of the whole, read from whichever saved pieces
    overlap it, at any world size and placement (as ``dcp.load`` reshards); a plain tensor
    receives the whole tensor, or, at the saved world size with ``rank``, that rank's piece.
    Only the byte ranges a rank needs are read (unless ``verify`` reads whole files anyway).
    Loading a checkpoint again into the same target (a training loop rolling back, an eval
    reloading) is cheaper from the third load on: the target is remembered with the
    manifest's plan, found unchanged with a few calls in C (containers and keys, each
    tensor's type, dtype, device, requires_grad, shape, strides and address), and its small
    tensors are read straight into their memory; whatever changed is matched and checked
    again as on a first load.

    ``Stateful`` values (torch's protocol: ``state_dict()`` and ``load_state_dict()``) at
    the top level of ``state_dict``, or ``state_dict`` itself, are loaded as
    ``torch.distributed.checkpoint.load`` loads them: into their ``state_dict()``, which is
    then passed to their ``load_state_dict()``.

    ``verify`` (default: on, unless ``mmap``) checks every file's size and xxh3_64 digest in
    the same pass that reads it. ``allow_pickle`` lets leaves that were saved as arbitrary
    objects be unpickled: only for checkpoints you trust. A checkpoint torch's ``dcp.save``
    wrote (``.metadata``, no aiockpt manifest) is loaded only with ``allow_pickle``, by
    torch's own reader, unverified (a warning is logged; see ``aiockpt._format.torch_written``).

    ``mmap=True`` reads no tensor bytes: every tensor comes back as a view over a private
    mapping of its file (as ``torch.load(mmap=True)`` and safetensors' ``load_file`` do), so
    the load costs the same for 1 KiB and 100 GiB and pages are read when first touched. The
    views are copy-on-write: writing to one changes this process's copy of those pages, never
    the file. Each file stays mapped while any tensor viewing it lives and is unmapped when the
    last one is dropped (reference counting: no garbage collection needed unless the tensors
    sit in a reference cycle); no descriptor stays open. Tied tensors come back as views of
    the same bytes. The manifest and the file rules above are checked as always, but the
    files' digests are not: hashing them would read every byte, and a check made before the
    pages are touched would not cover what they read later anyway. Call ``verify(path)`` first
    if the bytes must be checked; ``verify=True`` with ``mmap=True`` raises ValueError. A
    file truncated by someone else while mapped makes touching its missing pages raise
    SIGBUS, as with any mapping; aiockpt never truncates a committed checkpoint. Only a
    tree comes back: ``state_dict`` must be None (to fill a module without copying, use
    ``module.load_state_dict(load(path, mmap=True), assign=True)``), and a tensor saved as
    pieces by several ranks cannot be one view, so it needs ``rank`` at the saved world size
    (that rank's pieces).

    Raises CorruptCheckpoint naming the file for a missing or malformed manifest (see
    ``read_manifest``), a missing, truncated or altered file, one that is a link, lies behind
    one or is not a regular file, or saved pieces that do not make up their whole (on failure
    the tensors of ``state_dict`` may be partly overwritten, its other leaves are not);
    FileNotFoundError if ``path`` does not exist; KeyError naming the key path for a leaf of
    ``state_dict`` the checkpoint does not have; ValueError for a tensor of ``state_dict``
    whose shape fits neither the saved whole nor the piece asked for (naming the saved world
    size and shapes) or that is on the meta device (naming its key), for a checkpoint whose
    ranks saved keys rank 0 lacks when loading the whole without ``state_dict``, for a
    pickled leaf without ``allow_pickle``, for a leaf a custom writer stored in its own
    format, or for a ``rank`` the checkpoint does not have;
    what a ``Stateful`` value's ``state_dict()`` or ``load_state_dict()`` raises; and, for a
    checkpoint torch's DCP wrote, ForeignCheckpoint without ``allow_pickle`` (with it, what
    torch's ``dcp.load`` raises). With ``mmap``: ValueError for ``verify=True``, a
    ``state_dict``, a tensor saved as pieces that this load would have to assemble, or a
    checkpoint torch's DCP wrote (it has no manifest to map by).
    """
    if mmap:
        if verify:
            raise ValueError(
                "verify=True cannot hold with mmap=True: checking the digests reads every "
                "byte, and pages read later are not covered by a check made before; call "
                "aiockpt.verify(path) first if the files must be checked"
            )
        if state_dict is not None:
            raise ValueError(
                "mmap=True returns the saved tree and fills no state_dict (that would copy); "
                "use module.load_state_dict(aiockpt.load(path, mmap=True), assign=True)"
            )
    # Decoding the manifest and planning make a few objects per leaf: tens of thousands of
    # them would set off the collector's full passes over the whole heap (most of the time a
    # 20,000-tensor load took). None of them is cyclic garbage; whatever a Stateful's own
    # state_dict() or load_state_dict() leaves is collected once collection resumes.
    with collection_paused():
        try:
            checkpoint = OpenCheckpoint(path)
        except ForeignCheckpoint:
            if not allow_pickle:
                raise
            if mmap:
                raise ValueError(
                    f"{os.fspath(path)!r} was written by torch's dcp.save, without the manifest "
                    "mmap=True maps files by; load it without mmap"
                ) from None
            return load_through_stateful(state_dict, functools.partial(load_torch_written, path))
        with checkpoint:
            return load_through_stateful(
                state_dict,
                functools.partial(
                    _load,
                    checkpoint,
                    verify=not mmap if verify is None else verify,
                    allow_pickle=allow_pickle,
                    rank=rank,
                    world_size=world_size,
                    mmap=mmap,
                ),
            )


@dataclass(frozen=True)
class _Box:
    """A region of a tensor of ``whole`` shape: ``sizes`` elements from ``offset`` on."""

    whole: tuple[int, ...]
    offset: tuple[int, ...]
    sizes: tuple[int, ...]


def _saved_box(leaf: TensorLeaf) -> _Box:
    shape = tuple(leaf.shape)
    if leaf.global_shape is None or leaf.global_offset is None:
        return _Box(shape, (0,) * len(shape), shape)
    return _Box(tuple(leaf.global_shape), tuple(leaf.global_offset), shape)


class _Source:
    """The state dict a load takes its tree and plain leaves from, and, for a sharded
    tensor, every rank's pieces of it (indexed only when a load first needs them)."""

    def __init__(self, checkpoint: OpenCheckpoint, rank: int | None, world_size: int | None):
        manifest = checkpoint.manifest
        self.checkpoint = checkpoint
        self.saved_world = manifest.world_size
        #: whether this load is a rank resuming its own part at the saved world size
        self.own = rank is not None and world_size in (None, manifest.world_size)
        self.rank = rank if self.own and rank is not None else 0
        self.state = manifest.rank_state(self.rank)
        self._indexes: list[dict[KeyPath, int]] | None = None

    def indexes(self) -> list[dict[KeyPath, int]]:
        """Key path -> leaf index, for each saved rank."""
        if self._indexes is None:
            manifest = self.checkpoint.manifest
            self._indexes = [
                {key_path: index for index, key_path in iter_key_paths(state.skeleton)}
                for state in (manifest.rank_state(r) for r in range(len(manifest.ranks) + 1))
            ]
        return self._indexes

    def pieces(self, key_path: KeyPath, leaf: TensorLeaf) -> list[TensorLeaf]:
        """The saved pieces of the tensor ``leaf`` (the source rank's) is part of, each once."""
        if leaf.global_shape is None:
            return [leaf]
        manifest = self.checkpoint.manifest
        by_offset: dict[tuple[int, ...], TensorLeaf] = {}
        for rank, index in enumerate(self.indexes()):
            position = index.get(key_path)
            other = None if position is None else manifest.rank_state(rank).leaves[position]
            if isinstance(other, TensorLeaf) and other.global_shape == leaf.global_shape:
                by_offset.setdefault(_saved_box(other).offset, other)
        return list(by_offset.values())

    def describe(self, key_path: KeyPath, leaf: TensorLeaf) -> str:
        """What was saved under ``key_path``, for error messages."""
        if leaf.global_shape is None:
            return f"a tensor of shape {leaf.shape}"
        pieces = ", ".join(f"{p.shape} at {p.global_offset}" for p in self.pieces(key_path, leaf))
        return (
            f"a tensor of shape {leaf.global_shape} saved by {self.saved_world} ranks as "
            f"pieces {pieces}"
        )


def _load(
    checkpoint: OpenCheckpoint,
    state_dict: Any,
    *,
    verify: bool,
    allow_pickle: bool,
    rank: int | None,
    world_size: int | None,
    mmap: bool = False,
) -> Any:
    manifest = checkpoint.manifest
    source = _Source(checkpoint, rank, world_size)
    leaves = source.state.leaves
    # Whole tensors to assemble from pieces: leaf index -> the region wanted.
    boxes: dict[int, _Box] = {}
    if state_dict is None:
        if not source.own and manifest.world_size > 1:
            _check_keys_of_rank_0(source)
            for index, leaf in enumerate(leaves):
                if isinstance(leaf, TensorLeaf) and leaf.global_shape is not None:
                    whole = tuple(leaf.global_shape)
                    boxes[index] = _Box(whole, (0,) * len(whole), whole)
        wanted = list(range(len(leaves)))
        if mmap:
            values = _map_leaves(checkpoint, leaves, boxes, source, allow_pickle)
            # Pickled leaves (allowed by now) are read and unpickled where every load does.
            pickled = [i for i, leaf in enumerate(leaves) if isinstance(leaf, ObjectLeaf)]
            if pickled:
                values.update(
                    _read_leaves(
                        checkpoint, manifest, leaves, pickled, {}, {}, source, False, allow_pickle
                    )
                )
            return unflatten(source.state.skeleton, [values[i] for i in wanted])
        values = _read_leaves(
            checkpoint, manifest, leaves, wanted, {}, boxes, source, verify, allow_pickle
        )
        return unflatten(source.state.skeleton, [values[i] for i in wanted])
    plan = _plan_for(checkpoint, source.rank)
    bound = plan.take_bound()
    try:
        if bound is not None:
            found = bound.targets_of(state_dict)
            if found is not None:  # the target bound before, unchanged: nothing to check
                tensors_found, others = found
                values = _read_leaves(
                    checkpoint,
                    manifest,
                    leaves,
                    bound.wanted,
                    bound.destinations(tensors_found),
                    {},
                    source,
                    verify,
                    allow_pickle,
                    bound,
                )
                bound.put_others(others, values)
                return state_dict
            bound = None  # another target: bound anew below, if it can be
        matched: list[tuple[KeyPath, Any, int]] = []
        try:
            tuples = _match(state_dict, source.state.skeleton, (), matched)
        except _Missing as exc:
            raise KeyError(
                f"{format_key_path(exc.key_path)!r} is not in the checkpoint at {checkpoint.root!r}"
            ) from None
        destinations: dict[int, torch.Tensor] = {}
        #: positions in ``matched`` of the tensors filled in place as they are (no conversion,
        #: no reshard), and whether every tensor is one (what a bound target needs)
        direct: list[int] = []
        bindable = True
        tensors = plan.tensors
        for position, (key_path, target, index) in enumerate(matched):
            spec = tensors[index]
            if spec is None or not isinstance(target, torch.Tensor):
                if spec is None and isinstance(target, torch.Tensor):
                    bindable = False  # (a bound target's other leaves are no tensors)
                continue
            if spec[2] and type(target) in _PLAIN_TENSORS and target.shape == spec[1]:
                local = target  # a whole tensor into one of its shape: nothing to reshard
            else:
                bindable = False
                leaf = leaves[index]
                assert isinstance(leaf, TensorLeaf)
                box = _wanted_box(source, key_path, leaf, target)
                if box != _saved_box(leaf):
                    boxes[index] = box
                local = _local_tensor(target)
            if (
                local.dtype == spec[0]
                and local.is_cpu
                and not local.requires_grad
                and local.is_contiguous()
                and not local.is_conj()  # bytes read into a conjugate or negative view
                and not local.is_neg()  # would read back conjugated or negated
                and index not in destinations
            ):
                destinations[index] = local
                direct.append(position)
            elif local.is_meta:  # copy_ into it would do nothing: the load would be lost
                raise ValueError(
                    f"{format_key_path(key_path)!r}: the state dict has a tensor on the meta "
                    "device, which holds no data to load into; materialize it first "
                    "(module.to_empty(device=...)), or load without a state dict"
                )
            else:
                bindable = False
        wanted = [index for _, _, index in matched]
        values = _read_leaves(
            checkpoint,
            manifest,
            leaves,
            wanted,
            destinations,
            boxes,
            source,
            verify,
            allow_pickle,
        )
        if bindable and plan.loaded_in_place:
            # A second load into a target: it may be loaded into again (a training loop
            # rolling back, an eval polling), so remember it (not on the first: a load done
            # once should not pay for binding).
            bound = _bind(plan, state_dict, matched, direct)
        plan.loaded_in_place = True
        if not tuples and all(values[index] is target for _, target, index in matched):
            return state_dict  # every leaf filled in place: nothing to put into containers
        return _fill(state_dict, iter([values[index] for index in wanted]))
    finally:
        plan.keep_bound(bound)


#: tensor types that are never sharded (a DTensor is a subclass that says where its shard is)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class _Missing(Exception):
    """A leaf of the state dict to fill that the checkpoint does not have."""

    def __init__(self, key_path: KeyPath) -> None:
        super().__init__(key_path)
        self.key_path = key_path


def _match(
    target: Any, node: Node | None, key_path: KeyPath, matched: list[tuple[KeyPath, Any, int]]
) -> bool:
    """Append ``(key path, leaf, saved leaf index)`` for every leaf of ``target`` (by
    ``tree.flatten``'s rules, depth first) to ``matched``, walking the saved skeleton
    ``node`` alongside; return whether ``target`` holds a tuple (which ``_fill`` replaces).
    Raises _Missing for the first leaf the skeleton does not have."""
    if isinstance(target, dict):
        items: Any = target.items()
    elif isinstance(target, list) or (isinstance(target, tuple) and not hasattr(target, "_fields")):
        items = enumerate(target)
    elif isinstance(node, LeafNode):
        matched.append((key_path, target, node.index))
        return False
    else:
        raise _Missing(key_path)
    tuples = isinstance(target, tuple)
    if isinstance(node, DictNode):
        by_key: dict[Any, Node] = dict(zip(node.keys, node.children, strict=True))
        for key, child in items:
            found = by_key.get(key)
            if isinstance(child, torch.Tensor) and isinstance(found, LeafNode):
                matched.append(((*key_path, key), child, found.index))  # (no call per tensor)
            elif _match(child, found, (*key_path, key), matched):
                tuples = True
    elif isinstance(node, (ListNode, TupleNode)):
        children = node.children
        for key, child in items:
            within = isinstance(key, int) and 0 <= key < len(children)
            if _match(child, children[key] if within else None, (*key_path, key), matched):
                tuples = True
    else:  # nothing saved here: the first leaf below, if any, is missing
        _, below = flatten(target, is_tensor)
        if below:
            raise _Missing((*key_path, *below[0][0]))
    return tuples


def _check_keys_of_rank_0(source: _Source) -> None:
    """Loading the whole without a target returns rank 0's tree: refuse rather than drop
    keys only other ranks saved (pipeline stages, say)."""
    indexes = source.indexes()
    for rank, index in enumerate(indexes[1:], start=1):
        missing = index.keys() - indexes[0].keys()
        if missing:
            key = format_key_path(min(missing, key=format_key_path))
            raise ValueError(
                f"rank {rank} of the {source.saved_world} ranks that saved "
                f"{source.checkpoint.root!r} saved {key!r} (and {len(missing) - 1} other keys) "
                "that rank 0 did not; load into a state dict that has them, or pass rank= to "
                "load one rank's part"
            )


def _wanted_box(source: _Source, key_path: KeyPath, leaf: TensorLeaf, target: torch.Tensor) -> _Box:
    """The region of the saved tensor that ``target`` receives; raises ValueError (saying
    what was saved, what was asked and what to do instead) when its shape fits nothing."""
    saved = _saved_box(leaf)
    placements = getattr(target, "placements", None)
    mesh = getattr(target, "device_mesh", None)
    if placements is not None and mesh is not None:  # a DTensor: its slice of the whole
        if tuple(target.shape) == saved.whole:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            sizes, offset = compute_local_shape_and_global_offset(target.shape, mesh, placements)
            return _Box(saved.whole, tuple(offset), tuple(sizes))
        asked = f"a DTensor of global shape {list(target.shape)}"
    else:
        shape = tuple(target.shape)
        if source.own and shape == saved.sizes:
            return saved  # this rank's own piece, where it resumes at the same world size
        if shape == saved.whole:
            return _Box(saved.whole, (0,) * len(shape), shape)
        asked = f"a tensor of shape {list(shape)}"
    whole = list(saved.whole)
    instead = (
        f"Pass a tensor of shape {whole} (the whole) or a DTensor of global shape {whole} "
        "(each rank gets its slice)"
    )
    if leaf.global_shape is not None:
        instead += (
            f", or, at the saved world size of {source.saved_world}, a tensor of one rank's "
            "piece with rank= that rank"
        )
    raise ValueError(
        f"{format_key_path(key_path)!r} in the checkpoint at {source.checkpoint.root!r} is "
        f"{source.describe(key_path, leaf)}; the state dict has {asked}. {instead}"
    )


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _fill(target: Any, saved: Iterator[Any]) -> Any:
    """Put the saved values (one per leaf of ``target``, in ``_match``'s order) into
    ``target``'s containers."""
    if isinstance(target, torch.Tensor):
        value = next(saved)
        if not isinstance(value, torch.Tensor):
            return value
        if value is not target:
            with torch.no_grad():
                _local_tensor(target).copy_(value)
        return target
    if isinstance(target, dict):
        for key in list(target):
            target[key] = _fill(target[key], saved)
        return target
    if isinstance(target, list):
        for i, item in enumerate(target):
            target[i] = _fill(item, saved)
        return target
    if isinstance(target, tuple) and not hasattr(target, "_fields"):
        return tuple(_fill(item, saved) for item in target)
    return next(saved)


@dataclass(slots=True, eq=False)
class _Region:
    """Bytes of one file that go into one buffer: shared by leaves saved at the same place,
    or, with ``after``, part of a saved piece that ``after`` copies into a bigger tensor.

    The buffer is ``view`` (a pickled object's bytes, a piece's scratch), or a tensor of
    ``dtype`` and ``shape``: ``tensor`` where it is given (an existing destination), else
    one made as the file is read (``reading.read_listed_file``): a small one is a view of
    the buffer its run of small tensors was read into, a larger one a tensor of its own."""

    offset: int
    nbytes: int
    leaves: list[int]
    view: memoryview | None = None
    after: Callable[[], None] | None = None
    tensor: torch.Tensor | None = None
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()

    def buffer(self, root: str) -> memoryview:
        """The bytes to read into (the tensor is allocated here if it was not given)."""
        if self.view is None:
            if self.tensor is None:
                assert self.dtype is not None
                self.tensor = _empty(self.shape, self.dtype, root)
            self.view = tensor_bytes(self.tensor)
        return self.view


@dataclass(slots=True, eq=False)
class _Run:
    """Small tensors lying close together in one file (``offset``..``end``), read with one
    call into one buffer that starts ``pad`` bytes before the run (so that the buffer is
    aligned as the file is): ``members[k]`` are the leaves saved at the k-th place (several
    for tied leaves), whose tensor is ``specs[k]``: dtype, shape, strides and element offset
    in the buffer viewed as that dtype."""

    offset: int
    end: int
    pad: int
    #: its place among the plan's runs (of every file)
    number: int
    members: list[tuple[int, ...]]
    specs: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]]
    #: ``_layout``'s, once asked for
    layout: tuple[list[int], list[int]] | None = None


@dataclass(slots=True, eq=False)
class _Plan:
    """What every load of one rank's state of one manifest needs, worked out once and kept
    with the manifest (``_plan_for``): the per-tensor work left to a load is what it must do
    per tensor anyway (a view, a copy, a value handed out)."""

    #: leaf index -> (dtype, shape, whether saved whole) for tensors, None for other leaves
    tensors: list[tuple[torch.dtype, tuple[int, ...], bool] | None]
    #: indices of leaves stored as plain values, and of pickled or custom-stored ones
    plain: list[int]
    special: list[int]
    #: runs of small tensors per file, by offset
    runs: dict[str, list[_Run]]
    #: tensor leaves read one by one (large, empty, misaligned, overlapping), by index
    singles: list[tuple[int, TensorLeaf]]
    #: pairs of different leaves saved at one place: corrupt, if a load reads both
    collisions: list[tuple[int, int]]
    #: tensor leaves that lie strided in their file (``TensorLeaf.strides``), read as pieces
    strided: list[int]
    #: the largest run's buffer
    run_bytes: int
    #: for loads into existing tensors: a buffer every run is read into in turn, with each
    #: run's tensors as views of it made once (taken by one load at a time)
    spare: tuple[torch.Tensor, list[list[torch.Tensor]]] | None = None
    #: for mmap: ``_map_plan``'s, made by the first load that maps
    mapped: (
        tuple[
            dict[
                tuple[str, torch.dtype],
                list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]],
            ],
            list[tuple[tuple[int, ...], TensorLeaf]],
        ]
        | None
    ) = None

    #: the target the last loads in place filled, checked and matched (``_Bound``), taken
    #: by one load at a time; and whether a load in place has run (the second one binds)
    bound: _Bound | None = None
    loaded_in_place: bool = False

    def take_bound(self) -> _Bound | None:
        with _plan_lock:
            bound, self.bound = self.bound, None
        return bound

    def keep_bound(self, bound: _Bound | None) -> None:
        if bound is not None:
            with _plan_lock:
                if self.bound is None:
                    self.bound = bound

    def take_spare(self) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        with _plan_lock:
            spare, self.spare = self.spare, None
        if spare is not None:
            return spare
        buffer = torch.empty(self.run_bytes, dtype=torch.uint8)
        views = [_run_views(run, buffer) for runs in self.runs.values() for run in runs]
        return buffer, views

    def give_back(self, spare: tuple[torch.Tensor, list[list[torch.Tensor]]]) -> None:
        with _plan_lock:
            if self.spare is None:
                self.spare = spare


_plan_lock = threading.Lock()
#: the plans of the manifest read last (``last_manifest``), per saved rank
_last_plans: list[tuple[Manifest, dict[int, _Plan]] | None] = [None]


def _plan_for(checkpoint: OpenCheckpoint, rank: int) -> _Plan:
    """The plan of rank ``rank``'s state, made once per manifest read (kept while it is the
    last one read, ``last_manifest``; another manifest's plan is made for each load). The
    plan of the manifest read before is taken over (with the target bound to it) by the
    next one if it lays that rank's state out alike (``_laid_out_alike``: the next
    checkpoint of the same training state, as an eval polling for new ones loads)."""
    manifest = checkpoint.manifest
    with _plan_lock:
        kept = _last_plans[0]
        if kept is not None and rank in kept[1]:
            if kept[0] is manifest:
                return kept[1][rank]
            previous: tuple[Manifest, _Plan] | None = (kept[0], kept[1][rank])
        else:
            previous = None
    state = manifest.rank_state(rank)
    if previous is not None and _laid_out_alike(previous[0].rank_state(rank), state):
        plan = previous[1]
    else:
        plan = _make_plan(state.leaves)
    if last_manifest[0] is not None and last_manifest[0][1] is manifest:
        with _plan_lock:
            kept = _last_plans[0]
            if kept is None or kept[0] is not manifest:
                kept = _last_plans[0] = (manifest, {})
            plan = kept[1].setdefault(rank, plan)
    return plan


def _laid_out_alike(before: RankState, now: RankState) -> bool:
    """Whether a plan of ``before`` serves ``now``: the same skeleton, and the same leaves
    but for plain values (a step count), which a load takes from its own manifest."""
    if before.skeleton != now.skeleton or len(before.leaves) != len(now.leaves):
        return False
    if before.leaves == now.leaves:  # (compared in C)
        return True
    return all(
        a == b or (type(a) is type(b) and isinstance(a, _PLAIN_LEAVES))
        for a, b in zip(before.leaves, now.leaves, strict=True)
    )


#: leaves whose value a load takes from its manifest (a plan keeps only their indices)
_PLAIN_LEAVES = (ValueLeaf, FloatLeaf, BigIntLeaf, BytesLeaf)


def _make_plan(leaves: list[Leaf]) -> _Plan:
    tensors: list[tuple[torch.dtype, tuple[int, ...], bool] | None] = [None] * len(leaves)
    plain: list[int] = []
    special: list[int] = []
    singles: list[tuple[int, TensorLeaf]] = []
    strided: list[int] = []
    #: (file, offset) -> the leaves saved there (tied leaves: equal ones)
    places: dict[tuple[str, int], list[int]] = {}
    small: list[tuple[str, int, int, int]] = []  # file, offset, end, first leaf
    in_runs: set[int] = set()
    for index, leaf in enumerate(leaves):
        if type(leaf) is not TensorLeaf:
            if isinstance(leaf, (ValueLeaf, FloatLeaf, BigIntLeaf, BytesLeaf)):
                plain.append(index)
            else:
                special.append(index)
                if isinstance(leaf, ObjectLeaf):
                    places.setdefault((leaf.file, leaf.offset), []).append(index)
            continue
        dtype = dtype_from_name(leaf.dtype)
        shape = tuple(leaf.shape)
        tensors[index] = (dtype, shape, leaf.global_shape is None)
        if leaf.strides is not None:
            strided.append(index)
            continue
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:  # nothing to read (and may share an offset)
            singles.append((index, leaf))
            continue
        at = places.setdefault((leaf.file, leaf.offset), [])
        at.append(index)
        if len(at) > 1 and at[0] in in_runs and leaves[at[0]] == leaf:
            continue  # tied to a small tensor: made with it
        if len(at) == 1 and nbytes <= _SMALL_BYTES and not leaf.offset % dtype.itemsize:
            small.append((leaf.file, leaf.offset, leaf.offset + nbytes, index))
            in_runs.add(index)
        else:
            singles.append((index, leaf))
    collisions = [
        (at[0], other)
        for at in places.values()
        for other in at[1:]
        if leaves[other] != leaves[at[0]]
    ]
    small.sort()
    runs: dict[str, list[_Run]] = {}
    run_bytes = 0
    count = 0
    run: _Run | None = None
    file = ""
    for name, offset, end, first in small:
        members = tuple(i for i in places[name, offset] if leaves[i] == leaves[first])
        if name == file and run is not None and offset < run.end:
            # overlapping another small tensor (nothing aiockpt writes): read on its own
            singles.extend((i, leaves[i]) for i in members)  # type: ignore[misc]
            in_runs.difference_update(members)
            continue
        if (
            run is None
            or name != file
            or offset - run.end > _RUN_GAP
            or end - run.offset > _RUN_BYTES
        ):
            file = name
            run = _Run(offset, end, offset % _ALIGN, count, [], [])
            count += 1
            runs.setdefault(name, []).append(run)
        dtype, shape, _ = tensors[first]  # type: ignore[misc]
        run.members.append(members)
        run.specs.append(
            (
                dtype,
                shape,
                _contiguous_strides(shape),
                (run.pad + offset - run.offset) // dtype.itemsize,
            )
        )
        run.end = end
        run_bytes = max(run_bytes, -(-(run.pad + end - run.offset) // _ALIGN) * _ALIGN)
    singles.sort(key=_first)
    return _Plan(tensors, plain, special, runs, singles, collisions, strided, run_bytes)


def _first(pair: tuple[int, Any]) -> int:
    return int(pair[0])


def _run_views(run: _Run, buffer: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of ``run`` as views of ``buffer``, the buffer it was read into."""
    typed: dict[torch.dtype, torch.Tensor] = {}
    views = []
    for dtype, shape, strides, at in run.specs:
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = buffer.view(dtype)
        views.append(view.as_strided(shape, strides, at))
    return views


class _RunLoad:
    """One load's side of reading runs: which leaves it wants, where they go, and the buffer
    each run is read into (a new one when allocating, whose views the tensors become, else
    the plan's spare buffer, copied out into the destinations with one batched copy)."""

    def __init__(
        self,
        plan: _Plan,
        wanted: bytearray | None,
        destinations: dict[int, torch.Tensor],
        values: dict[int, Any],
        allocate: bool,
        scatters: dict[int, _Scatter] | None = None,
    ) -> None:
        self.plan = plan
        #: run number -> how to read that run straight into the target's tensors
        self.scatters = scatters
        #: leaf index -> 1 where wanted (None: every leaf)
        self.wanted = wanted
        self.destinations = destinations
        self.values = values
        self.allocate = allocate
        self.spare: tuple[torch.Tensor, list[list[torch.Tensor]]] | None = None

    def buffer_for(self, run: _Run, root: str) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The buffer to read ``run`` into and, for the spare one, the run's views of it."""
        if self.allocate:
            size = -(-(run.pad + run.end - run.offset) // _ALIGN) * _ALIGN
            return _empty((size,), torch.uint8, root), None  # (dtype views need whole elements)
        if self.spare is None:
            self.spare = self.plan.take_spare()
        return self.spare[0], self.spare[1][run.number]

    def place(self, run: _Run, buffer: torch.Tensor, views: list[torch.Tensor] | None) -> None:
        """Hand out the wanted tensors of ``run``, just read into ``buffer``."""
        values = self.values
        wanted = self.wanted
        if views is None:  # allocating: the views are the tensors
            for members, tensor in zip(run.members, _run_views(run, buffer), strict=True):
                for index in members:
                    if wanted is None or wanted[index]:
                        values[index] = tensor
            return
        destinations = self.destinations
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        tied: list[tuple[tuple[int, ...], torch.Tensor]] = []
        for members, view in zip(run.members, views, strict=True):
            if wanted is not None and not any(wanted[i] for i in members):
                continue
            first = members[0]
            destination = destinations.get(first)
            if destination is None:
                value = view.clone()  # the spare buffer is read into again
            else:
                targets.append(destination)
                sources.append(view)
                value = destination
            if len(members) == 1:
                values[first] = value
            else:
                tied.append((members, value))
        if targets:
            torch._foreach_copy_(targets, sources)
        for members, value in tied:  # after the copy: a tied leaf's own tensor copies it
            for index in members:
                if wanted is None or wanted[index]:
                    destination = destinations.get(index)
                    values[index] = value if destination is None else _place(value, destination)

    def close(self) -> None:
        if self.spare is not None:
            self.plan.give_back(self.spare)
            self.spare = None


@dataclass(slots=True, eq=False)
class _Scatter:
    """A run read straight into a bound target's tensors: ``views`` are its bytes in file
    order (each tensor's own memory, and the bytes between them in ``owner``, the bound
    target's gap buffer), ``batches`` the same in groups of at most ``IOV_MAX`` with
    their sizes (one ``preadv`` each)."""

    views: list[memoryview]
    batches: list[tuple[list[memoryview], int]]
    owner: torch.Tensor


@dataclass(slots=True, frozen=True, eq=False)
class _Container:
    """A container of a bound target as it was: its exact type, its keys in order (a dict)
    or None (a list), its length, and per value: True for a tensor filled in place, False
    for another leaf (replaced by the saved value), a ``_FlatTuple``, or the container
    below; ``children`` None when every value is a tensor filled in place."""

    kind: Any  # (a type; Any: mypy would narrow what is compared with it to object)
    keys: list[Any] | None
    length: int
    children: list[_Container | _FlatTuple | bool] | None


@dataclass(slots=True, frozen=True)
class _FlatTuple:
    """A tuple of ``length`` leaves, none a tensor or a container, in a bound target (an
    optimizer's ``betas``): replaced by a tuple of the saved values, as ``_fill`` does."""

    length: int


@dataclass(slots=True, eq=False)
class _Bound:
    """A target an earlier load in place of this plan matched and checked, and what the next
    load into the same target (the same containers and keys, tensors alike in everything
    checked and at the same addresses) skips: matching it against the skeleton, checking
    each tensor, making views of its memory. Whether a target is the same is checked
    in C per tensor (``torch``'s dynamo ``TensorGuards``: Python type, dispatch keys
    (device, layout, conjugate and negative bits), dtype, device index, requires_grad,
    sizes and strides; then the data pointers): anything that would change what a load does
    with a tensor makes the load match and check its target again. Holds no reference to
    the target or its memory (the views are raw: used only once the pointers matched those
    of the tensors the load holds)."""

    shape: _Container
    #: saved leaf index of each tensor filled in place, in the order ``_collect`` finds them,
    #: and of each other leaf
    direct: list[int]
    others: list[int | tuple[int, ...]]
    #: every leaf the target wants, in ``_match``'s order
    wanted: list[int]
    guard: Any
    pointers: list[int]
    flags: bytearray | None
    runs: dict[str, list[_Run]]
    #: run number -> how to read it straight into the tensors
    scatters: dict[int, _Scatter]
    #: positions in ``direct`` of the tensors no scatter reads (singles, tied leaves)
    unscattered: list[int]

    def destinations(self, tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Leaf index -> tensor of ``tensors`` (``targets_of``'s) for those read otherwise
        than by a scatter (those a scatter reads need no entry: nothing is done per tensor)."""
        return {self.direct[position]: tensors[position] for position in self.unscattered}

    def put_others(self, places: list[tuple[Any, Any]], values: dict[int, Any]) -> None:
        """Put the loaded ``values`` of the other leaves into their ``places`` (container,
        key), as ``_fill`` would: a flat tuple becomes a new tuple of the saved values."""
        for (container, key), index in zip(places, self.others, strict=True):
            if isinstance(index, tuple):
                container[key] = tuple(values[i] for i in index)
            else:
                container[key] = values[index]

    def targets_of(self, state_dict: Any) -> tuple[list[torch.Tensor], list[Any]] | None:
        """The tensors of ``state_dict`` to fill in place (in ``direct``'s order) and the
        containers and keys of its other leaves (``others``' order), if it is the bound
        target unchanged; else None."""
        tensors: list[torch.Tensor] = []
        others: list[tuple[Any, Any]] = []
        if (
            not _collect(state_dict, self.shape, tensors, others)
            or len(tensors) != len(self.pointers)
            or not self.guard.check(*tensors)
            or tensor_addresses(tensors) != self.pointers
        ):
            return None
        return tensors, others


def _collect(
    target: Any, shape: _Container, tensors: list[Any], others: list[tuple[Any, Any]]
) -> bool:
    """Append ``target``'s leaves where ``shape`` has them: its tensors filled in place to
    ``tensors``, (container, key) of its other leaves and flat tuples to ``others``; False
    where its containers differ from ``shape`` (type, keys, length) or another leaf is now
    a tensor or a container."""
    if type(target) is not shape.kind or len(target) != shape.length:
        return False
    keys: Any
    if shape.keys is None:
        keys, values = range(shape.length), target
    else:
        keys = shape.keys
        try:
            if list(target) != keys:
                return False
        except Exception:  # a key whose == raises (a tensor): let a first load's match say
            return False
        values = target.values()
    children = shape.children
    if children is None:
        tensors.extend(values)
        return True
    for key, value, child in zip(keys, values, children, strict=True):
        if child is True:
            tensors.append(value)
        elif child is False:
            if isinstance(value, _NOT_OTHER):
                return False
            others.append((target, key))
        elif type(child) is _FlatTuple:
            if (
                type(value) is not tuple
                or len(value) != child.length
                or any(isinstance(item, _NOT_OTHER) for item in value)
            ):
                return False
            others.append((target, key))
        elif type(child) is not _Container or not _collect(value, child, tensors, others):
            return False
    return True


#: what a leaf other than a tensor filled in place may not be in a bound target
_NOT_OTHER = (torch.Tensor, dict, list, tuple)
#: the containers a bound target may have (exact types: a subclass may iterate otherwise)
_BOUND_KINDS = (dict, collections.OrderedDict, list)


class _Unbindable(Exception):
    """A target with a container ``_Container`` does not describe (a subclass, a tuple
    holding tensors or containers)."""


def _shape_of(
    target: Any,
    matched: list[tuple[KeyPath, Any, int]],
    direct: bytearray,
    others: list[int | tuple[int, ...]],
    position: int,
) -> tuple[_Container, int]:
    """``target``'s containers as ``_Container``; its leaves are ``matched[position:]`` in
    turn (``direct``: 1 for those filled in place); the saved leaf index of each other leaf,
    or of the leaves of a flat tuple, is appended to ``others``. Returns the position after
    its leaves. Raises _Unbindable."""
    kind = type(target)
    if kind not in _BOUND_KINDS:
        raise _Unbindable
    keys = None
    values = target
    if kind is not list:
        keys = list(target)
        if not all(type(key) is str or type(key) is int for key in keys):
            raise _Unbindable  # (compared with ==: keep to keys whose == is plain)
        values = target.values()
    children: list[_Container | _FlatTuple | bool] = []
    for value in values:
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            if type(value) is not tuple or any(isinstance(item, _NOT_OTHER) for item in value):
                raise _Unbindable
            if position + len(value) > len(matched):
                raise _Unbindable
            children.append(_FlatTuple(len(value)))
            others.append(tuple(matched[p][2] for p in range(position, position + len(value))))
            position += len(value)
        elif isinstance(value, (dict, list)):
            child, position = _shape_of(value, matched, direct, others, position)
            children.append(child)
        else:
            if position >= len(matched):
                raise _Unbindable
            children.append(bool(direct[position]))
            if not direct[position]:
                others.append(matched[position][2])
            position += 1
    every = all(child is True for child in children)
    return _Container(kind, keys, len(target), None if every else children), position


def _bind(
    plan: _Plan,
    state_dict: Any,
    matched: list[tuple[KeyPath, Any, int]],
    direct: list[int],
) -> _Bound | None:
    """``state_dict`` (matched as ``matched``; ``direct``: the positions of its tensors
    filled in place as they are) bound to ``plan``, or None if it cannot be (a
    container ``_Container`` does not describe, no ``TensorGuards`` in this torch)."""
    if not direct or plan.strided:
        return None  # (strided leaves are read as boxes, which a bound load does not make)
    flags = bytearray(len(matched))
    for position in direct:
        flags[position] = 1
    others: list[int | tuple[int, ...]] = []
    try:
        shape, count = _shape_of(state_dict, matched, flags, others, 0)
    except _Unbindable:
        return None
    if count != len(matched):
        return None
    tensors = [matched[position][1] for position in direct]
    wanted = [index for _, _, index in matched]
    wanted_flags = _wanted_flags(len(plan.tensors), wanted, {})
    runs = _wanted_runs(plan, wanted_flags)
    guard = tensors_guard(tensors)
    if guard is None:
        return None
    direct_indices = [matched[position][2] for position in direct]
    pointers = tensor_addresses(tensors)
    scatters = _scatters(runs, dict(zip(direct_indices, pointers, strict=True)))
    scattered = {
        members[0]
        for file_runs in runs.values()
        for run in file_runs
        if run.number in scatters
        for members in run.members
    }
    return _Bound(
        shape=shape,
        direct=direct_indices,
        others=others,
        wanted=wanted,
        guard=guard,
        pointers=pointers,
        flags=wanted_flags,
        runs=runs,
        scatters=scatters,
        unscattered=[p for p, index in enumerate(direct_indices) if index not in scattered],
    )


def _scatters(runs: dict[str, list[_Run]], pointers: dict[int, int]) -> dict[int, _Scatter]:
    """How to read each of ``runs`` straight into the tensors at ``pointers`` (leaf index ->
    the address of its destination; the runs whose every tensor has one, none tied to
    another): each tensor's bytes into its memory, the bytes between them into a gap
    buffer (as large as the most any run has). Runs take two gap buffers in turn, so that
    one run is read while the last one is hashed (in a thread, ``reading._Digest``)."""
    chosen: list[_Run] = []
    gap_bytes = 0
    for file_runs in runs.values():
        for run in file_runs:
            if all(len(members) == 1 and members[0] in pointers for members in run.members):
                chosen.append(run)
                gap_bytes = max(gap_bytes, sum(_layout(run)[0]))
    if not chosen:
        return {}
    gap_buffers = [torch.empty(max(gap_bytes, 1), dtype=torch.uint8) for _ in range(2)]
    gap_views = [tensor_bytes(buffer) for buffer in gap_buffers]
    addresses = [pointers[members[0]] for run in chosen for members in run.members]
    low = min(addresses)
    high = max(address + size for address, size in zip(addresses, _sizes_of(chosen), strict=True))
    # One raw view over every tensor's memory, sliced per tensor (a view made per tensor
    # costs ~3 us through ctypes; a slice ~0.1 us). Only the slices are ever read into.
    memory = _memoryview_from_memory(low, high - low, _PYBUF_WRITE)
    scatters = {}
    for number, run in enumerate(chosen):
        gap_view = gap_views[number % 2]
        gaps, sizes = _layout(run)
        views: list[memoryview] = []
        lengths: list[int] = []
        at = 0
        for (index,), gap, size in zip(run.members, gaps, sizes, strict=True):
            if gap:
                views.append(gap_view[at : at + gap])
                lengths.append(gap)
                at += gap
            start = pointers[index] - low
            views.append(memory[start : start + size])
            lengths.append(size)
        batches = [
            (views[k : k + IOV_MAX], sum(lengths[k : k + IOV_MAX]))
            for k in range(0, len(views), IOV_MAX)
        ]
        scatters[run.number] = _Scatter(views, batches, gap_buffers[number % 2])
    return scatters


def _layout(run: _Run) -> tuple[list[int], list[int]]:
    """Per tensor of ``run``, in file order: the bytes between it and the one before (or the
    run's start), and its own size (worked out once per run)."""
    if run.layout is None:
        gaps: list[int] = []
        sizes: list[int] = []
        position = run.offset
        base = run.offset - run.pad
        for dtype, shape, _, at in run.specs:
            itemsize = dtype.itemsize
            start = base + at * itemsize
            gaps.append(start - position)
            sizes.append(math.prod(shape) * itemsize)
            position = start + sizes[-1]
        run.layout = (gaps, sizes)
    return run.layout


def _sizes_of(runs: list[_Run]) -> Iterator[int]:
    for run in runs:
        yield from _layout(run)[1]


def _stored_leaves(
    manifest: Manifest,
    leaves: list[Leaf],
    plan: _Plan,
    wanted: list[int],
    flags: bytearray | None,
    allow_pickle: bool,
    values: dict[int, Any],
) -> list[tuple[int, TensorLeaf | ObjectLeaf]]:
    """The wanted leaves (``flags``, None for all; ``wanted`` gives their order) that are
    read one by one (each once: not those of ``plan``'s runs, nor pickled ones unless
    allowed); plain values go straight into ``values``. Raises ValueError for a leaf a
    custom writer stored in its own way, or a pickled one without ``allow_pickle`` (the
    first in ``wanted``'s order)."""
    special = [i for i in plan.special if flags is None or flags[i]]
    if len(special) > 1:
        order = {index: k for k, index in enumerate(wanted)}
        special.sort(key=order.__getitem__)
    objects: list[tuple[int, TensorLeaf | ObjectLeaf]] = []
    for index in special:
        leaf = leaves[index]
        if isinstance(leaf, OpaqueLeaf):
            raise ValueError(
                f"leaf {index} ({leaf.kind}) was stored by the {manifest.format!r} writer in "
                f"its own way; load this checkpoint with that format's loader"
            )
        if not allow_pickle:
            raise ValueError(
                f"leaf {index} was saved as a pickled object; pass allow_pickle=True to load "
                "it, and only for checkpoints you trust"
            )
        assert isinstance(leaf, ObjectLeaf)
        objects.append((index, leaf))
    for index in plan.plain:
        if flags is None or flags[index]:
            leaf = leaves[index]
            assert isinstance(leaf, (ValueLeaf, FloatLeaf, BigIntLeaf, BytesLeaf))
            values[index] = plain_value(leaf)
    singles: list[tuple[int, TensorLeaf | ObjectLeaf]] = [
        (index, leaf) for index, leaf in plan.singles if flags is None or flags[index]
    ]
    return singles + objects


def _map_leaves(
    checkpoint: OpenCheckpoint,
    leaves: list[Leaf],
    boxes: dict[int, _Box],
    source: _Source,
    allow_pickle: bool,
) -> dict[int, Any]:
    """Every leaf's value but the pickled ones, tensors as views over private mappings of
    their files (see ``load``'s ``mmap``); raises ValueError for a tensor to be assembled
    from pieces, or a pickled leaf without ``allow_pickle``."""
    if boxes:
        key_paths = dict(iter_key_paths(source.state.skeleton))
        first = format_key_path(key_paths[min(boxes)])
        raise ValueError(
            f"{first!r} in {checkpoint.root!r} was saved as pieces by {source.saved_world} ranks "
            "and mmap=True cannot join pieces into one view; pass rank= (at the saved world "
            "size) to map that rank's pieces, or load without mmap"
        )
    plan = _plan_for(checkpoint, source.rank)
    values: dict[int, Any] = {}
    # (raises for custom-stored leaves and pickled ones not allowed; plain values)
    _stored_leaves(checkpoint.manifest, leaves, plan, plan.special, None, allow_pickle, values)
    if plan.mapped is None:
        plan.mapped = _map_plan(leaves, plan)
    by_base, odd = plan.mapped
    needed = {name for name, _ in by_base} | {leaf.file for _, leaf in odd}
    files = {
        entry.name: _map_file(checkpoint, entry)
        for entry in checkpoint.manifest.files
        if entry.name in needed
    }
    for (name, dtype), tensors in by_base.items():
        # One typed view of the file; each tensor a strided view of it (one call each).
        storage = files[name]
        base = torch.empty(0, dtype=dtype).set_(
            storage, 0, (storage.nbytes() // dtype.itemsize,), (1,)
        )
        for members, shape, strides, at in tensors:
            tensor = base.as_strided(shape, strides, at)
            for index in members:
                values[index] = tensor
    for members, leaf in odd:
        dtype, shape, _ = plan.tensors[members[0]]  # type: ignore[misc]
        numel = math.prod(shape)
        if numel == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            # safetensors aligns data to 8 bytes, so a complex128 may start between two of
            # its 16-byte elements: a view of the bytes from there, with its own base.
            storage = files[leaf.file]
            array = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            if leaf.strides is None:
                tensor = torch.frombuffer(array, dtype=dtype, count=numel, offset=leaf.offset)
                tensor = tensor.view(shape)
            else:
                strides = tuple(leaf.strides)
                count = strided_extent(shape, strides)
                tensor = torch.frombuffer(array, dtype=dtype, count=count, offset=leaf.offset)
                tensor = tensor.as_strided(shape, strides)
        for index in members:
            values[index] = tensor
    return values


def _map_plan(
    leaves: list[Leaf], plan: _Plan
) -> tuple[
    dict[
        tuple[str, torch.dtype], list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]]
    ],
    list[tuple[tuple[int, ...], TensorLeaf]],
]:
    """Every tensor of ``plan`` as a view of its mapped file: per (file, dtype), the leaves
    saved at each place (tied leaves come back as one tensor, as without mmap) with the
    view's shape, strides and element offset; and those that are no such view (empty, or
    not aligned to their dtype)."""
    places: dict[tuple[str, int, str, tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for index, spec in enumerate(plan.tensors):
        if spec is not None:
            leaf = leaves[index]
            assert isinstance(leaf, TensorLeaf)
            strides = _contiguous_strides(spec[1]) if leaf.strides is None else tuple(leaf.strides)
            key = (leaf.file, leaf.offset, leaf.dtype, spec[1], strides)
            places.setdefault(key, []).append(index)
    by_base: dict[
        tuple[str, torch.dtype], list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]]
    ] = {}
    odd: list[tuple[tuple[int, ...], TensorLeaf]] = []
    for (name, offset, _, shape, strides), members in places.items():
        dtype = plan.tensors[members[0]][0]  # type: ignore[index]
        at, misaligned = divmod(offset, dtype.itemsize)
        leaf = leaves[members[0]]
        assert isinstance(leaf, TensorLeaf)
        if misaligned or not math.prod(shape):
            odd.append((tuple(members), leaf))
        else:
            by_base.setdefault((name, dtype), []).append((tuple(members), shape, strides, at))
    return by_base, odd


def _map_file(checkpoint: OpenCheckpoint, entry: FileEntry) -> torch.UntypedStorage:
    """A private (copy-on-write) mapping of the file of ``entry``, opened by the checked
    rules and found to have the listed size, as a storage that unmaps itself when its last
    tensor goes. Raises CorruptCheckpoint naming the file."""
    fd = open_listed_file(checkpoint, entry)
    try:
        if entry.size == 0:  # nothing to map (mmap refuses a length of 0)
            return torch.empty(0, dtype=torch.uint8).untyped_storage()
        # torch maps the file by name and closes its own descriptor once mapped, so nothing
        # stays open; /proc/self/fd/N names the very file this process opened and checked
        # (the magic link leads to the open file, never to whatever the path names now).
        try:
            storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", False, entry.size)
        except RuntimeError as exc:  # shrunk since it was checked, say
            raise CorruptCheckpoint(
                f"cannot map {entry.name}: {exc}", path=os.path.join(checkpoint.root, entry.name)
            ) from exc
        assert isinstance(storage, torch.UntypedStorage)
        return storage
    finally:
        os.close(fd)


def _read_leaves(
    checkpoint: OpenCheckpoint,
    manifest: Manifest,
    leaves: list[Leaf],
    wanted: list[int],
    destinations: dict[int, torch.Tensor],
    boxes: dict[int, _Box],
    source: _Source,
    verify: bool,
    allow_pickle: bool,
    bound: _Bound | None = None,
) -> dict[int, Any]:
    """Values of the ``wanted`` leaves; tensors go into ``destinations`` where given, and
    the leaves in ``boxes`` are assembled from the saved pieces that overlap their box
    (``bound``: the target these come from, checked, whose runs are read straight into
    its tensors; their values are not set, they are filled in place).
    Raises ValueError for a leaf a custom writer stored in its own way, or a pickled one
    without ``allow_pickle``; CorruptCheckpoint as ``load`` says."""
    plan = _plan_for(checkpoint, source.rank)
    if bound is None:
        if plan.strided:  # (no contiguous bytes to read: each is its own piece's box)
            boxes = {**_own_boxes(leaves, plan.strided, set(wanted)), **boxes}
        flags = _wanted_flags(len(leaves), wanted, boxes)
        runs = _wanted_runs(plan, flags)
    else:
        flags, runs = bound.flags, bound.runs
    values: dict[int, Any] = {}
    stored = _stored_leaves(manifest, leaves, plan, wanted, flags, allow_pickle, values)
    assembled = []
    if boxes:
        key_paths = dict(iter_key_paths(source.state.skeleton))
        assembled = [(i, key_paths[i], leaves[i], box) for i, box in boxes.items()]
    load = _RunLoad(
        plan,
        flags,
        destinations,
        values,
        allocate=not destinations and bound is None,
        scatters=None if bound is None else bound.scatters,
    )
    needed = {leaf.file for _, leaf in stored} | runs.keys()
    for _, key_path, leaf, _ in assembled:
        assert isinstance(leaf, TensorLeaf)
        needed.update(piece.file for piece in source.pieces(key_path, leaf))
    entries = [entry for entry in manifest.files if verify or entry.name in needed]
    # Before any buffer is allocated: a manifest listing a huge tensor must not get one.
    check_file_sizes(checkpoint, entries)
    for first, other in plan.collisions:
        if (flags is None or (flags[first] and flags[other])) and not (
            isinstance(leaves[first], ObjectLeaf) and not allow_pickle
        ):
            leaf = leaves[other]
            assert isinstance(leaf, (TensorLeaf, ObjectLeaf))
            raise CorruptCheckpoint(
                f"two different leaves at offset {leaf.offset}",
                path=os.path.join(checkpoint.root, leaf.file),
            )
    regions = _plan_regions(checkpoint.root, leaves, stored, destinations, values)
    pieces: dict[str, list[_Region]] = {}
    for index, key_path, leaf, box in assembled:
        assert isinstance(leaf, TensorLeaf)
        values[index] = _plan_assembly(source, key_path, leaf, box, destinations.get(index), pieces)
    try:
        for entry in entries:
            file_regions = [*regions.get(entry.name, {}).values(), *pieces.get(entry.name, [])]
            read_listed_file(
                checkpoint,
                entry,
                file_regions,
                verify=verify,
                runs=runs.get(entry.name),
                load=load,
            )
            for region in file_regions:
                if region.after is not None:
                    region.after()
                    continue
                if region.tensor is None:  # a pickled leaf's bytes (allow_pickle was checked)
                    assert region.view is not None
                    value = pickle.loads(region.view.obj)
                else:
                    value = region.tensor
                for index in region.leaves:
                    destination = destinations.get(index)
                    values[index] = value if destination is None else _place(value, destination)
    finally:
        load.close()
    for index in boxes:
        values[index] = _place(values[index], destinations.get(index))
    return values


def _own_boxes(leaves: list[Leaf], indices: list[int], wanted: set[int]) -> dict[int, _Box]:
    """The saved box of each wanted tensor leaf of ``indices``."""
    boxes: dict[int, _Box] = {}
    for index in indices:
        leaf = leaves[index]
        if index in wanted and isinstance(leaf, TensorLeaf):
            boxes[index] = _saved_box(leaf)
    return boxes


def _wanted_flags(count: int, wanted: list[int], boxes: dict[int, _Box]) -> bytearray | None:
    """Leaf index -> 1 for the ``wanted`` leaves read as saved (not those in ``boxes``); None
    when that is every one of the ``count`` leaves (then no test per leaf is needed)."""
    marks = bytearray(count)
    for index in wanted:
        marks[index] = 1
    for index in boxes:
        marks[index] = 0
    return None if all(marks) else marks


def _wanted_runs(plan: _Plan, flags: bytearray | None) -> dict[str, list[_Run]]:
    """The runs of ``plan`` holding a leaf ``flags`` wants, per file."""
    if flags is None:
        return plan.runs
    runs: dict[str, list[_Run]] = {}
    for name, file_runs in plan.runs.items():
        kept = [run for run in file_runs if any(flags[i] for m in run.members for i in m)]
        if kept:
            runs[name] = kept
    return runs


def _plan_assembly(
    source: _Source,
    key_path: KeyPath,
    leaf: TensorLeaf,
    box: _Box,
    destination: torch.Tensor | None,
    regions: dict[str, list[_Region]],
) -> torch.Tensor:
    """A tensor for ``box`` of the tensor ``leaf`` is a piece of, and the regions (added to
    ``regions``) that fill it from the saved pieces: only the bytes of each piece that the
    box overlaps (from its first to its last element), straight into the tensor where that
    part of it is contiguous. Raises CorruptCheckpoint if the pieces do not cover the box
    exactly once."""
    dtype = dtype_from_name(leaf.dtype)
    if destination is not None and destination.dtype == dtype:
        tensor = destination
    else:
        tensor = _empty(box.sizes, dtype, source.checkpoint.root)
    covered = 0
    placed: list[_Box] = []
    #: (piece, its box, the part of it wanted) of every piece the box overlaps
    used: list[tuple[TensorLeaf, _Box, _Box]] = []
    for piece in source.pieces(key_path, leaf):
        saved = _saved_box(piece)
        overlap = _overlap(saved, box)
        if overlap is None:
            continue
        if piece.dtype != leaf.dtype or any(_overlap(saved, p) for p in placed):
            raise CorruptCheckpoint(
                f"{format_key_path(key_path)!r}: its saved pieces overlap or disagree on dtype",
                path=os.path.join(source.checkpoint.root, MANIFEST_NAME),
            )
        placed.append(saved)
        covered += math.prod(overlap.sizes)
        used.append((piece, saved, overlap))
    if covered != math.prod(box.sizes):
        raise CorruptCheckpoint(
            f"{format_key_path(key_path)!r}: the pieces saved by {source.saved_world} ranks "
            f"cover {covered} of the {math.prod(box.sizes)} elements wanted "
            f"({list(box.sizes)} at {list(box.offset)} of {list(box.whole)})",
            path=os.path.join(source.checkpoint.root, MANIFEST_NAME),
        )
    stored = _stored_whole(used)
    if stored is not None:
        used = [(stored, _saved_box(stored), box)]
    for piece, saved, overlap in used:
        regions.setdefault(piece.file, []).append(_piece_region(piece, saved, overlap, box, tensor))
    return tensor


def _stored_whole(used: list[tuple[TensorLeaf, _Box, _Box]]) -> TensorLeaf | None:
    """The whole tensor that the pieces of ``used`` all lie strided in, where they do (a
    safetensors file stores every tensor whole), so that what the box wants is read once from
    it rather than once per piece, each read spanning most of the whole (column pieces);
    None otherwise."""
    if len(used) < 2:
        return None
    places: set[tuple[str, int]] = set()
    whole: list[int] = []
    for piece, _, _ in used:
        if piece.strides is None or piece.global_shape is None or piece.global_offset is None:
            return None
        whole = piece.global_shape
        strides = _contiguous_strides(tuple(whole))
        if tuple(piece.strides) != strides:
            return None
        first = sum(o * s for o, s in zip(piece.global_offset, strides, strict=True))
        places.add((piece.file, piece.offset - first * dtype_from_name(piece.dtype).itemsize))
    if len(places) != 1:
        return None
    ((file, offset),) = places
    if offset < 0:
        return None
    return TensorLeaf(file, offset, used[0][0].dtype, whole, whole, [0] * len(whole))


def _overlap(a: _Box, b: _Box) -> _Box | None:
    """The part of ``a`` that ``b`` also covers (offsets in the whole), or None."""
    starts = tuple(max(x, y) for x, y in zip(a.offset, b.offset, strict=True))
    ends = tuple(
        min(x + n, y + m) for x, n, y, m in zip(a.offset, a.sizes, b.offset, b.sizes, strict=True)
    )
    if any(end <= start for start, end in zip(starts, ends, strict=True)) and starts:
        return None
    return _Box(a.whole, starts, tuple(e - s for s, e in zip(starts, ends, strict=True)))


def _piece_region(
    piece: TensorLeaf, saved: _Box, overlap: _Box, box: _Box, tensor: torch.Tensor
) -> _Region:
    """The region of ``piece``'s file holding ``overlap``, and where its bytes go."""
    itemsize = tensor.element_size()
    strides = _contiguous_strides(saved.sizes) if piece.strides is None else tuple(piece.strides)
    within = [o - s for o, s in zip(overlap.offset, saved.offset, strict=True)]
    first = sum(i * st for i, st in zip(within, strides, strict=True))
    last = sum((i + n - 1) * st for i, n, st in zip(within, overlap.sizes, strides, strict=True))
    count = last - first + 1
    target = tensor
    for dim, (start, size) in enumerate(zip(overlap.offset, overlap.sizes, strict=True)):
        target = target.narrow(dim, start - box.offset[dim], size)
    offset = piece.offset + first * itemsize
    if (
        count == math.prod(overlap.sizes)
        and target.is_contiguous()
        and (piece.strides is None or _is_row_major(overlap.sizes, strides))
    ):
        direct = tensor_bytes(target)
        return _Region(offset, direct.nbytes, [], view=direct, after=_nothing)
    scratch = torch.empty(count, dtype=tensor.dtype)
    view = scratch.as_strided(overlap.sizes, strides)

    def copy() -> None:
        with torch.no_grad():
            target.copy_(view)

    read = tensor_bytes(scratch)
    return _Region(offset, read.nbytes, [], view=read, after=copy)


def _nothing() -> None:
    pass


def _is_row_major(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether elements with these strides lie in row-major order, without gaps."""
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@functools.lru_cache(maxsize=1024)  # a load asks again for each tensor of a shape
def _contiguous_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(sizes)
    for dim in range(len(sizes) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * sizes[dim + 1]
    return tuple(strides)


def _plan_regions(
    root: str,
    leaves: list[Leaf],
    stored: list[tuple[int, TensorLeaf | ObjectLeaf]],
    destinations: dict[int, torch.Tensor],
    values: dict[int, Any],
) -> dict[str, dict[int, _Region]]:
    """The regions to read per file, by offset; empty tensors go straight into ``values``."""
    regions: dict[str, dict[int, _Region]] = {}
    for index, leaf in stored:
        by_offset = regions.get(leaf.file)
        if by_offset is None:
            by_offset = regions[leaf.file] = {}
        shared = by_offset.get(leaf.offset)
        if shared is not None and leaves[shared.leaves[0]] == leaf:
            shared.leaves.append(index)  # saved once for several leaves (tied weights)
            continue
        if isinstance(leaf, ObjectLeaf):
            region = _Region(leaf.offset, leaf.nbytes, [index], memoryview(bytearray(leaf.nbytes)))
        else:
            dtype = dtype_from_name(leaf.dtype)
            shape = tuple(leaf.shape)
            region = _Region(
                leaf.offset,
                math.prod(shape) * dtype.itemsize,
                [index],
                tensor=destinations.get(index),
                dtype=dtype,
                shape=shape,
            )
            if region.nbytes == 0:  # nothing to read (and may share an offset)
                values[index] = region.tensor
                if region.tensor is None:
                    values[index] = torch.empty(shape, dtype=dtype)
                continue
            if region.tensor is None:  # allocated before any read, as the manifest says
                region.tensor = _empty(shape, dtype, root)
        if shared is not None:
            raise CorruptCheckpoint(
                f"two different leaves at offset {leaf.offset}", path=os.path.join(root, leaf.file)
            )
        by_offset[leaf.offset] = region
    return regions


def _empty(shape: tuple[int, ...], dtype: torch.dtype, root: str) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype)
    except RuntimeError as exc:  # a shape no memory can hold: the manifest is wrong
        raise CorruptCheckpoint(
            f"cannot allocate tensor entry: {exc}", path=os.path.join(root, MANIFEST_NAME)
        ) from exc


def _place(value: Any, destination: torch.Tensor | None) -> Any:
    # A tied destination (two leaves of state_dict saved as one) gets its own copy.
    if destination is not None and destination is not value:
        with torch.no_grad():
            destination.copy_(value)
        return destination
    return value


#: tensors up to this size are not read one by one: runs of them are read with one call and
#: hashed with one update (per-tensor Python would dominate)
_SMALL_BYTES = 256 << 10
#: a run of small tensors ends at a gap larger than this (it is hashed through scratch, or,
#: without verify, skipped)
_RUN_GAP = 64 << 10
#: an allocating load's small tensors are views of one buffer per run of at most this many
#: bytes (one allocation and no copy; a tensor kept alone keeps at most this much alive)
_RUN_BYTES = 4 << 20
#: buffers of runs start at this alignment relative to the file, so that every tensor the
#: writer aligned (DCP: 64 bytes, safetensors: 8) is a view of its dtype in place
_ALIGN = 64
