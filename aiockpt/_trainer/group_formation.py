"""The checkpoint workers' own group, formed once per ``Checkpointer`` from the trainers'.

Theory of operation
-------------------
When ``torch.distributed`` is initialised with several ranks, each rank's checkpoint worker
joins a group of the workers alone (never the trainers' process group). Rank 0 decides where
they meet and posts it in the trainers' *store* (the one their process group was created
with); the other ranks wait for that key, within the coordination timeout. No collective runs
on the trainers' process group: forming the group, lazily at the first save or at ``start``,
may happen in a thread while the training loop runs collectives of its own, and only a store
is safe to use that way. Where they meet:

* by default, a ``TCPStore`` server of the Checkpointer's own, in rank 0's *trainer*, bound to
  port 0: the kernel picks a free port and the server holds it from that moment, so there is
  no window between choosing a port and binding it for another process to take. Its address
  is ``MASTER_ADDR``, or this host's fully qualified name. Hosting it in the trainer rather
  than in rank 0's worker (as torch does) keeps it alive when a worker dies, so every rank
  learns of the crash through it and the replacement joins the same store;
* with ``DCP_USE_PREFIX_STORE=1`` (or ``use_prefix_store=True``), the trainers' store at
  ``MASTER_ADDR:MASTER_PORT`` under the prefix ``AsyncCheckpointProcess/``, as torch does.

Either way the keys live under a random session id, so two Checkpointers never meet. The
workers use the store to coordinate each save (``aiockpt._wire.coordination``) and to form their
gloo process group; the trainers use it to report a save that failed on their side.

The key rank 0 posts is named by the Checkpointer (its root), by how many Checkpointers of
that name this process formed before, and by torchelastic's restart count, so that a
restarted job never reads the key of the attempt before it from a store that outlived it.
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec
import torch.distributed as dist
from torch._C._distributed_c10d import Store, TCPStore

from aiockpt._wire.coordination import connect_store, translate_store_errors
from aiockpt._wire.protocol import GroupInfo
from aiockpt.errors import CoordinationTimeout

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PREFIX_STORE_PREFIX",
    "TrainerGroup",
    "form_group",
    "reserve_group_key",
    "world_of",
]

#: how long a rank waits for another at any step of a save, unless configured
DEFAULT_TIMEOUT_S = 300.0
#: the prefix under the trainers' store in the ``DCP_USE_PREFIX_STORE`` mode (torch's)
PREFIX_STORE_PREFIX = "AsyncCheckpointProcess/"


@dataclass
class TrainerGroup:
    """One rank's handle on its Checkpointer's worker group."""

    info: GroupInfo
    #: the session's keys, as this trainer reaches them
    store: Store
    #: rank 0's own store server (default mode); it lives as long as this object
    server: TCPStore | None = None


def world_of(process_group: Any = None) -> tuple[int, int] | None:
    """``(rank, world size)`` in ``process_group`` (default: the world) when
    ``torch.distributed`` is initialised with more than one rank, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size(process_group)
    return (dist.get_rank(process_group), world_size) if world_size > 1 else None


class _Choice(msgspec.Struct, frozen=True):
    """What rank 0 broadcasts: where to meet, or why it could not say."""

    addr: str = ""
    port: int = 0
    prefix: str = ""
    session: str = ""
    error: str | None = None


#: name -> how many group keys of that name this process has reserved
_reserved: dict[str, int] = {}


def reserve_group_key(name: str) -> str:
    """The store key under which rank 0 will say where the workers of the next Checkpointer
    named ``name`` meet. Every rank reserves one per Checkpointer, in the order they create
    them, so the ranks' keys agree; retries of a failed formation keep their key."""
    count = _reserved.get(name, 0)
    _reserved[name] = count + 1
    # Not the restart count: it is each agent's own (a node that joined later has spent
    # fewer restarts), so the ranks of one group may disagree on it and would wait on
    # different keys. A relaunched group meets in a store of its own anyway (torch creates a
    # new one for every retry, aiockpt-run for every attempt and membership round).
    return f"aiockpt/group/{count}/{name}"


def form_group(
    process_group: Any = None,
    *,
    key: str,
    use_prefix_store: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TrainerGroup:
    """Agree with the other ranks on where the workers meet, through the store of
    ``process_group`` (no collective), at ``key`` (from ``reserve_group_key``). Blocking:
    run it in a thread.

    ``use_prefix_store`` None reads ``DCP_USE_PREFIX_STORE``. Raises ValueError on every rank
    when rank 0 cannot choose (prefix store without ``MASTER_ADDR`` or ``MASTER_PORT``),
    ``CoordinationTimeout`` when rank 0 does not post its choice within ``timeout_s``,
    ``CoordinationError`` when the trainers' store fails or the chosen store cannot be
    reached within ``timeout_s``, and RuntimeError when ``torch.distributed`` is not
    initialised with several ranks.
    """
    world = world_of(process_group)
    if world is None:
        raise RuntimeError("form_group needs torch.distributed initialised with several ranks")
    rank, world_size = world
    if use_prefix_store is None:
        use_prefix_store = os.environ.get("DCP_USE_PREFIX_STORE", "0") == "1"
    trainers_store = _store_of(process_group)
    timeout = datetime.timedelta(seconds=timeout_s)
    server: TCPStore | None = None
    if rank == 0:
        try:
            choice, server = _choose(use_prefix_store, timeout_s)
        except ValueError as exc:
            choice = _Choice(error=str(exc))
        with translate_store_errors(f"posting where the checkpoint workers meet ({key!r})"):
            trainers_store.set(key, msgspec.msgpack.encode(choice))  # type: ignore[arg-type]
    else:
        try:
            trainers_store.wait([key], timeout)
        except dist.DistError as exc:
            raise CoordinationTimeout(
                f"rank 0 did not say where the checkpoint workers meet within "
                f"{timeout_s} s (store key {key!r}): did every rank create the Checkpointer "
                f"and save or start it? ({exc})",
                rank=0,
            ) from None
        with translate_store_errors(f"reading where the checkpoint workers meet ({key!r})"):
            posted = trainers_store.get(key)
        choice = msgspec.msgpack.decode(posted, type=_Choice)
    if choice.error is not None:
        raise ValueError(f"{choice.error} (reported by rank 0)")
    info = GroupInfo(
        addr=choice.addr,
        port=choice.port,
        prefix=choice.prefix,
        session=choice.session,
        rank=rank,
        world_size=world_size,
        local_rank=dist.get_node_local_rank(fallback_rank=rank),
        timeout_s=timeout_s,
    )
    return TrainerGroup(info, connect_store(info, base=server), server)


def _store_of(process_group: Any) -> Store:
    """The store ``process_group`` (default: the world) was created with; its key space is
    the group's own."""
    from torch.distributed.distributed_c10d import _get_default_group, _world

    group = _get_default_group() if process_group is None else process_group
    return _world.pg_map[group][1]


def _choose(use_prefix_store: bool, timeout_s: float) -> tuple[_Choice, TCPStore | None]:
    session = secrets.token_hex(8)
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_prefix_store:
        addr = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        for name, value in (("MASTER_ADDR", addr), ("MASTER_PORT", port)):
            if not value:
                raise ValueError(
                    f"DCP_USE_PREFIX_STORE=1 makes the checkpoint workers share the trainers' "
                    f"store at MASTER_ADDR:MASTER_PORT, but {name} is not set"
                )
        assert addr is not None and port is not None
        return _Choice(addr, int(port), PREFIX_STORE_PREFIX, session), None
    addr = os.environ.get("MASTER_ADDR") or _fully_qualified_hostname()
    server = TCPStore(addr, 0, is_master=True, wait_for_workers=False, timeout=timeout)
    return _Choice(addr, server.port, "", session), server


def _fully_qualified_hostname() -> str:
    from torch.distributed.elastic.agent.server.api import _get_fq_hostname

    return _get_fq_hostname()
