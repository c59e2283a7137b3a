"""async_save, SaveHandle and Checkpointer end to end: real worker, real files, torch's loader."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
import uvloop

import aiockpt
from aiockpt import (
    Checkpointer,
    CheckpointWriteError,
    CorruptCheckpoint,
    SaveResult,
    SyncCheckpointer,
    WorkerCrashed,
)
from aiockpt._format.commit import TEMP_PREFIX
from aiockpt._format.root_lock import LOCK_NAME
from aiockpt._trainer.staging import SharedArena
from tests.leaks import descendants
from tests.writer_fixtures import GATED, WriteGateFiles, wait_for


def every_kind_of_state() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(3, 3)
    return {
        "model": {
            "f32": torch.randn(5, 7),
            "f64": torch.randn(3, dtype=torch.float64),
            "f16": torch.randn(8).half(),
            "bf16": torch.randn(8).bfloat16(),
            "e4m3": torch.randn(8).to(torch.float8_e4m3fn),
            "e5m2": torch.randn(8).to(torch.float8_e5m2),
            "i8": torch.randint(-100, 100, (6,), dtype=torch.int8),
            "i16": torch.randint(-1000, 1000, (6,), dtype=torch.int16),
            "i32": torch.randint(-(2**30), 2**30, (6,), dtype=torch.int32),
            "i64": torch.randint(-(2**60), 2**60, (6,), dtype=torch.int64),
            "u8": torch.randint(0, 255, (6,), dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "c64": torch.randn(4, dtype=torch.complex64),
            "c128": torch.randn(4, dtype=torch.complex128),
            "scalar": torch.tensor(3.25),
            "empty": torch.empty(0, 4),
            "transposed": base.t(),
            "row_view": base[1],
            "column_view": base[:, 2],
            "tied_a": tied,
            "tied_b": tied,
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(5, 7)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": None}],
        },
        "step": 12,
        "tag": "run-a",
        "blob": b"\x00\x01",
        "flags": [True, False],
    }


def assert_same(a: Any, b: Any) -> None:
    """Bit-exact equality of trees (tensors compared byte for byte)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == (
            b.contiguous().reshape(-1).view(torch.uint8).tolist()
        )
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def zeros_like_tree(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree.contiguous())
    if isinstance(tree, dict):
        return {k: zeros_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [zeros_like_tree(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(zeros_like_tree(v) for v in tree)
    return tree


def shm_arenas() -> list[str]:
    """Entries of /dev/shm named after this process (arenas once were; none may appear)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"aiockpt-{os.getpid()}-")]


async def test_dcp_checkpoint_loads_bit_exact_with_torchs_own_loader(tmp_path: Path) -> None:
    state = every_kind_of_state()
    path = tmp_path / "ck"
    result = await aiockpt.async_save(state, path)
    assert isinstance(result, SaveResult) and result.path == str(path)
    assert result.nbytes > 0 and 0 < result.staging_seconds <= result.total_seconds
    target = zeros_like_tree(state)
    dcp.load(target, checkpoint_id=str(path), no_dist=True)
    assert_same(target, {**state, "model": {k: v.contiguous() for k, v in state["model"].items()}})
    assert_same(aiockpt.load(path), state)


async def test_safetensors_checkpoint_loads_with_safetensors(tmp_path: Path) -> None:
    state = every_kind_of_state()
    path = tmp_path / "weights"
    await aiockpt.async_save(state, path, format="safetensors")
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert files
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(safetensors.torch.load_file(str(path / name)))
    assert_same(tensors["model.f32"], state["model"]["f32"])
    assert_same(tensors["model.transposed"], state["model"]["transposed"].contiguous())
    assert_same(tensors["optimizer.state.0.exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert_same(aiockpt.load(path), state)


async def test_mutating_right_after_staged_does_not_change_what_is_saved(tmp_path: Path) -> None:
    weights = {f"w{i}": torch.randn(256, 256) for i in range(8)}
    at_call_time = {k: v.clone() for k, v in weights.items()}
    handle = aiockpt.async_save({"model": weights}, tmp_path / "ck")
    await handle.staged
    for tensor in weights.values():
        tensor.add_(1.0)  # the optimizer step the trainer takes as soon as staging is over
    await handle
    assert_same(aiockpt.load(tmp_path / "ck")["model"], at_call_time)


async def test_cancel_after_commit_returns_false_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    handle = aiockpt.async_save({"w": torch.ones(4)}, tmp_path / "ck")
    await handle
    assert not handle.cancel()
    assert_same(aiockpt.load(tmp_path / "ck"), {"w": torch.ones(4)})


async def test_backpressure_holds_staging_while_max_in_flight_saves_are_written(
    tmp_path: Path, gate: WriteGateFiles
) -> None:
    async with Checkpointer(tmp_path, format=GATED, max_in_flight=1) as ckpt:
        first = ckpt.save({"w": torch.ones(4), "gate": gate.entry}, step=1)
        await first.staged
        await gate.started()  # the first save is being written, and held there
        second = ckpt.save({"w": torch.ones(4)}, step=2)
        # Given every chance to stage (any number of loop turns), it waits for the slot.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(second.staged, timeout=0.2)
        assert not first.done() and not second.done()
        await gate.open()
        await first
        await second.staged
        await second
    assert len(os.listdir(tmp_path)) == 2


async def test_a_worker_killed_between_commit_and_answer_still_leaves_keep_last(
    tmp_path: Path,
) -> None:
    """The save fails (the trainer never hears back), but its checkpoint was published:
    retention must still run, or the root holds more than ``keep_last``."""
    async with Checkpointer(tmp_path, format="tests.workers:RawWriter", keep_last=2) as ckpt:
        for step in (1, 2):
            await ckpt.save({"w": torch.full((3,), float(step))}, step=step)
    async with Checkpointer(
        tmp_path, format="tests.workers:DiesAfterCommitWriter", keep_last=2
    ) as ckpt:
        with pytest.raises(WorkerCrashed):
            await ckpt.save({"w": torch.full((3,), 3.0)}, step=3)
        assert sorted(e for e in os.listdir(tmp_path) if e != LOCK_NAME) == [
            "step_0000000002",
            "step_0000000003",  # published before the kill: kept, as the newest
        ]


async def test_checkpointer_names_latest_retention_and_load_latest(tmp_path: Path) -> None:
    async with Checkpointer(tmp_path, keep_last=2) as ckpt:
        assert ckpt.worker_pid is not None  # started ahead of the first save
        assert await ckpt.latest() is None
        assert await ckpt.load_latest() is None
        for step in (1, 2, 10):
            await ckpt.save({"w": torch.full((3,), float(step)), "step": step}, step=step)
        # A directory with a higher name but no manifest (a crashed save) is never "latest".
        (tmp_path / "step_9999999999").mkdir()
        latest = await ckpt.latest()
        assert latest == str(tmp_path / "step_0000000010")
        assert sorted(os.listdir(tmp_path)) == [
            LOCK_NAME,  # held while the Checkpointer writes here
            "step_0000000002",
            "step_0000000010",
            "step_9999999999",
        ]
        loaded = await ckpt.load_latest()
        assert loaded["step"] == 10 and torch.equal(loaded["w"], torch.full((3,), 10.0))
        into = {"w": torch.zeros(3), "step": 0}
        assert await ckpt.load_latest(into) is into and into["step"] == 10
        handles = [ckpt.save({"w": torch.ones(1)}, step=s) for s in (20, 21)]
        results = await ckpt.wait()
        assert {r.step for r in results} == {20, 21} and all(h.done() for h in handles)


async def test_start_removes_what_crashed_saves_left(tmp_path: Path) -> None:
    stale = tmp_path / f"{TEMP_PREFIX}step_0000000005-abcdef"
    stale.mkdir()
    (stale / "half-written.distcp").write_bytes(b"\x00" * 10)
    async with Checkpointer(tmp_path):
        assert not stale.exists()


async def test_existing_path_is_refused_before_staging(tmp_path: Path) -> None:
    await aiockpt.async_save({"w": torch.ones(1)}, tmp_path / "ck")
    handle = aiockpt.async_save({"w": torch.zeros(1)}, tmp_path / "ck")
    with pytest.raises(FileExistsError):
        await handle.staged
    with pytest.raises(FileExistsError):
        await handle
    await aiockpt.async_save({"w": torch.zeros(1)}, tmp_path / "ck", overwrite=True)
    assert torch.equal(aiockpt.load(tmp_path / "ck")["w"], torch.zeros(1))


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value


async def test_unsupported_objects_name_their_key_unless_pickling_is_allowed(
    tmp_path: Path,
) -> None:
    with pytest.raises(TypeError, match=r"'extra\.obj'.*allow_pickle"):
        aiockpt.async_save({"extra": {"obj": Opaque(1)}}, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    await aiockpt.async_save({"extra": {"obj": Opaque(2)}}, tmp_path / "b", allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        aiockpt.load(tmp_path / "b")
    assert aiockpt.load(tmp_path / "b", allow_pickle=True) == {"extra": {"obj": Opaque(2)}}


async def test_flipped_byte_is_a_corrupt_checkpoint_naming_the_file(tmp_path: Path) -> None:
    await aiockpt.async_save({"w": torch.randn(1000)}, tmp_path / "ck")
    data = next(p for p in (tmp_path / "ck").iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match=data.name):
        aiockpt.load(tmp_path / "ck")


async def test_writer_failure_fails_the_save_and_the_next_one_succeeds(tmp_path: Path) -> None:
    async with Checkpointer(tmp_path) as ckpt:
        failing = ckpt.save_to(
            {"w": torch.ones(2)}, tmp_path / "x", format="tests.workers:FailingWriter"
        )
        with pytest.raises(CheckpointWriteError, match="No space left") as caught:
            await failing
        # The error says which save, which worker and what its writer raised, as attributes.
        assert caught.value.path == str(tmp_path / "x")
        assert caught.value.pid == ckpt.worker_pid is not None
        assert caught.value.error_type == "OSError"
        await ckpt.save({"w": torch.ones(2)}, step=1)
    assert sorted(os.listdir(tmp_path)) == ["step_0000000001"]


async def test_worker_killed_mid_write_fails_the_save_and_the_next_respawns(
    tmp_path: Path,
) -> None:
    gate = WriteGateFiles(tmp_path)
    async with Checkpointer(tmp_path, format=GATED) as ckpt:
        first_pid = ckpt.worker_pid
        assert first_pid is not None
        handle = ckpt.save({"w": torch.ones(4), "gate": gate.entry}, step=1)
        await gate.started()  # held inside the write, until killed
        os.kill(first_pid, signal.SIGKILL)
        gate.remove()
        with pytest.raises(WorkerCrashed, match="SIGKILL") as caught:
            await handle
        assert caught.value.pid == first_pid
        assert caught.value.returncode == -signal.SIGKILL
        assert not (tmp_path / "step_0000000001").exists()
        await ckpt.save({"w": torch.ones(4)}, step=2)
        assert ckpt.worker_pid not in (None, first_pid)
    # The crashed save's temporary directory is swept by the next start.
    async with Checkpointer(tmp_path):
        pass
    assert sorted(os.listdir(tmp_path)) == ["step_0000000002"]


async def test_arena_is_reused_and_leaves_no_name_in_dev_shm(tmp_path: Path) -> None:
    async with Checkpointer(tmp_path, keep_last=1) as ckpt:
        for step in range(3):
            await ckpt.save({"w": torch.randn(64, 64)}, step=step)
            assert shm_arenas() == []  # arenas are anonymous memory: never a name
        assert len(ckpt._free_arenas) == 1
        arena = ckpt._free_arenas[0]
        await ckpt.save({"w": torch.randn(64, 64)}, step=9)
        assert ckpt._free_arenas == [arena]  # same layout, same arena


def test_arenas_are_owner_only() -> None:
    arena = SharedArena(4096)
    try:
        assert stat.S_IMODE(os.stat(arena.path).st_mode) == 0o600
    finally:
        arena.close()
    assert not os.path.exists(arena.path)


def test_default_checkpointer_across_loops_and_runners(tmp_path: Path) -> None:
    async def save(name: str) -> int | None:
        await aiockpt.async_save({"w": torch.ones(2)}, tmp_path / name)
        from aiockpt._trainer.handles import default_checkpointer

        return default_checkpointer().worker_pid

    pids = [
        asyncio.run(save("a")),
        asyncio.run(save("b")),
        uvloop.run(save("c")),
        anyio.run(save, "d", backend="asyncio"),
    ]
    assert len(set(pids)) == 4  # one worker per loop
    assert descendants() == set()  # each stopped with its loop
    for name in "abcd":
        assert torch.equal(aiockpt.load(tmp_path / name)["w"], torch.ones(2))


async def test_unknown_format_is_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'nope'"):
        aiockpt.async_save({"w": torch.ones(1)}, tmp_path / "ck", format="nope")
    with pytest.raises(ValueError, match="no_such_module"):
        Checkpointer(tmp_path, format="no_such_module:Writer")
    assert os.listdir(tmp_path) == []


def test_async_save_outside_a_loop_says_what_to_use_instead(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="SyncCheckpointer"):
        aiockpt.async_save({"w": torch.ones(1)}, tmp_path / "ck")


def test_sync_checkpointer(tmp_path: Path) -> None:
    weights = torch.randn(128, 128)
    original = weights.clone()
    with SyncCheckpointer(tmp_path, keep_last=1) as ckpt:
        ckpt.start(like={"w": weights})
        assert len(ckpt._checkpointer._free_arenas) == 1  # arena ready before the first save
        handle = ckpt.save({"w": weights}, step=1)
        handle.staged.result(timeout=60)
        weights.mul_(0)  # the trainer moves on
        result = handle.result(timeout=60)
        assert result.path == str(tmp_path / "step_0000000001") and handle.done()
        assert ckpt.latest() == result.path
        assert torch.equal(ckpt.load_latest()["w"], original)
        second = ckpt.save({"w": weights}, step=2)
        assert ckpt.wait()[0].step == 2 and second.done()
        # done() means result() is ready; callbacks get the handle.
        finished: list[int | None] = []
        for step in range(3, 13):
            handle = ckpt.save({"w": weights}, step=step)
            handle.add_done_callback(lambda h: finished.append(h.step))
            while not handle.done():
                time.sleep(0.001)
            assert handle.result(timeout=0).step == step
        deadline = time.monotonic() + 10  # the last callback may run just after done()
        while len(finished) < 10 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert finished == list(range(3, 13))
    assert os.listdir(tmp_path) == ["step_0000000012"]
    assert descendants() == set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_tensors_stage_through_a_pinned_arena(tmp_path: Path) -> None:
    weights = torch.randn(1024, 1024, device="cuda")
    expected = weights.cpu()
    handle = aiockpt.async_save({"w": weights, "cpu": torch.ones(3)}, tmp_path / "ck")
    await handle.staged
    weights.add_(1)
    await handle
    loaded = aiockpt.load(tmp_path / "ck")
    assert torch.equal(loaded["w"], expected) and torch.equal(loaded["cpu"], torch.ones(3))


def test_trainer_killed_mid_save_leaves_no_worker_and_no_shared_memory(
    tmp_path: Path, gate: WriteGateFiles
) -> None:
    """SIGKILL the trainer while its save is being written: the worker exits (EOF), no arena
    name is left in /dev/shm, and the next Checkpointer.start() removes the temporary dir."""
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    code = f"""
import asyncio, torch, aiockpt
async def main():
    async with aiockpt.Checkpointer({str(tmp_path)!r}, format={GATED!r}) as ckpt:
        handle = ckpt.save({{"w": torch.randn(256, 256), "gate": {gate.entry!r}}}, step=1)
        await handle.staged
        print(ckpt.worker_pid, flush=True)
        await handle
asyncio.run(main())
"""
    trainer = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert trainer.stdout is not None
    worker_pid = int(trainer.stdout.readline())
    wait_for(f"{gate.entry}.started")  # held inside the write: never committed
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker_pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{worker_pid}")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"aiockpt-{trainer.pid}-")]
    assert any(n.startswith(TEMP_PREFIX) for n in os.listdir(tmp_path))

    async def restart() -> None:
        async with Checkpointer(tmp_path):
            pass

    asyncio.run(restart())
    assert os.listdir(tmp_path) == []


async def test_start_like_creates_the_arena_before_the_first_save(tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 64), "step": 1}
    async with Checkpointer(tmp_path) as ckpt:
        await ckpt.start(like=state)
        (arena,) = ckpt._free_arenas
        assert shm_arenas() == []  # mapped by the worker, and nameless
        await ckpt.save(state, step=1)
        assert ckpt._free_arenas == [arena]  # the first save used it
