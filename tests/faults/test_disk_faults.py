"""Fault injection: the file system refuses the save (full, read-only, the target is a file,
the parent vanishes mid-save).

Every such save fails with a clear error that says what the file system said, the worker keeps
serving, earlier checkpoints stay intact and loadable, and nothing half-written is left.
A full disk is a small tmpfs mounted for the test (root only); elsewhere a file-size limit
exercises the writer's abort path in a child process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt
from aiockpt import Checkpointer, CheckpointWriteError
from aiockpt._format import commit, reading
from tests.faults import TRICKLING, TricklingWriter
from tests.writer_fixtures import GATED, WriteGateFiles

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def state_of(nbytes: int, fill: float) -> dict[str, Any]:
    return {"w": torch.full((nbytes // 4,), fill), "fill": fill}


def assert_holds(path: Path, fill: float) -> None:
    reading.verify(path)
    loaded = aiockpt.load(path)
    assert loaded["fill"] == fill and bool((loaded["w"] == fill).all())


def leftovers(directory: Path) -> list[str]:
    """What a failed save may not leave: temporary or half-removed directories."""
    return [
        n for n in os.listdir(directory) if n.startswith((commit.TEMP_PREFIX, commit.TRASH_PREFIX))
    ]


@functools.cache
def tmpfs_problem() -> str | None:
    """Why a small tmpfs cannot be mounted here (None: it can). Probed once."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = tempfile.mkdtemp(prefix="tmpfs-probe-")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            return f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        subprocess.run(["umount", probe], check=True)
        return None
    finally:
        os.rmdir(probe)


@functools.cache
def permission_bits_enforced() -> bool:
    """False for root with CAP_DAC_OVERRIDE, which writes into a 0o500 directory anyway."""
    probe = Path(tempfile.mkdtemp(prefix="perm-probe-"))
    try:
        probe.chmod(0o500)
        try:
            (probe / "x").touch()
        except PermissionError:
            return True
        (probe / "x").unlink()
        return False
    finally:
        probe.chmod(0o700)
        probe.rmdir()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (``tmpfs_problem()`` must be
    None). Always unmounted, lazily if something still holds it."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)]
    subprocess.run(mount, check=True, capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)
        path.rmdir()


def remount(path: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(path)], check=True)


async def disk_full(ckpt: Checkpointer, tmp_path: Path) -> None:
    """A save that does not fit on an 8 MiB tmpfs fails with ENOSPC, frees what it wrote, and
    leaves the earlier checkpoint there intact; saves that fit, there or elsewhere, go on."""
    with tmpfs(tmp_path / "small", "8m") as small:
        await ckpt.save_to(state_of(1 * MiB, 1.0), small / "first")
        used_after_first = shutil.disk_usage(small).used
        with pytest.raises(CheckpointWriteError, match="No space left on device") as caught:
            await ckpt.save_to(state_of(12 * MiB, 2.0), small / "too-big")
        assert caught.value.error_type == "OSError"
        # The message names the file being written, not only the checkpoint.
        assert re.search(r"No space left on device: '[^']*too-big[^']*/[^'/]+'", str(caught.value))
        assert leftovers(small) == [] and not (small / "too-big").exists()
        assert shutil.disk_usage(small).used == used_after_first  # its space is free again
        assert_holds(small / "first", 1.0)
        await ckpt.save_to(state_of(1 * MiB, 3.0), small / "fits")
        await ckpt.save_to(state_of(12 * MiB, 4.0), tmp_path / "roomy" / "ck")
        assert_holds(small / "first", 1.0)
        assert_holds(small / "fits", 3.0)
    assert_holds(tmp_path / "roomy" / "ck", 4.0)


FILE_SIZE_LIMIT_SCRIPT = """
import json, os, resource, signal, sys
import torch
from aiockpt._format import commit, loading, reading
from aiockpt.writers import create_writer

root = sys.argv[1]
small = os.path.join(root, "small")
commit.write_checkpoint(create_writer("dcp"), {"w": torch.ones(256)}, small, format="dcp")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # the soft limit: it can be undone
outcome = {}
try:
    big = {"w": torch.ones(1 << 20)}
    commit.write_checkpoint(create_writer("dcp"), big, os.path.join(root, "big"), format="dcp")
except OSError as exc:
    outcome = {"errno": exc.errno, "message": str(exc)}
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
reading.verify(small)
outcome["left"] = sorted(os.listdir(root))
print(json.dumps(outcome))
"""


def test_file_size_limit_aborts_the_write_cleanly(tmp_path: Path) -> None:
    """Where no tmpfs can be mounted (no root): the same abort path, driven by RLIMIT_FSIZE
    in a child process (the limit must not reach this test process), with the writer and
    commit run in-process."""
    if tmpfs_problem() is None:
        pytest.skip("a real full tmpfs is tested instead (test_the_file_system_refusing...)")
    child = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.returncode == 0, child.stderr
    outcome = json.loads(child.stdout.splitlines()[-1])
    assert outcome.get("errno") == errno.EFBIG, outcome
    assert "File too large" in outcome["message"]
    assert ".distcp'" in outcome["message"], outcome  # names the file being written
    assert outcome["left"] == ["small"]  # no temporary directory, no "big"


async def test_the_file_system_refusing_saves_fails_them_clearly_and_the_worker_serves_on(
    tmp_path: Path,
) -> None:
    """A full disk, a read-only target, a regular file at or above the target, the parent
    removed while the save is in progress: each save fails with the file system's own words,
    leaves nothing behind, and the next save through the same worker succeeds. (One worker
    for all of them: each start costs seconds.)"""
    async with Checkpointer(tmp_path / "root") as ckpt:
        await ckpt.save(state_of(MiB, 1.0), step=1)
        pid = ckpt.worker_pid

        # -- full: a small tmpfs where root can mount one (elsewhere see the RLIMIT test)
        if tmpfs_problem() is None:
            await disk_full(ckpt, tmp_path)

        # -- read-only: root ignores permission bits, so remount a tmpfs read-only instead
        if tmpfs_problem() is None:
            with tmpfs(tmp_path / "ro", "16m") as ro:
                await ckpt.save_to(state_of(MiB, 2.0), ro / "before")
                remount(ro, "ro")
                try:
                    with pytest.raises(CheckpointWriteError, match="Read-only file system"):
                        await ckpt.save_to(state_of(MiB, 3.0), ro / "after")
                    assert_holds(ro / "before", 2.0)
                    assert sorted(os.listdir(ro)) == ["before"]
                finally:
                    remount(ro, "rw")
        elif permission_bits_enforced():  # (else: no way to make a read-only target here)
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            try:
                with pytest.raises(CheckpointWriteError, match="Permission denied"):
                    await ckpt.save_to(state_of(MiB, 3.0), locked / "ck")
                assert os.listdir(locked) == []
            finally:
                locked.chmod(0o700)

        # -- the target is a regular file: refused before anything is staged or written
        target = tmp_path / "a-file"
        target.write_text("not a checkpoint")
        handle = ckpt.save_to(state_of(MiB, 4.0), target)
        with pytest.raises(FileExistsError, match="exists"):
            await handle.staged
        with pytest.raises(FileExistsError):
            await handle
        # -- a regular file where the target's parent directory should be
        with pytest.raises(CheckpointWriteError, match=r"File exists|Not a directory"):
            await ckpt.save_to(state_of(MiB, 4.0), target / "ck")
        assert target.read_text() == "not a checkpoint"

        # -- the parent directory removed after the temporary directory was made in it,
        # before the writer writes (removal while it writes: see the in-process test below)
        doomed = tmp_path / "doomed"
        gate = WriteGateFiles(tmp_path)
        try:
            held = {**state_of(4 * MiB, 5.0), "gate": gate.entry}
            handle = ckpt.save_to(held, doomed / "ck", format=GATED)
            await gate.started()  # the temporary directory exists; nothing is written yet
            assert leftovers(doomed)
            await asyncio.to_thread(shutil.rmtree, doomed)
            await gate.open()
            with pytest.raises(CheckpointWriteError, match="No such file or directory"):
                await handle
        finally:
            gate.remove()
        assert not doomed.exists()  # nothing recreated it

        assert ckpt.worker_pid == pid  # every failure above was the writer's, not the worker's
        await ckpt.save(state_of(MiB, 6.0), step=6)
        assert ckpt.worker_pid == pid
    assert_holds(tmp_path / "root" / "step_0000000001", 1.0)
    assert_holds(tmp_path / "root" / "step_0000000006", 6.0)
    assert leftovers(tmp_path / "root") == []


def test_parent_removed_while_the_writer_writes_says_so(tmp_path: Path) -> None:
    """The commit path the worker runs, in-process: the parent directory is removed while
    the writer is writing into its temporary directory (files already open)."""
    doomed = tmp_path / "doomed"
    failure: list[BaseException] = []
    in_file, removed = threading.Event(), threading.Event()

    class HeldInFileWriter(TricklingWriter):
        def after_slice(self) -> None:
            if not in_file.is_set():  # held after its first slice until the parent is gone
                in_file.set()
                assert removed.wait(60), "the test never removed the parent"

    def save() -> None:
        try:
            commit.write_checkpoint(
                HeldInFileWriter(), state_of(4 * MiB, 1.0), doomed / "ck", format=TRICKLING
            )
        except BaseException as exc:
            failure.append(exc)

    saving = threading.Thread(target=save)
    saving.start()
    assert in_file.wait(60), "the writer never wrote its first slice"
    shutil.rmtree(doomed)
    removed.set()
    saving.join(timeout=60)
    assert not saving.is_alive()
    assert not doomed.exists()
    assert len(failure) == 1, "the save succeeded although its directory was removed"
    error = failure[0]
    assert isinstance(error, OSError) and error.errno == errno.ENOENT, repr(error)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_overwrite_refuses_to_delete_what_is_not_a_checkpoint(tmp_path: Path, kind: str) -> None:
    """``overwrite=True`` is for replacing a checkpoint; anything else at the path (a file,
    a directory of someone's data) must survive with a clear error, as it does
    ``commit.remove_checkpoint``."""
    from aiockpt.writers import create_writer

    target = tmp_path / "precious"
    if kind == "file":
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "data.txt").write_text("precious")
    with pytest.raises((FileExistsError, ValueError)):
        commit.write_checkpoint(
            create_writer("dcp"), state_of(1024, 1.0), target, format="dcp", overwrite=True
        )
    precious = target if kind == "file" else target / "data.txt"
    assert precious.read_text() == "precious"
