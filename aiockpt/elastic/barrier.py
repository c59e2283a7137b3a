"""The exit barrier: a node whose workers succeeded waits for the other nodes before leaving.

Without it, node 0 (which hosts the store) could exit while slower nodes still need the store,
failing them for no reason of their own. torchelastic's algorithm and keys: each node adds 1
to a counter; the node that brings it to ``world_size`` sets the last-member key; everyone
waits for that key. A timeout is logged, not a failure: the local workers did succeed.
Only the success path enters the barrier; a failed node leaves at once (the others time out).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from aiockpt.elastic.rendezvous import run_blocking

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store

__all__ = ["TERMINAL_STATE_SYNC_ID", "exit_barrier"]

logger = logging.getLogger(__name__)

TERMINAL_STATE_SYNC_ID = "torchelastic/agent/terminal_state"


async def exit_barrier(
    store: Store, world_size: int, timeout_s: float, key_prefix: str = TERMINAL_STATE_SYNC_ID
) -> bool:
    """Wait up to ``timeout_s`` seconds for ``world_size`` nodes to arrive at ``key_prefix``.

    Returns whether all arrived. Never raises for a timeout or a store error (both logged);
    cancellation propagates (the waiting thread is abandoned, see :func:`run_blocking`).
    """
    if world_size <= 1:
        return True
    last_member_key = f"{key_prefix}/last_member"

    def arrive_and_wait() -> None:
        if store.add(f"{key_prefix}/num_members", 1) == world_size:
            store.set(last_member_key, "<val_ignored>")
        store.wait([last_member_key], timedelta(seconds=timeout_s))

    start = time.monotonic()
    logger.info("local workers finished; waiting up to %ss for %s nodes", timeout_s, world_size)
    try:
        await run_blocking(arrive_and_wait, "aiockpt-exit-barrier")
    except RuntimeError:  # torch's DistStoreError (timeout) and DistNetworkError
        logger.exception(
            "exit barrier: not every node arrived within %.1fs (waited %.1fs)",
            timeout_s,
            time.monotonic() - start,
        )
        return False
    logger.info("exit barrier passed after %.3fs", time.monotonic() - start)
    return True
