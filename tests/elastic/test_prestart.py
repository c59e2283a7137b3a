"""Pre-started workers (``prestart_workers``, ``aiockpt-run --prestart-workers``): a spare
interpreter per local slot, started before it is needed, becomes the next worker. Real
agents and real worker processes; the spares are found in /proc by their command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aiockpt.elastic import LogsSpecs, Std, WorkerSpec, WorkerState
from aiockpt.elastic.agent import PythonLaunch, python_launch
from aiockpt.elastic.bootstrap import preload_modules
from aiockpt.elastic.cli import parse_args
from benchmarks.bench_membership import spare_pids
from tests.elastic.test_agent import SCRIPT, run_agent, run_dir

PROBE = str(Path(__file__).with_name("probe_worker.py"))
#: what ``python probe_worker.py`` puts first on sys.path
PROBE_DIR = str(Path(PROBE).resolve().parent)
#: hang guard, not a performance bound (each spare imports torch on a shared 2-core box)
DEADLINE_S = 60.0


def spares_of(root: int | None = None) -> set[int]:
    """Processes under ``root`` (default: this one) started as spares."""
    return spare_pids(os.getpid() if root is None else root)


async def wait_for(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S}s"
        await asyncio.sleep(0.02)
    return value


def report(directory: Path, restart: int, rank: int) -> dict[str, Any] | None:
    path = directory / f"report-{restart}-{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


async def test_restart_runs_in_the_spare_started_while_the_group_ran(tmp_path: Path) -> None:
    specs = LogsSpecs(log_dir=tmp_path / "logs", redirects=Std.ALL)
    run = asyncio.create_task(
        run_agent(
            sys.executable,
            "-u",
            PROBE,
            str(tmp_path),
            "fail-first",
            max_restarts=1,
            logs_specs=specs,
            prestart_workers=True,
        )
    )
    first = await wait_for(lambda: report(tmp_path, 0, 0), "first worker")
    # the spare for the next attempt, started once the first group was running
    waiting = await wait_for(lambda: spares_of() - {first["pid"]}, "spare")
    (tmp_path / "gate").touch()  # the first worker now fails: a restart
    result = await asyncio.wait_for(run, DEADLINE_S)
    assert result.state == WorkerState.SUCCEEDED
    second = report(tmp_path, 1, 0)
    assert second is not None
    assert second["pid"] in waiting, "the restart ran in the spare, not a new process"
    assert second["torch_preloaded"], "torch was imported before the script started"
    env = second["env"]
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("0", "0", "1")
    assert env["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert second["c_rank"] == "0", "the C library's environment is the worker's too"
    assert env["MASTER_PORT"] != first["env"]["MASTER_PORT"]
    assert (second["argv"], second["name"]) == ([PROBE, str(tmp_path), "fail-first"], "__main__")
    assert second["path0"] == PROBE_DIR
    # its output went to the second attempt's log files, which the first one's did not get
    logs = run_dir(tmp_path / "logs")
    assert (logs / "attempt_1" / "0" / "stdout.log").read_text() == "probe out 1 0\n"
    assert "probe err 1 0\n" in (logs / "attempt_1" / "0" / "stderr.log").read_text()
    assert "probe out 1" not in (logs / "attempt_0" / "0" / "stdout.log").read_text()
    assert not spares_of(), "the unused spare was reaped when the run ended"


async def test_prestarted_worker_env_is_a_spawned_workers(tmp_path: Path) -> None:
    reports: dict[bool, list[dict[str, Any]]] = {}
    for prestart in (True, False):
        directory = tmp_path / str(prestart)
        directory.mkdir()
        result = await run_agent(
            sys.executable, "-u", PROBE, str(directory), "ok", nproc=2, prestart_workers=prestart
        )
        assert result.state == WorkerState.SUCCEEDED
        found = [report(directory, 0, rank) for rank in (0, 1)]
        reports[prestart] = [r for r in found if r is not None]
        assert {tuple(r["argv"]) for r in reports[prestart]} == {(PROBE, str(directory), "ok")}
    assert [r["torch_preloaded"] for r in reports[True]] == [True, True]
    assert [r["torch_preloaded"] for r in reports[False]] == [False, False]
    per_run = {"MASTER_PORT", "TORCHELASTIC_ERROR_FILE"}  # a store and a log dir of its own
    for spare, spawned in zip(reports[True], reports[False], strict=True):
        assert {k: v for k, v in spare["env"].items() if k not in per_run} == {
            k: v for k, v in spawned["env"].items() if k not in per_run
        }
        assert spare["env"].keys() == spawned["env"].keys()
        assert spare["c_rank"] == spawned["c_rank"] == spare["env"]["RANK"]
        for key in ("path0", "name"):
            assert spare[key] == spawned[key]
    assert [r["env"]["LOCAL_RANK"] for r in reports[True]] == ["0", "1"]


async def test_record_in_a_prestarted_worker_writes_the_error_file(tmp_path: Path) -> None:
    result = await run_agent(
        sys.executable,
        SCRIPT,
        "record-raise",
        "from a spare",
        logs_specs=LogsSpecs(log_dir=tmp_path),
        prestart_workers=True,
    )
    failure = result.failures[0]
    assert failure.exitcode == 1
    assert failure.message == "ValueError: from a spare"
    assert failure.error_file == str(run_dir(tmp_path) / "attempt_0" / "0" / "error.json")


def test_spares_die_with_a_sigkilled_agent(tmp_path: Path) -> None:
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "aiockpt.run", "--standalone", "--shutdown-timeout=2"),
            "--max-restarts=1",  # else there is no next attempt to pre-start a worker for
            *(SCRIPT, "pid-then-sleep", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        pid_file = tmp_path / "0.pid"
        deadline = time.monotonic() + DEADLINE_S
        while not (pid_file.exists() and spares_of(agent.pid) - {int(pid_file.read_text())}):
            assert time.monotonic() < deadline, "no worker and spare"
            time.sleep(0.02)
        worker = int(pid_file.read_text())
        [spare] = spares_of(agent.pid) - {worker}
        assert worker in spares_of(agent.pid), "on by default: the worker was a spare too"
        agent.kill()
        agent.wait(DEADLINE_S)
        for pid in (worker, spare):  # parent-death signal and the janitor
            while Path(f"/proc/{pid}").exists():
                assert time.monotonic() < deadline, f"{pid} outlived its agent"
                time.sleep(0.02)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(DEADLINE_S)


def spec_with(*args: str, entrypoint: str = "/usr/bin/python3") -> WorkerSpec:
    return WorkerSpec(role="r", local_world_size=1, entrypoint=entrypoint, args=args)


def test_python_launch_splits_options_target_and_args() -> None:
    assert python_launch(spec_with("-u", "train.py", "--lr", "${local_rank}")) == PythonLaunch(
        ["-u"], False, "train.py", 2
    )
    assert python_launch(spec_with("-u", "-m", "pkg.train", "x")) == PythonLaunch(
        ["-u"], True, "pkg.train", 3
    )
    for args, message in [
        (("-u", "-X", "importtime", "t.py"), "option '-X'"),
        (("-c", "print()"), "option '-c'"),
        (("-u",), "no script"),
        (("-m",), "without a module"),
        (("rank${local_rank}.py",), "differs per worker"),
    ]:
        with pytest.raises(ValueError, match=message):
            python_launch(spec_with(*args))
    with pytest.raises(ValueError, match="Python interpreter"):
        python_launch(WorkerSpec(role="r", local_world_size=1, entrypoint=print))


def test_cli_prestarts_by_default_and_can_be_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args(["train.py"]).prestart_workers is True
    assert parse_args(["--no-prestart-workers", "train.py"]).prestart_workers is False
    monkeypatch.setenv("PET_PRESTART_WORKERS", "0")
    assert parse_args(["train.py"]).prestart_workers is False
    assert parse_args(["--prestart-workers", "train.py"]).prestart_workers is True


def test_preload_is_torch_and_installed_top_level_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mylocal.py").write_text("")
    script = tmp_path / "train.py"
    script.write_text(
        "from __future__ import annotations\n"
        "import json, mylocal\n"
        "from email import message\n"
        "from . import sibling\n"
        "def main():\n"
        "    import csv\n"
    )
    # top level only, absolute only, never the script's own modules (they may read RANK)
    assert preload_modules(str(script), False, str(tmp_path)) == ["torch", "json", "email"]
    # -m from the working directory, as the spare has sys.path[0] for it
    monkeypatch.syspath_prepend(str(tmp_path))
    assert preload_modules("train", True, str(tmp_path)) == ["torch", "json", "email"]
    assert preload_modules("no_such_module_here", True, str(tmp_path)) == ["torch"]
