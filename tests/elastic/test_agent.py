"""One agent, in this process, with real worker processes (ported from torchelastic's
multiprocessing/api_test.py, agent/server/test/api_test.py and local_elastic_agent_test.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aiockpt.elastic import (
    LocalElasticAgent,
    LogsSpecs,
    RunResult,
    SignalException,
    StaticRendezvous,
    Std,
    WorkerSpec,
    WorkerState,
)
from aiockpt.elastic.failures import NO_ERROR_FILE_MESSAGE, NOT_AVAILABLE
from tests.elastic import workers

SCRIPT = str(Path(__file__).with_name("worker_script.py"))
RUN_ID = "test-run"


def run_dir(log_dir: Path) -> Path:
    """The one run directory the agent made under ``log_dir``: ``<run_id>_<unique>``."""
    [found] = log_dir.glob(f"{RUN_ID}_*")
    return found


async def run_agent(
    entrypoint: Any,
    *args: Any,
    nproc: int = 1,
    max_restarts: int = 0,
    logs_specs: LogsSpecs | None = None,
    **agent_kwargs: Any,
) -> RunResult:
    spec = WorkerSpec(
        role="trainer",
        local_world_size=nproc,
        entrypoint=entrypoint,
        args=args,
        max_restarts=max_restarts,
        rdzv_handler=StaticRendezvous(run_id=RUN_ID, timeout=30),
    )
    agent = LocalElasticAgent(spec, logs_specs, shutdown_timeout=10, **agent_kwargs)
    return await agent.run()


async def test_success_with_return_values() -> None:
    result = await run_agent(workers.echo, {"payload": [1, 2]}, nproc=2)
    assert result.state == WorkerState.SUCCEEDED
    assert not result.is_failed()
    assert result.return_values == {0: (0, {"payload": [1, 2]}), 1: (1, {"payload": [1, 2]})}
    assert result.failures == {}


async def test_env_vars_and_local_rank_macro(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    result = await run_agent(
        workers.env_and_args, "--local-rank=${local_rank}", 7, nproc=2, max_restarts=2
    )
    assert result.state == WorkerState.SUCCEEDED
    for rank in (0, 1):
        env = result.return_values[rank]
        assert env["args"] == (f"--local-rank={rank}", 7)
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == "0"
        assert env["GROUP_WORLD_SIZE"] == "1"
        assert env["ROLE_NAME"] == "trainer"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert int(env["MASTER_PORT"]) > 0
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "2"
        assert env["TORCHELASTIC_RUN_ID"] == RUN_ID
        assert env["TORCHELASTIC_ERROR_FILE"].endswith(f"attempt_0/{rank}/error.json")
        assert env["OMP_NUM_THREADS"] == "3"
        assert env["CUDA_VISIBLE_DEVICES"] == "5,6"


async def test_function_raises_records_error_file(tmp_path: Path) -> None:
    result = await run_agent(
        workers.raise_value_error, "worker broke", logs_specs=LogsSpecs(log_dir=tmp_path)
    )
    assert result.state == WorkerState.FAILED
    failure = result.failures[0]
    assert failure.exitcode == 1
    assert failure.message == "ValueError: worker broke"
    assert failure.traceback is not None and "raise_value_error" in failure.traceback
    error_file = run_dir(tmp_path) / "attempt_0" / "0" / "error.json"
    assert failure.error_file == str(error_file)
    recorded = json.loads(error_file.read_text())
    assert recorded["message"]["message"] == failure.message


async def test_function_sys_exit_138() -> None:
    result = await run_agent(workers.exit_with, 138)
    assert result.is_failed()
    failure = result.failures[0]
    assert failure.exitcode == 138
    assert failure.error_file == NOT_AVAILABLE
    assert failure.message == NO_ERROR_FILE_MESSAGE


async def test_binary_exit_138_stops_running_sibling(tmp_path: Path) -> None:
    # the sibling, running when rank 0 exits, stopped with SIGTERM, is not a failure (see
    # test_faults for siblings that ignore SIGTERM)
    argv = (SCRIPT, "exit-rank", "0", "138", str(tmp_path))
    result = await run_agent(sys.executable, "-u", *argv, nproc=2)
    assert result.state == WorkerState.FAILED
    assert list(result.failures) == [0], "only the root cause"
    root = result.failures[0]
    assert root.exitcode == 138
    assert root.signal_name() == NOT_AVAILABLE


async def test_binary_record_writes_error_file() -> None:
    result = await run_agent(sys.executable, SCRIPT, "record-raise", "from a binary")
    assert result.failures[0].exitcode == 1
    assert result.failures[0].message == "ValueError: from a binary"


async def test_segfault_is_sigsegv() -> None:
    result = await run_agent(workers.segfault)
    failure = result.failures[0]
    assert failure.exitcode == -signal.SIGSEGV
    assert failure.signal_name() == "SIGSEGV"


async def test_missing_binary_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await run_agent(str(tmp_path / "no-such-binary"))


@pytest.mark.parametrize(
    ("redirects", "tee", "console_out", "console_err", "files"),
    [
        (Std.NONE, Std.NONE, True, True, set()),
        (Std.ALL, Std.NONE, False, False, {"stdout.log", "stderr.log"}),
        (Std.OUT, Std.ERR, False, True, {"stdout.log", "stderr.log"}),
        (Std.NONE, Std.ALL, True, True, {"stdout.log", "stderr.log"}),
    ],
)
async def test_redirects_and_tee(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    redirects: Std,
    tee: Std,
    console_out: bool,
    console_err: bool,
    files: set[str],
) -> None:
    specs = LogsSpecs(log_dir=tmp_path, redirects=redirects, tee=tee)
    result = await run_agent(workers.print_lines, 2, nproc=2, logs_specs=specs)
    assert result.state == WorkerState.SUCCEEDED
    out, err = capfd.readouterr()
    for rank in (0, 1):
        rank_dir = run_dir(tmp_path) / "attempt_0" / str(rank)
        assert {p.name for p in rank_dir.iterdir()} == files
        if "stdout.log" in files:
            expected = f"out 0 of rank {rank}\nout 1 of rank {rank}\n"
            assert (rank_dir / "stdout.log").read_text() == expected
        if "stderr.log" in files:
            assert f"err 1 of rank {rank}\n" in (rank_dir / "stderr.log").read_text()
        teed = f"[trainer{rank}]:" if tee else ""
        assert (f"{teed}out 1 of rank {rank}\n" in out) == console_out
        assert (f"{teed}err 1 of rank {rank}\n" in err) == console_err


async def test_prefix_template_and_local_ranks_filter(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    specs = LogsSpecs(log_dir=tmp_path, tee=Std.OUT, local_ranks_filter={1})
    result = await run_agent(
        workers.print_lines,
        1,
        nproc=3,
        logs_specs=specs,
        log_line_prefix_template="<${role_name}|${rank}|${local_rank}> ",
    )
    assert result.state == WorkerState.SUCCEEDED
    out, err = capfd.readouterr()
    assert "<trainer|1|1> out 0 of rank 1\n" in out
    assert "rank 0" not in out + err and "rank 2" not in out + err, "filtered ranks stay quiet"
    for rank in (0, 1, 2):  # the files are complete whatever the filter
        stdout_log = run_dir(tmp_path) / "attempt_0" / str(rank) / "stdout.log"
        assert stdout_log.read_text() == f"out 0 of rank {rank}\n"


async def test_restart_until_success(tmp_path: Path) -> None:
    result = await run_agent(
        workers.fail_on_first_attempt,
        1,
        nproc=2,
        max_restarts=2,
        logs_specs=LogsSpecs(log_dir=tmp_path),
    )
    assert result.state == WorkerState.SUCCEEDED
    assert result.return_values == {0: 1, 1: 1}, "both ranks ran again with restart count 1"
    logs = run_dir(tmp_path)
    assert sorted(os.listdir(logs)) == ["attempt_0", "attempt_1"]
    first_error = json.loads((logs / "attempt_0" / "1" / "error.json").read_text())
    assert "fails on attempt 0" in first_error["message"]["message"]


async def test_restarts_exhausted_fails(tmp_path: Path) -> None:
    result = await run_agent(
        workers.always_fail, nproc=1, max_restarts=2, logs_specs=LogsSpecs(log_dir=tmp_path)
    )
    assert result.state == WorkerState.FAILED
    assert result.failures[0].message == "RuntimeError: rank 0 always fails"
    assert sorted(os.listdir(run_dir(tmp_path))) == ["attempt_0", "attempt_1", "attempt_2"]
    assert result.return_values == {}


async def wait_for_pid_files(directory: Path, count: int) -> list[int]:
    deadline = asyncio.get_running_loop().time() + 30
    files = [directory / f"{rank}.pid" for rank in range(count)]
    while not all(f.exists() for f in files):
        assert asyncio.get_running_loop().time() < deadline, "workers did not start"
        await asyncio.sleep(0.05)
    return [int(f.read_text()) for f in files]


def assert_reaped(pids: list[int]) -> None:
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} is still there"


async def test_cancelling_run_stops_workers(tmp_path: Path) -> None:
    run = asyncio.create_task(run_agent(workers.write_pid_then_sleep, str(tmp_path), nproc=2))
    pids = await wait_for_pid_files(tmp_path, 2)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert_reaped(pids)


async def test_sigterm_to_agent_process_raises_signal_exception(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    run = asyncio.create_task(run_agent(workers.write_pid_then_sleep, str(tmp_path), nproc=2))
    pids = await wait_for_pid_files(tmp_path, 2)
    os.kill(os.getpid(), signal.SIGTERM)  # handled by the agent's loop handler, not fatal
    with pytest.raises(SignalException) as raised:
        await run
    assert raised.value.sigval == signal.SIGTERM
    assert_reaped(pids)
    assert signal.getsignal(signal.SIGTERM) == before, "the previous handler is back"


#: a fresh interpreter (torch not imported yet) runs an agent in-process with the garbage
#: collector off and prints how many TCP sockets it still has open afterwards
_NO_GC_RUN = """
import asyncio, gc, os, sys
from tests.elastic import workers
from tests.elastic.test_agent import run_agent

def tcp_sockets():
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    inet = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{table}") as f:
            inet |= {int(line.split()[9]) for line in f.readlines()[1:]}
    return len(inodes & inet)

async def main():
    result = await run_agent(workers.echo, {"p": 1}, nproc=2)
    assert not result.is_failed(), result
    print(tcp_sockets(), flush=True)

gc.disable()
asyncio.run(main())
print(tcp_sockets(), flush=True)
"""


def test_an_agent_run_in_process_releases_its_stores_without_the_garbage_collector() -> None:
    """The rendezvous store and the attempt's store close when ``run()`` ends, not when a
    collection finds them (a first import of torch keeps frames alive: once, the frames that
    held the stores)."""
    done = subprocess.run(
        [sys.executable, "-c", _NO_GC_RUN],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0", "0"], done.stdout
