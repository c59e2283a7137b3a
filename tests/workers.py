"""Init functions and writers that the worker imports by reference in tests."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aiockpt._format.tree import flatten, format_key_path
from aiockpt._wire.protocol import RankInfo
from tests.writer_fixtures import hold_at_gate


def init_writes_marker(path: str, text: str) -> None:
    Path(path).write_text(f"{text} pid={os.getpid()}")


def init_raises(message: str) -> None:
    raise RuntimeError(message)


def init_hangs(seconds: float) -> None:
    time.sleep(seconds)


def init_ignores_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class RawWriter:
    """Writes each tensor's raw bytes to ``<path>/<n>.bin`` and an index as JSON.

    A deliberately simple format, independent of aiockpt's writers, so that tests of the
    process machinery read back exactly what crossed the boundary.
    """

    def __init__(
        self,
        rank_info: RankInfo,
        delay: float = 0.0,
        fail_on: str | None = None,
        gate: str | None = None,
    ):
        self.rank_info = rank_info
        self.delay = delay
        self.fail_on = fail_on
        #: ``writer_fixtures.WriteGateFiles.entry``: each write creates ``<gate>.started``,
        #: then waits (at most a minute) for ``<gate>.go``
        self.gate = gate

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> dict[str, Any]:
        if self.fail_on is not None and self.fail_on in path:
            raise OSError(f"injected failure writing {path}")
        if self.gate is not None:
            hold_at_gate(f"{self.gate}.started", f"{self.gate}.go")
        time.sleep(kwargs.get("delay", self.delay))
        os.makedirs(path, exist_ok=True)
        _, leaves = flatten(state_dict, lambda v: isinstance(v, torch.Tensor))
        index: dict[str, Any] = {"rank": self.rank_info.global_rank, "kwargs": kwargs}
        for n, (key_path, value) in enumerate(leaves):
            name = format_key_path(key_path)
            if isinstance(value, torch.Tensor):
                with open(os.path.join(path, f"{n}.bin"), "wb") as f:
                    f.write(value.reshape(-1).view(torch.uint8).numpy().tobytes())
                index[name] = {
                    "file": f"{n}.bin",
                    "dtype": str(value.dtype),
                    "shape": list(value.shape),
                }
            else:
                index[name] = {"value": value if not isinstance(value, bytes) else value.hex()}
        with open(os.path.join(path, "index.json"), "w") as f:
            json.dump(index, f)
        return {"entries": len(leaves), "pid": os.getpid()}


def read_raw(path: str) -> dict[str, Any]:
    """Read what ``RawWriter`` wrote: ``{key: tensor or value}``."""
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    out: dict[str, Any] = {}
    for name, entry in index.items():
        if name in ("rank", "kwargs"):
            out[name] = entry
        elif "file" in entry:
            dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
            data = bytearray(Path(path, entry["file"]).read_bytes())
            flat = (
                torch.frombuffer(data, dtype=torch.uint8)
                if data
                else torch.empty(0, dtype=torch.uint8)
            )
            out[name] = flat.view(dtype).reshape(entry["shape"])
        else:
            out[name] = entry["value"]
    return out


class GcReportingWriter:
    """Reports the worker's garbage-collector state as seen during each write."""

    def __init__(self, rank_info: RankInfo):
        self.rank_info = rank_info

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> dict[str, Any]:
        return {
            "enabled": gc.isenabled(),
            "frozen": gc.get_freeze_count(),
            "tracked": len(gc.get_objects()),
        }


class FailingWriter:
    """Raises from write(): the worker must report it and keep serving."""

    def __init__(self, rank_info: RankInfo, **options: Any) -> None:
        pass

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device (injected)")


class DiesAfterCommitWriter(RawWriter):
    """A RawWriter whose worker is SIGKILLed right after its checkpoint is renamed into place,
    before it can answer: the commit is durable-to-be (the parent's fsync is next) and the
    trainer sees only a dead worker. Timed by an audit hook on that fsync's ``open`` of the
    parent directory, so the kill lands at that point every time, not by luck."""

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> dict[str, Any]:
        result = super().write(state_dict, path, **kwargs)
        # ``path`` is the temporary directory; its parent is the root the rename publishes in.
        root = os.path.dirname(path)

        def kill_on_parent_fsync(event: str, args: tuple[Any, ...]) -> None:
            if event == "open" and args[0] == root:
                os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(kill_on_parent_fsync)  # installed in the worker only: write runs there
        return result
