"""Elastic membership over the dynamic (c10d) rendezvous: ``aiockpt-run`` agents as separate
processes, one per "node" on its own loopback address (127.0.0.2, .3, .4), joining, dying
(SIGKILL) and rejoining. Their workers (membership_worker.py) meet in a real gloo group and
report their ranks through files; every wait is bounded, and every agent is killed at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aiockpt.elastic.cli import config_from_args, parse_args
from aiockpt.elastic.dynamic import DynamicRendezvousHandler, RendezvousSettings, parse_rdzv_conf
from aiockpt.errors import (
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
)
from tests.elastic.test_prestart import spares_of

SCRIPT = str(Path(__file__).with_name("membership_worker.py"))
LAUNCH = [sys.executable, "-m", "aiockpt.run"]
#: hang guards, not performance bounds (a 2-core machine starts several torch processes)
GROUP_DEADLINE_S = 60.0
EXIT_DEADLINE_S = 60.0
#: short timeouts: a node silent for 2 s is dead (1 s was the most load-sensitive bound left
#: on 2 cores, where several processes import torch at once), a round with enough nodes
#: closes in 0.5 s
CONF = "last_call_timeout=0.5,keep_alive_interval=0.2,keep_alive_max_attempt=10,close_timeout=5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """Agents of one job, each ``aiockpt-run`` on 127.0.0.<n> with a log dir of its own."""

    def __init__(
        self, tmp_path: Path, nnodes: str, endpoint: str, max_restarts: int, conf: str
    ) -> None:
        self.tmp = tmp_path
        self.reports = tmp_path / "running"
        self.nnodes = nnodes
        self.endpoint = endpoint
        self.max_restarts = max_restarts
        self.conf = conf
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        self.outputs: list[Path] = []

    def start(self, n: int) -> subprocess.Popen[bytes]:
        out = self.tmp / f"agent{n}-{len(self.outputs)}.out"
        self.outputs.append(out)
        with out.open("wb") as sink:
            agent = subprocess.Popen(
                [
                    *LAUNCH,
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={self.endpoint}",
                    f"--nnodes={self.nnodes}",
                    "--rdzv-id=membership",
                    f"--rdzv-conf={self.conf}",
                    f"--local-addr=127.0.0.{n}",
                    f"--log-dir={self.tmp / f'logs{n}'}",
                    f"--max-restarts={self.max_restarts}",
                    "--shutdown-timeout=2",
                    SCRIPT,
                    str(self.tmp),
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # killed as a group at the end
            )
        self.agents[n] = agent
        return agent

    def groups(self) -> dict[str, list[dict[str, str]]]:
        """Reports of every group that ran, by ``ws<world size>-port<master port>``."""
        found: dict[str, list[dict[str, str]]] = defaultdict(list)
        for path in self.reports.glob("*.json"):
            found[path.name.rsplit("-rank", 1)[0]].append(json.loads(path.read_text()))
        return found

    def wait_group(
        self, size: int, exclude: frozenset[str] | set[str] = frozenset()
    ) -> list[dict[str, str]]:
        """The reports of a group of ``size`` workers, all running, not among ``exclude``."""
        deadline = time.monotonic() + GROUP_DEADLINE_S
        while time.monotonic() < deadline:
            for name, reports in self.groups().items():
                if name.startswith(f"ws{size}-") and name not in exclude and len(reports) == size:
                    return sorted(reports, key=lambda r: int(r["RANK"]))
            time.sleep(0.05)
        pytest.fail(f"no group of {size} within {GROUP_DEADLINE_S}s:\n{self.logs()}")

    def finish(self) -> None:
        (self.tmp / "finish").touch()

    def wait_exit(self, n: int) -> int:
        try:
            return self.agents[n].wait(EXIT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent {n} still running after {EXIT_DEADLINE_S}s:\n{self.logs()}")

    def kill(self, n: int) -> None:
        """SIGKILL the agent alone: its janitor kills its workers, as a lost node's die."""
        agent = self.agents[n]
        agent.kill()
        agent.wait(EXIT_DEADLINE_S)

    def output(self, n: int) -> str:
        return [p for p in self.outputs if p.name.startswith(f"agent{n}-")][-1].read_text()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.outputs)

    def close(self) -> None:
        for agent in self.agents.values():
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(EXIT_DEADLINE_S)
        # the janitors kill what the agents left; wait until every worker that reported is gone
        pids = {int(r["pid"]) for reports in self.groups().values() for r in reports}
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def cluster(
    tmp_path: Path,
    nnodes: str,
    *,
    endpoint: str | None = None,
    max_restarts: int = 3,
    conf: str = CONF + ",join_timeout=30",
) -> Iterator[Cluster]:
    """Agents hosting their store on 127.0.0.2 (the first node) unless ``endpoint`` says."""
    job = Cluster(tmp_path, nnodes, endpoint or f"127.0.0.2:{free_port()}", max_restarts, conf)
    try:
        yield job
    finally:
        job.close()


def node_ranks(reports: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    return [(r["RANK"], r["GROUP_RANK"], r["WORLD_SIZE"]) for r in reports]


def test_group_grows_as_nodes_join_one_by_one(tmp_path: Path) -> None:
    with cluster(tmp_path, "1:3") as job:
        first = job.start(2)
        one = job.wait_group(1)
        assert node_ranks(one) == [("0", "0", "1")]
        # node 2's spare, pre-started while its group of 1 runs, before node 3 exists
        deadline = time.monotonic() + GROUP_DEADLINE_S
        while not (waiting := spares_of(first.pid) - {int(one[0]["pid"])}):
            assert time.monotonic() < deadline, f"no spare:\n{job.logs()}"
            time.sleep(0.02)
        job.start(3)
        two = job.wait_group(2)
        assert node_ranks(two) == [("0", "0", "2"), ("1", "1", "2")]
        # the larger group's worker on node 2 is that spare: started before the round
        assert int(node_record(two, "0")["pid"]) in waiting
        job.start(4)
        three = job.wait_group(3)
        assert node_ranks(three) == [("0", "0", "3"), ("1", "1", "3"), ("2", "2", "3")]
        # as torch: a node joining restarts the group without spending a restart
        assert {r["TORCHELASTIC_RESTART_COUNT"] for r in one + two + three} == {"0"}
        assert {r["MASTER_ADDR"] for r in three} <= {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
        job.finish()
        assert [job.wait_exit(n) for n in (2, 3, 4)] == [0, 0, 0], job.logs()


def test_killed_node_the_rest_go_on_smaller_then_it_rejoins(tmp_path: Path) -> None:
    with cluster(tmp_path, "1:3") as job:
        for n in (2, 3, 4):
            job.start(n)
        three = job.wait_group(3)
        job.kill(4)
        two = job.wait_group(2)
        assert node_ranks(two) == [("0", "0", "2"), ("1", "1", "2")]
        assert {r["MASTER_PORT"] for r in two}.isdisjoint({r["MASTER_PORT"] for r in three})
        # the survivors either saw their workers fail (a restart spent) or the node go
        assert {r["TORCHELASTIC_RESTART_COUNT"] for r in two} <= {"0", "1"}
        job.start(4)  # a new agent on the lost node's address
        again = job.wait_group(3, exclude={f"ws3-port{three[0]['MASTER_PORT']}"})
        assert node_ranks(again) == [("0", "0", "3"), ("1", "1", "3"), ("2", "2", "3")]
        job.finish()
        assert [job.wait_exit(n) for n in (2, 3, 4)] == [0, 0, 0], job.logs()


def test_below_min_nodes_fails_after_join_timeout(tmp_path: Path) -> None:
    with cluster(tmp_path, "2:3", conf=CONF + ",join_timeout=3") as job:
        job.start(2)
        job.start(3)
        job.wait_group(2)
        job.kill(3)
        started = time.monotonic()
        assert job.wait_exit(2) == 1
        waited = time.monotonic() - started
        output = job.output(2)
        assert "aiockpt-run: rendezvous 'membership': 1 node(s) met (min 2, max 3)" in output
        assert "join_timeout=3.0s" in output
        assert 3.0 <= waited < 30, f"left after {waited:.1f}s"


def test_closed_rendezvous_late_node_exits_0(tmp_path: Path) -> None:
    # the store lives in this process (no agent hosts it: is_host=0), so that it outlives the
    # job and the late node finds the rendezvous closed, not gone
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    endpoint = f"127.0.0.1:{store.port}"
    with cluster(tmp_path, "1:2", endpoint=endpoint, conf=CONF + ",is_host=0") as job:
        job.start(2)
        job.wait_group(1)
        job.finish()
        assert job.wait_exit(2) == 0, job.logs()
        started = time.monotonic()
        job.start(3)
        assert job.wait_exit(3) == 0, job.logs()
        assert time.monotonic() - started < 30
        assert "the rendezvous 'membership' is closed; exiting" in job.output(3)
        assert not list(job.reports.glob("ws2-*")), "the late node ran no worker"


def test_max_restarts_spent_by_a_node_whose_workers_keep_failing(tmp_path: Path) -> None:
    """Each failure of a node's own workers spends one of its restarts; past
    ``--max-restarts`` its agent fails the job (node 3 has group rank 1: nodes sort by
    address). What node 2 spends meanwhile depends on whether its worker or its agent notices
    first (the peer's failure, or the group meeting again), so only node 3 is checked."""
    with cluster(tmp_path, "1:2", max_restarts=1) as job:
        job.start(2)
        job.start(3)
        first = job.wait_group(2)
        os.kill(int(node_record(first, "1")["pid"]), signal.SIGKILL)  # the one restart
        second = job.wait_group(2, exclude={f"ws2-port{first[0]['MASTER_PORT']}"})
        assert node_record(second, "1")["TORCHELASTIC_RESTART_COUNT"] == "1", job.logs()
        os.kill(int(node_record(second, "1")["pid"]), signal.SIGKILL)  # one too many
        assert job.wait_exit(3) == 1
        assert "Root Cause" in job.output(3)


def node_record(records: list[dict[str, str]], group_rank: str) -> dict[str, str]:
    [record] = [r for r in records if r["GROUP_RANK"] == group_rank]
    return record


def test_pet_environment_configures_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_NNODES", "1:4")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "2")
    monkeypatch.setenv("PET_RDZV_BACKEND", "c10d")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "trainer-0:29401")
    monkeypatch.setenv("PET_RDZV_ID", "job7")
    monkeypatch.setenv("PET_RDZV_CONF", "join_timeout=42,keep_alive_interval=1")
    monkeypatch.setenv("PET_MAX_RESTARTS", "5")
    monkeypatch.setenv("PET_MODULE", "1")
    args = parse_args(["--max-restarts=2", "train"])  # the command line wins
    assert args.nnodes == (1, 4)
    assert args.nproc_per_node == "2"
    assert (args.rdzv_backend, args.rdzv_endpoint, args.run_id) == (
        "c10d",
        "trainer-0:29401",
        "job7",
    )
    assert (args.max_restarts, args.module) == (2, True)
    spec, _ = config_from_args(args)
    handler = spec.rdzv_handler
    assert isinstance(handler, DynamicRendezvousHandler)
    settings = handler.settings
    assert (settings.min_nodes, settings.max_nodes, settings.run_id) == (1, 4, "job7")
    assert (settings.join_timeout, settings.keep_alive_interval) == (42.0, 1.0)
    # the rest keep torch's defaults
    assert (settings.last_call_timeout, settings.close_timeout) == (30.0, 30.0)
    assert settings.keep_alive_max_attempt == 3
    assert (handler.host, handler.port) == ("trainer-0", 29401)


def test_bad_pet_value_is_an_argparse_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PET_NNODES", "3:1")
    with pytest.raises(SystemExit) as exited:
        parse_args(["train.py"])
    assert exited.value.code == 2
    assert "argument --nnodes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nnodes=1:2"], "a range of nodes needs --rdzv-backend c10d"),
        (["--rdzv-backend=c10d", "--nnodes=1:2"], "needs --rdzv-endpoint"),
        (["--rdzv-backend=c10d", "--rdzv-endpoint=h", "--rdzv-conf=join_timeout"], "key=value"),
        (["--rdzv-backend=c10d", "--rdzv-endpoint=h", "--rdzv-conf=join_timeout=-1"], "positive"),
    ],
)
def test_inconsistent_rendezvous_flags_are_rejected(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_args(parse_args([*argv, "train.py"]))


def test_rdzv_conf_parsing() -> None:
    assert parse_rdzv_conf("") == {}
    assert parse_rdzv_conf("a=1, b = x,") == {"a": "1", "b": "x"}


# -- the handler in-process, on both loops ---------------------------------------------------


@contextmanager
def external_store() -> Iterator[str]:
    """A TCPStore server owned by the test; yields its endpoint."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield f"127.0.0.1:{store.port}"
    finally:
        del store


def handler(
    endpoint: str, min_nodes: int, max_nodes: int, **timeouts: float
) -> DynamicRendezvousHandler:
    settings = RendezvousSettings(
        "inproc",
        min_nodes,
        max_nodes,
        join_timeout=timeouts.get("join_timeout", 20.0),
        last_call_timeout=timeouts.get("last_call_timeout", 0.2),
        keep_alive_interval=0.2,
        keep_alive_max_attempt=5,
        close_timeout=5.0,
    )
    return DynamicRendezvousHandler(settings, endpoint, local_addr="127.0.0.1", is_host=False)


async def test_handler_wait_list_wakes_the_running_node_and_both_meet() -> None:
    with external_store() as endpoint:
        first, second = handler(endpoint, 1, 2), handler(endpoint, 1, 2)
        try:
            alone = await asyncio.wait_for(first.next_rendezvous(), 20)
            assert (alone.rank, alone.world_size) == (0, 1)
            watch = asyncio.create_task(first.wait_for_membership_change())
            joining = asyncio.create_task(second.next_rendezvous())
            reason = await asyncio.wait_for(watch, 20)  # woken by the store, not a timer
            assert reason == "1 node(s) waiting to join"
            assert await first.num_nodes_waiting() == 1
            both = await asyncio.wait_for(asyncio.gather(first.next_rendezvous(), joining), 20)
            assert sorted(info.rank for info in both) == [0, 1]
            assert {info.world_size for info in both} == {2}
            assert {info.round for info in both} == {1}
            assert await first.num_nodes_waiting() == 0
            # closing: a late node is turned away, gracefully
            assert await first.shutdown()
            assert await second.is_closed()
            late = handler(endpoint, 1, 2)
            with pytest.raises(RendezvousClosedError, match="closed"):
                await asyncio.wait_for(late.next_rendezvous(), 20)
            assert issubclass(RendezvousClosedError, RendezvousGracefulExitError)
            await late.stop()
        finally:
            for h in (first, second):
                await h.stop()


async def test_handler_below_min_times_out_and_gives_its_place_back() -> None:
    with external_store() as endpoint:
        lonely = handler(endpoint, 2, 3, join_timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(RendezvousTimeoutError, match=r"1 node\(s\) met \(min 2, max 3\)"):
                await asyncio.wait_for(lonely.next_rendezvous(), 20)
            assert 0.5 <= time.monotonic() - started < 10
            # a node that gave up holds no place: the next two meet without it
            pair = [handler(endpoint, 2, 3), handler(endpoint, 2, 3)]
            met = await asyncio.wait_for(asyncio.gather(*(h.next_rendezvous() for h in pair)), 20)
            assert {info.world_size for info in met} == {2}
            for h in pair:
                await h.stop()
        finally:
            await lonely.stop()


def test_agent_fds_and_threads_stay_flat_over_membership_changes(tmp_path: Path) -> None:
    # node B joins and leaves 6 times; node A's agent is looked at after each change, once the
    # new group runs (benchmarks/bench_membership.py does 50): 6 looks per size, so that a
    # leak of one fd per change moves the later looks' median by 3, past what fds_flat allows
    from benchmarks.bench_membership import churn, fds_flat

    workers = 6
    samples = churn(12, tmp_path, nproc_per_node=workers)
    assert [nodes for nodes, _, _ in samples] == [2, 1] * 6
    for nodes in (1, 2):
        seen = [fds for n, fds, _ in samples if n == nodes]
        assert fds_flat(seen), (nodes, samples)  # nothing accumulates per change
    threads = {threads for _, _, threads in samples}
    # the same with 1 node (6 workers) as with 2 (12): no thread per node or per worker
    assert len(threads) == 1 and threads.pop() < workers, samples


#: a rendezvous node in a process of its own, so that the test can SIGKILL it
_PEER_NODE = """
import asyncio, sys
from aiockpt.elastic.dynamic import DynamicRendezvousHandler, RendezvousSettings

async def main():
    settings = RendezvousSettings("inproc", 2, 2, keep_alive_interval=1200.0)
    peer = DynamicRendezvousHandler(settings, sys.argv[1], local_addr="127.0.0.1", is_host=False)
    info = await peer.next_rendezvous()
    print(info.world_size, flush=True)
    await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


async def test_a_killed_node_is_found_gone_at_once_not_at_its_keep_alive_expiry() -> None:
    """A node whose process dies is removed when it dies: with a keep-alive expiry of an
    hour, only the liveness connection can tell the survivor within the test's bound."""
    with external_store() as endpoint:
        settings = RendezvousSettings("inproc", 2, 2, keep_alive_interval=1200.0)
        survivor = DynamicRendezvousHandler(
            settings, endpoint, local_addr="127.0.0.1", is_host=False
        )
        peer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PEER_NODE, endpoint, stdout=asyncio.subprocess.PIPE
        )
        try:
            info = await asyncio.wait_for(survivor.next_rendezvous(), 60)
            assert peer.stdout is not None
            assert (await asyncio.wait_for(peer.stdout.readline(), 60)).strip() == b"2"
            assert info.world_size == 2
            watch = asyncio.create_task(survivor.wait_for_membership_change())
            peer.kill()
            assert await asyncio.wait_for(watch, 60) == "a node left the group"
        finally:
            if peer.returncode is None:
                peer.kill()
            await peer.wait()
            await survivor.stop()


#: a fresh interpreter (torch not imported yet) meets a 1-node rendezvous of the kind in
#: argv[1] (at the store endpoint argv[2], for c10d) and prints the thread that imported torch
_FIRST_IMPORT = """
import asyncio, sys, threading
from aiockpt.elastic.dynamic import DynamicRendezvousHandler, RendezvousSettings
from aiockpt.elastic.rendezvous import StaticRendezvous

threads = []
def hook(event, args):
    if event == "import" and args[0] == "torch" and "torch" not in sys.modules:
        threads.append(threading.current_thread().name)
sys.addaudithook(hook)

async def main():
    if sys.argv[1] == "static":
        await StaticRendezvous(nnodes=1).next_rendezvous()
    else:
        settings = RendezvousSettings("inproc", 1, 1)
        node = DynamicRendezvousHandler(
            settings, sys.argv[2], local_addr="127.0.0.1", is_host=False
        )
        await node.next_rendezvous()
        await node.stop()

asyncio.run(main())
print(threads)
"""


@pytest.mark.parametrize("kind", ["static", "c10d"])
def test_the_rendezvous_imports_torch_in_a_thread_not_on_the_event_loop(kind: str) -> None:
    """A first ``import torch`` takes seconds: on the agent's loop thread it would stall the
    loop (signals, worker monitoring) while a node connects."""
    with external_store() as endpoint:
        done = subprocess.run(
            [sys.executable, "-c", _FIRST_IMPORT, kind, endpoint],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    threads = done.stdout.strip().splitlines()[-1]
    assert threads.startswith("['") and "MainThread" not in threads, threads
