"""Progress reports of the write in progress: counted on the threads that write, sent from the
worker's loop as ``ProgressPayload`` frames (``aiockpt._wire.session`` says when they may be)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

__all__ = ["ProgressReports"]


class ProgressReports:
    """Reports on one write: ``add`` counts bytes written (from any thread) and wakes the
    loop each time another ``every`` bytes are in; a task owned by this object sends the
    count then (the latest only: a slow channel skips counts, never falls behind). ``finish``
    sends the final count and ends the task; call it before the write is answered.

    Create on the worker's running loop.
    """

    def __init__(self, send: Callable[[int], Awaitable[None]], every: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._send = send
        self._every = max(1, every)
        self._lock = threading.Lock()
        self._written = 0
        self._due_at = self._every
        self._wake = asyncio.Event()
        self._finished = False
        self._task = self._loop.create_task(self._run())

    def add(self, count: int) -> None:
        """Count ``count`` more bytes written (thread-safe)."""
        with self._lock:
            self._written += count
            if self._written < self._due_at:
                return
            self._due_at = self._written + self._every
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: the worker is exiting, nobody to tell
            pass

    @property
    def written(self) -> int:
        with self._lock:
            return self._written

    async def finish(self) -> None:
        """Send the final count (if it is new), then stop."""
        self._finished = True
        self._wake.set()
        await self._task

    async def _run(self) -> None:
        sent = 0
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                written = self.written
                if written != sent:
                    await self._send(written)
                    sent = written
                if self._finished:
                    return
        except ConnectionError:
            return  # the channel is gone; the write's answer meets the same error and says so
