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
import hashlib
import json
import os
import pickle
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import xxhash

import aiockpt
import aiockpt._trainer.checkpointer
from aiockpt import CheckpointWriteError, CorruptCheckpoint, SyncCheckpointer
from aiockpt._format import commit, reading
from aiockpt._format.manifest import (
    _DTYPE_ITEMSIZES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    TensorLeaf,
    dtype_itemsize,
)
from aiockpt._format.tree import MAX_DEPTH, format_key_path
from aiockpt._trainer.staging import SharedArena
from aiockpt._wire.protocol import RankInfo
from aiockpt._wire.tensors import _DTYPES, dtype_name
from aiockpt.writers import create_writer
from aiockpt.writers.base import FileRecord, FileSink, flatten_state_dict
from tests.faults import arena_names, open_fds, tree_snapshot
from tests.writer_fixtures import GATED, WriteGateFiles, assert_same, wait_for

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

    reading.verify(target)
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
    manifest_path.write_bytes(sealed(manifest))  # the attacker can write a valid checksum too
    reading.verify(target)
    for allow_pickle in (False, True):
        loaded = aiockpt.load(target, allow_pickle=allow_pickle)
        assert torch.equal(loaded["w"], torch.arange(4.0))
    assert not marker.exists()


# --- manifests: every bit checked, every malformed one a CorruptCheckpoint --------------------


def sealed(manifest: dict[str, Any]) -> bytes:
    """Manifest file bytes for ``manifest`` with a valid checksum, as anyone who can write the
    directory can make them (format 2: a fixed-length suffix with the SHA-256 of all bytes
    before it). A value ``"<nested N>"`` becomes N nested lists (deeper than ``json`` nests)."""
    fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(fields, separators=(",", ":"))
    text = re.sub(
        r'"<nested (\d+)>"',
        lambda m: '["list",[' * int(m[1]) + '["leaf",0]' + "]]" * int(m[1]),
        text,
    )
    body = text.encode()[:-1]
    return body + b',"manifest_sha256":"' + hashlib.sha256(body).hexdigest().encode() + b'"}'


def small_checkpoint(path: Path, fmt: str = "safetensors") -> dict[str, Any]:
    """A checkpoint with the kinds of values a bit flip used to change silently."""
    state = {
        "w": torch.arange(256.0).reshape(16, 16),
        "step": 123,
        "lr": 0.001,
        "opt": {"betas": (0.9, 0.95), "name": "adamw", "big": 2**80},
    }
    commit.write_checkpoint(create_writer(fmt), state, path, format=fmt)
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
def test_no_single_bit_flip_in_the_manifest_goes_unnoticed(tmp_path: Path, fmt: str) -> None:
    """Every one of the manifest's bits flipped in turn: each load raises CorruptCheckpoint
    naming the manifest, or returns exactly what was saved (a checksum leaves no such flip)."""
    target = tmp_path / "ck"
    expected = small_checkpoint(target, fmt)
    manifest_path = target / MANIFEST_NAME
    original = manifest_path.read_bytes()
    silent: list[tuple[int, str]] = []
    misreported: list[tuple[int, str]] = []
    # Flipped in place, one byte written and restored each time: rewriting the whole file
    # costs ten times the load on some file systems.
    fd = os.open(manifest_path, os.O_RDWR)
    try:
        for bit in range(len(original) * 8):
            at = bit // 8
            os.pwrite(fd, bytes([original[at] ^ (1 << (bit % 8))]), at)
            try:
                loaded = aiockpt.load(target)
            except CorruptCheckpoint as exc:
                if exc.path != str(manifest_path):
                    misreported.append((bit, f"{exc} (path {exc.path})"))
                continue
            except Exception as exc:  # anything else is a bug too: say which flip
                misreported.append((bit, repr(exc)))
                continue
            finally:
                os.pwrite(fd, original[at : at + 1], at)
            try:
                assert_same(loaded, expected)
            except AssertionError as exc:
                silent.append((bit, str(exc)))
    finally:
        os.close(fd)
    assert silent == [], f"{len(silent)} flips gave wrong data: {silent[:5]}"
    assert misreported == [], f"{len(misreported)} flips: {misreported[:5]}"


def _one_leaf(depth: int) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest.update(skeleton=f"<nested {depth}>", leaves=[{"type": "value", "value": 1}])

    return edit


def _leaf_of(manifest: dict[str, Any], kind: str) -> dict[str, Any]:
    leaf: dict[str, Any] = next(leaf for leaf in manifest["leaves"] if leaf["type"] == kind)
    return leaf


def _dict_node(manifest: dict[str, Any]) -> list[Any]:
    node: list[Any] = manifest["skeleton"]
    assert node[0] == "dict"
    return node


#: edits of a valid manifest, each sealed with a matching checksum: what an attacker (or a
#: buggy writer) could put there; every one must be refused as corrupt
MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "nested-5000-deep": _one_leaf(5000),
    "nested-past-max-depth": _one_leaf(MAX_DEPTH + 1),
    "corrupt-float": lambda m: _leaf_of(m, "float").update(value="1.0.01"),
    "corrupt-bigint": lambda m: _leaf_of(m, "bigint").update(value="12e3"),
    "world-size-without-ranks": lambda m: m.update(world_size=2),
    "world-size-zero": lambda m: m.update(world_size=0),
    "negative-format-version": lambda m: m.update(format_version=-1),
    "format-version-1": lambda m: m.update(format_version=1),
    "newer-format-version": lambda m: m.update(format_version=FORMAT_VERSION + 1),
    "negative-offset": lambda m: _leaf_of(m, "tensor").update(offset=-8),
    "tensor-past-end-of-file": lambda m: _leaf_of(m, "tensor").update(shape=[17, 16]),
    "huge-shape": lambda m: _leaf_of(m, "tensor").update(shape=[2**40, 2**40]),
    "negative-shape": lambda m: _leaf_of(m, "tensor").update(shape=[-16, -16]),
    "negative-strides": lambda m: _leaf_of(m, "tensor").update(strides=[-16, 1]),
    "strides-of-another-shape": lambda m: _leaf_of(m, "tensor").update(strides=[1]),
    "strided-past-end-of-file": lambda m: _leaf_of(m, "tensor").update(strides=[32, 1]),
    "unknown-dtype": lambda m: _leaf_of(m, "tensor").update(dtype="__class__"),
    "negative-file-size": lambda m: m["files"][0].update(size=-1),
    "file-listed-twice": lambda m: m["files"].append(m["files"][0]),
    "repeated-key": lambda m: _dict_node(m)[1].__setitem__(1, "w"),
    "leaf-twice": lambda m: _dict_node(m)[2].__setitem__(1, ["leaf", 0]),
    "leaf-out-of-range": lambda m: _dict_node(m)[2].__setitem__(1, ["leaf", 99]),
    "wrong-type": lambda m: m.update(files="model.safetensors"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_corrupt_even_with_a_valid_checksum(
    tmp_path: Path, case: str
) -> None:
    target = tmp_path / "ck"
    small_checkpoint(target)
    manifest_path = target / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    MALFORMED[case](manifest)
    manifest_path.write_bytes(sealed(manifest))
    for call in (aiockpt.load, reading.verify, reading.read_manifest):
        with pytest.raises(CorruptCheckpoint, match="unreadable manifest") as info:
            call(target)
        assert info.value.path == str(manifest_path)


def test_the_manifest_check_knows_the_size_of_every_torch_dtype() -> None:
    """Manifests are checked without torch (``manifest.dtype_itemsize``, a table of its
    own): it must name exactly torch's dtypes, each with torch's size, or a new torch's
    dtype would be refused (or sized wrong) by ``read_manifest`` and ``verify``."""
    assert {name: d.itemsize for name, d in _DTYPES.items()} == _DTYPE_ITEMSIZES
    assert dtype_itemsize("bfloat16") == 2 and dtype_itemsize("complex128") == 16
    with pytest.raises(ValueError, match="unknown dtype 'float'"):
        dtype_itemsize("float")  # an alias of float32: manifests name dtypes one way only


def test_a_manifest_of_format_version_2_or_3_loads(tmp_path: Path) -> None:
    """Version 3 only added strided tensor leaves: a checkpoint without them is written as
    version 2 (an older aiockpt still reads it), and reads the same as version 3."""
    target = tmp_path / "ck"
    expected = small_checkpoint(target)
    manifest_path = target / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    assert manifest["format_version"] == 2 < FORMAT_VERSION == 3
    assert torch.equal(aiockpt.load(target)["w"], expected["w"])
    manifest_path.write_bytes(sealed({**manifest, "format_version": 3}))
    assert reading.read_manifest(target).format_version == 3
    assert torch.equal(aiockpt.load(target)["w"], expected["w"])


def test_a_manifest_without_its_checksum_is_corrupt(tmp_path: Path) -> None:
    """What aiockpt wrote before format version 2 (plain JSON) is refused, not guessed at."""
    target = tmp_path / "ck"
    small_checkpoint(target)
    manifest_path = target / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    del manifest["manifest_sha256"]
    manifest_path.write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(CorruptCheckpoint, match="checksum") as info:
        aiockpt.load(target)
    assert info.value.path == str(manifest_path)


# --- opening files: never outside the checkpoint, never blocking -----------------------------


@pytest.mark.parametrize("link", ["directory", "file"])
def test_links_inside_a_checkpoint_are_never_followed(tmp_path: Path, link: str) -> None:
    """A manifest naming ``sub/model.safetensors`` where ``sub`` links to a directory outside
    (or the file itself is a link) is refused, even with checksums that match what the link
    points at: the checksum cannot tell, the way files are opened must."""
    target = tmp_path / "ck"
    expected = small_checkpoint(target)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(target / "model.safetensors", outside / "model.safetensors")
    manifest_path = target / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    if link == "directory":
        os.symlink(outside, target / "sub")
        manifest["files"][0]["name"] = "sub/model.safetensors"
        _leaf_of(manifest, "tensor")["file"] = "sub/model.safetensors"
        manifest_path.write_bytes(sealed(manifest))
        linked = target / "sub" / "model.safetensors"
    else:
        linked = target / "model.safetensors"
        os.symlink(outside / "model.safetensors", linked)
    for call in (reading.verify, aiockpt.load, lambda p: aiockpt.load(p, verify=False)):
        with pytest.raises(CorruptCheckpoint, match="symbolic link") as info:
            call(target)
        assert info.value.path == str(linked)
    # The same layout with a real directory (a custom writer may use one) loads.
    os.unlink(linked if link == "file" else target / "sub")
    os.rename(outside, linked.parent if link == "directory" else outside)
    if link == "file":
        os.rename(outside / "model.safetensors", linked)
    assert_same(aiockpt.load(target), expected)


def outcome_unless_blocked(call: Callable[[Path], Any], target: Path, fifo: Path) -> Any:
    """What ``call(target)`` raises or returns, run in a thread. If it is still blocked (on
    ``fifo``) after 30 s, open the FIFO's other end, which releases a reader waiting in
    ``open``, and fail: the test stays bounded even when the code under test is broken."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call(target))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail(f"{call.__name__} blocked on the FIFO {fifo}")
    return outcome[0]


@pytest.mark.parametrize("which", ["model.safetensors", MANIFEST_NAME])
def test_a_fifo_in_a_checkpoint_is_refused_without_blocking(tmp_path: Path, which: str) -> None:
    target = tmp_path / "ck"
    small_checkpoint(target)
    fifo = target / which
    fifo.unlink()
    os.mkfifo(fifo)
    for call in (aiockpt.load, reading.verify):
        error = outcome_unless_blocked(call, target, fifo)
        assert isinstance(error, CorruptCheckpoint), repr(error)
        assert "not a regular file" in str(error) and error.path == str(fifo)


def test_a_manifest_linked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    """Read without a bound, /dev/zero fills memory until MemoryError."""
    target = tmp_path / "ck"
    small_checkpoint(target)
    manifest_path = target / MANIFEST_NAME
    manifest_path.unlink()
    os.symlink("/dev/zero", manifest_path)
    for call in (aiockpt.load, reading.verify):
        with pytest.raises(CorruptCheckpoint, match="symbolic link") as info:
            call(target)
        assert info.value.path == str(manifest_path)


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path) -> None:
    target = tmp_path / "ck"
    small_checkpoint(target)
    manifest_path = target / MANIFEST_NAME
    with open(manifest_path, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(CorruptCheckpoint, match="more than any aiockpt writes") as info:
        aiockpt.load(target)
    assert info.value.path == str(manifest_path)


@pytest.mark.parametrize("verify", [True, False])
def test_file_sizes_are_checked_before_anything_is_read_or_allocated(
    tmp_path: Path, verify: bool
) -> None:
    """A truncated data file, and a manifest claiming a 4 PiB tensor in a file it claims is
    that large (consistent, and sealed): both refused by the data file's real size, naming it,
    before a buffer for the tensor exists."""
    target = tmp_path / "ck"
    small_checkpoint(target)
    data = target / "model.safetensors"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(CorruptCheckpoint, match="truncated") as info:
        aiockpt.load(target, verify=verify)
    assert info.value.path == str(data)

    small_checkpoint(tmp_path / "huge")
    manifest_path = tmp_path / "huge" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    tensor = _leaf_of(manifest, "tensor")
    tensor["shape"] = [2**25, 2**25]
    manifest["files"][0]["size"] = tensor["offset"] + 4 * 2**50
    manifest_path.write_bytes(sealed(manifest))
    with pytest.raises(CorruptCheckpoint, match="truncated") as info:
        aiockpt.load(tmp_path / "huge", verify=verify)
    assert info.value.path == str(tmp_path / "huge" / "model.safetensors")


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
    """The modules that read checkpoints from disk (all of ``_format``) unpickle only in the
    functions ``load`` reaches after checking ``allow_pickle`` (its behaviour is what the tests
    above check): aiockpt's leaf reader, and torch's DCP reader for a torch-written checkpoint,
    which unpickles ``.metadata``. Each of those is called from nowhere else."""
    allowed = {("loading.py", "_read_leaves"), ("torch_written.py", "load_torch_written")}
    unpickling_calls = ("pickle.load", "torch.load", "dcp_load", "_load_state_dict")
    found, callers = set(), set()
    for source in sorted((PACKAGE / "_format").glob("*.py")):
        tree = ast.parse(source.read_text())
        for call, function in _calls(tree):
            callee = ast.unparse(call.func)
            if callee.startswith(unpickling_calls) or "Unpickler" in callee:
                found.add((source.name, function))
            readers = ("_read_leaves", "load_torch_written")
            if any(isinstance(n, ast.Name) and n.id in readers for n in ast.walk(call)):
                callers.add((source.name, function))
    assert found <= allowed, f"unpickling outside the allow_pickle check: {found - allowed}"
    assert found, "the scan found no reader at all: it no longer looks at the loading code"
    assert callers == {("loading.py", "load"), ("loading.py", "_load")}, callers


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
    monkeypatch.setattr(
        aiockpt._trainer.checkpoint_process, "SharedArena", RecordingArena
    )  # a bigger arena
    RecordingArena.modes = []
    big = {"w": torch.zeros(16 << 20)}  # 64 MiB: larger than any arena of this module so far
    target = tmp_path / "ck"
    gate = WriteGateFiles(tmp_path)
    try:
        handle = checkpointer.save_to({**big, "gate": gate.entry}, target, format=GATED)
        wait_for(f"{gate.entry}.started")  # held with its temporary directory made
        temp_modes = [
            stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            for entry in os.scandir(tmp_path)
            if entry.name.startswith(commit.TEMP_PREFIX)
        ]
        Path(f"{gate.entry}.go").touch()
        handle.result(timeout=120)
    finally:
        gate.remove()
    assert RecordingArena.modes == [0o600]
    assert arena_names(os.getpid()) == []  # arenas have no name in /dev/shm
    assert temp_modes == [0o700]
    for directory, _, files in os.walk(target):
        assert stat.S_IMODE(os.stat(directory).st_mode) & 0o077 == 0, directory
        for file in files:
            assert stat.S_IMODE(os.stat(Path(directory, file)).st_mode) & 0o077 == 0, file


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
