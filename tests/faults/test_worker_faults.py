"""Fault injection: the checkpoint worker, or the trainer itself, is SIGKILLed mid-save.

The promise under test (issue 7): whatever fails, the previous committed checkpoint is intact
and loadable, every failure surfaces as a clear error, nothing is left running or mapped.

The short variants run in the default ``pytest`` run; the long ones (``slow``) only with
``AIOCKPT_LONG=1`` (``slow`` is not excluded by the default options, so the environment
variable is what keeps them out). ``AIOCKPT_FAULT_SEED`` replays a run's kill schedule; every
run prints its seed. Bounds such as "within 1 s" are generous correctness bounds (a failure
that takes longer is a failure nobody noticed), never performance targets.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt
from aiockpt import Checkpointer, WorkerCrashed
from aiockpt._format import commit, loading, reading
from aiockpt._format.manifest import MANIFEST_NAME
from aiockpt._format.root_lock import LOCK_NAME
from aiockpt._trainer.checkpoint_process import CheckpointProcess
from aiockpt._trainer.handles import SaveHandle
from tests.faults import (
    TRICKLING,
    arena_names,
    mapped_arenas,
    open_fds,
    process_gone,
    wait_gone,
)
from tests.writer_fixtures import GATED, WriteGateFiles, wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
LONG = os.environ.get("AIOCKPT_LONG") == "1"
LONG_ONLY = [
    pytest.mark.slow,
    pytest.mark.skipif(not LONG, reason="long variant: set AIOCKPT_LONG=1"),
]
#: a killed save must fail within this long of the SIGKILL (the issue's target is 100 ms)
FAILURE_BOUND_S = 1.0
#: anything awaited here that takes longer than this is hung
HANG_S = 60.0


def seed_for(label: str) -> int:
    seed = int(os.environ.get("AIOCKPT_FAULT_SEED", random.randrange(2**32)))
    print(f"{label}: AIOCKPT_FAULT_SEED={seed}")
    return seed


def variants(short: int, long: int) -> list[Any]:
    return [
        pytest.param(short, id=f"short{short}"),
        pytest.param(long, id=f"long{long}", marks=LONG_ONLY),
    ]


def state_for(step: int) -> dict[str, Any]:
    """A state dict that can be recomputed from its step alone, to check what loads back."""
    generator = torch.Generator().manual_seed(step)
    return {
        "model": {f"w{i}": torch.randn(256, 1024, generator=generator) for i in range(4)},
        "step": step,
    }


def step_of(path: str) -> int:
    return int(os.path.basename(path).removeprefix("step_"))


def assert_loads_as_saved(path: str) -> None:
    reading.verify(path)
    loaded = loading.load(path)
    expected = state_for(step_of(path))
    assert loaded["step"] == expected["step"]
    assert loaded["model"].keys() == expected["model"].keys()
    for key, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][key], tensor), f"{path}: {key} differs"


def check_root(root: Path, killed_steps: set[int], keep_last: int) -> list[str]:
    """Every committed checkpoint verifies and loads what was saved; nothing else is there but
    the temporary directories of killed saves. Returns the committed paths."""
    committed = commit.list_committed(root)
    assert len(committed) <= keep_last, committed
    for path in committed:
        assert_loads_as_saved(path)
    for entry in checkpoint_entries(root):
        full = str(root / entry)
        if full in committed:
            continue
        assert entry.startswith(commit.TEMP_PREFIX), f"unexpected {entry!r} under the root"
        step = int(entry.removeprefix(commit.TEMP_PREFIX).split("-")[0].removeprefix("step_"))
        assert step in killed_steps, f"{entry!r} is left by a save that was not killed"
    return committed


def checkpoint_entries(root: Path) -> list[str]:
    """What saves put under ``root``: everything but the writer lock."""
    return [e for e in os.listdir(root) if e != LOCK_NAME]


def manifestless(latest: str | None) -> bool:
    """Whether ``latest`` names a directory that exists without a manifest. Retention may
    delete what ``latest()`` named, but atomically (renamed aside first): so a path without
    its manifest must be gone by the time we look again."""
    if latest is None or os.path.isfile(os.path.join(latest, MANIFEST_NAME)):
        return False
    return os.path.lexists(latest)


async def watch_latest(ckpt: Checkpointer, violations: list[str]) -> None:
    """Poll ``latest()`` for the whole test; it must never name a manifestless directory."""
    while True:
        latest = await ckpt.latest()
        if await asyncio.to_thread(manifestless, latest):
            violations.append(str(latest))
        await asyncio.sleep(0.005)


class KillReport:
    """What the kills did, printed at the end (run with -s to see it)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()

    def print(self, label: str) -> None:
        print(f"{label}: outcomes {dict(self.outcomes)}")
        if self.latencies:
            ms = sorted(x * 1000 for x in self.latencies)
            print(
                f"{label}: kill -> failure ms over {len(ms)} kills: min {ms[0]:.1f}, "
                f"median {statistics.median(ms):.1f}, "
                f"p90 {ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]:.1f}, max {ms[-1]:.1f}"
            )
        report = os.environ.get("AIOCKPT_FAULT_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(json.dumps({"test": label, "latencies": self.latencies}) + "\n")


async def kill_during(
    handle: SaveHandle, pid: int, wait_before_kill: Callable[[], Awaitable[None]]
) -> tuple[str, float, float | None]:
    """SIGKILL ``pid`` once ``wait_before_kill`` returns; return the save's outcome, when the
    kill was sent, and the seconds from the kill to the save's failure (None: no failure)."""
    finished: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    handle.add_done_callback(lambda _: finished.set_result(time.perf_counter()))
    await wait_before_kill()
    done_before_kill = handle.done()
    killed_at = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    try:
        async with asyncio.timeout(HANG_S):
            await handle
    except WorkerCrashed as exc:
        assert "SIGKILL" in str(exc) and exc.returncode == -signal.SIGKILL, exc
        outcome = "WorkerCrashed"
    else:
        return ("finished before the kill" if done_before_kill else "committed"), killed_at, None
    return outcome, killed_at, await finished - killed_at


def channel_fds(tmp_path: Path) -> set[tuple[int, str]]:
    """This process's descriptors of the kinds a worker's lifecycle opens: sockets, pipes,
    shared memory, files under the test's directory. (uvloop keeps one /dev/null open for
    the next spawn: a cache, not a leak, and not a kind counted here.)"""
    kinds = ("socket:", "pipe:", "/dev/shm/", str(tmp_path))
    return {
        (fd, target) for fd, target in open_fds(os.getpid()).items() if target.startswith(kinds)
    }


async def wait_for_phase(phase: str, handle: SaveHandle, delay: float) -> None:
    """Return when the save reaches ``phase``: at once (its task has not even started), once
    it is staged (its write request is on its way), or ``delay`` seconds after that."""
    if phase != "before staged":
        await handle.staged
    if phase == "mid write":
        await asyncio.sleep(delay)


@pytest.mark.parametrize("saves", variants(10, 100))
async def test_sigkilled_worker_fails_the_save_promptly_and_the_next_save_respawns(
    tmp_path: Path, saves: int
) -> None:
    rng = random.Random(seed_for(f"worker SIGKILL x{saves}"))
    keep_last = 2
    if saves <= 10:  # the short variant kills twice (each respawn costs seconds): the
        # request racing the kill, and the writer killed mid-file; the long one all phases
        schedule = {3: "before staged", 7: "mid write"}
    else:
        schedule = {}
        for step in range(1, saves - 1):
            if step - 1 not in schedule and rng.random() < 0.5:
                schedule[step] = rng.choice(["before staged", "after staged", "mid write"])
    report = KillReport()
    violations: list[str] = []
    killed: set[int] = set()
    durations: list[float] = [0.2]
    maps_before = mapped_arenas(os.getpid())
    fds_before = channel_fds(tmp_path)
    async with Checkpointer(tmp_path, format=TRICKLING, keep_last=keep_last) as ckpt:
        watcher = asyncio.create_task(watch_latest(ckpt, violations))
        try:
            for step in range(saves):
                phase = schedule.get(step)
                if phase is None:
                    # Not killed: succeeds, with a new worker if the last one was killed.
                    async with asyncio.timeout(HANG_S):
                        result = await ckpt.save(state_for(step), step=step)
                    durations.append(result.total_seconds)
                else:
                    pid = ckpt.worker_pid
                    assert pid is not None
                    handle = ckpt.save(state_for(step), step=step)
                    delay = rng.uniform(0, 1.3 * statistics.median(durations))
                    outcome, killed_at, latency = await kill_during(
                        handle, pid, functools.partial(wait_for_phase, phase, handle, delay)
                    )
                    report.outcomes[f"{phase}: {outcome}"] += 1
                    if latency is not None:
                        report.latencies.append(latency)
                        assert latency < FAILURE_BOUND_S, f"the save failed {latency:.3f} s late"
                        killed.add(step)
                        # a failed save commits nothing unless the kill came after its commit
                        assert not await asyncio.to_thread(manifestless, handle.path)
                    # A kill that hit an idle worker fails no save, but must be noticed as
                    # promptly, so that the next save starts a new worker.
                    while ckpt.worker_pid == pid:
                        assert time.perf_counter() - killed_at < FAILURE_BOUND_S, "unnoticed"
                        await asyncio.sleep(0.001)
                committed = await asyncio.to_thread(check_root, tmp_path, killed, keep_last)
                latest = await ckpt.latest()
                assert latest == (committed[-1] if committed else None)
                assert arena_names(os.getpid()) == []  # no save in flight: no arena names
                assert violations == []
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    report.print(f"worker SIGKILL x{saves} on {type(asyncio.get_running_loop()).__module__}")
    assert violations == [], f"latest() named directories without a manifest: {violations}"
    assert mapped_arenas(os.getpid()) <= maps_before, "arenas still mapped after close()"
    assert channel_fds(tmp_path) <= fds_before, "descriptors left open after close()"
    # What killed saves left is recognised by its name and swept by the next start.
    left = commit.remove_stale_temps(tmp_path)
    assert all(int(p.split("step_")[1].split("-")[0]) in killed for p in left)
    assert all(commit.is_committed(tmp_path / e) for e in checkpoint_entries(tmp_path))


async def test_worker_killed_with_a_request_unread_fails_it_with_worker_crashed() -> None:
    """Deterministic form of the race the random test meets: SIGSTOP the worker, send a
    PING (it stays unread in the worker's socket), then SIGKILL it. ``close()`` right after
    must be clean (on uvloop it raised RuntimeError from the closed transport)."""
    proc = CheckpointProcess(checkpoint_writer_init_fn="tests.workers:RawWriter")
    try:
        await proc.start()
        pid = proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            ping = asyncio.ensure_future(proc.ping())
            await asyncio.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGKILL)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(HANG_S):
                await ping
        except aiockpt.AiockptError as exc:
            failure = exc
        latency = time.perf_counter() - started
        alive_after = proc.alive
    finally:
        await proc.close()
    assert failure is not None and latency < FAILURE_BOUND_S, (failure, latency)
    assert isinstance(failure, WorkerCrashed) and "SIGKILL" in str(failure), repr(failure)
    assert not alive_after  # so that the next save starts a new worker


# --- the trainer killed mid-save -----------------------------------------------------------

TRAINER = """
import asyncio, json, os, sys
import torch
import aiockpt

def emit(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    root, fmt, mib, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    generator = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(mib << 15, generator=generator) for i in range(8)}
    async with aiockpt.Checkpointer(root) as ckpt:
        await ckpt.save(state, step=0)
        emit(event="ready", worker=ckpt.worker_pid)
        path = os.path.join(root, "step_0000000001")
        handle = ckpt.save_to({**state, "gate": gate}, path, format=fmt, step=1)
        emit(event="saving")
        await handle.staged
        emit(event="staged")
        await handle
        emit(event="committed")

asyncio.run(main())
"""


def trainer_state(mib: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(mib << 15, generator=generator) for i in range(8)}


@pytest.mark.parametrize("runs", variants(1, 8))
def test_trainer_killed_mid_save_leaves_nothing_behind(tmp_path: Path, runs: int) -> None:
    """SIGKILL the trainer while its save of 32 MiB is staged or being written: its worker is
    gone within 1 s, nothing of either is left in /dev/shm, the previous checkpoint loads, and
    the next ``Checkpointer(root).start()`` removes the temporary directory. The short variant
    kills while the write is held in its temporary directory (``GatedDcpWriter``); the long
    one at random moments from staging to after the commit."""
    rng = random.Random(seed_for(f"trainer SIGKILL x{runs}"))
    mib = 32
    expected = trainer_state(mib)
    exits: list[float] = []
    for run in range(runs):
        root = tmp_path / f"run{run}"
        root.mkdir()
        gate = WriteGateFiles(root)
        phase, delay = (
            ("held", None)
            if runs == 1
            else rng.choice([("saving", rng.uniform(0, 0.05)), ("writing", rng.uniform(0, 0.4))])
        )
        trainer = subprocess.Popen(
            [sys.executable, "-c", TRAINER, str(root), GATED, str(mib), gate.entry],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert trainer.stdout is not None
            ready = json.loads(trainer.stdout.readline())
            worker = ready["worker"]
            if phase == "saving":
                while json.loads(trainer.stdout.readline())["event"] != "saving":
                    pass
            else:
                wait_for(f"{gate.entry}.started")  # its write is held in the temporary dir
                if phase == "writing":
                    Path(f"{gate.entry}.go").touch()
            if delay is not None:
                time.sleep(delay)  # a random moment: the long variant's point
        finally:
            trainer.kill()
            trainer.wait()
            gate.remove()
        gone_after = wait_gone(worker, timeout=10)
        if gone_after is None:
            os.kill(worker, signal.SIGKILL)  # no longer our descendant: the leak check misses it
        assert gone_after is not None, f"worker {worker} outlived its trainer by 10 s"
        exits.append(gone_after)
        print(
            f"run {run}: killed {delay or 0:.3f} s after {phase!r}; worker gone"
            f" {gone_after:.4f} s later"
        )
        assert gone_after < 1.0, f"the worker exited {gone_after:.3f} s after its trainer"
        if phase != "saving":  # staged: arenas never have a name in /dev/shm
            assert arena_names(trainer.pid) == [] and arena_names(worker) == []
        assert process_gone(worker)

        async def restart(root: Path = root) -> str | None:
            async with Checkpointer(root) as ckpt:
                return await ckpt.latest()

        latest = asyncio.run(restart())
        assert arena_names(trainer.pid) == []
        entries = sorted(checkpoint_entries(root))
        assert not [e for e in entries if e.startswith(commit.TEMP_PREFIX)], entries
        assert latest is not None and step_of(latest) in (0, 1)
        for entry in entries:
            loaded = aiockpt.load(root / entry)
            assert loaded.keys() - {"gate"} == expected.keys()
            assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    print(f"trainer SIGKILL x{runs}: worker exited {[round(x * 1000, 1) for x in exits]} ms later")


FIRST_SAVE_TRAINER = """
import asyncio, json, sys
import torch
import aiockpt

async def main():
    state = {f"w{i}": torch.randn(1 << 20) for i in range(8)}  # 32 MiB
    ckpt = aiockpt.Checkpointer(sys.argv[1])
    # The first save, before any start(): its arena is made and filled while the worker
    # starts, and only mapped by the worker afterwards.
    handle = ckpt.save(state, step=0)
    await handle.staged
    while ckpt._process is None or ckpt._process.pid is None:  # spawned by now, or soon
        await asyncio.sleep(0.001)
    print(json.dumps({"worker": ckpt._process.pid, "done": handle.done()}), flush=True)
    await asyncio.Future()  # until the test kills this process, which it always does

asyncio.run(main())
"""


def test_trainer_killed_during_its_first_save_leaves_nothing_in_dev_shm(tmp_path: Path) -> None:
    """SIGKILL the trainer once its first save is staged, while its worker is still starting:
    no arena of it may be left in /dev/shm (nor anywhere: arenas are anonymous memory that
    goes with the last process holding it), and the worker exits."""
    shm_before = set(os.listdir("/dev/shm"))
    trainer = subprocess.Popen(
        [sys.executable, "-c", FIRST_SAVE_TRAINER, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    worker = None
    try:
        assert trainer.stdout is not None
        staged = json.loads(trainer.stdout.readline())
        worker = staged["worker"]
        assert not staged["done"]
    finally:
        trainer.kill()
        trainer.wait()
    if worker is not None:
        # a hang guard: the worker notices its trainer's death once its loop runs, after it
        # imported torch, which took over 10 s on a loaded 2-core machine (xdist beside others)
        gone_after = wait_gone(worker, timeout=HANG_S)
        if gone_after is None:
            os.kill(worker, signal.SIGKILL)  # no longer our descendant: the leak check misses it
        assert gone_after is not None, f"worker {worker} outlived its trainer by {HANG_S} s"
    left = [
        n
        for n in set(os.listdir("/dev/shm")) - shm_before
        if n.startswith("aiockpt") and (str(trainer.pid) in n or str(worker) in n)
    ]
    assert left == [] and arena_names(trainer.pid) == [], left
