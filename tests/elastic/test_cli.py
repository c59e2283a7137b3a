"""``aiockpt-run`` as users run it: a separate agent process, signalled and killed from outside."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aiockpt.elastic.cli import parse_args

SCRIPT = str(Path(__file__).with_name("worker_script.py"))
FAULT_SCRIPT = str(Path(__file__).with_name("fault_script.py"))
LAUNCH = [sys.executable, "-m", "aiockpt.run"]
#: for the runs that never restart a worker, whose workers never use torch: the spares that
#: start the first workers (``--prestart-workers``, on) then import nothing ahead, where by
#: default each imports torch (seconds of CPU a worker) for a script that does not need it.
#: The pre-started path is still the one taken; test_prestart checks what spares import.
NO_SPARE_IMPORTS = "--prestart-imports="
#: a hang guard, not a performance bound
DEADLINE_S = 60.0


def launch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCH, *args], capture_output=True, text=True, timeout=DEADLINE_S, check=False, cwd=cwd
    )


def test_help_reads_like_torchrun() -> None:
    done = launch("--help")
    assert done.returncode == 0
    for flag in (
        "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
        "--standalone", "--max-restarts", "--monitor-interval", "--redirects", "--tee",
        "--log-dir", "--local-ranks-filter", "--run-id", "--role", "--module", "--no-python",
        "--start-method", "--shutdown-timeout", "--exit-barrier-timeout", "training_script",
    ):  # fmt: skip
        assert flag in done.stdout
    assert done.stdout.startswith("usage: aiockpt-run")


def test_runs_script_with_tee_and_log_dir(tmp_path: Path) -> None:
    done = launch(
        NO_SPARE_IMPORTS, "--nproc-per-node=2", "--tee=1", f"--log-dir={tmp_path}", "--run-id=cli",
        "--role=worker", SCRIPT, "print", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert f"[worker{rank}]:line 1 of rank {rank}\n" in done.stdout
        [run_dir] = tmp_path.glob("cli_*")
        log = run_dir / "attempt_0" / str(rank) / "stdout.log"
        assert log.read_text() == f"line 0 of rank {rank}\nline 1 of rank {rank}\n"


def test_rerun_into_the_same_log_dir_keeps_the_earlier_run(tmp_path: Path) -> None:
    # the default run id both times, as a job is rerun: each run gets a directory of its own
    for message in ("first", "second"):
        done = launch(
            NO_SPARE_IMPORTS, "--redirects=3", f"--log-dir={tmp_path}", SCRIPT, "record-raise",
            message,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
    runs = sorted(tmp_path.glob("none_*"))
    assert len(runs) == 2, list(tmp_path.iterdir())
    recorded = set()
    for run in runs:
        rank_dir = run / "attempt_0" / "0"
        recorded.add(json.loads((rank_dir / "error.json").read_text())["message"]["message"])
        assert "Traceback" in (rank_dir / "stderr.log").read_text()
    assert recorded == {"ValueError: first", "ValueError: second"}


def test_restarted_group_meets_again_through_env_init(tmp_path: Path) -> None:
    done = launch(
        "--standalone", "--nproc-per-node=2", "--max-restarts=1", "--tee=3",
        f"--log-dir={tmp_path}", SCRIPT, "gloo-crash-once",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("attempt 1 sum 2") == 2


def test_failure_report_and_exit_code(tmp_path: Path) -> None:
    # rank 1 exits 3 once ranks 0 and 2 are running; the agent then stops them with SIGTERM
    done = launch(
        NO_SPARE_IMPORTS, "--standalone", "--nproc-per-node=3", FAULT_SCRIPT, "crash",
        str(tmp_path), "1",
    )  # fmt: skip
    assert done.returncode == 1
    others, root_cause = done.stderr.split("Root Cause (first observed failure):")
    assert "exitcode  : 3" in root_cause
    assert "rank      : 1 (local_rank: 1)" in root_cause
    assert "<NO_OTHER_FAILURES>" in others, "the siblings the agent stopped are no failures"
    assert "SIGTERM" not in done.stderr


def test_module_and_no_python(tmp_path: Path) -> None:
    done = launch(
        NO_SPARE_IMPORTS, "-m", "tests.elastic.worker_script", "print", "1", cwd=Path.cwd()
    )
    assert done.returncode == 0, done.stderr
    assert "line 0 of rank 0" in done.stdout
    done = launch("--no-python", "--nproc-per-node=2", sys.executable, SCRIPT, "print", "1")
    assert done.returncode == 0, done.stderr
    assert "line 0 of rank 1" in done.stdout
    bad = launch("--no-python", "-m", "x")
    assert bad.returncode == 2 and "--no-python" in bad.stderr


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_start_method_takes_torchrun_choices(method: str) -> None:
    assert parse_args([f"--start-method={method}", "train.py"]).start_method == method
    assert parse_args(["--start_method", method, "train.py"]).start_method == method


def test_start_method_default_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["train.py"]).start_method == "spawn"
    with pytest.raises(SystemExit) as exited:
        parse_args(["--start-method=thread", "train.py"])
    assert exited.value.code == 2
    assert "--start-method" in capsys.readouterr().err


def test_torchrun_command_line_with_start_method_runs() -> None:
    # as torchrun users write it: underscores, a separate value, a start method
    done = launch(NO_SPARE_IMPORTS, "--standalone", "--nproc_per_node", "2", "--start_method",
                  "fork", SCRIPT, "print", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "line 0 of rank 1" in done.stdout


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--nnodes", "0"),
        ("--nnodes", "two"),
        ("--nnodes", "2:1"),
        ("--nnodes", "1:x"),
        ("--rdzv-backend", "etcd"),
        ("--nproc-per-node", "0"),
        ("--nproc-per-node", "-2"),
        ("--nproc-per-node", "many"),
        ("--max-restarts", "-1"),
        ("--max-restarts", "1.5"),
        ("--monitor-interval", "-0.1"),
        ("--monitor-interval", "nan"),
        ("--node-rank", "-1"),
        ("--master-port", "-1"),
        ("--master-port", "65536"),
        ("--exit-barrier-timeout", "-1"),
        ("--exit-barrier-timeout", "inf"),
        ("--shutdown-timeout", "-5"),
        ("--shutdown-timeout", "soon"),
        ("--redirects", "4"),
        ("--tee", "0:5"),
    ],
)
def test_invalid_numeric_flag_is_an_argparse_error_naming_it(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args([f"{flag}={value}", "train.py"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.rsplit("error: argument ", 1)[1]
    assert flag in error.split(":")[0].split("/"), error  # "-r/--redirects: ..."


def test_invalid_shutdown_timeout_from_environment_names_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "-5")
    with pytest.raises(SystemExit) as exited:
        parse_args(["train.py"])
    assert exited.value.code == 2
    assert "argument --shutdown-timeout" in capsys.readouterr().err


def test_valid_numeric_flags() -> None:
    args = parse_args(
        ["--nnodes=2:2", "--node-rank=1", "--master-port=0", "--max-restarts=0",
         "--shutdown-timeout=0", "--exit-barrier-timeout=0.5", "--monitor-interval=5",
         "--nproc-per-node=cpu", "train.py"]
    )  # fmt: skip
    assert (args.nnodes, args.node_rank, args.master_port) == ((2, 2), 1, 0)
    assert (args.shutdown_timeout, args.exit_barrier_timeout) == (0.0, 0.5)


def test_node_rank_beyond_nnodes_is_rejected_before_anything_starts() -> None:
    done = launch("--nnodes=2", "--node-rank=2", "--master-port=29555", SCRIPT, "print", "1")
    assert done.returncode == 2
    assert "error: --node-rank must be less than --nnodes (2), got 2" in done.stderr


@contextmanager
def running_agent(
    argv: list[str], pid_dir: Path, nproc: int
) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """Start an agent and wait until its ``nproc`` workers wrote their pid files."""
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + DEADLINE_S
        pid_files = [pid_dir / f"{rank}.pid" for rank in range(nproc)]
        while not all(p.exists() for p in pid_files):
            assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        yield agent, [int(p.read_text()) for p in pid_files]
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(DEADLINE_S)
        if agent.stderr:
            agent.stderr.close()


def gone(pid: int) -> bool:
    """Whether ``pid`` is dead (a zombie waiting for a reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_agent_stops_workers_and_exits_with_its_code(
    tmp_path: Path, sig: signal.Signals
) -> None:
    argv = [*LAUNCH, NO_SPARE_IMPORTS, "--nproc-per-node=2", "--shutdown-timeout=20", SCRIPT,
            "pid-then-sleep", str(tmp_path)]  # fmt: skip
    with running_agent(argv, tmp_path, 2) as (agent, pids):
        agent.send_signal(sig)
        assert agent.wait(DEADLINE_S) == 128 + sig
        for rank, pid in enumerate(pids):
            # reaped by the agent itself: not even a zombie left for init
            assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived its agent"
            # SIGINT too is forwarded as what it is, and the workers' handler only knows TERM
            assert (tmp_path / f"{rank}.term").exists() == (sig == signal.SIGTERM)


@pytest.mark.parametrize("entrypoint", ["binary", "function"])
def test_sigkilled_agent_leaves_no_worker(tmp_path: Path, entrypoint: str) -> None:
    # a SIGKILLed agent cannot remove a temporary log directory: give it one to use
    if entrypoint == "binary":
        argv = [*LAUNCH, NO_SPARE_IMPORTS, "--nproc-per-node=2", f"--log-dir={tmp_path / 'logs'}",
                SCRIPT, "pid-then-sleep", str(tmp_path)]  # fmt: skip
    else:
        argv = [sys.executable, "-m", "tests.elastic.function_agent", str(tmp_path)]
    with running_agent(argv, tmp_path, 2) as (agent, pids):
        agent.kill()
        agent.wait(DEADLINE_S)
        assert wait_gone(pids), "the parent-death signal did not kill every worker"
