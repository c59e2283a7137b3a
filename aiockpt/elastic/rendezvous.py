"""Static rendezvous over ``torch.distributed.TCPStore``: how the agents of a job meet.

Node 0 hosts the store on ``master_addr:master_port`` (port 0: any free port); every node
connects to it, publishes its role and local world size, and node 0 hands out ranks with
torchelastic's algorithm and keys (global ranks consecutive per node in node order, role ranks
counted per role). The workers then use the same store as their ``env://`` store
(``TORCHELASTIC_USE_AGENT_STORE``), so no second port has to be found free.

Every store call blocks in C++. They run in daemon threads through :func:`run_blocking`: not
``asyncio.to_thread``, whose executor is joined when the loop closes and at interpreter exit,
so a wait abandoned on a signal would hold the agent's exit hostage until the store timeout.
``torch`` is imported lazily, so that workers importing this package stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from aiockpt.elastic.spec import Worker, WorkerSpec
from aiockpt.errors import RendezvousError

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store, TCPStore

__all__ = ["RendezvousInfo", "StaticRendezvous", "assign_worker_ranks", "run_blocking"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_ROLE_INFO_PREFIX = "torchelastic/role_info/"
_ASSIGNED_RANKS_PREFIX = "torchelastic/assigned_ranks/"


async def run_blocking(fn: Callable[[], _T], name: str) -> _T:
    """Run the blocking ``fn`` in a daemon thread named ``name`` and await its result.

    Cancelling the await abandons the thread (it ends when ``fn`` returns or the process
    exits) instead of waiting for it. Raises what ``fn`` raises.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        outcome: Callable[[], None]
        try:
            outcome = functools.partial(future.set_result, fn())
        except BaseException as exc:
            outcome = functools.partial(future.set_exception, exc)
        # the loop may be gone if the caller gave up and the program moved on
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def import_torch_distributed() -> None:
    """The first ``import torch.distributed``, to run in a thread (``run_blocking``): it
    takes seconds, and must not stall the agent's loop. A function of its own, holding
    nothing: torch keeps some frames of its import stack alive, and with them the frames of
    whoever imported it first."""
    import torch.distributed  # noqa: F401


@dataclass
class RendezvousInfo:
    """What a node learns at rendezvous."""

    store: Store
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    #: the dynamic rendezvous' round (``None``: static, one store for every attempt)
    round: int | None = None


class StaticRendezvous:
    """A fixed set of ``nnodes`` agents; this one is ``node_rank``.

    ``master_port`` 0 (or ``None``) lets node 0 pick a free port, readable from
    ``master_port`` once ``store_ready`` is set; other nodes need the real port.
    ``run_id`` names the job (log directories, ``TORCHELASTIC_RUN_ID``); ``timeout`` bounds
    the meeting and the store's blocking calls. Raises ``ValueError`` for inconsistent values.
    """

    def __init__(
        self,
        nnodes: int = 1,
        node_rank: int = 0,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        run_id: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        if not 0 <= node_rank < nnodes:
            raise ValueError(f"node_rank {node_rank} is not in [0, nnodes={nnodes})")
        if node_rank > 0 and not master_port:
            raise ValueError("nodes other than node 0 need the master's port")
        self.nnodes = nnodes
        self.node_rank = node_rank
        self.master_addr = master_addr
        self.master_port = master_port or 0
        self.run_id = run_id or uuid.uuid4().hex
        self.timeout = timeout
        #: set once this node's store is up (on node 0: listening on ``master_port``)
        self.store_ready = asyncio.Event()
        self._store: TCPStore | None = None

    def get_run_id(self) -> str:
        return self.run_id

    async def next_rendezvous(self) -> RendezvousInfo:
        """Host (node 0) or join the store. Raises ``RendezvousError`` if the store cannot be
        created or reached within ``timeout``."""
        if self._store is None:
            await run_blocking(import_torch_distributed, "aiockpt-rendezvous-import")

            def connect() -> TCPStore:
                from torch.distributed import TCPStore  # type: ignore[attr-defined]

                return TCPStore(
                    self.master_addr,
                    self.master_port,
                    world_size=self.nnodes,
                    is_master=self.node_rank == 0,
                    timeout=timedelta(seconds=self.timeout),
                    wait_for_workers=False,
                )

            try:
                self._store = await run_blocking(connect, "aiockpt-rendezvous")
            except (RuntimeError, OSError) as exc:  # torch's DistError is a RuntimeError
                raise RendezvousError(
                    f"node {self.node_rank}: no store at {self.master_addr}:{self.master_port}"
                    f" within {self.timeout}s: {exc}"
                ) from exc
            self.master_port = self._store.port
            self.store_ready.set()
        return RendezvousInfo(
            self._store, self.node_rank, self.nnodes, self.master_addr, self.master_port
        )

    def close(self) -> None:
        """Drop this node's store (on node 0 that stops the server)."""
        self._store = None


async def assign_worker_ranks(
    store: Store, group_rank: int, group_world_size: int, spec: WorkerSpec, timeout_s: float
) -> list[Worker]:
    """Ranks for this node's workers, as torchelastic assigns them over the store.

    Each node publishes ``(role, group_rank, local_world_size)``; node 0 reads them all and
    writes each node's ``[base_global_rank, world_size, base_role_rank, role_world_size]``.
    A single node needs no exchange. Raises ``RendezvousError`` if a node does not show up
    within ``timeout_s``.
    """
    if group_world_size == 1:
        size = spec.local_world_size
        return [Worker(i, i, i, size, size) for i in range(size)]

    def exchange() -> list[int]:
        store.set(
            f"{_ROLE_INFO_PREFIX}{group_rank}",
            json.dumps([spec.role, group_rank, spec.local_world_size]),
        )
        if group_rank == 0:
            keys = [f"{_ROLE_INFO_PREFIX}{i}" for i in range(group_world_size)]
            infos = [json.loads(raw) for raw in store.multi_get(keys)]
            role_sizes: dict[str, int] = defaultdict(int)
            for role, _, size in infos:
                role_sizes[role] += size
            global_size = sum(role_sizes.values())
            role_ranks: dict[str, int] = defaultdict(int)
            base_global_rank = 0
            assigned = []
            for role, _, size in infos:
                assigned.append(
                    json.dumps([base_global_rank, global_size, role_ranks[role], role_sizes[role]])
                )
                base_global_rank += size
                role_ranks[role] += size
            for i, node_ranks in enumerate(assigned):
                store.set(f"{_ASSIGNED_RANKS_PREFIX}{i}", node_ranks)
        # get blocks until node 0 has written the assignment
        ranks: list[int] = json.loads(store.get(f"{_ASSIGNED_RANKS_PREFIX}{group_rank}"))
        return ranks

    try:
        base_global_rank, world_size, base_role_rank, role_world_size = await asyncio.wait_for(
            run_blocking(exchange, "aiockpt-assign-ranks"), timeout_s
        )
    except (RuntimeError, TimeoutError) as exc:
        raise RendezvousError(f"node {group_rank}: rank assignment failed: {exc}") from exc
    return [
        Worker(
            local_rank=i,
            global_rank=base_global_rank + i,
            role_rank=base_role_rank + i,
            world_size=world_size,
            role_world_size=role_world_size,
        )
        for i in range(spec.local_world_size)
    ]
