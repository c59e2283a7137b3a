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
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import struct
import sys
from typing import Any

__all__ = ["REPLY_HEADER", "binary_command", "function_command"]

_PR_SET_PDEATHSIG = 1
#: the reply is one unsigned 64-bit big-endian length, then that many bytes of pickle
REPLY_HEADER = struct.Struct(">Q")


def binary_command(agent_pid: int, binary: str, args: list[str]) -> list[str]:
    """The argv that starts ``binary`` with ``args`` as a worker of the agent ``agent_pid``."""
    bootstrap = os.path.abspath(__file__)
    return [sys.executable, "-I", "-S", bootstrap, "exec", str(agent_pid), binary, *args]


def function_command(agent_pid: int, call_fd: int) -> list[str]:
    """The argv that runs the function sent over ``call_fd`` as a worker of ``agent_pid``."""
    module = "aiockpt.elastic.bootstrap"
    return [sys.executable, "-u", "-m", module, "call", str(agent_pid), str(call_fd)]


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


def main(argv: list[str]) -> None:
    mode, agent_pid = argv[1], int(argv[2])
    _die_with_parent(agent_pid)
    if mode == "exec":
        try:
            os.execvp(argv[3], argv[3:])
        except OSError as exc:
            print(f"aiockpt worker: cannot execute {argv[3]}: {exc}", file=sys.stderr)
            os._exit(127)
    _run_function(int(argv[3]))


if __name__ == "__main__":
    main(sys.argv)
