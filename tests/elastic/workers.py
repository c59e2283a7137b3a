"""Worker functions for the agent tests: module-level, so a worker process can import them.

They import nothing heavy (no torch unless a test needs a process group), to keep start-up short.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

#: every variable torchrun sets for a worker, plus the ones it passes through
TORCHRUN_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_ERROR_FILE",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


def rank() -> int:
    return int(os.environ["RANK"])


def echo(value: Any) -> tuple[int, Any]:
    return rank(), value


def env_and_args(*args: Any) -> dict[str, Any]:
    env: dict[str, Any] = {name: os.environ.get(name) for name in TORCHRUN_ENV}
    env["args"] = args
    return env


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def exit_with(code: int) -> None:
    sys.exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def print_lines(count: int) -> None:
    # One write per line: with unbuffered output print() writes the text and the newline
    # separately, and two ranks sharing the console could interleave between the two.
    for i in range(count):
        sys.stdout.write(f"out {i} of rank {rank()}\n")
        sys.stdout.flush()
        sys.stderr.write(f"err {i} of rank {rank()}\n")
        sys.stderr.flush()


def fail_on_first_attempt(failing_rank: int) -> int:
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if restart == 0 and rank() == failing_rank:
        raise RuntimeError(f"rank {failing_rank} fails on attempt 0")
    return restart


def always_fail() -> None:
    raise RuntimeError(f"rank {rank()} always fails")


def sleep_then_finish(seconds_by_group_rank: dict[int, float]) -> float:
    """Sleep as long as this node is told to; return the wall-clock time of finishing."""
    time.sleep(seconds_by_group_rank.get(int(os.environ["GROUP_RANK"]), 0.0))
    return time.time()


def write_pid_then_sleep(directory: str) -> None:
    """Announce this worker's pid in ``directory``, then sleep until killed."""
    path = os.path.join(directory, f"{os.environ['LOCAL_RANK']}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(120)


def all_reduce_ranks() -> float:
    """Join the job's gloo group through the agent's store and sum every rank."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        total = torch.tensor([float(rank())])
        dist.all_reduce(total)
        return float(total.item())
    finally:
        dist.destroy_process_group()
