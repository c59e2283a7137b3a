"""Hostile input: state-dict keys that look like paths, checkpoints that carry pickles, and
the permissions of what a save creates.

A key is data, never a path: whatever the keys, a save either succeeds with every file inside
its checkpoint directory or fails with a clear error, and nothing outside the directory is
created or changed (checked by snapshotting the whole tree around it). Loading never runs a
pickle unless the caller allows it. Arenas are owner-only, temporary directories too, and the
channel to the worker is a socketpair, not a listening socket.

One checkpoint worker serves the whole module (a module-scoped ``SyncCheckpointer``): the
property under test does not depend on the caller's event loop, and a worker per case would
make the module slow.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import xxhash

import aiockpt
import aiockpt.manager
from aiockpt import CheckpointWriteError, SyncCheckpointer, commit, loading
from aiockpt.manifest import MANIFEST_NAME, TensorLeaf
from aiockpt.protocol import RankInfo
from aiockpt.staging import SharedArena
from aiockpt.tree import format_key_path
from aiockpt.writers.base import FileRecord, FileSink, dtype_name, flatten_state_dict
from tests.faults import PAUSING_DCP, arena_names, open_fds, tree_snapshot

pytestmark = pytest.mark.faults

PACKAGE = Path(aiockpt.__file__).resolve().parent
KEY_NAMED = "tests.test_hostile_input:KeyNamedWriter"


class KeyNamedWriter:
    """A custom writer that names each tensor's file after its key path, through aiockpt's
    own ``FileSink`` (the writer toolkit), trusting it to keep names inside the directory."""

    def __init__(self, rank_info: RankInfo | None = None, **options: Any) -> None:
        self.rank_info = rank_info or RankInfo()

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord]:
        _, flat = flatten_state_dict(state_dict)
        records = []
        for index, (key_path, value) in enumerate(flat):
            if not isinstance(value, torch.Tensor):
                continue
            name = format_key_path(key_path)
            with FileSink(path, name) as sink:
                sink.write_tensor(value.contiguous())
                leaf = TensorLeaf(name, 0, dtype_name(value.dtype), list(value.shape))
                records.append(msgspec.structs.replace(sink.close(), leaves={index: leaf}))
        return records


@pytest.fixture(scope="module")
def checkpointer() -> Iterator[SyncCheckpointer]:
    """One worker for the module (set up before, and torn down after, every test's leak
    check, so the checks see it as already there)."""
    with SyncCheckpointer(allow_pickle=False) as ckpt:
        ckpt.start(like={"w": torch.zeros(16)})  # its arena too: tests grow it, never add one
        yield ckpt


# --- keys that look like paths ----------------------------------------------------------------

#: ``{outside}`` stands for a directory next to the checkpoints, inside the snapshotted tree,
#: so that an absolute key that escaped lands where the test sees it (never in /)
HOSTILE_KEYS: dict[str, str] = {
    "dotdot": "../escaped",
    "dotdot-twice": "../../escaped-twice",
    "dotdot-nested": "a/../../escaped-nested",
    "absolute-existing": "{outside}/victim",
    "absolute-new": "{outside}/created",
    "separators": "sub/dir/name",
    "backslash": "back\\slash",
    "nul": "nul\0byte",
    "name-max": "x" * 300,
    "very-long": "y" * 5000,
    "unicode": "ключ-💥-\u202e-名",
    "newline": "line\nbreak",
    "tilde": "~/x",
    "dot": ".",
    "dotdot-alone": "..",
    "empty": "",
    "manifest": MANIFEST_NAME,
    "dcp-metadata": ".metadata",
    "dcp-data": "__0_0.distcp",
    "safetensors-file": "model.safetensors",
    "sidecar": "objects.pkl",
    "temp-prefix": commit.TEMP_PREFIX + "x",
}


def cases() -> Iterator[Any]:
    for fmt in ("dcp", "safetensors", KEY_NAMED):
        short = fmt.rpartition(":")[2]
        for name in HOSTILE_KEYS:
            yield pytest.param(fmt, name, id=f"{short}-{name}")


def changed_outside(
    before: dict[str, tuple[int, int, int, int]],
    after: dict[str, tuple[int, int, int, int]],
    inside: str,
) -> list[str]:
    """Paths that appeared, vanished or changed, other than under ``inside`` (relative).
    A directory counts as changed only if it was replaced: entries come and go in it."""
    changed = []
    for path in sorted(before.keys() | after.keys()):
        if path == inside or path.startswith(inside + os.sep):
            continue
        old, new = before.get(path), after.get(path)
        if old is not None and new is not None and stat.S_ISDIR(old[0]) and stat.S_ISDIR(new[0]):
            old, new = old[::2], new[::2]  # mode and inode only
        if old != new:
            changed.append(path)
    return changed


@pytest.mark.parametrize(("fmt", "name"), list(cases()))
def test_hostile_keys_never_reach_outside_the_checkpoint(
    checkpointer: SyncCheckpointer, tmp_path: Path, fmt: str, name: str
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("precious")
    key = HOSTILE_KEYS[name].replace("{outside}", str(outside))
    state = {key: torch.arange(6.0), "other": {"nested": torch.ones(2)}, "step": 3}
    target = root / "ck"
    before = tree_snapshot(str(tmp_path))
    try:
        checkpointer.save_to(state, target, format=fmt).result(timeout=120)
    except (TypeError, ValueError, CheckpointWriteError) as exc:
        error: Exception | None = exc
    else:
        error = None
    after = tree_snapshot(str(tmp_path))
    assert changed_outside(before, after, os.path.relpath(target, tmp_path)) == []
    assert (outside / "victim").read_text() == "precious"
    if error is not None:
        # A clear error says what was wrong (CheckpointWriteError: with the worker's own type).
        assert str(error).strip(), repr(error)
        assert not target.exists()
        return
    loaded = aiockpt.load(target)
    assert list(loaded) == list(state) and torch.equal(loaded[key], state[key])
    for directory, _, files in os.walk(target):
        for file in files:
            full = Path(directory, file)
            assert full.resolve().is_relative_to(target.resolve()) and full.is_file()


# --- pickles ----------------------------------------------------------------------------------


def _detonate(marker: str) -> Detonator:
    Path(marker).write_text("a pickle was executed")
    return Detonator(marker)


class Detonator:
    """Unpickling one creates the file ``marker``: proof that a pickle ran. (It unpickles into
    another Detonator, so that a checkpoint that stores it stores a pickle again.)"""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_detonate, (self.marker,))


@pytest.mark.parametrize("fmt", ["dcp", "safetensors"])
def test_a_pickled_leaf_is_never_unpickled_unless_allowed(
    checkpointer: SyncCheckpointer, tmp_path: Path, fmt: str
) -> None:
    marker = tmp_path / "detonated"
    weights = torch.arange(8.0)
    target = tmp_path / "ck"
    state = {"w": weights, "obj": Detonator(str(marker)), "step": 1}
    checkpointer.save_to(state, target, format=fmt, allow_pickle=True).result(timeout=120)
    marker.unlink(missing_ok=True)  # the worker ran it (it was allowed to); from here on, not

    loading.verify(target)
    with pytest.raises(ValueError, match="allow_pickle"):
        aiockpt.load(target)
    partial = aiockpt.load(target, {"w": torch.zeros(8), "step": 0})  # skips the pickled leaf
    assert torch.equal(partial["w"], weights) and partial["step"] == 1
    assert not marker.exists()

    loaded = aiockpt.load(target, allow_pickle=True)  # the payload is live: opting in runs it
    assert isinstance(loaded["obj"], Detonator) and marker.exists()


def test_dcp_metadata_is_never_unpickled_even_when_pickles_are_allowed(
    checkpointer: SyncCheckpointer, tmp_path: Path
) -> None:
    """DCP's ``.metadata`` is a pickle; aiockpt's loader never reads it. A tampered one, with
    the manifest updated to match (so verification passes), runs nothing."""
    marker = tmp_path / "detonated"
    target = tmp_path / "ck"
    checkpointer.save_to({"w": torch.arange(4.0)}, target, format="dcp").result(timeout=120)
    evil = pickle.dumps(Detonator(str(marker)))
    (target / ".metadata").write_bytes(evil)
    manifest_path = target / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    for entry in manifest["files"]:
        if entry["name"] == ".metadata":
            entry.update(size=len(evil), xxh3_64=xxhash.xxh3_64(evil).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    loading.verify(target)
    for allow_pickle in (False, True):
        loaded = aiockpt.load(target, allow_pickle=allow_pickle)
        assert torch.equal(loaded["w"], torch.arange(4.0))
    assert not marker.exists()


def _calls(tree: ast.AST) -> Iterator[tuple[ast.Call, str]]:
    """Every call in ``tree`` and the name of the function it is in ("" at module level)."""

    def visit(node: ast.AST, function: str) -> Iterator[tuple[ast.Call, str]]:
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                else function
            )
            if isinstance(child, ast.Call):
                yield child, function
            yield from visit(child, inner)

    return visit(tree, "")


def _torch_load_names(tree: ast.AST) -> set[str]:
    """Names a module binds to ``torch.load`` (``from torch import load as x``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            names |= {alias.asname or alias.name for alias in node.names if alias.name == "load"}
    return names


def test_every_torch_load_in_the_package_passes_weights_only_true() -> None:
    offenders = []
    for source in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(source.read_text(), str(source))
        aliases = _torch_load_names(tree)
        for call, _ in _calls(tree):
            callee = ast.unparse(call.func)
            if not (callee.endswith(("torch.load", "serialization.load")) or callee in aliases):
                continue
            flags = [k.value for k in call.keywords if k.arg == "weights_only"]
            if not (flags and isinstance(flags[0], ast.Constant) and flags[0].value is True):
                offenders.append(f"{source.relative_to(PACKAGE.parent)}:{call.lineno}")
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


def test_checkpoint_reading_code_unpickles_only_where_allow_pickle_decides() -> None:
    """The modules that read checkpoints from disk call pickle only in the one function that
    first checks ``allow_pickle`` (its behaviour is what the tests above check)."""
    allowed = {("loading.py", "_read_leaves")}
    found = set()
    for module in ("loading.py", "manifest.py", "commit.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        for call, function in _calls(tree):
            callee = ast.unparse(call.func)
            unpickles = callee.startswith(("pickle.load", "torch.load")) or "Unpickler" in callee
            if unpickles:
                found.add((module, function))
    assert found <= allowed, f"unpickling outside the allow_pickle check: {found - allowed}"


# --- permissions and the channel ----------------------------------------------------------


class RecordingArena(SharedArena):
    """Records the mode of each arena as created."""

    modes: list[int] = []

    def __init__(self, size: int, **options: Any) -> None:
        super().__init__(size, **options)
        RecordingArena.modes.append(stat.S_IMODE(os.stat(self.path).st_mode))


def test_arenas_and_checkpoints_are_owner_only(
    checkpointer: SyncCheckpointer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiockpt.process, "SharedArena", RecordingArena)  # a bigger arena
    RecordingArena.modes = []
    big = {"w": torch.zeros(16 << 20)}  # 64 MiB: larger than any arena of this module so far
    target = tmp_path / "ck"
    handle = checkpointer.save_to(big, target, format=PAUSING_DCP)
    temp_modes = watch_temp_dirs(tmp_path, until=handle.done)
    handle.result(timeout=120)
    assert RecordingArena.modes == [0o600]
    assert arena_names(os.getpid()) == []  # arenas have no name in /dev/shm
    assert temp_modes and set(temp_modes) == {0o700}, temp_modes
    for directory, _, files in os.walk(target):
        assert stat.S_IMODE(os.stat(directory).st_mode) & 0o077 == 0, directory
        for file in files:
            assert stat.S_IMODE(os.stat(Path(directory, file)).st_mode) & 0o077 == 0, file


def watch_temp_dirs(parent: Path, until: Any, timeout: float = 120) -> list[int]:
    """Modes of the temporary directories seen under ``parent`` until ``until()``."""
    modes = []
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for entry in os.scandir(parent):
            if entry.name.startswith(commit.TEMP_PREFIX):
                try:
                    modes.append(stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
                except FileNotFoundError:
                    pass  # committed (renamed) meanwhile
        time.sleep(0.002)
    return modes


def socket_inodes(pid: int) -> set[int]:
    return {
        int(target[len("socket:[") : -1])
        for target in open_fds(pid).values()
        if target.startswith("socket:[")
    }


def unix_sockets(pid: int) -> dict[int, tuple[int, int, int]]:
    """inode -> (flags, type, state) of the unix sockets in ``pid``'s network namespace."""
    table = {}
    with open(f"/proc/{pid}/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            table[int(fields[6])] = (int(fields[3], 16), int(fields[4], 16), int(fields[5], 16))
    return table


def inet_inodes(pid: int) -> set[int]:
    inodes = set()
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{kind}") as f:
                next(f)
                inodes |= {int(line.split()[9]) for line in f}
        except FileNotFoundError:
            continue
    return inodes


_SO_ACCEPTCON = 0x10000  # a listening unix socket
_SOCK_STREAM = 1
_SS_CONNECTED = 3


def test_the_channel_is_a_socketpair_and_nothing_listens(
    checkpointer: SyncCheckpointer, tmp_path: Path
) -> None:
    checkpointer.save_to({"w": torch.ones(4)}, tmp_path / "ck").result(timeout=120)
    pid = checkpointer.worker_pid
    assert pid is not None
    for who in (pid, os.getpid()):
        inodes = socket_inodes(who)
        unix = unix_sockets(who)
        listening = [i for i in inodes if i in unix and unix[i][0] & _SO_ACCEPTCON]
        assert listening == [], f"pid {who} has listening unix sockets {listening}"
        assert inodes & inet_inodes(who) == set(), f"pid {who} has TCP/UDP sockets"
    worker_unix = {i: unix_sockets(pid)[i] for i in socket_inodes(pid) if i in unix_sockets(pid)}
    assert any(
        kind == _SOCK_STREAM and state == _SS_CONNECTED for _, kind, state in worker_unix.values()
    ), f"no connected stream socket (the channel) among {worker_unix}"
    assert threading.current_thread() is threading.main_thread()
