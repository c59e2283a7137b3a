"""Std parsing, log layout, the tee, error files: the pieces the agent is built from."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import tracemalloc
from pathlib import Path

import pytest

import aiockpt.elastic
from aiockpt.elastic import LogsSpecs, ProcessFailure, Std, WorkerSpec, record
from aiockpt.elastic.failures import NO_ERROR_FILE_MESSAGE, NOT_AVAILABLE, format_failures
from aiockpt.elastic.logs import (
    TEE_LINE_LIMIT,
    ConsoleLines,
    make_run_log_dir,
    tee_stream,
    to_map,
)

#: a hang guard, not a performance bound
HANG_S = 30.0


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
    run_dir = Path(make_run_log_dir(str(tmp_path), "run"))
    assert run_dir.parent == tmp_path and run_dir.name.startswith("run_")
    assert make_run_log_dir(str(tmp_path), "run") != str(run_dir), "one directory per run"
    stale = run_dir / "attempt_1" / "stale"
    stale.mkdir(parents=True)
    dest = specs.reify(str(run_dir), restart_count=1, nprocs=3)
    attempt = run_dir / "attempt_1"
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


def test_console_lines_ends_and_pieces() -> None:
    lines = ConsoleLines(limit=4)
    assert lines.feed(b"a\rb\r\nc\nd") == ["a", "b", "c"]
    assert lines.feed(b"\r") == ["d"]
    assert lines.feed(b"\ne\r") == ["e"], "a \\r\\n split across reads is one line end"
    assert lines.feed(b"\n\n") == [""]
    assert lines.feed(b"0123456789") == ["0123", "4567"], "an overlong line comes in pieces"
    assert lines.held == 2
    assert lines.feed(b"\xe2\x82") == [], "half a character waits for the rest"
    assert lines.feed(b"\xac\xff\n") == ["89\u20ac\ufffd"]
    assert lines.feed(b"tail\xe2") == [], "a line as long as the limit still waits for its end"
    assert lines.finish() == ["tail", "\ufffd"]
    with pytest.raises(ValueError, match="limit"):
        ConsoleLines(limit=0)


#: a tqdm bar, redrawn with a carriage return and never a newline
BAR = b"\r 42%|" + b"#" * 40 + b" " * 56 + b"| 42/100 [00:07<00:09, 6.02it/s]"


def test_console_lines_stay_bounded_on_huge_lines() -> None:
    # 32 MiB of redraws, then 8 MiB without any line end at all: what is held back never
    # exceeds the limit, so no read costs more than its own size plus the limit
    lines = ConsoleLines()
    chunk = BAR * (64 * 1024 // len(BAR))
    emitted = 0
    for _ in range(32 * 1024 * 1024 // len(chunk)):
        complete = lines.feed(chunk)
        assert lines.held <= len(BAR)
        emitted += len(complete)
        assert complete[-1] == BAR[1:].decode()
    assert emitted == 32 * 1024 * 1024 // len(chunk) * chunk.count(b"\r")
    pieces = 0
    for _ in range(8 * 1024 * 1024 // len(chunk)):
        complete = lines.feed(chunk.replace(b"\r", b"-"))
        assert lines.held <= TEE_LINE_LIMIT
        assert all(len(piece) == TEE_LINE_LIMIT for piece in complete[1:])
        pieces += len(complete)
    assert pieces >= 8 * 1024 * 1024 // TEE_LINE_LIMIT - 1


class CountingConsole(io.StringIO):
    """A console that counts the lines written to it and keeps none (tens of MB pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0
        self.last = ""
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        self.last = text[-200:]
        self.written.set()
        return len(text)


async def test_tee_of_a_progress_bar_is_line_by_line_in_bounded_memory(tmp_path: Path) -> None:
    # a tqdm bar for minutes: only \r, never \n. Every redraw must reach the console as it
    # comes, and the tee must not keep (and re-copy on every read) everything since the last
    # \n: that made it quadratic in time and linear in memory.
    chunk = BAR * (64 * 1024 // len(BAR))
    reads = 24 * 1024 * 1024 // len(chunk)
    reader = asyncio.StreamReader()
    console = CountingConsole()
    fd = os.open(tmp_path / "stdout.log", os.O_WRONLY | os.O_CREAT)
    tracemalloc.start()
    try:
        tee = asyncio.create_task(tee_stream(reader, fd, lambda: console, "[r0]:"))
        for read in range(1, reads + 1):
            console.written.clear()
            reader.feed_data(chunk)  # one read at a time: the reader holds no backlog
            await asyncio.wait_for(console.written.wait(), HANG_S)
            assert console.lines == read * chunk.count(b"\r"), "each \\r ends a console line"
        _, peak = tracemalloc.get_traced_memory()
        reader.feed_eof()
        await asyncio.wait_for(tee, HANG_S)
        assert os.fstat(fd).st_size == reads * len(chunk), "the file gets every byte"
    finally:
        tracemalloc.stop()
        os.close(fd)
    assert console.last == "[r0]:" + BAR[1:].decode(), "the last redraw, without a line end"
    # a few reads' worth of text and lines at a time, independent of the 24 MiB that passed
    assert peak < 16 * len(chunk), peak


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
