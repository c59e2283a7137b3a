"""The elastic agent: rendezvous, start the worker group, monitor, restart, exit barrier.

One ``await agent.run()`` is torchelastic's ``LocalElasticAgent.run()``::

    rendezvous (ranks)
    loop:
        start the group (attempt = restart count) -> HEALTHY
        monitor: every exit 0   -> SUCCEEDED -> exit barrier -> RunResult(return values)
                 first failure  -> stop the siblings (SIGTERM, deadline, SIGKILL)
                                   restarts left -> STOPPED, restart count + 1, loop
                                   none left     -> FAILED -> RunResult(failures)
        dynamic rendezvous only:
                 members change -> stop the workers, next round, loop (no restart spent)

Pre-started workers (``prestart_workers``): the agent keeps one spare Python interpreter per
local slot, started before the rendezvous round and again as soon as a group has started, so
that the next group (a restart, a node joining or leaving) starts with ``torch`` imported
instead of paying for the import (seconds) after the round (see :class:`SpareProcess`).

A termination signal to the agent (SIGTERM, SIGINT, SIGHUP, SIGQUIT; ``loop.add_signal_handler``)
cancels that work, forwards the signal to every worker group, waits ``shutdown_timeout``, kills
what is left and raises ``SignalException``; the CLI turns it into exit code 128 + signal.
Cancelling ``run()`` stops the workers the same way (SIGTERM); a further cancellation while
they are being stopped is deferred until they are killed, reaped and their pipes closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from string import Template
from typing import Any

from aiockpt._runtime import finish_even_if_cancelled
from aiockpt.elastic import janitor
from aiockpt.elastic.barrier import exit_barrier
from aiockpt.elastic.bootstrap import DEFAULT_PRELOADS
from aiockpt.elastic.dynamic import DynamicRendezvousHandler
from aiockpt.elastic.logs import LogsDest, LogsSpecs, Std, make_run_log_dir
from aiockpt.elastic.monitor import GroupOutcome, monitor, stop_processes
from aiockpt.elastic.process import SpareProcess, StreamTarget, WorkerProcess
from aiockpt.elastic.rendezvous import (
    RendezvousInfo,
    StaticRendezvous,
    assign_worker_ranks,
    run_blocking,
)
from aiockpt.elastic.spec import RunResult, Worker, WorkerGroup, WorkerSpec, WorkerState
from aiockpt.errors import SignalException

__all__ = [
    "DEFAULT_LOG_LINE_PREFIX_TEMPLATE",
    "DEFAULT_SIGNALS",
    "PER_WORKER_ENV",
    "LocalElasticAgent",
    "PythonLaunch",
    "python_launch",
]

logger = logging.getLogger(__name__)

#: how long the janitor may take to read the agent's last message
_CHANNEL_CLOSE_S = 5.0

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: torchelastic's console prefix for teed lines, e.g. ``[trainer0]:``
DEFAULT_LOG_LINE_PREFIX_TEMPLATE = "[${role_name}${local_rank}]:"
#: the variables set per worker and attempt: a pre-started worker gets them at activation,
#: so its interpreter start and its preloaded imports did not see them
PER_WORKER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_ERROR_FILE",
)
#: interpreter options that take a separate value, which a spare's command line does not
#: reproduce (as ``-X opt`` / ``-W arg``): written attached (``-Ximporttime``) they are fine
_OPTIONS_WITH_VALUES = frozenset({"-c", "-X", "-W", "--check-hash-based-pycs", "-"})


class LocalElasticAgent:
    """Runs ``spec.local_world_size`` workers on this node until they all succeed or fail.

    ``logs_specs``: where output goes (default: console only). ``exit_barrier_timeout``: how
    long a successful node waits for the others. ``log_line_prefix_template``: the tee prefix,
    with ``${role_name}``, ``${local_rank}`` and ``${rank}``. ``shutdown_timeout``: the grace
    period between the polite signal and SIGKILL, when stopping workers for any reason.
    ``signals_to_handle``: signals that shut the agent down (empty: leave signals alone, e.g.
    for several agents in one process). The agent runs once.

    ``prestart_workers``: keep one pre-started Python worker per local slot (see the module
    doc), for an entrypoint that is a Python interpreter whose ``args`` are
    ``[options] script args...`` or ``[options] -m module args...`` (what ``aiockpt-run``
    builds). A worker started so differs from one spawned after the round in this only:
    its interpreter started, and ``torch`` and the script's top-level imports of installed
    packages (never its own modules) were imported, with the agent's environment *without*
    the :data:`PER_WORKER_ENV` variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...),
    which are set, with everything else the worker's environment holds, before the script
    runs. So the variables read at interpreter start or at ``import torch``
    (``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES``, ``PYTHONPATH``, ``TORCH_*``) are the
    agent's, as for a spawned worker; a spare whose environment no longer matches the
    agent's is dropped and the worker spawned. Its ``/proc/<pid>/cmdline`` shows the
    bootstrap and ``/proc/<pid>/environ`` the environment it started with (``getenv`` and
    ``os.environ`` are the worker's), and each spare holds an idle interpreter's memory
    (``torch`` imported) while the group runs. Spares are started only while another
    attempt can come (restarts left, or a dynamic rendezvous). ``prestart_imports``: what
    a spare imports besides the script's installed top-level imports. Raises
    ``ValueError`` if the entrypoint does not have that form.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        logs_specs: LogsSpecs | None = None,
        exit_barrier_timeout: float = 300.0,
        log_line_prefix_template: str | None = None,
        shutdown_timeout: float = 30.0,
        signals_to_handle: Iterable[signal.Signals] = DEFAULT_SIGNALS,
        prestart_workers: bool = False,
        prestart_imports: Iterable[str] = DEFAULT_PRELOADS,
    ) -> None:
        self._launch = python_launch(spec) if prestart_workers else None
        self._worker_group = WorkerGroup(spec)
        self._logs_specs = logs_specs or LogsSpecs()
        self._exit_barrier_timeout = exit_barrier_timeout
        self._prefix_template = Template(
            log_line_prefix_template or DEFAULT_LOG_LINE_PREFIX_TEMPLATE
        )
        self._shutdown_timeout = shutdown_timeout
        self._signals_to_handle = tuple(signals_to_handle)
        self._rendezvous = spec.rdzv_handler or StaticRendezvous()
        self._remaining_restarts = spec.max_restarts
        self._attempts = 0
        self._processes: list[WorkerProcess] = []
        self._run_log_dir: str | None = None
        self._janitor: _Janitor | None = None
        #: pre-started workers waiting for the next attempt (``prestart_workers``)
        self._spares: list[SpareProcess] = []
        self._prestart_imports = tuple(prestart_imports)

    @property
    def worker_group(self) -> WorkerGroup:
        """This node's workers, their ranks and the group's state."""
        return self._worker_group

    @property
    def run_log_dir(self) -> str | None:
        """This run's log directory, ``<log_dir>/<run_id>_<unique>`` (``None`` before ``run``).

        Unique per run, as torchrun's, so a rerun into the same ``log_dir`` keeps the earlier
        runs' logs and error files. Under the agent's temporary directory (no ``log_dir``) it
        is removed when ``run`` ends, unless it holds redirected or teed logs.
        """
        return self._run_log_dir

    async def run(self) -> RunResult:
        """Run the worker group to completion (with restarts) and return the result.

        Raises ``FileNotFoundError`` for a binary entrypoint that does not exist,
        ``RendezvousError`` if the nodes cannot meet (with a dynamic rendezvous:
        ``RendezvousTimeoutError`` below ``min_nodes`` after ``join_timeout``, and
        ``RendezvousClosedError``, a graceful exit, if the job already ended),
        ``SignalException`` after a handled signal stopped the workers, and ``OSError`` if log
        files cannot be created. Workers are stopped whenever ``run`` leaves, including by
        cancellation.
        """
        loop = asyncio.get_running_loop()
        signalled: asyncio.Future[signal.Signals] = loop.create_future()
        stop_signal = signal.SIGTERM  # workers get the agent's signal when there is one
        try:
            with self._handle_signals(loop, signalled):
                async with self._log_root_and_janitor():
                    # created once the log directory exists: the first attempt writes there
                    work = asyncio.create_task(self._invoke_run())
                    try:
                        first: list[asyncio.Future[Any]] = [work, signalled]
                        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
                        if signalled.done():
                            stop_signal = signalled.result()
                            logger.warning("received %s; stopping workers", stop_signal.name)
                            raise SignalException(
                                f"Process {os.getpid()} got signal: {stop_signal.name}",
                                sigval=stop_signal,
                            )
                        return work.result()
                    finally:
                        # Finished even if this task is cancelled again meanwhile (a timeout,
                        # a TaskGroup, asyncio.run's final cancel): it is bounded by the
                        # deadlines, and workers left half-stopped would outlive run().
                        await finish_even_if_cancelled(self._shut_down(work, stop_signal))
                        if isinstance(self._rendezvous, DynamicRendezvousHandler):
                            leaving = self._leave(self._rendezvous, work, signalled)
                            await finish_even_if_cancelled(leaving)
        finally:
            signalled.cancel()
            self._rendezvous.close()

    @staticmethod
    async def _leave(
        handler: DynamicRendezvousHandler,
        work: asyncio.Task[RunResult],
        signalled: asyncio.Future[signal.Signals],
    ) -> None:
        """As torch's ``launch_agent``: the job is over when the run ended by itself
        (succeeded, failed, or could not meet), so the rendezvous is closed and late nodes
        exit; after a signal or a cancellation this node only goes away (it may be
        replaced), so it stops heartbeating and the others notice it left."""
        if signalled.done() or not work.done() or work.cancelled():
            await handler.stop()
        else:
            await handler.shutdown()

    async def _shut_down(self, work: asyncio.Task[RunResult], sig: signal.Signals) -> None:
        await _cancel_and_wait(work)
        await self._stop_workers(sig)
        await self._discard_spares()

    async def _invoke_run(self) -> RunResult:
        group = self._worker_group
        spec = group.spec
        entrypoint = _resolve_entrypoint(spec.entrypoint)
        # before the round: a node joining a running job imports while it meets the others
        await self._prestart(entrypoint)
        rdzv = await self._assign_ranks()
        while True:
            outcome = await self._run_attempt(entrypoint, rdzv)
            if outcome is None:
                # membership changed: as torch, meet again without spending a restart
                group.state = WorkerState.STOPPED
                rdzv = await self._assign_ranks()
                continue
            if not outcome.failures:
                group.state = WorkerState.SUCCEEDED
                await exit_barrier(rdzv.store, rdzv.world_size, self._exit_barrier_timeout)
                return RunResult(
                    WorkerState.SUCCEEDED,
                    return_values={
                        group.workers[rank].global_rank: value
                        for rank, value in outcome.return_values.items()
                    },
                )
            if self._remaining_restarts > 0:
                logger.warning(
                    "[%s] worker group FAILED; %s/%s restarts left; restarting",
                    spec.role,
                    self._remaining_restarts,
                    spec.max_restarts,
                )
                self._remaining_restarts -= 1
                group.state = WorkerState.STOPPED
                if isinstance(self._rendezvous, DynamicRendezvousHandler):
                    # the group may have lost a node: every restart is a new round
                    rdzv = await self._assign_ranks()
                continue
            group.state = WorkerState.FAILED
            return RunResult(
                WorkerState.FAILED,
                failures={
                    group.workers[rank].global_rank: failure
                    for rank, failure in outcome.failures.items()
                },
            )

    async def _assign_ranks(self) -> RendezvousInfo:
        group = self._worker_group
        rdzv = await self._rendezvous.next_rendezvous()
        group.workers = await assign_worker_ranks(
            rdzv.store, rdzv.rank, rdzv.world_size, group.spec, self._rendezvous.timeout
        )
        group.group_rank = rdzv.rank
        group.group_world_size = rdzv.world_size
        group.master_addr = rdzv.master_addr
        group.master_port = rdzv.master_port
        logger.info(
            "[%s] rendezvous complete: group_rank=%s group_world_size=%s global_ranks=%s"
            " master=%s:%s",
            group.spec.role,
            rdzv.rank,
            rdzv.world_size,
            [w.global_rank for w in group.workers],
            rdzv.master_addr,
            rdzv.master_port,
        )
        return rdzv

    async def _run_attempt(
        self, entrypoint: str | Callable[..., Any], rdzv: RendezvousInfo
    ) -> GroupOutcome | None:
        """Start the group, monitor it, and stop it; workers still running when this is
        cancelled are left in ``_processes`` for ``run`` to stop with the right signal.

        Returns ``None`` if the workers were stopped because the dynamic rendezvous' members
        changed (a node waits to join, or one left) before the group finished."""
        group = self._worker_group
        spec = group.spec
        restart_count = spec.max_restarts - self._remaining_restarts
        # Held until the attempt's workers are stopped: dropping it stops node 0's server.
        attempt_store, group.master_port = await self._attempt_store(rdzv, restart_count)
        assert self._run_log_dir is not None  # set by _log_root_and_janitor, around every attempt
        # Counted apart from restarts: membership changes restart without spending one, and
        # an attempt's logs must not overwrite the last one's.
        attempt = self._attempts
        self._attempts += 1
        dest = self._logs_specs.reify(self._run_log_dir, attempt, spec.local_world_size)
        for worker in group.workers:
            rank = worker.local_rank
            args = _substitute_local_rank(spec.args, rank)
            env = self._worker_env(worker, restart_count, dest.error_files[rank])
            stdout = self._target(dest, worker, Std.OUT)
            stderr = self._target(dest, worker, Std.ERR)
            process = None
            spare = await self._take_spare()
            if spare is not None:
                assert self._launch is not None  # spares exist only with a launch to run
                try:
                    process = await WorkerProcess.start(
                        rank,
                        entrypoint,
                        args[self._launch.args_start :],
                        env,
                        stdout,
                        stderr,
                        spare=spare,
                    )
                except OSError as exc:
                    logger.warning("spare pid %s unusable (%s); spawning", spare.pid, exc)
                    await self._discard(spare)
                except BaseException:
                    if not spare.activated:  # still a spare: reaped with the others
                        self._spares.append(spare)
                    raise
            if process is None:
                process = await WorkerProcess.start(rank, entrypoint, args, env, stdout, stderr)
            worker.id = process.pid
            self._processes.append(process)
            assert self._janitor is not None  # started with the log root, like _run_log_dir
            self._janitor.watch(process.pid)  # the worker leads its own process group
        group.state = WorkerState.HEALTHY
        monitoring = asyncio.create_task(
            monitor(self._processes, dest.error_files, self._shutdown_timeout)
        )
        watching: asyncio.Task[str] | None = None
        if isinstance(self._rendezvous, DynamicRendezvousHandler):
            watching = asyncio.create_task(_watch_membership(self._rendezvous))
        try:
            # While the group runs (watched already): spares for the next attempt, if there
            # can be one (a failure with a restart left; a node joining or leaving).
            if self._remaining_restarts > 0 or watching is not None:
                await self._prestart(entrypoint)
            tasks: list[asyncio.Task[Any]] = (
                [monitoring] if watching is None else [monitoring, watching]
            )
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            # the workers' own end wins a tie: a failure spends a restart, as in torch
            outcome = monitoring.result() if monitoring.done() else None
            if outcome is None and watching is not None:
                logger.warning(
                    "[%s] membership changed (%s); stopping workers to meet again",
                    spec.role,
                    watching.result(),
                )
        finally:
            await _cancel_and_wait(monitoring)
            if watching is not None:
                await _cancel_and_wait(watching)
        await self._stop_workers(signal.SIGTERM)
        del attempt_store
        return outcome

    async def _attempt_store(self, rdzv: RendezvousInfo, restart_count: int) -> tuple[Any, int]:
        """The store this attempt's workers meet in through ``env://``, and its port.

        Every attempt gets a fresh one: torch's ``env://`` (2.13) adds no per-attempt prefix
        to the agent store (it expects a new store per retry), so a restarted group meeting
        in the rendezvous store would read the dead group's keys (gloo connects to the dead
        ranks' addresses and fails or hangs). Node 0 hosts it on a port the kernel picks,
        held from the moment it is chosen; the other nodes read the port from the
        rendezvous store. Returns ``(server or None, port)``.
        """
        # a round's store is its own (and nodes may have spent different restarts)
        suffix = restart_count if rdzv.round is None else "round"
        key = f"torchelastic/attempt_store_port/{suffix}"
        if rdzv.rank != 0:
            raw = await run_blocking(lambda: rdzv.store.get(key), "aiockpt-attempt-store")
            return None, int(raw)
        from datetime import timedelta

        def host() -> Any:
            from torch.distributed import TCPStore  # type: ignore[attr-defined]

            server = TCPStore(
                rdzv.master_addr,
                0,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=self._rendezvous.timeout),
            )
            if rdzv.world_size > 1:
                rdzv.store.set(key, str(server.port))
            return server

        server = await run_blocking(host, "aiockpt-attempt-store")
        return server, int(server.port)

    async def _stop_workers(self, sig: signal.Signals) -> None:
        """Stop and close every worker in ``_processes``. A worker leaves the list only once
        closed: if this is cancelled halfway (the attempt's own stop, when ``run`` is
        cancelled), ``run``'s final stop still finds it, to kill it and release its pipes."""
        processes = list(self._processes)
        await stop_processes(processes, sig, self._shutdown_timeout)
        for process in processes:
            await process.close()
            self._processes.remove(process)
            if self._janitor is not None:  # the group is dead and its leader reaped
                self._janitor.forget(process.pid)

    def _base_env(self) -> dict[str, str]:
        """What every worker's environment holds but the :data:`PER_WORKER_ENV` variables:
        the agent's own (inherited like everything else: ``OMP_NUM_THREADS``,
        ``CUDA_VISIBLE_DEVICES``) and the job's. A spare starts with exactly this."""
        spec = self._worker_group.spec
        env = {name: value for name, value in os.environ.items() if name not in PER_WORKER_ENV}
        env.update(
            {
                "ROLE_NAME": spec.role,
                "LOCAL_WORLD_SIZE": str(spec.local_world_size),
                "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
                "TORCHELASTIC_RUN_ID": self._rendezvous.get_run_id(),
                # the workers' env:// store is the agent's (see rendezvous.py)
                "TORCHELASTIC_USE_AGENT_STORE": "True",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get(
                    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"
                ),
            }
        )
        return env

    def _worker_env(self, worker: Worker, restart_count: int, error_file: str) -> dict[str, str]:
        group = self._worker_group
        env = self._base_env()
        per_worker = {
            "RANK": str(worker.global_rank),
            "LOCAL_RANK": str(worker.local_rank),
            "GROUP_RANK": str(group.group_rank),
            "ROLE_RANK": str(worker.role_rank),
            "WORLD_SIZE": str(worker.world_size),
            "GROUP_WORLD_SIZE": str(group.group_world_size),
            "ROLE_WORLD_SIZE": str(worker.role_world_size),
            "MASTER_ADDR": str(group.master_addr),
            "MASTER_PORT": str(group.master_port),
            "TORCHELASTIC_RESTART_COUNT": str(restart_count),
            "TORCHELASTIC_ERROR_FILE": error_file,
        }
        assert per_worker.keys() == set(PER_WORKER_ENV)  # one list of what a spare lacks
        env.update(per_worker)
        return env

    async def _prestart(self, interpreter: str | Callable[..., Any]) -> None:
        """Start spares until there is one per local slot (``prestart_workers`` only). A
        spare that cannot be started is logged and prestarting stops: workers are then
        spawned as without it."""
        launch = self._launch
        if launch is None or not isinstance(interpreter, str):
            return
        assert self._janitor is not None
        while len(self._spares) < self._worker_group.spec.local_world_size:
            try:
                spare = await SpareProcess.start(
                    interpreter,
                    launch.flags,
                    launch.module,
                    launch.target,
                    self._base_env(),
                    self._prestart_imports,
                )
            except OSError as exc:
                logger.warning("cannot pre-start a worker (%s); spawning workers instead", exc)
                self._launch = None
                return
            self._spares.append(spare)
            self._janitor.watch(spare.pid)  # killed with the workers if the agent dies

    async def _take_spare(self) -> SpareProcess | None:
        """A live spare whose environment is still the agent's, or ``None``; the others
        are discarded."""
        while self._spares:
            spare = self._spares.pop(0)
            if spare.alive and spare.env == self._base_env():
                return spare
            logger.info(
                "spare pid %s %s; dropped",
                spare.pid,
                "exited" if not spare.alive else "has an outdated environment",
            )
            await self._discard(spare)
        return None

    async def _discard(self, spare: SpareProcess) -> None:
        await spare.discard()
        if self._janitor is not None:
            self._janitor.forget(spare.pid)

    async def _discard_spares(self) -> None:
        """Kill and reap every spare (the run is over). Never raises."""
        spares, self._spares = self._spares, []
        for spare in spares:
            await self._discard(spare)

    def _target(self, dest: LogsDest, worker: Worker, stream: Std) -> StreamTarget:
        if stream == Std.OUT:
            paths, tees = dest.stdouts, dest.tee_stdouts
        else:
            paths, tees = dest.stderrs, dest.tee_stderrs
        rank = worker.local_rank
        if rank not in tees:
            return StreamTarget(paths[rank])
        prefix = self._prefix_template.safe_substitute(
            role_name=self._worker_group.spec.role, rank=worker.global_rank, local_rank=rank
        )
        return StreamTarget(paths[rank], tee_prefix=prefix)

    @contextlib.contextmanager
    def _handle_signals(
        self, loop: asyncio.AbstractEventLoop, signalled: asyncio.Future[signal.Signals]
    ) -> Iterator[None]:
        def on_signal(sig: signal.Signals) -> None:
            if not signalled.done():
                signalled.set_result(sig)

        installed: dict[signal.Signals, Any] = {}
        for sig in self._signals_to_handle:
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, on_signal, sig)
            except (ValueError, RuntimeError):  # not the main thread, or not supported
                logger.warning(
                    "cannot handle %s here; a signal to the agent may orphan workers", sig.name
                )
                continue
            installed[sig] = previous
        try:
            yield
        finally:
            for sig, previous in installed.items():
                loop.remove_signal_handler(sig)
                if previous is not None:
                    signal.signal(sig, previous)

    @contextlib.asynccontextmanager
    async def _log_root_and_janitor(self) -> AsyncIterator[None]:
        """This run's log directory, and the janitor (:mod:`janitor`) that cleans up if this
        process dies without doing so, SIGKILL included.

        The log directory is the user's, or a temporary one removed at the end (error files
        are read before that, and nothing else of value lands there without redirects); the
        janitor kills the workers' process groups (their children too) and removes that
        temporary directory. Raises ``OSError`` if a directory, the socket pair or the janitor
        cannot be created.
        """
        root = self._logs_specs.root_log_dir
        temp_root: str | None = None
        if root is None:
            root = temp_root = tempfile.mkdtemp(prefix="aiockpt-elastic-")
        keep = self._logs_specs.redirects != Std.NONE or self._logs_specs.tee != Std.NONE
        remove = None if keep else temp_root
        try:
            self._run_log_dir = make_run_log_dir(root, self._rendezvous.get_run_id())
            self._janitor = await _Janitor.start(remove)
        except BaseException:
            if temp_root is not None:  # nothing was written there yet
                shutil.rmtree(temp_root, ignore_errors=True)
            raise
        try:
            yield
        finally:
            if remove is not None:
                shutil.rmtree(remove, ignore_errors=True)
            elif temp_root is not None:
                logger.info("worker logs kept in %s", self._run_log_dir)
            await finish_even_if_cancelled(self._janitor.close())


class _Janitor:
    """The agent's end of its janitor (:mod:`janitor`): tells it which process groups to kill
    and, at the end, that it is done. Create with :meth:`start`; always :meth:`close` it."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        channel: asyncio.Transport,
        closed: asyncio.Future[None],
    ) -> None:
        self._process = process
        self._channel = channel
        self._closed = closed

    @classmethod
    async def start(cls, path: str | None) -> _Janitor:
        """Start the janitor (removing ``path`` if the agent dies, when not ``None``).

        Raises ``OSError`` if the socket pair or the process cannot be created.
        """
        # A socket pair, as for function workers, not a pipe: the stream transport's writes
        # never block the loop (even if the janitor stopped reading), and on uvloop closing a
        # write-pipe transport leaves a /dev/null fd open. Neither end is inheritable.
        channel, child_end = socket.socketpair()
        try:
            child_fd = child_end.detach()
            try:
                process = await asyncio.create_subprocess_exec(
                    *janitor.janitor_command(child_fd, path),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,  # holds no pipe of whoever reads our output
                    stderr=subprocess.DEVNULL,
                    pass_fds=(child_fd,),
                    start_new_session=True,
                )
            finally:
                os.close(child_fd)
        except BaseException:
            channel.close()
            raise
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        try:
            transport, _ = await loop.create_unix_connection(
                lambda: _ChannelClosed(closed), sock=channel
            )
        except BaseException:
            # the EOF would have the janitor clean up after a live agent: kill it first
            process.kill()
            channel.close()
            await finish_even_if_cancelled(process.wait())
            raise
        return cls(process, transport, closed)

    def watch(self, pgid: int) -> None:
        """Have process group ``pgid`` killed if the agent dies."""
        self._send(janitor.watch(pgid))

    def forget(self, pgid: int) -> None:
        """Stop watching ``pgid``: the agent killed the group and reaped its leader."""
        self._send(janitor.forget(pgid))

    async def close(self) -> None:
        """Tell the janitor the agent cleaned up, and wait for it to exit. Never raises for a
        janitor that died meanwhile: there is nothing left for it to do."""
        self._send(janitor.DONE)
        self._channel.close()  # after what is buffered is written
        await asyncio.wait([self._closed], timeout=_CHANNEL_CLOSE_S)
        if not self._closed.done():  # a janitor that stopped reading: it must not linger
            self._channel.abort()
            self._process.kill()
        await self._process.wait()

    def _send(self, message: bytes) -> None:
        if not self._channel.is_closing():  # else the janitor is gone (killed): no matter
            self._channel.write(message)


class _ChannelClosed(asyncio.Protocol):
    """Resolves ``closed`` when the janitor's channel is closed, by us or by its exit (EOF:
    the transport then closes itself)."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


async def _watch_membership(handler: DynamicRendezvousHandler) -> str:
    """Why the group must meet again; never returns if the store fails (the workers' own
    end decides then: a store that is gone means the job is going)."""
    try:
        return await handler.wait_for_membership_change()
    except RuntimeError as exc:
        logger.warning("cannot watch the rendezvous any more: %s", exc)
        await asyncio.get_running_loop().create_future()  # until cancelled
        raise AssertionError("unreachable") from None


async def _cancel_and_wait(task: asyncio.Task[Any]) -> None:
    if task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _resolve_entrypoint(entrypoint: str | Callable[..., Any]) -> str | Callable[..., Any]:
    """A binary's path (looked up on PATH like ``execvp``), or the function itself.

    Raises ``FileNotFoundError`` before anything starts if the binary does not exist.
    """
    if not isinstance(entrypoint, str):
        return entrypoint
    found = shutil.which(entrypoint)
    if found is None:
        raise FileNotFoundError(f"worker entrypoint not found or not executable: {entrypoint}")
    return found


@dataclass(frozen=True)
class PythonLaunch:
    """A Python entrypoint's arguments, split: interpreter ``flags``, the ``target`` (a
    script, or a module if ``module``), and where the target's own arguments start in the
    spec's ``args`` (``args_start``)."""

    flags: list[str]
    module: bool
    target: str
    args_start: int


def python_launch(spec: WorkerSpec) -> PythonLaunch:
    """Split ``spec``'s arguments as ``python [options] (script | -m module) args...``.

    Raises ``ValueError`` for a function entrypoint, an option that takes a separate value
    (``-X opt``, ``-W arg``, ``-c cmd``), no script, or a script or option that depends on
    ``${local_rank}``."""
    if not isinstance(spec.entrypoint, str):
        raise ValueError("prestart_workers needs a Python interpreter as entrypoint")
    args = [str(a) for a in spec.args]
    flags: list[str] = []
    for i, arg in enumerate(args):
        if "${local_rank}" in arg:
            raise ValueError(f"prestart_workers: {arg!r} differs per worker")
        if arg == "-m":
            if i + 1 == len(args):
                raise ValueError("prestart_workers: -m without a module")
            if "${local_rank}" in args[i + 1]:
                raise ValueError(f"prestart_workers: {args[i + 1]!r} differs per worker")
            return PythonLaunch(flags, True, args[i + 1], i + 2)
        if arg in _OPTIONS_WITH_VALUES or arg.startswith("--"):
            raise ValueError(f"prestart_workers: interpreter option {arg!r} is not supported")
        if not arg.startswith("-"):
            return PythonLaunch(flags, False, arg, i + 1)
        flags.append(arg)
    raise ValueError("prestart_workers: no script or module in the worker's arguments")


def _substitute_local_rank(args: tuple[Any, ...], local_rank: int) -> tuple[Any, ...]:
    return tuple(
        Template(arg).safe_substitute(local_rank=local_rank) if isinstance(arg, str) else arg
        for arg in args
    )
