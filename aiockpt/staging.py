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
import ctypes
import errno
import logging
import mmap
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from aiockpt.protocol import ArenaRef, Leaf, ShardSpec, StateDictPayload, TensorInArena
from aiockpt.tensors import dtype_name, is_tensor, plain_leaf
from aiockpt.tree import KeyPath, Node, flatten, format_key_path

logger = logging.getLogger("aiockpt.staging")

__all__ = [
    "ARENA_NAME",
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


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass
class StagingPlan:
    """Where each tensor of one state dict goes in an arena, and what frames say about it."""

    skeleton: Node
    leaves: list[Leaf]
    #: (source tensor, offset in the arena); a tensor met twice (tied weights) is copied once
    copies: list[tuple[torch.Tensor, int]]
    #: arena bytes needed
    nbytes: int
    has_cuda: bool = field(default=False)
    #: whether some tensor is a rank's piece of a sharded one (a DTensor)
    shards: bool = field(default=False)

    def payload(self, arena: SharedArena | None) -> StateDictPayload:
        return StateDictPayload(self.skeleton, self.leaves, arena.ref if arena else None)


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
    copies: list[tuple[torch.Tensor, int]] = []
    seen: dict[tuple[Any, ...], TensorInArena] = {}
    offset = 0
    has_cuda = shards = False
    for path, value in flat:
        if not is_tensor(value):
            leaves.append(plain_leaf(path, value, allow_pickle=allow_pickle))
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
            copies.append((tensor, offset))
            offset = _aligned(offset + nbytes)
            has_cuda = has_cuda or tensor.is_cuda
        leaves.append(leaf)
    return StagingPlan(skeleton, leaves, copies, offset, has_cuda, shards)


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
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def map_populated(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` shared, with the pages faulted in up front.

    Faulting in now keeps page faults out of the first copy. Not with ``MAP_POPULATE``:
    Python's ``mmap`` holds the GIL for the whole population (~0.4 s for 1 GiB), freezing the
    event loop of whoever maps; ``madvise(MADV_POPULATE_WRITE)`` through ctypes releases it.
    On older kernels the pages are simply faulted in by the first copy.
    """
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    _libc.madvise(address, size, _MADV_POPULATE_WRITE)  # best effort: EINVAL before 5.14
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

    @property
    def ref(self) -> ArenaRef:
        return ArenaRef(self.path, self.size)

    def close(self) -> None:
        """Unmap and close the descriptor (the worker's mapping, if any, keeps its memory
        until it releases it); the arena is unusable afterwards. Idempotent."""
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

    def copy_in(self, plan: StagingPlan) -> None:
        """Copy every CPU tensor of ``plan`` in (blocking; torch releases the GIL while it
        copies, so run it in a thread and the event loop keeps going)."""
        for source, offset in plan.copies:
            if not source.is_cuda:
                self.destination(source, offset).copy_(source)

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
        with torch.cuda.stream(stream):
            for source, offset in plan.copies:
                if source.is_cuda:
                    self.destination(source, offset).copy_(source, non_blocking=True)
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
    copying = asyncio.ensure_future(asyncio.to_thread(arena.copy_in, plan))
    try:
        await asyncio.shield(copying)
        if plan.has_cuda:
            event = arena.copy_in_from_cuda(plan)
            await asyncio.to_thread(event.synchronize)
    except asyncio.CancelledError:
        await asyncio.gather(copying, return_exceptions=True)
        raise
