"""Cleans up after an agent that died without doing so itself: its workers' process groups
and its temporary log directory.

``run()`` stops its workers (each a process group of its own, with whatever it started) and
removes its temporary log directory itself when it ends. An agent killed with SIGKILL (or by
the OOM killer) runs no more code: its workers die with it (parent-death signal), but that
signal reaches the direct worker only, not the children a worker started (data loader
processes, a shell's commands), and nobody would remove the directory. The agent therefore
starts this helper once per run::

    python -I -S janitor.py <fd> [<path>]

It reads ``fd``, one end of a socket pair whose only other end the agent holds, one message
per line:

- ``+<pgid>`` (:func:`watch`): a worker started, in process group ``pgid``;
- ``-<pgid>`` (:func:`forget`): that group was stopped (SIGKILLed as a whole) and its worker
  reaped; the id is forgotten, since it may now be reused by an unrelated process;
- ``done`` (:data:`DONE`): ``run()`` ended and cleaned up itself; the helper just exits. (Not
  EOF: a process forked from an in-process agent inherits the write end and would hold the
  EOF back for as long as it lives.)
- end of file before ``done``: the agent died (the kernel closed its end). The helper
  SIGKILLs every group it watches, then removes ``path`` if it was given one, retrying for a
  while, since workers killed at that same moment may still be creating their error files.

A worker that the agent spawned but had not yet announced when it died is still killed by its
parent-death signal; only children it started within that moment could escape.

The helper runs in a session of its own, so that a terminal's Ctrl-C to the agent's process
group cannot end it first; standard library only and no ``site``, so it starts in
milliseconds. Only the agent's own temporary directory is ever handed to it: a user's
``log_dir`` is kept, and so is a temporary one that holds redirected logs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time

__all__ = ["DONE", "forget", "janitor_command", "watch"]

#: how long to keep retrying the removal while dying workers may still write into the tree
_RETRY_S = 10.0
#: the agent's last message: it stopped its workers and removed its directory itself
DONE = b"done\n"


def janitor_command(read_fd: int, path: str | None) -> list[str]:
    """The argv of a helper that, if ``read_fd`` reaches EOF before :data:`DONE`,
    kills the process groups it was told to watch and removes ``path`` (if not ``None``)."""
    return [
        sys.executable,
        "-I",
        "-S",
        os.path.abspath(__file__),
        str(read_fd),
        *([path] if path is not None else []),
    ]


def watch(pgid: int) -> bytes:
    """The message that adds process group ``pgid`` to those killed if the agent dies."""
    return b"+%d\n" % pgid


def forget(pgid: int) -> bytes:
    """The message that drops process group ``pgid`` (stopped by the agent itself)."""
    return b"-%d\n" % pgid


def main(argv: list[str]) -> None:
    read_fd = int(argv[1])
    path = argv[2] if len(argv) > 2 else None
    groups: set[int] = set()
    pending = b""  # an incomplete last message: never more than one short line
    while data := os.read(read_fd, 4096):
        *messages, pending = (pending + data).split(b"\n")
        for message in messages:
            if message + b"\n" == DONE:  # the agent cleaned up itself
                return
            if message.startswith(b"+"):
                groups.add(int(message[1:]))
            else:
                groups.discard(int(message[1:]))
    # EOF: the agent is gone. Its workers die of their parent-death signal; what they started
    # shares their process group and dies here.
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if path is None:
        return
    deadline = time.monotonic() + _RETRY_S
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.02)


if __name__ == "__main__":
    main(sys.argv)
