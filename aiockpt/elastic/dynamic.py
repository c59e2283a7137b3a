"""Dynamic rendezvous over ``torch.distributed.TCPStore``: torch's c10d backend semantics.

Between ``min_nodes`` and ``max_nodes`` agents meet in rounds. The shared state is one JSON
blob in the store, changed only by ``compare_set`` (optimistic concurrency, as torch's
``C10dRendezvousBackend``); each successful change to version ``v`` then sets the key
``changed/<v>``, so that a node waiting for the state to move past ``v`` blocks in a store
``wait`` on ``changed/<v+1>`` (in a daemon thread, :func:`run_blocking`) instead of polling.

A round (torch's ``_RendezvousJoinOp``): a node joining an open round becomes a participant;
at ``max_nodes`` the round completes at once, from ``min_nodes`` on it completes when the
last call (``last_call_timeout``) expires. A node arriving at a complete round goes on the
wait list; :meth:`DynamicRendezvousHandler.num_nodes_waiting` > 0 tells the running agents
to stop their workers and meet again. A node leaving a complete round (to meet again) drops
out of its participants; the last one to leave opens the next round. Nodes heartbeat every
``keep_alive_interval``; one silent for ``keep_alive_max_attempt`` intervals is dead, and
whoever reads the state removes it. A node whose *process* died is found at once instead
(:class:`_PeerLiveness`): every agent listens on a port of its own and every other agent
holds a connection to it, which the kernel closes when the process dies, however it dies.
A closed rendezvous (the job is over) turns joiners away with :class:`RendezvousClosedError`.

Each round's agents and workers use the store under a prefix of their own (``round/<n>/``),
so a new round never reads the rank assignment or barrier keys of the last one. These are
our own keys, not wire-compatible with torch's agents; the semantics are torch's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from aiockpt.elastic.rendezvous import RendezvousInfo, import_torch_distributed, run_blocking
from aiockpt.errors import RendezvousClosedError, RendezvousError, RendezvousTimeoutError

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store, TCPStore

__all__ = [
    "DEFAULT_RDZV_PORT",
    "DynamicRendezvousHandler",
    "RendezvousSettings",
    "parse_rdzv_conf",
]

logger = logging.getLogger(__name__)

DEFAULT_RDZV_PORT = 29400  # torch's c10d backend default
#: how long one blocking store call may take when nothing else bounds it (connect, get, set)
_STORE_OP_TIMEOUT_S = 60.0
#: how long one store wait for a state change blocks (the callers bound their own waits)
_CHANGE_WAIT_S = 3600.0
#: how long after a node's heartbeat expires a waiting node looks at the state again
_EXPIRY_MARGIN_S = 0.05
#: how long connecting to a peer's liveness port may take before the keep-alive decides
_LIVENESS_CONNECT_S = 5.0


@dataclass(frozen=True)
class RendezvousSettings:
    """torch's ``RendezvousSettings`` and ``--rdzv-conf`` timeouts, with torch's defaults.

    Raises ``ValueError`` for ``min_nodes`` < 1, ``max_nodes`` < ``min_nodes`` or a
    non-positive timeout.
    """

    run_id: str
    min_nodes: int
    max_nodes: int
    join_timeout: float = 600.0
    last_call_timeout: float = 30.0
    close_timeout: float = 30.0
    keep_alive_interval: float = 5.0
    keep_alive_max_attempt: int = 3

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {self.min_nodes}")
        if self.max_nodes < self.min_nodes:
            raise ValueError(f"max_nodes {self.max_nodes} is less than min_nodes {self.min_nodes}")
        for name in ("join_timeout", "last_call_timeout", "close_timeout", "keep_alive_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.keep_alive_max_attempt < 1:
            raise ValueError(
                f"keep_alive_max_attempt must be >= 1, got {self.keep_alive_max_attempt}"
            )

    @property
    def keep_alive_expiry(self) -> float:
        """Seconds of silence after which a node counts as dead."""
        return self.keep_alive_interval * self.keep_alive_max_attempt


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """torchrun's ``--rdzv-conf`` syntax, ``key1=value1,key2=value2``. Raises ``ValueError``
    for an item without ``=``."""
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--rdzv-conf: expected key=value, got {item!r}")
        conf[key.strip()] = value.strip()
    return conf


@dataclass
class _State:
    """The shared rendezvous state (torch's ``_RendezvousState``, heartbeats kept apart)."""

    version: int = 0
    round: int = 0
    complete: bool = False
    closed: bool = False
    #: wall-clock time at which an open round with enough participants completes
    deadline: float | None = None
    #: node -> rank (ranks are meaningful once the round is complete)
    participants: dict[str, int] = field(default_factory=dict)
    wait_list: list[str] = field(default_factory=list)

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, raw: bytes) -> _State:
        return cls(**json.loads(raw))


@dataclass
class _Round:
    """What this node took part in: the complete round it last joined."""

    round: int
    participants: frozenset[str]


def _node_addr(node: str) -> str:
    return node.rsplit("_", 2)[0]


def _resolve(host: str) -> str:
    """``host``'s IP address (blocking). Raises ``OSError`` for a name that does not
    resolve."""
    return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])


def _listening_socket(host: str) -> socket.socket:
    """A non-blocking socket listening on ``host``, port chosen by the kernel (blocking)."""
    address = _resolve(host)
    listening = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        listening.bind((address, 0))
        listening.listen()
        listening.setblocking(False)
    except OSError:
        listening.close()
        raise
    return listening


async def _connect(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``address`` (an IP address), within ``_LIVENESS_CONNECT_S``: connected by
    hand, as the loops' own connect resolves even an address in a thread pool they keep.
    Raises ``ConnectionRefusedError`` when nothing listens there, ``TimeoutError``, or
    another ``OSError``."""
    loop = asyncio.get_running_loop()
    connecting = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        connecting.setblocking(False)
        error = connecting.connect_ex((address, port))
        if error == errno.EINPROGRESS:
            writable: asyncio.Future[None] = loop.create_future()

            def connected() -> None:
                if not writable.done():
                    writable.set_result(None)

            loop.add_writer(connecting.fileno(), connected)
            try:
                await asyncio.wait_for(writable, _LIVENESS_CONNECT_S)
            finally:
                loop.remove_writer(connecting.fileno())
            error = connecting.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error), f"{address}:{port}")
        return await asyncio.open_connection(sock=connecting)
    except BaseException:
        connecting.close()
        raise


class _PeerLiveness:
    """Learns that a peer agent's process died when it dies, not when its keep-alive expires
    (15 s at torch's defaults).

    Each agent listens on a port of its own (published in the store beside its heartbeat),
    and each other agent holds one connection to it, reading until EOF. The kernel closes a
    dead process's sockets, so its watchers read EOF at once. An EOF is confirmed by
    connecting again: *refused* means nothing listens there any more (the process is gone, or
    its agent stopped); a connection that goes through was a hiccup and the watch goes on. A
    peer that cannot be reached at all (its machine gone, a firewall) is left to the
    keep-alive expiry, as in torch. Tasks only: no thread per peer.
    """

    def __init__(self) -> None:
        self.port = 0  # 0: not listening (the peers rely on keep-alive for this node)
        #: nodes found dead; read by :meth:`DynamicRendezvousHandler._sanitize` (a thread)
        self.lost: set[str] = set()
        #: set when a node is found dead: wakes a node waiting for the state to change
        self.found_lost = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._held: set[asyncio.StreamWriter] = set()

    async def listen(self, host: str) -> None:
        if self._server is not None:
            return
        try:
            # Bound in a thread that ends: given a host, the loop would resolve it in a
            # thread pool it keeps for good (uvloop: four threads, even for an address).
            listening = await run_blocking(lambda: _listening_socket(host), "aiockpt-rdzv-listen")
            self._server = await asyncio.start_server(self._hold, sock=listening)
        except OSError as exc:
            logger.warning("no liveness port on %s (%s): peers rely on keep-alive", host, exc)
            return
        self.port = self._server.sockets[0].getsockname()[1]

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A watcher's connection: kept open until the watcher goes, or this node stops."""
        self._held.add(writer)
        try:
            with contextlib.suppress(OSError):
                await reader.read()
        finally:
            self._held.discard(writer)
            writer.close()

    def watch(self, peers: dict[str, tuple[str, int]]) -> None:
        """Watch exactly ``peers`` (node -> liveness address) from now on."""
        for node in [node for node in self._watches if node not in peers]:
            self._watches.pop(node).cancel()
        for node, address in peers.items():
            if node not in self._watches and node not in self.lost:
                self._watches[node] = asyncio.create_task(
                    self._watch(node, *address), name="aiockpt-rdzv-liveness"
                )

    async def _watch(self, node: str, host: str, port: int) -> None:
        while True:
            try:
                reader, writer = await _connect(host, port)
            except ConnectionRefusedError:
                break
            except (OSError, TimeoutError) as exc:
                logger.info("cannot watch %s (%s): its keep-alive decides", node, exc)
                return
            try:
                with contextlib.suppress(OSError):
                    await reader.read()
            finally:
                writer.close()
        logger.warning("node %s is gone (its agent's liveness port refuses)", node)
        self.lost.add(node)
        self.found_lost.set()

    async def close(self) -> None:
        """Stop watching and listening; the peers watching this node then find it gone."""
        watches, self._watches = list(self._watches.values()), {}
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for writer in list(self._held):
                writer.close()
            await server.wait_closed()


class DynamicRendezvousHandler:
    """torch's ``DynamicRendezvousHandler`` with a c10d (TCPStore) backend, on asyncio.

    ``endpoint`` is ``host[:port]`` (port 29400 by default). ``is_host`` says whether this
    agent hosts the store there; ``None`` decides as torch does: hosts if ``local_addr`` is
    the endpoint's host (or, without ``local_addr``, if the host names this machine), and
    falls back to a client if the port is taken. ``local_addr`` is this node's address, which
    its workers publish as ``MASTER_ADDR`` when it gets rank 0.

    :meth:`next_rendezvous` starts a heartbeat task owned by the handler: end it with
    :meth:`shutdown` (the job is over) or :meth:`stop` (this node goes away), as the agent
    does when its run ends.
    """

    def __init__(
        self,
        settings: RendezvousSettings,
        endpoint: str,
        local_addr: str | None = None,
        is_host: bool | None = None,
    ) -> None:
        host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
        self.settings = settings
        self.host = host or endpoint
        self.port = int(port) if port else DEFAULT_RDZV_PORT
        self.local_addr = local_addr or socket.getfqdn()
        self._is_host = is_host
        # torch's descriptor: unique per process, so a restarted agent is a new node
        self.node = f"{self.local_addr}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        #: used for rank assignment and attempt stores, as the static rendezvous' ``timeout``
        self.timeout = settings.join_timeout
        self._prefix = f"aiockpt/rdzv/{settings.run_id}/"
        self._store: TCPStore | None = None
        self._round_client: TCPStore | None = None
        self._round: _Round | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        #: the store wait for a change in progress: its key and task (see _wait_for_change)
        self._change_wait: tuple[str, asyncio.Task[None]] | None = None
        #: wall-clock time at which the stalest other node's heartbeat expires, as last read
        #: (None: no other node). Waits for a state change end then at the latest, so that a
        #: dead node is removed when it expires, not at this node's next beat (up to
        #: keep_alive_interval later). Written by whichever thread read the state last.
        self._next_expiry: float | None = None
        self._liveness = _PeerLiveness()
        #: node -> its liveness address, as read from the store (by _sanitize's thread)
        self._liveness_addresses: dict[str, tuple[str, int]] = {}

    # -- torch's RendezvousHandler interface ------------------------------------------------

    def get_run_id(self) -> str:
        return self.settings.run_id

    def get_backend(self) -> str:
        return "c10d"

    async def next_rendezvous(self) -> RendezvousInfo:
        """Leave the last round (if any), join the next one and wait until it completes.

        Raises :class:`RendezvousClosedError` if the rendezvous is closed,
        :class:`RendezvousTimeoutError` if it does not complete with at least ``min_nodes``
        within ``join_timeout``, and :class:`RendezvousError` if the store is unreachable.
        """
        store = await self._connect()
        self._start_heartbeat()
        deadline = time.monotonic() + self.settings.join_timeout
        try:
            await self._exit_round(store)
            state = await self._join(store, deadline)
        except RendezvousError:
            raise
        except (RuntimeError, OSError) as exc:  # torch's DistError is a RuntimeError
            raise RendezvousError(f"{self.node}: rendezvous store failed: {exc}") from exc
        rank = state.participants[self.node]
        world_size = len(state.participants)
        self._round = _Round(state.round, frozenset(state.participants))
        master = next(node for node, r in state.participants.items() if r == 0)
        logger.info(
            "rendezvous round %s complete: %s is rank %s of %s",
            state.round,
            self.node,
            rank,
            world_size,
        )
        from torch.distributed import PrefixStore  # type: ignore[attr-defined]

        if self._round_client is None:
            # the round's long waits (rank assignment, exit barrier) on a client of their
            # own, so that they never hold up the state's short calls
            self._round_client = await run_blocking(self._client, "aiockpt-rdzv-connect")
        round_store = PrefixStore(f"{self._prefix}round/{state.round}/", self._round_client)
        return RendezvousInfo(
            round_store, rank, world_size, _node_addr(master), 0, round=state.round
        )

    async def num_nodes_waiting(self) -> int:
        """How many nodes wait for the next round (torch's trigger to meet again).

        Raises ``RuntimeError`` from the store."""
        store = await self._connect()
        state = await self._apply(store, None, "aiockpt-rdzv-sync")
        return len(state.wait_list)

    async def wait_for_membership_change(self) -> str:
        """Block until the group this node is in should meet again; return why.

        Woken by the store when the state changes: a node joins the wait list, a participant
        leaves, or one is found dead (by any node's heartbeat task, see :meth:`_beat`). Never
        returns for a closed rendezvous (the job is ending; the workers decide how). Raises
        ``RuntimeError`` from the store.
        """
        store = await self._connect()
        mine = self._round
        assert mine is not None, "wait_for_membership_change before next_rendezvous"
        while True:
            state = await self._apply(store, None, "aiockpt-rdzv-sync")
            if not state.closed:
                if state.wait_list:
                    return f"{len(state.wait_list)} node(s) waiting to join"
                if state.round != mine.round or frozenset(state.participants) != mine.participants:
                    return "a node left the group"
            await self._wait_for_change(state.version, None)

    async def is_closed(self) -> bool:
        """Whether the rendezvous is closed. Raises ``RuntimeError`` from the store."""
        store = await self._connect()
        state = await self._apply(store, None, "aiockpt-rdzv-sync")
        return state.closed

    async def set_closed(self) -> None:
        """Close the rendezvous: nodes joining later get :class:`RendezvousClosedError`.

        Raises ``RuntimeError`` from the store."""
        store = await self._connect()

        def close(state: _State) -> bool:
            if state.closed:
                return False
            state.closed = True
            return True

        await self._apply(store, close, "aiockpt-rdzv-close")

    async def shutdown(self) -> bool:
        """Stop heartbeating and close the rendezvous (torch's ``shutdown``), within
        ``close_timeout``. Returns whether it was closed; never raises for a store error."""
        await self._stop_heartbeat()
        if self._store is None:  # never reached the store: nothing to close, and no waiting
            return False
        try:
            await asyncio.wait_for(self.set_closed(), self.settings.close_timeout)
        except (RuntimeError, OSError, TimeoutError) as exc:
            logger.warning("could not close the rendezvous: %s", exc)
            return False
        finally:
            await self._liveness.close()  # after closing: nobody restarts over this node
        return True

    def close(self) -> None:
        """Drop this node's store connection (the host stops serving). The heartbeat task
        must be stopped first (:meth:`shutdown` or :meth:`stop`)."""
        self._store = self._round_client = None

    async def stop(self) -> None:
        """Stop heartbeating without closing the rendezvous (this node goes away, the job
        goes on: a signal, not the end of the job); the others find it gone at once."""
        await self._stop_heartbeat()
        await self._liveness.close()

    # -- store and state ----------------------------------------------------------------------

    async def _connect(self) -> TCPStore:
        if self._store is not None:
            return self._store
        is_host = self._is_host
        if is_host is None:
            is_host = self.local_addr == self.host or (
                self.local_addr == socket.getfqdn()
                and self.host in ("localhost", socket.gethostname(), socket.getfqdn())
            )

        def connect() -> TCPStore:
            from torch.distributed import TCPStore  # type: ignore[attr-defined]

            attempts = [is_host, False] if is_host and self._is_host is None else [is_host]
            for i, as_server in enumerate(attempts):
                try:
                    return TCPStore(
                        self.host,
                        self.port,
                        is_master=as_server,
                        timeout=timedelta(seconds=_STORE_OP_TIMEOUT_S),
                        wait_for_workers=False,
                    )
                except (RuntimeError, ValueError, TimeoutError):
                    if i == len(attempts) - 1:
                        raise
                    # as torch: the port is taken, so somebody else hosts it
            raise AssertionError("unreachable")

        def announce(store: TCPStore) -> None:
            store.set(self._key(f"liveness/{self.node}"), str(self._liveness.port))
            # created if absent (compare_set with an empty expected value sets a missing key)
            store.compare_set(self._key("state"), "", _State().dump())
            # before this node appears in the state: _sanitize reads every listed node's beat
            store.set(self._key(f"heartbeat/{self.node}"), repr(time.time()))

        # A first import of torch takes seconds (more on a busy node): done before, so that
        # join_timeout bounds reaching the store, not the import.
        await run_blocking(import_torch_distributed, "aiockpt-rdzv-import")
        try:
            store = await asyncio.wait_for(
                run_blocking(connect, "aiockpt-rdzv-connect"), self.settings.join_timeout
            )
            # Listening only once the store holds its port: a port the kernel picks for the
            # liveness socket could otherwise be the store's (one a launcher found free).
            await self._liveness.listen(self.local_addr)
            await asyncio.wait_for(
                run_blocking(lambda: announce(store), "aiockpt-rdzv-connect"),
                self.settings.join_timeout,
            )
        except (RuntimeError, OSError, TimeoutError) as exc:
            raise RendezvousError(
                f"{self.node}: no rendezvous store at {self.host}:{self.port}"
                f" within {self.settings.join_timeout}s: {exc}"
            ) from exc
        self._store = store
        return store

    def _client(self) -> TCPStore:
        """A new client connection to the store (blocking). Raises ``RuntimeError``."""
        from torch.distributed import TCPStore  # type: ignore[attr-defined]

        return TCPStore(
            self.host,
            self.port,
            is_master=False,
            timeout=timedelta(seconds=_STORE_OP_TIMEOUT_S),
            wait_for_workers=False,
        )

    def _key(self, name: str) -> str:
        return self._prefix + name

    async def _apply(
        self, store: Store, mutate: Callable[[_State], bool] | None, name: str
    ) -> _State:
        """:meth:`_update` (or, without ``mutate``, :meth:`_sync`) in a thread; then watch
        the liveness of every other node the state lists."""
        if mutate is None:
            state = await run_blocking(lambda: self._sync(store), name)
        else:
            state = await run_blocking(lambda: self._update(store, mutate), name)
        addresses = self._liveness_addresses
        self._liveness.watch(
            {
                node: addresses[node]
                for node in (*state.participants, *state.wait_list)
                if node in addresses
            }
        )
        return state

    def _sync(self, store: Store) -> _State:
        """Read the state, removing dead nodes (blocking)."""
        return self._update(store, lambda state: False)

    def _update(self, store: Store, mutate: Callable[[_State], bool]) -> _State:
        """Read the state, drop dead nodes, apply ``mutate`` (which says whether it changed
        anything) and write it back unless another node wrote first, then start over.
        Blocking; returns the state as written (or read, if unchanged)."""
        key = self._key("state")
        while True:
            raw = store.get(key)
            state = _State.load(raw)
            changed = self._sanitize(store, state)
            changed = mutate(state) or changed
            if not changed:
                return state
            state.version += 1
            desired = state.dump()
            if store.compare_set(key, raw.decode(), desired) == desired.encode():
                # wakes every node blocked in _wait_for_change
                store.set(self._key(f"changed/{state.version}"), "")
                return state

    def _sanitize(self, store: Store, state: _State) -> bool:
        """Remove nodes whose heartbeat expired (torch's state sanitizer)."""
        nodes = [*state.participants, *state.wait_list]
        if not nodes:
            self._next_expiry = None
            return False
        beats = store.multi_get([self._key(f"heartbeat/{node}") for node in nodes])
        unknown = [n for n in nodes if n != self.node and n not in self._liveness_addresses]
        if unknown:  # each node publishes its port before it is listed
            ports = store.multi_get([self._key(f"liveness/{node}") for node in unknown])
            for node, port in zip(unknown, ports, strict=True):
                with contextlib.suppress(OSError):  # unresolvable: keep-alive decides
                    if int(port):
                        address = _resolve(_node_addr(node))
                        self._liveness_addresses[node] = (address, int(port))
        lost = frozenset(self._liveness.lost)  # one copy: the loop may add to it meanwhile
        now = time.time()
        expiries = {
            node: float(beat) + self.settings.keep_alive_expiry
            for node, beat in zip(nodes, beats, strict=True)
            if node != self.node
        }
        dead = {node for node, expiry in expiries.items() if now > expiry or node in lost}
        self._next_expiry = min(
            (expiry for node, expiry in expiries.items() if node not in dead), default=None
        )
        if not dead:
            return False
        logger.warning("removing node(s) with expired heartbeats: %s", sorted(dead))
        state.wait_list = [node for node in state.wait_list if node not in dead]
        for node in dead & set(state.participants):
            del state.participants[node]
        self._after_removal(state)
        return True

    def _after_removal(self, state: _State) -> None:
        """torch's ``_remove_participant_epilogue``."""
        if state.complete:
            if not state.participants:  # everyone left: the next round opens
                state.complete = False
                state.round += 1
                state.deadline = None
        elif len(state.participants) < self.settings.min_nodes:
            state.deadline = None

    async def _wait_for_change(self, version: int, wait_s: float | None) -> None:
        """Block until the state moves past ``version``, or ``wait_s`` seconds pass.

        The store wait itself is long and the bound is asyncio's: a store wait that times
        out logs C++ warnings, and abandoning it is harmless, since it has a connection of its
        own (TCPStore serializes the calls of one client, so an abandoned wait would hold up
        every later call on a shared one) and ends at the next change of the state."""
        key = self._key(f"changed/{version + 1}")
        if self._next_expiry is not None:
            # just past it: a node counts as dead once its silence exceeds the expiry
            until_expiry = max(self._next_expiry - time.time(), 0.0) + _EXPIRY_MARGIN_S
            wait_s = until_expiry if wait_s is None else min(wait_s, until_expiry)

        def wait() -> None:
            client = self._client()
            with contextlib.suppress(RuntimeError):  # timed out or store gone: look again
                client.wait([key], timedelta(seconds=_CHANGE_WAIT_S))

        # A wait that timed out while the state stayed put is picked up again rather than
        # started anew: waits bounded by a live node's expiry time out every beat, and each
        # new one would leave a thread and a connection behind until the state changes.
        pending = self._change_wait
        if pending is None or pending[0] != key or pending[1].done():
            task = asyncio.ensure_future(run_blocking(wait, "aiockpt-rdzv-wait"))
            # a wait given up on (a newer version, or stop()) is not awaited again
            task.add_done_callback(_retrieve)
            # a wait for an older key ends by itself: the state moved past it, so it is set
            pending = self._change_wait = (key, task)
        # ... or until a peer's process is found dead: then the state must lose it now
        found_lost = self._liveness.found_lost
        if not found_lost.is_set():
            woken = asyncio.ensure_future(found_lost.wait())
            try:
                await asyncio.wait(
                    {pending[1], woken}, timeout=wait_s, return_when="FIRST_COMPLETED"
                )
            finally:
                woken.cancel()
        found_lost.clear()

    # -- the operations -----------------------------------------------------------------------

    async def _exit_round(self, store: Store) -> None:
        """torch's ``_RendezvousExitOp``: leave the last round's participants or wait list."""

        def leave(state: _State) -> bool:
            if self.node in state.participants:
                del state.participants[self.node]
                self._after_removal(state)
                return True
            if self.node in state.wait_list:
                state.wait_list.remove(self.node)
                return True
            return False

        await self._apply(store, leave, "aiockpt-rdzv-exit")
        self._round = None

    async def _join(self, store: Store, deadline: float) -> _State:
        """torch's ``_RendezvousJoinOp``, until this node is a participant of a complete
        round. Raises :class:`RendezvousClosedError` or :class:`RendezvousTimeoutError`."""
        settings = self.settings
        node = self.node

        def step(state: _State) -> bool:
            if state.closed or (state.complete and node in state.participants):
                return False
            now = time.time()
            if state.complete:
                # Too late for this round: wait for the next. A full round is not restarted
                # for a node that could not join it (torch's redundancy list, which
                # num_nodes_waiting does not count): it waits for a place to free up.
                if len(state.participants) >= settings.max_nodes:
                    return False
                if node not in state.wait_list:
                    state.wait_list.append(node)
                    return True
                return False
            if node in state.participants:
                if (
                    len(state.participants) >= settings.min_nodes
                    and state.deadline is not None
                    and now >= state.deadline
                ):
                    self._complete(state)
                    return True
                return False
            if len(state.participants) >= settings.max_nodes:
                return False  # torch's redundancy list: wait for a free place
            if node in state.wait_list:
                state.wait_list.remove(node)
            state.participants[node] = 0
            if len(state.participants) == settings.max_nodes:
                self._complete(state)
            elif len(state.participants) >= settings.min_nodes:
                state.deadline = now + settings.last_call_timeout
            return True

        while True:
            state = await self._apply(store, step, "aiockpt-rdzv-join")
            if state.closed:
                raise RendezvousClosedError(f"the rendezvous {settings.run_id!r} is closed")
            if state.complete and node in state.participants:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                await self._exit_round(store)  # as torch: do not hold a place we gave up
                raise RendezvousTimeoutError(
                    f"rendezvous {settings.run_id!r}: {len(state.participants)} node(s) met"
                    f" (min {settings.min_nodes}, max {settings.max_nodes}) within"
                    f" join_timeout={settings.join_timeout}s; giving up"
                )
            wait_s = left
            if state.deadline is not None and node in state.participants:
                wait_s = min(wait_s, max(state.deadline - time.time(), 0.0))
            await self._wait_for_change(state.version, wait_s)

    @staticmethod
    def _complete(state: _State) -> None:
        state.complete = True
        state.deadline = None
        for rank, node in enumerate(sorted(state.participants)):
            state.participants[node] = rank

    # -- heartbeats ---------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="aiockpt-rdzv-heartbeat")

    async def _beat(self) -> None:
        """Stamp this node's heartbeat every ``keep_alive_interval`` and remove the nodes
        whose heartbeat expired (torch's keep-alive timer and sanitizer): the removal changes
        the state, which wakes every node waiting on it. A beat that fails is logged; missing
        several is how the others learn this node is gone."""
        key = self._key(f"heartbeat/{self.node}")
        # a client of its own: a long wait on a shared one would hold the beats back
        client = await run_blocking(self._client, "aiockpt-rdzv-heartbeat")
        while True:
            await asyncio.sleep(self.settings.keep_alive_interval)
            try:
                await run_blocking(lambda: self._stamp(client, key), "aiockpt-rdzv-heartbeat")
            except RuntimeError as exc:
                logger.warning("heartbeat failed: %s", exc)

    def _stamp(self, client: Store, key: str) -> None:
        client.set(key, repr(time.time()))
        self._sync(client)

    async def _stop_heartbeat(self) -> None:
        pending, self._change_wait = self._change_wait, None
        if pending is not None:
            pending[1].cancel()  # its thread is abandoned, as run_blocking says
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a store wait's outcome seen: its waiter may have moved on (it is logged by
    whoever awaits it, if anyone)."""
    if not task.cancelled():
        task.exception()


def settings_from_conf(
    run_id: str, min_nodes: int, max_nodes: int, conf: dict[str, str]
) -> tuple[RendezvousSettings, bool | None]:
    """``RendezvousSettings`` and ``is_host`` from ``--rdzv-conf`` items; unknown keys are
    ignored with a warning (torch passes them to other backends). Raises ``ValueError`` for
    a malformed value."""
    known: dict[str, Any] = {}
    is_host: bool | None = None
    for key, value in conf.items():
        if key in ("join_timeout", "last_call_timeout", "close_timeout", "keep_alive_interval"):
            known[key] = float(value)
        elif key == "keep_alive_max_attempt":
            known[key] = int(value)
        elif key == "is_host":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"--rdzv-conf is_host: expected a boolean, got {value!r}")
            is_host = value.lower() in ("1", "true", "yes")
        elif key in ("timeout", "read_timeout"):
            pass  # torch's store timeouts; every wait here is bounded by the ones above
        else:
            logger.warning("ignoring unknown --rdzv-conf key %r", key)
    return RendezvousSettings(run_id, min_nodes, max_nodes, **known), is_host
