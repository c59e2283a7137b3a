"""Elastic membership, aiockpt-run against torchrun (``--rdzv-backend c10d``), interleaved.

    python -m benchmarks.bench_membership [--repeats 5] [--settle 8] [--changes 50]

Two "nodes" on one host, agents on 127.0.0.2 and 127.0.0.3, ``--nnodes 1:2``, the same
``--rdzv-conf`` for both launchers (last_call_timeout=1, keep-alive at torch's defaults: a
silent node is dead after 15 s; ``is_host`` set, as torch would otherwise take every 127.*
endpoint for its own). Three launchers, interleaved: aiockpt-run, torchrun, and aiockpt-run
``--no-prestart-workers`` (workers spawned after the round, as before pre-started workers).
Each trial:

1. join: node A runs alone for ``--settle`` seconds; node B is started; time until every
   worker of the group of 2 has joined its gloo group (both workers stamp
   ``time.monotonic()`` after an all-reduce). Also stamped: when each worker's script
   started and when it had torch imported, so the join splits into launcher time
   (rendezvous, spawn) and import time.
2. loss: ``--settle`` seconds later node B is killed (SIGKILL to its agent and its workers
   at once, as a lost machine); time until node A's new group of 1 runs. torchrun sees it
   through A's worker failing on the dead peer (a restart), then waits out B's keep-alive
   (15 s) before a new round; aiockpt-run's agents notice a dead peer agent at once.

The workers import torch inside the script (seconds here): torchrun and ``no-prestart``
pay for it after the round, aiockpt-run's pre-started workers before it. ``floor`` then
times the imports alone (fresh interpreters, interleaved): the joining agent itself
imports torch for its TCPStore before it can meet anyone. This file is also the worker:
``python bench_membership.py worker <dir>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LAUNCHERS = {
    "aiockpt-run": [sys.executable, "-m", "aiockpt.run"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    # the same agent spawning its workers after the round, as before pre-started workers
    "no-prestart": [sys.executable, "-m", "aiockpt.run", "--no-prestart-workers"],
}
#: torch's c10d handler takes whole seconds only; keep-alive at torch's defaults (5 s x 3):
#: with keep_alive_interval=1, keep_alive_max_attempt=2 torchrun's running node was found
#: dead by the joining one (its stored heartbeat stayed at the rendezvous time), and the
#: joiner formed a group of its own
CONF = "join_timeout=60,last_call_timeout=1,keep_alive_interval=5,keep_alive_max_attempt=3"
WAIT_S = float(os.environ.get("BENCH_WAIT_S", "120"))
#: how long each group runs before the next membership change: a node joins (or is lost
#: from) a job that has been running, not one whose agents are still starting its workers
#: (aiockpt-run's agent starts the next attempt's spares once a group runs; their imports
#: take a few seconds of CPU here). The same for every launcher; --settle 0: at once
SETTLE_S = 8.0
#: torchrun's default (since torch 2.5, pytorch PR #128096) shares the c10d rendezvous store
#: with the workers, and in torch 2.13 a node joining a running job then hangs: rank 0 kept
#: the bootstrap store info of its first round (``DynamicRendezvousHandler.next_rendezvous``
#: rebuilds it only when it is None or rank 0 has no server yet) and never publishes it under
#: the new round's store prefix, while the joiner, rank 1, builds its own with a blocking
#: ``store.get`` of that round's ``MASTER_ADDR`` key: both agents sit after "joined round 1"
#: forever. Torch's opt-out (the setting pytorch issue #135712 recommends for restarts too)
#: rebuilds it every round; the workers then meet in a store rank 0's worker hosts.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def worker(directory: str) -> None:
    started = time.monotonic()
    import torch
    import torch.distributed as dist

    imported = time.monotonic()
    dist.init_process_group("gloo")
    flag = torch.zeros(1)
    dist.all_reduce(flag)
    name = f"ws{os.environ['WORLD_SIZE']}_r{os.environ['RANK']}_{os.getpid()}"
    with open(os.path.join(directory, name + ".tmp"), "w") as f:
        # the phases of the join: script started, torch imported, group running (last)
        f.write(f"{started!r} {imported!r} {time.monotonic()!r}")
    os.rename(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))
    finish = os.path.join(directory, "finish")
    try:
        while True:
            flag = torch.tensor([1.0 if os.path.exists(finish) else 0.0])
            dist.all_reduce(flag)
            if flag.item() > 0:
                break
            time.sleep(0.05)
    except RuntimeError:
        os._exit(1)  # a peer is gone; the group's clean-up at exit could block on it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_node(agent: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent and every process under it at once: a machine that is gone."""
    pids = [agent.pid, *_descendants(agent.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(WAIT_S)


def _stamps(work: Path, size: int, after: float) -> list[list[float]]:
    """The stamps of the workers of groups of ``size`` that ran after ``after``: what each
    stamp file holds (the last one: when the group ran)."""
    stamps = [
        [float(t) for t in path.read_text().split()]
        for path in work.glob(f"ws{size}_r*")
        if not path.name.endswith(".tmp")
    ]
    return [s for s in stamps if s[-1] > after]


def _group_running(work: Path, size: int, after: float) -> float | None:
    """When the last worker of a group of ``size`` started after ``after`` ran, if it did."""
    fresh = [s[-1] for s in _stamps(work, size, after)]
    return max(fresh) if len(fresh) >= size else None


def _wait_group(work: Path, size: int, after: float) -> float:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        done = _group_running(work, size, after)
        if done is not None:
            return done
        time.sleep(0.01)
    raise TimeoutError(f"no group of {size} within {WAIT_S}s in {work}")


def trial(
    launcher: str, root: Path, verbose: bool = False, settle_s: float = 0.0
) -> tuple[float, float, tuple[float, ...]]:
    """One join and one loss, each ``settle_s`` after the group before it ran; returns both
    times in seconds, and the join's phases (see :func:`_measure`)."""
    work = Path(tempfile.mkdtemp(dir=root))
    endpoint = f"127.0.0.2:{_free_port()}"
    agents: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> subprocess.Popen[bytes]:
        out = (work / f"agent{n}.out").open("ab")
        env = {**os.environ, **TORCHRUN_ENV} if launcher == "torchrun" else None
        agent = subprocess.Popen(
            [
                *LAUNCHERS[launcher],
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--nnodes=1:2",
                "--nproc-per-node=1",
                f"--rdzv-id={work.name}",
                f"--rdzv-conf={CONF},is_host={int(n == 2)}",
                f"--local-addr=127.0.0.{n}",
                "--max-restarts=3",
                "--monitor-interval=0.1",
                __file__,
                "worker",
                str(work),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        out.close()
        agents.append(agent)
        return agent

    try:
        return _measure(work, start, settle_s)
    except TimeoutError:
        for out in sorted(work.glob("agent*.out")) if verbose else []:
            print(f"--- {launcher} {out.name}\n{out.read_text()[-2000:]}", file=sys.stderr)
        raise
    finally:
        for agent in agents:
            if agent.poll() is None:
                _kill_node(agent)
        shutil.rmtree(work, ignore_errors=True)


def _measure(
    work: Path, start: Callable[[int], subprocess.Popen[bytes]], settle_s: float
) -> tuple[float, float, tuple[float, ...]]:
    """The join and loss times, and the join's phases: from starting node B until the last
    worker of the group of 2 started its script, had torch imported, and ran."""
    first = start(2)
    _wait_group(work, 1, 0.0)
    time.sleep(settle_s)  # a running job, not one that has just (re)started
    joined = time.monotonic()
    second = start(3)
    join_s = _wait_group(work, 2, joined) - joined
    stamps = _stamps(work, 2, joined)
    phases = tuple(max(s[i] for s in stamps) - joined for i in range(3))
    time.sleep(settle_s)
    lost = time.monotonic()
    _kill_node(second)
    loss_s = _wait_group(work, 1, lost) - lost
    (work / "finish").touch()
    first.wait(WAIT_S)
    return join_s, loss_s, phases


#: the churn's settings: a node silent for 1 s is gone (0.2 s beats), a round with enough
#: nodes closes 0.3 s after it could
CHURN_CONF = (
    "join_timeout=60,last_call_timeout=0.3,keep_alive_interval=0.2,keep_alive_max_attempt=5"
)


def idle_worker(directory: str) -> None:
    """A churn worker: stamps its group's file (as ``worker`` does) and waits to be stopped.
    No torch, so that a membership change costs the agent's work, not the workers' imports."""
    name = f"ws{os.environ['WORLD_SIZE']}_r{os.environ['RANK']}_{os.getpid()}"
    with open(os.path.join(directory, name + ".tmp"), "w") as f:
        f.write(repr(time.monotonic()))
    os.rename(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))
    time.sleep(WAIT_S * 5)  # until the agent stops the group (SIGTERM's default: exit)


def spare_pids(agent: int) -> set[int]:
    """The processes under ``agent`` started as pre-started workers (spares): activated or
    not, their command line is the bootstrap's."""
    found = set()
    for pid in _descendants(agent):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"bootstrap.py") for a in argv) and b"spare" in argv:
            found.add(pid)
    return found


def _wait_spares(agent: int, count: int) -> None:
    """Until ``agent`` has started ``count`` spares (its workers and the next attempt's)."""
    deadline = time.monotonic() + WAIT_S
    while len(spare_pids(agent)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"agent {agent}: fewer than {count} spares within {WAIT_S}s")
        time.sleep(0.01)


def agent_counts(pid: int) -> tuple[int, int]:
    """``(open fds, threads)`` of process ``pid``: the fewest seen over looks 20 ms apart
    for half a second, so that what lives for a moment does not count (a heartbeat thread
    caught mid-call; the child's end of a spare's socket, open until its spawn returns,
    which on a loaded machine can be a while after the spare shows in /proc)."""
    looks = []
    for _ in range(25):
        looks.append((len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))))
        time.sleep(0.02)
    return min(fds for fds, _ in looks), min(threads for _, threads in looks)


def churn(changes: int, work: Path, nproc_per_node: int = 2) -> list[tuple[int, int, int]]:
    """Node A (on 127.0.0.2) runs throughout; node B (127.0.0.3) joins and goes away (SIGTERM:
    its agent stops its workers and leaves without closing the rendezvous, so A learns of it
    by keep-alive expiry) until ``changes`` membership changes happened. After each one, once
    the new group runs and A has started the next attempt's spares (pre-started workers,
    importing nothing here), samples A's agent. Returns ``(nodes, fds, threads)`` per
    change. Raises ``TimeoutError`` if a group does not form within ``WAIT_S``."""
    endpoint = f"127.0.0.2:{_free_port()}"

    def start(n: int) -> subprocess.Popen[bytes]:
        out = (work / f"churn-agent{n}.out").open("ab")
        try:
            return subprocess.Popen(
                [
                    *LAUNCHERS["aiockpt-run"],
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={endpoint}",
                    "--nnodes=1:2",
                    f"--nproc-per-node={nproc_per_node}",
                    "--rdzv-id=churn",
                    f"--rdzv-conf={CHURN_CONF}",
                    f"--local-addr=127.0.0.{n}",
                    "--shutdown-timeout=5",
                    "--prestart-imports=",
                    __file__,
                    "idle",
                    str(work),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()

    samples: list[tuple[int, int, int]] = []
    first = start(2)
    joiner: subprocess.Popen[bytes] | None = None
    try:
        _wait_group(work, nproc_per_node, 0.0)
        while len(samples) < changes:
            after = time.monotonic()
            if joiner is None:
                joiner = start(3)
                nodes = 2
            else:
                joiner.send_signal(signal.SIGTERM)
                joiner.wait(WAIT_S)
                joiner, nodes = None, 1
            _wait_group(work, nodes * nproc_per_node, after)
            _wait_spares(first.pid, 2 * nproc_per_node)  # quiet: every spare started
            samples.append((nodes, *agent_counts(first.pid)))
    finally:
        for agent in (first, joiner):
            if agent is not None and agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(WAIT_S)
                except subprocess.TimeoutExpired:
                    _kill_node(agent)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--changes", type=int, default=50, help="membership changes of the flatness check"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print the agents' output of a hung trial"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        help="seconds a group runs before node B joins or is killed (default %(default)s)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-membership-"))
    times: dict[str, dict[str, list[float]]] = {
        name: {"join": [], "loss": [], "script": [], "imported": []} for name in LAUNCHERS
    }
    hung: dict[str, int] = dict.fromkeys(LAUNCHERS, 0)
    try:
        run_trials(args, root, times, hung)
        if args.repeats:
            report(args, times, hung)
            floor(args.repeats)
        if args.changes and not flatness(args.changes, root):
            sys.exit(1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_trials(
    args: argparse.Namespace,
    root: Path,
    times: dict[str, dict[str, list[float]]],
    hung: dict[str, int],
) -> None:
    for i in range(args.repeats):
        for name in LAUNCHERS:  # interleaved: load drifts affect both alike
            try:
                join_s, loss_s, phases = trial(name, root, args.verbose, args.settle)
            except TimeoutError as exc:
                hung[name] += 1
                print(f"trial {i} {name:11s} did not finish: {exc}", flush=True)
                continue
            times[name]["join"].append(join_s)
            times[name]["loss"].append(loss_s)
            times[name]["script"].append(phases[0])
            times[name]["imported"].append(phases[1])
            print(
                f"trial {i} {name:11s} join {join_s:6.3f}s  loss {loss_s:6.3f}s"
                f"  (join: script started {phases[0]:.3f}s, torch imported {phases[1]:.3f}s)",
                flush=True,
            )


def report(
    args: argparse.Namespace, times: dict[str, dict[str, list[float]]], hung: dict[str, int]
) -> None:
    print(f"\nmedians over the trials that finished, of {args.repeats} (seconds)")
    print(f"{'':12s} {'join -> group of 2 running':>28s} {'SIGKILL -> group of 1 running':>31s}")
    for name, measured in times.items():
        if not measured["join"]:
            print(f"{name:12s} {'-':>28s} {'-':>31s}  ({hung[name]} trial(s) hung)")
            continue
        join = statistics.median(measured["join"])
        loss = statistics.median(measured["loss"])
        note = f"  ({hung[name]} trial(s) hung)" if hung[name] else ""
        print(f"{name:12s} {join:28.3f} {loss:31.3f}{note}")
    print(
        "\njoin phases, from starting node B until the last worker of the group of 2 ...\n"
        f"{'':12s} {'started its script':>19s} {'had torch imported':>19s} {'ran':>8s}"
    )
    for name, measured in times.items():
        if measured["join"]:
            print(
                f"{name:12s} {statistics.median(measured['script']):19.3f}"
                f" {statistics.median(measured['imported']):19.3f}"
                f" {statistics.median(measured['join']):8.3f}"
            )
    ours, theirs = times["aiockpt-run"], times["torchrun"]
    if ours["join"] and theirs["join"]:
        print(
            "ratio aiockpt-run / torchrun: join "
            f"{statistics.median(ours['join']) / statistics.median(theirs['join']):.2f}x, loss "
            f"{statistics.median(ours['loss']) / statistics.median(theirs['loss']):.2f}x"
            " (target <= 0.5x each)",
            flush=True,
        )


#: what a joining node's processes must import before they can do their part, each timed
#: as a fresh interpreter: the agent before it can reach the store (torch's TCPStore), a
#: worker before it can join its group
FLOOR_COMMANDS = {
    "python -c pass": "pass",
    "agent: import aiockpt.run": "import aiockpt.elastic.cli",
    "agent: + torch.distributed": "import aiockpt.elastic.cli, torch.distributed",
    "worker: import torch": "import torch",
}


def floor(repeats: int) -> None:
    """Prints the medians of :data:`FLOOR_COMMANDS`, interleaved: the joining agent's own
    import of torch (for TCPStore) bounds the join from below, whatever the workers do."""
    times: dict[str, list[float]] = {name: [] for name in FLOOR_COMMANDS}
    for _ in range(repeats):
        for name, code in FLOOR_COMMANDS.items():
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[name].append(time.monotonic() - started)
    print("\nfloor: interpreter start + imports, medians (seconds)")
    for name, measured in times.items():
        print(f"  {name:28s} {statistics.median(measured):6.3f}", flush=True)


#: how far node A's fd count may wander between changes without growing: store wait
#: connections may be open or not when A is looked at, depending on how the round ended
#: (and A hosts the store, so one connection is two of its fds, client and server end),
#: and they stay so until the next change. With pre-started workers the new group runs
#: within milliseconds of the round. Seen over 50 changes: 49-50 fds with 1 node, 53-56
#: with 2, in no order (a leak of one per change would grow by 25); the unix sockets (the
#: spares' and workers' channels) do not move
#: how far the later half's median fd count may sit above the earlier half's
FD_DRIFT = 2


def fds_flat(fds: list[int]) -> bool:
    """Whether fd counts sampled after successive changes (one group size) do not grow. A
    single sample may wander by a few connections (peers' connections to the store this agent
    hosts come and go on their own time), so growth is judged by medians: the later half's may
    sit at most :data:`FD_DRIFT` above the earlier half's. A leak of one fd per change moves
    it by half the number of samples (3 with 6 samples, 12 with 25)."""
    half = len(fds) // 2
    return statistics.median(fds[half:]) - statistics.median(fds[:half]) <= FD_DRIFT


def flatness(changes: int, root: Path, nproc_per_node: int = 4) -> bool:
    """Node B joins and leaves ``changes`` times; prints node A's agent's fds and threads
    after each change, by group size, and returns whether they are flat: fds that do not
    grow (:func:`fds_flat`), and as many threads after every change, with 2 nodes as with 1."""
    work = Path(tempfile.mkdtemp(dir=root))
    try:
        samples = churn(changes, work, nproc_per_node)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nnode A's agent over {changes} membership changes ({nproc_per_node} workers per node)")
    for nodes in (1, 2):
        seen = [(fds, threads) for n, fds, threads in samples if n == nodes]
        print(
            f"  {nodes} node(s), {nodes * nproc_per_node} workers: fds {seen[0][0]} -> "
            f"{seen[-1][0]} (min {min(f for f, _ in seen)}, max {max(f for f, _ in seen)}),"
            f" threads {seen[0][1]} -> "
            f"{seen[-1][1]} (max {max(t for _, t in seen)})"
        )
    by_size = [[(f, t) for n, f, t in samples if n == nodes] for nodes in (1, 2)]
    # flat per group size, and the same threads with twice the nodes and workers
    threads = {t for seen in by_size for _, t in seen}
    flat = all(fds_flat([f for f, _ in seen]) for seen in by_size) and len(threads) == 1
    print("flat" if flat else "NOT FLAT", flush=True)
    return flat


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker(sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "idle":
        idle_worker(sys.argv[2])
    else:
        main()
