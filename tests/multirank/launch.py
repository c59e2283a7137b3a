"""Start N trainer ranks of ``tests.multirank.rank_main`` around a real TCPStore."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]


def run_ranks(
    scenario: str,
    world_size: int,
    results: Path,
    *,
    loop: str = "asyncio",
    extra: list[str] | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 150,
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` ranks; return each rank's observations.

    The trainers meet in a TCPStore this process serves on 127.0.0.1 (torch's env://
    MASTER_ADDR/MASTER_PORT point at it, for the prefix-store mode). ``env`` entries set to
    None are removed from the ranks' environment. Fails with the ranks' output when any rank
    exits non-zero or runs past ``timeout`` (every rank is killed then).
    """
    results.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    child_env = dict(os.environ)
    child_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), child_env.get("PYTHONPATH")])
    )
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.multirank.rank_main",
                scenario,
                str(rank),
                str(world_size),
                str(store.port),
                str(results),
                loop,
                *(extra or []),
            ],
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for rank in range(world_size)
    ]
    outputs: list[str] = []
    try:
        for process in ranks:
            output, _ = process.communicate(timeout=timeout)
            outputs.append(output)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [r for r, process in enumerate(ranks) if process.returncode != 0]
    if failed:
        logs = "\n".join(f"--- rank {r} ---\n{out[-4000:]}" for r, out in enumerate(outputs))
        raise AssertionError(f"ranks {failed} failed:\n{logs}")
    return [json.loads((results / f"result-{r}.json").read_text()) for r in range(world_size)]


def run_scenarios(
    scenarios: Sequence[tuple[str, str | None]],
    world_size: int,
    results: Path,
    *,
    loop: str = "asyncio",
) -> dict[str, list[dict[str, Any]]]:
    """Run several ``(scenario, path to load or None)`` one after the other in one launch of
    ``world_size`` ranks (see ``rank_main``'s ``many``); return each scenario's observations
    by rank. One launch instead of one per scenario: every rank pays its imports and its
    process group once."""
    by_rank = run_ranks("many", world_size, results, loop=loop, extra=[json.dumps(scenarios)])
    return {name: [observed[name] for observed in by_rank] for name, _ in scenarios}


def run_job(command: list[str], *, timeout: float) -> str:
    """Run a launcher ``command`` (torchrun, aiockpt-run) from the project root with the
    project importable; return its output. Bounded: past ``timeout`` its whole process group
    is killed and this fails with the output, as it does for a non-zero exit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    job = subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        raise AssertionError(f"the job hung:\n{output[-6000:]}") from None
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, output[-6000:]
    return output
