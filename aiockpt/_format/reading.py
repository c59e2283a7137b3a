"""Checkpoint directories opened by the rules, their manifests checked, their files read
and hashed in order: ``read_manifest`` and ``verify``, and the reader ``load`` reads through.

Needs no torch (the ``aiockpt`` command's ``ls``, ``inspect`` and ``verify`` never import it):
tensors reach this module only as buffers ``load`` hands it (``aiockpt._format.loading``, which
says what is checked and why).
"""

from __future__ import annotations

import collections
import errno
import math
import operator
import os
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import xxhash

from aiockpt._format.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    OLDEST_READ_FORMAT_VERSION,
    BigIntLeaf,
    FileEntry,
    FloatLeaf,
    Leaf,
    Manifest,
    ObjectLeaf,
    TensorLeaf,
    check_relative_name,
    decode_manifest,
    dtype_itemsize,
    plain_value,
)
from aiockpt._format.torch_written import TORCH_METADATA_NAME, is_torch_written
from aiockpt._format.tree import MAX_DEPTH, DictNode, LeafNode, Node
from aiockpt._runtime import collection_paused
from aiockpt.errors import CorruptCheckpoint, ForeignCheckpoint
from aiockpt.writers.base import tensor_bytes

if TYPE_CHECKING:
    from aiockpt._format.loading import _Region, _Run, _RunLoad

__all__ = [
    "IOV_MAX",
    "OpenCheckpoint",
    "check_file_sizes",
    "last_manifest",
    "open_listed_file",
    "read_listed_file",
    "read_manifest",
    "strided_extent",
    "verify",
]

#: the most bytes of each of a file's two scratch buffers (what no region or run is read into
#: goes through them to be hashed: all of a file that ``verify`` reads)
_SCRATCH_BYTES = 8 << 20

#: a file of at least this size is hashed in a thread while it is read (xxh3 and the reads
#: release the GIL), where this process may run on 2 CPUs or more; below that size the thread
#: costs more than the overlap saves. On 2 CPUs, quiet, a verified load in place took 1.23x
#: the read with it and 1.40x without (8,192 tensors), 1.14x and 1.22x (64 x 16 MiB); with
#: both CPUs kept busy by other processes, 1.30x and 1.26x, 1.22x and 1.40x.
_THREADED_HASH_BYTES = 16 << 20 if len(os.sched_getaffinity(0)) >= 2 else 1 << 62
#: reads into large tensors go in chunks of this size, each hashed while the next is read
_CHUNK_BYTES = 8 << 20


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest of the checkpoint at ``path``, checked for internal consistency.

    Raises FileNotFoundError if ``path`` is not a directory, ForeignCheckpoint if torch's DCP
    wrote it (``.metadata``, no manifest), CorruptCheckpoint (naming the manifest) if it has
    no manifest otherwise, or one that is not a regular file (a symbolic link, a
    FIFO, a device), is larger than ``MAX_MANIFEST_BYTES``, does not match its own checksum,
    cannot be decoded, has another format version, or describes files outside the
    directory, leaves it does not have, or tensors beyond the end of their files.
    """
    with OpenCheckpoint(path) as checkpoint:
        return checkpoint.manifest


class OpenCheckpoint:
    """An open checkpoint directory and its checked manifest; every file is opened through
    the directory's descriptor, one path component at a time, never following a link, so a
    link anywhere inside the checkpoint (``sub -> /etc``) cannot lead a reader out of it, and
    a directory renamed or replaced meanwhile is still the one whose manifest was read."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = os.fspath(path)
        try:
            # The caller chose this path, so it may be a link itself (a `latest` pointer).
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"no checkpoint directory at {self.root!r}") from None
        try:
            with collection_paused():
                self.manifest = self._read_manifest()
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)

    def _read_manifest(self) -> Manifest:
        manifest_path = os.path.join(self.root, MANIFEST_NAME)
        try:
            fd, size = self.open_file(MANIFEST_NAME)
        except CorruptCheckpoint as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                if is_torch_written(self.root, MANIFEST_NAME):
                    raise ForeignCheckpoint(
                        f"{self.root!r} has no {MANIFEST_NAME} but torch's "
                        f"{TORCH_METADATA_NAME}: torch.distributed.checkpoint.save wrote it, so "
                        "nothing can verify it, and loading it unpickles its metadata with "
                        "torch's reader: pass allow_pickle=True to aiockpt.load (only for a "
                        "checkpoint you trust), or use aiockpt.dcp.load",
                        path=self.root,
                    ) from None
                raise CorruptCheckpoint(
                    f"{self.root!r} has no {MANIFEST_NAME}: it was never committed",
                    path=manifest_path,
                ) from None
            raise
        try:
            if size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpoint(
                    f"the manifest has {size} bytes, more than any aiockpt writes "
                    f"({MAX_MANIFEST_BYTES})",
                    path=manifest_path,
                )
            data = bytearray(size)
            _read_exactly(fd, memoryview(data), 0, manifest_path)
        finally:
            os.close(fd)
        last = last_manifest[0]
        if last is not None and last[0] == data:  # byte for byte the one checked last time
            return last[1]
        try:
            manifest = decode_manifest(bytes(data))
            _check_consistent(manifest)
        except (ValueError, RecursionError) as exc:  # msgspec's errors are ValueErrors
            raise CorruptCheckpoint(f"unreadable manifest: {exc}", path=manifest_path) from exc
        # (The previous manifest's plans stay until a load plans this one: the next
        # checkpoint of the same state takes them over, ``_plan_for``.)
        last_manifest[0] = (bytes(data), manifest)
        return manifest

    def open_file(self, name: str) -> tuple[int, int]:
        """A read-only descriptor of the regular file ``name`` (a checked relative name) and
        its size. Raises CorruptCheckpoint naming the file if it is missing, a link or lies
        behind one, or is anything but a regular file (a FIFO would block a read forever)."""
        full = os.path.join(self.root, name)
        *directories, last = name.split("/")
        parent = self.fd
        try:
            try:
                for directory in directories:
                    opened = os.open(directory, _DIRECTORY_FLAGS, dir_fd=parent)
                    if parent != self.fd:
                        os.close(parent)
                    parent = opened
                # O_NONBLOCK: opening a FIFO must not wait for a writer; a regular file
                # ignores the flag.
                fd = os.open(last, _FILE_FLAGS, dir_fd=parent)
            finally:
                if parent != self.fd:
                    os.close(parent)
        except OSError as exc:
            reason = "a symbolic link or not a directory" if exc.errno in _LINK_ERRNOS else ""
            raise CorruptCheckpoint(
                f"cannot open checkpoint file{f' ({reason} on the way)' if reason else ''}: {exc}",
                path=full,
            ) from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise CorruptCheckpoint(
                f"{name} is not a regular file (mode {stat.filemode(info.st_mode)})", path=full
            )
        return fd, info.st_size


#: the manifest read and checked last, with the bytes of its file: reading the same manifest
#: again (a load after ``latest()`` or ``verify`` read it, an eval loading one checkpoint
#: again) skips decoding and checking it (~30 ms of a 20,000-tensor load here). Nothing
#: changes a manifest once decoded, so equal bytes mean an equal manifest.
last_manifest: list[tuple[bytes, Manifest] | None] = [None]

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# O_NOFOLLOW on a link gives ELOOP; O_DIRECTORY on a link or a file gives ENOTDIR.
_LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR)


def _check_consistent(manifest: Manifest) -> None:
    """Raise ValueError for anything in ``manifest`` a reader could misuse."""
    if not OLDEST_READ_FORMAT_VERSION <= manifest.format_version <= FORMAT_VERSION:
        raise ValueError(
            f"format version {manifest.format_version}; this aiockpt reads versions "
            f"{OLDEST_READ_FORMAT_VERSION} to {FORMAT_VERSION}"
        )
    sizes = {check_relative_name(f.name): f.size for f in manifest.files}
    if len(sizes) != len(manifest.files):
        raise ValueError("a file is listed twice")
    if any(size < 0 for size in sizes.values()):
        raise ValueError("a file has a negative size")
    if manifest.world_size < 1 or len(manifest.ranks) != manifest.world_size - 1:
        raise ValueError(
            f"{len(manifest.ranks) + 1} ranks described, world_size says {manifest.world_size}"
        )
    for state in [manifest.rank_state(0), *manifest.ranks]:
        for leaf in state.leaves:
            _check_leaf(leaf, sizes)
        _check_skeleton(state.skeleton, len(state.leaves))


def _check_leaf(leaf: Leaf, sizes: dict[str, int]) -> None:
    if type(leaf) is TensorLeaf:
        itemsize = dtype_itemsize(leaf.dtype)
        if leaf.shape and min(leaf.shape) < 0:
            raise ValueError(f"negative size in tensor shape {leaf.shape}")
        if leaf.global_shape is None:
            if leaf.global_offset is not None:
                raise ValueError("a tensor piece has a global offset without a global shape")
        elif leaf.global_offset is None:
            raise ValueError("a tensor piece has a global shape without a global offset")
        else:
            dims = zip(leaf.global_offset, leaf.shape, leaf.global_shape, strict=False)
            if not len(leaf.shape) == len(leaf.global_shape) == len(leaf.global_offset) or any(
                start < 0 or start + size > whole for start, size, whole in dims
            ):
                raise ValueError(
                    f"a tensor piece of shape {leaf.shape} at {leaf.global_offset} lies "
                    f"outside its whole of shape {leaf.global_shape}"
                )
        nbytes = math.prod(leaf.shape) * itemsize
        if leaf.strides is not None:
            if len(leaf.strides) != len(leaf.shape) or min(leaf.strides, default=0) < 0:
                raise ValueError(f"strides {leaf.strides} do not fit shape {leaf.shape}")
            nbytes = strided_extent(tuple(leaf.shape), tuple(leaf.strides)) * itemsize
    elif isinstance(leaf, ObjectLeaf):
        nbytes = leaf.nbytes
    else:
        if isinstance(leaf, (FloatLeaf, BigIntLeaf)):
            plain_value(leaf)  # ValueError for text that is not a number
        return
    if leaf.file not in sizes:
        raise ValueError(f"a leaf points into {leaf.file!r}, which is not listed")
    # Checked here, against the sizes the files are checked against before any read, so that
    # no buffer larger than the checkpoint is ever allocated for a leaf.
    if leaf.offset < 0 or nbytes < 0 or leaf.offset + nbytes > sizes[leaf.file]:
        raise ValueError(
            f"a leaf at {leaf.offset}..{leaf.offset + nbytes} of {leaf.file!r} lies outside "
            f"its {sizes[leaf.file]} bytes"
        )


def _check_skeleton(skeleton: Node, leaf_count: int) -> None:
    """Every leaf exactly once, no key twice in a dict, containers at most ``MAX_DEPTH``
    deep (checked without recursion: the walks that follow recurse)."""
    seen = bytearray(leaf_count)
    pending: list[tuple[Node, int]] = [(skeleton, 0)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, LeafNode):
            if not 0 <= node.index < leaf_count or seen[node.index]:
                raise ValueError("skeleton and leaves disagree")
            seen[node.index] = 1
            continue
        if depth >= MAX_DEPTH:
            raise ValueError(f"containers nested more than {MAX_DEPTH} deep")
        if isinstance(node, DictNode) and (
            len(node.keys) != len(node.children) or len(set(node.keys)) != len(node.keys)
        ):
            raise ValueError("a dict in the skeleton has mismatched or repeated keys")
        pending.extend((child, depth + 1) for child in node.children)
    if not all(seen):
        raise ValueError("skeleton and leaves disagree")


def verify(
    path: str | os.PathLike[str], *, progress: Callable[[int], object] | None = None
) -> Manifest:
    """Check every file of the checkpoint at ``path`` against its manifest; return it.

    ``progress`` is called with each count of bytes read and hashed (the files' sizes add up
    to ``sum(f.size for f in manifest.files)``), as ``aiockpt verify`` draws its bar.

    Raises CorruptCheckpoint naming the first file that is missing, not a regular file, has
    another size (truncated) or another xxh3_64 digest (a flipped byte), or the manifest if
    it is absent or unreadable (see ``read_manifest``); FileNotFoundError if ``path`` does not
    exist.
    """
    with OpenCheckpoint(path) as checkpoint:
        entries = checkpoint.manifest.files
        check_file_sizes(checkpoint, entries)
        for entry in entries:
            read_listed_file(checkpoint, entry, [], verify=True, progress=progress)
        return checkpoint.manifest


def open_listed_file(checkpoint: OpenCheckpoint, entry: FileEntry) -> int:
    """A descriptor of the file of ``entry``, which has the listed size; raises
    CorruptCheckpoint naming the file otherwise."""
    fd, size = checkpoint.open_file(entry.name)
    if size != entry.size:
        os.close(fd)
        raise CorruptCheckpoint(
            f"{entry.name} has {size} bytes, the manifest says {entry.size} (truncated?)",
            path=os.path.join(checkpoint.root, entry.name),
        )
    return fd


def check_file_sizes(checkpoint: OpenCheckpoint, entries: list[FileEntry]) -> None:
    """Check every file of ``entries`` before anything is allocated or read: a manifest
    listing a huge file must not get a huge buffer. (Opened again to be read, one at a time:
    keeping thousands of files open, one per rank of a large job, could exhaust descriptors.)"""
    for entry in entries:
        os.close(open_listed_file(checkpoint, entry))


def strided_extent(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Elements from the first to the last of a strided tensor (0 when it is empty)."""
    if not math.prod(sizes):
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))


def read_listed_file(
    checkpoint: OpenCheckpoint,
    entry: FileEntry,
    regions: list[_Region],
    *,
    verify: bool,
    progress: Callable[[int], object] | None = None,
    runs: list[_Run] | None = None,
    load: _RunLoad | None = None,
) -> None:
    """Read ``regions`` of one file into their buffers, making the tensors to allocate, and
    ``runs`` of small tensors (each with one call, placed by ``load``), all in file order;
    with ``verify``, read and hash the whole file and compare with ``entry``. Raises
    CorruptCheckpoint naming the file."""
    full = os.path.join(checkpoint.root, entry.name)
    fd = open_listed_file(checkpoint, entry)
    digest = _Digest(entry.size >= _THREADED_HASH_BYTES) if verify else None
    # (start, end, region, run), regions first where both start at one offset (stable sort)
    items: list[tuple[int, int, _Region | None, _Run | None]] = sorted(
        [
            *((region.offset, region.offset + region.nbytes, region, None) for region in regions),
            *((run.offset, run.end, None, run) for run in runs or ()),
        ],
        key=operator.itemgetter(0),
    )
    try:
        reader = _FileReader(fd, full, checkpoint.root, digest, progress)
        for start, end, region, run in items:
            if end > entry.size:
                raise CorruptCheckpoint(f"entry at {start}..{end} runs past the end", path=full)
            if run is not None:
                assert load is not None
                reader.read_run(run, load)
            else:
                assert region is not None
                reader.read_region(region)
        if digest is not None:
            reader.hash_to(entry.size)
            if digest.hexdigest() != entry.xxh3_64:
                raise CorruptCheckpoint(
                    f"{entry.name} does not match its xxh3_64 checksum (altered or corrupt)",
                    path=full,
                )
    finally:
        try:
            if digest is not None:
                digest.close()
        finally:
            os.close(fd)


class _Digest:
    """The xxh3_64 of a file, fed its bytes in order. Threaded, the updates run in one worker
    thread, in the order given, while the caller reads on (xxhash and ``preadv`` release the
    GIL), so that verifying costs little more than reading."""

    def __init__(self, threaded: bool) -> None:
        self._state = xxhash.xxh3_64()
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="aiockpt-verify") if threaded else None
        )
        self._last: Future[None] | None = None

    def update(self, view: memoryview, owner: object) -> Future[None] | None:
        """Hash ``view`` after everything given before; ``owner`` (what keeps the memory of
        ``view`` alive: a tensor's byte view does not) is held until then. Returns what to
        wait for before that memory is written again, None if it is hashed already."""
        if self._executor is None:
            self._state.update(view)
            return None
        self._last = self._executor.submit(_hash_into, self._state, view, owner)
        return self._last

    def update_many(self, views: list[memoryview], owner: object) -> Future[None] | None:
        """``update`` with each of ``views`` in turn (one call, the loop in C)."""
        if self._executor is None:
            _hash_all(self._state, views, owner)
            return None
        self._last = self._executor.submit(_hash_all, self._state, views, owner)
        return self._last

    def hexdigest(self) -> str:
        if self._last is not None:
            # Bounded: hashing bytes already in memory always finishes.
            self._last.result()
        return self._state.hexdigest()

    def close(self) -> None:
        """Stop the thread (updates not yet started are dropped: the load failed)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _hash_into(state: Any, view: memoryview, owner: object) -> None:
    del owner  # held only until the bytes are hashed
    state.update(view)


class _FileReader:
    """Reads one file front to back for ``read_listed_file``: a region on its own straight into
    its buffer (in chunks, each hashed while the next is read), a run of small tensors with
    one read into one buffer (a scratch buffer copied out with one batched copy, or, for
    tensors to allocate, a new buffer the tensors are views of), and, with ``digest``, every
    byte once, in file order (the bytes between regions through scratch)."""

    def __init__(
        self,
        fd: int,
        full: str,
        root: str,
        digest: _Digest | None,
        progress: Callable[[int], object] | None,
    ) -> None:
        self.fd = fd
        self.full = full
        self.root = root
        self.digest = digest
        self.progress = progress
        #: everything before this offset has been read (and given to the digest)
        self.position = 0
        # Two scratch buffers taken in turn: one is read into while the other is hashed.
        self._scratch: list[memoryview] = [memoryview(b""), memoryview(b"")]
        self._hashing: list[Future[None] | None] = [None, None]
        self._turn = 0
        #: id of a buffer runs are read into again (a load's spare buffer, a bound target's
        #: gap buffers) -> the hash still reading it, if not done yet
        self._run_hashing: dict[int, Future[None]] = {}

    def _take_scratch(self, wanted: int) -> tuple[int, memoryview]:
        """The next scratch buffer (``slot``, view), of at least ``wanted`` bytes or
        ``_SCRATCH_BYTES``, whichever is less. A buffer grows only when more is wanted:
        between runs of small tensors only their framing is, and a new 8 MiB buffer per
        file and load cost 8k tensors (256 MiB) ~10 ms of page faults."""
        slot = self._turn
        self._turn ^= 1
        pending = self._hashing[slot]
        if pending is not None:
            pending.result()  # bounded: a hash of bytes in memory
            self._hashing[slot] = None
        wanted = min(wanted, _SCRATCH_BYTES)
        if self._scratch[slot].nbytes < wanted:
            # A bytearray, not a tensor (no torch here): verify measured no slower with it.
            size = min(max(wanted, 2 * self._scratch[slot].nbytes, 64 << 10), _SCRATCH_BYTES)
            self._scratch[slot] = memoryview(bytearray(size))
        return slot, self._scratch[slot]

    def _hash(self, view: memoryview, owner: object, slot: int | None = None) -> None:
        assert self.digest is not None
        pending = self.digest.update(view, owner)
        if slot is not None:
            self._hashing[slot] = pending
        if self.progress is not None:
            self.progress(view.nbytes)

    def hash_to(self, end: int) -> None:
        """Read and hash the bytes from ``position`` to ``end`` through scratch."""
        while self.position < end:
            slot, scratch = self._take_scratch(end - self.position)
            view = scratch[: min(end - self.position, scratch.nbytes)]
            _read_exactly(self.fd, view, self.position, self.full)
            self._hash(view, scratch, slot)
            self.position += view.nbytes

    def read_region(self, region: _Region) -> None:
        """Read ``region`` straight into its buffer (which may overlap bytes read already:
        pieces of one saved piece read for different targets; the digest takes each byte
        once)."""
        end = region.offset + region.nbytes
        view = region.buffer(self.root)
        if region.offset < self.position:
            _read_exactly(self.fd, view, region.offset, self.full)
            if self.digest is not None and end > self.position:
                self._hash(view[self.position - region.offset :], region)
            self.position = max(self.position, end)
            return
        if self.digest is not None:
            self.hash_to(region.offset)
        for at in range(0, view.nbytes, _CHUNK_BYTES):
            chunk = view[at : at + _CHUNK_BYTES]
            _read_exactly(self.fd, chunk, region.offset + at, self.full)
            if self.digest is not None:
                self._hash(chunk, region)
        self.position = end

    def read_run(self, run: _Run, load: _RunLoad) -> None:
        """Read ``run`` with one call (all of it, gaps included, even where some of its
        tensors are not wanted) and hash it as one update; then make its wanted tensors
        (``load.place``). A run the load reads straight into its target (``load.scatters``)
        is read with one call per ``IOV_MAX`` pieces, its tensors' bytes into the tensors
        and the bytes between them into the bound target's gap buffer, then hashed piece by
        piece, in file order."""
        if self.digest is not None and self.position < run.offset:
            self.hash_to(run.offset)
        scatter = None if load.scatters is None else load.scatters.get(run.number)
        if scatter is not None:
            self._wait_for_hash_of(scatter.owner)
            _read_scatter(self.fd, scatter.batches, run.offset, self.full)
            if self.digest is not None and run.end > self.position:
                pieces = scatter.views
                if self.position > run.offset:  # (overlapped by a region read before)
                    pieces = _bytes_after(pieces, self.position - run.offset)
                pending = self.digest.update_many(pieces, scatter.owner)
                if pending is not None:
                    self._run_hashing[id(scatter.owner)] = pending
                if self.progress is not None:
                    self.progress(run.end - max(self.position, run.offset))
            self.position = max(self.position, run.end)
            return
        buffer, views = load.buffer_for(run, self.root)
        if views is not None:  # the spare buffer, read into again run after run
            self._wait_for_hash_of(buffer)
        data = tensor_bytes(buffer)
        span = data[run.pad : run.pad + run.end - run.offset]
        _read_exactly(self.fd, span, run.offset, self.full)
        if self.digest is not None and run.end > self.position:
            pending = self.digest.update(span[max(0, self.position - run.offset) :], buffer)
            if views is not None and pending is not None:
                self._run_hashing[id(buffer)] = pending
            if self.progress is not None:
                self.progress(run.end - max(self.position, run.offset))
        self.position = max(self.position, run.end)
        load.place(run, buffer, views)

    def _wait_for_hash_of(self, buffer: object) -> None:
        """Return once the bytes last read into ``buffer`` are hashed (it is read into again)."""
        pending = self._run_hashing.pop(id(buffer), None)
        if pending is not None:
            pending.result()  # bounded: a hash of bytes in memory


def _hash_all(state: Any, views: list[memoryview], owner: object) -> None:
    del owner  # held only until the bytes are hashed
    collections.deque(map(state.update, views), maxlen=0)


#: the most buffers one ``preadv`` takes (Linux: 1024)
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if "SC_IOV_MAX" in os.sysconf_names else 16


def _read_scatter(
    fd: int, batches: list[tuple[list[memoryview], int]], offset: int, full: str
) -> None:
    """Read the file from ``offset`` on into ``batches`` (buffers of at most ``IOV_MAX``,
    with their total size), one call per batch; raises CorruptCheckpoint if it ends early."""
    for views, nbytes in batches:
        count = os.preadv(fd, views, offset)
        if count < nbytes:  # a short read (a signal, a file shrunk since): the rest in turn
            at = offset
            for view in views:
                done = min(max(offset + count - at, 0), view.nbytes)
                _read_exactly(fd, view[done:], at + done, full)
                at += view.nbytes
        offset += nbytes


def _bytes_after(views: list[memoryview], skip: int) -> list[memoryview]:
    """``views`` without their first ``skip`` bytes."""
    kept = []
    for view in views:
        if skip < view.nbytes:
            kept.append(view[skip:])
        skip = max(0, skip - view.nbytes)
    return kept


def _read_exactly(fd: int, view: memoryview, offset: int, full: str) -> None:
    while view.nbytes:
        count = os.preadv(fd, [view], offset)
        if count == 0:
            raise CorruptCheckpoint("file ended early", path=full)
        view = view[count:]
        offset += count
