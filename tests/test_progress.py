"""Visible saves: progress a caller follows (bytes staged and written, reported by the worker
while it writes), an INFO line per committed save, the worker logging at the trainer's level,
and a clear error under trio."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path

import pytest
import torch

import aiockpt
from aiockpt import Checkpointer, SaveProgress
from aiockpt._format.tree import DictNode
from aiockpt._wire.protocol import (
    CommitOptions,
    ProgressPayload,
    RequestType,
    StateDictPayload,
    WorkerResponse,
    WritePayload,
)
from aiockpt.errors import ProtocolError
from tests.test_session import Pair

HALF_GATED = "tests.writer_fixtures:HalfGatedWriter"
MIB = 1 << 20


# --- the rules, in memory ------------------------------------------------------------------------


def write_request(pair: Pair, progress_bytes: int | None) -> int:
    payload = WritePayload(
        "/x", StateDictPayload(DictNode([], []), []), commit=CommitOptions("dcp"),
        progress_bytes=progress_bytes,
    )  # fmt: skip
    [received] = pair.send(pair.parent.request(RequestType.WRITE_CHECKPOINT, payload))
    return received.request.request_id


def report(pair: Pair, request_id: int, count: int) -> list[WorkerResponse | None]:
    from tests.test_session import codec

    frame = codec.encode(pair.worker.progress(request_id, count))
    return [pair.parent.receive(body) for body in pair._to_parent.feed(frame)]


def test_progress_reports_precede_the_one_answer_and_never_go_back() -> None:
    pair = Pair()
    pair.ready()
    write = write_request(pair, progress_bytes=MIB)
    [first] = report(pair, write, 2 * MIB)
    assert first is not None and first.payload == ProgressPayload(2 * MIB)
    assert write in pair.parent.outstanding  # a report does not answer
    [same] = report(pair, write, 2 * MIB)
    assert same is not None
    with pytest.raises(ProtocolError, match="reported already"):
        pair.worker.progress(write, MIB)
    [answer] = pair.answer(WorkerResponse(write, RequestType.WRITE_CHECKPOINT, True))
    assert answer is not None and write not in pair.parent.outstanding
    with pytest.raises(ProtocolError, match="not a write awaiting its answer"):
        pair.worker.progress(write, 3 * MIB)  # answered: no more reports


def test_only_writes_that_asked_get_reports() -> None:
    pair = Pair()
    pair.ready()
    quiet = write_request(pair, progress_bytes=None)
    with pytest.raises(ProtocolError, match="asked for reports"):
        pair.worker.progress(quiet, 1)
    # A worker that sends one anyway breaks the channel's rules.
    rogue = WorkerResponse(quiet, RequestType.WRITE_CHECKPOINT, True, payload=ProgressPayload(1))
    from tests.test_session import codec

    with pytest.raises(ProtocolError, match="asked for reports"):
        pair.parent.receive(codec.encode(rogue)[4:])


def test_a_report_going_back_breaks_the_channel() -> None:
    from tests.test_session import codec

    pair = Pair()
    pair.ready()
    write = write_request(pair, progress_bytes=1)
    report(pair, write, 10)
    backwards = WorkerResponse(
        write, RequestType.WRITE_CHECKPOINT, True, payload=ProgressPayload(5)
    )
    with pytest.raises(ProtocolError, match="went back"):
        pair.parent.receive(codec.encode(backwards)[4:])


def test_reports_of_an_abandoned_write_are_dropped() -> None:
    pair = Pair()
    pair.ready()
    write = write_request(pair, progress_bytes=1)
    pair.parent.abandon(write)
    assert report(pair, write, 10) == [None]


# --- a real worker -------------------------------------------------------------------------------


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


async def test_progress_follows_a_save_while_the_worker_writes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first, second = torch.ones(2 * MIB), torch.zeros(2 * MIB)  # 8 MiB each
    state = {"a": first, "b": second, "gate": str(gate)}
    nbytes = first.nbytes + second.nbytes
    async with Checkpointer(tmp_path / "root", format=HALF_GATED) as ckpt:
        handle = ckpt.save(state, step=1)
        seen: list[SaveProgress] = []
        halfway = asyncio.Event()

        async def follow() -> None:
            async for progress in handle.progress():
                seen.append(progress)
                if progress.bytes_written >= first.nbytes:
                    halfway.set()

        async with asyncio.TaskGroup() as tasks:
            following = tasks.create_task(follow())
            try:
                await asyncio.to_thread(wait_for, Path(f"{gate}.half"))
                # The worker reports the first file while it waits to write the second.
                async with asyncio.timeout(60):
                    await halfway.wait()
                now = handle.current_progress
                assert now.phase == "writing" and now.bytes_staged == nbytes
                assert first.nbytes <= now.bytes_written < nbytes
                assert not handle.done()
            finally:
                await asyncio.to_thread(Path(f"{gate}.go").touch)
            result = await handle
        assert following.done()
    assert seen[0] == SaveProgress(result.path, "staging", nbytes)
    assert [p.phase for p in seen][-1] == "committed"
    assert seen[-1].bytes_written == result.nbytes  # every byte of every file, manifest too
    assert all(a.bytes_written <= b.bytes_written for a, b in itertools.pairwise(seen))
    # A late follower gets the last state and ends.
    assert [p async for p in handle.progress()] == [seen[-1]]


async def test_a_failed_save_ends_its_progress_as_failed(tmp_path: Path) -> None:
    async with Checkpointer(tmp_path, format="tests.writer_fixtures:FailingWriter") as ckpt:
        handle = ckpt.save({"w": torch.ones(4)}, step=1)
        with pytest.raises(aiockpt.CheckpointWriteError):
            await handle
    phases = [p.phase async for p in handle.progress()]
    assert phases == ["failed"]


async def test_one_info_line_per_committed_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="aiockpt"):
        async with Checkpointer(tmp_path) as ckpt:
            result = await ckpt.save({"w": torch.ones(256, 256)}, step=1)
    lines = [r for r in caplog.records if r.getMessage().startswith("committed ")]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    message = lines[0].getMessage()
    assert result.path in message and f"{result.nbytes} bytes" in message
    for part in ("staging ", "write ", "GB/s", "total "):
        assert part in message


@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])
async def test_the_worker_logs_at_the_trainers_aiockpt_level(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], level: int
) -> None:
    aiockpt_logger = logging.getLogger("aiockpt")
    before = aiockpt_logger.level
    aiockpt_logger.setLevel(level)
    try:
        async with Checkpointer(tmp_path) as ckpt:
            result = await ckpt.save({"w": torch.ones(4)}, step=1)
    finally:
        aiockpt_logger.setLevel(before)
    worker_lines = [
        line for line in capfd.readouterr().err.splitlines() if line.startswith("[aiockpt worker")
    ]
    wrote = [line for line in worker_lines if f"wrote {result.path}" in line]
    assert len(wrote) == (1 if level == logging.DEBUG else 0), worker_lines


def test_async_save_under_trio_says_asyncio_is_needed(tmp_path: Path) -> None:
    import trio

    async def main() -> list[str]:
        messages = []
        with pytest.raises(RuntimeError) as caught:
            aiockpt.async_save({"w": torch.ones(1)}, tmp_path / "x")
        messages.append(str(caught.value))
        ckpt = Checkpointer(tmp_path)
        with pytest.raises(RuntimeError) as caught:
            await ckpt.start()
        messages.append(str(caught.value))
        with pytest.raises(RuntimeError) as caught:
            ckpt.save({"w": torch.ones(1)}, step=1)
        messages.append(str(caught.value))
        return messages

    for message in trio.run(main):
        assert "under trio" in message and "asyncio" in message
        assert "no running event loop" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_sync_save_is_followed_from_synchronous_code(tmp_path: Path) -> None:
    state = {"a": torch.ones(2 * MIB), "b": torch.zeros(2 * MIB)}
    nbytes = 2 * state["a"].nbytes
    with aiockpt.SyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(state, step=1)
        seen = list(handle.progress())
        result = handle.result(timeout=120)
        assert handle.current_progress == seen[-1]
        failing = ckpt.save(state, step=1)  # exists: fails before it is staged
        assert [p.phase for p in failing.progress()][-1] == "failed"
        with pytest.raises(FileExistsError):
            failing.result(timeout=120)
    assert seen[0].phase == "staging" and seen[0].nbytes == nbytes
    assert seen[-1].phase == "committed" and seen[-1].bytes_written == result.nbytes
    assert all(a.bytes_written <= b.bytes_written for a, b in itertools.pairwise(seen))
