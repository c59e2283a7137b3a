"""CheckpointProcess against a real worker subprocess: torch's CheckpointProcess tests and more."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from aiockpt import (
    CheckpointWriteError,
    ProtocolVersionMismatch,
    WorkerClosed,
    WorkerCrashed,
    WorkerStartError,
    WorkerStartTimeout,
)
from aiockpt._trainer.checkpoint_process import (
    CheckpointProcess,
    CheckpointProcessConfig,
    describe_exit,
)
from aiockpt._trainer.staging import plan_staging
from aiockpt._wire.channel import Channel
from aiockpt._wire.protocol import (
    PROTOCOL_VERSION,
    GcOptions,
    InitPayload,
    RankInfo,
    RequestType,
    WorkerRequest,
    WritePayload,
)
from aiockpt._wire.tensors import as_bytes
from tests import workers
from tests.workers import RawWriter, read_raw
from tests.writer_fixtures import WriteGateFiles

REPO = Path(__file__).resolve().parents[1]


def make_process(**overrides: object) -> CheckpointProcess:
    kwargs: dict[str, object] = {
        "rank_info": RankInfo(0, 1),
        "config": CheckpointProcessConfig(subprocess_shutdown_timeout_secs=10),
        "checkpoint_writer_init_fn": RawWriter,
        "checkpoint_writer_init_args": {},
    }
    kwargs.update(overrides)
    return CheckpointProcess(**kwargs)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_init_functions_run_in_the_worker(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with make_process(
        rank_info=RankInfo(3, 8),
        subprocess_init_fn=workers.init_writes_marker,
        subprocess_init_args=(str(marker), "hello"),
        checkpoint_writer_init_args={"delay": 0.0},
    ) as proc:
        assert marker.read_text() == f"hello pid={proc.pid}"
        result = await proc.write({"x": torch.ones(2)}, tmp_path / "ck")
        assert read_raw(str(tmp_path / "ck"))["rank"] == 3  # rank_info reached the writer
        assert result.result["pid"] == proc.pid


async def test_init_function_raising_fails_start_with_the_worker_traceback() -> None:
    proc = make_process(
        subprocess_init_fn="tests.workers:init_raises", subprocess_init_args=["nope"]
    )
    with pytest.raises(WorkerStartError) as info:
        await proc.start()
    assert info.value.error_type == "RuntimeError"
    assert "init_raises" in (info.value.traceback or "")
    assert "nope" in str(info.value)
    await proc.close()


async def test_init_timeout_kills_the_worker() -> None:
    proc = make_process(
        config=CheckpointProcessConfig(subprocess_init_timeout_secs=0.5),
        subprocess_init_fn=workers.init_hangs,
        subprocess_init_args=[60],
    )
    with pytest.raises(WorkerStartTimeout, match=r"within 0\.5 s") as info:
        await proc.start()
    assert isinstance(info.value, TimeoutError)
    assert proc.pid is not None and not alive(proc.pid)
    await proc.close()


async def test_write_round_trips_every_dtype_and_plain_values(tmp_path: Path) -> None:
    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "c64": torch.randn(2, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "meta": {"step": 10, "name": "run", "lr": 0.1, "ok": True, "none": None, "raw": b"\x00"},
    }
    async with make_process() as proc:
        await proc.write(state, tmp_path / "ck", tag="v1")
    back = read_raw(str(tmp_path / "ck"))
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert back[key].dtype == value.dtype and back[key].shape == value.shape
            assert torch.equal(as_bytes(back[key]), as_bytes(value.contiguous()))
    assert back["meta.step"] == 10 and back["meta.raw"] == "00" and back["meta.none"] is None
    assert back["kwargs"] == {"tag": "v1"}


async def test_writer_raising_is_reported_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    async with make_process(checkpoint_writer_init_args={"fail_on": "bad"}) as proc:
        with pytest.raises(CheckpointWriteError) as info:
            await proc.write({"x": torch.ones(1)}, tmp_path / "bad")
        assert info.value.error_type == "OSError"
        assert "injected failure" in (info.value.traceback or "")
        assert "Worker traceback" in str(info.value)
        await proc.write({"x": torch.ones(1)}, tmp_path / "good")
        assert torch.equal(read_raw(str(tmp_path / "good"))["x"], torch.ones(1))


async def test_sigkill_during_a_write_fails_it_with_worker_crashed(
    tmp_path: Path, gate: WriteGateFiles
) -> None:
    async with make_process(checkpoint_writer_init_args={"gate": gate.entry}) as proc:
        write = proc.write({"x": torch.ones(1)}, tmp_path / "ck")
        await gate.started()  # held in the writer, never let go
        assert proc.pid is not None
        killed_at = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed, match="killed by SIGKILL") as info:
            await write
        detection = time.perf_counter() - killed_at
        assert info.value.returncode == -signal.SIGKILL
        print(f"crash detected after {detection * 1000:.1f} ms")
        # Later requests fail the same way instead of hanging.
        with pytest.raises(WorkerCrashed):
            await proc.ping()
        with pytest.raises(WorkerCrashed):
            proc.write({"x": torch.ones(1)}, tmp_path / "again")


async def test_close_is_graceful_and_idempotent() -> None:
    proc = make_process()
    await proc.start()
    pid = proc.pid
    assert pid is not None
    await asyncio.gather(proc.close(), proc.close())
    await proc.close()
    assert proc._process is not None and proc._process.returncode == 0
    assert not alive(pid)
    with pytest.raises(WorkerClosed):
        await proc.ping()


async def test_close_waits_for_in_flight_writes(tmp_path: Path) -> None:
    proc = make_process(checkpoint_writer_init_args={"delay": 0.3})
    write = proc.write({"x": torch.ones(1)}, tmp_path / "ck")
    await proc.close()
    assert (await write).write_seconds >= 0.3
    assert torch.equal(read_raw(str(tmp_path / "ck"))["x"], torch.ones(1))


async def test_close_escalates_when_the_worker_ignores_terminate(
    tmp_path: Path, gate: WriteGateFiles
) -> None:
    proc = make_process(
        config=CheckpointProcessConfig(
            subprocess_shutdown_timeout_secs=0.5, sigterm_grace_secs=0.5
        ),
        subprocess_init_fn=workers.init_ignores_sigterm,
        checkpoint_writer_init_args={"gate": gate.entry},
    )
    await proc.start()
    write = proc.write({"x": torch.ones(1)}, tmp_path / "ck")
    await gate.started()
    await proc.close()  # TERMINATE queues behind the held write; SIGTERM is ignored; SIGKILL
    assert proc._process is not None and proc._process.returncode == -signal.SIGKILL
    with pytest.raises(WorkerClosed):
        await write


async def test_no_worker_survives_an_exception_in_the_caller() -> None:
    pid = None
    with pytest.raises(ZeroDivisionError):
        async with make_process() as proc:
            pid = proc.pid
            1 / 0  # noqa: B018
    assert pid is not None and not alive(pid)


def run_script(body: str, *args: str) -> subprocess.Popen[str]:
    code = "import asyncio, os, sys, time, torch\n" + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def wait_gone(pid: int, timeout: float = 10) -> float:
    started = time.monotonic()
    while alive(pid):
        assert time.monotonic() - started < timeout, f"worker {pid} still running"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("runner", ["asyncio.run", "uvloop.run"])
def test_no_worker_survives_the_loop_ending_without_close(runner: str) -> None:
    script = run_script(
        f"""
        import uvloop
        from aiockpt._trainer.checkpoint_process import CheckpointProcess
        async def main():
            proc = CheckpointProcess(checkpoint_writer_init_fn="tests.workers:RawWriter")
            await proc.start()
            print(proc.pid, flush=True)
        {runner}(main())
        print("loop ended", flush=True)
        time.sleep(30)
        """
    )
    try:
        assert script.stdout is not None
        pid = int(script.stdout.readline())
        assert script.stdout.readline().strip() == "loop ended"
        wait_gone(pid)  # gone while the interpreter still runs: the loop's end reaped it
    finally:
        script.kill()
        script.wait()


def test_worker_exits_when_its_parent_is_killed() -> None:
    script = run_script(
        """
        from aiockpt._trainer.checkpoint_process import CheckpointProcess
        async def main():
            proc = CheckpointProcess(checkpoint_writer_init_fn="tests.workers:RawWriter")
            await proc.start()
            print(proc.pid, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    assert script.stdout is not None
    pid = int(script.stdout.readline())
    script.kill()
    script.wait()
    # The worker is reparented once its parent dies; EOF on the channel makes it exit.
    gone_after = wait_gone(pid)
    print(f"worker exited {gone_after * 1000:.0f} ms after its parent was killed")


async def test_thousand_pings() -> None:
    async with make_process() as proc:
        round_trips = [await proc.ping() for _ in range(1000)]
    assert len(round_trips) == 1000 and all(rtt > 0 for rtt in round_trips)


async def test_concurrent_pings_are_matched_by_request_id() -> None:
    async with make_process() as proc:
        round_trips = await asyncio.gather(*(proc.ping() for _ in range(200)))
    assert len(round_trips) == 200


async def test_ping_is_answered_during_a_write(tmp_path: Path, gate: WriteGateFiles) -> None:
    async with make_process(checkpoint_writer_init_args={"gate": gate.entry}) as proc:
        write = proc.write({"x": torch.ones(1)}, tmp_path / "ck")
        await gate.started()
        await proc.ping()
        assert not write.done()  # the ping came back while the write was held
        await gate.open()
        await write


async def test_state_dict_may_be_an_awaitable(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    staged: asyncio.Future[dict[str, torch.Tensor]] = loop.create_future()
    async with make_process() as proc:
        write = proc.write(staged, tmp_path / "ck")
        await asyncio.sleep(0.05)
        assert not write.done()
        staged.set_result({"x": torch.full((2,), 7.0)})
        await write
    assert torch.equal(read_raw(str(tmp_path / "ck"))["x"], torch.full((2,), 7.0))


async def test_first_write_starts_the_worker_and_start_is_idempotent(tmp_path: Path) -> None:
    proc = make_process()
    try:
        await asyncio.gather(proc.start(), proc.start())
        pid = proc.pid
        await proc.start()
        await proc.write({"x": torch.ones(1)}, tmp_path / "ck")
        assert proc.pid == pid
    finally:
        await proc.close()
    lazy = make_process()
    try:
        await lazy.write({"x": torch.ones(1)}, tmp_path / "lazy")
        assert lazy.alive
    finally:
        await lazy.close()


async def test_gc_controls_reach_the_worker(tmp_path: Path) -> None:
    config = CheckpointProcessConfig(
        gc=GcOptions(
            disable_automatic=True, collect_after_write=True, freeze_after_first_write=True
        )
    )
    async with make_process(
        config=config, checkpoint_writer_init_fn=workers.GcReportingWriter
    ) as p:
        first = (await p.write({}, tmp_path / "a")).result
        second = (await p.write({}, tmp_path / "b")).result
    assert first["enabled"] is False and second["enabled"] is False
    assert second["frozen"] >= first["frozen"] > 0


async def test_the_worker_takes_its_startup_heap_out_of_full_collections(tmp_path: Path) -> None:
    """torch's modules are frozen once the worker has started: a write's own objects no
    longer set off passes over them (0.14 s per 20,000-tensor request before)."""
    async with make_process(checkpoint_writer_init_fn=workers.GcReportingWriter) as p:
        seen = (await p.write({"x": torch.ones(1)}, tmp_path / "a")).result
    assert seen["frozen"] > 10 * seen["tracked"], seen


def local_function() -> None:
    pass


class NotEncodable:
    pass


def test_unimportable_functions_and_unencodable_arguments_are_type_errors() -> None:
    def nested() -> None:
        pass

    with pytest.raises(TypeError, match="lambda"):
        CheckpointProcess(subprocess_init_fn=lambda: None)
    with pytest.raises(TypeError, match="nested"):
        CheckpointProcess(subprocess_init_fn=nested)
    with pytest.raises(TypeError, match=r"subprocess_init_args\[1\] = .*NotEncodable"):
        CheckpointProcess(
            subprocess_init_fn=local_function, subprocess_init_args=(1, NotEncodable())
        )
    with pytest.raises(TypeError, match=r"checkpoint_writer_init_args\['opts'\]\['f'\]"):
        CheckpointProcess(checkpoint_writer_init_args={"opts": {"f": NotEncodable()}})
    with pytest.raises(ValueError, match="not an import reference"):
        CheckpointProcess(checkpoint_writer_init_fn="no_colon")


async def test_unencodable_state_dict_entry_is_a_type_error_naming_the_key(tmp_path: Path) -> None:
    proc = make_process()
    with pytest.raises(TypeError, match=r"'model\.obj'"):
        proc.write({"model": {"obj": NotEncodable()}}, tmp_path / "ck")
    with pytest.raises(TypeError, match=r"write\(\) keyword arguments"):
        proc.write({}, tmp_path / "ck", opt=NotEncodable())
    await proc.close()
    assert proc.pid is None  # nothing was spawned for requests refused up front


async def spawn_bare_worker(*args: str) -> tuple[asyncio.subprocess.Process, Channel]:
    """A worker with no CheckpointProcess in front: the test speaks the protocol itself."""
    parent_end, child_end = socket.socketpair()
    with child_end:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiockpt._worker",
            "--fd",
            str(child_end.fileno()),
            *args,
            pass_fds=(child_end.fileno(),),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    return worker, await Channel.open(parent_end)


async def test_protocol_version_mismatch_is_a_clear_error() -> None:
    """A real worker, handed an INIT from a future protocol version, refuses it."""
    worker, channel = await spawn_bare_worker()
    init = InitPayload(
        PROTOCOL_VERSION + 1, RankInfo(), [], None, [], "tests.workers:RawWriter", {}
    )
    await channel.send(WorkerRequest(0, RequestType.INIT, init))
    body = await anext(channel.frames())
    response = channel.codec.decode_response(body)
    assert not response.success
    assert response.error_type == "aiockpt.errors.ProtocolVersionMismatch"
    assert f"version {PROTOCOL_VERSION + 1}" in (response.error_msg or "")
    assert await worker.wait() == 2
    await channel.aclose()
    assert ProtocolVersionMismatch.__name__ in response.error_type


async def test_garbage_on_the_channel_ends_the_worker_not_the_parent() -> None:
    worker, channel = await spawn_bare_worker("--max-frame-size", "1024")
    channel._writer.write(b"\xff\xff\xff\xff" + b"junk")
    assert await asyncio.wait_for(worker.wait(), 10) == 2
    await channel.aclose()


def test_describe_exit() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-200) == "was killed by signal 200"


# --- large writes, exits the parent caused, and bounded waits ---------------------------------


def test_write_of_1_gib_stages_through_shared_memory_not_frames(tmp_path: Path) -> None:
    """1 GiB is sixteen times the maximum frame size: the bytes must go through an arena.
    Written once (not on both loops): it takes seconds and gigabytes."""
    numel = 64 << 20  # 256 MiB of int32 per tensor: every element tells where it belongs
    state = {f"t{i}": torch.arange(i * numel, (i + 1) * numel, dtype=torch.int32) for i in range(4)}
    target = tmp_path / "big"

    async def write() -> None:
        async with make_process() as proc:
            await proc.write(state, target)

    asyncio.run(write())
    with open(target / "index.json") as f:
        index = json.load(f)
    for key, tensor in state.items():
        data = bytearray((target / index[key]["file"]).read_bytes())
        assert torch.equal(torch.frombuffer(data, dtype=torch.int32), tensor), key
        del data


async def test_a_worker_whose_channel_the_parent_closed_is_closed_not_crashed() -> None:
    async with make_process() as proc:
        assert proc._channel is not None and proc._process is not None
        await proc._channel.aclose()  # what a parent tearing down its side does
        assert await asyncio.wait_for(proc._process.wait(), 10) == 0  # EOF: a clean exit
        with pytest.raises(WorkerClosed):
            await proc.ping()
        assert not proc.alive


async def start_stoppable_write(proc: CheckpointProcess, path: Path) -> asyncio.Task[object]:
    """Start a 60 s write and return once the worker has read its request (a PING sent after
    it is answered), so that stopping the worker stops it mid-write."""
    sent = asyncio.Event()
    payload = WritePayload(str(path), plan_staging({"step": 1}).payload(None), {"delay": 60})
    write = asyncio.create_task(proc.write_payload(payload, on_sent=sent.set))
    await sent.wait()
    await proc.ping()
    return write


async def test_cancelling_a_write_of_a_stopped_worker_returns_within_the_bound(
    tmp_path: Path,
) -> None:
    """A worker that answers nothing (SIGSTOP) cannot hold the cancellation: past
    subprocess_shutdown_timeout_secs it is killed and the write is cancelled."""
    bound = 3.0
    proc = make_process(config=CheckpointProcessConfig(subprocess_shutdown_timeout_secs=bound))
    await proc.start()
    pid = proc.pid
    assert pid is not None
    try:
        write = await start_stoppable_write(proc, tmp_path / "ck")
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        write.cancel()
        done, _ = await asyncio.wait({write}, timeout=bound + 10)
        elapsed = time.monotonic() - started
        assert write in done, "the cancelled write still waits for the stopped worker"
        assert write.cancelled() and bound <= elapsed < bound + 5, elapsed
        assert await asyncio.wait_for(proc._process.wait(), 10) == -signal.SIGKILL  # type: ignore[union-attr]
        with pytest.raises(WorkerCrashed, match="did not answer"):
            await proc.ping()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        await proc.close()


async def test_close_of_a_stopped_worker_is_bounded_and_names_the_pending_writes(
    tmp_path: Path,
) -> None:
    """close(): TERMINATE within the shutdown timeout, then SIGTERM (held while stopped),
    then SIGKILL after the grace; the write still pending fails naming its path."""
    config = CheckpointProcessConfig(subprocess_shutdown_timeout_secs=1, sigterm_grace_secs=1)
    proc = make_process(config=config)
    await proc.start()
    pid = proc.pid
    assert pid is not None
    try:
        write = await start_stoppable_write(proc, tmp_path / "ck")
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        closing = asyncio.create_task(proc.close())
        done, _ = await asyncio.wait({closing}, timeout=10)
        assert closing in done, "close() still waits for the stopped worker"
        assert time.monotonic() - started < 1 + 1 + 3
        assert proc._process is not None and proc._process.returncode == -signal.SIGKILL
        with pytest.raises(WorkerClosed, match=str(tmp_path / "ck")):
            await write
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        await proc.close()
