"""Staging: copy a state dict's tensors, once, into a shared-memory arena the worker maps.

A save is *staged* once every tensor has been copied out: from then on the caller may change
its tensors. The copy is the only pass over the tensor bytes in the trainer; the worker writes
files straight from its mapping of the same memory, and frames carry only descriptions.

Arenas are files under /dev/shm created owner-only (0600) and pre-allocated, so that running
out of shared memory is an ``OSError`` here rather than a SIGBUS in the middle of a copy. The
worker unlinks the name as soon as it has mapped the file (``aiockpt.worker.serve.ArenaMaps``):
from then on only the two mappings hold the memory, and a crash of either process leaks nothing.
An arena is reused by every later save that fits in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from aiockpt.protocol import ArenaRef, Leaf, ShardSpec, StateDictPayload, TensorInArena
from aiockpt.tensors import dtype_name, is_tensor, plain_leaf
from aiockpt.tree import KeyPath, Node, flatten, format_key_path

__all__ = [
    "ARENA_DIR",
    "ARENA_PREFIX",
    "SharedArena",
    "StagingPlan",
    "plan_staging",
    "remove_orphaned_arenas",
]

ARENA_DIR = "/dev/shm"
#: arena files are named ``aiockpt-<creator pid>-<random>``
ARENA_PREFIX = "aiockpt-"
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
    """One pre-allocated, owner-only shared-memory file, mapped in this process.

    Raises ``OSError`` (``ENOSPC``, with a message naming /dev/shm) when shared memory cannot
    hold ``size`` bytes.
    """

    def __init__(self, size: int, *, directory: str = ARENA_DIR) -> None:
        if size <= 0:
            raise ValueError(f"an arena needs a positive size, got {size}")
        self.size = size
        self.path = os.path.join(directory, f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise OSError(
                        exc.errno,
                        f"{directory} has no room for a {size}-byte staging arena; free shared "
                        "memory or make /dev/shm larger",
                    ) from exc
                raise
            self._mmap = map_populated(fd, size)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self.bytes: torch.Tensor | None = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._pinned = False

    @property
    def ref(self) -> ArenaRef:
        return ArenaRef(self.path, self.size)

    def unlink(self) -> None:
        """Remove the name (the worker normally did already); the mappings stay valid."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Unlink and unmap; the arena is unusable afterwards."""
        self.unlink()
        if self.bytes is None:
            return
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())  # type: ignore[no-untyped-call]
        self.bytes = None
        with contextlib.suppress(BufferError):  # a view still alive: unmapped with it
            self._mmap.close()

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


def remove_orphaned_arenas(directory: str = ARENA_DIR) -> list[str]:
    """Remove arena files whose creating process no longer exists (a crash between creating
    an arena and the worker mapping it); return their paths."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            pid = _creator_pid(name)
            if pid is None or _alive(pid):
                continue
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


def _creator_pid(name: str) -> int | None:
    if not name.startswith(ARENA_PREFIX):
        return None
    pid, _, token = name[len(ARENA_PREFIX) :].partition("-")
    return int(pid) if pid.isdigit() and len(token) == 16 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
