"""One worker process as the agent sees it: started, awaited, signalled, closed.

Each worker starts with ``asyncio.create_subprocess_exec`` in a session of its own (so the agent
can signal the worker *and its children* as one process group) through :mod:`bootstrap`.
Nothing here polls: ``exited`` is a task over ``Process.wait()``; tees and the function's reply
are stream reads on the same loop.

The agent passes its own pipe and socket fds rather than ``stdout=PIPE``: asyncio's transport
then owns no pipe of the child, so ``wait()`` resolves at exit on every Python version, even
when a grandchild still holds the worker's stdout.

A :class:`SpareProcess` is a Python worker started ahead of its rendezvous round (bootstrap's
spare mode): :meth:`WorkerProcess.start` given one activates it (environment, arguments and
output fds over its socket) instead of spawning, so the worker starts with ``torch``
already imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiockpt.elastic.bootstrap import (
    REPLY_HEADER,
    binary_command,
    function_command,
    send_activation,
    spare_command,
)
from aiockpt.elastic.logs import Std, console_for, tee_stream

__all__ = ["NO_REPLY", "SpareProcess", "StreamTarget", "WorkerProcess"]

logger = logging.getLogger(__name__)

#: how long output and the reply may trail the exit of the worker (a grandchild holding the
#: pipe would otherwise keep the tee open forever)
_DRAIN_GRACE_S = 2.0
#: the return value of a function worker that exited 0 without replying (``os._exit(0)``)
NO_REPLY: Any = None
#: how long a discarded spare (SIGKILLed) may take to be reaped
_SPARE_REAP_S = 5.0


@dataclass(frozen=True)
class StreamTarget:
    """Where one standard stream of one worker goes.

    ``path``: ``""`` for the agent's console, ``os.devnull``, or a log file. ``tee_prefix``:
    when not ``None``, the file is also copied to the console with this prefix per line.
    """

    path: str
    tee_prefix: str | None = None


class WorkerProcess:
    """A started worker. Create with :meth:`start`; always :meth:`close` it."""

    def __init__(
        self,
        local_rank: int,
        process: asyncio.subprocess.Process,
        tees: list[asyncio.Task[None]],
        reply: asyncio.Task[Any] | None,
        to_close: list[Callable[[], None]],
    ) -> None:
        self.local_rank = local_rank
        self.pid = process.pid
        #: resolves to the exit code (negative: the signal that killed the worker)
        self.exited: asyncio.Task[int] = asyncio.create_task(process.wait())
        self._tees = tees
        self._reply = reply
        self._to_close = to_close

    @classmethod
    async def start(
        cls,
        local_rank: int,
        entrypoint: str | Callable[..., Any],
        args: tuple[Any, ...],
        env: dict[str, str],
        stdout: StreamTarget,
        stderr: StreamTarget,
        spare: SpareProcess | None = None,
    ) -> WorkerProcess:
        """Start one worker. ``entrypoint`` is a resolved binary path or a function.

        With ``spare`` (started for this ``entrypoint``), the spare becomes the worker:
        ``args`` are then the target's own arguments (what follows the script or module) and
        ``env`` replaces the spare's environment. The caller owns the spare until this
        returns; if it raises, the spare is unusable and must be discarded.

        Raises ``OSError`` if the process, a log file or a pipe cannot be created (or the
        spare is gone), and ``pickle.PicklingError``/``TypeError``/``AttributeError`` if a
        function or its arguments cannot be pickled.
        """
        loop = asyncio.get_running_loop()
        to_close: list[Callable[[], None]] = []  # agent-side resources, released by close()
        child_fds: list[int] = []  # the child's ends, closed here once it has started
        # (pipe reader, log file fd, prefix, which stream) for each tee to start
        tees: list[tuple[asyncio.StreamReader, int, str, Std]] = []
        call = b""
        activation = b""
        # Everything that awaits happens before the spawn: once the child exists, nothing may
        # be cancelled before it is handed to the caller, or it would run untracked.
        try:
            std_fds: list[int | None] = []
            for stream, target in ((Std.OUT, stdout), (Std.ERR, stderr)):
                if target.path == "":
                    std_fds.append(None)
                elif target.path == os.devnull:
                    std_fds.append(subprocess.DEVNULL)
                else:
                    log_fd = os.open(target.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    if target.tee_prefix is None:
                        child_fds.append(log_fd)
                        std_fds.append(log_fd)
                    else:
                        to_close.append(functools.partial(os.close, log_fd))
                        read_end, write_end = os.pipe()
                        child_fds.append(write_end)
                        std_fds.append(write_end)
                        reader = asyncio.StreamReader()
                        transport, _ = await loop.connect_read_pipe(
                            functools.partial(asyncio.StreamReaderProtocol, reader),
                            os.fdopen(read_end, "rb", buffering=0),
                        )
                        to_close.append(transport.close)
                        tees.append((reader, log_fd, target.tee_prefix, stream))

            channel: socket.socket | None = None
            if spare is not None:
                given = []  # what the spare's stdout and stderr become: fds to send
                for console_fd, fd in ((1, std_fds[0]), (2, std_fds[1])):
                    if fd is None:
                        given.append(console_fd)  # as a spawned worker inherits them
                    elif fd == subprocess.DEVNULL:
                        child_fds.append(os.open(os.devnull, os.O_WRONLY))
                        given.append(child_fds[-1])
                    else:
                        given.append(fd)
                channel = spare.channel
                activation = send_activation(
                    channel, env, [str(a) for a in args], given[0], given[1]
                )
                process = spare.process
            else:
                if isinstance(entrypoint, str):
                    argv = binary_command(os.getpid(), entrypoint, [str(a) for a in args])
                    pass_fds: tuple[int, ...] = ()
                else:
                    channel, child_end = socket.socketpair()
                    to_close.append(channel.close)
                    child_fds.append(child_end.detach())
                    argv = function_command(os.getpid(), child_fds[-1])
                    pass_fds = (child_fds[-1],)
                    call = pickle.dumps((sys.path, pickle.dumps((entrypoint, args))))

                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdout=std_fds[0],
                    stderr=std_fds[1],
                    env=env,
                    start_new_session=True,
                    pass_fds=pass_fds,
                )
        except BaseException:
            for fd in child_fds:
                os.close(fd)
            for release in to_close:
                release()
            raise
        for fd in child_fds:
            os.close(fd)

        tee_tasks = [
            asyncio.create_task(tee_stream(reader, log_fd, console_for(stream), prefix))
            for reader, log_fd, prefix, stream in tees
        ]
        reply = None
        if spare is not None:
            spare.activated = True  # its channel is the worker's now: closed by close()
            assert channel is not None
            to_close.append(channel.close)
            tee_tasks.append(asyncio.create_task(_send_rest(channel, activation)))
        elif channel is not None:
            reply = asyncio.create_task(_exchange(channel, call))
        return cls(local_rank, process, tee_tasks, reply, to_close)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker's process group (the worker and its children).

        The group is signalled even after the worker itself exited: its children may remain.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def return_value(self) -> Any:
        """What the function returned (``None`` for binaries and for a worker that exited
        without replying). Call after a zero exit; raises ``pickle.UnpicklingError`` (or what
        unpickling raises) for a corrupt reply."""
        if self._reply is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(self._reply), _DRAIN_GRACE_S)
        except TimeoutError:
            logger.warning("local_rank %s exited 0 but sent no return value", self.local_rank)
            return NO_REPLY

    async def close(self) -> None:
        """Let the tees drain (bounded), then release pipes, sockets and files.

        Call after ``exited`` resolved. Never raises for a tee or reply that failed: that is
        logged, the worker's exit code is the result that counts.
        """
        tasks = [*self._tees, *([self._reply] if self._reply else [])]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_DRAIN_GRACE_S)
            for task in pending:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, Exception):
                    logger.warning("local_rank %s: output lost: %r", self.local_rank, outcome)
        for release in self._to_close:
            release()
        self._to_close.clear()


async def _exchange(channel: socket.socket, call: bytes) -> Any:
    """Send the call, then read the length-prefixed reply; ``NO_REPLY`` if the worker closed
    the socket without one (it died, or left with ``os._exit``)."""
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    try:
        writer.write(call)
        writer.write_eof()
        await writer.drain()
        (size,) = REPLY_HEADER.unpack(await reader.readexactly(REPLY_HEADER.size))
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return NO_REPLY
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _send_rest(channel: socket.socket, activation: bytes) -> None:
    """Send the rest of a spare's activation (after the header and fds); a spare that died
    meanwhile fails as a worker, by its exit code."""
    with contextlib.suppress(ConnectionError):
        await asyncio.get_running_loop().sock_sendall(channel, activation)


class SpareProcess:
    """A Python worker interpreter started before its rank is known (bootstrap's spare
    mode), waiting with its imports done. Create with :meth:`start`; either activate it
    with ``WorkerProcess.start(spare=...)`` or :meth:`discard` it.

    It runs in a session of its own, as every worker, with the parent-death signal set;
    ``env`` is the environment it started with, which its imports saw.
    """

    def __init__(
        self, process: asyncio.subprocess.Process, channel: socket.socket, env: dict[str, str]
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.channel = channel
        self.env = env
        #: set by ``WorkerProcess.start``: the spare is a worker now, no longer this object's
        self.activated = False

    @classmethod
    async def start(
        cls,
        interpreter: str,
        flags: list[str],
        module: bool,
        target: str,
        env: dict[str, str],
        preloads: tuple[str, ...],
    ) -> SpareProcess:
        """Start a spare that will run ``target`` (a script, or a module if ``module``)
        under ``interpreter`` with ``flags``, importing ``preloads`` and the target's
        installed imports meanwhile. Its output until activation is captured by the spare
        and handed on to the worker's. Raises ``OSError`` if it cannot be started."""
        channel, child_end = socket.socketpair()
        try:
            child_fd = child_end.detach()
            try:
                argv = spare_command(
                    os.getpid(), interpreter, flags, child_fd, module, target, preloads
                )
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    # what the interpreter prints before the spare captures its output
                    # (a bad flag) is lost: such a spare exits and is not used
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    pass_fds=(child_fd,),
                )
            finally:
                os.close(child_fd)
        except BaseException:
            channel.close()
            raise
        channel.setblocking(False)  # the loop sends the activation's payload
        return cls(process, channel, env)

    @property
    def alive(self) -> bool:
        """Whether the spare is still running (as far as the loop knows)."""
        return self.process.returncode is None

    async def discard(self) -> None:
        """Kill the spare's process group and reap it (bounded); a no-op once activated.
        Never raises."""
        if self.activated:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.channel.close()
        try:
            await asyncio.wait_for(self.process.wait(), _SPARE_REAP_S)
        except TimeoutError:
            logger.error("spare pid %s survived SIGKILL; abandoning it", self.pid)
