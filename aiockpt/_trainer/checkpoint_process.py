"""``CheckpointProcess``: the parent's side of one persistent checkpoint worker.

The asyncio counterpart of torch's ``_experimental/checkpoint_process.py``: the worker is a
``python -m aiockpt._worker`` subprocess, the channel is an asyncio stream over a socketpair, and
three kinds of task run on the caller's loop, all owned by this object and ended by ``close``:

- the *reader* decodes response frames and resolves the matching request futures;
- the *monitor* awaits the worker's exit; an exit nobody asked for fails every pending request
  with ``WorkerCrashed`` at once (no polling), and every later request too;
- one task per ``write``, so that a write may wait for its state dict and stage it before it
  is sent.

Every wait has a bound: the answer to a control request (map or release an arena, ping,
cancel) is awaited at most ``subprocess_shutdown_timeout_secs``; a worker that does not answer
by then is hung, and is killed. ``close`` asks the worker to exit, then escalates to SIGTERM
and SIGKILL, each under its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiockpt
from aiockpt._runtime import finish_even_if_cancelled
from aiockpt._trainer.staging import (
    SharedArena,
    StagingPlan,
    copy_into_arena,
    plan_staging,
    take_fitting_arena,
)
from aiockpt._wire.channel import Channel
from aiockpt._wire.protocol import (
    CANCELLED_ERROR_TYPE,
    DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    ArenaPayload,
    ArenaRef,
    CancelPayload,
    GcOptions,
    GroupInfo,
    InitPayload,
    ProgressPayload,
    RankInfo,
    RequestType,
    StagedPayload,
    StateDictPayload,
    WorkerResponse,
    WritePayload,
    WriteResultPayload,
)
from aiockpt._wire.refs import check_encodable, import_ref
from aiockpt._wire.session import ParentSession, ParentSessionState
from aiockpt.errors import (
    CheckpointWriteError,
    CoordinationTimeout,
    ProtocolError,
    ProtocolVersionMismatch,
    RankFailed,
    WorkerClosed,
    WorkerCrashed,
    WorkerError,
    WorkerStartError,
    WorkerStartTimeout,
    qualified_name,
)

__all__ = ["CheckpointProcess", "CheckpointProcessConfig", "WriteResult", "describe_exit"]

logger = logging.getLogger("aiockpt._trainer.checkpoint_process")

#: what a successful write returns: the seconds the writer took, and what it returned
WriteResult = WriteResultPayload

#: the built-in writer used when none is given
DEFAULT_WRITER = "aiockpt.writers.dcp:DcpWriter"

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(aiockpt.__file__)))


@dataclass(frozen=True)
class CheckpointProcessConfig:
    """Options of a ``CheckpointProcess`` (torch's names, plus a few of aiockpt's).

    Attributes:
        subprocess_init_timeout_secs: how long spawn + init functions + handshake may take.
        subprocess_shutdown_timeout_secs: how long ``close`` waits for in-flight writes and a
            graceful exit before it escalates to SIGTERM, then SIGKILL; also how long the
            worker may take to answer a control request (ping, arena, cancel) before it is
            taken as hung and killed.
        sigterm_grace_secs: how long ``close`` waits after SIGTERM before SIGKILL.
        max_frame_size: the largest frame either side accepts.
        gc: garbage-collector controls in the worker; by default from torch's
            ``DCP_DISABLE_AUTOMATIC_GC`` / ``DCP_DISABLE_MANUAL_GC`` environment variables.
    """

    subprocess_init_timeout_secs: float = 30
    subprocess_shutdown_timeout_secs: float = 60
    sigterm_grace_secs: float = 5
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    gc: GcOptions = field(default_factory=lambda: GcOptions.from_env(os.environ))


def describe_exit(returncode: int) -> str:
    """``-9`` -> ``"was killed by SIGKILL"``, ``3`` -> ``"exited with code 3"``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class CheckpointProcess:
    """A persistent checkpoint worker process and the channel to it.

    ``subprocess_init_fn(*subprocess_init_args)`` runs in the worker first, then
    ``checkpoint_writer_init_fn(**checkpoint_writer_init_args)`` (with ``rank_info`` added when
    absent) builds the writer whose ``write(state_dict=..., path=..., **kwargs)`` serves every
    write. Functions are import references (``"package.module:name"``) or module-level
    callables; arguments must be msgspec-encodable.

    Raises ``TypeError`` at construction, naming the value, for a lambda, a local function or an
    argument that cannot cross the process boundary.
    """

    def __init__(
        self,
        rank_info: RankInfo | None = None,
        config: CheckpointProcessConfig | None = None,
        subprocess_init_fn: str | Callable[..., Any] | None = None,
        subprocess_init_args: Sequence[Any] = (),
        checkpoint_writer_init_fn: str | Callable[..., Any] = DEFAULT_WRITER,
        checkpoint_writer_init_args: Mapping[str, Any] | None = None,
        *,
        group: GroupInfo | None = None,
    ) -> None:
        self.rank_info = rank_info if rank_info is not None else RankInfo()
        self.config = config if config is not None else CheckpointProcessConfig()
        init_fn = (
            None
            if subprocess_init_fn is None
            else import_ref(subprocess_init_fn, "subprocess_init_fn")
        )
        init_args = list(subprocess_init_args)
        writer_args = dict(checkpoint_writer_init_args or {})
        check_encodable(init_args, "subprocess_init_args")
        check_encodable(writer_args, "checkpoint_writer_init_args")
        self._init_payload = InitPayload(
            protocol_version=PROTOCOL_VERSION,
            rank_info=self.rank_info,
            sys_path=list(sys.path),
            subprocess_init_fn=init_fn,
            subprocess_init_args=init_args,
            checkpoint_writer_init_fn=import_ref(
                checkpoint_writer_init_fn, "checkpoint_writer_init_fn"
            ),
            checkpoint_writer_init_args=writer_args,
            gc=self.config.gc,
            group=group,
        )
        self._process: asyncio.subprocess.Process | None = None
        self._channel: Channel | None = None
        self._pending: dict[int, asyncio.Future[WorkerResponse]] = {}
        #: request id -> called with each progress report of that write
        self._progress_callbacks: dict[int, Callable[[int], object]] = {}
        #: the channel's rules (handshake first, ids, answers); one per spawned worker
        self._session = ParentSession()
        self._start_lock: asyncio.Lock | None = None
        self._ready = False
        self._reader: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[WriteResult]] = set()
        #: writes still waiting for their state dict (close cancels these, lets others fail)
        self._unsent: set[asyncio.Task[WriteResult]] = set()
        #: arenas ``write`` staged into, mapped by the current worker and free again
        self._free_arenas: list[SharedArena] = []
        #: every pool of free arenas this worker mapped (``write``'s, a Checkpointer's): their
        #: arenas are closed when the worker goes, however it goes (loop shutdown included)
        self._pools: list[list[SharedArena]] = [self._free_arenas]
        self._crashed: WorkerCrashed | None = None
        self._closing = False
        #: the parent ended the worker's service itself (TERMINATE sent, or the channel
        #: closed from this side): its exit is not a crash
        self._exit_requested = False
        self._close_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The worker's pid once spawned."""
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        """True while the worker is running and usable."""
        return self._ready and self._crashed is None and not self._closing

    async def __aenter__(self) -> CheckpointProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Spawn the worker and complete the handshake; return at once if already started.

        Raises ``WorkerStartTimeout`` (a ``TimeoutError``) when the handshake does not complete
        within ``subprocess_init_timeout_secs`` (the worker is killed), ``WorkerStartError``
        with the worker's traceback when an init function raises, ``ProtocolVersionMismatch``
        when the worker speaks another protocol version, and ``WorkerCrashed`` /
        ``WorkerClosed`` when this process crashed or was closed earlier.
        """
        self._check_usable()
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        # Writes accepted before close() began still start the worker: nothing is lost.
        if self._crashed is not None:
            raise self._crashed
        if self._ready:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._ready:
                await self._spawn_and_handshake()

    async def _spawn_and_handshake(self) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # The worker must import this very aiockpt, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        started = time.perf_counter()
        try:
            with child_end:
                self._process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "aiockpt._worker",
                    "--fd",
                    str(child_end.fileno()),
                    "--max-frame-size",
                    str(self.config.max_frame_size),
                    # The worker logs as much as this process's "aiockpt" logger lets through
                    # (at its start: a later change here is not followed there).
                    "--log-level",
                    str(logging.getLogger("aiockpt").getEffectiveLevel()),
                    pass_fds=(child_end.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL,
                    env=env,
                )
            self._channel = await Channel.open(
                parent_end, max_frame_size=self.config.max_frame_size
            )
        except BaseException:
            parent_end.close()
            await self._kill()
            raise
        self._monitor = loop.create_task(self._watch_exit(), name=f"aiockpt-monitor-{self.pid}")
        self._reader = loop.create_task(self._read_responses(), name=f"aiockpt-reader-{self.pid}")
        timeout = self.config.subprocess_init_timeout_secs
        try:
            async with asyncio.timeout(timeout):
                response = await self._request(RequestType.INIT, self._init_payload, bounded=False)
        except TimeoutError:
            await self._kill()
            raise WorkerStartTimeout(
                f"checkpoint worker (pid {self.pid}) did not finish its start-up within "
                f"{timeout} s (subprocess_init_timeout_secs); it was killed",
                pid=self.pid,
            ) from None
        except WorkerCrashed as exc:
            raise WorkerStartError(
                f"checkpoint worker failed to start: {exc}", pid=self.pid
            ) from exc
        except BaseException:
            await self._kill()
            raise
        if not response.success:
            await self._kill()
            message = f"checkpoint worker (pid {self.pid}) failed to initialise: "
            message += f"{response.error_type}: {response.error_msg}"
            if response.error_type == "aiockpt.errors.ProtocolVersionMismatch":
                raise ProtocolVersionMismatch(response.error_msg or message)
            raise WorkerStartError(
                message, error_type=response.error_type, traceback=response.traceback, pid=self.pid
            )
        self._ready = True
        logger.debug(
            "checkpoint worker %s ready in %.3f s", self.pid, time.perf_counter() - started
        )

    async def close(self) -> None:
        """Stop the worker; idempotent, and safe to call concurrently.

        In-flight writes may finish, then the worker is asked to exit; past
        ``subprocess_shutdown_timeout_secs`` it gets SIGTERM, then SIGKILL after
        ``sigterm_grace_secs``. Writes still pending then fail with ``WorkerClosed`` naming
        their paths. Returns within about the sum of those two bounds, whatever the worker
        does (even stopped with SIGSTOP). Raises nothing of the worker's.
        """
        if self._close_task is None:
            self._closing = True
            self._close_task = asyncio.get_running_loop().create_task(self._shut_down())
        await finish_even_if_cancelled(self._close_task)

    async def _shut_down(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.subprocess_shutdown_timeout_secs
        try:
            async with asyncio.timeout_at(deadline):
                if self._writes:
                    await asyncio.wait(set(self._writes))
                process = self._process
                if process is not None and process.returncode is None:
                    await self._stop_gracefully(process)
        except (TimeoutError, WorkerError, ConnectionError):
            pass
        process = self._process
        if process is not None and process.returncode is None:
            await self._escalate(process)
        self._fail_pending(
            WorkerClosed("the checkpoint process was closed before this finished", pid=self.pid)
        )
        for task in self._unsent:
            task.cancel()  # still waiting for their state dict: nothing to finish
        await asyncio.gather(*self._writes, return_exceptions=True)
        for owned in (self._reader, self._monitor):
            if owned is not None:
                owned.cancel()
                await asyncio.gather(owned, return_exceptions=True)
        if self._channel is not None:
            await self._channel.aclose()
        self._fail_pending(WorkerClosed("the checkpoint process was closed", pid=self.pid))
        self._close_free_arenas()

    async def _stop_gracefully(self, process: asyncio.subprocess.Process) -> None:
        """Ask the worker to exit once its queued writes are done, and wait for it. The
        answer to TERMINATE is not awaited: the reader may already be gone at loop shutdown."""
        if self._session.state is ParentSessionState.READY and self._channel is not None:
            self._exit_requested = True
            request = self._session.request(RequestType.TERMINATE_PROCESS)
            self._session.abandon(request.request_id)
            with contextlib.suppress(ConnectionError):
                await self._channel.send(request)
        await process.wait()

    async def _escalate(self, process: asyncio.subprocess.Process) -> None:
        logger.warning(
            "checkpoint worker (pid %s) did not exit within %s s; sending SIGTERM",
            process.pid,
            self.config.subprocess_shutdown_timeout_secs,
        )
        try:
            process.terminate()
            async with asyncio.timeout(self.config.sigterm_grace_secs):
                await process.wait()
            return
        except ProcessLookupError:
            return
        except TimeoutError:
            pass
        logger.warning("checkpoint worker (pid %s) ignored SIGTERM; sending SIGKILL", process.pid)
        await self._kill()

    async def _kill(self) -> None:
        """SIGKILL the worker and reap it."""
        if self._process is None or self._process.returncode is not None:
            return
        try:
            self._process.kill()
        except ProcessLookupError:
            pass
        await self._process.wait()

    # --- requests ------------------------------------------------------------------------------

    def write(
        self,
        state_dict: Any | Awaitable[Any],
        path: str | os.PathLike[str],
        **kwargs: Any,
    ) -> asyncio.Task[WriteResult]:
        """Start writing ``state_dict`` to ``path`` in the worker; return the awaitable write.

        ``state_dict`` may be an awaitable (a staging future), resolved before staging. The
        returned task copies the tensors, once, into a shared-memory arena the worker maps
        (any size: tensor bytes never travel in frames), then sends the request; keep the
        tensors unchanged until the task is done. The first write starts the worker if
        needed. Raises ``TypeError`` here, naming the key, for a state-dict entry or keyword
        argument that cannot cross the process boundary. Awaiting the result raises
        ``CheckpointWriteError`` (with the worker's traceback) when the writer raised,
        ``WorkerCrashed`` when the worker died, ``WorkerClosed`` after ``close``, and
        ``OSError`` when there is no memory for the arena.
        """
        self._check_usable()
        check_encodable(kwargs, "write() keyword arguments")
        plan = None if inspect.isawaitable(state_dict) else plan_staging(state_dict)
        task = asyncio.get_running_loop().create_task(
            self._write(plan if plan is not None else state_dict, os.fspath(path), kwargs)
        )
        self._writes.add(task)
        self._unsent.add(task)
        task.add_done_callback(self._writes.discard)
        task.add_done_callback(self._unsent.discard)
        return task

    async def _write(
        self, state_dict: StagingPlan | Awaitable[Any], path: str, kwargs: dict[str, Any]
    ) -> WriteResult:
        if isinstance(state_dict, StagingPlan):
            plan = state_dict
        else:
            resolved = await state_dict
            if isinstance(resolved, StateDictPayload):  # described (and staged) already
                self._under_way()
                return await self.write_payload(WritePayload(path, resolved, kwargs))
            plan = plan_staging(resolved)
        self._under_way()
        await self._ensure_started()
        arena = await self.take_arena(plan.nbytes, self._free_arenas)
        try:
            await copy_into_arena(arena, plan)
            return await self.write_payload(WritePayload(path, plan.payload(arena), kwargs))
        finally:
            self.give_back(arena, self._free_arenas)

    def _under_way(self) -> None:
        """The write has its state dict: ``close`` lets it finish (within its deadline)
        instead of cancelling it."""
        task = asyncio.current_task()
        if task is not None:
            self._unsent.discard(task)

    # --- arenas --------------------------------------------------------------------------------

    async def take_arena(self, nbytes: int, free: list[SharedArena]) -> SharedArena | None:
        """An arena of at least ``nbytes`` that the worker has mapped, taken from the pool
        ``free`` or made (and mapped) when none fits; None when there are no tensor bytes.

        A pool that has only smaller arenas gives up its largest first (the worker unmaps
        it): memory stays at what the saves in flight need. Raises ``OSError`` when there is
        no memory for a new arena, ``CheckpointWriteError`` when the worker cannot map it,
        and ``WorkerCrashed`` / ``WorkerClosed``.
        """
        if nbytes == 0:
            return None
        self._adopt_pool(free)
        arena, retired = take_fitting_arena(free, nbytes)
        if arena is not None:
            return arena
        if retired is not None:
            with contextlib.suppress(WorkerCrashed, WorkerClosed):
                await self.release_arena(retired.ref)
            retired.close()
        arena = await asyncio.to_thread(SharedArena, nbytes)
        await self.map_new_arena(arena)
        return arena

    def give_back(self, arena: SharedArena | None, free: list[SharedArena]) -> None:
        """Return ``arena`` to the pool ``free`` while this worker is usable; else close it
        (a new worker maps arenas of its own)."""
        if arena is None:
            return
        if self.alive:
            self._adopt_pool(free)
            free.append(arena)
        else:
            arena.close()

    def _adopt_pool(self, free: list[SharedArena]) -> None:
        if not any(pool is free for pool in self._pools):
            self._pools.append(free)

    async def map_new_arena(self, arena: SharedArena) -> None:
        """Have the worker map ``arena`` before anything is copied into it; if that fails,
        ``arena`` is closed and the error raised (``CheckpointWriteError`` with the worker's
        ``OSError``, ``WorkerCrashed``, ``WorkerClosed``)."""
        try:
            await self.map_arena(arena.ref)
        except BaseException:
            arena.close()
            raise

    def _close_free_arenas(self) -> None:
        """Close the free arenas of every pool this worker mapped (arenas in use are closed
        by ``give_back``, once their save is done with them)."""
        for pool in self._pools:
            arenas = list(pool)
            pool.clear()
            for arena in arenas:
                arena.close()

    async def write_payload(
        self,
        payload: WritePayload,
        *,
        on_sent: Callable[[], object] | None = None,
        on_request: Callable[[int], object] | None = None,
        on_progress: Callable[[int], object] | None = None,
    ) -> WriteResult:
        """Send one write request as is and await its result (what ``write`` and saves use).

        ``on_sent`` is called once the request is on its way (the worker serves writes in the
        order they are sent), as is ``on_request`` with the request's id (for
        ``report_staged``); ``on_progress`` with the bytes the worker has written so far,
        at each of its progress reports (a payload with ``progress_bytes`` asks for them).
        Cancelling the awaiting task asks the worker to abandon the write: it is abandoned
        (temporary files removed, ``CancelledError`` raised) unless its commit had already
        begun, in which case the write completes and its result is returned. Raises what
        ``write``'s awaitable raises.
        """
        await self._ensure_started()
        try:
            request_id, future = await self._send_request(RequestType.WRITE_CHECKPOINT, payload)
            if on_progress is not None:
                self._progress_callbacks[request_id] = on_progress
            if on_sent is not None:
                on_sent()
            if on_request is not None:
                on_request(request_id)
            try:
                response = await asyncio.shield(future)
            except asyncio.CancelledError:
                response = await self._cancel_write(request_id, future)
            finally:
                self._forget(request_id)
        except WorkerClosed as exc:
            raise WorkerClosed(
                f"writing {payload.path} did not finish: {exc}", pid=exc.pid, path=payload.path
            ) from None
        self._raise_for_failure(response, f"writing {payload.path}", payload.path)
        assert isinstance(response.payload, WriteResultPayload)
        return response.payload

    async def report_staged(self, write_id: int, nbytes: int, *, complete: bool) -> None:
        """Tell the worker that the arena bytes of write ``write_id`` (sent with
        ``WritePayload.staged_bytes``) below ``nbytes`` are staged; ``complete``: all are.
        Nothing is sent once that write is answered (it failed early). Raises
        ``WorkerCrashed`` for a worker that died, ``WorkerClosed`` after ``close``."""
        if write_id not in self._session.outstanding:
            return
        request_id, _ = await self._send_request(
            RequestType.STAGED, StagedPayload(write_id, nbytes, complete)
        )
        self._forget(request_id)  # nobody needs the acknowledgement

    def _raise_for_failure(
        self, response: WorkerResponse, what: str, path: str | None = None
    ) -> None:
        if response.success:
            return
        if response.failed_rank is not None:  # a multi-rank save, failed by (or at) that rank
            message = f"{what} failed: {response.error_msg}"
            if response.error_type == qualified_name(CoordinationTimeout):
                raise CoordinationTimeout(message, rank=response.failed_rank)
            raise RankFailed(
                message,
                rank=response.failed_rank,
                error_type=response.error_type,
                traceback=response.traceback,
            )
        raise CheckpointWriteError(
            f"{what} failed in the checkpoint worker (pid {self.pid}): "
            f"{response.error_type}: {response.error_msg}",
            path=path,
            pid=self.pid,
            error_type=response.error_type,
            traceback=response.traceback,
        )

    async def _cancel_write(
        self, request_id: int, future: asyncio.Future[WorkerResponse]
    ) -> WorkerResponse:
        timeout = self.config.subprocess_shutdown_timeout_secs
        try:
            async with asyncio.timeout(timeout):
                if not future.done():
                    with contextlib.suppress(ConnectionError, WorkerError):
                        cancel_id, _ = await self._send_request(
                            RequestType.CANCEL, CancelPayload(request_id)
                        )
                        # The write's own answer says how the cancellation went.
                        self._forget(cancel_id)
                response = await asyncio.shield(future)
        except TimeoutError:
            # A worker that answers nothing within the bound may still be reading the arena:
            # it must not outlive the cancellation, or a later save could tear this one.
            await self._kill_hung(f"did not answer the cancellation of a write within {timeout} s")
            raise asyncio.CancelledError from None
        except WorkerError:
            raise asyncio.CancelledError from None
        if response.success:
            # The commit had begun before the CANCEL arrived: the checkpoint exists, so the
            # save's outcome is its success, and the cancellation is withdrawn.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return response
        if response.error_type != CANCELLED_ERROR_TYPE:
            logger.warning("write to %s failed while being cancelled: %s", request_id, response)
        raise asyncio.CancelledError

    async def _kill_hung(self, what: str) -> None:
        """SIGKILL a worker that stopped answering; what is pending fails with
        ``WorkerCrashed`` saying so, and so does every later request."""
        message = f"checkpoint worker (pid {self.pid}) {what}; it was killed"
        logger.error("%s", message)
        crashed = WorkerCrashed(message, returncode=-signal.SIGKILL, pid=self.pid)
        if self._crashed is None and not self._closing:
            self._crashed = crashed
        self._fail_pending(crashed)
        await self._kill()

    async def map_arena(self, arena: ArenaRef) -> None:
        """Have the worker map ``arena`` now. Raises ``OSError`` text inside
        ``CheckpointWriteError`` if the worker cannot map it, and ``WorkerCrashed`` for a
        worker that does not answer within ``subprocess_shutdown_timeout_secs`` (it is
        killed)."""
        await self._checked(RequestType.MAP_ARENA, ArenaPayload(arena))

    async def release_arena(self, arena: ArenaRef) -> None:
        """Have the worker drop its mapping of ``arena``."""
        await self._checked(RequestType.RELEASE_ARENA, ArenaPayload(arena))

    async def _checked(self, request_type: RequestType, payload: ArenaPayload) -> None:
        await self._ensure_started()
        response = await self._request(request_type, payload)
        self._raise_for_failure(response, request_type.value)

    async def ping(self) -> float:
        """Round trip to the worker in seconds; answered even while a write runs."""
        await self.start()
        started = time.perf_counter()
        await self._request(RequestType.PING)
        return time.perf_counter() - started

    async def _request(
        self, request_type: RequestType, payload: Any = None, *, bounded: bool = True
    ) -> WorkerResponse:
        """Send a request and await its answer; ``bounded``: within
        ``subprocess_shutdown_timeout_secs``, past which the worker is killed as hung and
        ``WorkerCrashed`` raised."""
        timeout = self.config.subprocess_shutdown_timeout_secs if bounded else None
        request_id = None
        try:
            async with asyncio.timeout(timeout):
                request_id, future = await self._send_request(request_type, payload)
                return await future
        except TimeoutError:
            what = f"did not answer a {request_type.value} request within {timeout} s"
            await self._kill_hung(what)
            assert self._crashed is not None or self._closing
            closed = WorkerClosed("the checkpoint process was closed", pid=self.pid)
            raise self._crashed or closed from None
        finally:
            if request_id is not None:
                self._forget(request_id)

    async def _send_request(
        self, request_type: RequestType, payload: Any = None
    ) -> tuple[int, asyncio.Future[WorkerResponse]]:
        """Send a request; return its id and the future its response resolves. The caller
        calls ``_forget`` on the id once done with it. Raises ``ProtocolError`` for a request
        the session does not allow now (see ``aiockpt._wire.session``)."""
        if self._crashed is not None:
            raise self._crashed
        if self._closing and self._process is not None and self._process.returncode is not None:
            # Gone after close() failed what was pending: nobody would fail this one. (A
            # worker that exited on its own is failed by the monitor, as a crash.)
            raise WorkerClosed("the checkpoint process was closed", pid=self.pid)
        assert self._channel is not None
        if request_type is RequestType.INIT:
            request = self._session.handshake(payload)
        else:
            request = self._session.request(request_type, payload)
        future: asyncio.Future[WorkerResponse] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        try:
            await self._channel.send(request)
        except ConnectionError:
            pass  # the worker is gone: the monitor fails the future with its exit status
        except BaseException:
            self._session.unsent()
            self._forget(request.request_id)
            raise
        return request.request_id, future

    def _forget(self, request_id: int) -> None:
        """Stop waiting for ``request_id``: a late answer is dropped."""
        self._pending.pop(request_id, None)
        self._progress_callbacks.pop(request_id, None)
        self._session.abandon(request_id)

    def _check_usable(self) -> None:
        if self._closing:
            raise WorkerClosed("the checkpoint process was closed", pid=self.pid)
        if self._crashed is not None:
            raise self._crashed

    def _fail_pending(self, exc: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    # --- owned tasks ---------------------------------------------------------------------------

    async def _read_responses(self) -> None:
        assert self._channel is not None
        try:
            async for body in self._channel.frames():
                response = self._session.receive(body)
                if response is None:
                    continue  # nobody waits for it any more
                if isinstance(response.payload, ProgressPayload):
                    self._report_progress(response.request_id, response.payload)
                    continue
                future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except ConnectionError as exc:
            # A reset channel means the worker is dying: its exit, which the monitor reports
            # as WorkerCrashed naming the signal, is the error to give. Should it linger with
            # its channel gone, it is of no use: fail what is pending and kill it.
            process = self._process
            assert process is not None
            try:
                async with asyncio.timeout(self.config.sigterm_grace_secs):
                    await process.wait()
            except TimeoutError:
                self._broken(ProtocolError(f"channel reset: {exc}"))
                await self._kill()
        except ProtocolError as exc:
            self._broken(exc)
            await self._kill()

    def _report_progress(self, request_id: int, report: ProgressPayload) -> None:
        callback = self._progress_callbacks.get(request_id)
        if callback is None:
            return
        try:
            callback(report.bytes_written)
        except Exception:  # a progress consumer must not break the channel
            logger.exception("progress callback of request %d failed", request_id)

    def _broken(self, exc: ProtocolError) -> None:
        exc.pid = self.pid  # the protocol cannot know which process spoke
        logger.error("checkpoint worker (pid %s) broke the channel: %s", self.pid, exc)
        self._fail_pending(exc)

    async def _watch_exit(self) -> None:
        process = self._process
        assert process is not None
        try:
            returncode = await process.wait()
        except asyncio.CancelledError:
            # The loop is shutting down without close(): never leave the worker behind, but
            # let it finish what it was writing, within the shutdown timeout.
            self._closing = True
            if process.returncode is None:
                try:
                    async with asyncio.timeout(self.config.subprocess_shutdown_timeout_secs):
                        await self._stop_gracefully(process)
                except TimeoutError:
                    await self._escalate(process)
            self._close_free_arenas()
            raise
        if self._closing or self._exit_requested or (self._channel and self._channel.closed):
            # This side ended the worker's service (close, TERMINATE, or its channel closed
            # here): the exit that follows is not a crash.
            self._closing = True
            exited = describe_exit(returncode)
            closed = f"the checkpoint process was closed (worker {exited})"
            self._fail_pending(WorkerClosed(closed, pid=process.pid))
            self._close_free_arenas()
            return
        if self._crashed is None:  # else: killed as hung, which says more than the signal
            self._crashed = WorkerCrashed(
                f"checkpoint worker (pid {process.pid}) {describe_exit(returncode)}",
                returncode=returncode,
                pid=process.pid,
            )
        if self._pending:
            logger.error("%s with %d request(s) pending", self._crashed, len(self._pending))
        self._fail_pending(self._crashed)
        self._close_free_arenas()
