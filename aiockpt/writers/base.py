"""The writer protocol and the pieces every built-in writer shares.

A writer turns a state dict into files inside a directory that commit created for it (empty,
owner-only, temporary); commit then writes the manifest and renames the directory into place.
Writers run in a worker thread of the checkpoint process, on tensors that are views into a
shared-memory mapping, so they must write straight from tensor memory and keep no reference to
a tensor after ``write`` returns.

``FileSink`` is how built-in writers produce files: sequential writes from tensor memory, the
xxh3_64 checksum computed on the same bytes just before they are written (hot in cache, no
second pass), the ``write`` system calls on a helper thread so that hashing one chunk overlaps
writing the previous one (xxhash holds the GIL, ``os.write`` releases it), and fsync on close.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec
import xxhash

from aiockpt._format.manifest import Leaf, ObjectLeaf, check_relative_name
from aiockpt._format.tree import KeyPath, Node, flatten, iter_key_paths, unflatten
from aiockpt._runtime import libc_function
from aiockpt._wire.protocol import ShardSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "FileRecord",
    "FileSink",
    "GroupWriter",
    "StagedLayout",
    "StagedStateDict",
    "Writer",
    "WriterPart",
    "flatten_state_dict",
    "observe_bytes_written",
    "open_new_file",
    "report_bytes_written",
    "staged_layout",
    "tensor_bytes",
    "write_objects",
]


class FileRecord(msgspec.Struct, frozen=True):
    """A file a writer wrote and fsynced: name relative to the checkpoint directory, size,
    xxh3_64 hex digest, and where in it the writer put leaves of the state dict (leaf index in
    ``flatten_state_dict`` order -> location)."""

    name: str
    size: int
    xxh3_64: str
    leaves: dict[int, Leaf] = {}


@runtime_checkable
class Writer(Protocol):
    """Writes a state dict into ``path``, an existing, empty, owner-only directory.

    Called with keywords (``write(state_dict=..., path=..., **kwargs)``) in a worker thread.
    Returns a ``FileRecord`` for every file written (each already fsynced), or ``None`` to let
    commit hash and fsync every file it finds in ``path`` (a ``concurrent.futures.Future``, as
    torch's experimental ``CheckpointWriter`` may return, is waited for first). May raise
    anything, in which case commit removes ``path`` and re-raises.
    """

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord] | None:
        """Write ``state_dict`` into ``path``."""
        ...


class WriterPart(msgspec.Struct, frozen=True):
    """What one rank wrote into the directory all ranks of a save share."""

    records: list[FileRecord]
    #: tensors this rank wrote that other ranks' leaves stand for too, by a writer's key
    exports: dict[str, Leaf] = {}
    #: leaf index -> key in some rank's ``exports``, for leaves another rank wrote
    imports: dict[int, str] = {}
    #: what the coordinator's ``finish`` needs from this rank (DCP: where each item lies)
    data: Any = None


@runtime_checkable
class GroupWriter(Writer, Protocol):
    """A writer that plans a multi-rank save globally, as DCP does; the worker calls these
    in order, once per save, and the writer may keep state between them. Plans, assignments
    and parts cross between ranks, so they must be msgspec-encodable.

    1. every rank: ``plan(state_dict, shards)``, its local plan; ``shards`` maps leaf index
       (``flatten_state_dict`` order) to where that tensor lies in the whole;
    2. rank 0: ``assign(plans)``, every rank's plan -> what each rank writes;
    3. every rank: ``write_part(state_dict, path, assignment)``, into the shared ``path``;
    4. rank 0: ``finish(path, parts)``, the files that describe the whole (DCP's
       ``.metadata``), once every rank's part is in.
    """

    def plan(self, state_dict: Any, shards: Mapping[int, ShardSpec]) -> Any: ...

    def assign(self, plans: Sequence[Any]) -> list[Any]: ...

    def write_part(self, state_dict: Any, path: str, assignment: Any) -> WriterPart: ...

    def finish(self, path: str, parts: Sequence[WriterPart]) -> list[FileRecord]: ...


class StagedLayout:
    """What every save of one structure shares in the worker: the skeleton, the key paths
    (made once, on first use) and a ``version`` that writers key their cached plans by.

    The worker makes a new layout whenever a request's structure (skeleton, tensor
    descriptions, kinds of the other leaves) differs from the last one's, so a writer that
    sees the same ``version`` again may reuse whatever it derived from the structure alone.
    """

    def __init__(self, skeleton: Node) -> None:
        self.version = next(_layout_versions)
        self.skeleton = skeleton
        #: leaf index -> (offset, size) in the arena, for tensors whose bytes lie there
        self.regions: dict[int, tuple[int, int]] = {}
        self._key_paths: list[KeyPath] | None = None

    @property
    def key_paths(self) -> list[KeyPath]:
        if self._key_paths is None:
            self._key_paths = [path for _, path in iter_key_paths(self.skeleton)]
        return self._key_paths


_layout_versions = itertools.count(1)


class StagedStateDict(dict[Any, Any]):
    """The state dict of a request, as the worker hands it to writers: a plain dict that
    also holds its leaves flat and its ``layout``. ``flatten_state_dict`` of it walks
    nothing, and pairs key paths with leaves once per save however many times it is called
    (writer, commit). The worker hands the same object to the next save of the same layout
    on the same arena whose plain values are equal (its tensors view the bytes staged
    anew), so writers must not change it."""

    def __init__(self, layout: StagedLayout, values: list[Any], arena: memoryview) -> None:
        super().__init__(unflatten(layout.skeleton, values))
        self.layout = layout
        self.leaf_values = values
        #: the mapping the tensors view (``layout.regions`` says where)
        self.arena = arena
        #: for a write sent while the trainer still stages, and a writer that says it can
        #: (``WRITES_WHILE_STAGING = True``): ``wait_staged(end)`` returns once the arena
        #: bytes below ``end`` (None: all) are staged, with how many are (``math.inf``:
        #: all). Such a writer calls it before it reads a region beyond what it was last
        #: told; None when every byte is staged.
        self.wait_staged: Callable[[int | None], float] | None = None
        self._flat: list[tuple[KeyPath, Any]] | None = None

    def flat_leaves(self) -> list[tuple[KeyPath, Any]]:
        """The ``(key path, leaf)`` pairs, made on first use (callers must not change it)."""
        if self._flat is None:
            self._flat = list(zip(self.layout.key_paths, self.leaf_values, strict=True))
        return self._flat


def staged_layout(state_dict: Any) -> StagedLayout | None:
    """The layout of a state dict the worker built, None for any other."""
    return state_dict.layout if type(state_dict) is StagedStateDict else None


def flatten_state_dict(state_dict: Any) -> tuple[Node, list[tuple[KeyPath, Any]]]:
    """The skeleton and the ``(key path, leaf)`` pairs of a state dict; tensors are leaves.

    Writers and commit both call this, so leaf indices agree between ``FileRecord.leaves``
    and the manifest; for the worker's ``StagedStateDict`` they also share one list (do not
    change it). Raises ``TypeError`` for dict keys that are neither str nor int.
    """
    if type(state_dict) is StagedStateDict:
        return state_dict.layout.skeleton, state_dict.flat_leaves()
    # Imported here, not above: a state dict with tensors in it means torch is imported
    # already, and this module stays free of torch for those that only read checkpoints
    # (the ``aiockpt`` command's ``ls`` and ``verify`` import commit, which imports this).
    from aiockpt._wire.tensors import is_tensor

    return flatten(state_dict, is_tensor)


#: called with every count of bytes written to a checkpoint's files, from any thread
_bytes_written_observer: Callable[[int], None] | None = None


@contextlib.contextmanager
def observe_bytes_written(observer: Callable[[int], None]) -> Iterator[None]:
    """Call ``observer(n)`` for every ``n`` bytes written to checkpoint files while the block
    runs (from the threads that write: it must be thread-safe and quick). Process-wide, one
    at a time, as the worker writes one save at a time: this is how its progress reports
    learn what writers write without each writer taking a parameter for it."""
    global _bytes_written_observer
    if _bytes_written_observer is not None:
        raise RuntimeError("bytes written are observed already")
    _bytes_written_observer = observer
    try:
        yield
    finally:
        _bytes_written_observer = None


def report_bytes_written(count: int) -> None:
    """Writers that write files other than through ``FileSink`` call this with what they
    wrote (see ``observe_bytes_written``)."""
    observer = _bytes_written_observer
    if observer is not None:
        observer(count)


_memoryview_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_memoryview_from_memory.restype = ctypes.py_object
_memoryview_from_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, without copying.

    Works for every dtype (numpy has no bfloat16 or float8) and needs no numpy. The view does
    not keep ``tensor`` alive: use it only while holding the tensor.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    view: memoryview = _memoryview_from_memory(tensor.data_ptr(), nbytes, _PYBUF_WRITE)
    return view


def open_new_file(directory: str, name: str) -> int:
    """Create ``directory/name`` for writing, owner-only; never follows or reuses a path.

    ``name`` is always chosen by the writer, never derived from state-dict keys. Raises
    FileExistsError if it exists, ValueError for a name that does not stay inside
    ``directory`` (absolute, ``..``, NUL).
    """
    check_relative_name(name)  # before anything exists: "../x" or "/x" would land outside
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(os.path.join(directory, name), flags, 0o600)


#: bytes hashed and written per step: large enough for few system calls, small enough that a
#: chunk is still in cache when written right after being hashed
CHUNK_BYTES = 4 << 20
# How many chunks may wait for the write thread: bounds how far hashing runs ahead.
_WRITE_DEPTH = 2
# os.writev takes at most this many buffers (Linux's IOV_MAX).
_IOV_MAX = 1024
# Start writeback of every this many bytes written, so that the final fsync finds little
# left to flush (on a disk, durable saves then take about as long as the writes alone).
_WRITEBACK_BYTES = 8 << 20


_sync_file_range = libc_function(
    "sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
)
_SYNC_FILE_RANGE_WRITE = 2


class FileSink:
    """One file written sequentially, hashed as it goes, fsynced on ``close``.

    Use as a context manager: leaving the block with an exception closes the descriptor and
    leaves the partial file to be removed with its temporary directory. Buffers passed to
    ``write`` must stay valid until ``close`` returns; ``write_tensor`` sees to that itself.
    """

    def __init__(self, directory: str, name: str, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.name = name
        #: named in every error: "No space left on device" says little without the file
        self.path = os.path.join(directory, name)
        self.offset = 0
        self._fd = open_new_file(directory, name)
        self._hash = xxhash.xxh3_64()
        self._chunk = chunk_bytes
        #: buffers appended but not yet submitted, and their total size
        self._batch: list[memoryview] = []
        self._batched = 0
        self._pending: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._keep: list[torch.Tensor] = []
        # Only the write thread touches these two.
        self._written = 0
        self._writeback_from = 0 if _sync_file_range is not None else -1

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._shutdown()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; return the offset in the file where it starts."""
        start = self.offset
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if type(data) is bytearray:
            view = memoryview(bytes(data))  # a caller may reuse its bytearray
        self.write_many([view])
        return start

    def write_many(self, parts: Sequence[bytes | memoryview], keep: Sequence[Any] = ()) -> None:
        """Append every buffer of ``parts`` (bytes, or byte views such as ``tensor_bytes``)
        in order, as few ``writev`` calls as their sizes allow: many small tensors cost one
        system call per ``chunk_bytes``, not one each. ``keep`` holds what the views point
        into until ``close``."""
        self._keep.extend(keep)
        batch, batched = self._batch, self._batched
        for part in parts:
            view = part if type(part) is memoryview else memoryview(part)
            size = view.nbytes
            self.offset += size
            if size > self._chunk:
                for begin in range(0, size, self._chunk):
                    piece = view[begin : begin + self._chunk]
                    self._hash.update(piece)
                    batch.append(piece)
                    batched += piece.nbytes
                    if batched >= self._chunk:
                        self._flush_batch()
                        batch, batched = self._batch, 0
                continue
            self._hash.update(view)
            batch.append(view)
            batched += size
            if batched >= self._chunk or len(batch) >= _IOV_MAX:
                self._batched = batched
                self._flush_batch()
                batch, batched = self._batch, 0
        self._batched = batched

    def write_tensor(self, tensor: torch.Tensor) -> int:
        """Append a contiguous CPU tensor's bytes straight from its memory; return the offset.

        The sink holds the tensor until ``close`` (its bytes may still be in flight), then lets
        go: writers must not keep tensors (views of shared memory) past ``write``.
        """
        self._keep.append(tensor)
        return self.write(tensor_bytes(tensor))

    def align(self, alignment: int) -> int:
        """Pad with zeros up to a multiple of ``alignment``; return the new offset."""
        self.write(bytes(-self.offset % alignment))
        return self.offset

    def close(self) -> FileRecord:
        """Finish all writes, fsync and close; the record of the file as written."""
        try:
            self._flush_batch()
            while self._pending:
                self._pending.popleft().result()
            with self._naming_the_file():
                os.fsync(self._fd)
        finally:
            self._shutdown()
        return FileRecord(self.name, self.offset, self._hash.hexdigest())

    def _flush_batch(self) -> None:
        if self._batch:
            batch, self._batch, self._batched = self._batch, [], 0
            self._submit(batch)

    def _submit(self, parts: list[memoryview]) -> None:
        if self._pool is None:
            if sum(part.nbytes for part in parts) < self._chunk:
                # Nothing in flight and little to write (manifests, .metadata): no thread.
                self._write_parts(parts)
                return
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="aiockpt-write")
        while len(self._pending) >= _WRITE_DEPTH:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write_parts, parts))

    def _write_parts(self, parts: list[memoryview]) -> None:
        """Runs on the write thread, one submission at a time, in order."""
        first = 0  # parts before this are written
        while first < len(parts):
            with self._naming_the_file():
                count = os.writev(self._fd, parts[first:] if first else parts)
            self._written += count
            report_bytes_written(count)
            while first < len(parts) and count >= parts[first].nbytes:
                count -= parts[first].nbytes
                first += 1
            if count:
                parts[first] = parts[first][count:]
        start = self._writeback_from
        if start >= 0 and self._written - start >= _WRITEBACK_BYTES:
            # Asynchronous: queues the range for writeback and returns. A file system that
            # cannot do it (EINVAL, ESPIPE) just leaves it all to fsync.
            if _sync_file_range(self._fd, start, self._written - start, _SYNC_FILE_RANGE_WRITE):
                self._writeback_from = -1
            else:
                self._writeback_from = self._written

    @contextlib.contextmanager
    def _naming_the_file(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.filename is not None:
                raise
            raise type(exc)(exc.errno, exc.strerror, self.path) from exc

    def _shutdown(self) -> None:
        if self._pool is not None:
            # Waits for a write in progress: its buffer must not be released under it.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._keep.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_objects(
    objects: Sequence[tuple[int, Any]], directory: str, name: str
) -> FileRecord | None:
    """Pickle ``(leaf index, object)`` pairs into ``directory/name``; None if there are none.

    Only reached for leaves that are not tensors or plain values, which the caller let into
    the state dict by opting into pickling; loading them again needs the same opt-in.
    """
    if not objects:
        return None
    leaves: dict[int, Leaf] = {}
    with FileSink(directory, name) as sink:
        for index, obj in objects:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            leaves[index] = ObjectLeaf(name, sink.write(data), len(data))
        record = sink.close()
    return msgspec.structs.replace(record, leaves=leaves)
