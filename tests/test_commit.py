"""Commit: temporary directory, manifest, fsync, rename; checkpoint housekeeping."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import xxhash

import aiockpt._format.commit as commit
from aiockpt._format.commit import (
    TEMP_PREFIX,
    TRASH_PREFIX,
    abort,
    build_manifest,
    describe_leaves,
    finalize,
    is_committed,
    list_committed,
    prepare,
    record_unreported_files,
    remove_checkpoint,
    remove_stale_temps,
    write_checkpoint,
    write_files,
)
from aiockpt._format.loading import load
from aiockpt._format.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    OpaqueLeaf,
    ValueLeaf,
    decode_manifest,
    encode_manifest,
)
from aiockpt._format.reading import read_manifest, verify
from aiockpt.writers.base import FileRecord, WriterPart, flatten_state_dict
from aiockpt.writers.safetensors import SafetensorsWriter
from tests.writer_fixtures import FailingWriter, NoneReturningWriter, assert_same


def state(value: float = 1.0) -> dict[str, Any]:
    return {"w": torch.full((4,), value), "step": int(value)}


def save(path: Path, value: float = 1.0, **kwargs: Any) -> commit.CommitResult:
    return write_checkpoint(SafetensorsWriter(), state(value), path, format="safetensors", **kwargs)


def leftovers(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith((TEMP_PREFIX, TRASH_PREFIX))]


class RecordingWriter:
    """Remembers what commit handed it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[str]]] = []

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> list[FileRecord]:
        self.calls.append((path, os.stat(path).st_mode & 0o777, os.listdir(path)))
        return list(SafetensorsWriter().write(state_dict, path))


def test_write_checkpoint_commits(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    result = save(path, metadata={"epoch": 3, "tags": ["a"]})
    assert result.path == str(path)
    names = sorted(os.listdir(path))
    assert names == [MANIFEST_NAME, "model.safetensors"]
    assert result.nbytes == sum(os.path.getsize(path / n) for n in names)
    assert [f.name for f in result.files] == ["model.safetensors"]
    assert result.write_seconds >= 0 and result.commit_seconds >= 0
    manifest = decode_manifest((path / MANIFEST_NAME).read_bytes())
    assert manifest.format == "safetensors"
    assert manifest.format_version == 2 < FORMAT_VERSION  # nothing strided: older readers read it
    assert manifest.metadata == {"epoch": 3, "tags": ["a"]}
    assert manifest.leaves[1] == ValueLeaf(1)
    data = (path / "model.safetensors").read_bytes()
    assert manifest.files[0].xxh3_64 == xxhash.xxh3_64_hexdigest(data)
    assert is_committed(path) and leftovers(tmp_path) == []
    assert_same(load(path), state())
    assert msgspec.json.decode(msgspec.json.encode(result), type=commit.CommitResult) == result


def test_writer_gets_an_empty_owner_only_temp_sibling(tmp_path: Path) -> None:
    writer = RecordingWriter()
    write_checkpoint(writer, state(), tmp_path / "ckpt", format="safetensors")
    ((temp, mode, contents),) = writer.calls
    assert os.path.dirname(temp) == str(tmp_path)
    assert os.path.basename(temp).startswith(f"{TEMP_PREFIX}ckpt-")
    assert mode == 0o700 and contents == []


def test_existing_path_without_overwrite_raises_before_writing(tmp_path: Path) -> None:
    save(tmp_path / "ckpt", 1.0)
    writer = RecordingWriter()
    with pytest.raises(FileExistsError):
        write_checkpoint(writer, state(2.0), tmp_path / "ckpt", format="safetensors")
    assert writer.calls == []
    assert leftovers(tmp_path) == []
    assert_same(load(tmp_path / "ckpt"), state(1.0))


def test_existing_empty_directory_is_not_silently_replaced(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError):
        save(tmp_path / "ckpt")


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "portable"])
def test_overwrite_replaces_a_checkpoint(
    tmp_path: Path, renameat2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not renameat2:
        monkeypatch.setattr(commit, "_renameat2_function", None)
    save(tmp_path / "ckpt", 1.0)
    save(tmp_path / "ckpt", 2.0, overwrite=True)
    assert_same(load(tmp_path / "ckpt"), state(2.0))
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_failing_writer_leaves_nothing(tmp_path: Path, overwrite: bool) -> None:
    if overwrite:
        save(tmp_path / "ckpt", 1.0)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(
            FailingWriter(), state(), tmp_path / "ckpt", format="x", overwrite=overwrite
        )
    assert leftovers(tmp_path) == []
    if overwrite:
        assert_same(load(tmp_path / "ckpt"), state(1.0))
    else:
        assert not os.path.lexists(tmp_path / "ckpt")


def test_custom_writer_returning_none_is_hashed_and_fsynced_by_commit(tmp_path: Path) -> None:
    state_dict = {"a": torch.arange(4, dtype=torch.int32), "b": torch.ones(2), "n": 5}
    result = write_checkpoint(NoneReturningWriter(), state_dict, tmp_path / "ckpt", format="custom")
    files = {f.name: f for f in result.files}
    assert set(files) == {"weights.bin", "extra/notes.txt"}
    data = (tmp_path / "ckpt" / "weights.bin").read_bytes()
    assert files["weights.bin"].size == len(data) == 24
    assert files["weights.bin"].xxh3_64 == xxhash.xxh3_64_hexdigest(data)
    manifest = verify(tmp_path / "ckpt")
    assert manifest.leaves == [OpaqueLeaf("Tensor"), OpaqueLeaf("Tensor"), ValueLeaf(5)]
    with pytest.raises(ValueError, match="its own way"):
        load(tmp_path / "ckpt")


def test_torchs_own_experimental_writer_commits(tmp_path: Path) -> None:
    # path-first signature, torch.save inside, returns None: commit hashes and fsyncs.
    from torch.distributed.checkpoint._experimental.checkpoint_writer import (
        CheckpointWriter,
        CheckpointWriterConfig,
    )
    from torch.distributed.checkpoint._experimental.types import RankInfo as TorchRankInfo

    writer = CheckpointWriter(CheckpointWriterConfig(), TorchRankInfo(0, 1))
    result = write_checkpoint(writer, state(3.0), tmp_path / "ckpt", format="torch")
    assert [f.name for f in result.files] == ["checkpoint_0.pt"]
    verify(tmp_path / "ckpt")
    loaded = torch.load(tmp_path / "ckpt" / "checkpoint_0.pt", weights_only=True)
    assert_same(loaded, state(3.0))


class FutureWriter:
    """Returns a future that completes the write later, with the kwargs it was given."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Future[None]:
        self.kwargs = kwargs
        future: Future[None] = Future()

        def finish() -> None:
            time.sleep(0.05)
            with open(os.path.join(path, "late.bin"), "wb") as f:
                f.write(b"late")
            future.set_result(None)

        threading.Thread(target=finish).start()
        return future


def test_future_returning_writer_is_waited_for(tmp_path: Path) -> None:
    writer = FutureWriter()
    result = write_checkpoint(writer, {}, tmp_path / "ckpt", format="x", writer_kwargs={"step": 5})
    assert writer.kwargs == {"step": 5}
    assert [(f.name, f.size) for f in result.files] == [("late.bin", 4)]


class LyingWriter:
    def __init__(self, records: list[FileRecord], extra: str = "") -> None:
        self.records = records
        self.extra = extra

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> list[FileRecord]:
        with open(os.path.join(path, "f"), "wb") as f:
            f.write(b"12345")
        if self.extra == "symlink":
            os.symlink("/etc/passwd", os.path.join(path, "link"))
        elif self.extra == "manifest":
            with open(os.path.join(path, MANIFEST_NAME), "w") as f:
                f.write("{}")
        return self.records


@pytest.mark.parametrize(
    ("writer", "match"),
    [
        (LyingWriter([FileRecord("f", 4, "0")]), "with 4 bytes, found 5"),
        (LyingWriter([FileRecord("f", 5, "0"), FileRecord("g", 1, "0")]), "did not write"),
        (LyingWriter([FileRecord("../f", 5, "0")]), "not a relative file name"),
        (LyingWriter([], extra="symlink"), "not a regular file"),
        (LyingWriter([], extra="manifest"), "must not write"),
    ],
)
def test_writer_records_are_checked(tmp_path: Path, writer: LyingWriter, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_checkpoint(writer, {}, tmp_path / "ckpt", format="x")
    assert os.listdir(tmp_path) == []


def test_unencodable_metadata_fails_before_writing(tmp_path: Path) -> None:
    writer = RecordingWriter()
    with pytest.raises(TypeError, match="JSON-encodable"):
        write_checkpoint(
            writer, state(), tmp_path / "ckpt", format="safetensors", metadata={"x": object()}
        )
    assert writer.calls == [] and os.listdir(tmp_path) == []


def one_rank_manifest(
    pending: commit.PendingCheckpoint, state_dict: Any, records: list[FileRecord]
) -> Manifest:
    """What ``write_checkpoint`` makes of one rank's records, phase by phase."""
    flat_state = flatten_state_dict(state_dict)
    leaves = describe_leaves(flat_state, records)
    part = commit.RankPart(pending.path, WriterPart(records), flat_state[0], leaves)
    records = records + record_unreported_files(pending.temp_path, records)
    return build_manifest("safetensors", [part], records)


def test_phases_and_a_crash_before_finalize(tmp_path: Path) -> None:
    pending = prepare(tmp_path / "deep" / "er" / "ckpt")  # creates parents
    records = write_files(SafetensorsWriter(), state(), pending.temp_path)
    manifest = one_rank_manifest(pending, state(), records)
    # "Crash": the manifest is written in the temp directory but never renamed into place.
    (Path(pending.temp_path) / MANIFEST_NAME).write_bytes(encode_manifest(manifest))
    parent = tmp_path / "deep" / "er"
    assert not os.path.lexists(parent / "ckpt")
    assert not is_committed(pending.temp_path)
    assert list_committed(parent) == []
    assert remove_stale_temps(parent) == [pending.temp_path]
    assert os.listdir(parent) == []


def test_ranks_sharing_a_directory_leave_unreported_files_to_the_finalizer(
    tmp_path: Path,
) -> None:
    pending = prepare(tmp_path / "ckpt")
    ranked = write_files(SafetensorsWriter(), state(), pending.temp_path)
    silent = write_files(NoneReturningWriter(), state(), pending.temp_path)
    assert [r.name for r in ranked] == ["model.safetensors"] and silent == []
    rest = record_unreported_files(pending.temp_path, ranked)
    assert sorted(r.name for r in rest) == ["extra/notes.txt", "weights.bin"]
    abort(pending)


def test_finalize_then_abort_is_harmless(tmp_path: Path) -> None:
    pending = prepare(tmp_path / "ckpt")
    records = write_files(SafetensorsWriter(), state(), pending.temp_path)
    finalize(pending, one_rank_manifest(pending, state(), records))
    abort(pending)  # nothing left to remove
    assert is_committed(tmp_path / "ckpt")


def test_something_appearing_at_the_path_meanwhile_wins(tmp_path: Path) -> None:
    pending = prepare(tmp_path / "ckpt")
    records = write_files(SafetensorsWriter(), state(), pending.temp_path)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError):
        finalize(pending, one_rank_manifest(pending, state(), records))
    abort(pending)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_list_committed_and_is_committed(tmp_path: Path) -> None:
    for step in (10, 9, 100):
        save(tmp_path / f"step_{step}")
    (tmp_path / "step_11").mkdir()  # no manifest: never a checkpoint
    (tmp_path / "notes.txt").write_text("x")
    crashed = tmp_path / f"{TEMP_PREFIX}step_12-abc"
    crashed.mkdir()
    (crashed / MANIFEST_NAME).write_text("{}")
    assert list_committed(tmp_path) == [str(tmp_path / f"step_{s}") for s in (9, 10, 100)]
    assert not is_committed(tmp_path / "step_11")
    assert not is_committed(crashed)
    assert not is_committed(tmp_path / "missing")
    assert list_committed(tmp_path / "missing") == []


def test_a_linked_manifest_does_not_make_a_checkpoint(tmp_path: Path) -> None:
    """The loader refuses a manifest that is a link, so listing (``latest``, retention) must
    not count one either."""
    save(tmp_path / "real")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(tmp_path / "real" / MANIFEST_NAME, linked / MANIFEST_NAME)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / MANIFEST_NAME)
    assert not is_committed(linked) and not is_committed(tmp_path / "fifo")
    assert list_committed(tmp_path) == [str(tmp_path / "real")]


def test_remove_stale_temps_only_touches_its_own(tmp_path: Path) -> None:
    save(tmp_path / "keep")
    (tmp_path / "unrelated").mkdir()
    stale = [tmp_path / f"{TEMP_PREFIX}a-1", tmp_path / f"{TRASH_PREFIX}b-2"]
    for directory in stale:
        directory.mkdir()
        (directory / "data").write_bytes(b"x")
    fresh = tmp_path / f"{TEMP_PREFIX}c-3"
    fresh.mkdir()
    old = time.time() - 3600
    for directory in stale:
        os.utime(directory, (old, old))
    assert sorted(remove_stale_temps(tmp_path, min_age_s=60)) == sorted(map(str, stale))
    assert sorted(os.listdir(tmp_path)) == [f"{TEMP_PREFIX}c-3", "keep", "unrelated"]
    assert remove_stale_temps(tmp_path) == [str(fresh)]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_remove_checkpoint(tmp_path: Path) -> None:
    save(tmp_path / "ckpt")
    remove_checkpoint(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        remove_checkpoint(tmp_path / "ckpt")
    (tmp_path / "precious").mkdir()
    with pytest.raises(ValueError, match="not a committed checkpoint"):
        remove_checkpoint(tmp_path / "precious")
    assert os.listdir(tmp_path) == ["precious"]


def test_read_manifest_of_a_commit(tmp_path: Path) -> None:
    save(tmp_path / "ckpt", metadata={"k": 1})
    assert read_manifest(tmp_path / "ckpt").metadata == {"k": 1}


def test_a_checkpoint_replaced_as_it_was_published_is_not_reported_durable(
    tmp_path: Path,
) -> None:
    """The check ``finalize`` makes after its rename, made here after another writer (one
    outside the root lock) put its own checkpoint at the path."""
    path = tmp_path / "ckpt"
    save(path, 1.0)
    ours = os.stat(path)
    commit.check_published(str(path), ours)  # still ours: fine
    save(tmp_path / "theirs", 2.0)
    os.rename(path, tmp_path / "ours-aside")
    os.rename(tmp_path / "theirs", path)
    with pytest.raises(FileExistsError, match="another writer replaced this checkpoint"):
        commit.check_published(str(path), ours)
    with pytest.raises(FileExistsError):  # or removed it
        commit.check_published(str(tmp_path / "nothing"), ours)


# --- The hooks of write_checkpoint: cancel before commit, and the ranks of one save.


def test_before_commit_runs_once_the_files_are_written_and_before_the_rename(
    tmp_path: Path,
) -> None:
    seen: list[tuple[list[str], bool]] = []

    def before_commit() -> None:
        (temp,) = leftovers(tmp_path)
        seen.append((sorted(os.listdir(tmp_path / temp)), os.path.lexists(tmp_path / "ckpt")))

    write_checkpoint(
        SafetensorsWriter(), state(), tmp_path / "ckpt", format="x", before_commit=before_commit
    )
    assert seen == [(["model.safetensors"], False)]
    assert is_committed(tmp_path / "ckpt") and leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_before_commit_raising_cancels_the_save(tmp_path: Path, overwrite: bool) -> None:
    """The worker's cancel gate raises here: nothing is published, the old checkpoint stays."""
    if overwrite:
        save(tmp_path / "ckpt", 1.0)

    def cancelled() -> None:
        raise RuntimeError("cancelled before its commit")

    with pytest.raises(RuntimeError, match="cancelled before its commit"):
        save(tmp_path / "ckpt", 2.0, overwrite=overwrite, before_commit=cancelled)
    assert leftovers(tmp_path) == []
    if overwrite:
        assert_same(load(tmp_path / "ckpt"), state(1.0))
    else:
        assert not os.path.lexists(tmp_path / "ckpt")
