"""Removes the agent's temporary log directory once the agent is gone, however it went.

``run()`` removes that directory itself when it ends, but an agent killed with SIGKILL (or by
the OOM killer) runs no more code, and its workers die with it (parent-death signal), so
nobody would. The agent therefore starts this helper next to the directory::

    python -I -S janitor.py <fd> <path>

It blocks reading the pipe ``fd``, whose only write end the agent holds:

- one byte: ``run()`` ended and removed the directory itself; the helper just exits. (Not
  EOF: a process forked from an in-process agent inherits the write end and would hold the
  EOF back for as long as it lives.)
- end of file: the agent died (the kernel closed its end); the helper removes ``path``,
  retrying for a while, since workers killed at that same moment may still be creating their
  error files.

The helper runs in a session of its own, so that a terminal's Ctrl-C to the agent's process
group cannot end it first; standard library only and no ``site``, so it starts in
milliseconds. Only the agent's own temporary directory is ever handed to it: a user's
``log_dir`` is kept, and so is a temporary one that holds redirected logs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

__all__ = ["janitor_command"]

#: how long to keep retrying the removal while dying workers may still write into the tree
_RETRY_S = 10.0


def janitor_command(read_fd: int, path: str) -> list[str]:
    """The argv of a helper that removes ``path`` if ``read_fd``'s pipe reaches EOF unread."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), str(read_fd), path]


def main(argv: list[str]) -> None:
    read_fd, path = int(argv[1]), argv[2]
    if os.read(read_fd, 1):  # the agent cleaned up itself
        return
    deadline = time.monotonic() + _RETRY_S
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.02)


if __name__ == "__main__":
    main(sys.argv)
