"""The ``aiockpt`` command, run as the installed script in subprocesses (a real terminal
through ``pty`` for the progress bar)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import aiockpt
from aiockpt._format.commit import write_checkpoint
from aiockpt._wire.protocol import ShardSpec
from aiockpt.writers.dcp import DcpWriter
from tests.group_saves import group_save

#: the console script pip installed next to this interpreter
AIOCKPT = str(Path(sys.executable).with_name("aiockpt"))
ROWS, COLS = 8, 3


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AIOCKPT, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def run_together(*commands: tuple[str | Path, ...]) -> list[subprocess.CompletedProcess[str]]:
    """``run`` each command (independent of the others) at the same time; their results in
    order. Each invocation spends seconds importing, one core's worth: side by side they take
    the machine's cores, not one after the other's."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda command: run(*command), commands))


def whole() -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``step_0000000001``: one rank, DCP; ``step_0000000002``: two ranks, a tensor sharded
    by rows (a DTensor's pieces) and a replicated one; a directory without a manifest."""
    root = tmp_path_factory.mktemp("root")
    write_checkpoint(
        DcpWriter(),
        {"w": whole(), "step": 1},
        root / "step_0000000001",
        format="dcp",
        metadata={"note": "first"},
    )
    states, shards = [], []
    for rank in range(2):
        states.append(
            {"w": whole()[rank * 4 : rank * 4 + 4].clone(), "b": torch.ones(3), "step": 2}
        )
        shards.append({0: ShardSpec([ROWS, COLS], [rank * 4, 0])})
    outcomes = group_save(root / "step_0000000002", states, shards, format="dcp")
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    (root / "step_0000000003").mkdir()  # a save that never committed
    return root


def test_ls_lists_committed_checkpoints_with_step_size_format_and_ranks(root: Path) -> None:
    listed, table = run_together(("ls", "--json", root), ("ls", root))
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["step"], r["format"], r["world_size"]) for r in rows] == [
        ("step_0000000001", 1, "dcp", 1),
        ("step_0000000002", 2, "dcp", 2),
    ]
    for row in rows:
        path = Path(row["path"])
        assert row["bytes"] == sum(f.stat().st_size for f in path.iterdir())
        assert 0 <= row["age_s"] < 3600
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "SIZE", "AGE", "FORMAT", "RANKS"]
    assert lines[2].split()[:2] == ["step_0000000002", "2"] and lines[2].split()[-2:] == [
        "dcp",
        "2",
    ]
    assert "step_0000000003" not in table.stdout


#: a fresh interpreter runs the ``aiockpt`` commands in argv[1:] (each a JSON list of
#: arguments) in turn, in process, and prints for each its exit status, its output and
#: whether torch is imported by then (a JSON list, the last line)
_COMMANDS_IN_ONE_PROCESS = """
import contextlib, io, json, sys
from aiockpt.command_line import main

results = []
for argv in map(json.loads, sys.argv[1:]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv, prog_name="aiockpt")
        except SystemExit as exc:
            status = exc.code
    results.append([status, out.getvalue(), "torch" in sys.modules])
print(json.dumps(results))
"""


def test_commands_that_read_manifests_and_bytes_never_import_torch(
    root: Path, tmp_path: Path
) -> None:
    """``import torch`` takes seconds: ``--help``, ``ls``, ``inspect`` and ``verify`` start
    without it (a few tenths of a second); ``convert``, which loads tensors, imports it."""
    commands = [
        ["--help"],
        ["ls", str(root)],
        ["inspect", "--json", str(root / "step_0000000002")],
        ["verify", str(root / "step_0000000002")],
        ["convert", str(root / "step_0000000001"), str(tmp_path / "whole.pt"), "--to", "torch"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", _COMMANDS_IN_ONE_PROCESS, *map(json.dumps, commands)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    helped, listed, inspected, verified, converted = json.loads(done.stdout.splitlines()[-1])
    assert helped[0] == 0 and "verify" in helped[1]
    assert listed[0] == 0 and "step_0000000002" in listed[1]
    assert inspected[0] == 0 and '"pieces"' in inspected[1]
    assert verified[0] == 0 and verified[1].startswith("ok: ")
    assert [helped[2], listed[2], inspected[2], verified[2]] == [False] * 4
    assert converted[0] == 0 and converted[2] is True  # (the check sees an import of torch)


def test_verify_exits_0_for_a_sound_checkpoint_and_1_naming_a_flipped_byte(
    root: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    write_checkpoint(DcpWriter(), {"w": whole()}, bad, format="dcp")
    data = bad / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[-200] ^= 0xFF
    data.write_bytes(bytes(raw))
    good, failed, quiet, missing = run_together(
        ("verify", root / "step_0000000002"),
        ("verify", bad),
        ("verify", "-q", bad),
        ("verify", root / "step_0000000003"),
    )
    assert good.returncode == 0 and good.stdout.startswith("ok: ")
    # Not a terminal: no progress bar in what a log or a pipe receives.
    assert good.stderr == ""

    assert failed.returncode == 1
    assert "__0_0.distcp" in failed.stderr and "checksum" in failed.stderr
    assert quiet.stdout == ""

    assert missing.returncode == 1 and "never committed" in missing.stderr


def test_verify_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    write_checkpoint(DcpWriter(), {"w": torch.ones(4 << 20)}, path, format="dcp")  # 16 MiB
    controller, terminal = pty.openpty()
    # A terminal has a size (a fresh pty is 0 x 0, where tqdm draws nothing).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(
            [AIOCKPT, "verify", str(path)],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            close_fds=True,
        )
        os.close(terminal)
        terminal = -1
        output = bytearray()
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=120) == 0
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    text = output.decode(errors="replace")
    assert "verify:" in text and "%|" in text, text  # tqdm's bar
    assert "ok: " in text


def test_inspect_shows_keys_dtypes_shapes_and_sharding(root: Path) -> None:
    shown, table, nothing = run_together(
        ("inspect", "--json", root / "step_0000000002"),
        ("inspect", root / "step_0000000001"),
        ("inspect", root / "nothing"),
    )
    assert shown.returncode == 0, shown.stderr
    rows = {row["key"]: row for row in map(json.loads, shown.stdout.splitlines())}
    assert rows["w"]["dtype"] == "float32" and rows["w"]["shape"] == [ROWS, COLS]
    assert rows["w"]["pieces"] == [
        {"offset": [0, 0], "shape": [4, COLS]},
        {"offset": [4, 0], "shape": [4, COLS]},
    ]
    assert rows["b"]["shape"] == [3] and "pieces" not in rows["b"]
    assert rows["step"] == {"key": "step", "kind": "value", "value": 2}
    assert "format dcp, 1 rank(s)" in table.stdout and '"note": "first"' in table.stdout
    assert nothing.returncode == 1


@pytest.mark.parametrize("saved", ["step_0000000001", "step_0000000002"])
def test_convert_consolidates_any_world_size(root: Path, tmp_path: Path, saved: str) -> None:
    out, pt = tmp_path / "hf", tmp_path / "whole.pt"
    converted, to_torch, unknown = run_together(
        ("convert", root / saved, out, "--to", "safetensors", "--max-shard-size", "64"),
        ("convert", root / saved, pt, "--to", "torch"),
        ("convert", root / saved, tmp_path / "x", "--to", "onnx"),
    )
    assert converted.returncode == 0, converted.stderr
    files = sorted(out.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    assert torch.equal(tensors["w"], whole())
    # The 96 bytes of "w" are past 64: a file of their own, and "b" (two ranks' save) another.
    assert len(files) == (2 if "b" in tensors else 1)
    assert (out / "model.safetensors.index.json").exists() == (len(files) == 2)
    aiockpt.verify(out)

    assert to_torch.returncode == 0, to_torch.stderr
    loaded = torch.load(pt, weights_only=True)
    assert torch.equal(loaded["w"], whole()) and loaded["step"] == int(saved[-1])

    again = run("convert", root / saved, pt, "--to", "torch")
    assert again.returncode == 1 and "exists" in again.stderr
    assert unknown.returncode == 2
