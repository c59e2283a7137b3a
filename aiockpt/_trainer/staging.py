"""Staging: copy a state dict's tensors, once, into a shared-memory arena the worker maps.

A save is *staged* once every tensor has been copied out: from then on the caller may change
its tensors. The copy is the only pass over the tensor bytes in the trainer; the worker writes
files straight from its mapping of the same memory, and frames carry only descriptions.

Arenas are anonymous shared memory (``memfd_create``), pre-allocated so that running out of
memory is an ``OSError`` here rather than a SIGBUS in the middle of a copy. No name ever
exists in /dev/shm: the worker (a child of the trainer, same user) maps an arena by opening
``/proc/<trainer pid>/fd/<fd>``, so an arena lives exactly as long as the trainer's descriptor
and the two mappings. A crash of either process leaks nothing, nothing needs sweeping, and
the size of /dev/shm (64 MiB in Docker by default) does not limit saves. The memory is
owner-only (0600) like any file the trainer creates for itself. An arena is reused by every
later save that fits in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import itertools
import logging
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from aiockpt._format.tree import MAX_DEPTH, KeyPath, Node, flatten, format_key_path
from aiockpt._runtime import collection_paused, finish_even_if_cancelled, libc_function
from aiockpt._wire.protocol import ArenaRef, Leaf, ShardSpec, StateDictPayload, TensorInArena
from aiockpt._wire.tensors import (
    dtype_name,
    is_tensor,
    tensor_addresses,
    tensors_guard,
    value_leaf,
)

logger = logging.getLogger("aiockpt._trainer.staging")

__all__ = [
    "ARENA_NAME",
    "PlanCache",
    "SharedArena",
    "StagingPlan",
    "copy_into_arena",
    "plan_staging",
    "take_fitting_arena",
]

#: the name of every arena's memfd: ``/proc/<pid>/maps`` shows ``/memfd:aiockpt-arena (deleted)``
ARENA_NAME = "aiockpt-arena"
#: tensor offsets are aligned so that every dtype's view of the arena is aligned
ALIGNMENT = 64
#: plan layouts an arena keeps views for (saves alternating between a few structures)
_VIEWS_KEPT = 4


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


_plan_ids = itertools.count(1)


@dataclass
class StagingPlan:
    """Where each tensor of one state dict goes in an arena, and what frames say about it.

    ``plan_id`` names the arena layout: a save of the same structure reuses the plan (see
    ``PlanCache``) with this save's tensors in ``sources``, and arenas keep their views for it.
    """

    skeleton: Node
    leaves: list[Leaf]
    #: the tensors to copy, each once (a tensor met twice, tied weights, is copied once)...
    sources: list[torch.Tensor]
    #: ...and where each goes in the arena
    offsets: list[int]
    #: arena bytes needed
    nbytes: int
    has_cuda: bool = field(default=False)
    #: whether some tensor is a rank's piece of a sharded one (a DTensor)
    shards: bool = field(default=False)
    plan_id: int = field(default_factory=lambda: next(_plan_ids))
    #: how to stage while the write runs (see ``pipeline_chunks``); None: in one go
    chunks: list[tuple[int, int, int]] | None = field(default=None)

    def payload(self, arena: SharedArena | None) -> StateDictPayload:
        return StateDictPayload(
            self.skeleton, self.leaves, arena.ref if arena else None, plan_id=self.plan_id
        )


def plan_staging(state_dict: Any, *, allow_pickle: bool = False) -> StagingPlan:
    """Lay out ``state_dict``'s tensors in an arena; nothing is copied yet.

    A DTensor is staged as its local tensor plus where that lies in the whole (``ShardSpec``);
    a replicated one as a plain tensor.

    Raises ``TypeError`` naming the key for an entry that cannot be checkpointed (an object
    that is not a plain value unless ``allow_pickle``, a sparse, quantized or meta tensor, a
    DTensor with a ``Partial`` placement, a dict key that is not str or int), before anything
    is written.
    """
    skeleton, flat = flatten(state_dict, is_tensor)
    leaves: list[Leaf] = []
    sources: list[torch.Tensor] = []
    offsets: list[int] = []
    seen: dict[tuple[Any, ...], TensorInArena] = {}
    offset = 0
    has_cuda = shards = False
    for path, value in flat:
        if not is_tensor(value):
            leaves.append(value_leaf(path, value, allow_pickle=allow_pickle))
            continue
        value, shard = _local_piece(value, path)
        shards = shards or shard is not None
        tensor = _checkpointable(value, path)
        identity = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.dtype,
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        leaf = seen.get(identity)
        if leaf is None:
            nbytes = tensor.numel() * tensor.element_size()
            leaf = TensorInArena(
                dtype_name(tensor.dtype), list(tensor.shape), offset, nbytes, shard
            )
            seen[identity] = leaf
            if nbytes:  # nothing to copy for an empty tensor
                sources.append(tensor)
                offsets.append(offset)
            offset = _aligned(offset + nbytes)
            has_cuda = has_cuda or tensor.is_cuda
        leaves.append(leaf)
    chunks = pipeline_chunks(sources, offsets, offset, has_cuda)
    return StagingPlan(skeleton, leaves, sources, offsets, offset, has_cuda, shards, chunks=chunks)


class PlanCache:
    """Reuses the last plan while saves keep the same structure, as DCP caches its plans.

    A repeated save costs one walk over the state dict plus a fingerprint per tensor (type,
    dtype, shape, device, layout; placements for DTensors) compared with the last one in C
    (list equality); no key paths, no leaf descriptions, no arena layout. Anything that
    differs (a key, a container, a dtype, a shape, a device, tensors that start or stop
    sharing memory) makes a new plan with ``plan_staging``, which also does every check.
    """

    def __init__(self) -> None:
        self._last: StagingPlan | None = None
        self._structure: list[Any] = []
        self._fingerprint: list[Any] = []
        self._pointers: list[int] = []
        self._tied = False
        self._local = False
        self._copies_every_leaf = False
        #: ``_placement`` of the last plain, untied leaves (None: not such leaves)
        self._placed: list[Any] | None = None
        #: a ``tensors_guard`` over those leaves' tensors (None: not such leaves, or no guard)
        self._guard: Any = None
        #: indices of the leaves that are tensors (the guard's, in order)
        self._tensor_leaves: list[int] = []
        #: indices of the non-empty tensor leaves
        self._used: list[int] = []
        #: indices of the leaves that are not tensors
        self._plain_leaves: list[int] = []
        #: index of the leaf each copy of the plan reads
        self._copied: list[int] = []
        self._allow_pickle = False

    def plan(self, state_dict: Any, *, allow_pickle: bool = False) -> StagingPlan:
        """``plan_staging(state_dict)``, reusing the last plan when the structure is the
        same. Raises what ``plan_staging`` raises."""
        values: list[Any] = []
        structure: list[Any] = []
        # The walk allocates a few objects per leaf, which would set off the garbage
        # collector's full passes over the trainer's heap (most of the time a repeated plan
        # took with 20,000 tensors); it has nothing to collect here.
        with collection_paused():
            walked = _walk(state_dict, values, structure, 0)
            last = self._last
            if (
                walked
                and last is not None
                and allow_pickle == self._allow_pickle
                and structure == self._structure
            ):
                reused = self._reuse_if_same(last, values, allow_pickle)
                if reused is not None:
                    return reused
        plan = plan_staging(state_dict, allow_pickle=allow_pickle)
        if walked:
            self._remember(plan, values, structure, allow_pickle)
        else:
            self._last = None
        return plan

    def _remember(
        self, plan: StagingPlan, values: list[Any], structure: list[Any], allow_pickle: bool
    ) -> None:
        # Not the tensors themselves: the cache must not keep the caller's memory alive.
        self._last = dataclasses.replace(plan, sources=[])
        self._structure, self._allow_pickle = structure, allow_pickle
        self._fingerprint = _fingerprint(values)
        self._plain_leaves = []
        first_use: dict[int, int] = {}
        self._used = []
        for index, leaf in enumerate(plan.leaves):
            if not isinstance(leaf, TensorInArena):
                self._plain_leaves.append(index)
            elif leaf.nbytes:
                self._used.append(index)
                first_use.setdefault(leaf.offset, index)
        # Copies in plan order, each from the first leaf that uses its region.
        self._copied = [first_use[offset] for offset in plan.offsets]
        self._tied = len(self._used) != len(plan.offsets)
        self._local = any(_sharding(v) for v in values if isinstance(v, torch.Tensor))
        #: every leaf is a tensor copied in leaf order: the sources are the leaves
        self._copies_every_leaf = not self._local and self._copied == list(range(len(values)))
        self._pointers = self._identities(values, self._sources(values))
        self._placed, self._guard = None, None
        if not self._tied and not self._local:
            with contextlib.suppress(RuntimeError):
                self._placed = _placement(values)
            self._tensor_leaves = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
            if self._placed is not None:
                self._guard = tensors_guard([values[i] for i in self._tensor_leaves])

    def _reuse_if_same(
        self, last: StagingPlan, values: list[Any], allow_pickle: bool
    ) -> StagingPlan | None:
        """``_reuse`` when ``values`` fit ``last``; None when they do not. Untied plain
        tensors in one pass over them (``_placement``): the same tensors in place (a
        training run's) compare equal at once, other ones of the same fingerprint are
        checked for memory they start to share."""
        if self._guard is not None:
            reused = self._reuse_guarded(last, values, allow_pickle)
            if reused is not None:
                return reused
        placed = None
        if self._placed is not None:
            with contextlib.suppress(RuntimeError):  # a tensor without storage: not here
                placed = _placement(values)
        if placed is None:
            if _fingerprint(values) != self._fingerprint:
                return None
            return self._reuse(last, values, allow_pickle)
        pointers = self._pointers
        if placed != self._placed:
            fingerprint = [p[:5] if type(p) is tuple else p for p in placed]
            if fingerprint != self._fingerprint:
                return None
            pointers = [placed[i][5] for i in self._copied]  # untied: the sources'
        reused = self._reuse(last, values, allow_pickle, pointers)
        if reused is not None:
            self._placed = placed
            if self._guard is not None:  # what only the guard saw changed: guard these now
                self._guard = tensors_guard([values[i] for i in self._tensor_leaves])
        return reused

    def _reuse_guarded(
        self, last: StagingPlan, values: list[Any], allow_pickle: bool
    ) -> StagingPlan | None:
        """``_reuse`` when the last plan's untied plain tensors pass its guard (types,
        dtypes, devices, sizes, strides checked in C: ~0.4 us a tensor with their addresses,
        ~1.1 us for ``_placement``'s attributes); None when they do not (the slower path
        then says why, or plans anew)."""
        tensors = values if self._copies_every_leaf else [values[i] for i in self._tensor_leaves]
        try:
            if not self._guard.check(*tensors):
                return None
        except TypeError:  # a leaf that was a tensor is not one now
            return None
        pointers = tensor_addresses(self._sources(values))
        return self._reuse(last, values, allow_pickle, pointers)

    def _sources(self, values: list[Any]) -> list[torch.Tensor]:
        if self._copies_every_leaf:
            return values
        sources = [values[i] for i in self._copied]
        if self._local:  # DTensors are staged as their local pieces
            sources = [_local_piece(t, ())[0] for t in sources]
        return sources

    def _identities(self, values: list[Any], sources: list[torch.Tensor]) -> list[Any]:
        """Where the copied tensors' memory is; with tied tensors, where every tensor's is
        (so that a tie that came apart is noticed)."""
        if not self._tied:
            return [t.data_ptr() for t in sources]
        used = [values[i] for i in self._used]
        if self._local:
            used = [_local_piece(t, ())[0] for t in used]
        return [(t.data_ptr(), t.stride()) for t in used]

    def _reuse(
        self,
        last: StagingPlan,
        values: list[Any],
        allow_pickle: bool,
        pointers: list[Any] | None = None,
    ) -> StagingPlan | None:
        """``last`` with this save's tensors and plain values; None when it does not fit
        after all (tensors that start sharing memory, a value that cannot be encoded).
        ``pointers``: ``_identities`` of ``values`` when known already."""
        sources = self._sources(values)
        if pointers is None:
            pointers = self._identities(values, sources)
        # A plan copies tied tensors once: reuse it only while the same tensors are tied, and
        # an untied plan only while no two tensors start sharing memory.
        if pointers != self._pointers and (self._tied or len(set(pointers)) != len(pointers)):
            return None
        leaves = last.leaves
        if self._plain_leaves:
            # Plain values (the step, a learning rate) change from save to save.
            leaves = list(leaves)
            try:
                for index in self._plain_leaves:
                    leaves[index] = value_leaf((), values[index], allow_pickle=allow_pickle)
            except TypeError:
                return None  # plan_staging raises it again, naming the key
        self._pointers = pointers
        return StagingPlan(
            last.skeleton,
            leaves,
            sources,
            last.offsets,
            last.nbytes,
            last.has_cuda,
            last.shards,
            last.plan_id,
            last.chunks,
        )


def _walk(value: Any, values: list[Any], structure: list[Any], depth: int) -> bool:
    """Collect the leaves of ``value`` as ``flatten`` orders them, and a description of its
    containers (kinds, key tuples with their types, lengths) that compares with ``==``.
    False when the tree is too deep to walk here (``flatten`` then says why)."""
    # Containers are told apart first: isinstance(a dict, torch.Tensor) goes through
    # torch's metaclass (~170 ns), and an optimizer's state is hundreds of small dicts.
    if isinstance(value, dict):
        keys = tuple(value)
        # 1 == True == 1.0: the key types too, so that an equal-looking key is the same key.
        structure.append((keys, tuple(map(type, keys))))
        children: Any = value.values()
    elif isinstance(value, list):
        structure.append(len(value))
        children = value
    elif isinstance(value, tuple) and not hasattr(value, "_fields"):
        structure.append(-1 - len(value))
        children = value
    else:
        values.append(value)
        return True
    if depth >= MAX_DEPTH:
        return False
    if all(map(_is_leaf_type, set(map(type, children)))):
        # Only leaves (a model's dict of tensors, an optimizer's state of one parameter, its
        # list of parameter ids): no call per leaf.
        values += children
        return True
    for child in children:  # noqa: SIM110 - all(<generator>) costs a frame per container
        if not _walk(child, values, structure, depth + 1):
            return False
    return True


def _is_leaf_type(kind: type) -> bool:
    """Whether ``_walk`` takes values of type ``kind`` as leaves (namedtuples are)."""
    return not issubclass(kind, (dict, list, tuple)) or hasattr(kind, "_fields")


def _placement(values: list[Any]) -> list[Any]:
    """``_fingerprint`` of leaves among which is no DTensor, with where each tensor's memory
    is (``data_ptr``) in each tensor's tuple: one pass over the tensors. Raises
    ``RuntimeError`` for a tensor that has no storage (sparse, a DTensor)."""
    return [
        (type(v), v.dtype, v.shape, v.device, v.layout, v.data_ptr())
        if isinstance(v, torch.Tensor)
        else type(v)
        for v in values
    ]


def _fingerprint(values: list[Any]) -> list[Any]:
    """What must not change for a plan to be reused, leaf by leaf (non-tensors: the type),
    then the placements and meshes of the DTensors among them."""
    prints: list[Any] = [
        (type(v), v.dtype, v.shape, v.device, v.layout) if isinstance(v, torch.Tensor) else type(v)
        for v in values
    ]
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is not None:
        dtensor = dtensor_module.DTensor
        prints += [_sharding(v) for v in values if isinstance(v, dtensor)]
    return prints


def _sharding(value: torch.Tensor) -> tuple[Any, ...]:
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is None or not isinstance(value, dtensor_module.DTensor):
        return ()
    return (tuple(value.placements), value.device_mesh)


def _local_piece(value: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, ShardSpec | None]:
    """A DTensor's local tensor and where it lies in the whole (None when it is the whole);
    any other tensor as it is."""
    # No DTensor can exist unless its module was imported: skip the import for everyone else.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is None or not isinstance(value, dtensor_module.DTensor):
        return value, None
    where = format_key_path(path)
    if any(placement.is_partial() for placement in value.placements):
        raise TypeError(
            f"state dict entry {where!r} is a DTensor with a Partial placement: "
            "reduce it (redistribute to Shard or Replicate) before saving"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(
        value.shape, value.device_mesh, value.placements
    )
    local = value.to_local()
    if list(local.shape) == list(value.shape):
        return local, None
    return local, ShardSpec(list(value.shape), list(offsets))


def _checkpointable(value: torch.Tensor, path: tuple[str | int, ...]) -> torch.Tensor:
    where = format_key_path(path)
    if value.is_sparse or value.layout != torch.strided:
        raise TypeError(f"state dict entry {where!r} is a {value.layout} tensor; only dense")
    if value.is_quantized:
        raise TypeError(f"state dict entry {where!r} is a quantized tensor; dequantize it first")
    if value.is_meta:
        raise TypeError(f"state dict entry {where!r} is on the meta device: it holds no data")
    return value.detach()


_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_madvise = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))


def map_populated(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` shared, with the pages faulted in up front.

    Faulting in now keeps page faults out of the first copy. Not with ``MAP_POPULATE``:
    Python's ``mmap`` holds the GIL for the whole population (~0.4 s for 1 GiB), freezing the
    event loop of whoever maps; ``madvise(MADV_POPULATE_WRITE)`` through ctypes releases it.
    On older kernels the pages are simply faulted in by the first copy.
    """
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    if _madvise is not None:
        _madvise(address, size, _MADV_POPULATE_WRITE)  # best effort: EINVAL before 5.14
    return mapping


class SharedArena:
    """One pre-allocated, owner-only, anonymous shared-memory file, mapped in this process.

    ``ref`` names it for the worker as ``/proc/<this pid>/fd/<fd>``, valid until ``close``.
    Raises ``OSError`` (``ENOMEM``/``ENOSPC``, with a message saying so) when memory cannot
    hold ``size`` bytes, and ``ValueError`` for a size that is not positive.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"an arena needs a positive size, got {size}")
        self.size = size
        fd = os.memfd_create(ARENA_NAME, os.MFD_CLOEXEC)
        try:
            # A memfd starts 0777; only this user's processes could open it through /proc
            # anyway, but keep the arena's own mode owner-only like every file we create.
            os.fchmod(fd, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise OSError(
                        exc.errno,
                        f"no memory for a {size}-byte staging arena (shared memory is limited "
                        "by RAM and the memory cgroup)",
                    ) from exc
                raise
            self._mmap = map_populated(fd, size)
        except BaseException:
            os.close(fd)
            raise
        # The descriptor keeps the memory alive: close it with the arena even when nobody
        # calls close() (an arena dropped with its Checkpointer), never later.
        self._close_fd = weakref.finalize(self, os.close, fd)
        self.path = f"/proc/{os.getpid()}/fd/{fd}"
        self.bytes: torch.Tensor | None = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._pinned = False
        #: plan id -> the arena regions of its copies (views: dropped before unmapping)
        self._views: dict[int, list[torch.Tensor]] = {}

    @property
    def ref(self) -> ArenaRef:
        return ArenaRef(self.path, self.size)

    def close(self) -> None:
        """Unmap and close the descriptor (the worker's mapping, if any, keeps its memory
        until it releases it); the arena is unusable afterwards. Idempotent."""
        self._views.clear()
        if self.bytes is not None:
            if self._pinned:
                torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())  # type: ignore[no-untyped-call]
            self.bytes = None
            try:
                self._mmap.close()
            except BufferError:
                # A view of the arena outlives it (a caller kept a staged tensor): the memory
                # is unmapped only when that view goes. Say so rather than hide a leak.
                logger.warning(
                    "staging arena %s (%d bytes) is still viewed; it stays mapped until the "
                    "last view goes",
                    self.path,
                    self.size,
                )
        self._close_fd()

    def destination(self, source: torch.Tensor, offset: int) -> torch.Tensor:
        """The arena region, shaped like ``source``, that ``source`` is copied to."""
        assert self.bytes is not None, "arena used after close()"
        nbytes = source.numel() * source.element_size()
        region = self.bytes[offset : offset + nbytes]
        if nbytes == 0:
            return torch.empty(source.shape, dtype=source.dtype)
        return region.view(source.dtype).view(source.shape)

    def _destinations(self, plan: StagingPlan) -> list[torch.Tensor]:
        """The regions ``plan``'s sources go to, made once per plan layout: a repeated save
        slices nothing."""
        views = self._views.get(plan.plan_id)
        if views is None:
            if len(self._views) >= _VIEWS_KEPT:
                self._views.clear()
            views = self._views[plan.plan_id] = [
                self.destination(source, offset)
                for source, offset in zip(plan.sources, plan.offsets, strict=True)
            ]
        return views

    def copy_in(self, plan: StagingPlan) -> None:
        """Copy every CPU tensor of ``plan`` in, in one batched copy (blocking; torch
        releases the GIL while it copies, so run it in a thread and the event loop keeps
        going)."""
        destinations, sources = self._destinations(plan), plan.sources
        if plan.has_cuda:
            pairs = [(d, s) for d, s in zip(destinations, sources, strict=True) if not s.is_cuda]
            destinations, sources = [d for d, _ in pairs], [s for _, s in pairs]
        with torch.no_grad():  # sources may be parameters: no autograd record of the copy
            torch._foreach_copy_(destinations, sources)

    def copy_range(self, plan: StagingPlan, begin: int, end: int) -> None:
        """Copy ``plan``'s CPU tensors ``begin`` to ``end`` (by index) in, in one batched copy
        (blocking; run it in a thread)."""
        destinations = self._destinations(plan)[begin:end]
        with torch.no_grad():
            torch._foreach_copy_(destinations, plan.sources[begin:end])

    def copy_in_from_cuda(self, plan: StagingPlan) -> Any:
        """Start non-blocking device-to-host copies of ``plan``'s CUDA tensors on a side
        stream; return the event that completes with them.

        The arena is page-locked once (``cudaHostRegister``) so the copies are true DMA and
        run while the trainer's stream keeps computing.
        """
        assert self.bytes is not None, "arena used after close()"
        if not self._pinned:
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            cudart.cudaHostRegister(self.bytes.data_ptr(), self.size, 0)
            self._pinned = True
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        # Copy the values the trainer's queued kernels produce, not what is there now.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for destination, source in zip(self._destinations(plan), plan.sources, strict=True):
                if source.is_cuda:
                    destination.copy_(source, non_blocking=True)
                    source.record_stream(stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return event


def take_fitting_arena(
    free: list[SharedArena], nbytes: int
) -> tuple[SharedArena | None, SharedArena | None]:
    """Pick from the pool ``free`` an arena for ``nbytes``: ``(the smallest that fits, None)``
    when one does, else ``(None, the largest free one)``, to be retired before a bigger arena
    is made (the layout grew: keep one arena, not one per size). The arena returned is
    removed from ``free``."""
    fitting = [a for a in free if a.size >= nbytes]
    if fitting:
        chosen = min(fitting, key=lambda a: a.size)
        free.remove(chosen)
        return chosen, None
    if not free:
        return None, None
    retired = max(free, key=lambda a: a.size)
    free.remove(retired)
    return None, retired


async def copy_into_arena(arena: SharedArena | None, plan: StagingPlan) -> None:
    """Copy ``plan``'s tensors into ``arena`` without blocking the loop.

    If the calling task is cancelled meanwhile the copy still finishes before this returns:
    the arena must not be reused while a thread writes into it.
    """
    if arena is None:
        return
    await finish_even_if_cancelled(asyncio.to_thread(arena.copy_in, plan))
    if plan.has_cuda:
        event = arena.copy_in_from_cuda(plan)
        await asyncio.to_thread(event.synchronize)


#: a save of at least two of these is staged in chunks of up to about this size, each
#: reported to the worker when it lands, so that the worker writes what is staged while the
#: rest is copied
PIPELINE_CHUNK_BYTES = 32 << 20
#: the first chunk's size; each next one is twice the last, up to ``PIPELINE_CHUNK_BYTES``:
#: the worker starts writing after a small first copy, and later chunks cost few reports
PIPELINE_FIRST_CHUNK_BYTES = 4 << 20
#: saves are pipelined only where this process may run on this many CPUs. On fewer the
#: staging copy contends with the worker's hash and write for the cores and for memory
#: bandwidth: on 2 cores pipelining made blocking 1.3-1.6x that of staging in one go for
#: 0.90-1.06x the durable time (``benchmarks.bench_pipeline``), and blocking is what the
#: training loop waits for.
PIPELINE_MIN_CPUS = 4


def pipeline_chunks(
    sources: list[torch.Tensor], offsets: list[int], nbytes: int, has_cuda: bool
) -> list[tuple[int, int, int]] | None:
    """How to stage tensors ``sources`` (at ``offsets``, ``nbytes`` in all) while their
    write runs: ``(first, end, staged)`` per chunk, the tensors ``first`` to ``end`` (by
    index) copied together, after which the arena bytes below ``staged`` are all there. None
    when staging in one go is better: fewer than ``PIPELINE_MIN_CPUS`` CPUs, less than two
    chunks of bytes, CUDA tensors (their copies run on a side stream), or offsets that do not
    grow (no prefix of the arena would be complete early). Once per plan layout: a reused
    plan keeps its chunks."""
    if (
        has_cuda
        or nbytes < 2 * PIPELINE_CHUNK_BYTES
        or len(os.sched_getaffinity(0)) < PIPELINE_MIN_CPUS
    ):
        return None
    chunks, first, size, end = [], 0, 0, 0
    target = min(PIPELINE_FIRST_CHUNK_BYTES, PIPELINE_CHUNK_BYTES)
    for index, (source, offset) in enumerate(zip(sources, offsets, strict=True)):
        if offset < end:
            return None
        tensor_bytes = source.numel() * source.element_size()
        end = offset + tensor_bytes
        size += tensor_bytes
        if size >= target:
            chunks.append((first, index + 1, end))
            first, size = index + 1, 0
            target = min(2 * target, PIPELINE_CHUNK_BYTES)
    if first < len(sources):
        chunks.append((first, len(sources), end))
    return chunks


async def copy_into_arena_in_chunks(
    arena: SharedArena,
    plan: StagingPlan,
    chunks: list[tuple[int, int, int]],
    report: Callable[[int, bool], Awaitable[None]],
) -> None:
    """Copy ``plan``'s tensors into ``arena`` chunk by chunk (``pipeline_chunks``) without
    blocking the loop, awaiting ``report(staged bytes, whether that was the last)`` after
    each. One thread copies every chunk, one after the other, and tells the loop as each
    lands: it never waits for the loop between chunks (a wake-up per chunk, on a busy
    machine milliseconds each, would add to the time staging blocks). A chunk being copied
    when the calling task is cancelled (or ``report`` fails) is finished first (the arena
    must not be reused under a copying thread); the rest is not copied."""
    loop = asyncio.get_running_loop()
    #: numbers of the chunks that landed, in order; None once the thread stops early
    landed: asyncio.Queue[int | None] = asyncio.Queue()
    stop = threading.Event()

    def copy_every_chunk() -> None:
        try:
            for number, (first, end, _) in enumerate(chunks):
                if stop.is_set():
                    return
                arena.copy_range(plan, first, end)
                loop.call_soon_threadsafe(landed.put_nowait, number)
        finally:
            loop.call_soon_threadsafe(landed.put_nowait, None)

    copying = asyncio.ensure_future(asyncio.to_thread(copy_every_chunk))
    try:
        for number, (_, _, staged) in enumerate(chunks):
            if await landed.get() is None:
                break  # the copy failed: awaiting the thread raises why
            await report(staged, number == len(chunks) - 1)
    finally:
        stop.set()
        await finish_even_if_cancelled(copying)
