"""``aiockpt``, the command line for checkpoints on disk (read-only but for ``convert``'s OUT).

::

    aiockpt ls ROOT                    committed checkpoints: step, size, age, format, ranks
    aiockpt verify PATH                every file against its checksum; exit 0 or 1
    aiockpt inspect PATH               keys, dtypes, shapes, sharding
    aiockpt convert PATH OUT --to safetensors|torch
                                       one consolidated checkpoint, from any world size

Everything read goes through the reader's checks (``aiockpt._format.reading``): the manifest
must match its own checksum, files are opened without following links. Only ``convert``
imports torch (to load tensors); ``ls``, ``verify`` and ``inspect`` read manifests and bytes
without it, so they start in a fraction of the time. Exit status: 0 for
success, 1 when a checkpoint is corrupt, missing or cannot be converted (the reason on
stderr), 2 for a command line click refuses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import click

from aiockpt._format import commit
from aiockpt._format.manifest import (
    MANIFEST_NAME,
    Leaf,
    Manifest,
    ObjectLeaf,
    OpaqueLeaf,
    TensorLeaf,
    plain_value,
)
from aiockpt._format.reading import read_manifest, verify
from aiockpt._format.tree import format_key_path, iter_key_paths
from aiockpt.errors import CorruptCheckpoint

__all__ = ["main"]

#: ``Checkpointer.save``'s names (``step_0000000100``); kept in step with the checkpointer's
#: STEP_NAME_PATTERN without importing the trainer side
_STEP_PREFIX = "step_"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aiockpt")
def main() -> None:
    """Inspect, verify and convert aiockpt checkpoints."""


@contextlib.contextmanager
def _failures_exit_1() -> Iterator[None]:
    """What is wrong with a checkpoint is the user's answer, not a traceback: the message on
    stderr, exit status 1."""
    try:
        yield
    except (CorruptCheckpoint, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        click.echo(f"aiockpt: {exc}", err=True)
        sys.exit(1)


# --- ls ---------------------------------------------------------------------------------------


@main.command("ls")
@click.argument("root", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per checkpoint.")
def list_command(root: str, as_json: bool) -> None:
    """The committed checkpoints under ROOT, oldest name first.

    A directory without a manifest (a save in progress or one that crashed) is never listed.
    """
    now = time.time()
    rows = [_describe(path, now) for path in commit.list_committed(root)]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo(f"no committed checkpoints under {root}", err=True)
        return
    table = [
        [
            row["name"],
            "-" if row["step"] is None else str(row["step"]),
            _human_bytes(row["bytes"]),
            _human_age(row["age_s"]),
            row["format"],
            str(row["world_size"]),
        ]
        for row in rows
    ]
    _echo_table(["NAME", "STEP", "SIZE", "AGE", "FORMAT", "RANKS"], table)


def _describe(path: str, now: float) -> dict[str, Any]:
    name = os.path.basename(path)
    step = None
    if name.startswith(_STEP_PREFIX) and name[len(_STEP_PREFIX) :].isdigit():
        step = int(name[len(_STEP_PREFIX) :])
    row: dict[str, Any] = {"name": name, "path": path, "step": step}
    try:
        manifest_info = os.lstat(os.path.join(path, MANIFEST_NAME))
        manifest = read_manifest(path)
    except (CorruptCheckpoint, OSError) as exc:
        return {**row, "bytes": 0, "age_s": None, "format": "unreadable", "world_size": 0,
                "error": str(exc)}  # fmt: skip
    return {
        **row,
        "bytes": sum(f.size for f in manifest.files) + manifest_info.st_size,
        "age_s": max(0.0, now - manifest_info.st_mtime),
        "format": manifest.format,
        "world_size": manifest.world_size,
    }


def _human_bytes(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


# --- verify -----------------------------------------------------------------------------------


@main.command("verify")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--quiet", "-q", is_flag=True, help="No output; the exit status says it all.")
def verify_command(path: str, quiet: bool) -> None:
    """Check every file of the checkpoint at PATH against its manifest's size and xxh3_64
    checksum. Exit status 0 if all match, 1 otherwise (naming the first bad file).

    Draws a progress bar on stderr when stderr is a terminal.
    """
    from tqdm import tqdm

    with _failures_exit_1():
        manifest = read_manifest(path)
        total = sum(f.size for f in manifest.files)
        # disable=None: tqdm draws only on a terminal, so logs and pipes stay clean.
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="verify",
            disable=True if quiet else None,
            file=sys.stderr,
            leave=False,
        ) as bar:
            verify(path, progress=bar.update)
    if not quiet:
        click.echo(f"ok: {len(manifest.files)} files, {_human_bytes(total)} match their checksums")


# --- inspect ----------------------------------------------------------------------------------


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per leaf.")
def inspect_command(path: str, as_json: bool) -> None:
    """The keys of the checkpoint at PATH: dtype, shape and sharding of every tensor, the
    value of every plain leaf. Reads the manifest only (checked, not the data files)."""
    with _failures_exit_1():
        manifest = read_manifest(path)
    rows = list(_leaf_rows(manifest))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    files = len(manifest.files)
    size = _human_bytes(sum(f.size for f in manifest.files))
    click.echo(
        f"{path}: format {manifest.format}, {manifest.world_size} rank(s), {files} file(s), {size}"
    )
    if manifest.metadata:
        click.echo(f"metadata: {json.dumps(manifest.metadata)}")
    table = [
        [row["key"], row["kind"], row.get("dtype", ""), _shape(row), _sharding(row)] for row in rows
    ]
    _echo_table(["KEY", "KIND", "DTYPE", "SHAPE", "SHARDING"], table)


def _leaf_rows(manifest: Manifest) -> Iterator[dict[str, Any]]:
    """One row per key: rank 0's leaves, then keys only other ranks saved; a sharded tensor
    once, with its whole shape and the pieces every rank saved."""
    states = [manifest.rank_state(rank) for rank in range(manifest.world_size)]
    pieces: dict[str, list[TensorLeaf]] = {}
    first: dict[str, tuple[int, Leaf]] = {}
    for rank, state in enumerate(states):
        for index, key_path in iter_key_paths(state.skeleton):
            key = format_key_path(key_path)
            leaf = state.leaves[index]
            first.setdefault(key, (rank, leaf))
            if isinstance(leaf, TensorLeaf) and leaf.global_shape is not None:
                pieces.setdefault(key, []).append(leaf)
    for key, (rank, leaf) in first.items():
        row: dict[str, Any] = {"key": key}
        if rank:
            row["rank"] = rank
        if isinstance(leaf, TensorLeaf):
            row.update(kind="tensor", dtype=leaf.dtype, shape=leaf.shape)
            if leaf.global_shape is not None:
                offsets = {tuple(p.global_offset or []): p.shape for p in pieces[key]}
                row.update(
                    shape=leaf.global_shape,
                    pieces=[
                        {"offset": list(offset), "shape": shape}
                        for offset, shape in sorted(offsets.items())
                    ],
                )
        elif isinstance(leaf, ObjectLeaf):
            row.update(kind="pickle", nbytes=leaf.nbytes)
        elif isinstance(leaf, OpaqueLeaf):
            row.update(kind="opaque", type=leaf.kind)
        else:
            value = plain_value(leaf)
            row.update(kind="value", value=value if not isinstance(value, bytes) else repr(value))
            if isinstance(value, float) and not math.isfinite(value):
                row["value"] = repr(value)
        yield row


def _shape(row: dict[str, Any]) -> str:
    if row["kind"] == "value":
        return repr(row["value"]) if isinstance(row["value"], str) else str(row["value"])
    if row["kind"] == "pickle":
        return f"{row['nbytes']} bytes"
    return str(row.get("shape", ""))


def _sharding(row: dict[str, Any]) -> str:
    parts = row.get("pieces")
    if parts is None:
        return "" if row["kind"] != "tensor" else "whole"
    if len(parts) == 1 and parts[0]["shape"] == row["shape"]:
        return "whole (every rank)"
    return f"{len(parts)} pieces: " + ", ".join(f"{p['shape']}@{p['offset']}" for p in parts)


# --- convert ----------------------------------------------------------------------------------


@main.command("convert")
@click.argument("path", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option(
    "--to",
    "target",
    type=click.Choice(["safetensors", "torch"]),
    required=True,
    help="safetensors: a committed checkpoint directory in Hugging Face's layout; "
    "torch: one torch.save file, as dcp_to_torch_save writes.",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="safetensors only: the most bytes of tensors per file ('500MB', '2GiB', ...).",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Unpickle leaves saved as pickled objects (only for checkpoints you trust).",
)
@click.option("--no-verify", is_flag=True, help="Do not check the files' checksums.")
def convert_command(
    path: str, out: str, target: str, max_shard_size: str, allow_pickle: bool, no_verify: bool
) -> None:
    """Write the checkpoint at PATH, consolidated, to OUT: sharded tensors whole, whatever
    the world size that saved it (the loader reshards it to one rank). OUT must not exist.

    Both formats keep the tree of the checkpoint: nested keys become dotted tensor names in
    safetensors (plain values stay in its manifest); torch keeps it as it was.
    """
    if os.path.lexists(out):
        click.echo(f"aiockpt: {out} exists; not overwriting it", err=True)
        sys.exit(1)
    from aiockpt._format.loading import load

    with _failures_exit_1():
        state = load(path, verify=not no_verify, allow_pickle=allow_pickle)
        if target == "safetensors":
            from aiockpt.writers.safetensors import SafetensorsWriter

            writer = SafetensorsWriter(max_shard_size=max_shard_size)
            result = commit.write_checkpoint(writer, state, out, format="safetensors")
            size = result.nbytes
        else:
            size = _torch_save_durably(state, out)
    click.echo(f"wrote {out} ({target}, {_human_bytes(size)})")


def _torch_save_durably(state: Any, out: str) -> int:
    """``torch.save`` into a temporary sibling, fsync, rename into place, fsync the parent:
    OUT never holds half a file."""
    import torch

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".aiockpt-convert-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.rename(temp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    commit._fsync_dir(parent)
    return size


if __name__ == "__main__":
    main()
