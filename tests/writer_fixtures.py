"""State dicts, comparisons and small custom writers shared by the writer/commit/load tests."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from aiockpt._trainer.checkpoint_process import CheckpointProcess
from aiockpt.writers.base import FileRecord, tensor_bytes

#: every dtype the contract names, plus the newer ones torch.save handles
DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def random_tensor(dtype: torch.dtype, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Random bits of ``dtype`` (every bit pattern, NaNs included: comparisons are bitwise)."""
    generator = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw = raw % 2  # other bytes are not valid bools
    return raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)


def full_state_dict() -> dict[str, Any]:
    """Every dtype, 0-d and empty tensors, nesting, int keys, tuples and plain leaves."""
    return {
        "model": {
            f"w_{str(d).removeprefix('torch.')}": random_tensor(d, (3, 5), i)
            for i, d in enumerate(DTYPES)
        },
        "scalar": random_tensor(torch.float32, (), 99),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(12.0), "exp_avg": random_tensor(torch.float32, (7,), 5)},
                1: {"step": torch.tensor(12.0), "exp_avg": random_tensor(torch.float32, (2, 2), 6)},
            },
            "param_groups": [
                {"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "fused": None, "name": "g"}
            ],
        },
        "list_of_tensors": [
            random_tensor(torch.int64, (4,), 7),
            random_tensor(torch.int8, (1,), 8),
        ],
        "step": 1234,
        "big": 2**70,
        "neg_zero": -0.0,
        "nan": float("nan"),
        "inf": float("-inf"),
        "flag": True,
        "blob": b"\x00\xffbytes",
        "text": "héllo",
    }


def like(tree: Any) -> Any:
    """A tree of the same structure with zeroed tensors and dummy plain leaves (a load target)."""
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {k: like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [like(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(like(v) for v in tree)
    return None


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Structure, types, dtypes, shapes and bits all equal (NaN equals NaN bitwise)."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{path}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: {actual.shape} != {expected.shape}"
        assert actual.device.type == "cpu"
        assert bytes(tensor_bytes(actual.contiguous())) == bytes(
            tensor_bytes(expected.contiguous())
        ), f"{path}: bytes differ"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert type(key) is type(next(k for k in actual if k == key)), f"{path}.{key}"
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}.{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), path
    elif isinstance(expected, float):
        assert math.copysign(1, actual) == math.copysign(1, expected) and actual == expected, path
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


class NoneReturningWriter:
    """A custom writer in the torch style: writes files (one in a subdirectory), returns None."""

    def __init__(self, rank_info: Any = None, **options: Any) -> None:
        self.options = options

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> None:
        with open(os.path.join(path, "weights.bin"), "wb") as f:
            for value in state_dict.values():
                if isinstance(value, torch.Tensor):
                    f.write(tensor_bytes(value.contiguous()))
        os.mkdir(os.path.join(path, "extra"))
        with open(os.path.join(path, "extra", "notes.txt"), "w") as f:
            f.write("custom")


class FailingWriter:
    """Writes half a file, then raises."""

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Sequence[FileRecord] | None:
        with open(os.path.join(path, "partial.bin"), "wb") as f:
            f.write(b"x" * 1000)
        raise RuntimeError("disk on fire")


#: import reference of ``GatedDcpWriter``, for ``format=``
GATED = "tests.writer_fixtures:GatedDcpWriter"


class GatedDcpWriter:
    """The DCP writer, held at a gate: given a ``"gate"`` entry (a path), it creates
    ``<gate>.started`` once its temporary directory exists and writes only once
    ``<gate>.go`` appears (at most a minute later), so a test acts while a save is in
    flight without guessing how long that lasts."""

    def __init__(self, rank_info: Any, **options: Any) -> None:
        from aiockpt.writers.dcp import DcpWriter

        self._inner = DcpWriter(rank_info=rank_info, **options)

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Any:
        gate = state_dict.get("gate")
        if gate is not None:
            hold_at_gate(f"{gate}.started", f"{gate}.go")
        return self._inner.write(state_dict=state_dict, path=path, **kwargs)


def hold_at_gate(started: str, go: str) -> None:
    """In a writer: say so through the file ``started``, then wait until the file ``go``
    appears. Raises TimeoutError after a minute (a test that never lets go)."""
    Path(started).touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.002)


def wait_for(path: str | os.PathLike[str]) -> None:
    """Until a worker signals through the file ``path`` (bounded: a minute)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


class WriteGateFiles:
    """The gate files of one ``GatedDcpWriter`` save, next to (not in) a test's directory:
    put ``entry`` in the state dict as ``"gate"``, await ``started()``, then ``open()``."""

    def __init__(self, tmp_path: Path) -> None:
        self.entry = str(tmp_path.parent / f"{tmp_path.name}-gate")

    async def started(self) -> None:
        """Until the writer holds the save in its temporary directory."""
        await asyncio.to_thread(wait_for, f"{self.entry}.started")

    async def open(self) -> None:
        """Let the held write go on."""
        await asyncio.to_thread(Path(f"{self.entry}.go").touch)

    def remove(self) -> None:
        for suffix in (".started", ".go"):
            Path(f"{self.entry}{suffix}").unlink(missing_ok=True)

    @classmethod
    def around(cls, tmp_path: Path) -> Iterator[WriteGateFiles]:
        """A fixture body: the gate, and its files removed afterwards."""
        gate = cls(tmp_path)
        try:
            yield gate
        finally:
            gate.remove()


class HalfGatedWriter:
    """Writes each tensor of a dict into a file of its own, and, given a ``"gate"`` entry (a
    path), stops after the first file: it creates ``<gate>.half`` and writes the rest only
    once ``<gate>.go`` appears (at most a minute later), so a test sees a save halfway."""

    def __init__(self, rank_info: Any = None, **options: Any) -> None:
        pass

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> list[FileRecord]:
        from aiockpt.writers.base import FileSink

        gate = state_dict.get("gate")
        records = []
        tensors = [(k, v) for k, v in state_dict.items() if isinstance(v, torch.Tensor)]
        for number, (name, tensor) in enumerate(tensors):
            if number == 1 and gate is not None:
                with open(f"{gate}.half", "w"):
                    pass
                wait_for(f"{gate}.go")
            with FileSink(path, f"{name}.bin") as sink:
                sink.write_tensor(tensor)
                records.append(sink.close())
        return records


class StagingWatchWriter:
    """The DCP writer (``inner="safetensors"``: the safetensors one), writing while the
    trainer stages (``WRITES_WHILE_STAGING``), that says so: given a ``"gate"`` entry (a
    path), it creates ``<gate>.writing`` when its first wait for staged bytes returns, i.e.
    once it writes a region the trainer has staged."""

    WRITES_WHILE_STAGING = True

    def __init__(self, rank_info: Any, inner: str = "dcp", **options: Any) -> None:
        from aiockpt.writers import resolve_writer

        self._inner = resolve_writer(inner)(rank_info=rank_info, **options)

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Any:
        gate, wait = state_dict.get("gate"), getattr(state_dict, "wait_staged", None)
        if gate is not None and wait is not None:

            def wait_and_say(end: int | None) -> float:
                staged = wait(end)
                Path(f"{gate}.writing").touch()
                return staged

            state_dict.wait_staged = wait_and_say
        return self._inner.write(state_dict=state_dict, path=path, **kwargs)


class HeldStaging:
    """Wraps ``CheckpointProcess.report_staged`` (the real one runs): after the first chunk
    is reported, staging goes on only once ``release`` is set (or, with ``until_file``,
    that file exists), so a test acts while a save is half staged."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, until_file: str | None = None) -> None:
        self.reports: list[tuple[int, bool]] = []
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        real = CheckpointProcess.report_staged

        async def report_staged(
            process: CheckpointProcess, write_id: int, nbytes: int, *, complete: bool
        ) -> None:
            await real(process, write_id, nbytes, complete=complete)
            self.reports.append((nbytes, complete))
            if len(self.reports) == 1:
                self.held.set()
                if until_file is not None:
                    await asyncio.to_thread(wait_for, until_file)
                else:
                    await asyncio.wait_for(self.release.wait(), 60)

        monkeypatch.setattr(CheckpointProcess, "report_staged", report_staged)
