"""A Checkpointer's life as users live it: close finishes what was issued, every shutdown is
bounded even with a worker that stops answering, default checkpointers are released with
their loop, bad roots and unpicklable objects are refused up front."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvloop

import aiockpt
from aiockpt import (
    Checkpointer,
    CheckpointProcessConfig,
    SyncCheckpointer,
    WorkerClosed,
)
from aiockpt._trainer.handles import _default_checkpointers
from aiockpt._trainer.staging import ARENA_NAME
from tests.faults.test_disk_faults import (
    permission_bits_enforced,
    remount,
    tmpfs,
    tmpfs_problem,
)
from tests.leaks import descendants

BOUNDED = CheckpointProcessConfig(subprocess_shutdown_timeout_secs=3, sigterm_grace_secs=1)


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((256, 256), value)}


@contextlib.contextmanager
def stopped(pid: int | None) -> Iterator[None]:
    """The worker stops answering anything (a hung disk, as far as the trainer can tell)."""
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_close_finishes_every_save_issued_before_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, max_in_flight=1)
    handles = [ckpt.save(state(step), step=step) for step in (1, 2, 3)]
    await ckpt.close()
    for step, handle in zip((1, 2, 3), handles, strict=True):
        assert (await handle).step == step
        assert torch.equal(aiockpt.load(handle.path)["w"], state(step)["w"])
    with pytest.raises(WorkerClosed):
        ckpt.save(state(4), step=4)
    assert descendants() == set()


async def test_leaving_async_with_right_after_a_save_keeps_the_final_checkpoint(
    tmp_path: Path,
) -> None:
    async with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(state(step), step=step)
    assert await Checkpointer(tmp_path).latest() == str(tmp_path / "step_0000000002")


def test_sync_checkpointer_close_finishes_issued_saves(tmp_path: Path) -> None:
    with SyncCheckpointer(tmp_path) as ckpt:
        handles = [ckpt.save(state(step), step=step) for step in (1, 2, 3)]
    assert [h.result(timeout=0).step for h in handles] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == [f"step_{s:010d}" for s in (1, 2, 3)]


async def test_close_with_a_worker_that_stopped_answering_is_bounded(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, config=BOUNDED)
    await ckpt.start(like=state(0))
    with stopped(ckpt.worker_pid):
        handle = ckpt.save(state(1), step=1)
        await handle.staged
        # Bounded: ping unanswered (3 s), graceful exit refused (3 s), SIGTERM (1 s), SIGKILL.
        async with asyncio.timeout(60):
            await ckpt.close()
    with pytest.raises(WorkerClosed, match="step_0000000001"):
        await handle
    assert descendants() == set()
    assert not (tmp_path / "step_0000000001").exists()


async def test_wait_on_a_handle_under_a_deadline_leaves_the_save_running(tmp_path: Path) -> None:
    async with Checkpointer(tmp_path) as ckpt:
        await ckpt.start(like=state(0))
        with stopped(ckpt.worker_pid):
            handle = ckpt.save(state(1), step=1)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):  # the stopped worker cannot have answered
                    await handle.wait()
            assert not handle.done()
        assert (await handle).step == 1


@pytest.mark.parametrize("runner", ["asyncio", "uvloop"])
def test_async_save_per_asyncio_run_releases_worker_fds_and_arenas(
    tmp_path: Path, runner: str
) -> None:
    """Sync trainers often call into async code once per checkpoint."""

    async def save(step: int) -> None:
        await aiockpt.async_save(state(step), tmp_path / f"ck{step}")

    run = asyncio.run if runner == "asyncio" else uvloop.run

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def arena_mappings() -> list[str]:
        with open("/proc/self/maps") as maps:
            return [line for line in maps if ARENA_NAME in line]

    run(save(1))
    fds = open_fds()
    for step in (2, 3, 4):
        run(save(step))
    assert open_fds() == fds
    assert arena_mappings() == []
    assert descendants() == set()
    assert len(_default_checkpointers) == 0 or all(
        not checkpointers for checkpointers in _default_checkpointers.values()
    )


async def test_a_root_where_nothing_can_be_created_fails_at_start(tmp_path: Path) -> None:
    if tmpfs_problem() is None:
        with tmpfs(tmp_path / "ro", "1m") as root:
            remount(root, "ro")
            try:
                with pytest.raises(OSError, match=f"cannot create checkpoints under {root}"):
                    await Checkpointer(root).start()
            finally:
                remount(root, "rw")
    elif permission_bits_enforced():
        root = tmp_path / "locked"
        root.mkdir(mode=0o500)
        try:
            with pytest.raises(PermissionError, match=f"cannot create checkpoints under {root}"):
                await Checkpointer(root).start()
        finally:
            root.chmod(0o700)
    else:  # pragma: no cover - depends on the machine
        pytest.skip("no way to make a read-only directory here")
    # A root under a regular file cannot be created either, whoever runs the test.
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot create checkpoints under"):
        await Checkpointer(tmp_path / "file" / "root").start()
    assert descendants() == set()


class DefinedInMain:
    pass


async def test_pickling_an_object_of_main_is_refused_in_the_caller(tmp_path: Path) -> None:
    DefinedInMain.__module__ = "__main__"  # as for a class defined in the training script
    try:
        with pytest.raises(TypeError, match=r"'extra.0'.*__main__"):
            aiockpt.async_save(
                {"w": torch.ones(2), "extra": [DefinedInMain()]},
                tmp_path / "ck",
                allow_pickle=True,
            )
    finally:
        DefinedInMain.__module__ = __name__
    assert not (tmp_path / "ck").exists()
