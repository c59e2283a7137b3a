"""Std parsing, log layout, the tee, error files: the pieces the agent is built from."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from pathlib import Path

import pytest

import aiockpt.elastic
from aiockpt.elastic import LogsSpecs, ProcessFailure, Std, WorkerSpec, record
from aiockpt.elastic.failures import NO_ERROR_FILE_MESSAGE, NOT_AVAILABLE, format_failures
from aiockpt.elastic.logs import tee_stream, to_map


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", Std.NONE),
        ("1", Std.OUT),
        ("2", Std.ERR),
        ("3", Std.ALL),
        ("0:3", {0: Std.ALL}),
        ("0:1,1:2", {0: Std.OUT, 1: Std.ERR}),
        ("0:3,1:0,2:1,12:2", {0: Std.ALL, 1: Std.NONE, 2: Std.OUT, 12: Std.ERR}),
    ],
)
def test_std_from_str(text: str, expected: Std | dict[int, Std]) -> None:
    assert Std.from_str(text) == expected


@pytest.mark.parametrize("text", ["", "4", "-1", "0:4", "0:1,", "a:1", "1,2", "0:1;1:2"])
def test_std_from_str_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        Std.from_str(text)


def test_to_map() -> None:
    assert to_map(Std.OUT, 2) == {0: Std.OUT, 1: Std.OUT}
    assert to_map({1: Std.OUT}, 3) == {0: Std.NONE, 1: Std.OUT, 2: Std.NONE}


def test_invalid_log_dir(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.touch()
    with pytest.raises(NotADirectoryError):
        LogsSpecs(log_dir=a_file)
    missing = tmp_path / "made" / "on" / "demand"
    LogsSpecs(log_dir=missing)
    assert missing.is_dir()


def test_reify_layout_redirects_tee_and_filter(tmp_path: Path) -> None:
    specs = LogsSpecs(
        log_dir=tmp_path,
        redirects={0: Std.OUT},
        tee={1: Std.ALL, 2: Std.ERR},
        local_ranks_filter={0, 1},
    )
    stale = tmp_path / "run" / "attempt_1" / "stale"
    stale.mkdir(parents=True)
    dest = specs.reify(str(tmp_path), "run", restart_count=1, nprocs=3)
    attempt = tmp_path / "run" / "attempt_1"
    assert not stale.exists(), "an attempt directory starts empty"
    assert sorted(os.listdir(attempt)) == ["0", "1", "2"]
    assert dest.error_files == {r: str(attempt / str(r) / "error.json") for r in range(3)}
    # rank 0: stdout redirected (file only), stderr on the console
    assert dest.stdouts[0] == str(attempt / "0" / "stdout.log")
    assert dest.stderrs[0] == ""
    # rank 1: both teed
    assert dest.tee_stdouts == {1: str(attempt / "1" / "stdout.log")}
    # rank 2 is filtered out: its teed stderr goes to the file only, its stdout nowhere
    assert dest.stderrs[2] == str(attempt / "2" / "stderr.log")
    assert 2 not in dest.tee_stderrs
    assert dest.stdouts[2] == os.devnull
    assert dest.tee_stderrs == {1: str(attempt / "1" / "stderr.log")}


async def test_tee_stream_keeps_bytes_and_prefixes_lines(tmp_path: Path) -> None:
    reader = asyncio.StreamReader()
    console = io.StringIO()
    log = tmp_path / "stdout.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT)
    try:
        tee = asyncio.create_task(tee_stream(reader, fd, lambda: console, "[r0]:"))
        for chunk in (b"first li", b"ne\nsecond\nthi", b"rd \xff\n", b"unterminated"):
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()
        await asyncio.wait_for(tee, 5)
    finally:
        os.close(fd)
    assert log.read_bytes() == b"first line\nsecond\nthird \xff\nunterminated"
    assert console.getvalue() == (
        "[r0]:first line\n[r0]:second\n[r0]:third \ufffd\n[r0]:unterminated"
    )


def test_record_writes_torchelastic_error_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    @record
    def main() -> None:
        raise ValueError("bad value")

    with pytest.raises(ValueError, match="bad value"):
        main()
    data = json.loads(error_file.read_text())
    assert data["message"]["message"] == "ValueError: bad value"
    assert "raise ValueError" in data["message"]["extraInfo"]["py_callstack"]
    assert int(data["message"]["extraInfo"]["timestamp"]) > 0

    failure = ProcessFailure(local_rank=0, pid=1234, exitcode=1, error_file=str(error_file))
    assert failure.message == "ValueError: bad value"
    assert failure.traceback is not None and "bad value" in failure.traceback
    assert failure.timestamp == int(data["message"]["extraInfo"]["timestamp"])
    assert failure.signal_name() == NOT_AVAILABLE


def test_record_passes_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert record(lambda: exit(0))() is None
    with pytest.raises(SystemExit) as exited:
        record(lambda: exit(138))()
    assert exited.value.code == 138
    assert not error_file.exists(), "an exit code is not an exception to record"


def test_process_failure_without_error_file(tmp_path: Path) -> None:
    exited = ProcessFailure(0, 42, 3, str(tmp_path / "missing.json"))
    assert exited.error_file == NOT_AVAILABLE
    assert exited.message == NO_ERROR_FILE_MESSAGE
    killed = ProcessFailure(1, 43, -signal.SIGTERM, "")
    assert killed.signal_name() == "SIGTERM"
    assert killed.message == "Signal 15 (SIGTERM) received by PID 43"
    assert ProcessFailure(1, 43, -99, "").signal_name() == NOT_AVAILABLE
    report = format_failures("trainer", {3: exited, 4: killed})
    root = report.split("Root Cause (first observed failure):")[1]
    assert "rank      : 3 (local_rank: 0)" in root, "ties go to the first observed failure"
    assert "exitcode  : -15 (pid: 43) (SIGTERM)" in report


def test_worker_spec_validation() -> None:
    with pytest.raises(ValueError, match="local_world_size"):
        WorkerSpec(role="r", local_world_size=0, entrypoint="true")
    with pytest.raises(ValueError, match="max_restarts"):
        WorkerSpec(role="r", local_world_size=1, entrypoint="true", max_restarts=-1)
    with pytest.raises(ValueError, match="entrypoint"):
        WorkerSpec(role="r", local_world_size=1, entrypoint="")
    assert WorkerSpec("r", 1, entrypoint="/usr/bin/env").get_entrypoint_name() == "env"
    assert WorkerSpec("r", 1, entrypoint=test_to_map).get_entrypoint_name() == "test_to_map"


def test_public_names_resolve() -> None:
    assert sorted(aiockpt.elastic.__all__) == sorted(set(aiockpt.elastic.__all__))
    for name in aiockpt.elastic.__all__:
        assert getattr(aiockpt.elastic, name).__name__ == name
    with pytest.raises(AttributeError):
        aiockpt.elastic.NotAName  # noqa: B018
