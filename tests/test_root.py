"""One root, one writer: a second process on the same root (a restarted trainer, an eval job)
neither deletes the first one's saves nor is allowed to write beside it; readers take no lock
and delete nothing; retention deletes only the step checkpoints ``save`` made."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import aiockpt
from aiockpt import Checkpointer, RootLocked
from aiockpt._format.commit import TEMP_PREFIX
from aiockpt._format.root_lock import LOCK_NAME
from tests.leaks import descendants
from tests.writer_fixtures import GATED, wait_for

ROOT = Path(__file__).resolve().parents[1]


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), value)}


def other_process(code: str, root: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (an async ``main(root)``) in a second Python process."""
    script = "import asyncio, sys\nimport aiockpt, torch\n" + textwrap.dedent(code)
    script += "\nasyncio.run(main(sys.argv[1]))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script, str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_second_writer_and_reader_in_other_processes_leave_a_save_in_flight_alone(
    tmp_path: Path,
) -> None:
    gate = tmp_path.parent / f"{tmp_path.name}-gate"
    async with Checkpointer(tmp_path, keep_last=1, format=GATED) as ckpt:
        await ckpt.save(state(1.0), step=1)
        handle = ckpt.save({**state(2.0), "gate": str(gate)}, step=2)
        await asyncio.to_thread(wait_for, Path(f"{gate}.started"))
        (temp,) = await asyncio.to_thread(lambda: list(tmp_path.glob(f"{TEMP_PREFIX}*")))
        try:
            writer = await asyncio.to_thread(
                other_process,
                """
                async def main(root):
                    try:
                        async with aiockpt.Checkpointer(root):
                            print("STARTED")
                    except aiockpt.RootLocked as exc:
                        print("LOCKED", exc.pid, exc.host)
                """,
                tmp_path,
            )
            reader = await asyncio.to_thread(
                other_process,
                """
                async def main(root):
                    async with aiockpt.Checkpointer(root, read_only=True) as ckpt:
                        latest = await ckpt.latest()
                        print("LATEST", latest.rsplit("/", 1)[-1])
                        print("VALUE", float((await ckpt.load_latest())["w"][0, 0]))
                        try:
                            ckpt.save({"w": torch.ones(1)}, step=9)
                        except io.UnsupportedOperation:
                            print("REFUSED")
                import io
                """,
                tmp_path,
            )
            # Neither of them deleted the save in progress.
            assert await asyncio.to_thread(os.path.isdir, temp)
        finally:
            await asyncio.to_thread(Path(f"{gate}.go").touch)
        result = await handle
    for signal_file in (f"{gate}.go", f"{gate}.started"):
        os.unlink(signal_file)
    assert writer.stdout.split() == ["LOCKED", str(os.getpid()), socket.gethostname()], (
        writer.stderr
    )
    assert reader.stdout.split() == [
        "LATEST",
        "step_0000000001",
        "VALUE",
        "1.0",
        "REFUSED",
    ], reader.stderr
    assert torch.equal(aiockpt.load(result.path)["w"], state(2.0)["w"])
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == ["step_0000000002"]
    assert descendants() == set()


async def test_the_lock_goes_with_its_holder(tmp_path: Path) -> None:
    first = Checkpointer(tmp_path)
    await first.start()
    with pytest.raises(RootLocked) as locked:
        await Checkpointer(tmp_path).start()  # even in the same process
    assert (locked.value.pid, locked.value.path) == (os.getpid(), str(tmp_path))
    await first.close()
    async with Checkpointer(tmp_path) as second:
        await second.save(state(1.0), step=1)

    # A holder that dies (SIGKILL: nothing of it runs again) releases it too.
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
        str(tmp_path / LOCK_NAME),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"held\n"
        with pytest.raises(RootLocked):
            await Checkpointer(tmp_path).start()
    finally:
        holder.kill()
        await holder.wait()
    async with Checkpointer(tmp_path) as third:
        await third.save(state(2.0), step=2)


async def test_read_only_checkpointer_starts_nothing(tmp_path: Path) -> None:
    async with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.worker_pid is None and await ckpt.latest() is None
        with pytest.raises(io.UnsupportedOperation):
            ckpt.save_to(state(1.0), tmp_path / "x")
    assert os.listdir(tmp_path) == []  # not even a lock file


async def test_retention_counts_only_the_step_checkpoints_under_the_root(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    async with Checkpointer(root, keep_last=2) as ckpt:
        await ckpt.save_to(state(0.0), root / "best")
        for step in (9, 10):
            await ckpt.save(state(step), step=step)
        await ckpt.save_to(state(-1.0), elsewhere)  # not under the root: deletes nothing
        assert sorted(os.listdir(root)) == [LOCK_NAME, "best", "step_0000000009", "step_0000000010"]
        await ckpt.save(state(11), step=11)
        await ckpt.save_to(state(0.5), root / "zzz-user", overwrite=True)
    assert sorted(p for p in os.listdir(root) if not p.startswith(".")) == [
        "best",
        "step_0000000010",
        "step_0000000011",
        "zzz-user",
    ]
    assert torch.equal(aiockpt.load(root / "best")["w"], state(0.0)["w"])
