"""aiockpt-run against torchrun, interleaved, on the same worker script.

    python -m benchmarks.bench_elastic [--repeats 5] [--restarts 50]

1. crash -> replacement running: rank 0 of 2 records the time and exits 1; the launcher stops
   rank 1 and restarts the group; the new rank 0 records the time it starts running.
2. exit -> agent notices: the same crash, until the surviving sibling's SIGTERM handler runs
   (detection plus the signal's delivery: an upper bound on the agent's detection latency).
3. threads in the launcher process while 8 ranks tee their output (``/proc/<pid>/task``),
   next to 1 rank without tee.
4. restart growth: ``--restarts`` restarts in a row (rank 0 exits 1 at once, rank 1 is
   stopped); the launcher's fds, threads and RSS (``/proc/<pid>``) at restart 5 and at the
   last one, sampled while rank 0 of that attempt waits, and the time per restart in between.

Times come from ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on the host).
This file is also the worker: ``python bench_elastic.py worker <mode> <dir>``, so that both
launchers start exactly the same, light, script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

LAUNCHERS = {
    "aiockpt-run": [sys.executable, "-m", "aiockpt.run"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
}
RUN_TIMEOUT_S = 180.0


def _stamp(directory: str, name: str) -> None:
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as f:
        f.write(repr(time.monotonic()))
    os.rename(path + ".tmp", path)


def worker(mode: str, directory: str) -> None:
    """The worker side; imports nothing beyond this module's standard-library imports."""
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    rank = os.environ["RANK"]
    if mode == "crash":
        if restart != "0":
            _stamp(directory, f"start_{rank}")
            return
        if rank == "0":
            time.sleep(0.5)  # let the sibling settle into its sleep
            _stamp(directory, "crash")
            os._exit(1)

        def on_term(signum: int, frame: FrameType | None) -> None:
            _stamp(directory, "term")
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
        time.sleep(60)
    elif mode == "restart-loop":
        if rank != "0":
            time.sleep(60)  # stopped by the launcher when rank 0 fails
        if os.path.exists(os.path.join(directory, f"pause_{restart}")):
            _stamp(directory, f"paused_{restart}")
            while not os.path.exists(os.path.join(directory, f"go_{restart}")):
                time.sleep(0.005)
        os._exit(1)
    elif mode == "chatter":
        _stamp(directory, f"ready_{rank}")
        for i in range(40):
            print(f"rank {rank} line {i}", flush=True)
            time.sleep(0.05)


@dataclass
class CrashTimes:
    detect_s: float
    replace_s: float


def crash_once(launcher: str, work: Path) -> CrashTimes:
    stamps = work / f"crash-{launcher}"
    stamps.mkdir()
    argv = [*LAUNCHERS[launcher], "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    argv += [__file__, "worker", "crash", str(stamps)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{launcher} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    crash = float((stamps / "crash").read_text())
    result = CrashTimes(
        detect_s=float((stamps / "term").read_text()) - crash,
        replace_s=float((stamps / "start_0").read_text()) - crash,
    )
    shutil.rmtree(stamps)
    return result


@dataclass
class Usage:
    fds: int
    threads: int
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
        return cls(
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            threads=len(os.listdir(f"/proc/{pid}/task")),
            rss_kib=rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
        )


@dataclass
class RestartGrowth:
    early: Usage  # at restart 5
    late: Usage  # at the last restart
    per_restart_s: float  # between the two samples


def restart_growth(launcher: str, work: Path, restarts: int) -> RestartGrowth:
    stamps = work / f"restarts-{launcher}"
    stamps.mkdir()
    marks = (5, restarts)
    for n in marks:
        (stamps / f"pause_{n}").touch()
    argv = [*LAUNCHERS[launcher], "--standalone", "--nproc-per-node=2"]
    argv += [f"--max-restarts={restarts}", __file__, "worker", "restart-loop", str(stamps)]
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        samples: dict[int, Usage] = {}
        times: dict[int, float] = {}
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for n in marks:
            while not (stamps / f"paused_{n}").exists():
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{launcher}: restart {n} never came")
                time.sleep(0.005)
            samples[n] = Usage.of(agent.pid)
            times[n] = time.monotonic()
            (stamps / f"go_{n}").touch()
        agent.wait(RUN_TIMEOUT_S)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        shutil.rmtree(stamps)
    return RestartGrowth(
        early=samples[5],
        late=samples[restarts],
        # the pause at restart 5 is excluded: the clock starts when it is released
        per_restart_s=(times[restarts] - times[5]) / (restarts - 5),
    )


def threads_while_running(launcher: str, work: Path, nproc: int, tee: bool) -> int:
    stamps = work / f"threads-{launcher}-{nproc}-{tee}"
    stamps.mkdir()
    argv = [*LAUNCHERS[launcher], "--standalone", f"--nproc-per-node={nproc}"]
    if tee:
        argv += ["--tee=3", f"--log-dir={stamps / 'logs'}"]
    argv += [__file__, "worker", "chatter", str(stamps)]
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not all((stamps / f"ready_{r}").exists() for r in range(nproc)):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{launcher}: workers did not start")
            time.sleep(0.02)
        time.sleep(0.5)  # tees and tail threads are running by now
        return len(os.listdir(f"/proc/{agent.pid}/task"))
    finally:
        agent.wait(RUN_TIMEOUT_S)
        shutil.rmtree(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--restarts", type=int, default=50)
    args = parser.parse_args()
    if args.restarts <= 5:
        parser.error("--restarts must be more than 5 (usage is compared at restart 5)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # not "aiockpt*": test suites running meanwhile treat such temp entries as their leaks
    work = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    try:
        runs: dict[str, list[CrashTimes]] = {name: [] for name in LAUNCHERS}
        for i in range(args.repeats):
            order = list(LAUNCHERS) if i % 2 == 0 else list(reversed(LAUNCHERS))
            for launcher in order:
                runs[launcher].append(crash_once(launcher, work))
        threads = {
            name: (
                threads_while_running(name, work, 1, tee=False),
                threads_while_running(name, work, 8, tee=True),
            )
            for name in LAUNCHERS
        }
        growth = {name: restart_growth(name, work, args.restarts) for name in LAUNCHERS}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(t, field) for t in runs[name])

    print(f"{args.repeats} interleaved runs each, 2 workers, --standalone: medians, then every run")
    print(f"{'':34}{'aiockpt-run':>16}{'torchrun':>16}{'ratio':>9}")
    for field, label in (
        ("replace_s", "crash -> replacement running"),
        ("detect_s", "exit -> sibling gets SIGTERM"),
    ):
        ours, theirs = median("aiockpt-run", field), median("torchrun", field)
        print(f"{label:34}{ours * 1e3:13.1f} ms{theirs * 1e3:13.1f} ms{ours / theirs:9.3f}")
        for name in LAUNCHERS:
            values = [getattr(t, field) * 1e3 for t in runs[name]]
            print(f"{'':4}{name:12} all: " + ", ".join(f"{v:.1f}" for v in values) + " ms")
    print(f"{'launcher threads, 1 rank no tee':34}{threads['aiockpt-run'][0]:16}", end="")
    print(f"{threads['torchrun'][0]:16}")
    print(f"{'launcher threads, 8 ranks teed':34}{threads['aiockpt-run'][1]:16}", end="")
    print(f"{threads['torchrun'][1]:16}")
    print(f"restarts 5 -> {args.restarts}, 2 ranks (launcher process, at restart 5 -> last):")
    for label, field in (("fds", "fds"), ("threads", "threads")):
        cells = [f"{getattr(g.early, field)} -> {getattr(g.late, field)}" for g in growth.values()]
        print(f"{'':4}{label:30}{cells[0]:>16}{cells[1]:>16}")
    grown = [f"{g.late.rss_kib - g.early.rss_kib:+} KiB" for g in growth.values()]
    base = [g.early.rss_kib / 1024 for g in growth.values()]
    print(f"{'':4}{'RSS growth':30}{grown[0]:>16}{grown[1]:>16}", end="")
    print(f"  (from {base[0]:.0f} and {base[1]:.0f} MiB)")
    ours_ms, theirs_ms = (g.per_restart_s * 1e3 for g in growth.values())
    print(f"{'':4}{'time per restart':30}{ours_ms:13.1f} ms{theirs_ms:13.1f} ms")
    replace_ratio = median("aiockpt-run", "replace_s") / median("torchrun", "replace_s")
    detect_ms = median("aiockpt-run", "detect_s") * 1e3
    added = threads["aiockpt-run"][1] - threads["aiockpt-run"][0]
    print(f"targets: replacement <= 0.5x torchrun: {'met' if replace_ratio <= 0.5 else 'MISSED'}"
          f"; detection < 5 ms: {'met' if detect_ms < 5 else 'MISSED'}"
          f"; no threads added for logs: {'met' if added <= 0 else 'MISSED'}")  # fmt: skip
    ours = growth["aiockpt-run"]
    flat = ours.late.fds == ours.early.fds and ours.late.threads == ours.early.threads
    flat = flat and ours.late.rss_kib <= ours.early.rss_kib * 1.10
    print(f"no growth over restarts (fds, threads equal; RSS within +10%): "
          f"{'met' if flat else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
