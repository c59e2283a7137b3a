"""A save sent to the worker before staging ends: the worker writes what is staged while the
rest is copied (issue: pipelined save). Chunks are made small here so that a small state dict
has several; the behaviour is the same at the default size."""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import aiockpt
from aiockpt import Checkpointer
from aiockpt._trainer import staging
from aiockpt._wire.protocol import StagedPayload
from aiockpt._wire.session import WriteCancelled, WriteGate
from tests.writer_fixtures import HeldStaging

WATCHING = "tests.writer_fixtures:StagingWatchWriter"
CHUNK = 64 << 10


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelined saves of a few chunks of ``CHUNK``, whatever this machine's CPUs."""
    monkeypatch.setattr(staging, "PIPELINE_CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(staging, "PIPELINE_FIRST_CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(staging, "PIPELINE_MIN_CPUS", 1)


@pytest.fixture
def any_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "PIPELINE_MIN_CPUS", 1)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[str]:
    entry = str(tmp_path.parent / f"{tmp_path.name}-gate")
    yield entry
    Path(f"{entry}.writing").unlink(missing_ok=True)


def state(value: float) -> dict[str, Any]:
    return {f"w{i}": torch.full((64, 64), value + i) for i in range(32)}  # 16 KiB each


async def test_the_worker_writes_staged_regions_while_the_rest_is_copied(
    tmp_path: Path, small_chunks: None, gate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldStaging(monkeypatch, until_file=f"{gate}.writing")
    async with Checkpointer(tmp_path, format=WATCHING) as ckpt:  # starts the worker
        saved = state(1.0)
        handle = ckpt.save({**saved, "gate": gate}, step=1)
        # Staging stops after its first chunk until the worker has written a staged region:
        # without writing while staging this save would never finish.
        await asyncio.wait_for(handle.staged, 60)
        assert await asyncio.to_thread(os.path.exists, f"{gate}.writing")
        for tensor in saved.values():
            tensor.add_(100.0)  # the trainer's next step: not in the checkpoint
        result = await asyncio.wait_for(handle, 60)
    nbytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert len(held.reports) == nbytes // CHUNK
    assert [complete for _, complete in held.reports] == [False] * (len(held.reports) - 1) + [True]
    assert [n for n, _ in held.reports] == sorted(n for n, _ in held.reports)
    loaded = aiockpt.load(result.path)
    assert loaded.pop("gate") == gate
    assert all(torch.equal(loaded[k], state(1.0)[k]) for k in saved)


async def test_a_safetensors_save_writes_staged_ranges_while_the_rest_is_copied(
    tmp_path: Path, small_chunks: None, gate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    HeldStaging(monkeypatch, until_file=f"{gate}.writing")
    options = {"inner": "safetensors"}
    async with Checkpointer(tmp_path, format=WATCHING, writer_options=options) as ckpt:
        for step in (1, 2):  # the second save reuses the layout's arena ranges
            saved = state(float(step))
            handle = ckpt.save({**saved, "gate": gate}, step=step)
            # Staging stops after its first chunk until the worker has written from it.
            await asyncio.wait_for(handle.staged, 60)
            for tensor in saved.values():
                tensor.add_(100.0)  # the trainer's next step: not in the checkpoint
            result = await asyncio.wait_for(handle, 60)
            await asyncio.to_thread(os.unlink, f"{gate}.writing")
            written = safetensors.torch.load_file(Path(result.path) / "model.safetensors")
            assert written.keys() == saved.keys()
            assert all(torch.equal(written[k], state(float(step))[k]) for k in saved)


async def test_cancel_before_commit_leaves_nothing_and_the_next_save_works(
    tmp_path: Path, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldStaging(monkeypatch)
    async with Checkpointer(tmp_path) as ckpt:  # starts the worker
        handle = ckpt.save(state(1.0), step=1)
        await asyncio.wait_for(held.held.wait(), 60)  # the worker waits for the rest
        assert handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(handle, 60)
        assert handle.done()
        held.release.set()
        immediately = ckpt.save(state(2.0), step=2)
        assert immediately.cancel()  # cancelled before staging even began
        with pytest.raises(asyncio.CancelledError):
            await immediately
        # The worker gave up waiting for the staging; it serves the next save.
        await ckpt.save(state(3.0), step=3)
    assert sorted(os.listdir(tmp_path)) == ["step_0000000003"]
    assert torch.equal(aiockpt.load(tmp_path / "step_0000000003")["w3"], state(3.0)["w3"])


async def test_cancelling_the_awaiting_task_cancels_the_save(
    tmp_path: Path, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    HeldStaging(monkeypatch)  # never released: the save cannot finish by itself
    async with Checkpointer(tmp_path) as ckpt:
        handle = ckpt.save(state(1.0), step=1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle, timeout=0.1)  # cancels the awaiting task
        with pytest.raises(asyncio.CancelledError):
            await handle
    assert os.listdir(tmp_path) == []


def test_plans_stage_in_one_go_below_two_chunks_or_with_offsets_that_do_not_grow(
    any_cpus: None,
) -> None:
    tensors = [torch.zeros(CHUNK // 4) for _ in range(4)]  # a chunk each
    big = staging.PIPELINE_CHUNK_BYTES
    assert staging.pipeline_chunks(tensors, [0, big, 2 * big, 3 * big], 4 * big, False)
    assert staging.pipeline_chunks(tensors[:1], [0], big, False) is None
    assert staging.pipeline_chunks(tensors, [0, big, 2 * big, 3 * big], 4 * big, True) is None
    backwards = [3 * big, 2 * big, big, 0]
    assert staging.pipeline_chunks(tensors, backwards, 4 * big, False) is None


def test_a_process_on_fewer_cpus_than_pipelining_needs_stages_in_one_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On few CPUs the staging copy would take turns with the worker's write: one go."""
    mib = 1 << 20
    tensors = [torch.zeros(mib // 4) for _ in range(100)]
    offsets = [i * mib for i in range(100)]
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(staging, "PIPELINE_MIN_CPUS", cpus + 1)
    assert staging.pipeline_chunks(tensors, offsets, 100 * mib, False) is None
    monkeypatch.setattr(staging, "PIPELINE_MIN_CPUS", cpus)
    assert staging.pipeline_chunks(tensors, offsets, 100 * mib, False) is not None


def test_chunks_start_small_and_double_up_to_the_chunk_size(any_cpus: None) -> None:
    """The worker starts writing after a small first copy; later chunks are big (few reports)."""
    mib = 1 << 20
    tensors = [torch.zeros(mib // 4) for _ in range(100)]  # 1 MiB each
    chunks = staging.pipeline_chunks(tensors, [i * mib for i in range(100)], 100 * mib, False)
    assert chunks is not None
    first_chunk = staging.PIPELINE_FIRST_CHUNK_BYTES // mib
    sizes = [end - first for first, end, _ in chunks]
    assert sizes[:4] == [first_chunk, 2 * first_chunk, 4 * first_chunk, 8 * first_chunk]
    assert max(sizes) == staging.PIPELINE_CHUNK_BYTES // mib
    assert sum(sizes) == 100
    assert [staged for _, _, staged in chunks] == [end * mib for _, end, _ in chunks]


# --- the worker's side, in memory: WriteGate.wait_staged -------------------------------------


def waiting(gate: WriteGate, end: int | None) -> tuple[threading.Thread, list[BaseException]]:
    """A write thread waiting for staged bytes below ``end``; what it raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            gate.wait_staged(7, end, timeout_s=60)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_a_write_waits_until_its_regions_are_staged() -> None:
    gate = WriteGate()
    gate.admit(7, staged_bytes=0)
    thread, raised = waiting(gate, 100)
    gate.staged(StagedPayload(7, 50))
    thread.join(0.05)
    assert thread.is_alive()  # 50 bytes are not enough
    gate.staged(StagedPayload(7, 100))
    thread.join(60)
    assert not thread.is_alive() and raised == []
    everything, raised = waiting(gate, None)
    gate.staged(StagedPayload(7, 100, complete=True))
    everything.join(60)
    assert not everything.is_alive() and raised == []


def test_a_cancel_wakes_a_write_waiting_for_staging() -> None:
    gate = WriteGate()
    gate.admit(7, staged_bytes=0)
    thread, raised = waiting(gate, 100)
    assert gate.cancel(7)
    thread.join(60)
    assert [type(exc) for exc in raised] == [WriteCancelled]


def test_staging_that_stalls_past_the_bound_fails_the_write() -> None:
    gate = WriteGate()
    gate.admit(7, staged_bytes=10)
    assert gate.wait_staged(7, 10, timeout_s=0) == 10  # staged already: no wait
    with pytest.raises(TimeoutError, match="staged 10 bytes of write 7"):
        gate.wait_staged(7, 11, timeout_s=0.01)


def test_a_write_not_sent_while_staging_never_waits() -> None:
    gate = WriteGate()
    gate.admit(7)
    assert gate.wait_staged(7, 1 << 40, timeout_s=0) == math.inf
    gate.staged(StagedPayload(8, 5))  # a write answered already: nothing to do


# --- the trainer's side: one thread copies every chunk ----------------------------------------


def chunked_plan(count: int = 6) -> tuple[staging.StagingPlan, list[torch.Tensor]]:
    tensors = [torch.full((CHUNK // 4,), float(i)) for i in range(count)]  # a chunk each
    plan = staging.plan_staging({f"t{i}": t for i, t in enumerate(tensors)})
    assert plan.chunks is not None and len(plan.chunks) == count
    return plan, tensors


def arena_holds(arena: staging.SharedArena, plan: staging.StagingPlan, upto: int) -> bool:
    assert arena.bytes is not None
    return all(
        torch.equal(arena.destination(source, offset), source)
        for source, offset in zip(plan.sources[:upto], plan.offsets[:upto], strict=True)
    )


async def test_chunks_are_copied_without_waiting_for_the_reports(small_chunks: None) -> None:
    """The copying thread goes on while a report is still running: by the time the first
    report returns every chunk can have landed; each is reported once, in order."""
    plan, _ = chunked_plan()
    assert plan.chunks is not None
    arena = staging.SharedArena(plan.nbytes)
    reports: list[tuple[int, bool]] = []
    copied = threading.Event()
    real_copy_range = arena.copy_range

    def copy_range(plan: staging.StagingPlan, begin: int, end: int) -> None:
        real_copy_range(plan, begin, end)
        if end == len(plan.sources):
            copied.set()

    arena.copy_range = copy_range  # type: ignore[method-assign]

    async def report(nbytes: int, complete: bool) -> None:
        if not reports:  # the first report waits until the thread has copied the last chunk
            assert await asyncio.to_thread(copied.wait, 60)
        reports.append((nbytes, complete))

    try:
        await staging.copy_into_arena_in_chunks(arena, plan, plan.chunks, report)
        assert reports == [(staged, i == 5) for i, (_, _, staged) in enumerate(plan.chunks)]
        assert arena_holds(arena, plan, len(plan.sources))
    finally:
        arena.close()


async def test_a_failed_report_or_copy_stops_the_thread_after_its_chunk(
    small_chunks: None,
) -> None:
    """A report that fails: the copy in progress finishes, no further chunk is copied, the
    report's error is raised. A copy that fails: its error is raised after the chunks
    before it were reported."""
    plan, _ = chunked_plan()
    assert plan.chunks is not None
    arena = staging.SharedArena(plan.nbytes)
    copies: list[int] = []
    real_copy_range = arena.copy_range
    copying_two, go_on = threading.Event(), threading.Event()

    def copy_range(plan: staging.StagingPlan, begin: int, end: int) -> None:
        copies.append(begin)
        if begin == 4:
            raise OSError("copy failed")
        if begin == 2:
            copying_two.set()
            assert go_on.wait(60)  # held until the first report has failed
        real_copy_range(plan, begin, end)

    arena.copy_range = copy_range  # type: ignore[method-assign]

    async def failing_report(nbytes: int, complete: bool) -> None:
        assert await asyncio.to_thread(copying_two.wait, 60)
        # Chunk 2 finishes once the failure has stopped the thread (on the loop's next turn).
        asyncio.get_running_loop().call_soon(go_on.set)
        raise ConnectionError("channel broke")

    reports: list[int] = []

    async def report(nbytes: int, complete: bool) -> None:
        reports.append(nbytes)

    try:
        with pytest.raises(ConnectionError):
            await staging.copy_into_arena_in_chunks(arena, plan, plan.chunks, failing_report)
        assert copies == [0, 1, 2]  # chunk 2 was being copied: finished, then nothing more
        copies.clear()
        with pytest.raises(OSError, match="copy failed"):
            await staging.copy_into_arena_in_chunks(arena, plan, plan.chunks, report)
        assert copies == [0, 1, 2, 3, 4]
        assert reports == [staged for _, _, staged in plan.chunks[:4]]
        assert arena_holds(arena, plan, 4)
    finally:
        arena.close()
