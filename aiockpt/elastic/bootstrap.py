"""The first code a worker runs: tie its life to the agent's, then become the worker.

Binaries: ``python -I -S bootstrap.py exec <agent_pid> <binary> <args...>`` sets the parent-death
signal and ``execvp``s the binary (same pid, same session, signal kept across exec). Isolated
mode and no ``site`` keep this hop to a bare interpreter start; it imports nothing but the
standard library, so it also runs as a plain file.

Functions: ``python -u -m aiockpt.elastic.bootstrap call <agent_pid> <fd>`` sets the signal,
reads ``(sys.path, pickle((fn, args)))`` from the socket ``fd`` until EOF, runs
``record(fn)(*args)`` and sends back the pickled return value, length-prefixed (a grandchild
that inherited the socket cannot hold the reply hostage, since no EOF is needed).

Why a parent-death signal and not a preexec function: ``preexec_fn`` runs Python between fork
and exec in the agent's (threaded: store client) process, is unsupported by some loops and
forces fork over vfork; ``prctl(PR_SET_PDEATHSIG)`` in the child costs one small interpreter
start for binaries and nothing for functions. SIGKILL, not SIGTERM: a worker whose agent is
gone has nobody to report to, and a checkpoint commit is atomic (temporary directory, rename),
so a kill mid-save leaves no torn checkpoint.

Spares (pre-started Python workers): ``python [flags] bootstrap.py spare <agent_pid> <fd>
script|module <target> <modules>`` is a worker interpreter started *before* its rank is
known, so that a restart does not wait for ``import torch`` (seconds). It sets the signal,
imports what the target will import (:func:`preload_modules`: ``modules``, comma-separated,
by default ``torch``, and the target's top-level imports of installed packages, never its
own modules), then blocks on the socket ``fd``. The
agent activates it with :func:`send_activation`: the worker's whole environment (RANK,
WORLD_SIZE, MASTER_ADDR, ... replace what the spare started with), its arguments, and its
stdout and stderr as file descriptors (``SCM_RIGHTS``). The spare then runs the target as
``python [flags] <script> <args>`` or ``python [flags] -m <module> <args>`` would
(``runpy``: ``__main__``, ``sys.argv``, ``sys.path[0]``), in the same process: same pid,
same session, same parent-death signal. What it printed while importing is replayed into
the worker's stdout and stderr first. An EOF instead of an activation (the agent dropped
it) ends it with exit code 0.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import signal
import socket
import struct
import sys
from typing import Any

__all__ = [
    "ACTIVATION_HEADER",
    "DEFAULT_PRELOADS",
    "REPLY_HEADER",
    "binary_command",
    "function_command",
    "preload_modules",
    "send_activation",
    "spare_command",
]

_PR_SET_PDEATHSIG = 1
#: the reply is one unsigned 64-bit big-endian length, then that many bytes of pickle
REPLY_HEADER = struct.Struct(">Q")
#: a spare's activation: this header (payload length; stdout and stderr ride on it as
#: ``SCM_RIGHTS``), then that many bytes of JSON ``{"env": {...}, "args": [...]}``
ACTIVATION_HEADER = struct.Struct(">Q")
#: what a spare imports whether or not the target names it at top level (scripts often
#: import torch inside ``main``); a module that fails to import is left for the target
DEFAULT_PRELOADS = ("torch",)


def binary_command(agent_pid: int, binary: str, args: list[str]) -> list[str]:
    """The argv that starts ``binary`` with ``args`` as a worker of the agent ``agent_pid``."""
    bootstrap = os.path.abspath(__file__)
    return [sys.executable, "-I", "-S", bootstrap, "exec", str(agent_pid), binary, *args]


def function_command(agent_pid: int, call_fd: int) -> list[str]:
    """The argv that runs the function sent over ``call_fd`` as a worker of ``agent_pid``."""
    module = "aiockpt.elastic.bootstrap"
    return [sys.executable, "-u", "-m", module, "call", str(agent_pid), str(call_fd)]


def spare_command(
    agent_pid: int,
    interpreter: str,
    flags: list[str],
    call_fd: int,
    module: bool,
    target: str,
    preloads: tuple[str, ...],
) -> list[str]:
    """The argv of a spare of ``agent_pid`` that will run ``target`` (a script path, or a
    module name if ``module``) with ``interpreter`` and its ``flags`` (``-u``...), once
    activated over ``call_fd``; it imports ``preloads`` first (see :func:`preload_modules`)."""
    bootstrap = os.path.abspath(__file__)
    kind = "module" if module else "script"
    return [
        *(interpreter, *flags, bootstrap, "spare", str(agent_pid), str(call_fd)),
        *(kind, target, ",".join(preloads)),
    ]


def send_activation(
    channel: socket.socket, env: dict[str, str], args: list[str], stdout: int, stderr: int
) -> bytes:
    """Hand a spare its ``env``, ``args`` and output fds; returns the payload still to be
    sent after the header (by the caller, as it likes: the agent's loop does not block).

    The header and the fds go out in one small ``sendmsg``, which a fresh socket's buffer
    always takes. Raises ``OSError`` if the spare is gone.
    """
    payload = json.dumps({"env": env, "args": args}).encode()
    socket.send_fds(channel, [ACTIVATION_HEADER.pack(len(payload))], [stdout, stderr])
    return payload


def preload_modules(
    target: str, module: bool, search_path0: str, always: tuple[str, ...] = DEFAULT_PRELOADS
) -> list[str]:
    """What a spare imports ahead: ``always`` and the target's top-level
    absolute imports whose top-level package is installed, i.e. not found in
    ``search_path0`` (the script's directory, or the working directory for ``-m``) nor the
    target's own package. The target's own modules are left alone: they may read
    ``RANK`` and the like when imported, and these are not set until activation."""
    import ast
    import importlib.util

    if module:
        try:
            spec = importlib.util.find_spec(target.partition(".")[0])
        except (ImportError, ValueError):
            spec = None
        path = None
        if spec is not None and "." not in target and spec.origin:
            path = spec.origin
        own = target.partition(".")[0]
    else:
        path, own = target, ""
    names: list[str] = list(always)
    if path is None or not path.endswith(".py"):
        return names
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return names  # the target reports that itself when it runs
    found: list[str] = []
    for node in tree.body:  # top level only: what runs at import, not in functions
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    local = os.path.realpath(search_path0 or os.getcwd())
    for name in found:
        top = name.partition(".")[0]
        if name in names or top == own or top == "__future__":
            continue
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue  # missing: the target reports it
        where = list(spec.submodule_search_locations or [])
        if not where and spec.has_location and spec.origin:
            where = [spec.origin]
        if any(os.path.realpath(p).startswith(local + os.sep) for p in where):
            continue
        names.append(name)
    return names


def _die_with_parent(agent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The agent may have died before prctl: then no signal will ever come.
    if os.getppid() != agent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _run_function(call_fd: int) -> None:
    with socket.socket(fileno=call_fd) as channel:
        payload = b"".join(iter(lambda: channel.recv(1 << 20), b""))
        sys_path, pickled_call = pickle.loads(payload)
        # As multiprocessing's spawn does: the agent's import path, so the function resolves.
        sys.path.extend(p for p in sys_path if p not in sys.path)
        from aiockpt.elastic.failures import record

        def call() -> Any:
            # unpickled inside record: a function that cannot be imported is recorded too
            fn, args = pickle.loads(pickled_call)
            return fn(*args)

        result = record(call)()
        reply = pickle.dumps(result)
        channel.sendall(REPLY_HEADER.pack(len(reply)) + reply)


def _capture_output() -> list[int]:
    """Point fds 1 and 2 at unnamed temporary files until activation; returns them (the
    captured output's fds, in the order of 1 and 2)."""
    import tempfile

    captured = []
    for fd in (1, 2):
        # unnamed (O_TMPFILE, or unlinked at once): nothing to remove whatever happens
        with tempfile.TemporaryFile() as holder:
            captured.append(os.dup(holder.fileno()))
        os.dup2(captured[-1], fd)
    return captured


def _receive_activation(channel: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The activation the agent sent, with its fds; ``None`` at EOF (not wanted)."""
    data, fds = b"", []
    while len(data) < ACTIVATION_HEADER.size:
        chunk, new_fds, _, _ = socket.recv_fds(channel, ACTIVATION_HEADER.size - len(data), 2)
        fds.extend(new_fds)
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None
        data += chunk
    (size,) = ACTIVATION_HEADER.unpack(data)
    payload = b""
    while len(payload) < size:
        chunk = channel.recv(min(size - len(payload), 1 << 20))
        if not chunk:
            raise EOFError("the agent went away in the middle of an activation")
        payload += chunk
    return json.loads(payload), fds


def _run_spare(call_fd: int, module: bool, target: str, always: tuple[str, ...]) -> None:
    """Preload, wait for the activation, then become the worker (see the module doc)."""
    import runpy

    captured = _capture_output()
    # As ``python script.py`` / ``python -m`` would have it (not this file's directory).
    path0 = os.path.dirname(os.path.realpath(target)) if not module else os.getcwd()
    sys.path[0] = path0
    for name in preload_modules(target, module, path0, always):
        try:
            __import__(name)
        except Exception:  # the target imports it again and reports why
            pass
    with socket.socket(fileno=call_fd) as channel:
        activation = _receive_activation(channel)
    if activation is None:
        os._exit(0)
    request, (stdout, stderr) = activation
    # Every variable, C level included (os.environ's writes call putenv/unsetenv).
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, held, given in ((1, captured[0], stdout), (2, captured[1], stderr)):
        os.lseek(held, 0, os.SEEK_SET)
        while chunk := os.read(held, 1 << 16):
            while chunk:  # a pipe may take part of it
                chunk = chunk[os.write(given, chunk) :]
        os.close(held)
        os.dup2(given, fd)
        os.close(given)
    sys.argv = [target, *request["args"]]
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


def main(argv: list[str]) -> None:
    mode, agent_pid = argv[1], int(argv[2])
    _die_with_parent(agent_pid)
    if mode == "spare":
        always = tuple(filter(None, argv[6].split(",")))
        _run_spare(int(argv[3]), argv[4] == "module", argv[5], always)
        return
    if mode == "exec":
        try:
            os.execvp(argv[3], argv[3:])
        except OSError as exc:
            print(f"aiockpt worker: cannot execute {argv[3]}: {exc}", file=sys.stderr)
            os._exit(127)
    _run_function(int(argv[3]))


if __name__ == "__main__":
    main(sys.argv)
