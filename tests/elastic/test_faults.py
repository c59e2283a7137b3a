"""Fault injection with real processes: workers that ignore SIGTERM, an agent killed with
SIGKILL, and many restarts in a row without the agent's resources growing.

Nothing is mocked. Workers are ``fault_script.py`` (a standard-library binary that starts in
milliseconds) or ``fault_workers`` functions. Bounds are correctness bounds, generous for a
loaded machine, never performance thresholds.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from tests.elastic import fault_workers
from tests.leaks import temp_entries

SCRIPT = str(Path(__file__).with_name("fault_script.py"))
#: the binary worker: a bare interpreter on the fault script
WORKER = (sys.executable, "-I", "-S", SCRIPT)
LAUNCH = (sys.executable, "-m", "aiockpt.run")
#: the script uses no torch: the spares that start its workers import nothing ahead (by
#: default each imports torch, seconds of CPU); for the runs that never restart, and the
#: crash loop, which restarts as fast as it can
NO_SPARE_IMPORTS = "--prestart-imports="
#: the agents' grace period between SIGTERM and SIGKILL in these tests
SHUTDOWN_S = 0.5
#: how long a SIGKILLed worker may take to be gone (the kill itself is immediate)
GONE_S = 2.0
#: a hang guard, not a performance bound
HANG_S = 60.0
#: restarts in the growth test; AIOCKPT_LONG=1 runs the function variant this long too
RESTARTS = 50
SHORT_RESTARTS = 20
LONG = os.environ.get("AIOCKPT_LONG") == "1"


def make_agent(
    nproc: int,
    entrypoint: Any,
    *args: Any,
    max_restarts: int = 0,
    logs_specs: LogsSpecs | None = None,
    shutdown_timeout: float = SHUTDOWN_S,
) -> LocalElasticAgent:
    spec = WorkerSpec(
        role="trainer",
        local_world_size=nproc,
        entrypoint=entrypoint,
        args=args,
        max_restarts=max_restarts,
        rdzv_handler=StaticRendezvous(run_id="faults", timeout=30),
    )
    return LocalElasticAgent(spec, logs_specs, shutdown_timeout=shutdown_timeout)


async def wait_for_files(paths: list[Path]) -> None:
    deadline = time.monotonic() + HANG_S
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, (
            f"never appeared: {[p for p in paths if not p.exists()]}"
        )
        await asyncio.sleep(0.01)


def read_pids(directory: Path, names: list[str]) -> list[int]:
    return [int((directory / name).read_text()) for name in names]


def gone(pid: int) -> bool:
    """Whether ``pid`` is dead: no such process, or a zombie (dead, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def mentioning(arg: str) -> list[int]:
    """Live processes with ``arg`` (a test's unique directory) in their argv: every worker of
    that test, whether or not it got as far as announcing its pid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if arg in argv and not gone(int(entry)):
            found.append(int(entry))
    return found


def wait_until(predicate: Callable[[], bool], bound_s: float) -> bool:
    deadline = time.monotonic() + bound_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_reaped(pids: list[int]) -> None:
    """Not even a zombie: the agent itself waited for these workers."""
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} is still there"


def sigkill_warnings(caplog: pytest.LogCaptureFixture) -> set[int]:
    """The pids the agent logged as escalated to SIGKILL after ignoring SIGTERM."""
    prefix = "worker pid "
    return {
        int(r.getMessage()[len(prefix) :].split()[0])
        for r in caplog.records
        if r.getMessage().startswith(prefix) and "sending SIGKILL" in r.getMessage()
    }


# -- a worker that ignores SIGTERM -------------------------------------------------------------


@pytest.mark.parametrize("shutdown_timeout", [SHUTDOWN_S, 0.0], ids=["grace", "no-grace"])
async def test_failure_escalates_to_sigkill_for_siblings_ignoring_sigterm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, shutdown_timeout: float
) -> None:
    # rank 0 exits 3 once ranks 1 and 2 ignore SIGTERM; the agent stops them: TERM, deadline,
    # KILL. A zero deadline kills at once, and the killed workers must still be waited for.
    agent = make_agent(3, *WORKER, "stubborn", str(tmp_path), 0, shutdown_timeout=shutdown_timeout)
    start = time.monotonic()
    result = await agent.run()
    elapsed = time.monotonic() - start
    pids = read_pids(tmp_path, ["1.pid", "2.pid"])
    assert result.state == WorkerState.FAILED
    assert list(result.failures) == [0], "the siblings the agent killed are no failures"
    assert result.failures[0].exitcode == 3
    assert [agent.worker_group.workers[rank].id for rank in (1, 2)] == pids
    assert_reaped(pids)
    assert sigkill_warnings(caplog) == set(pids)
    assert not [r for r in caplog.records if "survived SIGKILL" in r.getMessage()]
    # the configured deadline, once for both stubborn workers, not the 30 s default
    assert shutdown_timeout <= elapsed < shutdown_timeout + 20


async def test_siblings_stopped_after_a_crash_are_not_failures(tmp_path: Path) -> None:
    # ranks 0 and 2 announce themselves and sleep; rank 1 exits 3 only once they have, so
    # both are surely running when it fails, and the agent's SIGTERM is what ends them
    agent = make_agent(3, *WORKER, "crash", str(tmp_path), 1)
    result = await agent.run()
    siblings = read_pids(tmp_path, ["0.pid", "2.pid"])
    assert result.state == WorkerState.FAILED
    assert list(result.failures) == [1], "the root cause is the one failure"
    assert result.failures[1].exitcode == 3
    assert [agent.worker_group.workers[rank].id for rank in (0, 2)] == siblings
    assert_reaped(siblings)


async def test_cancelled_run_kills_workers_ignoring_sigterm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = asyncio.create_task(make_agent(2, *WORKER, "stubborn", str(tmp_path), -1).run())
    await wait_for_files([tmp_path / "0.pid", tmp_path / "1.pid"])
    pids = read_pids(tmp_path, ["0.pid", "1.pid"])
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert_reaped(pids)
    assert sigkill_warnings(caplog) == set(pids)


async def open_loop_devnull() -> None:
    """Close a transport once. uvloop then opens a /dev/null fd that it keeps until the loop
    closes (one per loop, not per transport): open before counting this process's fds."""
    ours, theirs = socket.socketpair()
    with theirs:
        _, writer = await asyncio.open_unix_connection(sock=ours)
        writer.close()
        await writer.wait_closed()


async def test_cancelling_again_during_shutdown_still_kills_and_reaps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio.run's final cancellation, a TaskGroup and a timeout can each cancel the run while
    # it is already stopping its workers: the stop must still finish (SIGKILL, reap, close)
    await open_loop_devnull()
    fds_before = len(os.listdir("/proc/self/fd"))
    run = asyncio.create_task(make_agent(2, *WORKER, "stubborn", str(tmp_path), -1).run())
    await wait_for_files([tmp_path / "0.pid", tmp_path / "1.pid"])
    pids = read_pids(tmp_path, ["0.pid", "1.pid"])
    run.cancel()
    for _ in range(3):
        await asyncio.sleep(SHUTDOWN_S / 4)  # within the grace period
        run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert_reaped(pids)
    assert sigkill_warnings(caplog) == set(pids)
    assert len(os.listdir("/proc/self/fd")) == fds_before, "pipes or files of workers left open"


async def test_stubborn_grandchild_is_killed_with_its_process_group(tmp_path: Path) -> None:
    # the worker dies of SIGTERM at once; the child it started ignores SIGTERM and is no longer
    # the agent's to wait for; the group-wide SIGKILL that ends every stop must still reach it
    run = asyncio.create_task(make_agent(1, *WORKER, "stubborn-child", str(tmp_path)).run())
    await wait_for_files([tmp_path / "0.pid"])
    worker, child = read_pids(tmp_path, ["0.pid", "0.child.pid"])
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert_reaped([worker])
    # reparented to init when the worker died: init reaps it, so poll
    deadline = time.monotonic() + GONE_S
    while not gone(child):
        assert time.monotonic() < deadline, f"the worker's child {child} survived"
        await asyncio.sleep(0.01)


# -- the same through aiockpt-run ----------------------------------------------------------------


@contextmanager
def launched(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield agent
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(HANG_S)
        if agent.stderr:
            agent.stderr.close()


def wait_for_files_sync(agent: subprocess.Popen[str], paths: list[Path]) -> None:
    deadline = time.monotonic() + HANG_S
    while not all(p.exists() for p in paths):
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else "agent exited"
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)


def test_cli_sigterm_kills_stubborn_workers_after_shutdown_timeout(tmp_path: Path) -> None:
    argv = [*LAUNCH, NO_SPARE_IMPORTS, "--nproc-per-node=2", f"--shutdown-timeout={SHUTDOWN_S}",
            SCRIPT, "stubborn", str(tmp_path), "-1"]  # fmt: skip
    with launched(argv) as agent:
        wait_for_files_sync(agent, [tmp_path / "0.pid", tmp_path / "1.pid"])
        pids = read_pids(tmp_path, ["0.pid", "1.pid"])
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(HANG_S) == 128 + signal.SIGTERM
        assert_reaped(pids)
        stderr = agent.stderr.read() if agent.stderr else ""
    for pid in pids:
        assert f"worker pid {pid} ignored SIGTERM for {SHUTDOWN_S}s; sending SIGKILL" in stderr


def test_cli_failure_report_shows_stubborn_sibling_killed(tmp_path: Path) -> None:
    argv = [*LAUNCH, NO_SPARE_IMPORTS, "--standalone", "--nproc-per-node=2",
            f"--shutdown-timeout={SHUTDOWN_S}", SCRIPT, "stubborn", str(tmp_path), "0"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=HANG_S, check=False)
    assert done.returncode == 1
    [stubborn] = read_pids(tmp_path, ["1.pid"])
    assert_reaped([stubborn])
    others, root_cause = done.stderr.split("Root Cause (first observed failure):")
    assert "exitcode  : 3" in root_cause
    assert "<NO_OTHER_FAILURES>" in others, "the sibling the agent killed is no failure"
    assert f"worker pid {stubborn} ignored SIGTERM" in done.stderr, "but its kill is logged"


# -- the agent SIGKILLed -----------------------------------------------------------------------


def test_sigkilled_agent_leaves_no_worker_and_no_files(tmp_path: Path) -> None:
    # no --log-dir: the agent's temporary log directory must go too, though the agent cannot
    # remove it itself; the workers ignore SIGTERM, which the parent-death SIGKILL overrides
    temp_before = temp_entries()
    argv = [*LAUNCH, NO_SPARE_IMPORTS, "--nproc-per-node=3", SCRIPT, "stubborn", str(tmp_path),
            "-1"]  # fmt: skip
    with launched(argv) as agent:
        wait_for_files_sync(agent, [tmp_path / f"{rank}.pid" for rank in range(3)])
        pids = read_pids(tmp_path, [f"{rank}.pid" for rank in range(3)])
        [log_dir] = temp_entries() - temp_before  # the agent's temporary log directory
        janitor_arg = os.path.join(tempfile.gettempdir(), log_dir)  # the path it was given
        assert len(mentioning(janitor_arg)) == 1, "one janitor watches it"
        agent.kill()
        agent.wait(HANG_S)
        assert wait_until(lambda: all(gone(pid) for pid in pids), GONE_S), [
            pid for pid in pids if not gone(pid)
        ]
        assert mentioning(str(tmp_path)) == []
        # the janitor (see aiockpt.elastic.janitor) removed the directory, then itself
        assert wait_until(lambda: log_dir not in temp_entries(), GONE_S), temp_entries()
        assert wait_until(lambda: mentioning(janitor_arg) == [], GONE_S), "the janitor lingers"


@pytest.mark.parametrize("log_dir", [True, False], ids=["log-dir", "temporary"])
def test_sigkilled_agent_leaves_no_child_of_a_worker(tmp_path: Path, log_dir: bool) -> None:
    # the parent-death signal reaches the workers only; the child each started (in its
    # process group, ignoring SIGTERM) is killed by the janitor, whatever the log directory
    logs = [f"--log-dir={tmp_path / 'logs'}"] if log_dir else []
    argv = [*LAUNCH, NO_SPARE_IMPORTS, "--nproc-per-node=2", *logs, SCRIPT, "stubborn-child",
            str(tmp_path)]  # fmt: skip
    names = [f"{rank}{kind}.pid" for rank in range(2) for kind in ("", ".child")]
    with launched(argv) as agent:
        wait_for_files_sync(agent, [tmp_path / name for name in names])
        pids = read_pids(tmp_path, names)
        try:
            agent.kill()
            agent.wait(HANG_S)
            assert wait_until(lambda: all(gone(pid) for pid in pids), GONE_S), [
                pid for pid in pids if not gone(pid)
            ]
        finally:  # when it fails: leave nothing behind
            for pid in pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: mentioning(str(tmp_path)) == [], GONE_S), "a helper lingers"


def test_sigkilled_agent_mid_restarts_leaves_no_worker(tmp_path: Path) -> None:
    # killed while restarting as fast as it can: some workers are being spawned, some are
    # between fork and the parent-death signal, some are being stopped, spares are being
    # started (importing nothing: the script does not use torch, and the loop stays fast)
    temp_before = temp_entries()
    argv = [*LAUNCH, "--nproc-per-node=2", "--max-restarts=1000", NO_SPARE_IMPORTS,
            SCRIPT, "crash-loop", str(tmp_path), "-1"]  # fmt: skip
    with launched(argv) as agent:
        deadline = time.monotonic() + HANG_S
        while len([p for p in tmp_path.iterdir() if p.name.startswith("pid_")]) < 20:
            assert agent.poll() is None and time.monotonic() < deadline, "no restarts"
            time.sleep(0.005)
        agent.kill()
        agent.wait(HANG_S)
        assert wait_until(lambda: mentioning(str(tmp_path)) == [], GONE_S), [
            (pid, gone(pid)) for pid in mentioning(str(tmp_path))
        ]
    assert wait_until(lambda: temp_entries() <= temp_before, GONE_S), "log directory left"


def fork_idle_copy() -> int:
    """Fork this process; the copy sleeps until killed (see :func:`kill_and_reap`)."""
    forked = os.fork()
    if forked == 0:  # pragma: no cover - the copy runs nothing, not even pytest's exit
        try:
            time.sleep(HANG_S)
        finally:
            os._exit(0)
    return forked


def kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # it dies at once: a short wait, even on the loop


async def test_forked_copy_of_the_agent_does_not_hold_up_its_end(tmp_path: Path) -> None:
    # a process forked from an in-process agent holds a copy of each of its fds, the write end
    # of the janitor's pipe included: run() must end without waiting for that process
    run = asyncio.create_task(make_agent(1, *WORKER, "crash-loop", str(tmp_path), "0").run())
    await wait_for_files([tmp_path / "paused_0"])
    forked = fork_idle_copy()
    try:
        (tmp_path / "go_0").touch()
        result = await asyncio.wait_for(run, HANG_S / 2)
        assert result.failures[0].exitcode == 1
        assert not gone(forked), "the forked copy was alive, holding the pipe, all along"
    finally:
        kill_and_reap(forked)


# -- many restarts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What this process (the agent's) holds; sampled at the same point of two attempts."""

    fds: int
    threads: int
    tasks: int  # /proc/self/task: threads of native code (torch's store) included
    asyncio_tasks: int
    rss_kib: int

    @classmethod
    def sample(cls) -> Usage:
        gc.collect()
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            threads=threading.active_count(),
            tasks=len(os.listdir("/proc/self/task")),
            asyncio_tasks=len(asyncio.all_tasks()),
            rss_kib=rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
        )


@pytest.mark.parametrize("kind", ["binary", "function"])
async def test_restarts_do_not_grow_fds_threads_or_memory(tmp_path: Path, kind: str) -> None:
    """Every attempt starts 2 workers; rank 0 fails (at once, or after 20 ms), rank 1 is
    stopped. Usage is sampled while rank 0 of restart 5 and of the last restart waits, so both
    samples see the same live set: 2 workers, their pipes and tees, their exit waiters (a
    waitpid thread each on the stock loop before Python 3.12, a pidfd from 3.12). fds, threads
    and tasks must then be equal, not merely close: anything left from one of the attempts in
    between would show. RSS may drift with the allocator: +10% is a leak bound, not a target.
    """
    work = tmp_path / "work"
    work.mkdir()
    last = RESTARTS if kind == "binary" or LONG else SHORT_RESTARTS
    pauses = [5, last]
    if kind == "binary":
        # tee every stream: a pipe, a tee task and a log file per stream and attempt
        specs = LogsSpecs(log_dir=tmp_path / "logs", tee=Std.ALL)
        agent = make_agent(2, *WORKER, "crash-loop", str(work), "5," + str(last),
                           max_restarts=last, logs_specs=specs)  # fmt: skip
    else:
        # the function path: a socket pair and the reply task per worker, error files; and
        # redirects: log files the agent opens for the workers
        specs = LogsSpecs(log_dir=tmp_path / "logs", redirects=Std.ALL)
        agent = make_agent(2, fault_workers.crash_loop, str(work), pauses, max_restarts=last,
                           logs_specs=specs)  # fmt: skip
    start = time.monotonic()
    run = asyncio.create_task(agent.run())
    samples: dict[int, Usage] = {}
    first_five = 0.0
    for restart in pauses:
        await wait_for_files([work / f"paused_{restart}"])
        samples[restart] = Usage.sample()
        if restart == 5:
            first_five = time.monotonic() - start
        (work / f"go_{restart}").touch()
    result: RunResult = await run
    elapsed = time.monotonic() - start
    assert result.state == WorkerState.FAILED
    assert list(result.failures) == [0], "rank 1, stopped by the agent, is no failure"
    assert result.failures[0].exitcode == 1
    early, late = samples[5], samples[last]
    report = (
        f"{kind} on {type(asyncio.get_running_loop()).__module__}: {last} restarts in "
        f"{elapsed:.2f}s (first 5: {first_five:.2f}s)\n  restart 5: {early}\n"
        f"  restart {last}: {late}"
    )
    print(report)  # shown with -s (or -rP)
    assert late.fds == early.fds, report
    assert late.threads == early.threads, report
    assert late.tasks == early.tasks, report
    assert late.asyncio_tasks == early.asyncio_tasks, report
    assert late.rss_kib <= early.rss_kib * 1.10, report
    [run_dir] = (tmp_path / "logs").glob("faults_*")
    assert len(list(run_dir.iterdir())) == last + 1, "one per attempt"


# -- a signal to the agent while a worker ignores SIGTERM, in this process ---------------------


async def test_sigterm_to_agent_with_stubborn_workers_raises_after_kill(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = asyncio.create_task(make_agent(2, *WORKER, "stubborn", str(tmp_path), -1).run())
    await wait_for_files([tmp_path / "0.pid", tmp_path / "1.pid"])
    pids = read_pids(tmp_path, ["0.pid", "1.pid"])
    os.kill(os.getpid(), signal.SIGTERM)  # the agent's loop handler takes it
    with pytest.raises(SignalException) as raised:
        await run
    assert raised.value.sigval == signal.SIGTERM
    assert_reaped(pids)
    assert sigkill_warnings(caplog) == set(pids)
