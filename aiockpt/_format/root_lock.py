"""One writer per checkpoint root: an ``flock`` on ``<root>/.aiockpt-writer.lock``.

The lock is held by an open file description, so the kernel releases it when the holder
exits, however it dies: a crashed trainer never leaves a root locked (its lock file stays,
unlocked). The holder writes its pid and host into the file so that the next writer's error
can name it, and removes the file when it releases the lock; a writer that locked a file
someone removed meanwhile sees that the name no longer leads to it and tries again. Readers
(``latest``, ``load``, ``Checkpointer(read_only=True)``) take no lock and delete nothing.

``flock`` is advisory and, on some network file systems, local to one host; a root shared by
jobs on several hosts needs a file system whose ``flock`` spans them (NFSv4 and Lustre with
``flock`` mounts do).
"""

from __future__ import annotations

import fcntl
import os
import socket

from aiockpt.errors import RootLocked

__all__ = ["LOCK_NAME", "RootLock"]

LOCK_NAME = ".aiockpt-writer.lock"
#: what is read of a holder's note (pid and host): it is only for the error message
_NOTE_MAX = 512


class RootLock:
    """The writer lock of ``root``, held from ``acquire`` until ``release``."""

    def __init__(self, root: str, fd: int) -> None:
        self.root = root
        self.path = os.path.join(root, LOCK_NAME)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: str) -> RootLock:
        """Take the lock without waiting (blocking file I/O: call it in a thread).

        Raises ``RootLocked`` naming the holder's pid and host when another writer holds it,
        and ``OSError`` when the lock file cannot be opened (a symbolic link there is
        refused).
        """
        path = os.path.join(root, LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid, host = _read_note(fd)
                    raise RootLocked(
                        f"another process writes checkpoints under {root}: pid {pid} on "
                        f"host {host} holds {path}; open the root with read_only=True to "
                        "read it, or stop that writer first",
                        path=root,
                        pid=pid,
                        host=host,
                    ) from None
                if not _still_named(fd, path):
                    os.close(fd)  # its holder removed it as we locked it: lock the new one
                    continue
                note = f"{os.getpid()} {socket.gethostname()}\n".encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, note, 0)
            except BaseException:
                os.close(fd)
                raise
            return cls(root, fd)

    def release(self) -> None:
        """Remove the lock file and give the lock up; idempotent. (Removing before
        unlocking: nobody can lock this file between the two and believe it the root's.)"""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _still_named(fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(fd)


def _still_named(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_note(fd: int) -> tuple[int | None, str | None]:
    try:
        fields = os.pread(fd, _NOTE_MAX, 0).decode(errors="replace").split()
        return int(fields[0]), fields[1]
    except (OSError, ValueError, IndexError):
        return None, None
