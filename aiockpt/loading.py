"""Verifying and loading checkpoints through their manifest, without unpickling.

``load`` reads every tensor from the raw bytes the manifest points at (for DCP checkpoints,
inside each ``torch.save`` archive) and plain values from the manifest itself, so neither
DCP's pickled ``.metadata`` nor any data item is ever unpickled. Only leaves the user saved as
arbitrary objects (after opting into pickling) are pickles, and ``load`` refuses them unless
the caller passes ``allow_pickle=True``.

With ``verify=True`` every file the manifest names is read once, front to back: tensor bytes
land directly in their destination tensors and are hashed on the way, the bytes in between are
hashed through a scratch buffer, and the xxh3_64 digest and size are compared with the
manifest's before any value is handed out.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
import xxhash

from aiockpt.errors import CorruptCheckpoint
from aiockpt.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BigIntLeaf,
    BytesLeaf,
    FileEntry,
    FloatLeaf,
    Manifest,
    ObjectLeaf,
    OpaqueLeaf,
    TensorLeaf,
    ValueLeaf,
    check_relative_name,
    decode_manifest,
    plain_value,
)
from aiockpt.tree import KeyPath, flatten, format_key_path, iter_key_paths, unflatten
from aiockpt.writers.base import dtype_from_name, is_tensor, tensor_bytes

__all__ = ["load", "read_manifest", "verify"]

_SCRATCH_BYTES = 8 << 20


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest of the checkpoint at ``path``, checked for internal consistency.

    Raises FileNotFoundError if ``path`` does not exist, CorruptCheckpoint (naming the
    manifest) if it has no manifest, or one that cannot be decoded, comes from a newer
    format version, or names files outside the directory or leaves it does not have.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoint directory at {root!r}")
    manifest_path = os.path.join(root, MANIFEST_NAME)
    try:
        with open(manifest_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptCheckpoint(
            f"{root!r} has no {MANIFEST_NAME}: it was never committed", path=manifest_path
        ) from None
    try:
        manifest = decode_manifest(data)
        _check_consistent(manifest)
    except (msgspec.DecodeError, ValueError) as exc:
        raise CorruptCheckpoint(f"unreadable manifest: {exc}", path=manifest_path) from exc
    return manifest


def _check_consistent(manifest: Manifest) -> None:
    if manifest.format_version > FORMAT_VERSION:
        raise ValueError(
            f"format version {manifest.format_version} is newer than this aiockpt reads "
            f"({FORMAT_VERSION})"
        )
    names = {check_relative_name(f.name) for f in manifest.files}
    if manifest.ranks and len(manifest.ranks) != manifest.world_size - 1:
        raise ValueError(f"{len(manifest.ranks) + 1} ranks described, world_size says otherwise")
    for state in [manifest.rank_state(0), *manifest.ranks]:
        for leaf in state.leaves:
            if isinstance(leaf, (TensorLeaf, ObjectLeaf)) and leaf.file not in names:
                raise ValueError(f"a leaf points into {leaf.file!r}, which is not listed")
            if isinstance(leaf, TensorLeaf):
                dtype_from_name(leaf.dtype)
                if any(size < 0 for size in leaf.shape):
                    raise ValueError(f"negative size in tensor shape {leaf.shape}")
        indices = sorted(index for index, _ in iter_key_paths(state.skeleton))
        if indices != list(range(len(state.leaves))):
            raise ValueError("skeleton and leaves disagree")


def verify(path: str | os.PathLike[str]) -> Manifest:
    """Check every file of the checkpoint at ``path`` against its manifest; return it.

    Raises CorruptCheckpoint naming the first file that is missing, has another size
    (truncated) or another xxh3_64 digest (a flipped byte), or the manifest if it is absent or
    unreadable; FileNotFoundError if ``path`` does not exist.
    """
    manifest = read_manifest(path)
    for entry in manifest.files:
        _read_file(os.fspath(path), entry, [], verify=True)
    return manifest


def load(
    path: str | os.PathLike[str],
    state_dict: Any = None,
    *,
    verify: bool = True,
    allow_pickle: bool = False,
    rank: int = 0,
) -> Any:
    """Load the checkpoint at ``path`` (either format) as CPU tensors and plain values.

    A checkpoint saved by several ranks holds one state dict per rank; ``rank`` picks which
    (each rank resuming at the same world size loads its own; DTensors in ``state_dict``
    receive their local shard). To load into another world size, use
    ``torch.distributed.checkpoint.load`` on a ``format="dcp"`` checkpoint: it reshards.

    Without ``state_dict``, return the saved tree exactly (int keys, tuples, nesting). With
    one, fill it in place torch-style and return it: for each of its leaves, tensors are
    overwritten with ``copy_`` (shapes must match; dtypes convert), anything else is replaced
    by the saved value; keys the checkpoint has but ``state_dict`` lacks are not read. A tuple
    is immutable, so a tuple in ``state_dict`` is replaced by a new one in its container.

    ``verify`` checks every file's size and xxh3_64 digest in the same pass that reads it.
    ``allow_pickle`` lets leaves that were saved as arbitrary objects be unpickled: only for
    checkpoints you trust.

    Raises CorruptCheckpoint naming the file for a missing manifest, a missing, truncated or
    altered file (on failure the tensors of ``state_dict`` may be partly overwritten, its
    other leaves are not); FileNotFoundError if ``path`` does not exist; KeyError naming the
    key path for a leaf of ``state_dict`` the checkpoint does not have; ValueError for a shape
    mismatch, for a pickled leaf without ``allow_pickle``, for a leaf a custom writer stored
    in its own format, or for a ``rank`` the checkpoint does not have.
    """
    root = os.fspath(path)
    manifest = read_manifest(root)
    if rank != 0 or manifest.ranks:
        state = manifest.rank_state(rank)
        manifest = msgspec.structs.replace(manifest, skeleton=state.skeleton, leaves=state.leaves)
    if state_dict is None:
        wanted = list(range(len(manifest.leaves)))
        values = _read_leaves(root, manifest, wanted, {}, verify, allow_pickle)
        return unflatten(manifest.skeleton, [values[i] for i in wanted])
    saved_at = {key_path: index for index, key_path in iter_key_paths(manifest.skeleton)}
    _, targets = flatten(state_dict, is_tensor)
    sources: dict[KeyPath, int] = {}
    destinations: dict[int, torch.Tensor] = {}
    for key_path, target in targets:
        if key_path not in saved_at:
            raise KeyError(f"{format_key_path(key_path)!r} is not in the checkpoint at {root!r}")
        index = sources[key_path] = saved_at[key_path]
        leaf = manifest.leaves[index]
        if isinstance(target, torch.Tensor) and isinstance(leaf, TensorLeaf):
            target = _local_tensor(target)
            if list(target.shape) != leaf.shape:
                raise ValueError(
                    f"{format_key_path(key_path)!r}: the checkpoint has shape {leaf.shape}, "
                    f"the state dict {list(target.shape)}"
                )
            if _can_read_into(target, leaf):
                destinations.setdefault(index, target)
    values = _read_leaves(
        root, manifest, list(sources.values()), destinations, verify, allow_pickle
    )
    return _fill(state_dict, (), lambda key_path: values[sources[key_path]])


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what its rank saved), any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _can_read_into(target: torch.Tensor, leaf: TensorLeaf) -> bool:
    return (
        target.device.type == "cpu"
        and target.is_contiguous()
        and not target.requires_grad
        and target.dtype == dtype_from_name(leaf.dtype)
    )


def _fill(target: Any, key_path: KeyPath, saved: Callable[[KeyPath], Any]) -> Any:
    """Put saved values into ``target``'s containers, mirroring ``tree.flatten``'s rules."""
    if isinstance(target, torch.Tensor):
        value = saved(key_path)
        if not isinstance(value, torch.Tensor):
            return value
        if value is not target:
            with torch.no_grad():
                _local_tensor(target).copy_(value)
        return target
    if isinstance(target, dict):
        for key in list(target):
            target[key] = _fill(target[key], (*key_path, key), saved)
        return target
    if isinstance(target, list):
        for i, item in enumerate(target):
            target[i] = _fill(item, (*key_path, i), saved)
        return target
    if isinstance(target, tuple) and not hasattr(target, "_fields"):
        return tuple(_fill(item, (*key_path, i), saved) for i, item in enumerate(target))
    return saved(key_path)


@dataclass
class _Region:
    """Bytes of one file that go into one buffer (shared by leaves saved at the same place)."""

    offset: int
    view: memoryview
    leaves: list[int] = field(default_factory=list)


def _read_leaves(
    root: str,
    manifest: Manifest,
    wanted: list[int],
    destinations: dict[int, torch.Tensor],
    verify: bool,
    allow_pickle: bool,
) -> dict[int, Any]:
    """Values of the ``wanted`` leaves; tensors go into ``destinations`` where given."""
    values: dict[int, Any] = {}
    regions: dict[str, dict[int, _Region]] = {}
    buffers: dict[int, Any] = {}
    for index in dict.fromkeys(wanted):
        leaf = manifest.leaves[index]
        if isinstance(leaf, (ValueLeaf, FloatLeaf, BigIntLeaf, BytesLeaf)):
            values[index] = plain_value(leaf)
            continue
        if isinstance(leaf, OpaqueLeaf):
            raise ValueError(
                f"leaf {index} ({leaf.kind}) was stored by the {manifest.format!r} writer in "
                f"its own way; load this checkpoint with that format's loader"
            )
        if isinstance(leaf, ObjectLeaf) and not allow_pickle:
            raise ValueError(
                f"leaf {index} was saved as a pickled object; pass allow_pickle=True to load "
                "it, and only for checkpoints you trust"
            )
        by_offset = regions.setdefault(leaf.file, {})
        shared = by_offset.get(leaf.offset)
        if shared is not None and manifest.leaves[shared.leaves[0]] == leaf:
            shared.leaves.append(index)  # saved once for several leaves (tied weights)
            continue
        buffer, view = _new_buffer(leaf, destinations.get(index), root)
        if view.nbytes == 0:  # empty tensors have nothing to read (and may share offsets)
            values[index] = buffer
            continue
        if shared is not None:
            raise CorruptCheckpoint(
                f"two different leaves at offset {leaf.offset}", path=os.path.join(root, leaf.file)
            )
        by_offset[leaf.offset] = _Region(leaf.offset, view, [index])
        buffers[index] = buffer
    entries = {entry.name: entry for entry in manifest.files}
    names = list(entries) if verify else list(regions)
    for name in names:
        file_regions = sorted(regions.get(name, {}).values(), key=lambda r: r.offset)
        _read_file(root, entries[name], file_regions, verify=verify)
        for region in file_regions:
            first = buffers[region.leaves[0]]
            value = pickle.loads(first) if isinstance(first, bytearray) else first
            for index in region.leaves:
                values[index] = _place(value, destinations.get(index))
    return values


def _new_buffer(
    leaf: TensorLeaf | ObjectLeaf, destination: torch.Tensor | None, root: str
) -> tuple[Any, memoryview]:
    if isinstance(leaf, ObjectLeaf):
        data = bytearray(leaf.nbytes)
        return data, memoryview(data)
    if destination is not None:
        return destination, tensor_bytes(destination)
    try:
        tensor = torch.empty(leaf.shape, dtype=dtype_from_name(leaf.dtype))
    except RuntimeError as exc:  # a shape no memory can hold: the manifest is wrong
        raise CorruptCheckpoint(
            f"cannot allocate tensor entry: {exc}", path=os.path.join(root, MANIFEST_NAME)
        ) from exc
    return tensor, tensor_bytes(tensor)


def _place(value: Any, destination: torch.Tensor | None) -> Any:
    # A tied destination (two leaves of state_dict saved as one) gets its own copy.
    if destination is not None and destination is not value:
        with torch.no_grad():
            destination.copy_(value)
        return destination
    return value


def _read_file(root: str, entry: FileEntry, regions: list[_Region], *, verify: bool) -> None:
    """Read ``regions`` of one file into their views; with ``verify``, read and hash the whole
    file and compare with ``entry``. Raises CorruptCheckpoint naming the file."""
    full = os.path.join(root, entry.name)
    try:
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise CorruptCheckpoint(f"cannot open checkpoint file: {exc}", path=full) from exc
    try:
        size = os.fstat(fd).st_size
        if size != entry.size:
            raise CorruptCheckpoint(
                f"{entry.name} has {size} bytes, the manifest says {entry.size} (truncated?)",
                path=full,
            )
        digest = xxhash.xxh3_64() if verify else None
        position = 0
        for region in regions:
            end = region.offset + region.view.nbytes
            if region.offset < position or end > size:
                raise CorruptCheckpoint(
                    f"entry at {region.offset}..{end} overlaps another or the end", path=full
                )
            if digest is not None:
                _hash_range(fd, position, region.offset, digest, full)
            _read_exactly(fd, region.view, region.offset, full)
            if digest is not None:
                digest.update(region.view)
            position = end
        if digest is not None:
            _hash_range(fd, position, size, digest, full)
            if digest.hexdigest() != entry.xxh3_64:
                raise CorruptCheckpoint(
                    f"{entry.name} does not match its xxh3_64 checksum (altered or corrupt)",
                    path=full,
                )
    finally:
        os.close(fd)


def _hash_range(fd: int, start: int, end: int, digest: Any, full: str) -> None:
    for view in _chunks(end - start):
        _read_exactly(fd, view, start, full)
        digest.update(view)
        start += view.nbytes


def _chunks(nbytes: int) -> Iterator[memoryview]:
    if nbytes <= 0:
        return
    scratch = memoryview(bytearray(min(nbytes, _SCRATCH_BYTES)))
    while nbytes > 0:
        view = scratch[: min(nbytes, scratch.nbytes)]
        yield view
        nbytes -= view.nbytes


def _read_exactly(fd: int, view: memoryview, offset: int, full: str) -> None:
    while view.nbytes:
        count = os.preadv(fd, [view], offset)
        if count == 0:
            raise CorruptCheckpoint("file ended early", path=full)
        view = view[count:]
        offset += count
