"""Several agents on 127.0.0.1, one per "node", meeting over node 0's TCPStore: rank
assignment, the workers' own process group, and the exit barrier."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from aiockpt.elastic import LocalElasticAgent, RunResult, StaticRendezvous, WorkerSpec, WorkerState
from tests.elastic import workers

RUN_ID = "multinode"


async def run_nodes(
    nodes: list[tuple[str, int]],
    entrypoint: Any,
    *args: Any,
    exit_barrier_timeout: float = 30.0,
) -> list[tuple[RunResult, float]]:
    """Run one agent per ``(role, local_world_size)``; return each result and the wall-clock
    time at which its ``run()`` returned. Node 0 binds a free port that the others learn."""
    finished: list[float] = [0.0] * len(nodes)

    def agent_for(node_rank: int, master_port: int) -> LocalElasticAgent:
        role, nproc = nodes[node_rank]
        rendezvous = StaticRendezvous(
            nnodes=len(nodes),
            node_rank=node_rank,
            master_port=master_port,
            run_id=RUN_ID,
            timeout=30,
        )
        spec = WorkerSpec(role, nproc, entrypoint, args, max_restarts=0, rdzv_handler=rendezvous)
        # several agents share this process: none of them may take over its signals
        return LocalElasticAgent(
            spec, exit_barrier_timeout=exit_barrier_timeout, signals_to_handle=()
        )

    async def run(node_rank: int, agent: LocalElasticAgent) -> RunResult:
        result = await agent.run()
        finished[node_rank] = time.time()
        return result

    first = agent_for(0, 0)
    rendezvous = first.worker_group.spec.rdzv_handler
    assert rendezvous is not None
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(run(0, first))]
        await asyncio.wait_for(rendezvous.store_ready.wait(), 30)
        for node_rank in range(1, len(nodes)):
            agent = agent_for(node_rank, rendezvous.master_port)
            tasks.append(group.create_task(run(node_rank, agent)))
    return [(task.result(), finished[i]) for i, task in enumerate(tasks)]


async def test_rank_assignment_three_agents_two_roles() -> None:
    nodes = [("trainer", 2), ("reader", 1), ("trainer", 1)]
    outcomes = await run_nodes(nodes, workers.env_and_args)
    envs = {}
    for node_rank, (result, _) in enumerate(outcomes):
        assert result.state == WorkerState.SUCCEEDED
        for global_rank, env in result.return_values.items():
            assert env["RANK"] == str(global_rank)
            assert env["GROUP_RANK"] == str(node_rank)
            envs[global_rank] = env
    # global ranks are consecutive per node, in node order
    assert sorted(envs) == [0, 1, 2, 3]
    assert [envs[r]["GROUP_RANK"] for r in range(4)] == ["0", "0", "1", "2"]
    assert [envs[r]["LOCAL_RANK"] for r in range(4)] == ["0", "1", "0", "0"]
    assert {envs[r]["WORLD_SIZE"] for r in range(4)} == {"4"}
    assert {envs[r]["GROUP_WORLD_SIZE"] for r in range(4)} == {"3"}
    # role ranks count per role
    assert [envs[r]["ROLE_NAME"] for r in range(4)] == ["trainer", "trainer", "reader", "trainer"]
    assert [envs[r]["ROLE_RANK"] for r in range(4)] == ["0", "1", "0", "2"]
    assert [envs[r]["ROLE_WORLD_SIZE"] for r in range(4)] == ["3", "3", "1", "3"]
    assert [envs[r]["LOCAL_WORLD_SIZE"] for r in range(4)] == ["2", "2", "1", "1"]
    assert len({envs[r]["MASTER_PORT"] for r in range(4)}) == 1


async def test_two_agents_workers_join_one_process_group() -> None:
    """The workers' env:// rendezvous goes through node 0's agent store: an all-reduce over
    the 3 workers of 2 agents sums every global rank."""
    outcomes = await run_nodes([("trainer", 1), ("trainer", 2)], workers.all_reduce_ranks)
    values = {rank: v for result, _ in outcomes for rank, v in result.return_values.items()}
    assert values == {0: 3.0, 1: 3.0, 2: 3.0}


async def test_workers_finishing_apart_pass_the_barrier(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiockpt.elastic.barrier")
    outcomes = await run_nodes([("trainer", 1), ("trainer", 1)], workers.sleep_then_finish, {1: 2})
    (early, early_left), (late, _) = outcomes
    assert early.state == late.state == WorkerState.SUCCEEDED
    late_finish = late.return_values[1]
    assert early.return_values[0] < late_finish - 1, "node 1 really finished later"
    assert early_left >= late_finish, "node 0 waited in the exit barrier for node 1"
    assert caplog.text.count("exit barrier passed") == 2
    assert "not every node arrived" not in caplog.text


async def test_no_exit_barrier_on_failure(caplog: pytest.LogCaptureFixture) -> None:
    """Node 1 fails: it leaves without arriving, so node 0 (which succeeded) times out in
    the barrier, logs it, and still reports success."""
    caplog.set_level(logging.INFO, logger="aiockpt.elastic.barrier")
    outcomes = await run_nodes(
        [("trainer", 1), ("trainer", 1)],
        workers.fail_on_first_attempt,
        1,
        exit_barrier_timeout=1.0,
    )
    (succeeded, _), (failed, _) = outcomes
    assert failed.state == WorkerState.FAILED
    assert failed.failures[1].message == "RuntimeError: rank 1 fails on attempt 0"
    assert succeeded.state == WorkerState.SUCCEEDED
    assert caplog.text.count("waiting up to") == 1, "only the successful node entered"
    assert "not every node arrived within 1.0s" in caplog.text
