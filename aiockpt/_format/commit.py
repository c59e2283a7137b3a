"""Atomic, durable commit of checkpoint directories.

Theory of operation. A directory is a checkpoint if and only if it contains the manifest
(``aiockpt-manifest.json``), and the manifest is only ever created inside a temporary
directory, after every file it names has been fsynced, and is itself fsynced before the
directory is renamed into place. So whoever sees a manifest at a checkpoint path sees a
complete, durable checkpoint; a crash at any point leaves either the old state or the new one,
plus at worst a temporary directory that ``remove_stale_temps`` recognises by its name.

Every save goes through ``write_checkpoint``, in three phases, so that a multi-rank save can
run the middle one on every rank against one shared temporary directory and the last one on
a single rank (a single-rank save is the same with one part and nobody to meet):

1. ``prepare(path, overwrite=)`` (rank 0): refuse an existing ``path`` unless overwriting
   (before anything is written), create ``<parent>/aiockpt-tmp-<name>-<random>`` (0o700);
2. every rank: run the writer there (``write_files``, or a ``GroupWriter``'s planned steps)
   and describe its leaves (``describe_leaves``) as a ``RankPart``;
3. rank 0, every part in: the writer's global files, the files no writer reported hashed
   and fsynced (``record_unreported_files``), the manifest (``build_manifest``); the
   caller's ``before_commit`` hook (the worker's cancel gate); then ``finalize(pending,
   manifest)``: write and fsync the manifest, fsync the directory, rename it into place,
   fsync the parent. With ``overwrite=True`` an existing checkpoint is swapped out
   atomically (``renameat2(RENAME_EXCHANGE)`` where the file system has it), so the path
   never shows a directory without a manifest; elsewhere the old one is renamed aside first
   and the path is briefly absent, never torn.

On any exception ``abort(pending)`` removes the temporary directory. Removing a checkpoint
renames it to ``aiockpt-del-<name>-<random>`` first, so a crash halfway through deleting never
leaves something that looks committed.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import operator
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, cast

import msgspec
import xxhash

from aiockpt._format.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Leaf,
    Manifest,
    OpaqueLeaf,
    RankState,
    check_relative_name,
    encode_manifest,
    format_version_of,
    plain_leaf,
)
from aiockpt._format.tree import KeyPath, Node
from aiockpt._runtime import libc_function
from aiockpt._wire.protocol import ShardSpec
from aiockpt.errors import CoordinationError
from aiockpt.writers.base import (
    FileRecord,
    FileSink,
    GroupWriter,
    Writer,
    WriterPart,
    flatten_state_dict,
)

__all__ = [
    "TEMP_PREFIX",
    "TRASH_PREFIX",
    "CommitPeers",
    "CommitResult",
    "FlatState",
    "PendingCheckpoint",
    "RankPart",
    "abort",
    "build_manifest",
    "check_published",
    "describe_leaves",
    "finalize",
    "is_committed",
    "list_committed",
    "prepare",
    "record_unreported_files",
    "remove_checkpoint",
    "remove_stale_temps",
    "write_checkpoint",
    "write_files",
]

#: name prefix of the temporary directory of a save in progress (or of one that crashed)
TEMP_PREFIX = "aiockpt-tmp-"
#: name prefix of a checkpoint being deleted (or replaced) whose removal may have crashed
TRASH_PREFIX = "aiockpt-del-"
# Leaves room for the prefixes and random suffixes within NAME_MAX (255).
_NAME_PART = 100
_HASH_CHUNK = 8 << 20


class CommitResult(msgspec.Struct, frozen=True):
    """A committed checkpoint: where, how many bytes in all (manifest included), its files,
    and the seconds spent in the writer and in committing (manifest, fsyncs, renames)."""

    path: str
    nbytes: int
    files: list[FileEntry]
    write_seconds: float
    commit_seconds: float


@dataclass(frozen=True)
class PendingCheckpoint:
    """A save between ``prepare`` and ``finalize``/``abort``."""

    path: str
    temp_path: str
    overwrite: bool


#: ``(skeleton, [(key path, leaf), ...])``: a state dict flattened once per save, in the leaf
#: order of ``FileRecord.leaves`` (``flatten_state_dict``)
FlatState: TypeAlias = tuple[Node, list[tuple[KeyPath, Any]]]


class CommitPeers(Protocol):
    """The other ranks of a multi-rank save, as ``write_checkpoint`` meets them (the worker's
    ``RankGroup``: rounds over the group's store). Rank 0 prepares the directory every rank
    writes into and commits; the others write their part and hand it over. Each method
    blocks up to the group's timeout and raises ``CoordinationTimeout`` when a rank did not
    come, ``RankFailed`` when one failed."""

    @property
    def rank(self) -> int: ...

    def share_temp_path(self, temp_path: str | None) -> str:
        """Rank 0: tell the others ``temp_path``; the others (passing None): learn it."""
        ...

    def assign(self, writer: GroupWriter, plan: Any) -> Any:
        """Every rank's ``plan`` to rank 0, which ``writer.assign``s them; this rank's
        assignment."""
        ...

    def exchange_parts(self, part: RankPart) -> list[RankPart]:
        """Rank 0: every rank's part in rank order, ``part`` first; the others: hand
        ``part`` over and return ``[]``."""
        ...

    def publish(self, result: CommitResult) -> None:
        """Rank 0, once committed: tell the others."""
        ...

    def receive(self) -> CommitResult:
        """Ranks but 0: what rank 0 committed."""
        ...

    def fail(self, exc: BaseException) -> None:
        """Tell the others this rank failed (never raises), so that none waits for it."""
        ...


def _no_hook() -> None:
    pass


def write_checkpoint(
    writer: Writer,
    state_dict: Any,
    path: str | os.PathLike[str],
    *,
    format: str,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    writer_kwargs: Mapping[str, Any] | None = None,
    before_commit: Callable[[], None] = _no_hook,
    peers: CommitPeers | None = None,
    shards: Mapping[int, ShardSpec] | None = None,
) -> CommitResult:
    """Write ``state_dict`` with ``writer`` and commit it at ``path``: every save, by one
    rank or several, the tests' and the worker's, goes through here.

    ``before_commit`` is called at this rank's point of no return (rank 0: before the
    rename; the others: before handing their part over) and may raise to cancel the save
    (the worker's ``WriteGate``). ``peers`` makes this one rank of a multi-rank save: every
    rank writes into the temporary directory rank 0 made (a ``GroupWriter`` plans across
    ranks first), and rank 0, every part in, writes the writer's global files and the one
    manifest (``finalize_group``). ``shards`` (leaf index -> where that piece lies in the
    whole) only matter with ``peers``.

    ``writer_kwargs`` are passed on to ``writer.write``. Raises FileExistsError if ``path``
    exists and not ``overwrite`` (nothing written), TypeError if ``metadata`` is not
    JSON-encodable or a writer that cannot write shards gets some, what ``before_commit``,
    ``peers`` and the writer raise; on any exception the temporary directory is removed
    (by rank 0), ``path`` is untouched, and ``peers`` are told.
    """
    user_metadata = _check_metadata(metadata)
    rank = 0 if peers is None else peers.rank
    started = time.perf_counter()
    pending: PendingCheckpoint | None = None
    try:
        temp_path: str | None = None
        if rank == 0:
            pending = prepare(path, overwrite=overwrite)
            temp_path = pending.temp_path
        if peers is not None:
            temp_path = peers.share_temp_path(temp_path)
        assert temp_path is not None
        flat_state = flatten_state_dict(state_dict)
        if peers is not None and isinstance(writer, GroupWriter):
            assignment = peers.assign(writer, writer.plan(state_dict, shards or {}))
            written = writer.write_part(state_dict, temp_path, assignment)
        else:
            if peers is not None and shards:
                raise TypeError(
                    f"{type(writer).__name__} cannot write sharded tensors (DTensor); "
                    "use format='dcp'"
                )
            written = WriterPart(write_files(writer, state_dict, temp_path, writer_kwargs))
        leaves = describe_leaves(flat_state, written.records, elsewhere=written.imports)
        part = RankPart(os.path.abspath(os.fspath(path)), written, flat_state[0], leaves)
        write_seconds = time.perf_counter() - started
        if peers is not None and rank != 0:
            before_commit()
            peers.exchange_parts(part)
            return peers.receive()
        parts = [part] if peers is None else peers.exchange_parts(part)
        commit_started = time.perf_counter()
        assert pending is not None
        manifest = _manifest_of_parts(
            writer, pending, parts, format, user_metadata, grouped=peers is not None
        )
        before_commit()
        manifest_size = finalize(pending, manifest)
        result = CommitResult(
            path=pending.path,
            nbytes=sum(f.size for f in manifest.files) + manifest_size,
            files=manifest.files,
            write_seconds=write_seconds,
            commit_seconds=time.perf_counter() - commit_started,
        )
        if peers is not None:
            peers.publish(result)
        return result
    except BaseException as exc:
        if peers is not None:
            peers.fail(exc)
        if pending is not None:
            abort(pending)
        raise


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    # Fail before writing gigabytes, not after.
    user_metadata = dict(metadata or {})
    try:
        msgspec.json.encode(user_metadata)
    except (msgspec.EncodeError, TypeError) as exc:
        raise TypeError(f"checkpoint metadata must be JSON-encodable: {exc}") from exc
    return user_metadata


def prepare(path: str | os.PathLike[str], *, overwrite: bool = False) -> PendingCheckpoint:
    """Phase 1: check ``path`` and create the temporary directory next to it.

    Creates missing parent directories (durably). Raises FileExistsError if ``path`` exists
    and not ``overwrite``, or exists and is not a committed checkpoint (``overwrite`` replaces
    checkpoints, never other files or directories); ValueError for a path with no final
    component.
    """
    final = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(final)
    if not name:
        raise ValueError(f"checkpoint path {os.fspath(path)!r} has no name")
    if os.path.lexists(final):
        if not overwrite:
            raise FileExistsError(errno.EEXIST, "checkpoint path exists and overwrite=False", final)
        _check_replaceable(final)
    _makedirs_durable(parent)
    temp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name[:_NAME_PART]}-", dir=parent)
    return PendingCheckpoint(final, temp, overwrite)


def write_files(
    writer: Writer,
    state_dict: Any,
    temp_path: str,
    writer_kwargs: Mapping[str, Any] | None = None,
) -> list[FileRecord]:
    """Run ``writer`` in ``temp_path``; return the records of the files it reported.

    The writer is called with keywords (torch's experimental ``CheckpointWriter.write`` takes
    ``path`` first); a ``concurrent.futures.Future`` it returns is waited for; anything but
    ``FileRecord``s in what it returns is ignored. Files it did not report are left to
    ``record_unreported_files``, which runs once all ranks sharing the directory have written.

    Raises what the writer raises, and ValueError if a record names a file outside the
    directory, a missing file or one of another size, or the manifest.
    """
    reported = writer.write(state_dict=state_dict, path=temp_path, **(writer_kwargs or {}))
    if isinstance(reported, Future):
        reported = reported.result()
    records: list[FileRecord] = []
    if isinstance(reported, Sequence):
        records = [r for r in reported if isinstance(r, FileRecord)]
    for record in records:
        _check_reported(temp_path, record)
    return records


def _check_reported(temp_path: str, record: FileRecord) -> None:
    check_relative_name(record.name)
    if not os.path.isdir(temp_path):
        raise FileNotFoundError(
            errno.ENOENT,
            "the checkpoint's temporary directory was removed while writing",
            temp_path,
        )
    if record.name == MANIFEST_NAME:
        raise ValueError(f"writers must not write {MANIFEST_NAME}: commit writes it")
    try:
        info = os.lstat(os.path.join(temp_path, record.name))
    except FileNotFoundError:
        raise ValueError(f"writer reported {record.name!r}, which it did not write") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size != record.size:
        raise ValueError(
            f"writer reported {record.name!r} with {record.size} bytes, found {info.st_size}"
        )


def record_unreported_files(temp_path: str, known: Sequence[FileRecord]) -> list[FileRecord]:
    """Hash and fsync every file under ``temp_path`` not in ``known``, fsync subdirectories.

    Raises ValueError for anything but regular files and directories, or for a file named
    like the manifest.
    """
    names = {record.name for record in known}
    unreported = sorted(set(_list_files(temp_path)) - names)
    if MANIFEST_NAME in unreported:
        raise ValueError(f"writers must not write {MANIFEST_NAME}: commit writes it")
    return [_hash_file(temp_path, name) for name in unreported]


def describe_leaves(
    flat_state: FlatState, records: Sequence[FileRecord], *, elsewhere: Collection[int] = ()
) -> list[Leaf | None]:
    """A manifest entry per leaf of a flattened state dict, as written into ``records``:
    leaves the writer located stay where it put them, plain values go into the manifest,
    anything else a writer stored without saying where becomes ``OpaqueLeaf``; leaves in
    ``elsewhere`` (another rank wrote them) are None, to be resolved by rank 0.
    """
    located: dict[int, Leaf] = {}
    for record in records:
        located.update(record.leaves)
    flat = flat_state[1]
    # The located leaves (every tensor) in one pass in C; Python only for the rest.
    leaves: list[Leaf | None] = list(map(located.get, range(len(flat))))
    unlocated = itertools.compress(range(len(flat)), map(operator.not_, leaves))
    for index in unlocated:
        if index in elsewhere:
            continue
        value = flat[index][1]
        leaf = plain_leaf(value)
        leaves[index] = OpaqueLeaf(type(value).__qualname__) if leaf is None else leaf
    return leaves


class RankPart(msgspec.Struct, frozen=True):
    """What one rank contributes to a multi-rank checkpoint (posted to rank 0)."""

    #: where this rank means to save: every rank must name the same path
    path: str
    written: WriterPart
    skeleton: Node
    #: ``describe_leaves``; None for a leaf another rank wrote (``written.imports``)
    leaves: list[Leaf | None]
    #: generation of this rank's worker process group; None while it has none
    pg_generation: int | None = None


def build_manifest(
    format: str,
    parts: Sequence[RankPart],
    records: Sequence[FileRecord],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    """The manifest of a save by ``len(parts)`` ranks (one, or several sharing one directory)
    whose files are ``records``.

    Raises ValueError if a rank's leaf refers to a tensor no rank exported.
    """
    exports: dict[str, Leaf] = {}
    for part in parts:
        exports.update(part.written.exports)
    states: list[RankState] = []
    for rank, part in enumerate(parts):
        leaves = list(part.leaves)
        if None in leaves:  # leaves another rank wrote
            for index, leaf in enumerate(part.leaves):
                if leaf is None:
                    key = part.written.imports.get(index, "")
                    if key not in exports:
                        raise ValueError(
                            f"rank {rank}'s leaf {index} ({key!r}) was written by no rank"
                        )
                    leaves[index] = exports[key]
        states.append(RankState(part.skeleton, cast(list[Leaf], leaves)))
    return Manifest(
        format_version=format_version_of(state.leaves for state in states),
        format=format,
        files=_entries(records),
        skeleton=states[0].skeleton,
        leaves=states[0].leaves,
        metadata=dict(metadata or {}),
        world_size=len(parts),
        ranks=states[1:],
    )


def _manifest_of_parts(
    writer: Writer,
    pending: PendingCheckpoint,
    parts: Sequence[RankPart],
    format: str,
    metadata: Mapping[str, Any],
    *,
    grouped: bool,
) -> Manifest:
    """Rank 0 (or the only rank), every part in: the writer's files that describe the whole
    (a ``GroupWriter``'s ``finish``, multi-rank only), the unreported files hashed and
    fsynced, the manifest. Raises CoordinationError if the ranks disagree on the path."""
    for rank, part in enumerate(parts):
        if part.path != pending.path:
            raise CoordinationError(
                f"ranks disagree on the checkpoint path: rank 0 saves to "
                f"{pending.path!r}, rank {rank} to {part.path!r}",
                rank=rank,
            )
    records = [record for part in parts for record in part.written.records]
    if grouped and isinstance(writer, GroupWriter):
        records += writer.finish(pending.temp_path, [part.written for part in parts])
    records += record_unreported_files(pending.temp_path, records)
    return build_manifest(format, parts, records, metadata=metadata)


def _entries(records: Sequence[FileRecord]) -> list[FileEntry]:
    return sorted((FileEntry(r.name, r.size, r.xxh3_64) for r in records), key=_entry_name)


def _entry_name(entry: FileEntry) -> str:
    return entry.name


def finalize(pending: PendingCheckpoint, manifest: Manifest) -> int:
    """Phase 3: write the manifest, make everything durable, publish at ``pending.path``.

    Returns the manifest's size in bytes. Raises FileExistsError if something appeared at
    the path meanwhile and not ``overwrite``, or if, once published, the path no longer holds
    this checkpoint (another writer replaced it); the caller then aborts.
    """
    with FileSink(pending.temp_path, MANIFEST_NAME) as sink:
        sink.write(encode_manifest(manifest))
        size = sink.close().size
    _fsync_dir(pending.temp_path)
    ours = os.stat(pending.temp_path)
    parent = os.path.dirname(pending.path)
    if pending.overwrite and os.path.lexists(pending.path):
        _check_replaceable(pending.path)  # something else may have appeared since prepare
        _replace(pending.temp_path, pending.path)
    else:
        _rename_noreplace(pending.temp_path, pending.path)
        _fsync_dir(parent)
    check_published(pending.path, ours)
    return size


def check_published(path: str, ours: os.stat_result) -> None:
    """Raise FileExistsError unless ``path`` is the very directory ``ours`` describes: a
    save is reported durable only if what is at its path is what it committed. (Renaming
    keeps a directory's identity; a writer outside the root lock that replaced it would not.)
    """
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        there = None
    if there is None or (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino):
        raise FileExistsError(
            errno.EEXIST,
            "another writer replaced this checkpoint as it was committed; what is there now "
            "is not what this save wrote",
            path,
        )


def _check_replaceable(path: str) -> None:
    if not is_committed(path):
        raise FileExistsError(
            errno.EEXIST,
            "overwrite=True replaces a committed checkpoint only, and this is not one",
            path,
        )


def abort(pending: PendingCheckpoint) -> None:
    """Remove the temporary directory of a failed save (best effort, never raises)."""
    shutil.rmtree(pending.temp_path, ignore_errors=True)


def is_committed(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed checkpoint: a directory holding a manifest (a regular
    file, not a link: the loader refuses links) whose name is not one of a save in progress
    or a removal in progress."""
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    if name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
        return False
    try:
        return stat.S_ISREG(os.lstat(os.path.join(path, MANIFEST_NAME)).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def list_committed(root: str | os.PathLike[str]) -> list[str]:
    """Paths of the committed checkpoints directly under ``root``, in natural name order
    (``step_9`` before ``step_10``); empty if ``root`` does not exist."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    names = [e.name for e in entries if is_committed(e.path)]
    return [os.path.join(os.fspath(root), n) for n in sorted(names, key=_natural_key)]


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def remove_stale_temps(root: str | os.PathLike[str], *, min_age_s: float = 0.0) -> list[str]:
    """Remove what crashed saves and removals left directly under ``root``; return the paths.

    Only entries named like a save or removal in progress are touched, and only those last
    modified at least ``min_age_s`` ago: a save still running under ``root`` in another
    process would otherwise lose its temporary directory, so call this when none can be
    (at start-up), or with a generous ``min_age_s``.
    """
    removed: list[str] = []
    now = time.time()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            _remove_any(entry.path)
        except FileNotFoundError:
            continue  # someone else removed it first
        removed.append(entry.path)
    return removed


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete the committed checkpoint at ``path``, crash-safely.

    The directory is first renamed aside (atomic: it stops being a checkpoint at once), then
    deleted; a crash in between leaves an ``aiockpt-del-*`` directory for
    ``remove_stale_temps``. Raises FileNotFoundError if nothing is at ``path``, ValueError if
    what is there is not a committed checkpoint (never deletes arbitrary directories).
    """
    final = os.path.abspath(os.fspath(path))
    if not os.path.lexists(final):
        raise FileNotFoundError(errno.ENOENT, "no checkpoint at this path", final)
    if not is_committed(final):
        raise ValueError(f"{final!r} is not a committed checkpoint; not removing it")
    trash = _aside_name(final)
    os.rename(final, trash)
    _fsync_dir(os.path.dirname(final))
    _remove_any(trash)


def _aside_name(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f"{TRASH_PREFIX}{name[:_NAME_PART]}-{uuid.uuid4().hex[:12]}")


def _replace(temp: str, final: str) -> None:
    """Put ``temp`` at ``final``, which exists, then delete what was there."""
    parent = os.path.dirname(final)
    if _renameat2(temp, final, _RENAME_EXCHANGE):
        old = temp  # the exchange left the old checkpoint under the temporary name
    else:
        old = _aside_name(final)
        os.rename(final, old)
        os.rename(temp, final)
    _fsync_dir(parent)
    _remove_any(old)


def _rename_noreplace(temp: str, final: str) -> None:
    if _renameat2(temp, final, _RENAME_NOREPLACE):
        return
    # No renameat2: a plain rename would silently replace an empty directory at final.
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "checkpoint path exists and overwrite=False", final)
    os.rename(temp, final)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


_renameat2_function = libc_function(
    "renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
)


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux ``renameat2``; False if the system or file system does not support ``flags``.

    Raises OSError (FileExistsError for RENAME_NOREPLACE onto an existing path).
    """
    if _renameat2_function is None:
        return False
    if _renameat2_function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise OSError(code, os.strerror(code), src, None, dst)
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(directory: str) -> None:
    """``os.makedirs``, then fsync the parent of each directory it created."""
    missing: list[str] = []
    probe = directory
    while not os.path.isdir(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    if missing:
        os.makedirs(directory, exist_ok=True)
        for created in reversed(missing):
            _fsync_dir(os.path.dirname(created))


def _remove_any(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _list_files(top: str) -> list[str]:
    """Relative names of all files under ``top``; fsyncs every subdirectory on the way.

    Raises ValueError for anything but regular files and directories (a symlink could make
    readers and removers reach outside the checkpoint).
    """
    files: list[str] = []
    for directory, dirnames, filenames in os.walk(top):
        relative_dir = os.path.relpath(directory, top)
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ValueError(f"writer left {full!r}, which is not a regular file")
            files.append(name if relative_dir == "." else f"{relative_dir}/{name}")
        if directory != top:
            _fsync_dir(directory)
    return files


def _hash_file(top: str, name: str) -> FileRecord:
    """Hash and fsync ``top/name`` for a writer that did not report it."""
    digest = xxhash.xxh3_64()
    size = 0
    with open(os.path.join(top, name), "rb", buffering=0) as f:
        buffer = bytearray(_HASH_CHUNK)
        view = memoryview(buffer)
        while count := f.readinto(buffer):
            digest.update(view[:count])
            size += count
        os.fsync(f.fileno())
    return FileRecord(name, size, digest.hexdigest())
